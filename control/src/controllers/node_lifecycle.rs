//! Node lifecycle controller (kube-controller-manager's node lifecycle controller, with
//! TaintNodesByCondition and the NoExecute taint manager).
//!
//! Per Node, from the whole observed state:
//! - Health: the newest sign of life is the later of its Lease's renewTime (in
//!   kube-node-lease) and its Ready condition's lastHeartbeatTime. Older than the grace
//!   period means the kubelet is gone: Ready, MemoryPressure, DiskPressure and
//!   PIDPressure become Unknown, and its pods are marked not Ready so Endpoints drop them.
//! - Taints: Ready=False gives node.kubernetes.io/not-ready, Ready=Unknown
//!   node.kubernetes.io/unreachable, each as NoSchedule and NoExecute; Ready=True neither.
//! - Eviction: pods bound to a Node with NoExecute taints are deleted at once when they
//!   do not tolerate one, after the shortest tolerationSeconds when they do, never when
//!   they tolerate without a limit.
//!
//! A missing heartbeat produces no event, so every Node is requeued on a timer (and
//! exactly when it would go stale, or when a pod's toleration runs out).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::shared_pods::SharedPods;
use super::{
    Backoff, ControllerConfig, Error, Result, done_unless_error, is_not_found, key_of, now,
    now_timestamp,
};
use crate::events::EventRecorder;
use crate::objects::controller_ref;

const COMPONENT: &str = "node-controller";
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NO_EXECUTE: &str = "NoExecute";
const NO_SCHEDULE: &str = "NoSchedule";
/// The conditions the kubelet owns and that go Unknown when it stops reporting.
const KUBELET_CONDITIONS: [&str; 4] = ["Ready", "MemoryPressure", "DiskPressure", "PIDPressure"];
/// How long a reconcile waits for the Lease cache's first list: deciding staleness
/// without Leases would mark every lease-only node Unknown.
const LEASE_SYNC_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack added to a computed wake-up so the deadline has passed when we look.
const SLACK: Duration = Duration::from_millis(100);

/// Checks the parts of the config this controller reads.
pub fn validate(cfg: &ControllerConfig) -> Result<(), String> {
    if cfg.node_monitor_grace_period.is_zero() {
        return Err("node monitor grace period must be positive".into());
    }
    if cfg.default_toleration_seconds < 0 {
        return Err("default toleration seconds must not be negative".into());
    }
    Ok(())
}

/// The newest sign of life: Lease renewTime, Ready lastHeartbeatTime, or (for a node
/// that never reported) its creation.
pub fn newest_heartbeat(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let renew = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let ready = ready_condition(node)
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    [renew, ready, created].into_iter().flatten().max()
}

/// How long until a node with this newest heartbeat goes stale; zero once it is.
/// No heartbeat at all is no evidence either way: never stale.
pub fn until_stale(newest: Option<Timestamp>, now: Timestamp, grace: Duration) -> Option<Duration> {
    let newest = newest?;
    let age = now.as_microsecond().saturating_sub(newest.as_microsecond());
    let grace = i64::try_from(grace.as_micros()).unwrap_or(i64::MAX);
    let left = grace.saturating_sub(age).max(0);
    Some(Duration::from_micros(left as u64))
}

pub fn is_stale(newest: Option<Timestamp>, now: Timestamp, grace: Duration) -> bool {
    until_stale(newest, now, grace).is_some_and(|d| d.is_zero())
}

fn ready_condition(node: &Node) -> Option<&NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

pub fn ready_status(node: &Node) -> Option<&str> {
    ready_condition(node).map(|c| c.status.as_str())
}

