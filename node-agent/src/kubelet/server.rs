//! The kubelet's HTTPS API, what the apiserver proxies `kubectl logs` and `kubectl exec` to:
//!
//! - `GET /containerLogs/{namespace}/{pod}/{container}?follow=&previous=&tailLines=&timestamps=
//!   &sinceSeconds=&sinceTime=&limitBytes=`: the container's log file in the CRI layout
//!   and format (`<pod-logs-dir>/<ns>_<pod>_<uid>/<container>/<attempt>.log`, one file per
//!   restart, written by the container's log copier, see [`super::cri_log`]); the
//!   messages are sent, `timestamps` and `sinceTime`/`sinceSeconds` use each line's own
//!   time, `tailLines` counts file lines. Which attempt is chosen the way the
//!   kubelet does it (validateContainerLogStatus): from the pod's status, the running
//!   container, else the terminated one, else lastState; `previous` is lastState's. The
//!   attempt is the last `-N` of the containerd id (`<uid8>-<container>-<attempt>`).
//! - `GET /exec/{namespace}/{pod}/{container}?command=..&stdin=&stdout=&stderr=&tty=`: a
//!   websocket (`v5.channel.k8s.io` / `v4.channel.k8s.io`): channel 0 stdin, 1 stdout,
//!   2 stderr, 3 error (a JSON Status once the command ended), 4 resize, 255 close (v5).
//!   The command runs in the container's namespaces and root through `nsenter` (as exec
//!   probes do) with the environment of the container's init process. With `tty=true` it
//!   gets a pseudo-terminal from the container's devpts (so `tty` prints /dev/pts/N of the
//!   container) as stdin/stdout/stderr and controlling terminal; its output goes out on
//!   channel 1, and resize messages (`{"Width":..,"Height":..}`) set the terminal size
//!   (TIOCSWINSZ).
//!
//! Where the data comes from: the Pod (GET through the agent's client, so the answer
//! matches what the API shows), the log files, containerd (is the container still running,
//! its init pid).
//!
//! Deviations, for now: the serving certificate is self-signed (generated at start, not
//! signed by the cluster CA) and requests are not authenticated (the apiserver does not
//! verify the certificate either).

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Stdio,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{
        Path as UrlPath, RawQuery, State,
        ws::{Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection},
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use futures::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use tokio::{
    io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt},
    sync::mpsc,
};

use super::{
    agent::Kubelet,
    cri_log::LogFormatter,
    runtime::{ContainerState, RuntimeError},
    static_pods,
};

/// An error answered as text with its status code (the apiserver turns it into a Status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub code: u16,
    pub message: String,
}

impl HttpError {
    fn bad_request(m: impl Into<String>) -> Self {
        HttpError {
            code: 400,
            message: m.into(),
        }
    }
    fn not_found(m: impl Into<String>) -> Self {
        HttpError {
            code: 404,
            message: m.into(),
        }
    }
    fn internal(m: impl Into<String>) -> Self {
        HttpError {
            code: 500,
            message: m.into(),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (
            StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.message,
        )
            .into_response()
    }
}

// ------------------------------------------------------------------ listening

/// Binds the kubelet port (0 = any free port). Bound before the Node is registered, so
/// the port written into `status.daemonEndpoints` is the real one.
pub async fn bind(addr: IpAddr, port: u16) -> anyhow::Result<tokio::net::TcpListener> {
    let l = tokio::net::TcpListener::bind(SocketAddr::new(addr, port))
        .await
        .map_err(|e| anyhow::anyhow!("binding the kubelet port {addr}:{port}: {e}"))?;
    Ok(l)
}

/// A self-signed serving certificate for the node's name and IP.
pub fn self_signed_config(node: &str, ip: IpAddr) -> anyhow::Result<rustls::ServerConfig> {
    let names = vec![node.to_string(), ip.to_string(), "localhost".to_string()];
    let ck = rcgen::generate_simple_self_signed(names)?;
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
    let mut cfg = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    // HTTP/1.1 only: exec is an HTTP/1.1 upgrade.
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// The kubelet API routes.
pub fn router(k: Arc<Kubelet>) -> Router {
    Router::new()
        .route(
            "/containerLogs/{namespace}/{pod}/{container}",
            get(container_logs),
        )
        .route("/exec/{namespace}/{pod}/{container}", get(exec).post(exec))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .with_state(k)
}

/// `GET /metrics`: the data path's counters and map fill levels (Prometheus text).
async fn metrics(State(k): State<Arc<Kubelet>>) -> impl IntoResponse {
    let pin_dir = k.cfg.bpffs_dir.clone();
    let body = tokio::task::spawn_blocking(move || crate::proxy::metrics::render(&pin_dir))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Serves the kubelet API over HTTPS on `listener` until the task is dropped.
pub async fn serve(k: Arc<Kubelet>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;

    let config = self_signed_config(&k.cfg.node_name, IpAddr::V4(k.cfg.node_ip))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let app = router(k);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("kubelet server: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "kubelet server: TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => return,
                };
            let svc = TowerToHyperService::new(app);
            if let Err(e) = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, "kubelet server: connection ended: {e}");
            }
        });
    }
}

