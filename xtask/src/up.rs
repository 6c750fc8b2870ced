//! `cargo xtask up`: the main job. Installs what is missing, starts the control plane
//! (apiserver on the embedded store, or on a local etcd with `--etcd`) in the
//! background, then a local containerd (.skiff/containerd), the image registry with the
//! sample images (`cargo xtask images`) and three real nodes (skiff-agent node-1..3,
//! each with its own containerd namespace, cgroup parent /skiff/node-N and pod netns),
//! applies the sample workload, waits until its pods run and prints how to use kubectl.
//! Everything it starts is recorded under .skiff/ so `cargo xtask down` can stop it by pid.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{setup, util};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep cluster state in a local etcd (Debian etcd-server) instead of the embedded store.
    #[arg(long)]
    pub etcd: bool,
    /// HTTPS port of the apiserver.
    #[arg(long, default_value_t = 6443)]
    pub port: u16,
    /// Do not apply manifests/sample-app.yaml.
    #[arg(long)]
    pub no_sample: bool,
    /// Real nodes: skiff-agent processes node-1..N on one local containerd.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Hollow nodes to register as well (kubemark-style: the API behaviour of a kubelet,
    /// no containers).
    #[arg(long, default_value_t = 0)]
    pub hollow_nodes: usize,
}

/// Where the sample manifest and the agents pull from (`cargo xtask images` fills it).
const REGISTRY: &str = crate::images::REGISTRY;
/// How long `up` waits for the nodes to be Ready and for the sample pods to run.
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(60);
const SAMPLE_RUNNING_TIMEOUT: Duration = Duration::from_secs(120);

/// containerd's directory under .skiff (config, root, state, socket).
pub fn containerd_dir() -> PathBuf {
    state_dir().join("containerd")
}

/// The socket of `up`'s containerd.
pub fn containerd_socket() -> PathBuf {
    containerd_dir().join("containerd.sock")
}

/// The name (pid file, log) of node `n`'s agent.
pub fn agent_name(n: usize) -> String {
    format!("agent-node-{n}")
}

/// Where `up` keeps state, logs and pid files (removed by `down`).
pub fn state_dir() -> PathBuf {
    util::root().join(".skiff")
}

fn pid_file(name: &str) -> PathBuf {
    state_dir().join(format!("{name}.pid"))
}

/// The pid recorded for `name`, if that process is still alive.
pub fn running_pid(name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(name))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    is_live(pid).then_some(pid)
}

