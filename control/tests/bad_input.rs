//! Raw HTTPS against skiff-apiserver with bad input, on both storage backends: every
//! failure is a Kubernetes Status with the right code, nothing is a 5xx, and etcd
//! outages become 503s instead of hangs.

mod support;

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use support::{ApiServer, Backend, TEST_TOKEN};

const JSON: &str = "application/json";

async fn start(b: Backend) -> ApiServer {
    tokio::task::block_in_place(|| ApiServer::start(b))
}

/// At most 1500 characters of a response (some echo multi-MiB bodies).
fn short(s: &str) -> String {
    if s.len() <= 1500 {
        return s.to_string();
    }
    let mut end = 1500;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

struct Resp {
    code: StatusCode,
    body: Value,
    text: String,
    headers: reqwest::header::HeaderMap,
}

async fn send(c: &Client, method: Method, url: &str, ct: &str, body: Option<Vec<u8>>) -> Resp {
    let mut r = c.request(method.clone(), url);
    if let Some(b) = body {
        r = r.header(reqwest::header::CONTENT_TYPE, ct).body(b);
    }
    let resp = r
        .send()
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: transport error: {e:?}"));
    let code = resp.status();
    let headers = resp.headers().clone();
    let full = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&full).unwrap_or(Value::Null);
    let text = short(&full);
    Resp {
        code,
        body,
        text,
        headers,
    }
}

async fn post(c: &Client, url: &str, body: &Value) -> Resp {
    send(
        c,
        Method::POST,
        url,
        JSON,
        Some(serde_json::to_vec(body).unwrap()),
    )
    .await
}

/// Asserts a Status failure with HTTP and body code `code`; returns the Status.
#[track_caller]
fn assert_status(r: &Resp, code: u16, what: &str) -> Value {
    assert_eq!(
        r.code.as_u16(),
        code,
        "{what}: HTTP status; body: {}",
        r.text
    );
    let s = &r.body;
    assert_eq!(s["kind"], "Status", "{what}: not a Status: {}", r.text);
    assert_eq!(s["apiVersion"], "v1", "{what}: {}", r.text);
    assert_eq!(s["status"], "Failure", "{what}: {}", r.text);
    assert_eq!(s["code"], code, "{what}: Status.code: {}", r.text);
    assert!(
        s["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: Status without message: {}",
        r.text
    );
    s.clone()
}

fn causes_fields(status: &Value) -> Vec<String> {
    status["details"]["causes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["field"].as_str().map(str::to_string))
        .collect()
}

fn cms(s: &ApiServer) -> String {
    format!("{}/api/v1/namespaces/default/configmaps", s.url)
}

fn configmap(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"k": "v"}})
}

fn deployment(name: &str) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}}}})
}

async fn malformed_json(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    let bodies: [&[u8]; 6] = [
        b"{\"apiVersion\":\"v1\",",
        b"not json at all",
        b"[1,2,3]",
        b"\"just a string\"",
        b"{\"metadata\": 5}",
        b"\xff\xfe\x00",
    ];
    for body in bodies {
        let r = send(&c, Method::POST, &cms(&s), JSON, Some(body.to_vec())).await;
        let st = assert_status(
            &r,
            400,
            &format!("POST {:?}", String::from_utf8_lossy(body)),
        );
        assert_eq!(st["reason"], "BadRequest", "{}", r.text);
    }
    let r = send(&c, Method::POST, &cms(&s), JSON, Some(Vec::new())).await;
    assert_status(&r, 400, "empty body");
    // Malformed PUT and PATCH too.
    assert_eq!(
        post(&c, &cms(&s), &configmap("x")).await.code,
        StatusCode::CREATED
    );
    let url = format!("{}/x", cms(&s));
    let r = send(&c, Method::PUT, &url, JSON, Some(b"{oops".to_vec())).await;
    assert_status(&r, 400, "malformed PUT");
    for ct in [
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/json-patch+json",
    ] {
        let r = send(&c, Method::PATCH, &url, ct, Some(b"{oops".to_vec())).await;
        assert_status(&r, 400, &format!("malformed PATCH {ct}"));
    }
    let r = send(&c, Method::PATCH, &url, "text/plain", Some(b"{}".to_vec())).await;
    assert_status(&r, 415, "PATCH with an unknown content type");
}

