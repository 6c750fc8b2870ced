//! End-to-end: kubectl's imperative generators (`kubectl create namespace|configmap|
//! secret|deployment|service|serviceaccount`) go through client-go's typed clients,
//! which send protobuf request bodies (`application/vnd.kubernetes.protobuf`). The
//! apiserver decodes them into the same objects the JSON path stores (embedded backend).

mod support;

use serde_json::Value;
use support::{ApiServer, Backend, Kubectl, assert_contains_all, assert_success};

#[track_caller]
fn ok(s: &ApiServer, args: &[&str]) -> String {
    assert_success(&s.kubectl(args), &format!("kubectl {}", args.join(" ")))
}

#[track_caller]
fn get(s: &ApiServer, args: &[&str]) -> Value {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = ok(s, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl get {args:?}: {e}\n{out}"))
}

#[test]
fn typed_clients_create_through_protobuf_bodies() {
    let s = ApiServer::start(Backend::Embedded);

    // The body really is protobuf: kubectl's own request log says so.
    let o = s.kubectl(&["create", "namespace", "x", "-v=8"]);
    let log = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_success(&o, "kubectl create namespace x");
    assert_contains_all(
        &log,
        &[
            "Content-Type: application/vnd.kubernetes.protobuf",
            "201 Created",
        ],
        "kubectl -v=8 log",
    );
    let ns = get(&s, &["namespace", "x"]);
    assert_eq!(ns["status"]["phase"], "Active");
    assert_eq!(ns["spec"]["finalizers"], serde_json::json!(["kubernetes"]));
    assert!(
        ns["metadata"]["uid"]
            .as_str()
            .is_some_and(|u| !u.is_empty())
    );

    let out = ok(
        &s,
        &["create", "configmap", "c", "--from-literal=a=b", "-n", "x"],
    );
    assert!(out.contains("configmap/c created"), "{out}");
    let cm = get(&s, &["configmap", "c", "-n", "x"]);
    assert_eq!(cm["data"], serde_json::json!({"a": "b"}));

    ok(
        &s,
        &[
            "create",
            "secret",
            "generic",
            "s",
            "--from-literal=p=q",
            "-n",
            "x",
        ],
    );
    let secret = get(&s, &["secret", "s", "-n", "x"]);
    assert_eq!(secret["data"], serde_json::json!({"p": "cQ=="}));
    assert_eq!(secret["type"], "Opaque");

    ok(
        &s,
        &[
            "create",
            "deployment",
            "web",
            "--image=nginx:1.25",
            "--replicas=2",
            "-n",
            "x",
        ],
    );
    let d = get(&s, &["deployment", "web", "-n", "x"]);
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(
        d["spec"]["selector"],
        serde_json::json!({"matchLabels": {"app": "web"}})
    );
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["name"], "nginx");
    assert_eq!(c["image"], "nginx:1.25");
    // Defaults applied as for JSON bodies.
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(d["spec"]["revisionHistoryLimit"], 10);

    ok(
        &s,
        &[
            "create",
            "service",
            "clusterip",
            "web",
            "--tcp=80:8080",
            "-n",
            "x",
        ],
    );
    let svc = get(&s, &["service", "web", "-n", "x"]);
    assert_eq!(svc["spec"]["type"], "ClusterIP");
    assert_eq!(svc["spec"]["ports"][0]["port"], 80);
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], 8080);
    assert_eq!(svc["spec"]["ports"][0]["protocol"], "TCP");
    assert_eq!(svc["spec"]["selector"], serde_json::json!({"app": "web"}));
    assert!(
        svc["spec"]["clusterIP"]
            .as_str()
            .is_some_and(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok()),
        "{svc}"
    );

    // `kubectl expose` builds its Service from the deployment's selector.
    ok(
        &s,
        &[
            "expose",
            "deployment",
            "web",
            "--port=81",
            "--name=web2",
            "-n",
            "x",
        ],
    );
    let svc2 = get(&s, &["service", "web2", "-n", "x"]);
    assert_eq!(svc2["spec"]["ports"][0]["port"], 81);
    assert_eq!(svc2["spec"]["selector"], serde_json::json!({"app": "web"}));

    ok(&s, &["create", "serviceaccount", "sa1", "-n", "x"]);
    let sa = get(&s, &["serviceaccount", "sa1", "-n", "x"]);
    assert_eq!(sa["metadata"]["namespace"], "x");

    // The same generators through a JSON body (`--dry-run=client -o json | create -f -`)
    // store the same objects.
    ok(&s, &["create", "namespace", "y"]);
    for gen_args in [
        &["deployment", "web", "--image=nginx:1.25", "--replicas=2"][..],
        &["service", "clusterip", "web", "--tcp=80:8080"][..],
    ] {
        let mut args = vec!["create"];
        args.extend_from_slice(gen_args);
        args.extend_from_slice(&["-n", "y", "--dry-run=client", "-o", "json"]);
        let json_body = ok(&s, &args);
        let o = s.kubectl_stdin(Kubectl::System, &["create", "-f", "-"], &json_body);
        assert_success(&o, "kubectl create -f - (JSON)");
    }
    let dy = get(&s, &["deployment", "web", "-n", "y"]);
    assert_eq!(d["spec"], dy["spec"]);
    assert_eq!(d["status"], dy["status"]);
    let mut svc_y = get(&s, &["service", "web", "-n", "y"]);
    let mut svc_x = svc.clone();
    for v in [&mut svc_x, &mut svc_y] {
        let spec = v["spec"].as_object_mut().unwrap();
        spec.remove("clusterIP");
        spec.remove("clusterIPs");
    }
    assert_eq!(svc_x["spec"], svc_y["spec"]);

    // And the objects read back as YAML too, as a user would look at them.
    let yaml = ok(&s, &["get", "deployment", "web", "-n", "x", "-o", "yaml"]);
    assert_contains_all(
        &yaml,
        &["replicas: 2", "image: nginx:1.25", "app: web"],
        "deployment yaml",
    );
    let names = ok(
        &s,
        &[
            "get",
            "configmap,secret,deployment,service,serviceaccount",
            "-n",
            "x",
            "-o",
            "name",
        ],
    );
    assert_contains_all(
        &names,
        &[
            "configmap/c",
            "secret/s",
            "deployment.apps/web",
            "service/web",
            "service/web2",
            "serviceaccount/sa1",
        ],
        "kubectl get -o name",
    );
}

/// A broken protobuf body is a 400 naming the problem; CBOR stays a 415.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_protobuf_bodies_are_bad_requests() {
    let s = ApiServer::start(Backend::Embedded);
    let http = s.http();
    let post = |ct: &'static str, body: &'static [u8]| {
        http.post(format!("{}/api/v1/namespaces", s.url))
            .header("Content-Type", ct)
            .body(body)
            .send()
    };
    for (body, needle) in [
        (&b"{\"kind\":\"Namespace\"}"[..], "magic prefix"),
        (&b"k8s\0\xff\xff\xff"[..], "runtime.Unknown"),
        // Envelope for v1 Widget, a kind with no schema.
        (
            &b"k8s\0\x0a\x0c\x0a\x02v1\x12\x06Widget"[..],
            "no protobuf schema for Widget in v1",
        ),
    ] {
        let r = post("application/vnd.kubernetes.protobuf", body)
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400);
        let status: Value = r.json().await.unwrap();
        assert_eq!(status["reason"], "BadRequest");
        let msg = status["message"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{msg}");
    }
    let r = post("application/cbor", b"\xa0").await.unwrap();
    assert_eq!(r.status().as_u16(), 415);
}
