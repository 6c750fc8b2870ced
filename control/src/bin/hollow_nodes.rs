//! skiff-hollow-nodes: registers N hollow nodes (control/src/hollow.rs; kubemark's
//! hollow-node) and plays their kubelets until stopped: Leases renewed, bound pods
//! reported Running and Ready, deletions confirmed. No containers run. `cargo xtask up`
//! uses it for a multi-node control plane until skiff-agent joins real nodes.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use skiff_control::component;
use skiff_control::hollow::{HollowCluster, HollowConfig, HollowNode};

#[derive(Parser, Debug)]
#[command(name = "skiff-hollow-nodes", version, about = "skiff hollow nodes")]
struct Args {
    /// Kubeconfig to reach the apiserver (default: $KUBECONFIG, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// How many nodes.
    #[arg(long, default_value_t = 3)]
    count: usize,
    /// Node names are <prefix>-<n>.
    #[arg(long, default_value = "hollow")]
    name_prefix: String,
    #[arg(long, default_value = "4")]
    cpu: String,
    #[arg(long, default_value = "8Gi")]
    memory: String,
    /// Seconds between Lease renewals (the kubelet's default is 10).
    #[arg(long, default_value_t = 10)]
    lease_renew_interval: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    component::init_logging();
    let args = Args::parse();
    let client = component::client(args.kubeconfig.as_ref()).await?;
    let nodes = (1..=args.count)
        .map(|i| HollowNode::named(&format!("{}-{i}", args.name_prefix)))
        .collect();
    let cfg = HollowConfig {
        cpu: args.cpu.clone(),
        memory: args.memory.clone(),
        lease_renew_interval: Duration::from_secs(args.lease_renew_interval.max(1)),
        ..HollowConfig::default()
    };
    let cluster = HollowCluster::start(client, cfg, nodes).await?;
    println!(
        "skiff-hollow-nodes: {} running",
        cluster.node_names().join(", ")
    );
    component::shutdown_signal().await;
    Ok(())
}
