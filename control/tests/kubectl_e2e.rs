//! End-to-end: the real kubectl against a real skiff-apiserver process, on both storage
//! backends. The main flows also run with the newest kubectl.
//!
//! Tests are generated per backend and kubectl by `e2e_tests!` below:
//! `embedded::x`, `etcd::x`, `embedded_latest_kubectl::x`, `etcd_latest_kubectl::x`.

mod support;

use std::net::Ipv4Addr;
use std::time::Duration;

use serde_json::Value;
use support::*;

/// One apiserver plus the kubectl a test drives.
struct T {
    s: ApiServer,
    k: Kubectl,
}

impl T {
    fn new(b: Backend, k: Kubectl) -> T {
        // Fail fast (before starting anything) when the newest kubectl is missing.
        let _ = k.path();
        T {
            s: ApiServer::start(b),
            k,
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.s.kubectl_with(self.k, args)
    }

    #[track_caller]
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_success(&o, &format!("kubectl {}", args.join(" ")))
    }

    #[track_caller]
    fn fail(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert_failure(&o, &format!("kubectl {}", args.join(" ")))
    }

    #[track_caller]
    fn apply(&self, name: &str, manifest: &str) -> String {
        let f = self.s.write_file(name, manifest);
        self.ok(&["apply", "-f", f.to_str().unwrap()])
    }

    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {a:?} printed invalid JSON ({e}):\n{out}"))
    }

    #[track_caller]
    fn jsonpath(&self, args: &[&str], path: &str) -> String {
        let mut a = args.to_vec();
        let o = format!("jsonpath={path}");
        a.extend(["-o", &o]);
        self.ok(&a)
    }
}

const SHOP: &str = r#"apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: web-config
  namespace: shop
data:
  greeting: hello
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
  labels:
    app: web
    extra: remove-me
spec:
  replicas: 2
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
    spec:
      containers:
      - name: web
        image: nginx:1.27
        ports:
        - containerPort: 80
        - containerPort: 9090
          name: metrics
      - name: sidecar
        image: busybox:1.36
        command: ["sleep", "3600"]
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
spec:
  selector:
    app: web
  ports:
  - port: 80
    targetPort: 80
"#;

/// SHOP without the `extra` label and without the metrics port.
fn shop_trimmed() -> String {
    let s = SHOP.replace("    extra: remove-me\n", "");
    let s2 = s.replace(
        "        - containerPort: 9090\n          name: metrics\n",
        "",
    );
    assert_ne!(s, s2);
    assert_ne!(SHOP, s);
    s2
}

fn container<'a>(deploy: &'a Value, name: &str) -> &'a Value {
    deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no container {name:?} in {deploy:#}"))
}

