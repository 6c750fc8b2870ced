//! TODO: deployment controller (being written).

use kube::Client;

use super::ControllerConfig;

pub async fn run(client: Client, cfg: ControllerConfig) {
    let _ = (client, cfg);
    std::future::pending::<()>().await
}
