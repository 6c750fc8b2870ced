//! skiff-controller-manager: runs the controllers (control/src/controllers) against an
//! apiserver, only while it holds the `skiff-controller-manager` Lease in kube-system
//! (see control/src/component.rs for the leader-election loop).

// See Cargo.toml: many small JSON allocations; mimalloc spends far less CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use clap::Parser;
use skiff_control::component::{self, ComponentArgs};
use skiff_control::controllers::{self, ControllerConfig};

#[derive(Parser, Debug)]
#[command(
    name = "skiff-controller-manager",
    version,
    about = "skiff controller-manager"
)]
struct Args {
    #[command(flatten)]
    component: ComponentArgs,
    /// Seconds without a node heartbeat before the node is Ready=Unknown.
    #[arg(long, default_value_t = 40)]
    node_monitor_grace_period: u64,
    /// tolerationSeconds for pods that do not tolerate not-ready/unreachable nodes.
    #[arg(long, default_value_t = 300)]
    default_not_ready_toleration_seconds: i64,
    /// Pod network that node podCIDRs are carved from.
    #[arg(long, default_value = "10.244.0.0/16")]
    cluster_cidr: String,
    /// Prefix length of each node's podCIDR.
    #[arg(long, default_value_t = 24)]
    node_cidr_mask_size: u8,
    /// Addresses for LoadBalancer Services ("CIDR" or "first-last"); unset leaves them
    /// pending.
    #[arg(long)]
    load_balancer_pool: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    skiff_control::component::disable_transparent_huge_pages();
    component::init_logging();
    let args = Args::parse();
    let cfg = ControllerConfig {
        node_monitor_grace_period: Duration::from_secs(args.node_monitor_grace_period.max(1)),
        default_toleration_seconds: args.default_not_ready_toleration_seconds,
        cluster_cidr: args.cluster_cidr.clone(),
        node_cidr_mask_size: args.node_cidr_mask_size,
        load_balancer_pool: args.load_balancer_pool.clone(),
    };
    // Bad flags stop the process here, with the controller's own explanation.
    for check in [
        controllers::node_ipam::validate,
        controllers::node_lifecycle::validate,
        controllers::service_lb::validate,
    ] {
        check(&cfg).map_err(|e| anyhow::anyhow!("invalid flags: {e}"))?;
    }
    let client = component::client(args.component.kubeconfig.as_ref()).await?;
    component::run_leader_elected(
        "skiff-controller-manager",
        &args.component,
        client,
        |client, leading| async move {
            // Controllers start their informers only once leading.
            leading.wait().await;
            controllers::run_all(client, cfg).await
        },
    )
    .await
}