async fn wrong_apiversion_kind(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    let cases = [
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "a"}}),
        json!({"apiVersion": "apps/v1", "kind": "ConfigMap", "metadata": {"name": "b"}}),
        json!({"apiVersion": "v2", "kind": "ConfigMap", "metadata": {"name": "c"}}),
        json!({"apiVersion": "v1", "kind": "ConfigMapz", "metadata": {"name": "d"}}),
        json!({"apiVersion": 1, "kind": ["ConfigMap"], "metadata": {"name": "e"}}),
    ];
    for body in cases {
        let r = post(&c, &cms(&s), &body).await;
        assert_status(&r, 400, &format!("POST {body}"));
    }
    // A Deployment body sent to the ReplicaSet endpoint.
    let r = post(
        &c,
        &format!("{}/apis/apps/v1/namespaces/default/replicasets", s.url),
        &deployment("d"),
    )
    .await;
    assert_status(&r, 400, "Deployment to replicasets");
    // Nothing was created.
    let r = send(&c, Method::GET, &cms(&s), "", None).await;
    assert_eq!(
        r.body["items"].as_array().map(Vec::len),
        Some(0),
        "{}",
        r.text
    );
}

async fn unknown_path(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    for path in [
        "/api/v1/namespaces/default/widgets",
        "/apis/nope.example.com/v1/things",
        "/apis/apps/v7/deployments",
        "/api/v1/namespaces/default/configmaps/x/y/z/w",
        "/nonsense",
        "/api/v1/nodes/n1/scale",
    ] {
        let r = send(&c, Method::GET, &format!("{}{path}", s.url), "", None).await;
        let st = assert_status(&r, 404, &format!("GET {path}"));
        assert_eq!(st["reason"], "NotFound", "{path}: {}", r.text);
    }
    let r = post(
        &c,
        &format!("{}/api/v1/namespaces/default/widgets", s.url),
        &configmap("w"),
    )
    .await;
    assert_status(&r, 404, "POST to an unknown resource");
    // A missing object: 404 with details naming it.
    let r = send(&c, Method::GET, &format!("{}/missing", cms(&s)), "", None).await;
    let st = assert_status(&r, 404, "missing object");
    assert_eq!(st["details"]["name"], "missing", "{}", r.text);
    assert_eq!(st["details"]["kind"], "configmaps", "{}", r.text);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("configmaps \"missing\" not found"),
        "{}",
        r.text
    );
    // Missing namespace on create.
    let r = post(
        &c,
        &format!("{}/api/v1/namespaces/nowhere/configmaps", s.url),
        &configmap("n"),
    )
    .await;
    assert_status(&r, 404, "create in a missing namespace");
}

async fn invalid_name(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    for bad in ["Bad_Name", "-leading", "a..b", &"x".repeat(300)] {
        let r = post(&c, &cms(&s), &configmap(bad)).await;
        let st = assert_status(&r, 422, &format!("name {bad:?}"));
        assert_eq!(st["reason"], "Invalid", "{}", r.text);
        assert!(
            causes_fields(&st).iter().any(|f| f == "metadata.name"),
            "causes must name metadata.name: {}",
            r.text
        );
        assert_eq!(st["details"]["kind"], "ConfigMap", "{}", r.text);
        assert!(
            st["message"].as_str().unwrap().contains("is invalid"),
            "{}",
            r.text
        );
    }
    // No name at all (and no generateName).
    let r = post(
        &c,
        &cms(&s),
        &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}}),
    )
    .await;
    let st = assert_status(&r, 422, "no name");
    assert!(
        causes_fields(&st).iter().any(|f| f == "metadata.name"),
        "{}",
        r.text
    );
    // Bad label key and value.
    let r = post(&c, &cms(&s), &json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "l", "labels": {"bad key!": "v"}}})).await;
    let st = assert_status(&r, 422, "bad label key");
    assert!(
        causes_fields(&st)
            .iter()
            .any(|f| f.starts_with("metadata.labels")),
        "{}",
        r.text
    );
}