/// The node's conditions with the kubelet's ones set Unknown, as Kubernetes does when
/// the kubelet stops posting; None when they already are.
pub fn unknown_conditions(node: &Node, now: &Time) -> Option<Vec<NodeCondition>> {
    let mut conds = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let mut changed = false;
    for ty in KUBELET_CONDITIONS {
        match conds.iter_mut().find(|c| c.type_ == ty) {
            Some(c) if c.status == "Unknown" => {}
            Some(c) => {
                c.status = "Unknown".into();
                c.reason = Some("NodeStatusUnknown".into());
                c.message = Some("Kubelet stopped posting node status.".into());
                c.last_transition_time = Some(now.clone());
                changed = true;
            }
            None => {
                conds.push(NodeCondition {
                    type_: ty.into(),
                    status: "Unknown".into(),
                    reason: Some("NodeStatusNeverUpdated".into()),
                    message: Some("Kubelet never posted node status.".into()),
                    last_heartbeat_time: node.metadata.creation_timestamp.clone(),
                    last_transition_time: Some(now.clone()),
                });
                changed = true;
            }
        }
    }
    changed.then_some(conds)
}

fn managed_key(key: &str) -> bool {
    key == TAINT_NOT_READY || key == TAINT_UNREACHABLE
}

/// The node's taints with not-ready/unreachable matching its Ready status (other
/// taints untouched, existing ones keep their timeAdded); None when nothing changes.
/// Without a Ready condition the node has not reported yet: its taints are left alone.
pub fn desired_taints(current: &[Taint], ready: Option<&str>, now: &Time) -> Option<Vec<Taint>> {
    let want_key = match ready? {
        "True" => None,
        "False" => Some(TAINT_NOT_READY),
        "Unknown" => Some(TAINT_UNREACHABLE),
        _ => return None,
    };
    let wanted = |t: &Taint| {
        Some(t.key.as_str()) == want_key && (t.effect == NO_EXECUTE || t.effect == NO_SCHEDULE)
    };
    let mut out: Vec<Taint> = current
        .iter()
        .filter(|t| !managed_key(&t.key) || wanted(t))
        .cloned()
        .collect();
    if let Some(key) = want_key {
        for effect in [NO_SCHEDULE, NO_EXECUTE] {
            if !out.iter().any(|t| t.key == key && t.effect == effect) {
                out.push(Taint {
                    key: key.into(),
                    effect: effect.into(),
                    value: None,
                    // The taint manager counts tolerationSeconds from here.
                    time_added: (effect == NO_EXECUTE).then(|| now.clone()),
                });
            }
        }
    }
    (out != current).then_some(out)
}

/// Kubernetes' ToleratesTaint.
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    if let Some(e) = tol.effect.as_deref().filter(|e| !e.is_empty())
        && e != taint.effect
    {
        return false;
    }
    if let Some(k) = tol.key.as_deref().filter(|k| !k.is_empty())
        && k != taint.key
    {
        return false;
    }
    match tol.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "" | "Equal" => tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        _ => false,
    }
}

fn no_execute_toleration(key: &str, seconds: Option<i64>) -> Toleration {
    Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(NO_EXECUTE.into()),
        toleration_seconds: seconds,
        value: None,
    }
}

/// The pod's tolerations plus those Kubernetes would have added: unlimited
/// not-ready/unreachable for DaemonSet pods (the DaemonSet controller adds them), and
/// `default_seconds` for pods that tolerate neither (DefaultTolerationSeconds admission,
/// which skiff's apiserver does not run).
pub fn effective_tolerations(pod: &Pod, default_seconds: i64) -> Vec<Toleration> {
    let mut tols = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let daemon = controller_ref(&pod.metadata).is_some_and(|o| o.kind == "DaemonSet");
    for key in [TAINT_NOT_READY, TAINT_UNREACHABLE] {
        // The admission plugin's test: a toleration for this key (or any key) whose
        // effect is NoExecute (or any effect).
        let covered = tols.iter().any(|t| {
            t.key.as_deref().is_none_or(|k| k.is_empty() || k == key)
                && t.effect
                    .as_deref()
                    .is_none_or(|e| e.is_empty() || e == NO_EXECUTE)
        });
        if !covered {
            let seconds = (!daemon).then_some(default_seconds);
            tols.push(no_execute_toleration(key, seconds));
        }
    }
    tols
}

/// When the taint manager deletes a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    Now,
    At(Timestamp),
    Never,
}

