//! What every control-plane component binary shares: reaching the apiserver, the
//! leader-election flags, and the run loop "wait for the Lease, then act until it is
//! lost or we are told to stop". Losing the Lease exits the process (status 1) so a
//! supervisor restarts it as a fresh candidate; nothing keeps acting on a stale belief
//! of leadership.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::leader::{LeaderConfig, LeaderElector, default_identity};

/// Flags common to skiff-controller-manager and skiff-scheduler (named as in
/// kube-controller-manager: --leader-elect, --leader-elect-lease-duration ...; the
/// shorter names are kept as aliases).
#[derive(clap::Args, Debug, Clone)]
pub struct ComponentArgs {
    /// Kubeconfig to reach the apiserver (default: $KUBECONFIG, then in-cluster).
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Name in the Lease's holderIdentity (default: hostname_pid).
    #[arg(long)]
    pub identity: Option<String>,
    /// Run leader election (turn off only for a single instance under test).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Lease name (default: the component's name).
    #[arg(long, alias = "leader-elect-resource-name")]
    pub lease_name: Option<String>,
    #[arg(
        long,
        alias = "leader-elect-resource-namespace",
        default_value = "kube-system"
    )]
    pub lease_namespace: String,
    /// Seconds a Lease is valid without renewal.
    #[arg(long, alias = "leader-elect-lease-duration", default_value_t = 15)]
    pub lease_duration: u64,
    /// Seconds the leader keeps trying to renew before it gives up (< lease duration).
    #[arg(long, alias = "leader-elect-renew-deadline", default_value_t = 10)]
    pub renew_deadline: u64,
    /// Seconds between acquire/renew attempts.
    #[arg(long, alias = "leader-elect-retry-period", default_value_t = 2)]
    pub retry_period: u64,
}

/// Turns off transparent huge pages for this process (all control-plane binaries call it
/// first thing). mimalloc marks its arenas MADV_HUGEPAGE, so each fresh or purged 2 MiB
/// range faults in as a huge page that the kernel zeroes whole: under a burst of pod
/// creates that zeroing (clear_page_erms) was ~60% of the apiserver's CPU. Regular 4 KiB
/// pages zero only what is touched. A kernel without the prctl just keeps THP.
pub fn disable_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        tracing::debug!("PR_SET_THP_DISABLE: {}", std::io::Error::last_os_error());
    }
}

pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
}

/// A client from an explicit kubeconfig, or inferred ($KUBECONFIG, in-cluster).
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(kube::Client::try_from(config)?)
}

pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs `work` from the start and tells it through `leading` (a future that completes once
/// this process holds the component's Lease) when it may act: a component can fill its
/// caches while it stands by, as kube-scheduler does, so a failover acts at once; one that
/// has nothing to prepare awaits `leading` first. Prints "{component} {identity} started"
/// and "... is the leader" on stdout (tests and `cargo xtask up` wait for these lines).
pub async fn run_leader_elected<F, Fut>(
    component: &str,
    args: &ComponentArgs,
    client: kube::Client,
    work: F,
) -> anyhow::Result<()>
where
    F: FnOnce(kube::Client, Leading) -> Fut,
    Fut: Future<Output = ()>,
{
    anyhow::ensure!(
        args.renew_deadline < args.lease_duration,
        "--renew-deadline must be shorter than --lease-duration"
    );
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let cfg = LeaderConfig {
        namespace: args.lease_namespace.clone(),
        name: args
            .lease_name
            .clone()
            .unwrap_or_else(|| component.to_string()),
        identity: identity.clone(),
        lease_duration: Duration::from_secs(args.lease_duration),
        renew_deadline: Duration::from_secs(args.renew_deadline),
        retry_period: Duration::from_secs(args.retry_period.max(1)),
    };
    let elector = Arc::new(LeaderElector::new(client.clone(), cfg));
    println!("{component} {identity} started");

    let (lead, leading) = tokio::sync::oneshot::channel();
    let work = work(client, Leading(leading));
    tokio::pin!(work);
    if args.leader_elect {
        tokio::select! {
            _ = elector.acquire() => {}
            _ = &mut work => anyhow::bail!("{component}: work stopped unexpectedly"),
            _ = shutdown_signal() => return Ok(()),
        }
        println!("{component} {identity} is the leader");
    }
    // The work may have dropped its Leading (it never needed to wait): fine.
    let _ = lead.send(());

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
            eprintln!("{component} {identity}: leadership lost, exiting");
            std::process::exit(1);
        }
        _ = &mut work => {
            anyhow::bail!("{component}: work stopped unexpectedly");
        }
        _ = shutdown_signal() => {
            if args.leader_elect {
                elector.release().await;
            }
        }
    }
    Ok(())
}

/// Completes once this process leads (see [`run_leader_elected`]); never before.
pub struct Leading(tokio::sync::oneshot::Receiver<()>);

impl Leading {
    pub async fn wait(self) {
        if self.0.await.is_err() {
            // The component is stopping without ever leading.
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transparent_huge_pages_are_off_after_the_call() {
        super::disable_transparent_huge_pages();
        // SAFETY: PR_GET_THP_DISABLE takes no pointers; it returns the flag.
        let flag = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(
            flag, 1,
            "PR_GET_THP_DISABLE after disable_transparent_huge_pages"
        );
    }
}