// ------------------------------------------------------------------ queries

/// `a=1&b=2&command=x&command=y`, percent-decoded, in order.
pub fn parse_query(q: Option<&str>) -> Vec<(String, String)> {
    fn dec(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    match std::str::from_utf8(&b[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(v) => {
                            out.push(v);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (dec(k), dec(v))
        })
        .collect()
}

fn flag(q: &[(String, String)], k: &str) -> bool {
    q.iter()
        .any(|(a, v)| a == k && matches!(v.as_str(), "true" | "1" | "True"))
}

fn value<'a>(q: &'a [(String, String)], k: &str) -> Option<&'a str> {
    q.iter().find(|(a, _)| a == k).map(|(_, v)| v.as_str())
}

/// The options of a log request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub tail_lines: Option<usize>,
    pub timestamps: bool,
    /// Only content written after this time (see the module comment).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    pub limit_bytes: Option<u64>,
}

impl LogOptions {
    pub fn from_query(q: &[(String, String)]) -> Result<Self, HttpError> {
        let num = |k: &str| -> Result<Option<i64>, HttpError> {
            value(q, k)
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.parse::<i64>()
                        .map_err(|_| HttpError::bad_request(format!("invalid {k}: {v:?}")))
                })
                .transpose()
        };
        let since = match (num("sinceSeconds")?, value(q, "sinceTime")) {
            (Some(s), _) => Some(chrono::Utc::now() - chrono::Duration::seconds(s.max(0))),
            (None, Some(t)) if !t.is_empty() => Some(
                chrono::DateTime::parse_from_rfc3339(t)
                    .map_err(|_| HttpError::bad_request(format!("invalid sinceTime: {t:?}")))?
                    .with_timezone(&chrono::Utc),
            ),
            _ => None,
        };
        Ok(LogOptions {
            follow: flag(q, "follow"),
            previous: flag(q, "previous"),
            tail_lines: num("tailLines")?.filter(|n| *n >= 0).map(|n| n as usize),
            timestamps: flag(q, "timestamps"),
            since,
            limit_bytes: num("limitBytes")?.filter(|n| *n > 0).map(|n| n as u64),
        })
    }
}

// ------------------------------------------------------------------ log selection

/// The restart attempt of a containerd id `<uid8>-<container>-<attempt>` (with or without
/// the `containerd://` prefix).
pub fn attempt_of(container_id: &str) -> Option<u32> {
    container_id.rsplit_once('-')?.1.parse().ok()
}

fn strip_runtime(id: &str) -> &str {
    id.split_once("://").map(|(_, i)| i).unwrap_or(id)
}

