//! The fixture shared by kubelet_e2e and the `pods` bench (included with #[path]):
//! processes stopped by pid, cleanup of what agents leave on the host, kubectl.
#![allow(dead_code)]

use std::{
    fs::{self, File},
    io::{Read, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use skiff_agent::cni::network::PodNetworks;
use skiff_agent::kubelet::{
    containerd_process::unmount_under,
    runtime::{cgroup_dirs, remove_cgroup_tree},
    test_images::{LocalRegistry, busybox_image},
};

pub const KUBECTL: &str = "/usr/bin/kubectl";

/// Target dir of this build (target/debug): the test executable is in target/debug/deps.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps")
        .to_path_buf()
}

pub fn binary(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: run `cargo build -p skiff-agent -p skiff-control --bins` before this test",
        p.display()
    );
    p
}

/// A process stopped by pid on drop (SIGTERM, then SIGKILL).
pub struct Proc {
    pub name: String,
    pub child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, dir: &Path, cmd: &mut Command) -> Proc {
        let stdout = dir.join(format!("{name}.stdout"));
        let stderr = dir.join(format!("{name}.stderr"));
        let child = cmd
            .env_remove("KUBECONFIG")
            .env(
                "RUST_LOG",
                std::env::var("SKIFF_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Proc {
            name: name.into(),
            child: Some(child),
            stdout,
            stderr,
        }
    }

    pub fn out(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn logs(&self) -> String {
        let tail = |p: &Path| {
            let t = fs::read_to_string(p).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(60)..].join("\n")
        };
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr (tail) ---\n{}",
            self.name,
            tail(&self.stdout),
            self.name,
            tail(&self.stderr)
        )
    }

    pub fn wait_stdout(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.out();
            if out.contains(needle) {
                return out;
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "{} exited with {st} before printing {needle:?}\n{}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not print {needle:?} within {timeout:?}\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(c.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Removes what the agents made outside the test directory: pod networks (from the
/// agents' IP allocation files), cgroups, and the test directory itself. Declared
/// first so it drops last.
pub struct Cleanup {
    pub dir: PathBuf,
    pub nodes: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // SKIFF_TEST_KEEP_LOGS=<dir>: keep the processes' logs.
        if let Some(keep) = std::env::var_os("SKIFF_TEST_KEEP_LOGS") {
            let keep = PathBuf::from(keep);
            let _ = fs::create_dir_all(&keep);
            for e in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.ends_with(".stdout") || n.ends_with(".stderr") {
                    let _ = fs::copy(e.path(), keep.join(&n));
                }
            }
        }
        for node in &self.nodes {
            let root = self.dir.join(node);
            if let Ok(nets) = PodNetworks::new(&root, std::net::Ipv4Addr::LOCALHOST) {
                for (_, uid) in nets.allocations() {
                    let _ = nets.teardown(&uid);
                }
            }
            let _ = remove_cgroup_tree(&format!("/skiff/{node}"));
        }
        for d in cgroup_dirs("/skiff") {
            let _ = fs::remove_dir(d);
        }
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd`, killing it (by pid) after `timeout`.
pub fn run_bounded(mut cmd: Command, input: Option<&str>, timeout: Duration) -> Output {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.stdin(if input.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {desc}: {e}"));
    if let Some(input) = input {
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_string();
        std::thread::spawn(move || {
            let _ = stdin.write_all(input.as_bytes());
        });
    }
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
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
        if let Some(s) = child.try_wait().expect("try_wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

#[derive(Clone)]
pub struct Cluster {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub fn new(dir: &Path, kubeconfig: &Path) -> Cluster {
        Cluster {
            dir: dir.to_path_buf(),
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    pub fn kubectl_out(&self, args: &[&str], input: Option<&str>) -> Output {
        let mut cmd = Command::new(KUBECTL);
        cmd.arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.join("kubecache"))
            .env_remove("KUBECONFIG")
            .args(args);
        run_bounded(cmd, input, Duration::from_secs(60))
    }

    #[track_caller]
    pub fn kubectl(&self, args: &[&str]) -> String {
        let o = self.kubectl_out(args, None);
        assert!(
            o.status.success(),
            "kubectl {}: {}\n{}{}",
            args.join(" "),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    #[track_caller]
    pub fn apply(&self, manifest: &str) {
        let o = self.kubectl_out(&["apply", "-f", "-"], Some(manifest));
        assert!(
            o.status.success(),
            "kubectl apply: {}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {a:?}: bad JSON ({e}):\n{out}"))
    }

    pub fn items(&self, args: &[&str]) -> Vec<Value> {
        self.json(args)["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

/// A pod (as JSON) that is Running and Ready and not being deleted.
pub fn is_ready(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The containerd id of a pod's first container (empty before it has one).
pub fn container_id(p: &Value) -> String {
    p["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("containerd://")
        .to_string()
}

pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
pub mod net_cluster;

/// Starts skiff-apiserver on `bind` (any free port) with its data under `dir/api`; the
/// process and the admin kubeconfig it wrote.
pub fn start_apiserver(
    dir: &Path,
    bind: &str,
    bin: impl AsRef<std::ffi::OsStr>,
) -> (Proc, PathBuf) {
    let mut apiserver = Proc::spawn(
        "apiserver",
        dir,
        Command::new(bin)
            .arg("--data-dir")
            .arg(dir.join("api"))
            .args(["--bind-address", bind, "--secure-port", "0"]),
    );
    let out = apiserver.wait_stdout("kubeconfig: ", Duration::from_secs(30));
    let kubeconfig = PathBuf::from(
        out.lines()
            .find_map(|l| l.strip_prefix("kubeconfig: "))
            .expect("kubeconfig line")
            .trim(),
    );
    (apiserver, kubeconfig)
}

/// A fresh `/tmp/<prefix>-<pid>` (an old one removed first) and the guard that removes it
/// and what the agents of `nodes` left on the host; bind the guard to a named variable.
pub fn test_dir(prefix: &str, nodes: Vec<String>) -> (PathBuf, Cleanup) {
    let dir = PathBuf::from(format!("/tmp/{prefix}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let cleanup = Cleanup {
        dir: dir.clone(),
        nodes,
    };
    (dir, cleanup)
}

/// The multi-thread tokio runtime (two workers) the tests drive async code with.
pub fn tokio_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Pushes the busybox image to `registry` as `skiff/busybox:1.0`; its reference.
pub fn push_busybox(rt: &tokio::runtime::Runtime, registry: &LocalRegistry) -> String {
    let image = registry.image_ref("skiff/busybox:1.0");
    rt.block_on(busybox_image().expect("busybox image").push(&image))
        .expect("push busybox");
    image
}

/// Starts a control-plane component (`--kubeconfig`, `--identity <name>`, then `extra`).
pub fn spawn_component(
    name: &str,
    dir: &Path,
    bin: &Path,
    kubeconfig: &Path,
    extra: &[&str],
) -> Proc {
    Proc::spawn(
        name,
        dir,
        Command::new(bin)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--identity", name])
            .args(extra),
    )
}

/// The start of a skiff-agent command line: node name, kubeconfig, containerd socket
/// and root dir `dir/<node>`; the caller adds the rest.
pub fn agent_command(
    agent_bin: &Path,
    node: &str,
    kubeconfig: &Path,
    containerd_socket: &Path,
    dir: &Path,
) -> Command {
    let mut cmd = Command::new(agent_bin);
    cmd.args(["--node-name", node])
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--containerd-address")
        .arg(containerd_socket)
        .arg("--root-dir")
        .arg(dir.join(node));
    cmd
}

/// Fails unless running as root with every file in `tools` present (`what`: "the pods
/// bench", ...).
pub fn require_root_and(what: &str, tools: &[&str]) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "{what} needs root (CI runs as root)"
    );
    for bin in tools {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: run `cargo xtask setup`"
        );
    }
}

/// The target directory (target/): the executable runs from target/<profile>/deps/;
/// otherwise the workspace's target/.
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| {
            let deps = exe.parent()?;
            (deps.file_name()? == "deps").then(|| deps.parent()?.parent().map(Path::to_path_buf))?
        })
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}