async fn missing_required(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    let deploys = format!("{}/apis/apps/v1/namespaces/default/deployments", s.url);
    let mut d = deployment("noimg");
    d["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("image");
    let r = post(&c, &deploys, &d).await;
    let st = assert_status(&r, 422, "deployment without image");
    assert!(
        causes_fields(&st)
            .iter()
            .any(|f| f == "spec.template.spec.containers[0].image"),
        "{}",
        r.text
    );
    let cause = st["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["field"] == "spec.template.spec.containers[0].image")
        .unwrap();
    assert_eq!(cause["reason"], "FieldValueRequired", "{}", r.text);

    let mut d = deployment("nosel");
    d["spec"].as_object_mut().unwrap().remove("selector");
    let r = post(&c, &deploys, &d).await;
    let st = assert_status(&r, 422, "deployment without selector");
    assert!(
        causes_fields(&st)
            .iter()
            .any(|f| f.starts_with("spec.selector")),
        "{}",
        r.text
    );

    let pods = format!("{}/api/v1/namespaces/default/pods", s.url);
    let r = post(&c, &pods, &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})).await;
    let st = assert_status(&r, 422, "pod without containers");
    assert!(
        causes_fields(&st).iter().any(|f| f == "spec.containers"),
        "{}",
        r.text
    );

    let svcs = format!("{}/api/v1/namespaces/default/services", s.url);
    let r = post(&c, &svcs, &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}, "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": 99}]}})).await;
    let st = assert_status(&r, 422, "nodePort out of range");
    assert!(
        causes_fields(&st).iter().any(|f| f.contains("nodePort")),
        "{}",
        r.text
    );
}

async fn strict_unknown_field(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    let mut body = configmap("strict");
    body["bogusTop"] = json!(1);
    body["metadata"]["bogusMeta"] = json!("x");
    let r = post(&c, &format!("{}?fieldValidation=Strict", cms(&s)), &body).await;
    let st = assert_status(&r, 400, "Strict with unknown fields");
    let msg = st["message"].as_str().unwrap();
    assert!(
        msg.contains("bogusTop") && msg.contains("bogusMeta"),
        "the message names every unknown field: {msg}"
    );
    // Nested unknown field in a typed spec.
    let mut d = deployment("strictd");
    d["spec"]["template"]["spec"]["containers"][0]["imagez"] = json!("x");
    let r = post(
        &c,
        &format!(
            "{}/apis/apps/v1/namespaces/default/deployments?fieldValidation=Strict",
            s.url
        ),
        &d,
    )
    .await;
    let st = assert_status(&r, 400, "Strict with a nested unknown field");
    assert!(
        st["message"].as_str().unwrap().contains("imagez"),
        "{}",
        r.text
    );
    // Duplicate fields are rejected by Strict too (kube-apiserver: "duplicate field").
    let dup = br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"dup","name":"dup2"}}"#;
    let r = send(
        &c,
        Method::POST,
        &format!("{}?fieldValidation=Strict", cms(&s)),
        JSON,
        Some(dup.to_vec()),
    )
    .await;
    assert_status(&r, 400, "Strict with a duplicate field");
    // Warn (the server default): created, with a Warning header naming the field.
    let r = post(&c, &cms(&s), &body).await;
    assert_eq!(
        r.code,
        StatusCode::CREATED,
        "default validation is Warn: {}",
        r.text
    );
    let warning: Vec<String> = r
        .headers
        .get_all("warning")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_string))
        .collect();
    assert!(
        warning.iter().any(|w| w.contains("bogusTop")),
        "Warning header expected, got {warning:?}"
    );
    assert!(
        r.body.get("bogusTop").is_none(),
        "unknown fields are dropped: {}",
        r.text
    );
    // Ignore: created without warnings.
    let mut body2 = body.clone();
    body2["metadata"]["name"] = json!("ignored");
    let r = post(&c, &format!("{}?fieldValidation=Ignore", cms(&s)), &body2).await;
    assert_eq!(r.code, StatusCode::CREATED, "{}", r.text);
    assert!(r.headers.get("warning").is_none());
    // An unsupported fieldValidation value.
    let r = post(
        &c,
        &format!("{}?fieldValidation=Sometimes", cms(&s)),
        &configmap("fv"),
    )
    .await;
    assert_status(&r, 400, "fieldValidation=Sometimes");
}