fn all_statuses(pod: &Pod) -> Vec<&ContainerStatus> {
    let st = pod.status.as_ref();
    st.and_then(|s| s.init_container_statuses.as_ref())
        .into_iter()
        .flatten()
        .chain(
            st.and_then(|s| s.container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
        .chain(
            st.and_then(|s| s.ephemeral_container_statuses.as_ref())
                .into_iter()
                .flatten(),
        )
        .collect()
}

/// The containerd id whose log a request means, as the kubelet decides it
/// (validateContainerLogStatus), and whether that container is running.
pub fn select_log_container(
    pod: &Pod,
    container: &str,
    previous: bool,
) -> Result<(String, bool), HttpError> {
    let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
    let cs = all_statuses(pod)
        .into_iter()
        .find(|c| c.name == container)
        .ok_or_else(|| {
            HttpError::bad_request(format!(
                "container {container:?} in pod {pod_name:?} is not available"
            ))
        })?;
    let state = cs.state.clone().unwrap_or_default();
    let last = cs.last_state.as_ref().and_then(|l| l.terminated.as_ref());
    let id_of = |id: &Option<String>, what: &str| -> Result<String, HttpError> {
        match id.as_deref() {
            Some(i) if !i.is_empty() => Ok(strip_runtime(i).to_string()),
            _ => Err(HttpError::bad_request(format!(
                "container {container:?} in pod {pod_name:?} is {what}"
            ))),
        }
    };
    if previous {
        return match last {
            Some(t) if t.container_id.as_deref().is_some_and(|i| !i.is_empty()) => {
                Ok((id_of(&t.container_id, "terminated")?, false))
            }
            _ => Err(HttpError::bad_request(format!(
                "previous terminated container {container:?} in pod {pod_name:?} not found"
            ))),
        };
    }
    if state.running.is_some() {
        let id = id_of(&cs.container_id, "running")?;
        return Ok((id, true));
    }
    if let Some(t) = &state.terminated {
        let id = t.container_id.clone().or_else(|| cs.container_id.clone());
        return Ok((id_of(&id, "terminated")?, false));
    }
    if let Some(t) = last {
        return Ok((id_of(&t.container_id, "terminated")?, false));
    }
    let reason = state
        .waiting
        .as_ref()
        .and_then(|w| w.reason.clone())
        .unwrap_or_else(|| "ContainerCreating".into());
    Err(HttpError::bad_request(match reason.as_str() {
        "ErrImagePull" => {
            format!(
                "container {container:?} in pod {pod_name:?} is waiting to start: image can't be pulled"
            )
        }
        "ImagePullBackOff" => format!(
            "container {container:?} in pod {pod_name:?} is waiting to start: trying and failing to pull image"
        ),
        r => format!("container {container:?} in pod {pod_name:?} is waiting to start: {r}"),
    }))
}

/// `<pod-logs-dir>/<ns>_<pod>_<uid>/<container>/<attempt>.log` (the CRI layout
/// pod_worker's log copiers write).
pub fn log_path(
    logs: &Path,
    ns: &str,
    pod: &str,
    uid: &str,
    container: &str,
    attempt: u32,
) -> PathBuf {
    logs.join(format!("{ns}_{pod}_{uid}"))
        .join(container)
        .join(format!("{attempt}.log"))
}

/// The uid in the log directory of `pod` as the API shows it: the pod's own uid, but for a
/// mirror pod the static pod's (its `kubernetes.io/config.mirror` annotation), which its
/// worker runs and logs under; the mirror pod's API uid changes whenever it is recreated.
/// The annotation is anyone's to write, so only a uid-shaped value (8-4-4-4-12 hex digits,
/// as [`static_pods::parse`] makes them) is taken: never a path.
pub fn log_uid(pod: &Pod) -> &str {
    let own = pod.metadata.uid.as_deref().unwrap_or_default();
    let uid_shaped = |u: &&str| {
        u.len() == 36
            && u.char_indices().all(|(i, c)| match i {
                8 | 13 | 18 | 23 => c == '-',
                _ => c.is_ascii_hexdigit(),
            })
    };
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(static_pods::ANN_MIRROR))
        .map(String::as_str)
        .filter(uid_shaped)
        .unwrap_or(own)
}

/// The last `n` lines of `data` (a trailing newline does not start another line).
pub fn tail_lines(data: &[u8], n: usize) -> &[u8] {
    if n == 0 {
        return &data[data.len()..];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (i, b) in body.iter().enumerate().rev() {
        if *b == b'\n' {
            seen += 1;
            if seen == n {
                return &data[i + 1..];
            }
        }
    }
    data
}

// ------------------------------------------------------------------ handlers

async fn get_pod(k: &Kubelet, ns: &str, name: &str) -> Result<Pod, HttpError> {
    let api: Api<Pod> = Api::namespaced(k.client.clone(), ns);
    match api.get_opt(name).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(HttpError::not_found(format!("pod {ns}/{name} not found"))),
        Err(e) => Err(HttpError::internal(format!("getting pod {ns}/{name}: {e}"))),
    }
}

/// Whether containerd still runs the container (unknown counts as running).
async fn still_running(k: &Kubelet, id: &str) -> bool {
    let Some(rt) = k.rt().await else { return true };
    match rt.status(id).await {
        Ok(
            ContainerState::Running { .. }
            | ContainerState::Created { .. }
            | ContainerState::Paused { .. },
        ) => true,
        Ok(_) | Err(RuntimeError::ContainerNotFound(_)) => false,
        Err(_) => true,
    }
}

async fn container_logs(
    State(k): State<Arc<Kubelet>>,
    UrlPath((ns, pod_name, container)): UrlPath<(String, String, String)>,
    RawQuery(q): RawQuery,
) -> Response {
    match logs_response(k, &ns, &pod_name, &container, q.as_deref()).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn logs_response(
    k: Arc<Kubelet>,
    ns: &str,
    pod_name: &str,
    container: &str,
    q: Option<&str>,
) -> Result<Response, HttpError> {
    let opts = LogOptions::from_query(&parse_query(q))?;
    let pod = get_pod(&k, ns, pod_name).await?;
    let uid = log_uid(&pod).to_string();
    let (id, running) = select_log_container(&pod, container, opts.previous)?;
    let attempt = attempt_of(&id)
        .ok_or_else(|| HttpError::internal(format!("container id {id:?} has no attempt number")))?;
    let path = log_path(&k.cfg.pod_logs_dir, ns, pod_name, &uid, container, attempt);
    let file = tokio::fs::File::open(&path).await.map_err(|e| {
        HttpError::not_found(format!(
            "the log of container {container:?} in pod {pod_name:?} is gone ({}: {e})",
            path.display()
        ))
    })?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let follow = opts.follow && running;
    tokio::spawn(async move {
        if let Err(e) = stream_log(&k, file, &path, &id, &opts, follow, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((StatusCode::OK, [(header::CONTENT_TYPE, "text/plain")], body).into_response())
}

async fn stream_log(
    k: &Kubelet,
    mut file: tokio::fs::File,
    path: &std::path::Path,
    id: &str,
    opts: &LogOptions,
    follow: bool,
    tx: &mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> std::io::Result<()> {
    let mut fmt = LogFormatter::new(opts.timestamps, opts.since, opts.limit_bytes);
    // The time of lines not in the CRI format (raw logs of containers an older agent
    // started).
    let mtime: chrono::DateTime<chrono::Utc> = file
        .metadata()
        .await?
        .modified()
        .map(Into::into)
        .unwrap_or_else(|_| chrono::Utc::now());
    let mut data = Vec::new();
    file.read_to_end(&mut data).await?;
    // Complete lines only: the copier writes whole lines, a torn one is still being
    // written.
    let complete = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let shown = match opts.tail_lines {
        Some(n) => tail_lines(&data[..complete], n),
        None => &data[..complete],
    };
    let (out, done) = fmt.feed(shown, mtime);
    if !out.is_empty() && tx.send(Ok(out.into())).await.is_err() {
        return Ok(());
    }
    if done || !follow {
        return Ok(());
    }
    let mut pos = complete as u64;
    let mut last_check = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tx.closed() => return Ok(()),
        }
        // A final read after the container ended catches its last lines.
        let ended = if last_check.elapsed() >= Duration::from_secs(1) {
            last_check = Instant::now();
            !still_running(k, id).await
        } else {
            false
        };
        // The copier renames the file only after its last write to it: once the path names
        // a new file, reading the old one to its end below misses nothing of it.
        let rotated_away = rotated(&file, path).await;
        file.seek(std::io::SeekFrom::Start(pos)).await?;
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            let (out, done) = fmt.feed(&buf[..n], chrono::Utc::now());
            if (!out.is_empty() && tx.send(Ok(out.into())).await.is_err()) || done {
                return Ok(());
            }
        }
        // The copier rotated the file: go on with the new file at the path.
        if rotated_away && let Ok(f) = tokio::fs::File::open(path).await {
            file = f;
            pos = 0;
            continue;
        }
        if ended {
            return Ok(());
        }
    }
}

/// Whether `path` now names another file than `file` (the log was rotated).
async fn rotated(file: &tokio::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata().await, tokio::fs::metadata(path).await) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) != (b.dev(), b.ino()),
        _ => false,
    }
}

