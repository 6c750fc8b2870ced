//! skiff-agent: the node agent. So far the kubelet: registers the Node, renews its Lease,
//! runs the pods bound to it on containerd (see skiff_agent::kubelet).
//!
//! `skiff-agent --node-name N --kubeconfig K --containerd-address SOCK [--root-dir DIR]
//!  [--insecure-registry 127.0.0.1:PORT ...] [--node-ip IP] [--port 10250]
//!  [--bind-address IP] [--manifest-dir DIR] [--pod-logs-dir /var/log/pods]
//!  [--container-shim skiff|runc] [--oci-runtime auto|crun|runc]` (as root).
//! Serves the kubelet API (logs, exec) over HTTPS; runs the static pods of DIR, with
//! mirror pods in the API. Prints "skiff-agent <node> ready" on stdout once the Node is
//! registered. Container logs rotate by size (`--container-log-max-size 10Mi`,
//! `--container-log-max-files 5`). Each container's log copier is the small
//! `skiff-cri-log` binary next to this one; without it this binary serves as the copier
//! (`skiff-agent --cri-log FILE ...`, see skiff_agent::kubelet::cri_log).

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use clap::Parser;
use skiff_agent::{
    cni::PodNetworkMode,
    kubelet::{
        agent::{self, AgentConfig},
        oci_runtime::{OciRuntime, OciRuntimeChoice, SKIFF_SHIM_BIN, ShimChoice},
    },
    proxy::ProxyMode,
};

#[derive(Parser, Debug)]
#[command(name = "skiff-agent", version, about = "skiff node agent (kubelet)")]
struct Args {
    /// Name of this node.
    #[arg(long)]
    node_name: String,
    /// Kubeconfig to reach the apiserver (default: $KUBECONFIG, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    containerd_address: PathBuf,
    /// State directory (IP allocations, pod files); default /var/lib/skiff/agent/<node>.
    #[arg(long)]
    root_dir: Option<PathBuf>,
    /// Container logs, in the CRI layout `<ns>_<pod>_<uid>/<container>/<restart>.log`.
    #[arg(long, default_value = "/var/log/pods")]
    pod_logs_dir: PathBuf,
    /// Registries reached over plain http (repeatable), e.g. 127.0.0.1:5000.
    #[arg(long = "insecure-registry")]
    insecure_registries: Vec<String>,
    /// The node's InternalIP (also the pods' hostIP).
    #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
    node_ip: Ipv4Addr,
    /// Seconds between Lease renewals.
    #[arg(long, default_value_t = 10)]
    node_lease_renew_interval: u64,
    /// leaseDurationSeconds written into the Lease.
    #[arg(long, default_value_t = 40)]
    node_lease_duration_seconds: i32,
    /// Seconds between syncs of a pod without events.
    #[arg(long, default_value_t = 5)]
    sync_frequency: u64,
    /// Port of the kubelet API (containerLogs, exec) the apiserver proxies to; 0 = any free
    /// port (published in the Node's status.daemonEndpoints.kubeletEndpoint.Port).
    #[arg(long, default_value_t = 10250)]
    port: u16,
    /// Address the kubelet API listens on (default: the node IP).
    #[arg(long)]
    bind_address: Option<std::net::IpAddr>,
    /// Directory of static pod manifests (*.yaml, *.yml, *.json with a v1 Pod), run
    /// without the apiserver as their source; each gets a mirror pod `<pod>-<node>`.
    #[arg(long)]
    manifest_dir: Option<PathBuf>,
    /// How pods are connected: `ebpf` (tc programs, VXLAN to other nodes) or
    /// `host-routes` (only node <-> its pods; for agents sharing one network namespace).
    #[arg(long, value_enum, default_value_t = PodNetworkMode::Ebpf)]
    pod_network: PodNetworkMode,
    /// bpffs directory for this node's pinned maps (default /sys/fs/bpf/skiff/<node>).
    #[arg(long)]
    bpffs_dir: Option<PathBuf>,
    /// How Services are implemented: `ebpf` (socket and tc programs) or `iptables`
    /// (kube-proxy-shaped rules; for the comparison benchmark). Needs --pod-network ebpf.
    #[arg(long, value_enum, default_value_t = ProxyMode::Ebpf)]
    proxy_mode: ProxyMode,
    /// Size at which a container's log file is rotated (a quantity: 10Mi, 500Ki, 1G);
    /// 0 = never. The kubelet's containerLogMaxSize.
    #[arg(long, default_value = "10Mi", value_parser = parse_log_size)]
    container_log_max_size: u64,
    /// Log files kept per container (the current one included, at least 2). The
    /// kubelet's containerLogMaxFiles.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(2..))]
    container_log_max_files: u32,
    /// The OCI runtime the shim runs: `auto` (crun when it is installed and
    /// supports this host's cgroup layout, else runc), `crun` or `runc`.
    #[arg(long, value_enum, default_value_t = OciRuntimeChoice::Auto)]
    oci_runtime: OciRuntimeChoice,
    /// The containerd shim: `runc` (containerd's runc v2 shim) or `skiff` (skiff's own,
    /// `containerd-shim-skiff-v1` next to this binary; lighter per container).
    #[arg(long, value_enum, default_value_t = ShimChoice::Skiff)]
    container_shim: ShimChoice,
}

