//! Test fixture: a real `skiff-apiserver` process (embedded or etcd storage) in a temp dir,
//! with helpers to drive it through kubectl, kube-rs and raw HTTPS.
//!
//! Every wait is bounded; every process is stopped by its pid (Drop included).
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use skiff_control::storage::etcd_process::EtcdProcess;

pub mod cluster;

/// How long the apiserver may take to print its two startup lines.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound for one kubectl invocation.
pub const KUBECTL_TIMEOUT: Duration = Duration::from_secs(60);
/// Static bearer token accepted by every fixture apiserver (written to --token-auth-file).
pub const TEST_TOKEN: &str = "skiff-e2e-token-0123456789";

pub const SYSTEM_KUBECTL: &str = "/usr/bin/kubectl";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Embedded,
    Etcd,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::Etcd => "etcd",
        }
    }
}

/// Which kubectl binary a test drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kubectl {
    /// /usr/bin/kubectl
    System,
    /// The newest kubectl (SKIFF_KUBECTL_LATEST or /opt/skiff/kubectl-latest).
    Latest,
}

impl Kubectl {
    pub fn path(self) -> PathBuf {
        match self {
            Kubectl::System => PathBuf::from(SYSTEM_KUBECTL),
            Kubectl::Latest => latest_kubectl(),
        }
    }
}

/// The newest kubectl: $SKIFF_KUBECTL_LATEST (set by `cargo xtask test`), else
/// /opt/skiff/kubectl-latest (the binary itself or a directory holding `kubectl`).
pub fn latest_kubectl() -> PathBuf {
    if let Some(p) = std::env::var_os("SKIFF_KUBECTL_LATEST").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "SKIFF_KUBECTL_LATEST={} is not a file: run cargo xtask setup",
            p.display()
        );
        return p;
    }
    let base = PathBuf::from("/opt/skiff/kubectl-latest");
    for candidate in [base.clone(), base.join("kubectl"), base.join("bin/kubectl")] {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the newest kubectl was not found (SKIFF_KUBECTL_LATEST unset, nothing at {}): run cargo xtask setup",
        base.display()
    );
}

/// A running apiserver. Drop kills it (and its etcd) by pid.
pub struct ApiServer {
    pub backend: Backend,
    dir: tempfile::TempDir,
    etcd: Option<EtcdProcess>,
    child: Option<Child>,
    /// How many times the process was started (names the log files).
    generation: u32,
    pub port: u16,
    /// https://127.0.0.1:PORT
    pub url: String,
    pub kubeconfig: PathBuf,
}

impl ApiServer {
    pub fn start(backend: Backend) -> ApiServer {
        let dir = tempfile::Builder::new()
            .prefix(&format!("skiff-e2e-{}-", backend.name()))
            .tempdir()
            .expect("creating temp dir");
        std::fs::write(
            dir.path().join("tokens.csv"),
            format!("{TEST_TOKEN},e2e-admin,e2e-admin-uid,\"system:masters\"\n"),
        )
        .expect("writing token file");
        let etcd = match backend {
            Backend::Embedded => None,
            Backend::Etcd => {
                Some(EtcdProcess::start().unwrap_or_else(|e| panic!("starting etcd: {e:#}")))
            }
        };
        let mut server = ApiServer {
            backend,
            dir,
            etcd,
            child: None,
            generation: 0,
            port: 0,
            url: String::new(),
            kubeconfig: PathBuf::new(),
        };
        server.spawn(0);
        server
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn etcd(&mut self) -> &mut EtcdProcess {
        self.etcd
            .as_mut()
            .expect("this apiserver runs on the embedded store, not etcd")
    }

    fn log_paths(&self, generation: u32) -> (PathBuf, PathBuf) {
        (
            self.dir
                .path()
                .join(format!("apiserver.{generation}.stdout")),
            self.dir
                .path()
                .join(format!("apiserver.{generation}.stderr")),
        )
    }

    /// The logs of the current process (for failure messages).
    pub fn logs(&self) -> String {
        let (out, err) = self.log_paths(self.generation);
        let tail = |p: &Path| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- apiserver stdout (tail) ---\n{}\n--- apiserver stderr (tail) ---\n{}",
            tail(&out),
            tail(&err)
        )
    }

