//! Service load-balancer controller (the cloud-controller-manager's service controller,
//! played like MetalLB): each Service of type LoadBalancer gets one IPv4 address from
//! the configured pool in status.loadBalancer.ingress[0].ip.
//!
//! No bookkeeping: the addresses in use are read from the Services' status every time,
//! so a deleted Service frees its address. Allocations run one at a time under an
//! in-process lock, each lists Services fresh from the apiserver and pins the Service's
//! resourceVersion in the write, so two Services never get the same address. Services
//! with spec.loadBalancerClass belong to another implementation and are left alone;
//! without a pool every LoadBalancer Service stays pending, as with no cloud provider.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::node_ipam::Ipv4Cidr;
use super::{Backoff, ControllerConfig, Error, Result, is_conflict, is_not_found, key_of};
use crate::events::EventRecorder;

const COMPONENT: &str = "service-controller";
/// How soon a Service that could not get an address tries again (another Service
/// releasing one is not an event on the waiting Service).
const RETRY: Duration = Duration::from_secs(5);
/// Conflicting writes tolerated in one reconcile before backing off.
const ATTEMPTS: usize = 5;

/// The addresses handed out: an inclusive IPv4 range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    first: u32,
    last: u32,
    spec: String,
}

impl Pool {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

/// Parses a pool: a CIDR ("172.18.255.200/29", every address in it, as MetalLB does),
/// a range ("172.18.255.200-172.18.255.250", both ends included) or one address.
pub fn parse_pool(s: &str) -> Result<Pool, String> {
    let spec = s.trim();
    let ip = |a: &str| -> Result<u32, String> {
        a.trim()
            .parse::<Ipv4Addr>()
            .map(u32::from)
            .map_err(|_| format!("load balancer pool {spec:?}: {a:?} is not an IPv4 address"))
    };
    let (first, last) = if spec.contains('/') {
        let c = Ipv4Cidr::parse(spec).map_err(|e| format!("load balancer pool: {e}"))?;
        (c.first(), c.last())
    } else if let Some((a, b)) = spec.split_once('-') {
        let (a, b) = (ip(a)?, ip(b)?);
        if a > b {
            return Err(format!(
                "load balancer pool {spec:?}: the range ends before it starts"
            ));
        }
        (a, b)
    } else {
        let a = ip(spec)?;
        (a, a)
    };
    Ok(Pool {
        first,
        last,
        spec: spec.to_string(),
    })
}

/// Checks the parts of the config this controller reads.
pub fn validate(cfg: &ControllerConfig) -> Result<(), String> {
    match cfg.load_balancer_pool.as_deref() {
        Some(p) => parse_pool(p).map(|_| ()),
        None => Ok(()),
    }
}

/// What to do with a LoadBalancer Service's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The address in status is fine.
    Keep,
    Assign(Ipv4Addr),
    /// spec.loadBalancerIP cannot be granted (why).
    RequestedUnavailable(String),
    Exhausted,
}

/// Decides the address of one Service. `used` holds the addresses other Services own
/// (see `used_by_others`); `current` is this Service's status address; `requested` its
/// spec.loadBalancerIP. A requested address is honoured or reported, never replaced by
/// another one (the user asked for that one).
pub fn choose(
    pool: &Pool,
    used: &BTreeSet<Ipv4Addr>,
    current: Option<Ipv4Addr>,
    requested: Option<Ipv4Addr>,
) -> Choice {
    if let Some(r) = requested {
        if current == Some(r) && !used.contains(&r) {
            return Choice::Keep;
        }
        if !pool.contains(r) {
            return Choice::RequestedUnavailable(format!("requested IP {r} is not in pool {pool}"));
        }
        if used.contains(&r) {
            return Choice::RequestedUnavailable(format!("requested IP {r} is already in use"));
        }
        return Choice::Assign(r);
    }
    if let Some(c) = current
        && pool.contains(c)
        && !used.contains(&c)
    {
        return Choice::Keep;
    }
    // Stops after at most used.len() + 1 addresses, however large the pool.
    (u64::from(pool.first)..=u64::from(pool.last))
        .map(|a| Ipv4Addr::from(a as u32))
        .find(|a| !used.contains(a))
        .map_or(Choice::Exhausted, Choice::Assign)
}