/// The process exists and is not a zombie (the daemons' parent, `up`, is gone, so they
/// may linger unreaped under a subreaper).
pub fn is_live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Starts `cmd` detached (own process group, output to a log) and records its pid.
pub fn spawn_daemon(name: &str, cmd: &mut Command) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = state_dir().join(format!("{name}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    std::fs::write(pid_file(name), child.id().to_string())?;
    Ok(child.id())
}

/// Waits (bounded) until `name`'s log contains `needle`; fails with the log's tail.
fn wait_for_log(name: &str, pid: u32, needle: &str, timeout: Duration) -> Result<String> {
    let log = state_dir().join(format!("{name}.log"));
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if !Path::new(&format!("/proc/{pid}")).exists() || start.elapsed() > timeout {
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{name} did not start (see {}):\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(args: &Args) -> Result<()> {
    setup::run(&setup::Args {
        refresh_kubectl: false,
    })?;
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    if let Some(pid) = running_pid("apiserver") {
        println!(
            "[up] the control plane is already running (apiserver pid {pid}); `cargo xtask down` stops it"
        );
        print_usage(&dir.join("control/admin.kubeconfig"));
        return Ok(());
    }

    println!("[up] building the control plane and the node agent");
    let mut build = util::cargo();
    build.args([
        "build",
        "--quiet",
        "-p",
        "skiff-control",
        "--bin",
        "skiff-apiserver",
        "--bin",
        "skiff-controller-manager",
        "--bin",
        "skiff-scheduler",
        "--bin",
        "skiff-hollow-nodes",
    ]);
    if args.nodes > 0 {
        build.args(["-p", "skiff-agent", "--bin", "skiff-agent"]);
    }
    util::run_cmd("cargo build", &mut build)?;
    let bin = util::root().join("target/debug/skiff-apiserver");

    let mut apiserver = Command::new(&bin);
    apiserver
        .args(["--data-dir"])
        .arg(dir.join("control"))
        .args([
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            &args.port.to_string(),
        ]);
    if args.etcd {
        let endpoint = start_etcd(&dir)?;
        apiserver.args(["--etcd-servers", &endpoint]);
    }
    println!(
        "[up] starting the apiserver on https://127.0.0.1:{}",
        args.port
    );
    let pid = spawn_daemon("apiserver", &mut apiserver)?;
    let log = wait_for_log("apiserver", pid, "kubeconfig: ", Duration::from_secs(60))?;
    let kubeconfig = log
        .lines()
        .find_map(|l| l.strip_prefix("kubeconfig: "))
        .map(PathBuf::from)
        .context("apiserver log has no kubeconfig line")?;

    // The controller-manager and scheduler exit when they lose their Lease (e.g. the
    // apiserver restarted); a small shell loop is each one's supervisor. `down` stops
    // the whole process group.
    for component in ["controller-manager", "scheduler"] {
        println!("[up] starting the {component}");
        let bin = util::root().join(format!("target/debug/skiff-{component}"));
        spawn_daemon(
            component,
            Command::new("sh").args([
                "-c",
                "while :; do \"$0\" --kubeconfig \"$1\"; sleep 1; done",
                &bin.to_string_lossy(),
                &kubeconfig.to_string_lossy(),
            ]),
        )?;
    }
    if args.hollow_nodes > 0 {
        println!(
            "[up] registering {} hollow nodes (no containers run on them)",
            args.hollow_nodes
        );
        let pid = spawn_daemon(
            "hollow-nodes",
            Command::new(util::root().join("target/debug/skiff-hollow-nodes"))
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["--count", &args.hollow_nodes.to_string()]),
        )?;
        wait_for_log("hollow-nodes", pid, "running", Duration::from_secs(60))?;
    }
    if args.nodes > 0 {
        start_containerd()?;
        crate::images::run(&crate::images::Args {
            tag: "latest".into(),
        })?;
        start_agents(&kubeconfig, args.nodes)?;
    }

    if !args.no_sample {
        let manifest = util::root().join("manifests/sample-app.yaml");
        println!("[up] applying {}", manifest.display());
        util::run_cmd(
            "kubectl apply",
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["apply", "-f"])
                .arg(&manifest),
        )?;
        if args.nodes + args.hollow_nodes > 0 {
            wait_sample_running(&kubeconfig)?;
        }
    }
    println!();
    let _ = util::run_cmd(
        "kubectl get",
        kubectl(&kubeconfig).args(["get", "nodes,pods", "-A", "-o", "wide"]),
    );
    print_usage(&kubeconfig);
    Ok(())
}

/// `kubectl --kubeconfig <kubeconfig> --request-timeout=10s`.
pub fn kubectl(kubeconfig: &Path) -> Command {
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--request-timeout=10s");
    cmd
}

/// containerd's config: the one skiff-agent's ContainerdProcess fixture writes
/// (node-agent/src/kubelet/containerd_process.rs): no CRI plugin, overlayfs.
fn containerd_config(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"# Written by `cargo xtask up` (as node-agent/src/kubelet/containerd_process.rs).
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.service.v1.diff-service"]
  default = ["walking"]
"#
    )
}

