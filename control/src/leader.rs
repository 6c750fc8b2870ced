//! Leader election with a coordination.k8s.io/v1 Lease, as client-go's leaderelection
//! does it: the holder renews `renewTime` every retry period; a candidate takes the
//! Lease once it has seen the record unchanged for a whole lease duration (measured on
//! its own clock, so clock skew between machines does not matter). Every write carries
//! the resourceVersion it read, so two candidates racing for an expired Lease cannot
//! both win: the loser gets a 409.
//!
//! Shared by the controller-manager and the scheduler.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::Mutex;

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a Lease stays valid without renewal (leaseDurationSeconds).
    pub lease_duration: Duration,
    /// The leader gives up if it could not renew for this long (< lease_duration, so it
    /// stops acting before anyone else may start).
    pub renew_deadline: Duration,
    /// Pause between attempts to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderConfig {
    pub fn new(name: &str, identity: &str) -> LeaderConfig {
        LeaderConfig {
            namespace: "kube-system".into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The default identity: hostname and pid, unique per process.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{host}_{}", std::process::id())
}

/// What the elector last saw of the Lease and when (on the local clock).
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    resource_version: Option<String>,
    at: Instant,
}

pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaderConfig,
    observed: Mutex<Option<Observed>>,
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaderConfig) -> LeaderElector {
        LeaderElector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &LeaderConfig {
        &self.cfg
    }

    /// Blocks until this process holds the Lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(
                        "{}: acquired lease {}/{}",
                        self.cfg.identity,
                        self.cfg.namespace,
                        self.cfg.name
                    );
                    return;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!("acquiring lease {}: {e}", self.cfg.name),
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// Renews until renewal has failed for longer than the renew deadline (or another
    /// holder appears), then returns: from that moment the caller must stop acting.
    pub async fn keep_renewing(&self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.retry_period).await;
            // A request that hangs (apiserver unreachable, not refusing) must not carry
            // us past the deadline.
            let left = self.cfg.renew_deadline.saturating_sub(last_ok.elapsed());
            let attempt = tokio::time::timeout(left, self.try_acquire_or_renew()).await;
            match attempt.unwrap_or_else(|_| Err(kube::Error::Service("renewal timed out".into())))
            {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    tracing::error!(
                        "{}: lease {} taken by another holder",
                        self.cfg.identity,
                        self.cfg.name
                    );
                    return;
                }
                Err(e) => tracing::warn!("renewing lease {}: {e}", self.cfg.name),
            }
            if last_ok.elapsed() > self.cfg.renew_deadline {
                tracing::error!(
                    "{}: could not renew lease {} for {:?}",
                    self.cfg.identity,
                    self.cfg.name,
                    self.cfg.renew_deadline
                );
                return;
            }
        }
    }

    /// Gives the Lease up (graceful shutdown), so a standby need not wait for expiry.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await {
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() == Some(self.cfg.identity.as_str()) {
                spec.holder_identity = None;
                spec.lease_duration_seconds = Some(1);
                let _ = self
                    .api
                    .replace(&self.cfg.name, &PostParams::default(), &lease)
                    .await;
            }
        }
    }

    /// One round: true when this process holds the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = MicroTime(crate::controllers::now_timestamp());
        let me = self.cfg.identity.as_str();
        let secs = self.cfg.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.into()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if crate::controllers::is_conflict(&e) => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_by_me = holder.as_deref() == Some(me);
        let duration = spec
            .lease_duration_seconds
            .map(|s| Duration::from_secs(s.max(0) as u64))
            .unwrap_or(self.cfg.lease_duration);

        // Track when the record last changed, on our own clock.
        let mut observed = self.observed.lock().await;
        let changed = observed.as_ref().is_none_or(|o| {
            o.holder != holder
                || o.renew_time != spec.renew_time
                || o.resource_version != lease.metadata.resource_version
        });
        if changed {
            *observed = Some(Observed {
                holder: holder.clone(),
                renew_time: spec.renew_time.clone(),
                resource_version: lease.metadata.resource_version.clone(),
                at: Instant::now(),
            });
        }
        let seen_at = observed.as_ref().map(|o| o.at).unwrap_or_else(Instant::now);
        if !held_by_me && holder.is_some() && seen_at.elapsed() < duration {
            return Ok(false);
        }

        let new_spec = lease.spec.get_or_insert_with(Default::default);
        if !held_by_me {
            new_spec.acquire_time = Some(now.clone());
            new_spec.lease_transitions =
                Some(spec.lease_transitions.unwrap_or(0) + i32::from(holder.is_some()));
        }
        new_spec.holder_identity = Some(me.into());
        new_spec.lease_duration_seconds = Some(secs);
        new_spec.renew_time = Some(now);
        // `lease` still carries the resourceVersion we read: a concurrent writer makes
        // this a 409, which means we lost.
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => {
                *observed = Some(Observed {
                    holder: Some(me.into()),
                    renew_time: l.spec.as_ref().and_then(|s| s.renew_time.clone()),
                    resource_version: l.metadata.resource_version.clone(),
                    at: Instant::now(),
                });
                Ok(true)
            }
            Err(e) if crate::controllers::is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