    /// Starts the binary on `port` (0: any) and waits for its two startup lines.
    fn spawn(&mut self, port: u16) {
        match self.try_spawn(port) {
            Ok(()) => {}
            // The old port may have been taken in between: any port will do.
            Err(msg) if port != 0 && msg.contains("binding") => {
                self.try_spawn(0).unwrap_or_else(|m| panic!("{m}"));
            }
            Err(msg) => panic!("{msg}"),
        }
    }

    fn try_spawn(&mut self, port: u16) -> Result<(), String> {
        self.generation += 1;
        let (out_path, err_path) = self.log_paths(self.generation);
        let out = File::create(&out_path).expect("creating stdout log");
        let err = File::create(&err_path).expect("creating stderr log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skiff-apiserver"));
        cmd.arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "--bind-address",
                "127.0.0.1",
                "--secure-port",
                &port.to_string(),
            ])
            .arg("--token-auth-file")
            .arg(self.dir.path().join("tokens.csv"))
            .env(
                "RUST_LOG",
                std::env::var("SKIFF_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some(etcd) = &self.etcd {
            cmd.arg("--etcd-servers").arg(etcd.endpoint());
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("spawning skiff-apiserver: {e}"))?;
        let deadline = Instant::now() + START_TIMEOUT;
        let read_all = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        loop {
            let stdout = read_all(&out_path);
            let listening = stdout
                .lines()
                .find_map(|l| l.strip_prefix("skiff-apiserver listening on "))
                .map(str::to_string);
            let kubeconfig = stdout
                .lines()
                .find_map(|l| l.strip_prefix("kubeconfig: "))
                .map(|s| PathBuf::from(s.trim()));
            if let (Some(listening), Some(kubeconfig)) = (listening, kubeconfig) {
                // "https://127.0.0.1:PORT (storage: embedded|etcd)"
                let (url, storage) = listening
                    .split_once(' ')
                    .ok_or_else(|| format!("unexpected startup line {listening:?}"))?;
                let want = format!("(storage: {})", self.backend.name());
                if storage.trim() != want {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("apiserver reports {storage:?}, expected {want:?}"));
                }
                let port: u16 = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .ok_or_else(|| format!("no port in {url:?}"))?;
                self.child = Some(child);
                self.port = port;
                self.url = url.to_string();
                self.kubeconfig = kubeconfig;
                assert!(
                    self.kubeconfig.is_file(),
                    "kubeconfig {} does not exist",
                    self.kubeconfig.display()
                );
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "skiff-apiserver ({} storage, port {port}) exited during startup with {status}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.backend.name(),
                    stdout,
                    read_all(&err_path)
                ));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "skiff-apiserver did not print its startup lines within {START_TIMEOUT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    stdout,
                    read_all(&err_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process (SIGKILL by pid: no graceful shutdown, so only durably
    /// acknowledged writes survive).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the apiserver and starts it again on the same data dir (and etcd), on the
    /// same port when it is still free. Re-reads the kubeconfig.
    pub fn restart(&mut self) {
        let port = self.port;
        self.kill();
        self.spawn(port);
    }

    /// Like `restart`, but on a different port (clients must re-read the kubeconfig).
    pub fn restart_on_new_port(&mut self) {
        let old = self.port;
        self.kill();
        // Hold the old port so the new process cannot get it again.
        let _hold = std::net::TcpListener::bind(("127.0.0.1", old));
        self.spawn(0);
    }

    // ---- kubectl ----

    fn kubectl_command(&self, which: Kubectl) -> Command {
        let mut cmd = Command::new(which.path());
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join(format!("kubecache-{which:?}")))
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs /usr/bin/kubectl with this server's kubeconfig (bounded by KUBECTL_TIMEOUT).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_with(Kubectl::System, args)
    }

    /// Runs the newest kubectl (see `latest_kubectl`).
    pub fn kubectl_latest(&self, args: &[&str]) -> Output {
        self.kubectl_with(Kubectl::Latest, args)
    }

    pub fn kubectl_with(&self, which: Kubectl, args: &[&str]) -> Output {
        let mut cmd = self.kubectl_command(which);
        cmd.args(args);
        run_bounded(cmd, None, KUBECTL_TIMEOUT)
    }

    /// kubectl with `input` on stdin (e.g. `apply -f -`).
    pub fn kubectl_stdin(&self, which: Kubectl, args: &[&str], input: &str) -> Output {
        let mut cmd = self.kubectl_command(which);
        cmd.args(args);
        run_bounded(cmd, Some(input.as_bytes().to_vec()), KUBECTL_TIMEOUT)
    }

    /// Starts a long-running kubectl (e.g. `get -w`) whose output is collected in the
    /// background. Stop it with `BackgroundCommand::stop` (or drop it).
    pub fn kubectl_spawn(&self, which: Kubectl, args: &[&str]) -> BackgroundCommand {
        let mut cmd = self.kubectl_command(which);
        cmd.args(args);
        BackgroundCommand::spawn(cmd)
    }

    /// Writes `contents` to a file in the fixture's temp dir.
    pub fn write_file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).expect("writing test file");
        p
    }

    // ---- HTTPS ----

    fn kubeconfig_value(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(&self.kubeconfig).expect("reading kubeconfig");
        serde_yaml::from_str(&text).expect("parsing kubeconfig")
    }

    fn kubeconfig_pem(&self, section: &str, inner: &str, field: &str) -> Vec<u8> {
        let v = self.kubeconfig_value();
        let b64 = v[section][0][inner][field]
            .as_str()
            .unwrap_or_else(|| panic!("kubeconfig has no {section}[0].{inner}.{field}"));
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .expect("kubeconfig base64")
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        self.kubeconfig_pem("clusters", "cluster", "certificate-authority-data")
    }

    fn client_builder(&self) -> reqwest::ClientBuilder {
        let ca = reqwest::Certificate::from_pem(&self.ca_pem()).expect("CA certificate");
        reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
    }

    /// HTTPS client authenticated with the admin client certificate from the kubeconfig.
    pub fn http(&self) -> reqwest::Client {
        let mut pem = self.kubeconfig_pem("users", "user", "client-certificate-data");
        pem.push(b'\n');
        pem.extend(self.kubeconfig_pem("users", "user", "client-key-data"));
        let id = reqwest::Identity::from_pem(&pem).expect("client identity from kubeconfig");
        self.client_builder()
            .identity(id)
            .build()
            .expect("reqwest client")
    }

    /// HTTPS client that presents no credentials (trusts the CA only).
    pub fn http_anonymous(&self) -> reqwest::Client {
        self.client_builder().build().expect("reqwest client")
    }

    /// HTTPS client that sends `Authorization: Bearer TEST_TOKEN`.
    pub fn http_token(&self) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {TEST_TOKEN}").parse().unwrap(),
        );
        self.client_builder()
            .default_headers(headers)
            .build()
            .expect("reqwest client")
    }

    /// kube-rs client from the admin kubeconfig.
    pub async fn kube_client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("reading kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kube config from kubeconfig");
        kube::Client::try_from(config).expect("kube client")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.kill();
        // EtcdProcess' own Drop stops etcd; TempDir removes the files.
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

