//! skiff-controller-manager: runs the controllers (control/src/controllers) against an
//! apiserver, only while it holds the `skiff-controller-manager` Lease in kube-system.
//! Losing the Lease exits the process (status 1) so a supervisor restarts it as a
//! fresh candidate; nothing keeps acting on a stale belief of leadership.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use skiff_control::controllers;
use skiff_control::leader::{LeaderConfig, LeaderElector, default_identity};

#[derive(Parser, Debug)]
#[command(
    name = "skiff-controller-manager",
    version,
    about = "skiff controller-manager"
)]
struct Args {
    /// Kubeconfig to reach the apiserver (default: $KUBECONFIG, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Name in the Lease's holderIdentity (default: hostname_pid).
    #[arg(long)]
    identity: Option<String>,
    /// Run leader election (turn off only for a single instance under test).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    #[arg(long, default_value = "skiff-controller-manager")]
    lease_name: String,
    #[arg(long, default_value = "kube-system")]
    lease_namespace: String,
    /// Seconds a Lease is valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds the leader keeps trying to renew before it gives up (< lease duration).
    #[arg(long, default_value_t = 10)]
    renew_deadline: u64,
    /// Seconds between acquire/renew attempts.
    #[arg(long, default_value_t = 2)]
    retry_period: u64,
}

async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        args.renew_deadline < args.lease_duration,
        "--renew-deadline must be shorter than --lease-duration"
    );
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let client = client(args.kubeconfig.as_ref()).await?;

    let cfg = LeaderConfig {
        namespace: args.lease_namespace.clone(),
        name: args.lease_name.clone(),
        identity: identity.clone(),
        lease_duration: Duration::from_secs(args.lease_duration),
        renew_deadline: Duration::from_secs(args.renew_deadline),
        retry_period: Duration::from_secs(args.retry_period.max(1)),
    };
    let elector = Arc::new(LeaderElector::new(client.clone(), cfg));
    println!("skiff-controller-manager {identity} started");

    if args.leader_elect {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = shutdown_signal() => return Ok(()),
        }
        println!("skiff-controller-manager {identity} is the leader");
    }

    let renew = async {
        if args.leader_elect {
            elector.keep_renewing().await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = renew => {
            // Leadership lost: stop at once, without finishing in-flight work.
            eprintln!("skiff-controller-manager {identity}: leadership lost, exiting");
            std::process::exit(1);
        }
        _ = controllers::run_all(client, controllers::ControllerConfig::default()) => {
            anyhow::bail!("controllers stopped unexpectedly");
        }
        _ = shutdown_signal() => {
            if args.leader_elect {
                elector.release().await;
            }
        }
    }
    Ok(())
}