async fn body_too_large(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    let mut body = configmap("huge");
    body["data"]["k"] = json!("x".repeat(3 * 1024 * 1024 + 1024));
    let r = post(&c, &cms(&s), &body).await;
    let st = assert_status(&r, 413, "3 MiB body");
    assert_eq!(st["reason"], "RequestEntityTooLarge", "{}", r.text);
    // Still serving, and the object does not exist.
    let r = send(&c, Method::GET, &format!("{}/huge", cms(&s)), "", None).await;
    assert_status(&r, 404, "the huge object must not exist");
    // A ConfigMap over 1 MiB of data fits the body limit but is invalid.
    body["data"]["k"] = json!("x".repeat(1024 * 1024 + 10));
    let r = post(&c, &cms(&s), &body).await;
    assert_status(&r, 422, "ConfigMap over 1 MiB");
}

async fn stale_resource_version(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    let created = post(&c, &cms(&s), &configmap("occ")).await;
    assert_eq!(created.code, StatusCode::CREATED, "{}", created.text);
    let url = format!("{}/occ", cms(&s));
    let mut v1 = created.body.clone();
    v1["data"]["k"] = json!("second");
    let r = send(
        &c,
        Method::PUT,
        &url,
        JSON,
        Some(serde_json::to_vec(&v1).unwrap()),
    )
    .await;
    assert_eq!(r.code, StatusCode::OK, "first update: {}", r.text);
    assert_ne!(
        r.body["metadata"]["resourceVersion"],
        created.body["metadata"]["resourceVersion"]
    );
    // The same stale resourceVersion again: 409 Conflict, nothing written.
    v1["data"]["k"] = json!("third");
    let r = send(
        &c,
        Method::PUT,
        &url,
        JSON,
        Some(serde_json::to_vec(&v1).unwrap()),
    )
    .await;
    let st = assert_status(&r, 409, "PUT with a stale resourceVersion");
    assert_eq!(st["reason"], "Conflict", "{}", r.text);
    assert!(
        st["message"]
            .as_str()
            .unwrap()
            .contains("the object has been modified"),
        "{}",
        r.text
    );
    let now = send(&c, Method::GET, &url, "", None).await;
    assert_eq!(
        now.body["data"]["k"], "second",
        "a conflicting update must not write"
    );
    // A merge patch pinning the stale resourceVersion.
    let stale = created.body["metadata"]["resourceVersion"]
        .as_str()
        .unwrap();
    let p = json!({"metadata": {"resourceVersion": stale}, "data": {"k": "patched"}});
    let r = send(
        &c,
        Method::PATCH,
        &url,
        "application/merge-patch+json",
        Some(serde_json::to_vec(&p).unwrap()),
    )
    .await;
    assert_status(&r, 409, "PATCH pinning a stale resourceVersion");
    // DELETE with a stale precondition.
    let del = json!({"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"resourceVersion": stale}});
    let r = send(
        &c,
        Method::DELETE,
        &url,
        JSON,
        Some(serde_json::to_vec(&del).unwrap()),
    )
    .await;
    assert_status(&r, 409, "DELETE with a stale precondition");
    // Create of an existing name: 409 AlreadyExists.
    let r = post(&c, &cms(&s), &configmap("occ")).await;
    let st = assert_status(&r, 409, "create of an existing name");
    assert_eq!(st["reason"], "AlreadyExists", "{}", r.text);
    // A non-numeric resourceVersion is a client error, not a conflict or a 500.
    let mut bad = now.body.clone();
    bad["metadata"]["resourceVersion"] = json!("abc");
    let r = send(
        &c,
        Method::PUT,
        &url,
        JSON,
        Some(serde_json::to_vec(&bad).unwrap()),
    )
    .await;
    assert!(
        r.code.is_client_error(),
        "non-numeric resourceVersion: {} {}",
        r.code,
        r.text
    );
}

/// Reads the first watch event line (bounded).
async fn first_watch_line(c: &Client, url: &str) -> (StatusCode, String) {
    let mut resp = c
        .get(url)
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let code = resp.status();
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(15), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => {
                buf.extend_from_slice(&chunk);
                if code != StatusCode::OK || buf.contains(&b'\n') {
                    if code != StatusCode::OK {
                        continue;
                    }
                    break;
                }
            }
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let first = if code == StatusCode::OK {
        text.lines().next().unwrap_or("").to_string()
    } else {
        text
    };
    (code, first)
}

async fn watch_too_old(b: Backend) {
    let mut s = start(b).await;
    let c = s.http();
    let first = post(&c, &cms(&s), &configmap("w0")).await;
    assert_eq!(first.code, StatusCode::CREATED, "{}", first.text);
    let old_rv = first.body["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..5 {
        post(&c, &cms(&s), &configmap(&format!("w{i}"))).await;
    }
    let list = send(&c, Method::GET, &cms(&s), "", None).await;
    let current: i64 = list.body["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    match b {
        // The embedded store's watch history is in memory: after a restart older
        // resourceVersions are gone.
        Backend::Embedded => tokio::task::block_in_place(|| s.restart()),
        // etcd: compact up to the current revision, as kube-apiserver's compactor does.
        Backend::Etcd => {
            let mut etcd = etcd_client::Client::connect([s.etcd().endpoint()], None)
                .await
                .expect("etcd client");
            etcd.compact(
                current,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .expect("compacting etcd");
        }
    }
    let c = s.http();
    // A watch from the current resourceVersion still works.
    let ok_url = format!(
        "{}?watch=1&resourceVersion={current}&timeoutSeconds=2",
        cms(&s)
    );
    let r = c
        .get(&ok_url)
        .send()
        .await
        .expect("watch from the current rv");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "watch from the current resourceVersion {current}"
    );
    drop(r);
    // A too old one: 410 Gone, as an HTTP status or as a watch ERROR event.
    let url = format!(
        "{}?watch=1&resourceVersion={old_rv}&timeoutSeconds=5",
        cms(&s)
    );
    let (code, first) = first_watch_line(&c, &url).await;
    let v: Value = serde_json::from_str(&first)
        .unwrap_or_else(|e| panic!("watch response is not JSON ({e}): {code} {first:?}"));
    let status = if code == StatusCode::OK {
        assert_eq!(
            v["type"], "ERROR",
            "first event of a too-old watch must be an ERROR: {first}"
        );
        v["object"].clone()
    } else {
        assert_eq!(code.as_u16(), 410, "{first}");
        v
    };
    assert_eq!(status["kind"], "Status", "{first}");
    assert_eq!(status["code"], 410, "{first}");
    assert!(
        matches!(status["reason"].as_str(), Some("Expired" | "Gone")),
        "{first}"
    );
    // The legacy /watch/ path behaves the same.
    let url = format!(
        "{}/api/v1/watch/namespaces/default/configmaps?resourceVersion={old_rv}&timeoutSeconds=5",
        s.url
    );
    let (code, first) = first_watch_line(&c, &url).await;
    assert!(first.contains("410"), "legacy watch path: {code} {first}");
}

async fn no_auth(b: Backend) {
    let s = start(b).await;
    let anon = s.http_anonymous();
    for path in [
        "/api/v1/namespaces",
        "/api",
        "/apis/apps/v1/deployments",
        "/openapi/v2",
    ] {
        let r = send(&anon, Method::GET, &format!("{}{path}", s.url), "", None).await;
        let st = assert_status(&r, 401, &format!("anonymous GET {path}"));
        assert_eq!(st["reason"], "Unauthorized", "{}", r.text);
    }
    let r = post(&anon, &cms(&s), &configmap("anon")).await;
    assert_status(&r, 401, "anonymous create");
    // A wrong token is no better; the configured one works.
    let mut h = reqwest::header::HeaderMap::new();
    h.insert(
        reqwest::header::AUTHORIZATION,
        "Bearer not-the-token".parse().unwrap(),
    );
    let r = anon
        .get(format!("{}/api/v1/namespaces", s.url))
        .headers(h)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let tok = s.http_token();
    let r = send(
        &tok,
        Method::GET,
        &format!("{}/api/v1/namespaces", s.url),
        "",
        None,
    )
    .await;
    assert_eq!(r.code, StatusCode::OK, "bearer {TEST_TOKEN}: {}", r.text);
    let r = post(&tok, &cms(&s), &configmap("by-token")).await;
    assert_eq!(r.code, StatusCode::CREATED, "{}", r.text);
    // Health and version are public.
    for path in ["/healthz", "/readyz", "/livez", "/version"] {
        let r = send(&anon, Method::GET, &format!("{}{path}", s.url), "", None).await;
        assert_eq!(r.code, StatusCode::OK, "anonymous GET {path}: {}", r.text);
    }
}

// ---- fuzz ----

const FUZZ_REQUESTS: usize = 300;

fn fuzz_targets() -> Vec<(&'static str, &'static str, Value)> {
    // (collection path under /api or /apis, item name, valid body)
    vec![
        (
            "/api/v1/namespaces/default/configmaps",
            "f-cm",
            configmap("f-cm"),
        ),
        (
            "/apis/apps/v1/namespaces/default/deployments",
            "f-deploy",
            deployment("f-deploy"),
        ),
        (
            "/api/v1/namespaces/default/services",
            "f-svc",
            json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "f-svc", "labels": {"a": "b"}},
                "spec": {"type": "NodePort", "selector": {"app": "x"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}),
        ),
        (
            "/api/v1/namespaces/default/pods",
            "f-pod",
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "f-pod"},
                "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "1"], "env": [{"name": "A", "value": "b"}],
                    "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}}}]}}),
        ),
        (
            "/api/v1/namespaces/default/secrets",
            "f-secret",
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "f-secret"}, "type": "Opaque", "data": {"k": "dmFsdWU="}}),
        ),
        (
            "/api/v1/namespaces",
            "f-ns",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "f-ns"}}),
        ),
        (
            "/apis/networking.k8s.io/v1/namespaces/default/ingresses",
            "f-ing",
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "metadata": {"name": "f-ing"},
                "spec": {"rules": [{"host": "a.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": "f-svc", "port": {"number": 80}}}}]}}]}}),
        ),
    ]
}

