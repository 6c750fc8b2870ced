//! `cargo xtask up`: the main job. Installs what is missing, builds the test network
//! (bridge skiff0 with the host on 10.90.0.1/24, one network namespace sknode-node-N per
//! node on it with the node IP 10.90.0.(10+N); nothing routes out of it), starts the
//! control plane (apiserver on 10.90.0.1:6443 on the embedded store, or on a local etcd
//! with `--etcd`) in the background, then a local containerd (.skiff/containerd), the
//! image registry on 10.90.0.1:5000 with the sample images (`cargo xtask images`) and
//! three real nodes (skiff-agent node-1..3, each inside its node netns with its own
//! containerd namespace, cgroup parent /skiff/node-N, pod netns and pinned maps under
//! /sys/fs/bpf/skiff/node-N). Once the Nodes are Ready it routes each node's podCIDR
//! from the host to the node IP, applies the sample workload, waits until its pods run
//! and prints how to use kubectl. Everything it starts is recorded under .skiff/ (pids,
//! and .skiff/topology for the network) so `cargo xtask down` can remove it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use skiff_testbed::{Topology, TopologyConfig};

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
    /// Real nodes: skiff-agent node-1..N, each in its network namespace sknode-node-N
    /// (node IP 10.90.0.(10+N)) on the bridge skiff0, all on one local containerd.
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// The agents' pod network: `ebpf` (eBPF data path) or `host-routes`.
    #[arg(long, default_value = "ebpf", value_parser = ["ebpf", "host-routes"])]
    pub pod_network: String,
    /// Hollow nodes to register as well (kubemark-style: the API behaviour of a kubelet,
    /// no containers).
    #[arg(long, default_value_t = 0)]
    pub hollow_nodes: usize,
}

/// Where the sample manifest and the agents pull from (`cargo xtask images` fills it).
const REGISTRY: &str = crate::images::REGISTRY;
/// How long `up` waits for the nodes to be Ready, for their podCIDRs and for the sample
/// pods to run.
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(90);
const POD_CIDR_TIMEOUT: Duration = Duration::from_secs(30);
const SAMPLE_RUNNING_TIMEOUT: Duration = Duration::from_secs(120);
/// The kubelet API port (every node has its own IP).
const KUBELET_PORT: u16 = 10250;
/// Node N's pinned maps live in `<BPFFS_ROOT>/node-N`.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/skiff";

/// The local cluster's test network: bridge skiff0, host 10.90.0.1/24, netns sknode-<node>.
pub fn topology() -> Topology {
    Topology::new(TopologyConfig::local_cluster()).expect("the built-in topology is valid")
}

/// The host's address on the bridge: the apiserver and the registry listen there.
pub fn host_addr() -> Ipv4Addr {
    TopologyConfig::local_cluster().host_addr
}

/// The name of real node `n` (1-based).
pub fn node_name(n: usize) -> String {
    format!("node-{n}")
}

/// The IP of real node `n`: 10.90.0.(10+n).
pub fn node_ip(n: usize) -> Result<Ipv4Addr> {
    let n = u32::try_from(n).context("node index")?;
    TopologyConfig::local_cluster().node_ip(n)
}

/// Where `node`'s agent pins its eBPF maps and programs.
pub fn bpffs_dir(node: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join(node)
}

/// What `up` created in the network, for `down`: one `<kind> <value>...` line each
/// (`bridge skiff0`, `node node-1 10.90.0.11`, `bpffs /sys/fs/bpf/skiff/node-1`,
/// `route 10.244.1.0/24 10.90.0.11`).
pub fn topology_record() -> PathBuf {
    state_dir().join("topology")
}