// ------------------------------------------------------------------ exec

/// The subprotocols served, preferred first.
pub const EXEC_PROTOCOLS: [&str; 2] = ["v5.channel.k8s.io", "v4.channel.k8s.io"];

const CH_STDIN: u8 = 0;
const CH_STDOUT: u8 = 1;
const CH_STDERR: u8 = 2;
const CH_ERROR: u8 = 3;
const CH_RESIZE: u8 = 4;
const CH_CLOSE: u8 = 255;
/// How long an exec waits for the client's Close after sending its own.
const CLOSE_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The Status sent on the error channel when the command ended.
pub fn exit_status(cmd: &[String], code: Option<i32>) -> serde_json::Value {
    match code {
        Some(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Some(c) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {c}", cmd.join(" ")),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": c.to_string()}]},
        }),
        None => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command [{}] was killed by a signal", cmd.join(" ")),
            "reason": "InternalError",
        }),
    }
}

/// A close frame with code 1000: client-go treats any other close (also one without a
/// code) as an error of the streams.
fn normal_close() -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    }))
}

struct ExecRequest {
    cmd: Vec<String>,
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
    pid: u32,
}

/// The terminal size of a resize message (channel 4): `{"Width": .., "Height": ..}`.
pub fn parse_resize(data: &[u8]) -> Option<(u16, u16)> {
    let v: serde_json::Value = serde_json::from_slice(data).ok()?;
    let dim = |k: &str| v.get(k)?.as_u64().and_then(|n| u16::try_from(n).ok());
    Some((dim("Width")?, dim("Height")?))
}