/// Every JSON pointer path in `v`.
fn paths(v: &Value, prefix: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = format!("{prefix}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                paths(x, p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let p = format!("{prefix}/{i}");
                out.push(p.clone());
                paths(x, p, out);
            }
        }
        _ => {}
    }
}

fn random_value(rng: &mut StdRng) -> Value {
    match rng.random_range(0..12) {
        0 => Value::Null,
        1 => json!(rng.random::<bool>()),
        2 => json!(rng.random::<i64>()),
        3 => json!(-1),
        4 => json!(rng.random::<f64>() * 1e300),
        5 => json!("x".repeat(rng.random_range(0..200_000))),
        6 => json!([]),
        7 => json!({}),
        8 => json!([{"a": [1, "b", null]}]),
        9 => json!("\u{0}\u{202e}ünïcødé\u{fffd}"),
        10 => json!(u64::MAX),
        _ => json!("2024-13-45T99:99:99Z"),
    }
}

fn deep(depth: usize, array: bool) -> String {
    if array {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    } else {
        format!("{}1{}", "{\"a\":".repeat(depth), "}".repeat(depth))
    }
}

/// A mutated version of `valid`: deletions, type swaps, huge strings, odd values.
fn mutate(rng: &mut StdRng, valid: &Value) -> Value {
    let mut v = valid.clone();
    for _ in 0..rng.random_range(1..4) {
        let mut ps = Vec::new();
        paths(&v, String::new(), &mut ps);
        if ps.is_empty() {
            return random_value(rng);
        }
        let p = ps[rng.random_range(0..ps.len())].clone();
        match rng.random_range(0..4) {
            0 => {
                // Delete the field.
                let (parent, last) = p.rsplit_once('/').unwrap();
                match v.pointer_mut(parent) {
                    Some(Value::Object(m)) => {
                        m.remove(&last.replace("~1", "/").replace("~0", "~"));
                    }
                    Some(Value::Array(a)) => {
                        if let Ok(i) = last.parse::<usize>()
                            && i < a.len()
                        {
                            a.remove(i);
                        }
                    }
                    _ => {}
                }
            }
            1 | 2 => {
                if let Some(x) = v.pointer_mut(&p) {
                    *x = random_value(rng);
                }
            }
            _ => {
                if let Some(x) = v.pointer_mut(&p) {
                    // Deepish nesting inside a valid structure.
                    let mut n = json!("leaf");
                    for _ in 0..rng.random_range(1..60) {
                        n = json!({"n": [n]});
                    }
                    *x = n;
                }
            }
        }
    }
    v
}

