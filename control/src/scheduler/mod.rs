//! TODO: scheduler (being written).

use kube::Client;

/// Settings from the skiff-scheduler command line.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Pods whose spec.schedulerName is this are ours ("default-scheduler" when unset).
    pub scheduler_name: String,
    /// How many bindings may be in flight at once.
    pub parallel_binds: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            scheduler_name: "default-scheduler".into(),
            parallel_binds: 16,
        }
    }
}

pub async fn run(client: Client, cfg: SchedulerConfig) {
    let _ = (client, cfg);
    std::future::pending::<()>().await
}