/// A pseudo-terminal for `kubectl exec -t`: from the container's own devpts instance
/// (`/proc/<pid>/root/dev/pts/ptmx`, the slave opened with TIOCGPTPEER, so the command
/// sees `/dev/pts/N` of its container as runc's terminals are), else from the host's.
/// Returns (master, slave).
fn open_pty(pid: u32) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    };
    let container = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/{pid}/root/dev/pts/ptmx"));
    if let Ok(m) = container {
        let master = OwnedFd::from(m);
        let unlock: libc::c_int = 0;
        // SAFETY: ioctls on a descriptor we own; TIOCSPTLCK reads an int, TIOCGPTPEER
        // returns a new descriptor (checked) that we then own.
        unsafe {
            if libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) == 0 {
                let fd = libc::ioctl(
                    master.as_raw_fd(),
                    libc::TIOCGPTPEER,
                    libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    return Ok((master, OwnedFd::from_raw_fd(fd)));
                }
            }
        }
    }
    let (mut m, mut sl) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given ints (checked below); the
    // name, termios and winsize pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut sl,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created by openpty and are owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(sl)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on descriptors we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

/// Sets the terminal size of pty `master` (TIOCSWINSZ).
fn set_winsize(master: &std::os::fd::OwnedFd, width: u16, height: u16) {
    use std::os::fd::AsRawFd;
    let ws = libc::winsize {
        ws_row: height,
        ws_col: width,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize struct from the given pointer.
    unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
}

async fn exec(
    State(k): State<Arc<Kubelet>>,
    UrlPath((ns, pod_name, container)): UrlPath<(String, String, String)>,
    RawQuery(q): RawQuery,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let req = match prepare_exec(&k, &ns, &pod_name, &container, q.as_deref()).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let ws = match ws {
        Ok(ws) => ws,
        Err(_) => {
            return HttpError::bad_request(
                "exec needs a websocket upgrade (v5.channel.k8s.io or v4.channel.k8s.io)",
            )
            .into_response();
        }
    };
    let ws = ws.protocols(EXEC_PROTOCOLS);
    if ws.selected_protocol().is_none() {
        return HttpError::bad_request(format!(
            "no supported websocket subprotocol requested (supported: {})",
            EXEC_PROTOCOLS.join(", ")
        ))
        .into_response();
    }
    ws.on_upgrade(move |socket| async move {
        if let Err(e) = run_exec(socket, req).await {
            tracing::debug!("exec: {e}");
        }
    })
}

async fn prepare_exec(
    k: &Kubelet,
    ns: &str,
    pod_name: &str,
    container: &str,
    q: Option<&str>,
) -> Result<ExecRequest, HttpError> {
    let q = parse_query(q);
    let cmd: Vec<String> = q
        .iter()
        .filter(|(a, _)| a == "command")
        .map(|(_, v)| v.clone())
        .collect();
    if cmd.is_empty() {
        return Err(HttpError::bad_request(
            "you must specify at least 1 command",
        ));
    }
    let pod = get_pod(k, ns, pod_name).await?;
    let not_found = || HttpError::not_found(format!("container not found ({container:?})"));
    let cs = all_statuses(&pod)
        .into_iter()
        .find(|c| c.name == container)
        .ok_or_else(not_found)?;
    let running = cs.state.as_ref().is_some_and(|s| s.running.is_some());
    let id = cs
        .container_id
        .as_deref()
        .filter(|_| running)
        .map(strip_runtime)
        .ok_or_else(not_found)?;
    let rt = k
        .rt()
        .await
        .ok_or_else(|| HttpError::internal("the container runtime is down"))?;
    let pid = match rt.status(id).await {
        Ok(ContainerState::Running { pid }) => pid,
        Ok(_) | Err(RuntimeError::ContainerNotFound(_)) => return Err(not_found()),
        Err(e) => return Err(HttpError::internal(e.to_string())),
    };
    Ok(ExecRequest {
        cmd,
        stdin: flag(&q, "stdin") || flag(&q, "input"),
        stdout: flag(&q, "stdout") || flag(&q, "output"),
        stderr: flag(&q, "stderr") || flag(&q, "error"),
        tty: flag(&q, "tty"),
        pid,
    })
}

/// The environment of process `pid` (`/proc/<pid>/environ`).
fn environ_of(pid: u32) -> Vec<(String, String)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter_map(|kv| {
                    let s = String::from_utf8_lossy(kv);
                    s.split_once('=')
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn host_binary(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .unwrap_or_else(|| PathBuf::from(name))
        })
        .unwrap_or_else(|| PathBuf::from(name))
}

async fn run_exec(socket: WebSocket, req: ExecRequest) -> anyhow::Result<()> {
    let v5 = socket
        .protocol()
        .and_then(|p| p.to_str().ok())
        .is_some_and(|p| p == EXEC_PROTOCOLS[0]);
    let (mut sink, mut stream) = socket.split();
    let pipe = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
    let mut cmd = tokio::process::Command::new(host_binary("nsenter"));
    cmd.arg("-t")
        .arg(req.pid.to_string())
        .args(["-m", "-u", "-i", "-n", "-p", "-r", "-w", "--"])
        .args(&req.cmd)
        .env_clear()
        .envs(environ_of(req.pid))
        .kill_on_drop(true);
    // With a tty the command's stdin, stdout and stderr are the terminal; its output
    // (both streams) goes out on the stdout channel.
    let mut pty_master: Option<std::os::fd::OwnedFd> = None;
    if req.tty {
        let (master, slave) = match open_pty(req.pid) {
            Ok(p) => p,
            Err(e) => {
                let st = serde_json::json!({"metadata": {}, "status": "Failure", "message": format!("cannot allocate a terminal: {e}"), "reason": "InternalError"});
                let mut m = vec![CH_ERROR];
                m.extend_from_slice(st.to_string().as_bytes());
                sink.send(Message::Binary(m.into())).await?;
                let _ = sink.send(normal_close()).await;
                return Ok(());
            }
        };
        let env_term = environ_of(req.pid).into_iter().any(|(k, _)| k == "TERM");
        if !env_term {
            cmd.env("TERM", "xterm");
        }
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        pty_master = Some(master);
    } else {
        cmd.stdin(pipe(req.stdin))
            .stdout(pipe(req.stdout))
            .stderr(pipe(req.stderr));
    }
    let tty = req.tty;
    // The command joins the container's cgroups too (limits apply, and the node's
    // cgroup eBPF programs, e.g. the socket load balancer, see it as the pod).
    let procs: Vec<std::ffi::CString> = container_cgroup_procs(req.pid)
        .into_iter()
        .filter_map(|p| std::ffi::CString::new(p.into_os_string().into_encoded_bytes()).ok())
        .collect();
    // SAFETY: the hook only calls async-signal-safe functions (open, write, close) on
    // memory prepared before the fork.
    // With a tty: a new session with the terminal as its controlling tty (setsid,
    // ioctl), both async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            if tty {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // Our copies of the terminal's slave side go with the command builder: reads of the
    // master end (EIO) once the command and its children closed it.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            let st = serde_json::json!({"metadata": {}, "status": "Failure", "message": format!("cannot run nsenter: {e}"), "reason": "InternalError"});
            let mut m = vec![CH_ERROR];
            m.extend_from_slice(st.to_string().as_bytes());
            sink.send(Message::Binary(m.into())).await?;
            let _ = sink.send(normal_close()).await;
            return Ok(());
        }
    };
    // Outgoing frames from the stdout/stderr readers.
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    let mut readers = Vec::new();
    // The terminal: its master end is read (stdout channel) and written (stdin).
    let mut pty_in: Option<tokio::fs::File> = None;
    let mut pty_out: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>> = None;
    if let Some(m) = &pty_master {
        let r = std::fs::File::from(m.try_clone()?);
        let w = std::fs::File::from(m.try_clone()?);
        pty_out = Some(Box::new(tokio::fs::File::from_std(r)));
        if req.stdin {
            pty_in = Some(tokio::fs::File::from_std(w));
        }
    }
    for (ch, r) in [
        (CH_STDOUT, pty_out),
        (
            CH_STDOUT,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
        (
            CH_STDERR,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
        ),
    ] {
        let Some(mut r) = r else { continue };
        let tx = out_tx.clone();
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match r.read(&mut buf).await {
                    // EIO on a pty master: the terminal's other side is closed.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut m = Vec::with_capacity(n + 1);
                        m.push(ch);
                        m.extend_from_slice(&buf[..n]);
                        if tx.send(m).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    drop(out_tx);
    // Incoming frames: stdin, resize, close.
    let mut stdin: Option<Box<dyn tokio::io::AsyncWrite + Unpin + Send>> = match pty_in {
        Some(w) => Some(Box::new(w)),
        None => child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>),
    };
    let (gone_tx, mut gone_rx) = tokio::sync::oneshot::channel::<()>();
    let input = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            let data: Bytes = match msg {
                Message::Binary(b) => b,
                Message::Text(t) => Bytes::copy_from_slice(t.as_bytes()),
                Message::Close(_) => break,
                _ => continue,
            };
            match data.first() {
                Some(&CH_STDIN) => {
                    if let Some(w) = stdin.as_mut()
                        && (w.write_all(&data[1..]).await.is_err() || w.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                Some(&CH_CLOSE) if v5 && data.get(1) == Some(&CH_STDIN) => stdin = None,
                Some(&CH_RESIZE) => {
                    if let (Some(m), Some((w, h))) = (&pty_master, parse_resize(&data[1..])) {
                        set_winsize(m, w, h);
                    }
                }
                _ => {}
            }
        }
        drop(stdin);
        let _ = gone_tx.send(());
    });
    // Forward output until the readers are done; the client leaving kills the command.
    let mut client_gone = false;
    loop {
        tokio::select! {
            m = out_rx.recv() => match m {
                Some(m) => {
                    if sink.send(Message::Binary(m.into())).await.is_err() {
                        client_gone = true;
                        break;
                    }
                }
                None => break,
            },
            _ = &mut gone_rx, if !client_gone => {
                client_gone = true;
            }
        }
    }
    if client_gone && out_rx.is_closed() {
        let _ = child.start_kill();
    }
    let status = child.wait().await?;
    for r in readers {
        r.abort();
    }
    let st = exit_status(&req.cmd, status.code());
    let mut m = vec![CH_ERROR];
    m.extend_from_slice(st.to_string().as_bytes());
    let _ = sink.send(Message::Binary(m.into())).await;
    let _ = sink.send(normal_close()).await;
    // The closing handshake: keep reading until the client answers our Close (or
    // leaves). Dropping the connection with its frames (stdin, resize) still unread
    // makes the kernel send a reset, which can destroy the status and Close frames still
    // on their way to the client: kubectl then fails with "close 1006 (abnormal
    // closure)" although the command ran.
    let mut input = input;
    if tokio::time::timeout(CLOSE_HANDSHAKE_TIMEOUT, &mut input)
        .await
        .is_err()
    {
        input.abort();
    }
    Ok(())
}