fn random_bytes(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..5) {
        0 => (0..rng.random_range(0..4096))
            .map(|_| rng.random::<u8>())
            .collect(),
        1 => deep(rng.random_range(100..20_000), rng.random()).into_bytes(),
        2 => b"---\n- !!binary AAAA\n- &a [*a]\n".to_vec(),
        3 => {
            // YAML alias bomb (billion laughs, small).
            b"a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b]\nd: &d [*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d]\nf: &f [*e,*e,*e,*e,*e,*e,*e,*e]\ng: [*f,*f,*f,*f,*f,*f,*f,*f]\n".to_vec()
        }
        _ => {
            let mut s =
                serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "ConfigMap"})).unwrap();
            s.truncate(rng.random_range(0..s.len()));
            s
        }
    }
}

fn random_json_patch(rng: &mut StdRng, valid: &Value) -> Value {
    let mut ps = Vec::new();
    paths(valid, String::new(), &mut ps);
    ps.push("/nope/deeper".into());
    ps.push("".into());
    ps.push("/metadata/name".into());
    ps.push("/metadata/uid".into());
    ps.push("/metadata/resourceVersion".into());
    let ops = ["add", "remove", "replace", "move", "copy", "test", "bogus"];
    let n = rng.random_range(0..5);
    let list: Vec<Value> = (0..n)
        .map(|_| {
            let path = ps[rng.random_range(0..ps.len())].clone();
            let from = ps[rng.random_range(0..ps.len())].clone();
            json!({"op": ops[rng.random_range(0..ops.len())], "path": path, "from": from, "value": random_value(rng)})
        })
        .collect();
    json!(list)
}