fn status_ips(svc: &Service) -> Vec<Ipv4Addr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

fn has_ingress(svc: &Service) -> bool {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .is_some_and(|i| !i.is_empty())
}

fn requested_ip(svc: &Service) -> Result<Option<Ipv4Addr>, String> {
    match svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .filter(|s| !s.is_empty())
    {
        None => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("spec.loadBalancerIP {s:?} is not an IPv4 address")),
    }
}

fn is_load_balancer(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

fn has_class(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .is_some_and(|s| s.load_balancer_class.is_some())
}

/// Who keeps an address two Services both show: the older one (then by name), so both
/// sides of a duplicate agree on which moves.
fn seniority(svc: &Service) -> (Option<i64>, String) {
    let created = svc
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_microsecond());
    (created, key_of(svc))
}

/// Addresses that `me` may not take: every other Service's status addresses, except
/// that a duplicate of my own current address counts only if its holder is senior.
pub fn used_by_others(me: &Service, all: &[Service]) -> BTreeSet<Ipv4Addr> {
    let my_key = key_of(me);
    let mine = status_ips(me).first().copied();
    let my_rank = seniority(me);
    all.iter()
        .filter(|s| key_of(*s) != my_key)
        .flat_map(|s| {
            let senior = seniority(s) < my_rank;
            status_ips(s)
                .into_iter()
                .filter(move |ip| Some(*ip) != mine || senior)
        })
        .collect()
}

pub struct Ctx {
    client: Client,
    events: EventRecorder,
    backoff: Backoff,
    pool: Pool,
    /// Serializes allocations so two Services never take the same free address.
    alloc: tokio::sync::Mutex<()>,
    /// Last failure reported per Service uid: an unchanged failure is one Event, not
    /// one per retry.
    reported: Mutex<HashMap<String, String>>,
}

impl Ctx {
    fn first_report(&self, svc: &Service, msg: &str) -> bool {
        let uid = svc.uid().unwrap_or_default();
        self.reported
            .lock()
            .map(|mut r| r.insert(uid, msg.to_string()).as_deref() != Some(msg))
            .unwrap_or(true)
    }

    fn forget_report(&self, svc: &Service) {
        if let Ok(mut r) = self.reported.lock() {
            r.remove(&svc.uid().unwrap_or_default());
        }
    }
}

