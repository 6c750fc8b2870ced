//! skiff-scheduler: places pods on nodes (control/src/scheduler), only while it holds
//! the `skiff-scheduler` Lease in kube-system (control/src/component.rs).

// See Cargo.toml: many small JSON allocations; mimalloc spends far less CPU on them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use skiff_control::component::{self, ComponentArgs};
use skiff_control::scheduler::{self, SchedulerConfig};

#[derive(Parser, Debug)]
#[command(name = "skiff-scheduler", version, about = "skiff scheduler")]
struct Args {
    #[command(flatten)]
    component: ComponentArgs,
    /// Pods whose spec.schedulerName is this are placed by this scheduler.
    #[arg(long, default_value = "default-scheduler")]
    scheduler_name: String,
    /// Bindings in flight at once.
    #[arg(long, default_value_t = 16)]
    parallel_binds: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    skiff_control::component::disable_transparent_huge_pages();
    component::init_logging();
    let args = Args::parse();
    let cfg = SchedulerConfig {
        scheduler_name: args.scheduler_name.clone(),
        parallel_binds: args.parallel_binds.max(1),
        ..SchedulerConfig::default()
    };
    let client = component::client(args.component.kubeconfig.as_ref()).await?;
    // The scheduler's caches fill while it stands by; it places pods only once leading.
    component::run_leader_elected(
        "skiff-scheduler",
        &args.component,
        client,
        |client, leading| scheduler::run(client, cfg, leading.wait()),
    )
    .await
}
