//! A real etcd server for tests (storage conformance, apiserver and e2e tests).
//!
//! Runs Debian's `etcd` (package etcd-server, installed by `cargo xtask setup`) on free
//! 127.0.0.1 ports with a throw-away data dir. `stop`/`restart` keep the data dir and
//! ports, so tests can check durability and client reconnection. Drop kills the process
//! (by its pid) and removes the data dir.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long `start`/`restart` wait for etcd to answer /health.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

pub struct EtcdProcess {
    child: Option<Child>,
    binary: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
}

fn find_etcd() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("SKIFF_ETCD_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/local/bin")])
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .context("etcd not found: run cargo xtask setup")
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl EtcdProcess {
    /// Starts a single-member etcd on free ports and waits until it is healthy.
    pub fn start() -> anyhow::Result<Self> {
        let binary = find_etcd()?;
        let mut last_err = None;
        // A free port can be taken by someone else between probing and etcd's bind: retry.
        for _ in 0..3 {
            let mut etcd = Self {
                child: None,
                binary: binary.clone(),
                dir: tempfile::Builder::new()
                    .prefix("skiff-etcd-")
                    .tempdir()
                    .context("creating etcd data dir")?,
                client_port: free_port()?,
                peer_port: free_port()?,
            };
            if etcd.client_port == etcd.peer_port {
                continue;
            }
            match etcd.spawn() {
                Ok(()) => return Ok(etcd),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("could not pick ports for etcd")))
    }

    /// Client endpoint, e.g. `http://127.0.0.1:40123`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the server (SIGKILL to its pid) and waits for it; the data dir stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL also ends a paused (SIGSTOPped) process.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open but nothing answers, the way a
    /// hung or partitioned etcd looks to clients.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Undoes `pause` (SIGCONT).
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, sig: libc::c_int) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on the pid of our own child, which we have not reaped.
            unsafe {
                libc::kill(pid as libc::pid_t, sig);
            }
        }
    }

    /// Stops (if running) and starts again on the same ports and data dir.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn()
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening etcd log")?;
        let child = Command::new(&self.binary)
            .arg("--name=skiff-test")
            .arg(format!("--data-dir={}", self.data_dir().display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=skiff-test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=500")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        if let Err(e) = self.wait_ready() {
            self.stop();
            return Err(e.context(format!("etcd log:\n{}", self.log_tail())));
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("etcd exited during startup with {status}");
            }
            if healthy(addr) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("etcd did not become healthy on {addr} within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// GET /health over plain HTTP/1.0.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.contains("\"health\":\"true\"")
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
        // `dir` (TempDir) removes the data dir when it drops right after this.
    }
}