/// Eviction of a pod with `tolerations` (already effective) on a node with `taints`.
/// `added` gives each taint's start time (its timeAdded, or when it was first seen).
/// A taint tolerated by several tolerations counts the shortest limited one; the pod
/// goes at the earliest deadline over all NoExecute taints.
pub fn eviction(
    taints: &[Taint],
    tolerations: &[Toleration],
    added: impl Fn(&Taint) -> Timestamp,
    now: Timestamp,
) -> Eviction {
    let mut earliest: Option<i64> = None;
    for taint in taints.iter().filter(|t| t.effect == NO_EXECUTE) {
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        if matching.is_empty() {
            return Eviction::Now;
        }
        let Some(seconds) = matching.iter().filter_map(|t| t.toleration_seconds).min() else {
            continue;
        };
        let deadline = added(taint)
            .as_microsecond()
            .saturating_add(seconds.max(0).saturating_mul(1_000_000));
        earliest = Some(earliest.map_or(deadline, |e| e.min(deadline)));
    }
    match earliest {
        None => Eviction::Never,
        Some(d) if d <= now.as_microsecond() => Eviction::Now,
        Some(d) => Timestamp::from_microsecond(d).map_or(Eviction::Now, Eviction::At),
    }
}

/// How often every node is looked at regardless of events.
fn tick(grace: Duration) -> Duration {
    (grace / 4).max(Duration::from_secs(1))
}

fn no_execute_taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == NO_EXECUTE)
        .cloned()
        .collect()
}

/// Nodes whose pods need attention (eviction or being marked not Ready).
fn needs_pod_work(node: &Node) -> bool {
    ready_status(node) == Some("Unknown") || !no_execute_taints(node).is_empty()
}

pub struct Ctx {
    client: Client,
    events: EventRecorder,
    backoff: Backoff,
    leases: Store<Lease>,
    grace: Duration,
    default_toleration_seconds: i64,
    /// When a NoExecute taint without timeAdded was first seen, per node and taint, so
    /// its tolerationSeconds run from a fixed point.
    first_seen: Mutex<HashMap<String, HashMap<String, Timestamp>>>,
}

fn taint_id(t: &Taint) -> String {
    format!(
        "{}={}:{}",
        t.key,
        t.value.as_deref().unwrap_or(""),
        t.effect
    )
}

impl Ctx {
    /// Start times for the node's current NoExecute taints (forgetting removed ones).
    fn taint_starts(
        &self,
        node: &str,
        taints: &[Taint],
        now: Timestamp,
    ) -> HashMap<String, Timestamp> {
        let mut all = match self.first_seen.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let seen = all.entry(node.to_string()).or_default();
        seen.retain(|id, _| taints.iter().any(|t| taint_id(t) == *id));
        let mut out = HashMap::new();
        for t in taints {
            let start = match &t.time_added {
                Some(ta) => ta.0,
                None => *seen.entry(taint_id(t)).or_insert(now),
            };
            out.insert(taint_id(t), start);
        }
        if seen.is_empty() {
            all.remove(node);
        }
        out
    }
}