fn container_names(deploy: &Value) -> Vec<String> {
    deploy["spec"]["template"]["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c["name"].as_str().unwrap_or("").to_string())
        .collect()
}

/// The table line that starts with `name`, split into columns.
fn row(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{table}"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// apply -f of a multi-document manifest, then get (table), -o yaml/json/jsonpath, describe.
fn apply_get_describe(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    let out = t.apply("shop.yaml", SHOP);
    assert_contains_all(
        &out,
        &[
            "namespace/shop created",
            "configmap/web-config created",
            "deployment.apps/web created",
            "service/web created",
        ],
        "apply output",
    );

    let table = t.ok(&["get", "deploy,svc,cm", "-n", "shop"]);
    assert_contains_all(
        &table,
        &[
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORT(S)",
            "DATA",
        ],
        "get deploy,svc,cm table headers",
    );
    let d = row(&table, "deployment.apps/web");
    assert_eq!(
        d[1], "0/2",
        "READY column of the deployment row {d:?}\n{table}"
    );
    let s = row(&table, "service/web");
    assert_eq!(s[1], "ClusterIP", "TYPE column {s:?}\n{table}");
    let ip: Ipv4Addr = s[2]
        .parse()
        .unwrap_or_else(|_| panic!("CLUSTER-IP column {s:?} is not an IP\n{table}"));
    assert!(in_service_cidr(ip), "cluster IP {ip} outside 10.96.0.0/12");
    assert_eq!(s[4], "80/TCP", "PORT(S) column {s:?}\n{table}");
    let c = row(&table, "configmap/web-config");
    assert_eq!(c[1], "1", "DATA column {c:?}\n{table}");

    // -o yaml: the stored object with server-side defaults.
    let yaml = t.ok(&["get", "deployment", "web", "-n", "shop", "-o", "yaml"]);
    let y: Value = serde_yaml::from_str(&yaml)
        .unwrap_or_else(|e| panic!("-o yaml is not YAML ({e}):\n{yaml}"));
    assert_eq!(y["kind"], "Deployment");
    assert_eq!(y["apiVersion"], "apps/v1");
    assert_eq!(y["spec"]["replicas"], 2);
    assert!(
        y["metadata"]["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "uid missing:\n{yaml}"
    );
    assert!(
        y["metadata"]["resourceVersion"]
            .as_str()
            .is_some_and(|u| !u.is_empty()),
        "resourceVersion missing:\n{yaml}"
    );
    assert!(
        y["metadata"]["creationTimestamp"].is_string(),
        "creationTimestamp missing:\n{yaml}"
    );
    assert_eq!(
        y["spec"]["strategy"]["type"], "RollingUpdate",
        "defaulted strategy:\n{yaml}"
    );
    assert_eq!(
        container(&y, "web")["imagePullPolicy"],
        "IfNotPresent",
        "defaulted imagePullPolicy:\n{yaml}"
    );
    assert_eq!(
        container(&y, "web")["ports"][0]["protocol"],
        "TCP",
        "defaulted port protocol:\n{yaml}"
    );

    // -o json agrees with -o yaml.
    let j = t.json(&["get", "deployment", "web", "-n", "shop"]);
    assert_eq!(j["metadata"]["uid"], y["metadata"]["uid"]);
    assert_eq!(j["spec"]["replicas"], 2);
    assert_eq!(container_names(&j), ["web", "sidecar"]);

    assert_eq!(
        t.jsonpath(
            &["get", "deployment", "web", "-n", "shop"],
            "{.spec.replicas}"
        ),
        "2"
    );
    assert_eq!(
        t.jsonpath(
            &["get", "cm", "web-config", "-n", "shop"],
            "{.data.greeting}"
        ),
        "hello"
    );

    let desc = t.ok(&["describe", "deployment", "web", "-n", "shop"]);
    assert_contains_all(
        &desc,
        &[
            "Name:",
            "web",
            "Namespace:",
            "shop",
            "Selector:",
            "app=web",
            "Replicas:",
            "2 desired",
            "StrategyType:",
            "RollingUpdate",
            "nginx:1.27",
            "busybox:1.36",
        ],
        "describe deployment",
    );
}

/// `get -w` (spawned, bounded) observes a label added by a second kubectl.
/// `get -w` (spawned, bounded) observes a label added by a second kubectl.
fn watch_sees_change(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    t.apply("watched.yaml", &cm_yaml("watched", "default"));
    let mut w = t.s.kubectl_spawn(
        t.k,
        &[
            "get",
            "configmap",
            "watched",
            "-n",
            "default",
            "-w",
            "--request-timeout=90s",
            "-o",
            "jsonpath={.metadata.name}:{.metadata.labels.color}{\"\\n\"}",
        ],
    );
    w.wait_for_stdout(
        "the initial state of the watched configmap",
        Duration::from_secs(30),
        |o| o.contains("watched:"),
    );
    t.ok(&[
        "label",
        "configmap",
        "watched",
        "color=blue",
        "-n",
        "default",
    ]);
    w.wait_for_stdout(
        "the label change through the watch",
        Duration::from_secs(30),
        |o| o.contains("watched:blue"),
    );
    w.stop();

    // A watch on the whole collection sees a new object (and nothing breaks with -A).
    let mut w = t.s.kubectl_spawn(
        t.k,
        &[
            "get",
            "configmaps",
            "-A",
            "-w",
            "--request-timeout=90s",
            "-o",
            "name",
        ],
    );
    w.wait_for_stdout("the initial list", Duration::from_secs(30), |o| {
        o.contains("configmap/watched")
    });
    t.apply("second.yaml", &cm_yaml("second", "default"));
    w.wait_for_stdout(
        "the new configmap through the watch",
        Duration::from_secs(30),
        |o| o.contains("configmap/second"),
    );
}

/// label, annotate, patch --type=json|merge|strategic.
fn label_annotate_patch(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    t.apply("shop.yaml", SHOP);
    let d = ["deployment", "web", "-n", "shop"];
    let get = |p: &str| t.jsonpath(&[&["get"][..], &d[..]].concat(), p);

    let out = t.ok(&["label", "deployment", "web", "tier=frontend", "-n", "shop"]);
    assert!(out.contains("deployment.apps/web labeled"), "{out}");
    assert_eq!(get("{.metadata.labels.tier}"), "frontend");
    t.ok(&["label", "deployment", "web", "tier-", "-n", "shop"]);
    let labels = t.json(&[&["get"][..], &d[..]].concat())["metadata"]["labels"].clone();
    assert!(
        labels.get("tier").is_none(),
        "label tier not removed: {labels}"
    );
    assert_eq!(labels["app"], "web", "other labels must stay: {labels}");
    // Relabelling without --overwrite is refused by kubectl; with it, it wins.
    t.ok(&["label", "deployment", "web", "tier=backend", "-n", "shop"]);
    t.fail(&["label", "deployment", "web", "tier=other", "-n", "shop"]);
    t.ok(&[
        "label",
        "deployment",
        "web",
        "tier=other",
        "--overwrite",
        "-n",
        "shop",
    ]);
    assert_eq!(get("{.metadata.labels.tier}"), "other");

    let out = t.ok(&[
        "annotate",
        "deployment",
        "web",
        "owner=team-a",
        "-n",
        "shop",
    ]);
    assert!(out.contains("deployment.apps/web annotated"), "{out}");
    assert_eq!(get("{.metadata.annotations.owner}"), "team-a");

    let out = t.ok(&["patch", "deployment", "web", "-n", "shop", "--type=json", "-p", r#"[{"op":"replace","path":"/spec/replicas","value":4},{"op":"add","path":"/metadata/labels/patched","value":"json"}]"#]);
    assert!(out.contains("deployment.apps/web patched"), "{out}");
    assert_eq!(get("{.spec.replicas}"), "4");
    assert_eq!(get("{.metadata.labels.patched}"), "json");
    // A failing JSON patch `test` op changes nothing and errors.
    t.fail(&["patch", "deployment", "web", "-n", "shop", "--type=json", "-p", r#"[{"op":"test","path":"/spec/replicas","value":99},{"op":"replace","path":"/spec/replicas","value":7}]"#]);
    assert_eq!(get("{.spec.replicas}"), "4");

    t.ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "shop",
        "--type=merge",
        "-p",
        r#"{"spec":{"minReadySeconds":5},"metadata":{"labels":{"patched":null}}}"#,
    ]);
    assert_eq!(get("{.spec.minReadySeconds}"), "5");
    assert_eq!(get("{.metadata.labels.patched}"), "");

    // Strategic merge: containers merge by name, so the sidecar and the web ports stay.
    t.ok(&[
        "patch",
        "deployment",
        "web",
        "-n",
        "shop",
        "--type=strategic",
        "-p",
        r#"{"spec":{"template":{"spec":{"containers":[{"name":"web","image":"nginx:1.28"}]}}}}"#,
    ]);
    let j = t.json(&[&["get"][..], &d[..]].concat());
    assert_eq!(
        container_names(&j),
        ["web", "sidecar"],
        "strategic merge must keep the sidecar:\n{j:#}"
    );
    assert_eq!(container(&j, "web")["image"], "nginx:1.28");
    assert_eq!(
        container(&j, "web")["ports"].as_array().map(Vec::len),
        Some(2),
        "ports kept:\n{j:#}"
    );
    assert_eq!(container(&j, "sidecar")["image"], "busybox:1.36");
    // The default patch type of kubectl is strategic too.
    t.ok(&["patch", "deployment", "web", "-n", "shop", "-p", r#"{"spec":{"template":{"spec":{"containers":[{"name":"sidecar","image":"busybox:1.37"}]}}}}"#]);
    let j = t.json(&[&["get"][..], &d[..]].concat());
    assert_eq!(container_names(&j), ["web", "sidecar"], "{j:#}");
    assert_eq!(container(&j, "sidecar")["image"], "busybox:1.37");
    assert_eq!(container(&j, "web")["image"], "nginx:1.28");
    assert!(
        j["metadata"]["generation"].as_i64().unwrap_or(0) >= 4,
        "spec changes bump generation:\n{j:#}"
    );
}

/// `kubectl scale` through the scale subresource.
fn scale(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    t.apply("shop.yaml", SHOP);
    let out = t.ok(&["scale", "deployment", "web", "--replicas=3", "-n", "shop"]);
    assert!(out.contains("deployment.apps/web scaled"), "{out}");
    assert_eq!(
        t.jsonpath(
            &["get", "deployment", "web", "-n", "shop"],
            "{.spec.replicas}"
        ),
        "3"
    );
    let raw = t.ok(&[
        "get",
        "--raw",
        "/apis/apps/v1/namespaces/shop/deployments/web/scale",
    ]);
    let s: Value =
        serde_json::from_str(&raw).unwrap_or_else(|e| panic!("scale is not JSON ({e}): {raw}"));
    assert_eq!(s["kind"], "Scale", "{raw}");
    assert_eq!(s["apiVersion"], "autoscaling/v1", "{raw}");
    assert_eq!(s["spec"]["replicas"], 3, "{raw}");
    assert_eq!(s["status"]["selector"], "app=web", "{raw}");
    // --current-replicas is a precondition: wrong value fails, right one passes.
    t.fail(&[
        "scale",
        "deployment",
        "web",
        "--current-replicas=7",
        "--replicas=1",
        "-n",
        "shop",
    ]);
    t.ok(&[
        "scale",
        "deployment",
        "web",
        "--current-replicas=3",
        "--replicas=0",
        "-n",
        "shop",
    ]);
    assert_eq!(
        t.jsonpath(
            &["get", "deployment", "web", "-n", "shop"],
            "{.spec.replicas}"
        ),
        "0"
    );
}

/// Re-applying a manifest with a field removed removes it from the live object.
fn apply_removes_field(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    t.apply("shop.yaml", SHOP);
    // A change made by someone else (not in the manifest) must survive the re-apply.
    t.ok(&["label", "deployment", "web", "owner=ops", "-n", "shop"]);
    let before = t.json(&["get", "deployment", "web", "-n", "shop"]);
    assert_eq!(before["metadata"]["labels"]["extra"], "remove-me");
    assert!(
        before["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
            .is_string(),
        "kubectl apply records last-applied-configuration:\n{before:#}"
    );
    let out = t.apply("shop-trimmed.yaml", &shop_trimmed());
    assert!(out.contains("deployment.apps/web configured"), "{out}");
    let after = t.json(&["get", "deployment", "web", "-n", "shop"]);
    let labels = &after["metadata"]["labels"];
    assert!(
        labels.get("extra").is_none(),
        "label `extra` removed from the manifest is still there: {labels}"
    );
    assert_eq!(labels["app"], "web");
    assert_eq!(
        labels["owner"], "ops",
        "labels not managed by apply stay: {labels}"
    );
    let ports: Vec<i64> = container(&after, "web")["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["containerPort"].as_i64())
        .collect();
    assert_eq!(
        ports,
        [80],
        "port 9090 removed from the manifest is still there:\n{after:#}"
    );
    assert_eq!(container_names(&after), ["web", "sidecar"]);
    // Applying the same manifest again is a no-op.
    let out = t.apply("shop-trimmed.yaml", &shop_trimmed());
    assert!(out.contains("deployment.apps/web unchanged"), "{out}");
}

const SSA_CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa-demo\n  namespace: default\ndata:\n  color: red\n  size: small\n";

/// apply --server-side: create, conflict with a second manager, --force-conflicts, managedFields.
fn server_side_apply(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    let f1 = t.s.write_file("ssa1.yaml", SSA_CM);
    let out = t.ok(&["apply", "--server-side", "-f", f1.to_str().unwrap()]);
    assert!(
        out.contains("configmap/ssa-demo serverside-applied"),
        "{out}"
    );
    assert_eq!(
        t.jsonpath(&["get", "cm", "ssa-demo"], "{.data.color}"),
        "red"
    );

    let f2 = t.s.write_file(
        "ssa2.yaml",
        &SSA_CM
            .replace("color: red", "color: green")
            .replace("  size: small\n", ""),
    );
    let err = t.fail(&[
        "apply",
        "--server-side",
        "--field-manager=intruder",
        "-f",
        f2.to_str().unwrap(),
    ]);
    let lower = err.to_lowercase();
    assert!(
        lower.contains("conflict"),
        "conflict error expected:\n{err}"
    );
    assert!(
        err.contains(".data.color"),
        "the conflict names the field:\n{err}"
    );
    assert!(
        err.contains("\"kubectl\""),
        "the conflict names the other manager:\n{err}"
    );
    assert_eq!(
        t.jsonpath(&["get", "cm", "ssa-demo"], "{.data.color}"),
        "red",
        "a conflicting apply must not write"
    );

    t.ok(&[
        "apply",
        "--server-side",
        "--field-manager=intruder",
        "--force-conflicts",
        "-f",
        f2.to_str().unwrap(),
    ]);
    assert_eq!(
        t.jsonpath(&["get", "cm", "ssa-demo"], "{.data.color}"),
        "green"
    );
    assert_eq!(
        t.jsonpath(&["get", "cm", "ssa-demo"], "{.data.size}"),
        "small",
        "fields of the first manager stay"
    );

    let yaml = t.ok(&[
        "get",
        "cm",
        "ssa-demo",
        "-o",
        "yaml",
        "--show-managed-fields",
    ]);
    assert_contains_all(
        &yaml,
        &[
            "managedFields",
            "manager: intruder",
            "manager: kubectl",
            "operation: Apply",
            "fieldsV1",
            "f:color",
        ],
        "managed fields",
    );
    let y: Value = serde_yaml::from_str(&yaml).unwrap();
    let intr = y["metadata"]["managedFields"]
        .as_array()
        .and_then(|m| m.iter().find(|e| e["manager"] == "intruder"))
        .unwrap_or_else(|| panic!("no intruder entry:\n{yaml}"));
    assert!(
        intr["fieldsV1"]["f:data"]["f:color"].is_object(),
        "intruder owns .data.color:\n{yaml}"
    );
    let kctl = y["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["manager"] == "kubectl")
        .unwrap();
    assert!(
        kctl["fieldsV1"]["f:data"].get("f:color").is_none(),
        "forced apply takes .data.color away from kubectl:\n{yaml}"
    );
    // Without --show-managed-fields kubectl hides them (they are still served).
    let plain = t.ok(&["get", "cm", "ssa-demo", "-o", "yaml"]);
    assert!(!plain.contains("managedFields"), "{plain}");
}

/// delete --wait returns, and the object is gone.
fn delete_wait(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    t.apply("shop.yaml", SHOP);
    let out = t.ok(&[
        "delete",
        "deployment",
        "web",
        "-n",
        "shop",
        "--wait=true",
        "--timeout=30s",
    ]);
    assert!(out.contains("deployment.apps \"web\" deleted"), "{out}");
    let err = t.fail(&["get", "deployment", "web", "-n", "shop"]);
    assert!(
        err.contains("NotFound") && err.contains("\"web\" not found"),
        "{err}"
    );
    // Deleting what is gone is a NotFound error; --ignore-not-found makes it quiet.
    let err = t.fail(&["delete", "deployment", "web", "-n", "shop"]);
    assert!(err.contains("not found"), "{err}");
    t.ok(&[
        "delete",
        "deployment",
        "web",
        "-n",
        "shop",
        "--ignore-not-found",
    ]);
    // Label-selected collection delete.
    t.ok(&["delete", "cm", "-n", "shop", "-l", "nothing=matches"]);
    t.ok(&[
        "delete",
        "cm",
        "web-config",
        "-n",
        "shop",
        "--wait=true",
        "--timeout=30s",
    ]);
    let names = t.ok(&["get", "cm", "-n", "shop", "-o", "name"]);
    assert!(!names.contains("configmap/web-config"), "{names}");
}

fn cm_yaml(name: &str, ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\n  namespace: {ns}\ndata:\n  a: b\n"
    )
}

/// A Service manifest; `node_port`/`cluster_ip` pin the allocation.
fn svc_yaml(name: &str, ty: &str, node_port: Option<u16>, cluster_ip: Option<&str>) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  type: {ty}\n"
    );
    if let Some(ip) = cluster_ip {
        s.push_str(&format!("  clusterIP: \"{ip}\"\n"));
    }
    s.push_str("  selector:\n    app: x\n  ports:\n  - port: 80\n    targetPort: 8080\n");
    if let Some(np) = node_port {
        s.push_str(&format!("    nodePort: {np}\n"));
    }
    s
}

impl T {
    /// `kubectl create -f` of a manifest (the unstructured, JSON path).
    fn create_manifest(&self, file: &str, yaml: &str) -> std::process::Output {
        let f = self.s.write_file(file, yaml);
        self.run(&["create", "-f", f.to_str().unwrap()])
    }
}

fn in_service_cidr(ip: Ipv4Addr) -> bool {
    let n = u32::from(ip);
    let base = u32::from(Ipv4Addr::new(10, 96, 0, 0));
    (base..base + (1 << 20)).contains(&n)
}

/// ClusterIP and NodePort allocation, conflicts, and release on delete.
/// ClusterIP and NodePort allocation, conflicts, and release on delete.
fn service_allocation(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    assert_success(
        &t.create_manifest("np-auto.yaml", &svc_yaml("np-auto", "NodePort", None, None)),
        "create np-auto",
    );
    let svc = t.json(&["get", "svc", "np-auto"]);
    let ip: Ipv4Addr = svc["spec"]["clusterIP"]
        .as_str()
        .unwrap_or("")
        .parse()
        .unwrap_or_else(|_| panic!("clusterIP:\n{svc:#}"));
    assert!(in_service_cidr(ip), "clusterIP {ip} not in 10.96.0.0/12");
    assert_ne!(
        ip,
        Ipv4Addr::new(10, 96, 0, 1),
        "10.96.0.1 belongs to `kubernetes`"
    );
    assert_eq!(svc["spec"]["clusterIPs"][0], svc["spec"]["clusterIP"]);
    let np = svc["spec"]["ports"][0]["nodePort"]
        .as_i64()
        .unwrap_or_else(|| panic!("no nodePort:\n{svc:#}"));
    assert!((30000..=32767).contains(&np), "nodePort {np}");

    // Fixed nodePort: the second claim conflicts until the first is deleted.
    assert_success(
        &t.create_manifest(
            "np-a.yaml",
            &svc_yaml("np-a", "NodePort", Some(30080), None),
        ),
        "create np-a",
    );
    let o = t.create_manifest(
        "np-b.yaml",
        &svc_yaml("np-b", "NodePort", Some(30080), None),
    );
    let err = assert_failure(&o, "second service on nodePort 30080");
    assert!(
        err.contains("is invalid") && err.contains("30080") && err.contains("already allocated"),
        "{err}"
    );
    t.ok(&["delete", "svc", "np-a"]);
    assert_success(
        &t.create_manifest(
            "np-b.yaml",
            &svc_yaml("np-b", "NodePort", Some(30080), None),
        ),
        "np-b after np-a is gone",
    );
    assert_eq!(
        t.jsonpath(&["get", "svc", "np-b"], "{.spec.ports[0].nodePort}"),
        "30080"
    );
    // The auto-allocated port is released on delete too.
    t.ok(&["delete", "svc", "np-auto"]);
    assert_success(
        &t.create_manifest(
            "np-c.yaml",
            &svc_yaml("np-c", "NodePort", Some(np as u16), None),
        ),
        "reuse of a released nodePort",
    );
    // Out of range.
    let err = assert_failure(
        &t.create_manifest("np-d.yaml", &svc_yaml("np-d", "NodePort", Some(80), None)),
        "nodePort 80",
    );
    assert!(
        err.contains("is invalid") && err.contains("nodePort"),
        "{err}"
    );

    // Fixed clusterIP: same story.
    assert_success(
        &t.create_manifest(
            "ip-a.yaml",
            &svc_yaml("ip-a", "ClusterIP", None, Some("10.96.7.7")),
        ),
        "ip-a",
    );
    let err = assert_failure(
        &t.create_manifest(
            "ip-b.yaml",
            &svc_yaml("ip-b", "ClusterIP", None, Some("10.96.7.7")),
        ),
        "ip-b while ip-a holds the IP",
    );
    assert!(
        err.contains("is invalid") && err.contains("already allocated"),
        "{err}"
    );
    let err = assert_failure(
        &t.create_manifest(
            "ip-x.yaml",
            &svc_yaml("ip-x", "ClusterIP", None, Some("192.168.1.1")),
        ),
        "IP outside the range",
    );
    assert!(err.contains("is invalid") && err.contains("range"), "{err}");
    t.ok(&["delete", "svc", "ip-a"]);
    assert_success(
        &t.create_manifest(
            "ip-b.yaml",
            &svc_yaml("ip-b", "ClusterIP", None, Some("10.96.7.7")),
        ),
        "ip-b after ip-a is gone",
    );
    // Headless stays headless.
    assert_success(
        &t.create_manifest(
            "headless.yaml",
            &svc_yaml("headless", "ClusterIP", None, Some("None")),
        ),
        "headless",
    );
    assert_eq!(
        t.jsonpath(&["get", "svc", "headless"], "{.spec.clusterIP}"),
        "None"
    );
}

/// The default namespaces and the `kubernetes` Service exist.
fn defaults_exist(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    let ns = t.ok(&["get", "namespaces", "-o", "name"]);
    assert_contains_all(
        &ns,
        &[
            "namespace/default",
            "namespace/kube-system",
            "namespace/kube-public",
            "namespace/kube-node-lease",
        ],
        "default namespaces",
    );
    let table = t.ok(&["get", "namespaces"]);
    assert_eq!(
        row(&table, "default")[1],
        "Active",
        "STATUS column:\n{table}"
    );
    assert_eq!(
        t.jsonpath(
            &["get", "svc", "kubernetes", "-n", "default"],
            "{.spec.clusterIP}"
        ),
        "10.96.0.1"
    );
    assert_eq!(
        t.jsonpath(
            &["get", "svc", "kubernetes", "-n", "default"],
            "{.spec.ports[0].port}"
        ),
        "443"
    );
    let ep = t.jsonpath(
        &["get", "endpoints", "kubernetes", "-n", "default"],
        "{.subsets[0].ports[0].port}",
    );
    assert_eq!(
        ep,
        t.s.port.to_string(),
        "the kubernetes Endpoints point at this apiserver"
    );
    let v = t.ok(&["version", "-o", "json"]);
    let v: Value = serde_json::from_str(&v).unwrap();
    assert_eq!(v["serverVersion"]["major"], "1", "{v:#}");
}

/// Invalid input: kubectl exits non-zero and stderr names the problem.
fn invalid_input(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    let err = assert_failure(
        &t.create_manifest("badname.yaml", &cm_yaml("Bad_Name", "default")),
        "bad name",
    );
    assert!(
        err.contains("is invalid") && err.contains("metadata.name"),
        "bad name:\n{err}"
    );

    let no_image = "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: noimg\n  namespace: default\nspec:\n  selector:\n    matchLabels: {app: x}\n  template:\n    metadata:\n      labels: {app: x}\n    spec:\n      containers:\n      - name: x\n";
    let f = t.s.write_file("noimg.yaml", no_image);
    let err = t.fail(&["apply", "-f", f.to_str().unwrap()]);
    assert!(
        err.contains("is invalid")
            && err.contains("spec.template.spec.containers[0].image")
            && err.contains("Required value"),
        "missing image:\n{err}"
    );

    // Selector that does not match the template labels.
    let f = t.s.write_file(
        "badsel.yaml",
        &no_image
            .replace("matchLabels: {app: x}", "matchLabels: {app: other}")
            .replace("- name: x\n", "- name: x\n        image: nginx\n"),
    );
    let err = t.fail(&["apply", "-f", f.to_str().unwrap()]);
    assert!(
        err.contains("is invalid") && err.contains("selector"),
        "selector mismatch:\n{err}"
    );

    // Unknown field with kubectl's default validation (strict).
    let unknown = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: unk\n  namespace: default\ndata:\n  a: b\nbogusField: 1\n";
    let f = t.s.write_file("unknown.yaml", unknown);
    let err = t.fail(&["apply", "-f", f.to_str().unwrap()]);
    assert!(err.contains("bogusField"), "unknown field:\n{err}");
    let f = t.s.write_file(
        "unknown2.yaml",
        &no_image
            .replace("  selector:\n", "  replicaz: 2\n  selector:\n")
            .replace("- name: x\n", "- name: x\n        image: nginx\n"),
    );
    let err = t.fail(&["create", "-f", f.to_str().unwrap()]);
    assert!(err.contains("replicaz"), "unknown nested field:\n{err}");
    t.fail(&["get", "deployment", "noimg"]);

    // Invalid values inside a valid object.
    let neg = no_image
        .replace("name: noimg", "name: neg")
        .replace("  selector:\n", "  replicas: -1\n  selector:\n")
        .replace("- name: x\n", "- name: x\n        image: nginx\n");
    let err = assert_failure(&t.create_manifest("neg.yaml", &neg), "negative replicas");
    assert!(
        err.contains("is invalid") && err.contains("spec.replicas"),
        "negative replicas:\n{err}"
    );
    let bad_port =
        svc_yaml("badport", "ClusterIP", None, None).replace("port: 80\n", "port: 70000\n");
    let err = assert_failure(&t.create_manifest("badport.yaml", &bad_port), "port 70000");
    assert!(
        err.contains("is invalid") && err.contains("spec.ports[0].port"),
        "bad port:\n{err}"
    );
    // Nothing invalid was stored.
    let names = t.ok(&["get", "deploy,cm,svc", "-n", "default", "-o", "name"]);
    for bad in ["noimg", "unk", "neg", "badport", "Bad_Name"] {
        assert!(
            !names.contains(&format!("/{bad}\n")),
            "{bad} was stored:\n{names}"
        );
    }
}

/// Wrong apiVersion/kind and malformed YAML: kubectl exits non-zero naming the problem.
fn wrong_type_and_yaml(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    // Wrong apiVersion and kind.
    let f = t.s.write_file(
        "badver.yaml",
        "apiVersion: apps/v9\nkind: Deployment\nmetadata:\n  name: v9\n",
    );
    let err = t.fail(&["apply", "-f", f.to_str().unwrap()]);
    assert!(err.contains("apps/v9"), "wrong apiVersion:\n{err}");
    let f = t.s.write_file(
        "badkind.yaml",
        "apiVersion: v1\nkind: ConfigMapz\nmetadata:\n  name: k\n",
    );
    let err = t.fail(&["apply", "-f", f.to_str().unwrap()]);
    assert!(err.contains("ConfigMapz"), "wrong kind:\n{err}");

    // Malformed YAML.
    let f = t.s.write_file(
        "malformed.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n  : :\n",
    );
    let err = t.fail(&["apply", "-f", f.to_str().unwrap()]);
    assert!(
        err.to_lowercase().contains("yaml"),
        "malformed YAML:\n{err}"
    );
}

/// api-resources and explain (discovery and OpenAPI).
fn api_resources_explain(b: Backend, k: Kubectl) {
    let t = T::new(b, k);
    let out = t.ok(&["api-resources"]);
    assert_eq!(
        row(&out, "deployments")[1..],
        ["deploy", "apps/v1", "true", "Deployment"],
        "\n{out}"
    );
    assert_eq!(
        row(&out, "configmaps")[1..],
        ["cm", "v1", "true", "ConfigMap"],
        "\n{out}"
    );
    assert_eq!(
        row(&out, "namespaces")[1..],
        ["ns", "v1", "false", "Namespace"],
        "\n{out}"
    );
    assert_contains_all(
        &out,
        &[
            "services",
            "endpointslices",
            "ingresses",
            "leases",
            "clusterroles",
        ],
        "api-resources",
    );
    let apps = t.ok(&["api-resources", "--api-group=apps", "-o", "name"]);
    assert_contains_all(
        &apps,
        &["deployments.apps", "replicasets.apps", "daemonsets.apps"],
        "apps group",
    );
    let versions = t.ok(&["api-versions"]);
    assert_contains_all(
        &versions,
        &["apps/v1", "v1", "networking.k8s.io/v1"],
        "api-versions",
    );

    let out = t.ok(&["explain", "deployment.spec.replicas"]);
    assert_contains_all(
        &out,
        &["replicas", "<integer>"],
        "explain deployment.spec.replicas",
    );
    let out = t.ok(&["explain", "pods.spec.containers"]);
    assert_contains_all(
        &out,
        &["image", "<string>", "FIELDS"],
        "explain pods.spec.containers",
    );
}

/// Restart the apiserver: every acknowledged write is still there and writes continue.
fn restart_keeps_objects(b: Backend, k: Kubectl) {
    let mut t = T::new(b, k);
    t.apply("shop.yaml", SHOP);
    let mut many = String::new();
    for i in 0..30 {
        many.push_str(&format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\n  namespace: shop\ndata:\n  i: \"{i}\"\n"));
    }
    t.apply("many.yaml", &many);
    t.ok(&["scale", "deployment", "web", "--replicas=5", "-n", "shop"]);
    t.ok(&["delete", "cm", "cm-7", "-n", "shop"]);
    t.ok(&["label", "cm", "cm-8", "-n", "shop", "last=yes"]);
    let before = t.json(&["get", "cm", "-n", "shop"]);
    let snapshot = |v: &Value| -> Vec<(String, String)> {
        v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                (
                    o["metadata"]["name"].as_str().unwrap_or("").to_string(),
                    o["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
            })
            .collect()
    };
    let before_rv: i64 = before["metadata"]["resourceVersion"]
        .as_str()
        .unwrap_or("0")
        .parse()
        .unwrap_or(0);

    t.s.restart();

    let after = t.json(&["get", "cm", "-n", "shop"]);
    assert_eq!(
        snapshot(&after),
        snapshot(&before),
        "configmaps (names, resourceVersions) changed across a restart"
    );
    assert_eq!(
        t.jsonpath(
            &["get", "deployment", "web", "-n", "shop"],
            "{.spec.replicas}"
        ),
        "5"
    );
    assert_eq!(
        t.jsonpath(
            &["get", "cm", "cm-8", "-n", "shop"],
            "{.metadata.labels.last}"
        ),
        "yes"
    );
    t.fail(&["get", "cm", "cm-7", "-n", "shop"]);
    assert_eq!(
        t.jsonpath(&["get", "svc", "kubernetes"], "{.spec.clusterIP}"),
        "10.96.0.1"
    );
    // Writes continue, with resourceVersions above everything before the restart.
    t.apply("after.yaml", &cm_yaml("after-restart", "shop"));
    let rv: i64 = t
        .jsonpath(
            &["get", "cm", "after-restart", "-n", "shop"],
            "{.metadata.resourceVersion}",
        )
        .parse()
        .unwrap();
    assert!(
        rv > before_rv,
        "resourceVersion went backwards across a restart: {rv} <= {before_rv}"
    );
    // ClusterIP allocations survive: the web service's IP cannot be handed out again.
    let web_ip = t.jsonpath(&["get", "svc", "web", "-n", "shop"], "{.spec.clusterIP}");
    let err = assert_failure(
        &t.create_manifest(
            "dup.yaml",
            &svc_yaml("dup", "ClusterIP", None, Some(&web_ip)),
        ),
        "duplicate clusterIP after restart",
    );
    assert!(err.contains("already allocated"), "{err}");

    // Restarted on another port, the `kubernetes` Endpoints follow the apiserver.
    let old_port = t.s.port;
    t.s.restart_on_new_port();
    assert_ne!(t.s.port, old_port);
    let want = t.s.port.to_string();
    eventually(
        "the kubernetes Endpoints to point at the new port",
        Duration::from_secs(15),
        || {
            let got = t.jsonpath(
                &["get", "endpoints", "kubernetes", "-n", "default"],
                "{.subsets[0].ports[0].port}",
            );
            (got == want).then_some(())
        },
    );
    assert_eq!(
        t.jsonpath(
            &["get", "deployment", "web", "-n", "shop"],
            "{.spec.replicas}"
        ),
        "5"
    );
}

macro_rules! e2e_tests {
    (all: [$($a:ident),* $(,)?], latest: [$($l:ident),* $(,)?] $(,)?) => {
        mod embedded {
            use super::support::{Backend, Kubectl};
            $( #[test] fn $a() { super::$a(Backend::Embedded, Kubectl::System) } )*
        }
        mod etcd {
            use super::support::{Backend, Kubectl};
            $( #[test] fn $a() { super::$a(Backend::Etcd, Kubectl::System) } )*
        }
        mod embedded_latest_kubectl {
            use super::support::{Backend, Kubectl};
            $( #[test] fn $l() { super::$l(Backend::Embedded, Kubectl::Latest) } )*
        }
        mod etcd_latest_kubectl {
            use super::support::{Backend, Kubectl};
            $( #[test] fn $l() { super::$l(Backend::Etcd, Kubectl::Latest) } )*
        }
    };
}

e2e_tests! {
    all: [
        apply_get_describe,
        watch_sees_change,
        label_annotate_patch,
        scale,
        apply_removes_field,
        server_side_apply,
        delete_wait,
        service_allocation,
        defaults_exist,
        invalid_input,
        wrong_type_and_yaml,
        api_resources_explain,
        restart_keeps_objects,
    ],
    latest: [
        apply_get_describe,
        watch_sees_change,
        label_annotate_patch,
        scale,
        apply_removes_field,
        server_side_apply,
        delete_wait,
        invalid_input,
        wrong_type_and_yaml,
        api_resources_explain,
    ],
}