fn parse_log_size(s: &str) -> Result<u64, String> {
    skiff_agent::kubelet::pod_status::parse_quantity(s)
        .filter(|v| *v >= 0.0)
        .map(|v| v as u64)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 10Mi)"))
}

fn main() -> anyhow::Result<()> {
    // Started by containerd's shim as a container's log copier (binary:// IO).
    if let Some(code) = skiff_agent::kubelet::cri_log::copier_from_args() {
        std::process::exit(code);
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(agent_main())
}

async fn agent_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    if !nix::unistd::Uid::effective().is_root() {
        anyhow::bail!("skiff-agent must run as root (network namespaces, cgroups, containerd)");
    }
    let mut cfg = AgentConfig::new(&a.node_name, a.containerd_address);
    cfg.kubeconfig = a.kubeconfig;
    if let Some(d) = a.root_dir {
        cfg.root_dir = d;
    }
    cfg.pod_logs_dir = a.pod_logs_dir;
    cfg.insecure_registries = a.insecure_registries;
    cfg.node_ip = a.node_ip;
    cfg.lease_renew_interval = Duration::from_secs(a.node_lease_renew_interval.max(1));
    cfg.lease_duration_seconds = a.node_lease_duration_seconds.max(1);
    cfg.resync = Duration::from_secs(a.sync_frequency.max(1));
    cfg.port = a.port;
    cfg.bind_address = a.bind_address;
    cfg.manifest_dir = a.manifest_dir;
    cfg.pod_network = a.pod_network;
    cfg.proxy_mode = a.proxy_mode;
    if let Some(d) = a.bpffs_dir {
        cfg.bpffs_dir = d;
    }
    cfg.container_log = skiff_agent::kubelet::cri_log::Rotation {
        max_size: a.container_log_max_size,
        max_files: a.container_log_max_files as usize,
    };
    let (oci_runtime, why_runc) = OciRuntime::choose(a.oci_runtime)
        .map_err(|e| anyhow::anyhow!("--oci-runtime crun: {e}"))?;
    match why_runc {
        Some(why) => tracing::info!("OCI runtime: runc ({why})"),
        None => tracing::info!("OCI runtime: {}", oci_runtime.binary.display()),
    }
    cfg.oci_runtime = match a.container_shim {
        ShimChoice::Runc => oci_runtime,
        ShimChoice::Skiff => {
            let shim = skiff_agent::kubelet::cri_log::agent_exe()?.with_file_name(SKIFF_SHIM_BIN);
            if !shim.is_file() {
                anyhow::bail!(
                    "--container-shim skiff: {} is missing (build it with `cargo build -p \
                     skiff-shim`, install it next to skiff-agent)",
                    shim.display()
                );
            }
            tracing::info!("containerd shim: {}", shim.display());
            oci_runtime.with_shim(shim)
        }
    };
    let node = cfg.node_name.clone();
    let run = agent::run(cfg, move || {
        use std::io::Write;
        println!("skiff-agent {node} ready");
        let _ = std::io::stdout().flush();
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = run => r,
        _ = term.recv() => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
