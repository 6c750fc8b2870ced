//! Defaulting: the fields Kubernetes fills in when a user leaves them out, so
//! `kubectl get -o yaml` shows what users expect and controllers need no guesswork.

use serde_json::{Value, json};

/// Sets `obj[key]` to `value` when it is missing or null.
fn default(obj: &mut Value, key: &str, value: Value) {
    if let Value::Object(m) = obj
        && m.get(key).is_none_or(Value::is_null)
    {
        m.insert(key.to_string(), value);
    }
}

/// Makes sure `obj[key]` is an object and returns it.
fn child<'a>(obj: &'a mut Value, key: &str) -> &'a mut Value {
    default(obj, key, json!({}));
    &mut obj[key]
}

pub fn apply(kind: &str, obj: &mut Value) {
    match kind {
        "Pod" => pod_spec(child(obj, "spec")),
        "Deployment" => {
            let spec = child(obj, "spec");
            default(spec, "replicas", json!(1));
            default(spec, "revisionHistoryLimit", json!(10));
            default(spec, "progressDeadlineSeconds", json!(600));
            let strategy = child(spec, "strategy");
            default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = child(strategy, "rollingUpdate");
                default(ru, "maxSurge", json!("25%"));
                default(ru, "maxUnavailable", json!("25%"));
            }
            template(spec);
        }
        "ReplicaSet" => {
            let spec = child(obj, "spec");
            default(spec, "replicas", json!(1));
            template(spec);
        }
        "DaemonSet" => {
            let spec = child(obj, "spec");
            default(spec, "revisionHistoryLimit", json!(10));
            let strategy = child(spec, "updateStrategy");
            default(strategy, "type", json!("RollingUpdate"));
            if strategy["type"] == "RollingUpdate" {
                let ru = child(strategy, "rollingUpdate");
                default(ru, "maxUnavailable", json!(1));
                default(ru, "maxSurge", json!(0));
            }
            template(spec);
        }
        "Service" => service(child(obj, "spec")),
        "Namespace" => {
            default(child(obj, "spec"), "finalizers", json!(["kubernetes"]));
            default(child(obj, "status"), "phase", json!("Active"));
            // Kubernetes labels every namespace with its own name.
            let name = obj["metadata"]["name"].clone();
            if let Some(name) = name.as_str() {
                let labels = child(child(obj, "metadata"), "labels");
                default(labels, "kubernetes.io/metadata.name", json!(name));
            }
        }
        "Secret" => default(obj, "type", json!("Opaque")),
        "Node" => {
            if let Some(name) = obj["metadata"]["name"].as_str().map(str::to_string) {
                let labels = child(child(obj, "metadata"), "labels");
                default(labels, "kubernetes.io/hostname", json!(name));
            }
        }
        _ => {}
    }
}

fn template(spec: &mut Value) {
    let tmpl = child(spec, "template");
    child(tmpl, "metadata");
    pod_spec(child(tmpl, "spec"));
}

fn pod_spec(spec: &mut Value) {
    default(spec, "restartPolicy", json!("Always"));
    default(spec, "terminationGracePeriodSeconds", json!(30));
    default(spec, "dnsPolicy", json!("ClusterFirst"));
    default(spec, "schedulerName", json!("default-scheduler"));
    default(spec, "securityContext", json!({}));
    default(spec, "enableServiceLinks", json!(true));
    for list in ["initContainers", "containers"] {
        if let Some(cs) = spec[list].as_array_mut() {
            for c in cs {
                container(c);
            }
        }
    }
}

fn container(c: &mut Value) {
    let image = c["image"].as_str().unwrap_or("").to_string();
    // The tag is after the last ':' that follows the last '/'; digests pin too.
    let last = image.rsplit('/').next().unwrap_or("");
    let tag = last.split_once(':').map(|(_, t)| t);
    let pinned = image.contains('@') || tag.is_some_and(|t| t != "latest");
    default(
        c,
        "imagePullPolicy",
        json!(if pinned { "IfNotPresent" } else { "Always" }),
    );
    default(c, "terminationMessagePath", json!("/dev/termination-log"));
    default(c, "terminationMessagePolicy", json!("File"));
    default(c, "resources", json!({}));
    if let Some(ports) = c["ports"].as_array_mut() {
        for p in ports {
            default(p, "protocol", json!("TCP"));
        }
    }
}

fn service(spec: &mut Value) {
    default(spec, "type", json!("ClusterIP"));
    default(spec, "sessionAffinity", json!("None"));
    if spec["type"] == "ExternalName" {
        return;
    }
    default(spec, "ipFamilies", json!(["IPv4"]));
    default(spec, "ipFamilyPolicy", json!("SingleStack"));
    default(spec, "internalTrafficPolicy", json!("Cluster"));
    if matches!(spec["type"].as_str(), Some("NodePort" | "LoadBalancer")) {
        default(spec, "externalTrafficPolicy", json!("Cluster"));
    }
    if let Some(ports) = spec["ports"].as_array_mut() {
        for p in ports {
            default(p, "protocol", json!("TCP"));
            let port = p["port"].clone();
            default(p, "targetPort", port);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deployment_and_pod_defaults() {
        let mut d = json!({"metadata":{"name":"w"},"spec":{"template":{"spec":{"containers":[
            {"name":"a","image":"nginx"},{"name":"b","image":"reg:5000/x:1.2","ports":[{"containerPort":80}]}]}}}});
        apply("Deployment", &mut d);
        assert_eq!(d["spec"]["replicas"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        let cs = &d["spec"]["template"]["spec"]["containers"];
        assert_eq!(cs[0]["imagePullPolicy"], "Always");
        assert_eq!(cs[1]["imagePullPolicy"], "IfNotPresent");
        assert_eq!(cs[1]["ports"][0]["protocol"], "TCP");
        assert_eq!(d["spec"]["template"]["spec"]["restartPolicy"], "Always");
    }

    #[test]
    fn service_defaults_keep_user_values() {
        let mut s = json!({"spec":{"type":"NodePort","ports":[{"port":80},{"port":53,"protocol":"UDP","targetPort":5353}]}});
        apply("Service", &mut s);
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 80);
        assert_eq!(s["spec"]["ports"][1]["targetPort"], 5353);
        assert_eq!(s["spec"]["ports"][1]["protocol"], "UDP");
        assert_eq!(s["spec"]["externalTrafficPolicy"], "Cluster");
    }
}