async fn fuzz_no_5xx(b: Backend) {
    let s = start(b).await;
    let c = s.http();
    let targets = fuzz_targets();
    // Create the objects so PUT/PATCH also hit existing items.
    for (coll, _, valid) in &targets {
        let r = post(&c, &format!("{}{coll}", s.url), valid).await;
        assert_eq!(
            r.code,
            StatusCode::CREATED,
            "seed object for {coll}: {}",
            r.text
        );
    }
    let mut rng = StdRng::seed_from_u64(0x51ff_f022);
    let mut server_errors = Vec::new();
    let mut histogram = std::collections::BTreeMap::<u16, usize>::new();
    let patch_types = [
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    ];
    for i in 0..FUZZ_REQUESTS {
        let (coll, name, valid) = &targets[rng.random_range(0..targets.len())];
        let existing = rng.random_range(0..4) != 0;
        let item = if existing {
            name.to_string()
        } else {
            format!("{name}-missing")
        };
        let (method, url, ct) = match rng.random_range(0..3) {
            0 => (Method::POST, format!("{}{coll}", s.url), JSON.to_string()),
            1 => (
                Method::PUT,
                format!("{}{coll}/{item}", s.url),
                JSON.to_string(),
            ),
            _ => {
                let ct = patch_types[rng.random_range(0..patch_types.len())];
                let mut url = format!("{}{coll}/{item}", s.url);
                if ct.contains("apply") {
                    url.push_str(if rng.random() {
                        "?fieldManager=fuzz"
                    } else {
                        "?fieldManager=fuzz&force=true"
                    });
                }
                (Method::PATCH, url, ct.to_string())
            }
        };
        let url = if rng.random_range(0..5) == 0 {
            let q = [
                "dryRun=All",
                "fieldValidation=Strict",
                "fieldValidation=Warn",
                "fieldManager=",
                "dryRun=bogus",
                "fieldValidation=%ZZ",
            ];
            format!(
                "{url}{}{}",
                if url.contains('?') { "&" } else { "?" },
                q[rng.random_range(0..q.len())]
            )
        } else {
            url
        };
        let body: Vec<u8> = match rng.random_range(0..10) {
            0 | 1 => random_bytes(&mut rng),
            2 if ct.contains("json-patch") => {
                serde_json::to_vec(&random_json_patch(&mut rng, valid)).unwrap()
            }
            3 if ct.contains("yaml") => serde_yaml::to_string(&mutate(&mut rng, valid))
                .unwrap()
                .into_bytes(),
            4 => {
                // Valid shape, name swapped to the URL's (PUT) or random.
                let mut m = mutate(&mut rng, valid);
                if m.is_object() && rng.random() {
                    m["metadata"]["name"] = json!(item);
                }
                serde_json::to_vec(&m).unwrap()
            }
            _ => serde_json::to_vec(&mutate(&mut rng, valid)).unwrap(),
        };
        let size = body.len();
        let resp = c
            .request(method.clone(), &url)
            .header(reqwest::header::CONTENT_TYPE, &ct)
            .body(body.clone())
            .send()
            .await;
        match resp {
            Ok(r) => {
                let code = r.status().as_u16();
                *histogram.entry(code).or_default() += 1;
                if code >= 500 {
                    let text = r.text().await.unwrap_or_default();
                    let shown = String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned();
                    server_errors.push(format!(
                        "#{i} {method} {url} ({ct}, {size} bytes) -> {code}: {}\n   body: {shown}",
                        &text[..text.len().min(400)]
                    ));
                }
            }
            Err(e) => {
                let shown = String::from_utf8_lossy(&body[..body.len().min(400)]).into_owned();
                server_errors.push(format!("#{i} {method} {url} ({ct}, {size} bytes) -> transport error {e:?}\n   body: {shown}"));
            }
        }
        if i % 50 == 49 {
            let h = send(&c, Method::GET, &format!("{}/healthz", s.url), "", None).await;
            assert_eq!(
                h.code,
                StatusCode::OK,
                "/healthz after request #{i}: {}\nerrors so far:\n{}",
                h.text,
                server_errors.join("\n")
            );
        }
    }
    let h = send(&c, Method::GET, &format!("{}/healthz", s.url), "", None).await;
    assert_eq!(h.code, StatusCode::OK, "/healthz after fuzzing: {}", h.text);
    eprintln!("fuzz status histogram: {histogram:?}");
    assert!(
        server_errors.is_empty(),
        "{} of {FUZZ_REQUESTS} fuzz requests got a 5xx or broke the connection:\n{}",
        server_errors.len(),
        server_errors
            .iter()
            .take(25)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    // It did exercise both paths: some writes went through, many were rejected.
    assert!(
        histogram.keys().any(|c| *c < 300),
        "no fuzz request succeeded: {histogram:?}"
    );
    assert!(
        histogram.keys().any(|c| (400..500).contains(c)),
        "no fuzz request was rejected: {histogram:?}"
    );
}

/// etcd down: writes fail fast with 503; after etcd is back, writes work again.
async fn etcd_down_503() {
    let mut s = start(Backend::Etcd).await;
    let c = s.http();
    assert_eq!(
        post(&c, &cms(&s), &configmap("before")).await.code,
        StatusCode::CREATED
    );
    tokio::task::block_in_place(|| s.etcd().stop());

    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        post(&c, &cms(&s), &configmap("during")),
    )
    .await
    .expect("create while etcd is down hung for 15s");
    let took = t0.elapsed();
    let st = assert_status(&r, 503, "create while etcd is down");
    assert_eq!(st["reason"], "ServiceUnavailable", "{}", r.text);
    assert!(took < Duration::from_secs(10), "503 took {took:?}");
    let t0 = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(15),
        send(&c, Method::GET, &format!("{}/before", cms(&s)), "", None),
    )
    .await
    .expect("get while etcd is down hung");
    assert_status(&r, 503, "get while etcd is down");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let h = tokio::time::timeout(
        Duration::from_secs(15),
        send(&c, Method::GET, &format!("{}/healthz", s.url), "", None),
    )
    .await
    .expect("healthz while etcd is down hung");
    assert_ne!(
        h.code,
        StatusCode::OK,
        "/healthz must report the storage failure"
    );

    tokio::task::block_in_place(|| s.etcd().restart()).expect("restarting etcd");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = post(&c, &cms(&s), &configmap("after")).await;
        if r.code == StatusCode::CREATED {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not recover within 30s after etcd came back: {} {}",
            r.code,
            r.text
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = send(&c, Method::GET, &format!("{}/before", cms(&s)), "", None).await;
    assert_eq!(r.code, StatusCode::OK, "{}", r.text);
    let r = send(&c, Method::GET, &format!("{}/during", cms(&s)), "", None).await;
    assert_status(&r, 404, "the create that got 503 must not exist");
}

macro_rules! both_backends {
    ($($t:ident),* $(,)?) => {
        mod embedded {
            use super::support::Backend;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $t() { super::$t(Backend::Embedded).await } )*
        }
        mod etcd {
            use super::support::Backend;
            $( #[tokio::test(flavor = "multi_thread", worker_threads = 2)] async fn $t() { super::$t(Backend::Etcd).await } )*
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd_down_503() { super::etcd_down_503().await }
        }
    };
}

both_backends![
    malformed_json,
    wrong_apiversion_kind,
    unknown_path,
    invalid_name,
    missing_required,
    strict_unknown_field,
    body_too_large,
    stale_resource_version,
    watch_too_old,
    no_auth,
    fuzz_no_5xx,
];
