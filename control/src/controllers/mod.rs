//! The controller-manager's controllers. Each one is a level-triggered kube-runtime
//! `Controller`: it watches through the apiserver, reconciles one object at a time from
//! the whole observed state (so a repeated or missed event does no harm), and requeues
//! with a per-object exponential backoff when a reconcile fails. Components never touch
//! storage; everything goes through `kube::Client`.

pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod endpointslice;
pub mod garbage_collector;
pub mod namespace;
pub mod node_ipam;
pub mod node_lifecycle;
pub mod replicaset;
pub mod service_lb;
pub mod serviceaccount;
pub mod shared_pods;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::Mutex;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::{Client, Resource, ResourceExt};

use crate::events::EventRecorder;

/// Why a reconcile failed. Any error requeues the object with backoff.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// True for a 404 from the apiserver.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// A write to an object that is already gone is done, not failed.
pub fn done_unless_error<T>(r: std::result::Result<T, kube::Error>) -> Result<()> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// True for a 409 (conflict or already exists).
pub fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Per-object failure counts, so one object that keeps failing backs off on its own
/// without slowing the others down.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    const BASE: Duration = Duration::from_millis(200);
    const MAX: Duration = Duration::from_secs(60);

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn failed(&self, key: &str) -> Duration {
        let mut f = self.failures.lock().expect("backoff lock");
        let n = f.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        Self::BASE
            .saturating_mul(1u32 << (*n - 1).min(16))
            .min(Self::MAX)
    }

    pub fn succeeded(&self, key: &str) {
        self.failures.lock().expect("backoff lock").remove(key);
    }
}

/// "namespace/name" (or "name") for logs and backoff keys.
pub fn key_of<K: Resource>(obj: &K) -> String {
    match obj.meta().namespace.as_deref() {
        Some(ns) => format!("{ns}/{}", obj.name_any()),
        None => obj.name_any(),
    }
}

/// Drives a controller's output stream: logs failures, never stops on one.
pub async fn drain<T: Debug, E: std::error::Error>(
    name: &'static str,
    stream: impl Stream<Item = std::result::Result<T, E>>,
) {
    stream
        .for_each(|r| async move {
            match r {
                Ok(o) => tracing::trace!(controller = name, "reconciled {o:?}"),
                Err(e) => tracing::warn!(controller = name, "reconcile failed: {e}"),
            }
        })
        .await;
}

/// Settings from the controller-manager command line that controllers read.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node whose Lease has not been renewed for this long is Ready=Unknown
    /// (kube-controller-manager's --node-monitor-grace-period).
    pub node_monitor_grace_period: Duration,
    /// tolerationSeconds given to pods that do not tolerate not-ready/unreachable
    /// (the DefaultTolerationSeconds admission default, 300 s).
    pub default_toleration_seconds: i64,
    /// Pod network all node podCIDRs are carved from (--cluster-cidr).
    pub cluster_cidr: String,
    /// Prefix length of each node's podCIDR (--node-cidr-mask-size).
    pub node_cidr_mask_size: u8,
    /// Addresses handed to LoadBalancer Services: a CIDR or "first-last" range. None
    /// leaves LoadBalancer Services pending, as with no cloud provider.
    pub load_balancer_pool: Option<String>,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            node_monitor_grace_period: Duration::from_secs(40),
            default_toleration_seconds: 300,
            cluster_cidr: "10.244.0.0/16".into(),
            node_cidr_mask_size: 24,
            load_balancer_pool: None,
        }
    }
}

/// Runs every controller until the first one stops (which only happens on shutdown).
pub async fn run_all(client: Client, cfg: ControllerConfig) {
    // One pod watch and cache for every controller that looks at pods.
    let (pods, pod_watch) = shared_pods::SharedPods::new(client.clone());
    let events = EventRecorder::new(client.clone());
    tokio::select! {
        _ = pod_watch.run() => {}
        _ = replicaset::run(client.clone(), events.clone(), pods.clone()) => {}
        _ = namespace::run(client.clone()) => {}
        _ = serviceaccount::run(client.clone()) => {}
        _ = garbage_collector::run(client.clone()) => {}
        _ = deployment::run(client.clone(), events.clone(), cfg.clone()) => {}
        _ = daemonset::run(client.clone(), events.clone(), cfg.clone(), pods.clone()) => {}
        _ = endpoints::run(client.clone(), cfg.clone(), pods.clone()) => {}
        _ = endpointslice::run(client.clone(), cfg.clone(), pods.clone()) => {}
        _ = node_lifecycle::run(client.clone(), events.clone(), cfg.clone(), pods.clone()) => {}
        _ = node_ipam::run(client.clone(), events.clone(), cfg.clone()) => {}
        _ = service_lb::run(client.clone(), events.clone(), cfg.clone()) => {}
    }
}

/// The current time in the apiserver's type.
pub fn now() -> Time {
    Time(now_timestamp())
}

pub fn now_timestamp() -> Timestamp {
    let micros = chrono::Utc::now().timestamp_micros();
    Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_per_object_and_resets() {
        let b = Backoff::default();
        assert_eq!(b.failed("a"), Duration::from_millis(200));
        assert_eq!(b.failed("a"), Duration::from_millis(400));
        // Another object's failures are counted separately.
        assert_eq!(b.failed("b"), Duration::from_millis(200));
        for _ in 0..40 {
            b.failed("a");
        }
        assert_eq!(b.failed("a"), Backoff::MAX);
        b.succeeded("a");
        assert_eq!(b.failed("a"), Duration::from_millis(200));
    }
}