pub async fn run(client: Client, events: EventRecorder, cfg: ControllerConfig) {
    let Some(spec) = cfg.load_balancer_pool.as_deref() else {
        tracing::info!("no load balancer pool configured: LoadBalancer Services stay pending");
        return std::future::pending().await;
    };
    let pool = match parse_pool(spec) {
        Ok(p) => p,
        Err(e) => {
            // The binary validates flags first; the other controllers keep running.
            tracing::error!("service load balancer controller disabled: {e}");
            return std::future::pending().await;
        }
    };
    let api: Api<Service> = Api::all(client.clone());
    let ctx = Arc::new(Ctx {
        client,
        events,
        backoff: Backoff::default(),
        pool,
        alloc: tokio::sync::Mutex::new(()),
        reported: Mutex::new(HashMap::new()),
    });
    let ctrl = Controller::new(api, watcher::Config::default());
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(svc.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("service load balancer {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(svc.as_ref());
    if has_class(&svc) || svc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let action = if is_load_balancer(&svc) {
        ensure(&svc, &ctx).await?
    } else {
        if has_ingress(&svc) {
            release(&svc, &ctx).await?;
        }
        Action::await_change()
    };
    ctx.backoff.succeeded(&key);
    Ok(action)
}

/// The Service stopped being a LoadBalancer: its address goes back to the pool.
async fn release(svc: &Service, ctx: &Ctx) -> Result<()> {
    let ns = svc.namespace().unwrap_or_default();
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "metadata": {"resourceVersion": svc.resource_version()},
        "status": {"loadBalancer": {"ingress": null}},
    });
    match api
        .patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {
            tracing::info!("released load balancer address of service {}", key_of(svc));
            ctx.forget_report(svc);
            ctx.events.record(
                COMPONENT,
                svc,
                "Normal",
                "DeletedLoadBalancer",
                "Deleted load balancer",
            );
            Ok(())
        }
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn ensure(svc: &Service, ctx: &Ctx) -> Result<Action> {
    let ns = svc.namespace().unwrap_or_default();
    let name = svc.name_any();
    let key = key_of(svc);
    let all_api: Api<Service> = Api::all(ctx.client.clone());
    let api: Api<Service> = Api::namespaced(ctx.client.clone(), &ns);
    let _guard = ctx.alloc.lock().await;
    for _ in 0..ATTEMPTS {
        // Listed under the lock, after every earlier allocation's write returned, so
        // the used set includes them even if the watch cache has not caught up.
        let all = all_api.list(&ListParams::default()).await?.items;
        let Some(me) = all.iter().find(|s| key_of(*s) == key) else {
            return Ok(Action::await_change());
        };
        if !is_load_balancer(me) || has_class(me) || me.metadata.deletion_timestamp.is_some() {
            // Changed since the event; the next event handles it.
            return Ok(Action::await_change());
        }
        let choice = match requested_ip(me) {
            Err(msg) => Choice::RequestedUnavailable(msg),
            Ok(requested) => {
                let used = used_by_others(me, &all);
                choose(&ctx.pool, &used, status_ips(me).first().copied(), requested)
            }
        };
        let ip = match choice {
            Choice::Keep => {
                ctx.forget_report(me);
                return Ok(Action::await_change());
            }
            Choice::Assign(ip) => ip,
            Choice::RequestedUnavailable(why) => {
                let msg = format!("failed to allocate IP for {key}: {why}");
                report(ctx, me, &msg).await;
                return Ok(Action::requeue(RETRY));
            }
            Choice::Exhausted => {
                let msg = format!("no available IP in pool {}", ctx.pool);
                report(ctx, me, &msg).await;
                return Ok(Action::requeue(RETRY));
            }
        };
        let patch = json!({
            "metadata": {"resourceVersion": me.resource_version()},
            "status": {"loadBalancer": {"ingress": [{"ip": ip.to_string(), "ipMode": "VIP"}]}},
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!("assigned load balancer IP {ip} to service {key}");
                ctx.forget_report(me);
                ctx.events.record(
                    COMPONENT,
                    me,
                    "Normal",
                    "EnsuredLoadBalancer",
                    "Ensured load balancer",
                );
                return Ok(Action::await_change());
            }
            Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
            Err(e) if is_conflict(&e) => {
                tracing::debug!("service {key} changed while assigning its IP; retrying");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Other(format!(
        "service {key} kept changing while assigning its IP"
    )))
}

async fn report(ctx: &Ctx, svc: &Service, msg: &str) {
    if ctx.first_report(svc, msg) {
        tracing::warn!("service {}: {msg}", key_of(svc));
        ctx.events
            .record(COMPONENT, svc, "Warning", "AllocationFailed", msg);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LoadBalancerIngress, LoadBalancerStatus, ServiceSpec, ServiceStatus,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test IP")
    }

    fn set(ips: &[&str]) -> BTreeSet<Ipv4Addr> {
        ips.iter().map(|s| ip(s)).collect()
    }

    fn svc(name: &str, created: i64, status_ip: Option<&str>) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                creation_timestamp: Timestamp::from_second(created).ok().map(Time),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: status_ip.map(|i| {
                        vec![LoadBalancerIngress {
                            ip: Some(i.into()),
                            ..Default::default()
                        }]
                    }),
                }),
                conditions: None,
            }),
        }
    }

    #[test]
    fn parses_pools() {
        let p = parse_pool("172.18.255.200/29").expect("cidr");
        assert_eq!(
            (p.first, p.last),
            (
                u32::from(ip("172.18.255.200")),
                u32::from(ip("172.18.255.207"))
            )
        );
        let p = parse_pool(" 172.18.255.200 - 172.18.255.250 ").expect("range");
        assert!(p.contains(ip("172.18.255.250")));
        assert!(!p.contains(ip("172.18.255.251")));
        assert!(
            parse_pool("10.0.0.1")
                .expect("single")
                .contains(ip("10.0.0.1"))
        );
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-",
            "fd00::/64",
            "a-b",
            "10.0.0.0/",
            "10.0.0.256",
        ] {
            assert!(parse_pool(bad).is_err(), "{bad:?}");
        }
        let mut cfg = ControllerConfig::default();
        assert!(validate(&cfg).is_ok());
        cfg.load_balancer_pool = Some("nope".into());
        assert!(validate(&cfg).is_err());
    }

    #[test]
    fn allocates_lowest_free_and_keeps_current() {
        let pool = parse_pool("10.0.0.1-10.0.0.3").expect("pool");
        assert_eq!(
            choose(&pool, &set(&[]), None, None),
            Choice::Assign(ip("10.0.0.1"))
        );
        assert_eq!(
            choose(&pool, &set(&["10.0.0.1"]), None, None),
            Choice::Assign(ip("10.0.0.2"))
        );
        assert_eq!(
            choose(&pool, &set(&["10.0.0.1"]), Some(ip("10.0.0.3")), None),
            Choice::Keep
        );
        // Out of the pool (the pool changed) or taken by a senior Service: move.
        assert_eq!(
            choose(&pool, &set(&[]), Some(ip("192.168.0.1")), None),
            Choice::Assign(ip("10.0.0.1"))
        );
        assert_eq!(
            choose(&pool, &set(&["10.0.0.2"]), Some(ip("10.0.0.2")), None),
            Choice::Assign(ip("10.0.0.1"))
        );
        assert_eq!(
            choose(
                &pool,
                &set(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
                None,
                None
            ),
            Choice::Exhausted
        );
        let top = parse_pool("255.255.255.255/32").expect("pool");
        assert_eq!(
            choose(&top, &set(&[]), None, None),
            Choice::Assign(ip("255.255.255.255"))
        );
        assert_eq!(
            choose(&top, &set(&["255.255.255.255"]), None, None),
            Choice::Exhausted
        );
    }

    #[test]
    fn honours_requested_ip() {
        let pool = parse_pool("10.0.0.0/30").expect("pool");
        assert_eq!(
            choose(&pool, &set(&[]), None, Some(ip("10.0.0.2"))),
            Choice::Assign(ip("10.0.0.2"))
        );
        assert_eq!(
            choose(&pool, &set(&[]), Some(ip("10.0.0.2")), Some(ip("10.0.0.2"))),
            Choice::Keep
        );
        // A new request moves the Service.
        assert_eq!(
            choose(&pool, &set(&[]), Some(ip("10.0.0.0")), Some(ip("10.0.0.2"))),
            Choice::Assign(ip("10.0.0.2"))
        );
        assert!(matches!(
            choose(&pool, &set(&["10.0.0.2"]), None, Some(ip("10.0.0.2"))),
            Choice::RequestedUnavailable(m) if m.contains("in use")
        ));
        assert!(matches!(
            choose(&pool, &set(&[]), None, Some(ip("10.9.0.1"))),
            Choice::RequestedUnavailable(m) if m.contains("not in pool")
        ));
    }

    #[test]
    fn duplicates_resolve_by_seniority() {
        let old = svc("old", 100, Some("10.0.0.1"));
        let new = svc("new", 200, Some("10.0.0.1"));
        let other = svc("other", 50, Some("10.0.0.2"));
        let all = vec![old.clone(), new.clone(), other.clone()];
        assert_eq!(used_by_others(&old, &all), set(&["10.0.0.2"]));
        assert_eq!(used_by_others(&new, &all), set(&["10.0.0.1", "10.0.0.2"]));
        let pool = parse_pool("10.0.0.1-10.0.0.3").expect("pool");
        assert_eq!(
            choose(
                &pool,
                &used_by_others(&old, &all),
                Some(ip("10.0.0.1")),
                None
            ),
            Choice::Keep
        );
        assert_eq!(
            choose(
                &pool,
                &used_by_others(&new, &all),
                Some(ip("10.0.0.1")),
                None
            ),
            Choice::Assign(ip("10.0.0.3"))
        );
    }

    #[test]
    fn service_fields() {
        let mut s = svc("a", 1, None);
        assert!(is_load_balancer(&s) && !has_ingress(&s) && !has_class(&s));
        if let Some(spec) = s.spec.as_mut() {
            spec.load_balancer_ip = Some("bogus".into());
        }
        assert!(requested_ip(&s).is_err());
        assert!(has_ingress(&svc("a", 1, Some("10.0.0.1"))));
        assert_eq!(status_ips(&svc("a", 1, Some("x"))), Vec::<Ipv4Addr>::new());
    }
}