/// Appends `line` to [`topology_record`] unless it is there already.
fn record(line: &str) -> Result<()> {
    use std::io::Write;
    let path = topology_record();
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    if have.lines().any(|l| l == line) {
        return Ok(());
    }
    std::fs::create_dir_all(state_dir())?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// The lines of [`topology_record`], split into words.
pub fn recorded() -> Vec<Vec<String>> {
    std::fs::read_to_string(topology_record())
        .unwrap_or_default()
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Creates the bridge skiff0 with 10.90.0.1/24 unless it is there (recorded for `down`).
pub fn ensure_bridge() -> Result<Topology> {
    let topo = topology();
    let c = topo.config();
    if !topo.bridge_exists() {
        println!(
            "[up] creating the test bridge {} with {}/{} (subnet {}, nothing routes out)",
            c.bridge,
            c.host_addr,
            c.prefix_len,
            c.subnet()
        );
    }
    record(&format!("bridge {}", c.bridge))?;
    topo.ensure()?;
    Ok(topo)
}

/// The bridge and the netns of node-1..n (idempotent).
fn create_topology(n: usize) -> Result<Topology> {
    let topo = ensure_bridge()?;
    for i in 1..=n {
        let node = node_name(i);
        let ip = node_ip(i)?;
        record(&format!("node {node} {ip}"))?;
        let netns = topo.add_node(&node, ip)?;
        println!(
            "[up] node netns {} for {node}: eth0 {ip}/{} on {} (host end {})",
            netns.netns,
            netns.prefix_len,
            topo.config().bridge,
            netns.host_veth
        );
    }
    Ok(topo)
}

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
        print_usage(&dir.join("control/admin.kubeconfig"), args.port);
        return Ok(());
    }
    let topo = create_topology(args.nodes)?;
    let host = host_addr().to_string();

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
        // skiff-cri-log (the containers' log copier) and containerd-shim-skiff-v1 (the
        // containerd shim) are found next to skiff-agent.
        build.args([
            "-p",
            "skiff-agent",
            "--bin",
            "skiff-agent",
            "--bin",
            "skiff-cri-log",
            "-p",
            "skiff-shim",
            "--bin",
            "containerd-shim-skiff-v1",
        ]);
    }
    util::run_cmd("cargo build", &mut build)?;
    let bin = util::root().join("target/debug/skiff-apiserver");

    let mut apiserver = Command::new(&bin);
    apiserver
        .args(["--data-dir"])
        .arg(dir.join("control"))
        .args([
            "--bind-address",
            &host,
            "--advertise-address",
            &host,
            "--secure-port",
            &args.port.to_string(),
        ]);
    if args.etcd {
        let endpoint = start_etcd(&dir)?;
        apiserver.args(["--etcd-servers", &endpoint]);
    }
    println!(
        "[up] starting the apiserver on https://{host}:{}",
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
        // The controller-manager hands out LoadBalancer IPs from LB_POOL.
        let extra = if component == "controller-manager" {
            format!("--load-balancer-pool {LB_POOL}")
        } else {
            String::new()
        };
        spawn_daemon(
            component,
            Command::new("sh").args([
                "-c",
                "while :; do \"$0\" --kubeconfig \"$1\" $2; sleep 1; done",
                &bin.to_string_lossy(),
                &kubeconfig.to_string_lossy(),
                &extra,
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
        start_agents(&topo, &kubeconfig, args.nodes, &args.pod_network)?;
        route_pod_cidrs(&topo, &kubeconfig, args.nodes)?;
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
    print_usage(&kubeconfig, args.port);
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

/// Starts skiff-agent node-1..n, each inside its node netns (nsenter --net, so it sees
/// the host's /sys/fs/bpf and /sys/fs/cgroup) under a restart loop like the
/// controller-manager, and waits until their Nodes are Ready.
fn start_agents(topo: &Topology, kubeconfig: &Path, n: usize, pod_network: &str) -> Result<()> {
    let bin = util::root().join("target/debug/skiff-agent");
    let socket = containerd_socket();
    let mut names = Vec::new();
    for i in 1..=n {
        let node = node_name(i);
        let name = agent_name(i);
        names.push(node.clone());
        if running_pid(&name).is_some() {
            println!("[up] skiff-agent {node} is already running");
            continue;
        }
        let ip = node_ip(i)?;
        let bpffs = bpffs_dir(&node);
        record(&format!("bpffs {}", bpffs.display()))?;
        let root = state_dir().join("agent").join(&node);
        std::fs::create_dir_all(&root)?;
        println!(
            "[up] starting skiff-agent {node} in netns {} (node IP {ip}, kubelet port {KUBELET_PORT}, pod network {pod_network}, maps in {})",
            topo.netns_name(&node),
            bpffs.display()
        );
        spawn_daemon(
            &name,
            topo.node_command(&node, "sh")
                .args([
                    "-c",
                    "while :; do \"$0\" --node-name \"$1\" --kubeconfig \"$2\" \
                     --containerd-address \"$3\" --root-dir \"$4\" --insecure-registry \"$5\" \
                     --node-ip \"$6\" --port \"$7\" --pod-network \"$8\" --bpffs-dir \"$9\"; \
                     sleep 1; done",
                    &bin.to_string_lossy(),
                    &node,
                    &kubeconfig.to_string_lossy(),
                    &socket.to_string_lossy(),
                    &root.to_string_lossy(),
                    REGISTRY,
                    &ip.to_string(),
                    &KUBELET_PORT.to_string(),
                    pod_network,
                    &bpffs.to_string_lossy(),
                ])
                .env_remove("KUBECONFIG")
                .env("NO_COLOR", "1"),
        )?;
    }
    println!("[up] waiting for {} to be Ready", names.join(", "));
    let start = Instant::now();
    let mut last = usize::MAX;
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
        let count = names.iter().filter(|n| ready.contains(&n.as_str())).count();
        if count != last {
            println!("[up] {count}/{} Ready", names.len());
            last = count;
        }
        if count == names.len() {
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

/// Routes each real node's spec.podCIDR from the host to the node IP on the bridge, so
/// the host (and kubectl users) reach pod IPs. A node whose podCIDR is still unset after
/// [`POD_CIDR_TIMEOUT`] is reported and skipped.
/// LoadBalancer addresses (the controller-manager's pool), routed from the host to
/// node-1 like a router in front of the cluster would.
pub const LB_POOL: &str = "10.90.1.0/28";

fn route_pod_cidrs(topo: &Topology, kubeconfig: &Path, n: usize) -> Result<()> {
    if n > 0 {
        let ip = node_ip(1)?;
        record(&format!("route {LB_POOL} {ip}"))?;
        topo.add_host_route(LB_POOL, ip)?;
        println!("[up] route {LB_POOL} (LoadBalancer IPs) via {ip}");
    }
    let mut pending: Vec<usize> = (1..=n).collect();
    let start = Instant::now();
    while !pending.is_empty() {
        let out = util::output(kubectl(kubeconfig).args([
            "get",
            "nodes",
            "-o",
            r#"jsonpath={range .items[*]}{.metadata.name}={.spec.podCIDR}{"\n"}{end}"#,
        ]))
        .unwrap_or_default();
        let mut left = Vec::new();
        for i in pending {
            let node = node_name(i);
            let cidr = out
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{node}=")))
                .map(str::trim)
                .filter(|c| !c.is_empty());
            let Some(cidr) = cidr else {
                left.push(i);
                continue;
            };
            let ip = node_ip(i)?;
            record(&format!("route {cidr} {ip}"))?;
            topo.add_host_route(cidr, ip)?;
            println!("[up] route {cidr} (pods of {node}) via {ip}");
        }
        pending = left;
        if !pending.is_empty() && start.elapsed() > POD_CIDR_TIMEOUT {
            let nodes: Vec<String> = pending.iter().map(|i| node_name(*i)).collect();
            println!(
                "[up] warning: no podCIDR on {} after {POD_CIDR_TIMEOUT:?}; their pods are not routed from the host",
                nodes.join(", ")
            );
            break;
        }
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    Ok(())
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

fn print_usage(kubeconfig: &Path, port: u16) {
    let c = TopologyConfig::local_cluster();
    println!();
    println!("skiff control plane is up. Use it with the real kubectl:");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get namespaces");
    println!("  kubectl get nodes,pods -A -o wide");
    println!("  kubectl get all -n demo");
    println!(
        "  curl http://<pod IP>:8080/hello    # \"<pod name> /hello\" (podCIDRs are routed to the node IPs)",
    );
    println!(
        "  curl http://10.90.0.11:$(kubectl get svc -n demo echo -o jsonpath='{{.spec.ports[0].nodePort}}')/hello   # NodePort, eBPF on every node IP"
    );
    println!("  kubectl logs -n demo deployment/echo");
    println!(
        "  ip netns exec {}node-1 ip addr      # act as a node (its network namespace)",
        c.netns_prefix
    );
    let ip = |n| node_ip(n).map_or_else(|_| "?".into(), |ip| ip.to_string());
    println!(
        "Network: bridge {} {}/{} (apiserver https://{}:{port}, registry {REGISTRY}); node-N is \
         netns {}node-N ({}, {}, ...); nothing routes out of it.",
        c.bridge,
        c.host_addr,
        c.prefix_len,
        c.host_addr,
        c.netns_prefix,
        ip(1),
        ip(2),
    );
    println!(
        "Images: {REGISTRY}/skiff/echo:latest and skiff/busybox:latest (rebuild: cargo xtask images)."
    );
    println!("Logs: .skiff/*.log. Stop everything with: cargo xtask down");
}