/// The `cgroup.procs` files of the cgroups process `pid` is in, in every mounted
/// hierarchy (the agent lays containers out at the same path in v1 and v2).
fn container_cgroup_procs(pid: u32) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) else {
        return vec![];
    };
    let Some(path) = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .or_else(|| text.lines().find_map(|l| l.splitn(3, ':').nth(2)))
    else {
        return vec![];
    };
    super::runtime::cgroup_dirs(path)
        .into_iter()
        .map(|d| d.join("cgroup.procs"))
        .filter(|p| p.exists())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "default", "uid": "u"},
            "spec": {"containers": [{"name": "c", "image": "i"}]},
            "status": {"containerStatuses": statuses},
        }))
        .unwrap()
    }

    #[test]
    fn tail_lines_counts_from_the_end() {
        let d = b"a\nb\nc\n";
        assert_eq!(tail_lines(d, 1), b"c\n");
        assert_eq!(tail_lines(d, 2), b"b\nc\n");
        assert_eq!(tail_lines(d, 3), d);
        assert_eq!(tail_lines(d, 10), d);
        assert_eq!(tail_lines(d, 0), b"");
        // An unterminated last line is a line.
        assert_eq!(tail_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(tail_lines(b"", 3), b"");
    }

    #[test]
    fn current_and_previous_container_selection() {
        let id = |n: u32| format!("containerd://abcd1234-c-{n}");
        // Running attempt 2 after attempt 1 terminated.
        let p = pod(json!([{
            "name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 2,
            "containerID": id(2),
            "state": {"running": {"startedAt": "2024-01-01T00:00:00Z"}},
            "lastState": {"terminated": {"exitCode": 1, "containerID": id(1)}},
        }]));
        let (cur, running) = select_log_container(&p, "c", false).unwrap();
        assert_eq!((attempt_of(&cur), running), (Some(2), true));
        let (prev, running) = select_log_container(&p, "c", true).unwrap();
        assert_eq!((attempt_of(&prev), running), (Some(1), false));
        // CrashLoopBackOff: waiting, the last run is lastState (current and previous).
        let p = pod(json!([{
            "name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 3,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 3, "containerID": id(3)}},
        }]));
        assert_eq!(
            attempt_of(&select_log_container(&p, "c", false).unwrap().0),
            Some(3)
        );
        // First run: no previous.
        let p = pod(json!([{
            "name": "c", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
            "containerID": id(0), "state": {"running": {}},
        }]));
        assert_eq!(
            select_log_container(&p, "c", true).unwrap_err().message,
            r#"previous terminated container "c" in pod "p" not found"#
        );
        // Not started yet.
        let p = pod(json!([{
            "name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"waiting": {"reason": "ContainerCreating"}},
        }]));
        let e = select_log_container(&p, "c", false).unwrap_err();
        assert_eq!(e.code, 400);
        assert_eq!(
            e.message,
            r#"container "c" in pod "p" is waiting to start: ContainerCreating"#
        );
    }

    #[test]
    fn log_paths_and_attempts() {
        assert_eq!(attempt_of("containerd://abcd1234-my-app-12"), Some(12));
        assert_eq!(attempt_of("abcd"), None);
        assert_eq!(
            log_path(Path::new("/var/log/pods"), "ns", "p", "u", "c", 3),
            PathBuf::from("/var/log/pods/ns_p_u/c/3.log")
        );
        // A mirror pod's logs are under the static pod's uid, not the mirror's.
        let mut mirror = pod(serde_json::json!([]));
        assert_eq!(log_uid(&mirror), "u");
        let static_uid = "0123abcd-4567-89ef-0a1b-2c3d4e5f6a7b";
        for (mirror_ann, want) in [
            (static_uid, static_uid),
            // Not a uid: the pod's own (no path out of the pod's log directory).
            ("../../../etc", "u"),
            ("0123abcd-4567-89ef-0a1b-2c3d4e5f/../", "u"),
            ("", "u"),
        ] {
            mirror.metadata.annotations =
                Some([(static_pods::ANN_MIRROR.to_string(), mirror_ann.to_string())].into());
            assert_eq!(log_uid(&mirror), want, "{mirror_ann:?}");
        }
    }

    #[test]
    fn options_timestamps_and_limits() {
        let o = LogOptions::from_query(&parse_query(Some(
            "follow=true&tailLines=5&limitBytes=4&timestamps=true",
        )))
        .unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!((o.tail_lines, o.limit_bytes), (Some(5), Some(4)));
        assert!(LogOptions::from_query(&parse_query(Some("tailLines=x"))).is_err());
        assert_eq!(
            parse_query(Some("command=sh&command=-c&command=echo+a%20b")),
            vec![
                ("command".to_string(), "sh".to_string()),
                ("command".to_string(), "-c".to_string()),
                ("command".to_string(), "echo a b".to_string()),
            ]
        );
        assert_eq!(exit_status(&[], Some(0))["status"], "Success");
        assert_eq!(
            parse_resize(br#"{"Width":111,"Height":33}"#),
            Some((111, 33))
        );
        assert_eq!(parse_resize(br#"{"Width":-1,"Height":33}"#), None);
        assert_eq!(parse_resize(b"nope"), None);
        assert_eq!(
            exit_status(&["sh".into()], Some(3))["details"]["causes"][0]["message"],
            "3"
        );
    }
}
