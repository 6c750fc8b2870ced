//! pods/log and pods/exec: proxied to the kubelet API of the pod's node, as
//! kube-apiserver does.
//!
//! Where the data comes from: the Pod (which container, which node), the Node (its
//! InternalIP and `status.daemonEndpoints.kubeletEndpoint.Port`, default 10250).
//! What it decides: the container (the only one when not named; the errors kubectl shows
//! otherwise), whether exec makes sense (not in a completed pod).
//! Where it writes: nothing; the agent's answer is streamed back (logs: chunked
//! text/plain; exec: the websocket upgrade is forwarded and both connections are spliced
//! byte for byte, so the `v5.channel.k8s.io`/`v4.channel.k8s.io` frames pass unchanged).
//!
//! The agent's serving certificate is self-signed and is NOT verified yet, and the
//! apiserver does not authenticate to the agent yet (both to be done with node
//! certificates from the cluster CA).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use super::AppState;
use super::resources::{self, Resource};
use super::status::{ApiError, ApiResult};

/// Query parameters of pods/log passed on to the kubelet.
const LOG_PARAMS: [&str; 7] = [
    "follow",
    "previous",
    "tailLines",
    "timestamps",
    "sinceSeconds",
    "sinceTime",
    "limitBytes",
];

fn get<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query_string(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

fn names(v: &Value, field: &str) -> Vec<String> {
    v["spec"][field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

/// The container a request means, with kube-apiserver's errors.
pub fn resolve_container(pod: &Value, requested: Option<&str>) -> ApiResult<String> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let containers = names(pod, "containers");
    let init = names(pod, "initContainers");
    let ephemeral = names(pod, "ephemeralContainers");
    match requested.filter(|c| !c.is_empty()) {
        Some(c) => {
            if containers
                .iter()
                .chain(&init)
                .chain(&ephemeral)
                .any(|n| n == c)
            {
                Ok(c.to_string())
            } else {
                Err(ApiError::bad_request(format!(
                    "container {c} is not valid for pod {name}"
                )))
            }
        }
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut m = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                m.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init.join(" ")
                ));
            }
            Err(ApiError::bad_request(m))
        }
    }
}

/// The kubelet endpoint (InternalIP, port) of the pod's node.
async fn kubelet_of(state: &AppState, pod: &Value) -> ApiResult<(IpAddr, u16)> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let node_name = pod["spec"]["nodeName"].as_str().unwrap_or_default();
    if node_name.is_empty() {
        return Err(ApiError::bad_request(format!(
            "pod {name} does not have a host assigned"
        )));
    }
    let nodes = resources::by_kind("v1", "Node").expect("Node is a resource");
    let node = state.registry.get(nodes, None, node_name).await?;
    let ip = node["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "InternalIP")
        .find_map(|a| a["address"].as_str().and_then(|s| s.parse::<IpAddr>().ok()))
        .ok_or_else(|| {
            ApiError::internal(format!("node {node_name:?} has no InternalIP address"))
        })?;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"]
        .as_u64()
        .filter(|p| *p > 0 && *p <= u16::MAX as u64)
        .unwrap_or(10250) as u16;
    Ok((ip, port))
}

/// Accepts any server certificate (the agents' are self-signed for now); signatures are
/// still checked, so the TLS handshake itself is sound.
#[derive(Debug)]
struct AnyServerCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client_config() -> ApiResult<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ApiError::internal(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServerCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Sends `req` to the kubelet at `ip:port` over HTTPS (HTTP/1.1, upgrades allowed).
async fn kubelet_request(
    ip: IpAddr,
    port: u16,
    req: Request<Body>,
) -> ApiResult<hyper::Response<hyper::body::Incoming>> {
    let unreachable =
        |e: String| ApiError::internal(format!("error dialing backend: {ip}:{port}: {e}"));
    let tcp = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect((ip, port)),
    )
    .await
    .map_err(|_| unreachable("timeout".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config()?));
    let tls = tokio::time::timeout(
        Duration::from_secs(10),
        connector.connect(rustls::pki_types::ServerName::IpAddress(ip.into()), tcp),
    )
    .await
    .map_err(|_| unreachable("TLS handshake timeout".into()))?
    .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("kubelet connection: {e}");
        }
    });
    sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(e.to_string()))
}

/// Turns a kubelet error answer (text) into a Status.
async fn kubelet_error(resp: hyper::Response<hyper::body::Incoming>) -> ApiError {
    use http_body_util_compat::collect_limited;
    let code = resp.status().as_u16();
    let body = collect_limited(resp.into_body(), 64 * 1024).await;
    let message = String::from_utf8_lossy(&body).trim().to_string();
    let reason = match code {
        400 => "BadRequest",
        403 => "Forbidden",
        404 => "NotFound",
        _ => "InternalError",
    };
    ApiError::new(if code < 400 { 500 } else { code }, reason, message)
}

/// Reading a bounded body without another dependency.
mod http_body_util_compat {
    use axum::body::{Body, Bytes};
    use futures::StreamExt;