pub async fn run(
    client: Client,
    events: EventRecorder,
    cfg: ControllerConfig,
    shared_pods: Arc<SharedPods>,
) {
    if let Err(e) = validate(&cfg) {
        tracing::error!("node lifecycle controller disabled: {e}");
        return std::future::pending().await;
    }
    let nodes: Api<Node> = Api::all(client.clone());
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let (lease_store, lease_writer) = reflector::store();
    let lease_events = reflector::reflector(
        lease_writer,
        watcher(leases, watcher::Config::default()).default_backoff(),
    )
    .applied_objects();

    let ctrl = Controller::new(nodes, watcher::Config::default());
    let node_store = ctrl.store();
    let ctrl = ctrl
        // A renewal can end staleness; the Lease is named after its node.
        .watches_stream(lease_events, |l: Lease| Some(ObjectRef::new(&l.name_any())))
        // A pod landing on (or changing on) an unhealthy node needs a decision. Healthy
        // nodes are not woken by their pods.
        .watches_shared_stream(shared_pods.events(), move |p: Arc<Pod>| {
            let node = p.spec.as_ref().and_then(|s| s.node_name.clone())?;
            let r = ObjectRef::new(&node);
            node_store
                .get(&r)
                .is_some_and(|n| needs_pod_work(&n))
                .then_some(r)
        });
    let ctx = Arc::new(Ctx {
        client,
        events,
        backoff: Backoff::default(),
        leases: lease_store,
        grace: cfg.node_monitor_grace_period,
        default_toleration_seconds: cfg.default_toleration_seconds,
        first_seen: Mutex::new(HashMap::new()),
    });
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(node: Arc<Node>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(node.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("node lifecycle {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action> {
    let name = node.name_any();
    let api: Api<Node> = Api::all(ctx.client.clone());
    match tokio::time::timeout(LEASE_SYNC_TIMEOUT, ctx.leases.wait_until_ready()).await {
        Ok(Ok(())) => {}
        _ => return Err(Error::Other("node lease cache not synced yet".into())),
    }
    let now_ts = now_timestamp();
    let now_time = Time(now_ts);
    let lease = ctx
        .leases
        .get(&ObjectRef::new(&name).within(LEASE_NAMESPACE));
    let newest = newest_heartbeat(&node, lease.as_deref());
    let mut next = tick(ctx.grace);
    let mut node: Node = (*node).clone();

    match until_stale(newest, now_ts, ctx.grace) {
        Some(left) if left.is_zero() => {
            if let Some(conds) = unknown_conditions(&node, &now_time) {
                let patch = json!({
                    "metadata": {"resourceVersion": node.resource_version()},
                    "status": {"conditions": conds},
                });
                match api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(n) => node = n,
                    Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
                    Err(e) => return Err(e.into()),
                }
                tracing::info!(
                    "node {name}: no heartbeat within {:?}, status Unknown",
                    ctx.grace
                );
                let msg = format!("Node {name} status is now: NodeNotReady");
                ctx.events
                    .record(COMPONENT, &node, "Normal", "NodeNotReady", &msg);
            }
        }
        Some(left) => next = next.min(left + SLACK),
        None => {}
    }

    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    if let Some(new) = desired_taints(&taints, ready_status(&node), &now_time) {
        let patch = json!({
            "metadata": {"resourceVersion": node.resource_version()},
            "spec": {"taints": if new.is_empty() { None } else { Some(&new) }},
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(n) => node = n,
            Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            "node {name}: Ready={} taints now {:?}",
            ready_status(&node).unwrap_or("<none>"),
            new.iter().map(taint_id).collect::<Vec<_>>()
        );
    }

    if needs_pod_work(&node)
        && let Some(wake) = pods_on_node(&node, &ctx, now_ts).await?
    {
        next = next.min(wake + SLACK);
    }
    ctx.backoff.succeeded(&key_of(&node));
    Ok(Action::requeue(next))
}

/// Marks the pods of an Unknown node not Ready and runs the taint manager over them.
/// Returns how soon the next toleration runs out, if one will. One failing pod does not
/// stop the others; the first failure is returned at the end.
async fn pods_on_node(node: &Node, ctx: &Ctx, now_ts: Timestamp) -> Result<Option<Duration>> {
    let name = node.name_any();
    let all: Api<Pod> = Api::all(ctx.client.clone());
    let pods = all
        .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
        .await?
        .items;
    let unknown = ready_status(node) == Some("Unknown");
    let taints = no_execute_taints(node);
    let starts = ctx.taint_starts(&name, &taints, now_ts);
    let mut wake: Option<Duration> = None;
    let mut failure: Option<Error> = None;
    for pod in pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
    {
        // The list was by field selector; a server ignoring it must not cost pods.
        if pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) != Some(name.as_str()) {
            continue;
        }
        let tols = effective_tolerations(pod, ctx.default_toleration_seconds);
        let when = eviction(
            &taints,
            &tols,
            |t| starts.get(&taint_id(t)).copied().unwrap_or(now_ts),
            now_ts,
        );
        let r = match when {
            Eviction::Now => evict(pod, ctx).await,
            Eviction::At(t) => {
                let left = t
                    .as_microsecond()
                    .saturating_sub(now_ts.as_microsecond())
                    .max(0);
                let left = Duration::from_micros(left as u64);
                wake = Some(wake.map_or(left, |w| w.min(left)));
                if unknown {
                    mark_not_ready(pod, ctx).await
                } else {
                    Ok(())
                }
            }
            Eviction::Never if unknown => mark_not_ready(pod, ctx).await,
            Eviction::Never => Ok(()),
        };
        if let Err(e) = r {
            tracing::warn!("node {name}: pod {}: {e}", key_of(pod));
            failure.get_or_insert(e);
        }
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(wake),
    }
}

async fn evict(pod: &Pod, ctx: &Ctx) -> Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let msg = format!("Marking for deletion Pod {ns}/{}", pod.name_any());
    ctx.events
        .record(COMPONENT, pod, "Normal", "TaintManagerEviction", &msg);
    tracing::info!("{msg}");
    let dp = DeleteParams {
        // Not a same-named successor (StatefulSet pods reuse names).
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name_any(), &dp).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        // A uid precondition failure: the pod we judged is gone.
        Err(e) if super::is_conflict(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// MarkPodsNotReady: the kubelet cannot report for pods on a lost node, so their Ready
/// condition is set False here and Endpoints stop routing to them.
async fn mark_not_ready(pod: &Pod, ctx: &Ctx) -> Result<()> {
    let Some(conds) = pod.status.as_ref().and_then(|s| s.conditions.as_ref()) else {
        return Ok(());
    };
    if !conds
        .iter()
        .any(|c| c.type_ == "Ready" && c.status != "False")
    {
        return Ok(());
    }
    let t = now();
    let conds: Vec<_> = conds
        .iter()
        .cloned()
        .map(|mut c| {
            if c.type_ == "Ready" {
                c.status = "False".into();
                c.last_transition_time = Some(t.clone());
            }
            c
        })
        .collect();
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = json!({
        "metadata": {"resourceVersion": pod.resource_version()},
        "status": {"conditions": conds},
    });
    done_unless_error(
        api.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await,
    )?;
    ctx.events.record(
        COMPONENT,
        pod,
        "Warning",
        "NodeNotReady",
        "Node is not ready",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use k8s_openapi::api::core::v1::{NodeStatus, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).expect("test time")
    }

    fn cond(ty: &str, status: &str, hb: Option<i64>) -> NodeCondition {
        NodeCondition {
            type_: ty.into(),
            status: status.into(),
            last_heartbeat_time: hb.map(|s| Time(ts(s))),
            ..Default::default()
        }
    }

    fn node(created: i64, conds: Vec<NodeCondition>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some("n1".into()),
                creation_timestamp: Some(Time(ts(created))),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                conditions: Some(conds),
                ..Default::default()
            }),
        }
    }

    fn lease(renew: i64) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(ts(renew))),
                ..Default::default()
            }),
        }
    }

    fn taint(key: &str, effect: &str, added: Option<i64>) -> Taint {
        Taint {
            key: key.into(),
            effect: effect.into(),
            value: None,
            time_added: added.map(|s| Time(ts(s))),
        }
    }

    fn tol(key: Option<&str>, op: &str, effect: Option<&str>, secs: Option<i64>) -> Toleration {
        Toleration {
            key: key.map(Into::into),
            operator: Some(op.into()),
            effect: effect.map(Into::into),
            toleration_seconds: secs,
            value: None,
        }
    }

    #[test]
    fn heartbeat_staleness() {
        let grace = Duration::from_secs(40);
        let n = node(0, vec![cond("Ready", "True", Some(100))]);
        // The lease is newer than the Ready heartbeat: it counts.
        let l = lease(200);
        let newest = newest_heartbeat(&n, Some(&l));
        assert_eq!(newest, Some(ts(200)));
        assert!(!is_stale(newest, ts(239), grace));
        assert!(is_stale(newest, ts(241), grace));
        assert_eq!(
            until_stale(newest, ts(230), grace),
            Some(Duration::from_secs(10))
        );
        // No lease: the Ready heartbeat, then the creation time.
        assert_eq!(newest_heartbeat(&n, None), Some(ts(100)));
        assert_eq!(newest_heartbeat(&node(5, vec![]), None), Some(ts(5)));
        // A heartbeat from the future (clock skew) is not stale.
        assert!(!is_stale(Some(ts(500)), ts(100), grace));
        assert!(!is_stale(None, ts(100), grace));
    }

    #[test]
    fn conditions_go_unknown_once() {
        let t = Time(ts(1000));
        let n = node(
            0,
            vec![
                cond("Ready", "True", Some(10)),
                cond("MemoryPressure", "False", Some(10)),
                cond("NetworkUnavailable", "False", None),
            ],
        );
        let conds = unknown_conditions(&n, &t).expect("changed");
        let get = |ty: &str| conds.iter().find(|c| c.type_ == ty).expect("condition");
        let ready = get("Ready");
        assert_eq!(ready.status, "Unknown");
        assert_eq!(ready.reason.as_deref(), Some("NodeStatusUnknown"));
        assert_eq!(
            ready.message.as_deref(),
            Some("Kubelet stopped posting node status.")
        );
        assert_eq!(ready.last_heartbeat_time, Some(Time(ts(10))));
        assert_eq!(ready.last_transition_time, Some(t.clone()));
        assert_eq!(
            get("DiskPressure").reason.as_deref(),
            Some("NodeStatusNeverUpdated")
        );
        assert_eq!(get("PIDPressure").status, "Unknown");
        assert_eq!(get("NetworkUnavailable").status, "False");
        let n2 = node(0, conds);
        assert_eq!(unknown_conditions(&n2, &t), None);
    }

    #[test]
    fn taints_follow_ready() {
        let t = Time(ts(50));
        let other = taint("dedicated", "NoSchedule", None);
        let unknown =
            desired_taints(std::slice::from_ref(&other), Some("Unknown"), &t).expect("changed");
        assert_eq!(unknown.len(), 3);
        assert_eq!(unknown[0], other);
        let ne = unknown
            .iter()
            .find(|x| x.key == TAINT_UNREACHABLE && x.effect == NO_EXECUTE)
            .expect("unreachable NoExecute");
        assert_eq!(ne.time_added, Some(t.clone()));
        assert!(unknown.iter().any(|x| x.key == TAINT_UNREACHABLE
            && x.effect == NO_SCHEDULE
            && x.time_added.is_none()));
        // Stable: nothing to write the second time, and timeAdded is kept.
        assert_eq!(
            desired_taints(&unknown, Some("Unknown"), &Time(ts(99))),
            None
        );
        // Unknown -> False swaps unreachable for not-ready.
        let not_ready = desired_taints(&unknown, Some("False"), &t).expect("changed");
        assert!(not_ready.iter().all(|x| x.key != TAINT_UNREACHABLE));
        assert_eq!(
            not_ready
                .iter()
                .filter(|x| x.key == TAINT_NOT_READY)
                .count(),
            2
        );
        // Ready again: only the foreign taint is left.
        assert_eq!(
            desired_taints(&not_ready, Some("True"), &t),
            Some(vec![other.clone()])
        );
        assert_eq!(
            desired_taints(std::slice::from_ref(&other), Some("True"), &t),
            None
        );
        // No Ready condition yet: hands off.
        assert_eq!(desired_taints(&not_ready, None, &t), None);
    }

    #[test]
    fn toleration_matching() {
        let t = Taint {
            value: Some("v".into()),
            ..taint("k", "NoExecute", None)
        };
        assert!(tolerates(&tol(Some("k"), "Exists", None, None), &t));
        assert!(tolerates(&tol(None, "Exists", None, None), &t));
        assert!(!tolerates(
            &tol(Some("k"), "Exists", Some("NoSchedule"), None),
            &t
        ));
        assert!(!tolerates(&tol(Some("other"), "Exists", None, None), &t));
        let mut eq = tol(Some("k"), "Equal", Some("NoExecute"), None);
        assert!(!tolerates(&eq, &t));
        eq.value = Some("v".into());
        assert!(tolerates(&eq, &t));
        eq.operator = None;
        assert!(tolerates(&eq, &t));
        eq.operator = Some("Gt".into());
        assert!(!tolerates(&eq, &t));
    }

    fn pod(tols: Vec<Toleration>, owner_kind: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                owner_references: owner_kind.map(|k| {
                    vec![OwnerReference {
                        kind: k.into(),
                        controller: Some(true),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            spec: Some(PodSpec {
                tolerations: Some(tols),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn eviction_deadlines() {
        let unreachable = [taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(1000))];
        let start = |t: &Taint| t.time_added.as_ref().map_or(ts(0), |a| a.0);
        let now = ts(1010);

        // No toleration: the default 300 s applies from timeAdded.
        let tols = effective_tolerations(&pod(vec![], None), 300);
        assert_eq!(tols.len(), 2);
        assert_eq!(
            eviction(&unreachable, &tols, start, now),
            Eviction::At(ts(1300))
        );
        assert_eq!(
            eviction(&unreachable, &tols, start, ts(1300)),
            Eviction::Now
        );

        // The pod's own toleration wins over the default, and the shortest counts.
        let own = vec![
            tol(Some(TAINT_UNREACHABLE), "Exists", Some(NO_EXECUTE), Some(5)),
            tol(
                Some(TAINT_UNREACHABLE),
                "Exists",
                Some(NO_EXECUTE),
                Some(60),
            ),
        ];
        let tols = effective_tolerations(&pod(own, None), 300);
        assert_eq!(eviction(&unreachable, &tols, start, now), Eviction::Now);
        assert_eq!(
            eviction(&unreachable, &tols, start, ts(1001)),
            Eviction::At(ts(1005))
        );

        // Unlimited toleration, DaemonSet pods: never.
        let forever = vec![tol(Some(TAINT_UNREACHABLE), "Exists", None, None)];
        let tols = effective_tolerations(&pod(forever, None), 300);
        assert_eq!(eviction(&unreachable, &tols, start, now), Eviction::Never);
        let ds = effective_tolerations(&pod(vec![], Some("DaemonSet")), 300);
        assert_eq!(eviction(&unreachable, &ds, start, now), Eviction::Never);
        // A wildcard toleration covers both keys, so no defaults are added.
        let all = effective_tolerations(&pod(vec![tol(None, "Exists", None, None)], None), 300);
        assert_eq!(all.len(), 1);

        // A NoExecute taint nobody tolerates: now, even next to a tolerated one.
        let mut taints = unreachable.to_vec();
        taints.push(taint("example.com/drain", NO_EXECUTE, Some(1000)));
        let tols = effective_tolerations(&pod(vec![], None), 300);
        assert_eq!(eviction(&taints, &tols, start, now), Eviction::Now);
        // NoSchedule taints do not evict.
        let ns = [taint("example.com/x", NO_SCHEDULE, None)];
        assert_eq!(eviction(&ns, &tols, start, now), Eviction::Never);
        // Zero or negative seconds: now.
        let zero = vec![tol(Some(TAINT_UNREACHABLE), "Exists", None, Some(-3))];
        let tols = effective_tolerations(&pod(zero, None), 300);
        assert_eq!(eviction(&unreachable, &tols, start, now), Eviction::Now);
        // Several deadlines: the earliest over all taints.
        let both = [
            taint(TAINT_UNREACHABLE, NO_EXECUTE, Some(1000)),
            taint(TAINT_NOT_READY, NO_EXECUTE, Some(1100)),
        ];
        let tols = effective_tolerations(&pod(vec![], None), 300);
        assert_eq!(eviction(&both, &tols, start, now), Eviction::At(ts(1300)));
    }

    #[test]
    fn config_checks() {
        assert!(validate(&ControllerConfig::default()).is_ok());
        let cfg = ControllerConfig {
            default_toleration_seconds: -1,
            ..Default::default()
        };
        assert!(validate(&cfg).is_err());
        assert_eq!(tick(Duration::from_secs(40)), Duration::from_secs(10));
        assert_eq!(tick(Duration::from_secs(2)), Duration::from_secs(1));
    }
}