/// Starts containerd with its own root, state and socket under .skiff/containerd
/// unless it already runs; returns once the socket accepts connections.
fn start_containerd() -> Result<()> {
    let socket = containerd_socket();
    if running_pid("containerd").is_some() {
        return Ok(());
    }
    let dir = containerd_dir();
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.toml");
    std::fs::write(&config, containerd_config(&dir))?;
    let _ = std::fs::remove_file(&socket);
    println!("[up] starting containerd ({})", socket.display());
    let pid = spawn_daemon(
        "containerd",
        Command::new("/usr/bin/containerd")
            .arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&socket)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state")),
    )?;
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        if !Path::new(&format!("/proc/{pid}")).exists() || start.elapsed() > Duration::from_secs(30)
        {
            let log =
                std::fs::read_to_string(state_dir().join("containerd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!("containerd did not start:\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// Starts skiff-agent node-1..n (each under a restart loop like the controller-manager)
/// and waits until their Nodes are Ready.
fn start_agents(kubeconfig: &Path, n: usize) -> Result<()> {
    let bin = util::root().join("target/debug/skiff-agent");
    let socket = containerd_socket();
    let mut names = Vec::new();
    for i in 1..=n {
        let node = format!("node-{i}");
        let name = agent_name(i);
        names.push(node.clone());
        if running_pid(&name).is_some() {
            continue;
        }
        let root = state_dir().join("agent").join(&node);
        std::fs::create_dir_all(&root)?;
        println!("[up] starting skiff-agent {node}");
        spawn_daemon(
            &name,
            Command::new("sh")
                .args([
                    "-c",
                    "while :; do \"$0\" --node-name \"$1\" --kubeconfig \"$2\" \
                     --containerd-address \"$3\" --root-dir \"$4\" --insecure-registry \"$5\" \
                     --port \"$6\"; \
                     sleep 1; done",
                    &bin.to_string_lossy(),
                    &node,
                    &kubeconfig.to_string_lossy(),
                    &socket.to_string_lossy(),
                    &root.to_string_lossy(),
                    REGISTRY,
                    // Every node has the IP 127.0.0.1: one kubelet API port each.
                    &(10249 + i).to_string(),
                ])
                .env_remove("KUBECONFIG")
                .env("NO_COLOR", "1"),
        )?;
    }
    println!("[up] waiting for {} to be Ready", names.join(", "));
    let start = Instant::now();
    loop {
        let out = util::output(kubectl(kubeconfig).args([
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}"#,
        ]))
        .unwrap_or_default();
        let ready: Vec<&str> = out
            .lines()
            .filter_map(|l| l.strip_suffix("=True"))
            .collect();
        if names.iter().all(|n| ready.contains(&n.as_str())) {
            return Ok(());
        }
        if start.elapsed() > NODES_READY_TIMEOUT {
            bail!(
                "nodes not Ready after {NODES_READY_TIMEOUT:?} (see .skiff/agent-node-*.log):\n{out}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Waits (bounded) until the demo namespace has as many Running pods as its
/// Deployments want, and all its pods are Running.
fn wait_sample_running(kubeconfig: &Path) -> Result<()> {
    println!("[up] waiting for the sample pods to run");
    let start = Instant::now();
    loop {
        let want: usize = util::output(kubectl(kubeconfig).args([
            "get",
            "deployments",
            "-n",
            "demo",
            "-o",
            r#"jsonpath={range .items[*]}{.spec.replicas}{"\n"}{end}"#,
        ]))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse::<usize>().ok())
        .sum();
        let phases = util::output(kubectl(kubeconfig).args([
            "get",
            "pods",
            "-n",
            "demo",
            "-o",
            r#"jsonpath={range .items[*]}{.status.phase}{"\n"}{end}"#,
        ]))
        .unwrap_or_default();
        let phases: Vec<&str> = phases.lines().filter(|l| !l.is_empty()).collect();
        if want > 0 && phases.len() == want && phases.iter().all(|p| *p == "Running") {
            return Ok(());
        }
        if start.elapsed() > SAMPLE_RUNNING_TIMEOUT {
            let _ = util::run_cmd(
                "kubectl get",
                kubectl(kubeconfig).args(["get", "pods", "-n", "demo", "-o", "wide"]),
            );
            bail!(
                "the sample pods are not Running after {SAMPLE_RUNNING_TIMEOUT:?} \
                 (see `kubectl describe pods -n demo` and .skiff/agent-node-*.log)"
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn start_etcd(dir: &Path) -> Result<String> {
    const CLIENT: &str = "http://127.0.0.1:23790";
    if running_pid("etcd").is_some() {
        return Ok(CLIENT.into());
    }
    println!("[up] starting etcd on {CLIENT}");
    let pid = spawn_daemon(
        "etcd",
        Command::new("etcd")
            .args(["--name", "skiff", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                CLIENT,
                "--advertise-client-urls",
                CLIENT,
                "--listen-peer-urls",
                "http://127.0.0.1:23800",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:23800",
                "--initial-cluster",
                "skiff=http://127.0.0.1:23800",
            ]),
    )?;
    wait_for_log(
        "etcd",
        pid,
        "ready to serve client requests",
        Duration::from_secs(30),
    )?;
    Ok(CLIENT.into())
}

fn print_usage(kubeconfig: &Path) {
    println!();
    println!("skiff control plane is up. Use it with the real kubectl:");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get namespaces");
    println!("  kubectl get nodes,pods -A -o wide");
    println!("  kubectl get all -n demo");
    println!(
        "  curl http://<pod IP>:8080/hello    # the echo server answers \"<pod name> /hello\""
    );
    println!("  kubectl logs -n demo deployment/echo");
    println!(
        "Images: {REGISTRY}/skiff/echo:latest and skiff/busybox:latest (rebuild: cargo xtask images)."
    );
    println!("Logs: .skiff/*.log. Stop everything with: cargo xtask down");
}