    pub async fn collect_limited(b: hyper::body::Incoming, limit: usize) -> Vec<u8> {
        let mut s = Body::new(b).into_data_stream();
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = s.next().await {
            let chunk: Bytes = chunk;
            out.extend_from_slice(&chunk);
            if out.len() >= limit {
                out.truncate(limit);
                break;
            }
        }
        out
    }
}

fn kubelet_path(what: &str, ns: &str, pod: &str, container: &str, query: &str) -> String {
    let mut p = format!(
        "/{what}/{}/{}/{}",
        encode(ns),
        encode(pod),
        encode(container)
    );
    if !query.is_empty() {
        p.push('?');
        p.push_str(query);
    }
    p
}

/// GET pods/{name}/log.
pub async fn pod_log(
    state: &AppState,
    r: &Resource,
    ns: &str,
    name: &str,
    q: &[(String, String)],
) -> ApiResult<Response> {
    let pod = state.registry.get(r, Some(ns), name).await?;
    let container = resolve_container(&pod, get(q, "container"))?;
    let (ip, port) = kubelet_of(state, &pod).await?;
    let pass: Vec<(String, String)> = q
        .iter()
        .filter(|(k, _)| LOG_PARAMS.contains(&k.as_str()))
        .cloned()
        .collect();
    let path = kubelet_path("containerLogs", ns, name, &container, &query_string(&pass));
    let req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, format!("{ip}:{port}"))
        .body(Body::empty())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let resp = kubelet_request(ip, port, req).await?;
    if !resp.status().is_success() {
        return Err(kubelet_error(resp).await);
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::new(resp.into_body()),
    )
        .into_response())
}

fn is_websocket(parts: &Parts) -> bool {
    parts
        .headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// GET/POST pods/{name}/exec: the websocket upgrade forwarded to the kubelet.
pub async fn pod_exec(
    state: &AppState,
    r: &Resource,
    ns: &str,
    name: &str,
    q: &[(String, String)],
    parts: &mut Parts,
) -> ApiResult<Response> {
    let pod = state.registry.get(r, Some(ns), name).await?;
    let container = resolve_container(&pod, get(q, "container"))?;
    if let Some(phase @ ("Succeeded" | "Failed")) = pod["status"]["phase"].as_str() {
        return Err(ApiError::bad_request(format!(
            "cannot exec into a container in a completed pod; current phase is {phase}"
        )));
    }
    if !q.iter().any(|(k, _)| k == "command") {
        return Err(ApiError::bad_request("you must specify at least 1 command"));
    }
    let (ip, port) = kubelet_of(state, &pod).await?;
    if !is_websocket(parts) {
        return Err(ApiError::bad_request(
            "exec is served over websockets only (v5.channel.k8s.io, v4.channel.k8s.io); SPDY is not supported",
        ));
    }
    let pass: Vec<(String, String)> = q
        .iter()
        .filter(|(k, _)| k != "container")
        .cloned()
        .collect();
    let path = kubelet_path("exec", ns, name, &container, &query_string(&pass));
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(path)
        .header(header::HOST, format!("{ip}:{port}"))
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket");
    for h in [
        header::SEC_WEBSOCKET_KEY,
        header::SEC_WEBSOCKET_VERSION,
        header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        for v in parts.headers.get_all(&h) {
            req = req.header(&h, v.clone());
        }
    }
    let req = req
        .body(Body::empty())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let on_client = parts
        .extensions
        .remove::<hyper::upgrade::OnUpgrade>()
        .ok_or_else(|| ApiError::bad_request("this connection cannot be upgraded"))?;
    let resp = kubelet_request(ip, port, req).await?;
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(kubelet_error(resp).await);
    }
    let mut out = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for h in [
        header::CONNECTION,
        header::UPGRADE,
        header::SEC_WEBSOCKET_ACCEPT,
        header::SEC_WEBSOCKET_PROTOCOL,
    ] {
        if let Some(v) = resp.headers().get(&h) {
            out = out.header(&h, v.clone());
        }
    }
    tokio::spawn(async move {
        let agent = match hyper::upgrade::on(resp).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("exec: kubelet upgrade: {e}");
                return;
            }
        };
        let client = match on_client.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("exec: client upgrade: {e}");
                return;
            }
        };
        let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(agent))
            .await;
    });
    out.body(Body::empty())
        .map_err(|e| ApiError::internal(e.to_string()))
        .map(|mut r| {
            r.headers_mut()
                .entry(header::CONNECTION)
                .or_insert(HeaderValue::from_static("Upgrade"));
            r
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn container_resolution_and_its_errors() {
        let one = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}});
        assert_eq!(resolve_container(&one, None).unwrap(), "a");
        assert_eq!(resolve_container(&one, Some("a")).unwrap(), "a");
        assert_eq!(
            resolve_container(&one, Some("x")).unwrap_err().message,
            "container x is not valid for pod p"
        );
        let two = json!({"metadata": {"name": "p"}, "spec": {
            "initContainers": [{"name": "i"}],
            "containers": [{"name": "a"}, {"name": "b"}]}});
        let e = resolve_container(&two, None).unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [i]"
        );
        assert_eq!(resolve_container(&two, Some("i")).unwrap(), "i");
        assert_eq!(
            query_string(&[("command".into(), "sh -c".into())]),
            "command=sh%20-c"
        );
    }
}
