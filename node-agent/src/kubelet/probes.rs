//! Probes, run by the agent against the pod (as the kubelet does):
//! - httpGet: a plain HTTP/1.1 GET from the host to `<podIP>:<port><path>` (the host
//!   reaches the pod through its /32 route); 200..=399 is success;
//! - tcpSocket: a TCP connect;
//! - exec: the command run inside the container's namespaces and root (`nsenter` into the
//!   task's pid), exit code 0 is success.
//!
//! A [`Prober`] task per (container attempt, probe kind) keeps the result (with
//! initialDelaySeconds, periodSeconds, timeoutSeconds, successThreshold,
//! failureThreshold) and wakes the pod worker when it changes.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Container, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::Notify,
    task::JoinHandle,
};

/// Result of one probe run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Success,
    Failure(String),
}

/// Where a probe runs.
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub pod_ip: IpAddr,
    /// The container's init pid (exec probes).
    pub pid: u32,
}

/// The port of an httpGet/tcpSocket probe: a number, or a named container port.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port {p}")),
        IntOrString::String(s) => {
            if let Ok(p) = s.parse::<u16>() {
                return Ok(p);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("port {s:?} not found in the container's ports"))
        }
    }
}

/// Runs a probe once.
pub async fn run_once(probe: &Probe, container: &Container, target: &ProbeTarget) -> ProbeResult {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    if let Some(h) = &probe.http_get {
        let port = match resolve_port(&h.port, container) {
            Ok(p) => p,
            Err(e) => return ProbeResult::Failure(e),
        };
        let host = h
            .host
            .as_deref()
            .and_then(|h| h.parse::<IpAddr>().ok())
            .unwrap_or(target.pod_ip);
        if h.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return ProbeResult::Failure("only HTTP probes are supported".into());
        }
        let path = h.path.clone().unwrap_or_else(|| "/".into());
        let headers: Vec<(String, String)> = h
            .http_headers
            .iter()
            .flatten()
            .map(|x| (x.name.clone(), x.value.clone()))
            .collect();
        match tokio::time::timeout(
            timeout,
            http_get(SocketAddr::new(host, port), &path, &headers),
        )
        .await
        {
            Ok(Ok(code)) if (200..400).contains(&code) => ProbeResult::Success,
            Ok(Ok(code)) => {
                ProbeResult::Failure(format!("HTTP probe failed with statuscode: {code}"))
            }
            Ok(Err(e)) => ProbeResult::Failure(format!(
                "Get \"http://{}/{}\": {e}",
                SocketAddr::new(host, port),
                path.trim_start_matches('/')
            )),
            Err(_) => ProbeResult::Failure(format!(
                "Get \"http://{}/{}\": context deadline exceeded (Client.Timeout exceeded while awaiting headers)",
                SocketAddr::new(host, port),
                path.trim_start_matches('/')
            )),
        }
    } else if let Some(t) = &probe.tcp_socket {
        let port = match resolve_port(&t.port, container) {
            Ok(p) => p,
            Err(e) => return ProbeResult::Failure(e),
        };
        let host = t
            .host
            .as_deref()
            .and_then(|h| h.parse::<IpAddr>().ok())
            .unwrap_or(target.pod_ip);
        let addr = SocketAddr::new(host, port);
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(_)) => ProbeResult::Success,
            Ok(Err(e)) => ProbeResult::Failure(format!("dial tcp {addr}: {e}")),
            Err(_) => ProbeResult::Failure(format!("dial tcp {addr}: i/o timeout")),
        }
    } else if let Some(e) = &probe.exec {
        let cmd = e.command.clone().unwrap_or_default();
        if cmd.is_empty() {
            return ProbeResult::Failure("exec probe without a command".into());
        }
        exec_in(target.pid, &cmd, timeout).await
    } else {
        ProbeResult::Failure("probe has no handler (httpGet, tcpSocket or exec)".into())
    }
}

