//! A container's environment, as the kubelet builds it: `envFrom` (ConfigMaps, Secrets,
//! with prefix), then `env` in order, where `valueFrom` reads a ConfigMap key, a Secret
//! key or a field of the pod (metadata.name/namespace/uid/labels/annotations,
//! spec.nodeName, spec.serviceAccountName, status.podIP, status.hostIP), and `$(VAR)`
//! references to earlier variables are expanded (`$$` is a literal `$`). command and
//! args are expanded against the result.
//!
//! A missing object or key (not marked optional) is the kubelet's
//! CreateContainerConfigError, with its message.

use std::collections::BTreeMap;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Container, Pod, Secret},
};
use kube::{Api, Client};

/// Values of the pod the downward API can give.
#[derive(Debug, Clone, Default)]
pub struct PodFields {
    pub pod_ip: String,
    pub host_ip: String,
    pub node_name: String,
}

/// Expands `$(NAME)` from `vars`; `$$` is `$`; unknown references stay as written.
pub fn expand(s: &str, vars: &BTreeMap<String, String>) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + end];
                if let Some(v) = vars.get(name) {
                    out.push_str(v);
                    i += end + 3;
                    continue;
                }
            }
        }
        // Push one whole char.
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

fn field_ref(pod: &Pod, path: &str, f: &PodFields) -> Result<String, String> {
    let m = &pod.metadata;
    let label_or_annotation = |prefix: &str, map: &Option<BTreeMap<String, String>>| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(|k| {
                map.as_ref()
                    .and_then(|m| m.get(k))
                    .cloned()
                    .unwrap_or_default()
            })
    };
    if let Some(v) = label_or_annotation("metadata.labels['", &m.labels) {
        return Ok(v);
    }
    if let Some(v) = label_or_annotation("metadata.annotations['", &m.annotations) {
        return Ok(v);
    }
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "spec.nodeName" => f.node_name.clone(),
        "spec.serviceAccountName" => pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => f.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => f.host_ip.clone(),
        other => return Err(format!("unsupported fieldRef fieldPath {other:?}")),
    })
}

fn secret_value(b: &ByteString) -> String {
    String::from_utf8_lossy(&b.0).into_owned()
}

async fn get_configmap(client: &Client, ns: &str, name: &str) -> Result<Option<ConfigMap>, String> {
    Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("reading configmap {name:?}: {e}"))
}

async fn get_secret(client: &Client, ns: &str, name: &str) -> Result<Option<Secret>, String> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("reading secret {name:?}: {e}"))
}

fn configmap_data(cm: &ConfigMap) -> BTreeMap<String, String> {
    let mut out = cm.data.clone().unwrap_or_default();
    for (k, v) in cm.binary_data.iter().flatten() {
        out.insert(k.clone(), secret_value(v));
    }
    out
}

fn secret_data(s: &Secret) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), secret_value(v)))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        out.insert(k.clone(), v.clone());
    }
    out
}

/// The environment of `container` (ordered; later entries win), with `$(VAR)` expanded.
pub async fn resolve(
    client: &Client,
    pod: &Pod,
    container: &Container,
    fields: &PodFields,
) -> Result<Vec<(String, String)>, String> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut vars: BTreeMap<String, String> = BTreeMap::new();
    let mut order: Vec<String> = vec![];
    let mut set = |vars: &mut BTreeMap<String, String>, k: String, v: String| {
        if !vars.contains_key(&k) {
            order.push(k.clone());
        }
        vars.insert(k, v);
    };
    for from in container.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            let optional = r.optional.unwrap_or(false);
            match get_configmap(client, &ns, &r.name).await? {
                Some(cm) => {
                    for (k, v) in configmap_data(&cm) {
                        set(&mut vars, format!("{prefix}{k}"), v);
                    }
                }
                None if optional => {}
                None => return Err(format!("configmap {:?} not found", r.name)),
            }
        }
        if let Some(r) = &from.secret_ref {
            let optional = r.optional.unwrap_or(false);
            match get_secret(client, &ns, &r.name).await? {
                Some(s) => {
                    for (k, v) in secret_data(&s) {
                        set(&mut vars, format!("{prefix}{k}"), v);
                    }
                }
                None if optional => {}
                None => return Err(format!("secret {:?} not found", r.name)),
            }
        }
    }
    for e in container.env.iter().flatten() {
        let value = if let Some(v) = &e.value {
            expand(v, &vars)
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                field_ref(pod, &f.field_path, fields)?
            } else if let Some(r) = &from.config_map_key_ref {
                let optional = r.optional.unwrap_or(false);
                match get_configmap(client, &ns, &r.name).await? {
                    Some(cm) => match configmap_data(&cm).get(&r.key) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in ConfigMap {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("configmap {:?} not found", r.name)),
                }
            } else if let Some(r) = &from.secret_key_ref {
                let optional = r.optional.unwrap_or(false);
                match get_secret(client, &ns, &r.name).await? {
                    Some(s) => match secret_data(&s).get(&r.key) {
                        Some(v) => v.clone(),
                        None if optional => continue,
                        None => {
                            return Err(format!(
                                "couldn't find key {} in Secret {ns}/{}",
                                r.key, r.name
                            ));
                        }
                    },
                    None if optional => continue,
                    None => return Err(format!("secret {:?} not found", r.name)),
                }
            } else if from.resource_field_ref.is_some() {
                // limits/requests as numbers: not modelled yet; an empty value.
                String::new()
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        set(&mut vars, e.name.clone(), value);
    }
    Ok(order
        .into_iter()
        .map(|k| {
            let v = vars.get(&k).cloned().unwrap_or_default();
            (k, v)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_kubernetes() {
        let vars: BTreeMap<String, String> = [("A".to_string(), "1".to_string())].into();
        assert_eq!(expand("x$(A)y", &vars), "x1y");
        assert_eq!(expand("$(B)", &vars), "$(B)");
        assert_eq!(expand("$$(A)", &vars), "$(A)");
        assert_eq!(expand("$", &vars), "$");
        assert_eq!(expand("é$(A", &vars), "é$(A");
    }

    #[test]
    fn downward_api_fields() {
        let mut pod = Pod::default();
        pod.metadata.name = Some("p".into());
        pod.metadata.namespace = Some("ns".into());
        pod.metadata.labels = Some([("app".to_string(), "web".to_string())].into());
        let f = PodFields {
            pod_ip: "10.244.0.2".into(),
            host_ip: "127.0.0.1".into(),
            node_name: "n1".into(),
        };
        assert_eq!(field_ref(&pod, "metadata.name", &f).unwrap(), "p");
        assert_eq!(field_ref(&pod, "metadata.namespace", &f).unwrap(), "ns");
        assert_eq!(field_ref(&pod, "status.podIP", &f).unwrap(), "10.244.0.2");
        assert_eq!(field_ref(&pod, "spec.nodeName", &f).unwrap(), "n1");
        assert_eq!(
            field_ref(&pod, "metadata.labels['app']", &f).unwrap(),
            "web"
        );
        assert!(field_ref(&pod, "spec.bogus", &f).is_err());
    }
}