// ---- processes ----

/// A control-plane component process (skiff-controller-manager, skiff-scheduler) with
/// short leader-election timings; Drop kills it by pid.
pub struct Component {
    pub child: Option<Child>,
    pub identity: String,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// Short leases so the failover test takes seconds, not the default 15 s.
pub const LEASE: u64 = 6;
pub const RENEW: u64 = 4;
pub const RETRY: u64 = 1;

impl Component {
    pub fn controller_manager(s: &ApiServer, identity: &str) -> Component {
        Self::start(
            s,
            env!("CARGO_BIN_EXE_skiff-controller-manager"),
            identity,
            &[],
        )
    }

    pub fn scheduler(s: &ApiServer, identity: &str) -> Component {
        Self::start(s, env!("CARGO_BIN_EXE_skiff-scheduler"), identity, &[])
    }

    pub fn start(s: &ApiServer, binary: &str, identity: &str, extra: &[&str]) -> Component {
        let stdout = s.dir().join(format!("{identity}.stdout"));
        let stderr = s.dir().join(format!("{identity}.stderr"));
        let child = Command::new(binary)
            .arg("--kubeconfig")
            .arg(&s.kubeconfig)
            .args(["--identity", identity])
            .args(["--lease-duration", &LEASE.to_string()])
            .args(["--renew-deadline", &RENEW.to_string()])
            .args(["--retry-period", &RETRY.to_string()])
            .args(extra)
            .env_remove("KUBECONFIG")
            .env(
                "RUST_LOG",
                std::env::var("SKIFF_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("cm stdout"))
            .stderr(File::create(&stderr).expect("cm stderr"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {binary}: {e}"));
        Component {
            child: Some(child),
            identity: identity.into(),
            stdout,
            stderr,
        }
    }

    pub fn is_leader(&self) -> bool {
        std::fs::read_to_string(&self.stdout)
            .unwrap_or_default()
            .contains("is the leader")
    }

    /// Whether the component's log (stderr) has a line containing `text`.
    pub fn logged(&self, text: &str) -> bool {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .contains(text)
    }

    pub fn wait_leader(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.is_leader() {
            assert!(
                Instant::now() < deadline,
                "{} did not become leader within {timeout:?}\n{}",
                self.identity,
                self.logs()
            );
            // Short: the scheduler bench times phases from this moment.
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn logs(&self) -> String {
        let tail = |p: &PathBuf| {
            let t = std::fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.identity,
            tail(&self.stdout),
            self.identity,
            tail(&self.stderr)
        )
    }

    /// Waits (bounded) for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{} still running after {timeout:?}\n{}",
                self.identity,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL by pid: no graceful release, the Lease must expire.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to completion, killing it (by pid) after `timeout`.
pub fn run_bounded(mut cmd: Command, input: Option<Vec<u8>>, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    if input.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for child") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = t_out.join().unwrap_or_default();
            let stderr = t_err.join().unwrap_or_default();
            panic!(
                "{desc} did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&stdout),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// A process whose stdout/stderr are collected while it runs.
pub struct BackgroundCommand {
    child: Option<Child>,
    pub stdout: Arc<Mutex<String>>,
    pub stderr: Arc<Mutex<String>>,
    desc: String,
}

impl BackgroundCommand {
    pub fn spawn(mut cmd: Command) -> Self {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let desc = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
        let stdout = Arc::new(Mutex::new(String::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let pump = |r: Box<dyn Read + Send>, sink: Arc<Mutex<String>>| {
            std::thread::spawn(move || {
                let mut r = BufReader::new(r);
                let mut line = String::new();
                while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                    sink.lock().unwrap().push_str(&line);
                    line.clear();
                }
            });
        };
        pump(Box::new(child.stdout.take().unwrap()), stdout.clone());
        pump(Box::new(child.stderr.take().unwrap()), stderr.clone());
        BackgroundCommand {
            child: Some(child),
            stdout,
            stderr,
            desc,
        }
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded) until stdout satisfies `pred`; panics with the output otherwise.
    pub fn wait_for_stdout(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.stdout();
            if pred(&out) {
                return out;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                // Let the pumps catch up with the last output.
                std::thread::sleep(Duration::from_millis(100));
                let out = self.stdout();
                if pred(&out) {
                    return out;
                }
                let err = self.stderr();
                self.stop();
                panic!(
                    "waiting for {what}: {}\n{}\nstdout:\n{out}\nstderr:\n{err}",
                    match exited {
                        Some(s) => format!("process exited with {s}"),
                        None => format!("not seen within {timeout:?}"),
                    },
                    self.desc
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Kills the process by pid.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for BackgroundCommand {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---- assertions ----

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the command succeeded; returns its stdout.
#[track_caller]
pub fn assert_success(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: expected success, got {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

/// Asserts the command failed; returns its stderr.
#[track_caller]
pub fn assert_failure(o: &Output, what: &str) -> String {
    assert!(
        !o.status.success(),
        "{what}: expected a non-zero exit code, got success\nstdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    stderr(o)
}

/// Asserts `haystack` contains every needle (case-sensitive).
#[track_caller]
pub fn assert_contains_all(haystack: &str, needles: &[&str], what: &str) {
    let missing: Vec<&&str> = needles.iter().filter(|n| !haystack.contains(**n)).collect();
    assert!(
        missing.is_empty(),
        "{what}: missing {missing:?} in:\n{haystack}"
    );
}

/// Polls `f` until it returns Some, at most `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