/// GET `path` from `addr`; returns the status code.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> std::io::Result<u16> {
    let mut s = TcpStream::connect(addr).await?;
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.37\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (k, v) in headers {
        if !k.contains(['\r', '\n']) && !v.contains(['\r', '\n']) {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 4096 {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "malformed HTTP response {:?}",
                    line.lines().next().unwrap_or("")
                ),
            )
        })?;
    Ok(code)
}

/// Runs `cmd` in the namespaces and root of process `pid` (bounded by `timeout`).
pub async fn exec_in(pid: u32, cmd: &[String], timeout: Duration) -> ProbeResult {
    let mut c = tokio::process::Command::new("nsenter");
    c.arg("-t")
        .arg(pid.to_string())
        .args(["-m", "-u", "-i", "-n", "-p", "-r", "-w", "--"])
        .args(cmd)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    match tokio::time::timeout(timeout, c.output()).await {
        Ok(Ok(out)) if out.status.success() => ProbeResult::Success,
        Ok(Ok(out)) => ProbeResult::Failure(format!(
            "command {cmd:?} exited with {}: {}",
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).trim()
        )),
        Ok(Err(e)) => ProbeResult::Failure(format!("cannot run nsenter: {e}")),
        Err(_) => ProbeResult::Failure(format!("command {cmd:?} timed out")),
    }
}

const UNKNOWN: u8 = 0;
const OK: u8 = 1;
const FAILED: u8 = 2;

/// A running prober; dropping it stops the task.
#[derive(Debug)]
pub struct Prober {
    state: Arc<AtomicU8>,
    last_message: Arc<std::sync::Mutex<String>>,
    task: JoinHandle<()>,
}

impl Prober {
    /// Starts probing. `initial` is the result before the first verdict (readiness:
    /// failure, liveness: success).
    pub fn start(
        probe: Probe,
        container: Container,
        target: ProbeTarget,
        initial_ok: bool,
        wake: Arc<Notify>,
    ) -> Prober {
        let state = Arc::new(AtomicU8::new(if initial_ok { OK } else { UNKNOWN }));
        let last_message = Arc::new(std::sync::Mutex::new(String::new()));
        let st = state.clone();
        let msg = last_message.clone();
        let task = tokio::spawn(async move {
            let delay = probe.initial_delay_seconds.unwrap_or(0).max(0) as u64;
            let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
            let success_threshold = probe.success_threshold.unwrap_or(1).max(1);
            let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1);
            tokio::time::sleep(Duration::from_secs(delay)).await;
            let (mut oks, mut fails) = (0, 0);
            loop {
                let r = run_once(&probe, &container, &target).await;
                let before = st.load(Ordering::SeqCst);
                match r {
                    ProbeResult::Success => {
                        oks += 1;
                        fails = 0;
                        if oks >= success_threshold {
                            st.store(OK, Ordering::SeqCst);
                        }
                    }
                    ProbeResult::Failure(m) => {
                        fails += 1;
                        oks = 0;
                        if let Ok(mut g) = msg.lock() {
                            *g = m;
                        }
                        if fails >= failure_threshold {
                            st.store(FAILED, Ordering::SeqCst);
                        }
                    }
                }
                if st.load(Ordering::SeqCst) != before {
                    wake.notify_one();
                }
                tokio::time::sleep(period).await;
            }
        });
        Prober {
            state,
            last_message,
            task,
        }
    }

    /// Success at the last verdict.
    pub fn ok(&self) -> bool {
        self.state.load(Ordering::SeqCst) == OK
    }

    /// Failed at the last verdict (failureThreshold consecutive failures).
    pub fn failed(&self) -> bool {
        self.state.load(Ordering::SeqCst) == FAILED
    }

    /// The last failure's message.
    pub fn message(&self) -> String {
        self.last_message
            .lock()
            .map(|g| g.clone())
            .unwrap_or_default()
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.task.abort();
    }
}
