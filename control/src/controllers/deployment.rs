//! Deployment controller: rolls a Deployment's pod template out through ReplicaSets, as
//! kube-controller-manager's does (pkg/controller/deployment).
//!
//! Input: Deployments, plus ReplicaSets (an RS event wakes its controlling Deployment, or
//! for an orphan every Deployment in its namespace whose selector matches, so it can be
//! adopted). Pods are not watched: the ReplicaSet controller folds pod changes into RS
//! status, which wakes us. The one place pods matter (Recreate waits until the old pods
//! are gone) lists them and polls.
//!
//! Each reconcile reads the Deployment and the namespace's ReplicaSets fresh from the
//! apiserver (the watch cache can lag our own writes), then hands them to [`plan`], a
//! pure function that decides every write of this sync: create the new RS, scale RSs,
//! delete RSs beyond the history limit, the revision annotation and the new status. The
//! async side only executes that plan, so all the rollout arithmetic is unit-tested.
//!
//! Output: ReplicaSet creates, scale patches (spec.replicas plus the
//! deployment.kubernetes.io annotations), deletes, adoption/release, the Deployment's
//! revision annotation and status, and ScalingReplicaSet events.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentSpec, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::{
    Backoff, ControllerConfig, Error, Result, done_unless_error, is_conflict, is_not_found, key_of,
};
use crate::events::EventRecorder;
use crate::objects::{controller_ref, selector_matches};

const COMPONENT: &str = "deployment-controller";

/// Label that keeps the ReplicaSets of one Deployment from selecting each other's pods.
pub const HASH_LABEL: &str = "pod-template-hash";
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Earlier revisions of an RS that a rollback brought back (comma-separated).
pub const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
pub const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
pub const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
/// Deployment annotations that are not copied to its new ReplicaSet.
const SKIP_COPY: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];
/// Kubernetes caps the revision-history annotation (--max-rev-history-length, 2000).
const MAX_REVISION_HISTORY_CHARS: usize = 2000;

const AVAILABLE: &str = "Available";
const PROGRESSING: &str = "Progressing";
const REPLICA_FAILURE: &str = "ReplicaFailure";
const MIN_AVAILABLE: &str = "MinimumReplicasAvailable";
const MIN_UNAVAILABLE: &str = "MinimumReplicasUnavailable";
const NEW_RS_CREATED: &str = "NewReplicaSetCreated";
const FOUND_NEW_RS: &str = "FoundNewReplicaSet";
const RS_UPDATED: &str = "ReplicaSetUpdated";
const NEW_RS_AVAILABLE: &str = "NewReplicaSetAvailable";
const TIMED_OUT: &str = "ProgressDeadlineExceeded";
const PAUSED: &str = "DeploymentPaused";
const RESUMED: &str = "DeploymentResumed";

/// How often a Recreate rollout re-checks for old pods that are still terminating: the
/// final removal of a pod changes no ReplicaSet, so nothing we watch would wake us.
const RECREATE_POLL: Duration = Duration::from_secs(1);

pub struct Ctx {
    client: Client,
    events: EventRecorder,
    backoff: Backoff,
}

pub async fn run(client: Client, events: EventRecorder, cfg: ControllerConfig) {
    // Nothing on the controller-manager command line concerns Deployments yet.
    let _ = cfg;
    let d_api: Api<Deployment> = Api::all(client.clone());
    let rs_api: Api<ReplicaSet> = Api::all(client.clone());
    let ctrl = Controller::new(d_api, watcher::Config::default());
    let store = ctrl.store();
    let ctrl = ctrl.watches(rs_api, watcher::Config::default(), move |rs: ReplicaSet| {
        let ns = rs.namespace().unwrap_or_default();
        if let Some(owner) = controller_ref(&rs.metadata) {
            if owner.kind == "Deployment" {
                return vec![ObjectRef::new(&owner.name).within(&ns)];
            }
            return vec![];
        }
        // An orphan: every Deployment that could adopt it.
        store
            .state()
            .iter()
            .filter(|d| d.namespace().as_deref() == Some(ns.as_str()))
            .filter(|d| selector_matches(&Some(&d.spec.selector), rs.labels()))
            .map(|d| ObjectRef::from_obj(d.as_ref()))
            .collect()
    });
    let ctx = Arc::new(Ctx {
        client,
        events,
        backoff: Backoff::default(),
    });
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(d: Arc<Deployment>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(d.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("deployment {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

async fn reconcile(obj: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(obj.as_ref());
    let ns = obj.namespace().unwrap_or_default();
    let d_api: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    // Plan from the stored object, not the watch cache: our last status write (collision
    // count, conditions) may not have come back through the watch yet.
    let d = match d_api.get(&obj.name_any()).await {
        Ok(d) => d,
        Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
        Err(e) => return Err(e.into()),
    };
    // The garbage collector owns a Deployment being deleted (and its ReplicaSets).
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = match check_spec(&d) {
        Ok(s) => s,
        Err((reason, msg)) => {
            // Retrying cannot fix the spec; its next edit wakes us.
            tracing::warn!("deployment {key}: {msg}");
            ctx.events.record(COMPONENT, &d, "Warning", reason, &msg);
            ctx.backoff.succeeded(&key);
            return Ok(Action::await_change());
        }
    };

    let rs_api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &ns);
    let all = rs_api.list(&ListParams::default()).await?.items;
    let owned = claim(&rs_api, &d, spec, all).await?;

    // Recreate must not start new pods while any old one still runs (even terminating),
    // so before it scales the new RS up it looks at the pods themselves.
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let current = |rs: &ReplicaSet| {
        rs.spec
            .template
            .as_ref()
            .is_some_and(|t| equal_ignore_hash(t, &spec.template))
    };
    let has_old = owned.iter().any(|rs| !current(rs));
    let new_full = owned
        .iter()
        .any(|rs| current(rs) && rs.spec.replicas == Some(spec.replicas.unwrap_or(1)));
    let mut pods_by_rs = HashMap::new();
    if recreate && !spec.paused.unwrap_or(false) && has_old && !new_full {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        for p in pods.list(&ListParams::default()).await?.items {
            let terminal = matches!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            if let (false, Some(o)) = (terminal, controller_ref(&p.metadata)) {
                *pods_by_rs.entry(o.uid.clone()).or_insert(0) += 1;
            }
        }
    }

    let plan = match plan(&d, owned, &pods_by_rs, super::now_timestamp()) {
        Ok(p) => p,
        Err(msg) => {
            tracing::warn!("deployment {key}: {msg}");
            ctx.events
                .record(COMPONENT, &d, "Warning", "InvalidSpec", &msg);
            ctx.backoff.succeeded(&key);
            return Ok(Action::await_change());
        }
    };
    execute(&ctx, &d_api, &rs_api, &d, &plan).await?;
    ctx.backoff.succeeded(&key);
    Ok(plan
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

/// The spec, or why it cannot be acted on (reason, message). Validation rejects these,
/// but a bad object must cost a Warning, not a crash loop.
fn check_spec(d: &Deployment) -> std::result::Result<&DeploymentSpec, (&'static str, String)> {
    let spec = &d.spec;
    let sel = &spec.selector;
    if sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
    {
        return Err((
            "SelectingAll",
            "This deployment is selecting all pods. A non-empty selector is required.".into(),
        ));
    }
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    if !selector_matches(&Some(sel), &labels) {
        return Err((
            "InvalidSelector",
            "selector does not match template labels".into(),
        ));
    }
    if spec
        .template
        .spec
        .as_ref()
        .is_none_or(|s| s.containers.is_empty())
    {
        return Err((
            "InvalidTemplate",
            "Deployment's pod template has no containers".into(),
        ));
    }
    Ok(spec)
}

/// Adopts orphan ReplicaSets the selector matches and releases owned ones it no longer
/// matches (kube-controller-manager's ClaimReplicaSets). Returns the owned ones.
async fn claim(
    api: &Api<ReplicaSet>,
    d: &Deployment,
    spec: &DeploymentSpec,
    all: Vec<ReplicaSet>,
) -> Result<Vec<ReplicaSet>> {
    let uid = d.uid().unwrap_or_default();
    let mut owned = Vec::new();
    for rs in all {
        let matches = selector_matches(&Some(&spec.selector), rs.labels());
        let deleting = rs.metadata.deletion_timestamp.is_some();
        match controller_ref(&rs.metadata) {
            Some(o) if o.uid == uid => {
                if matches {
                    owned.push(rs);
                } else if !deleting {
                    let refs: Vec<&OwnerReference> = rs
                        .owner_references()
                        .iter()
                        .filter(|o| o.uid != uid)
                        .collect();
                    let patch = json!({"metadata": {
                        "resourceVersion": rs.resource_version(), "ownerReferences": refs}});
                    done_unless_error(
                        api.patch(
                            &rs.name_any(),
                            &PatchParams::default(),
                            &Patch::Merge(&patch),
                        )
                        .await,
                    )?;
                }
            }
            Some(_) => {}
            None if matches && !deleting => {
                let mut refs = rs.owner_references().to_vec();
                refs.push(owner_ref(d));
                // The resourceVersion makes this fail if someone else adopted it meanwhile.
                let patch = json!({"metadata": {
                    "resourceVersion": rs.resource_version(), "ownerReferences": refs}});
                match api
                    .patch(
                        &rs.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                {
                    Ok(rs) => owned.push(rs),
                    Err(e) if is_not_found(&e) => {}
                    Err(e) if is_conflict(&e) => {
                        return Err(Error::Other(format!(
                            "replicaset {} changed while adopting it",
                            rs.name_any()
                        )));
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None => {}
        }
    }
    Ok(owned)
}

fn owner_ref(d: &Deployment) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "Deployment".into(),
        name: d.name_any(),
        uid: d.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Carries out a plan in Kubernetes' order: the new RS, scaling, the Deployment's
/// revision, status, then history cleanup. The first failed write fails the reconcile
/// (it is retried with backoff and re-planned from fresh state).
async fn execute(
    ctx: &Ctx,
    d_api: &Api<Deployment>,
    rs_api: &Api<ReplicaSet>,
    d: &Deployment,
    plan: &Plan,
) -> Result<()> {
    let events = &ctx.events;
    if let Some(rs) = &plan.create {
        let name = rs.name_any();
        match rs_api.create(&PostParams::default(), rs).await {
            Ok(_) => {
                let n = replicas_of(rs);
                if n > 0 {
                    let msg = format!("Scaled up replica set {name} from 0 to {n}");
                    events.record(COMPONENT, d, "Normal", "ScalingReplicaSet", &msg);
                }
            }
            Err(e) if is_conflict(&e) => return collision(d_api, rs_api, d, &name).await,
            Err(e) => {
                let msg = format!("Failed to create new replica set \"{name}\": {e}");
                events.record(COMPONENT, d, "Warning", "ReplicaSetCreateError", &msg);
                return Err(e.into());
            }
        }
    }
    for u in &plan.updates {
        let mut patch = json!({});
        if !u.annotations.is_empty() {
            patch["metadata"] = json!({"annotations": u.annotations});
        }
        if u.from != u.to {
            patch["spec"]["replicas"] = json!(u.to);
        }
        if let Some(m) = u.min_ready_seconds {
            patch["spec"]["minReadySeconds"] = json!(m);
        }
        let r = rs_api
            .patch(&u.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await;
        done_unless_error(r)?;
        if u.from != u.to {
            let dir = if u.to > u.from { "up" } else { "down" };
            let msg = format!(
                "Scaled {dir} replica set {} from {} to {}",
                u.name, u.from, u.to
            );
            events.record(COMPONENT, d, "Normal", "ScalingReplicaSet", &msg);
        }
    }
    if let Some(rev) = &plan.revision {
        let patch = json!({"metadata": {"annotations": {REVISION: rev}}});
        done_unless_error(
            d_api
                .patch(
                    &d.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await,
        )?;
    }
    if let Some(status) = &plan.status {
        let patch = json!({"status": status_patch(status)});
        done_unless_error(
            d_api
                .patch_status(
                    &d.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await,
        )?;
    }
    for (name, uid) in &plan.deletes {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        done_unless_error(rs_api.delete(name, &dp).await)?;
    }
    Ok(())
}

/// The new RS's name is taken. If it is ours with our template the list was just stale;
/// otherwise it is a hash collision: bump status.collisionCount so the next attempt
/// hashes to another name.
async fn collision(
    d_api: &Api<Deployment>,
    rs_api: &Api<ReplicaSet>,
    d: &Deployment,
    name: &str,
) -> Result<()> {
    let existing = rs_api.get_opt(name).await?;
    let ours = existing.as_ref().is_some_and(|rs| {
        controller_ref(&rs.metadata).is_some_and(|o| Some(&o.uid) == d.metadata.uid.as_ref())
            && rs
                .spec
                .template
                .as_ref()
                .is_some_and(|t| equal_ignore_hash(t, &d.spec.template))
    });
    if ours || existing.is_none() {
        return Err(Error::Other(format!(
            "replicaset {name} changed while creating it"
        )));
    }
    let count = d
        .status
        .as_ref()
        .and_then(|s| s.collision_count)
        .unwrap_or(0)
        .saturating_add(1);
    let patch = json!({
        "metadata": {"resourceVersion": d.resource_version()},
        "status": {"collisionCount": count},
    });
    d_api
        .patch_status(
            &d.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Err(Error::Other(format!(
        "hash collision on replicaset {name}; collisionCount is now {count}"
    )))
}

/// A merge patch that also clears counters that dropped to zero (Kubernetes omits
/// zero-valued status fields, and a merge patch only removes what is set to null).
fn status_patch(status: &DeploymentStatus) -> Value {
    let mut v = serde_json::to_value(status).unwrap_or_else(|_| json!({}));
    if let Value::Object(m) = &mut v {
        for k in [
            "availableReplicas",
            "collisionCount",
            "conditions",
            "readyReplicas",
            "replicas",
            "unavailableReplicas",
            "updatedReplicas",
        ] {
            m.entry(k).or_insert(Value::Null);
        }
    }
    v
}

// ---------------------------------------------------------------------------------------
// Pure planning.
// ---------------------------------------------------------------------------------------

/// Every write one sync of a Deployment makes.
#[derive(Debug, Default)]
pub struct Plan {
    /// The new ReplicaSet to create (with its final size and annotations).
    pub create: Option<ReplicaSet>,
    /// Changes to existing ReplicaSets, in the order Kubernetes makes them.
    pub updates: Vec<RsUpdate>,
    /// ReplicaSets beyond revisionHistoryLimit: (name, uid).
    pub deletes: Vec<(String, Option<String>)>,
    /// New value of the Deployment's revision annotation, if it changes.
    pub revision: Option<String>,
    /// New status, if it changes.
    pub status: Option<DeploymentStatus>,
    /// When to look again without a watch event (progress deadline, Recreate waiting).
    pub requeue: Option<Duration>,
}

/// A merge patch of one ReplicaSet.
#[derive(Debug, Clone, PartialEq)]
pub struct RsUpdate {
    pub name: String,
    pub from: i32,
    pub to: i32,
    /// Annotations added or changed (none are ever removed).
    pub annotations: BTreeMap<String, String>,
    /// New spec.minReadySeconds, if it changes.
    pub min_ready_seconds: Option<i32>,
}

/// What the rollout arithmetic needs from a Deployment's spec, defaults applied.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Params {
    replicas: i32,
    recreate: bool,
    paused: bool,
    /// Pods allowed above `replicas` (0 for Recreate).
    max_surge: i32,
    /// Pods allowed below `replicas`, capped at `replicas` (0 for Recreate).
    max_unavailable: i32,
    /// Seconds; None when disabled (MaxInt32, as in Kubernetes).
    progress_deadline: Option<i64>,
    /// None when unlimited (MaxInt32).
    history_limit: Option<i32>,
    min_ready_seconds: i32,
}

fn params(spec: &DeploymentSpec) -> std::result::Result<Params, String> {
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let strategy = spec.strategy.clone().unwrap_or_default();
    let recreate = match strategy.type_.as_deref() {
        None | Some("RollingUpdate") => false,
        Some("Recreate") => true,
        Some(t) => return Err(format!("unsupported deployment strategy type {t:?}")),
    };
    let (max_surge, max_unavailable) = if recreate {
        (0, 0)
    } else {
        let ru = strategy.rolling_update.unwrap_or_default();
        let quarter = IntOrString::String("25%".into());
        let (s, u) = fenceposts(
            ru.max_surge.as_ref().unwrap_or(&quarter),
            ru.max_unavailable.as_ref().unwrap_or(&quarter),
            replicas,
        )?;
        (s, if replicas == 0 { 0 } else { u.min(replicas) })
    };
    let deadline = spec.progress_deadline_seconds.unwrap_or(600);
    let limit = spec.revision_history_limit.unwrap_or(10);
    Ok(Params {
        replicas,
        recreate,
        paused: spec.paused.unwrap_or(false),
        max_surge,
        max_unavailable,
        progress_deadline: (deadline != i32::MAX).then_some(i64::from(deadline.max(0))),
        history_limit: (limit != i32::MAX).then_some(limit.max(0)),
        min_ready_seconds: spec.min_ready_seconds.unwrap_or(0),
    })
}

/// An int, or a percentage of `total` (surge rounds up, unavailability down).
fn scaled_value(v: &IntOrString, total: i32, round_up: bool) -> std::result::Result<i32, String> {
    match v {
        IntOrString::Int(n) => Ok((*n).max(0)),
        IntOrString::String(s) => {
            let pct: i64 = s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse().ok())
                .ok_or_else(|| {
                    format!("invalid value {s:?}: must be an integer or a percentage")
                })?;
            let x = pct.max(0) * i64::from(total.max(0));
            let v = if round_up { (x + 99) / 100 } else { x / 100 };
            Ok(v.min(i64::from(i32::MAX)) as i32)
        }
    }
}

/// (maxSurge, maxUnavailable) for `replicas`. Both 0 would make no progress, so
/// unavailability becomes 1 (percentages can round down to that).
fn fenceposts(
    surge: &IntOrString,
    unavailable: &IntOrString,
    replicas: i32,
) -> std::result::Result<(i32, i32), String> {
    let s = scaled_value(surge, replicas, true)?;
    let u = scaled_value(unavailable, replicas, false)?;
    Ok(if s == 0 && u == 0 { (0, 1) } else { (s, u) })
}

fn fnv32a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5, |h: u32, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Kubernetes' rand.SafeEncodeString: no vowels (no accidental words), no 0/1/3.
fn safe_encode(s: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    s.bytes()
        .map(|b| ALPHABET[usize::from(b) % ALPHABET.len()] as char)
        .collect()
}

/// A template as JSON without the hash label and without null/empty fields, so that
/// templates that differ only in how they spell "nothing" compare (and hash) equal, as
/// Kubernetes' semantic equality treats nil and empty alike.
fn template_value(t: &PodTemplateSpec) -> Value {
    fn prune(v: &mut Value) -> bool {
        match v {
            Value::Null => true,
            Value::Object(m) => {
                m.retain(|_, x| !prune(x));
                m.is_empty()
            }
            Value::Array(a) => {
                a.iter_mut().for_each(|x| {
                    prune(x);
                });
                a.is_empty()
            }
            _ => false,
        }
    }
    let mut t = t.clone();
    if let Some(l) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        l.remove(HASH_LABEL);
    }
    let mut v = serde_json::to_value(&t).unwrap_or(Value::Null);
    prune(&mut v);
    v
}

/// The pod-template-hash: FNV-32a of the template's JSON (plus collisionCount as 4
/// little-endian bytes, as Kubernetes appends it), its decimal form safe-encoded.
pub fn pod_template_hash(t: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut bytes = serde_json::to_vec(&template_value(t)).unwrap_or_default();
    if let Some(c) = collision_count {
        bytes.extend_from_slice(&(c as u32).to_le_bytes());
    }
    safe_encode(&fnv32a(&bytes).to_string())
}

pub fn equal_ignore_hash(a: &PodTemplateSpec, b: &PodTemplateSpec) -> bool {
    template_value(a) == template_value(b)
}

/// The revision annotation; missing or unparsable counts as 0.
fn revision(meta: &ObjectMeta) -> i64 {
    meta.annotations
        .as_ref()
        .and_then(|a| a.get(REVISION))
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn replicas_of(rs: &ReplicaSet) -> i32 {
    rs.spec.replicas.unwrap_or(1)
}

fn annotation(rs: &ReplicaSet, key: &str) -> Option<i32> {
    rs.metadata.annotations.as_ref()?.get(key)?.parse().ok()
}

/// Zero counters are left out of status, as Kubernetes' omitempty does.
fn nz(n: i32) -> Option<i32> {
    (n != 0).then_some(n)
}

fn normalized(s: &DeploymentStatus) -> DeploymentStatus {
    let z = |o: Option<i32>| o.filter(|n| *n != 0);
    DeploymentStatus {
        available_replicas: z(s.available_replicas),
        collision_count: z(s.collision_count),
        conditions: s.conditions.clone().filter(|c| !c.is_empty()),
        observed_generation: s.observed_generation,
        ready_replicas: z(s.ready_replicas),
        replicas: z(s.replicas),
        terminating_replicas: s.terminating_replicas,
        unavailable_replicas: z(s.unavailable_replicas),
        updated_replicas: z(s.updated_replicas),
    }
}

fn condition(
    type_: &str,
    status: &str,
    reason: &str,
    msg: String,
    now: Timestamp,
) -> DeploymentCondition {
    DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(status.into()),
        reason: Some(reason.into()),
        message: Some(msg),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

fn get_condition<'a>(s: &'a DeploymentStatus, type_: &str) -> Option<&'a DeploymentCondition> {
    s.conditions
        .as_deref()?
        .iter()
        .find(|c| c.type_.as_deref() == Some(type_))
}

fn remove_condition(s: &mut DeploymentStatus, type_: &str) {
    if let Some(c) = s.conditions.as_mut() {
        c.retain(|c| c.type_.as_deref() != Some(type_));
    }
}

/// Kubernetes' SetDeploymentCondition: same status and reason is no change at all; same
/// status keeps the transition time.
fn set_condition(s: &mut DeploymentStatus, mut c: DeploymentCondition) {
    if let Some(cur) = get_condition(s, c.type_.as_deref().unwrap_or_default()) {
        if cur.status == c.status && cur.reason == c.reason {
            return;
        }
        if cur.status == c.status {
            c.last_transition_time = cur.last_transition_time.clone();
        }
    }
    remove_condition(s, c.type_.as_deref().unwrap_or_default());
    s.conditions.get_or_insert_default().push(c);
}

/// Decides one sync of `d`, given the ReplicaSets it owns, the non-terminal pods per RS
/// uid (only needed for Recreate) and the time. An Err is a spec it cannot act on.
pub fn plan(
    d: &Deployment,
    owned: Vec<ReplicaSet>,
    pods_by_rs: &HashMap<String, usize>,
    now: Timestamp,
) -> std::result::Result<Plan, String> {
    let spec = &d.spec;
    let p = params(spec)?;
    // Status times are stored with second precision; plan with what will be stored.
    let now = Timestamp::from_second(now.as_second()).unwrap_or(now);
    let mut pl = Planner {
        d,
        spec,
        p,
        now,
        status: d.status.clone().unwrap_or_default(),
        orig: owned.clone(),
        rss: owned,
        new: None,
        touched: Vec::new(),
        revision: None,
        deletes: Vec::new(),
        requeue: None,
        pods_by_rs,
    };
    pl.check_paused_conditions();
    pl.new = pl.find_new();
    pl.sync_new_rs(false);
    let status = if p.paused || pl.is_scaling_event() {
        pl.sync()
    } else if p.recreate {
        pl.rollout_recreate()
    } else {
        pl.rollout_rolling()
    };
    Ok(pl.finish(status))
}

struct Planner<'a> {
    d: &'a Deployment,
    spec: &'a DeploymentSpec,
    p: Params,
    now: Timestamp,
    /// d.status as this sync has amended it so far (paused and new-RS conditions); the
    /// rollout-progress checks compare against it, as Kubernetes' do.
    status: DeploymentStatus,
    /// The owned ReplicaSets as they will be; `orig` as they are. A created RS is
    /// appended to `rss` only.
    rss: Vec<ReplicaSet>,
    orig: Vec<ReplicaSet>,
    new: Option<usize>,
    /// Indexes of changed RSs, in the order they changed.
    touched: Vec<usize>,
    revision: Option<String>,
    deletes: Vec<(String, Option<String>)>,
    requeue: Option<Duration>,
    pods_by_rs: &'a HashMap<String, usize>,
}

impl Planner<'_> {
    fn spec_of(&self, i: usize) -> i32 {
        replicas_of(&self.rss[i])
    }

    fn status_of(&self, i: usize) -> (i32, i32, i32) {
        let s = self.rss[i].status.clone().unwrap_or_default();
        (
            s.replicas,
            s.ready_replicas.unwrap_or(0),
            s.available_replicas.unwrap_or(0),
        )
    }

    /// Available pods that will remain: a status older than a scale-down we just asked
    /// for would otherwise count pods that are about to go.
    fn available_capped(&self, i: usize) -> i32 {
        self.status_of(i).2.min(self.spec_of(i)).max(0)
    }

    fn created(&self, i: usize) -> bool {
        i >= self.orig.len()
    }

    fn olds(&self) -> Vec<usize> {
        (0..self.rss.len())
            .filter(|i| Some(*i) != self.new)
            .collect()
    }

    /// Oldest first, ties by name (ReplicaSetsByCreationTimestamp); one not yet created
    /// is the newest.
    fn creation_key(&self, i: usize) -> (bool, i64, String) {
        let ts = self.rss[i].metadata.creation_timestamp.as_ref();
        (
            ts.is_none(),
            ts.map_or(0, |t| t.0.as_microsecond()),
            self.rss[i].name_any(),
        )
    }

    fn sort_by_creation(&self, idx: &mut [usize]) {
        idx.sort_by_key(|i| self.creation_key(*i));
    }

    fn touch(&mut self, i: usize) {
        if !self.touched.contains(&i) {
            self.touched.push(i);
        }
    }

    fn set_annotation(&mut self, i: usize, k: &str, v: String) -> bool {
        let a = self.rss[i].metadata.annotations.get_or_insert_default();
        if a.get(k) == Some(&v) {
            return false;
        }
        a.insert(k.to_string(), v);
        self.touch(i);
        true
    }

    /// Sets spec.replicas and the desired/max-replicas annotations (scaleReplicaSet).
    /// Returns whether the size changed.
    fn scale_to(&mut self, i: usize, n: i32) -> bool {
        let from = self.spec_of(i);
        self.set_annotation(i, DESIRED_REPLICAS, self.p.replicas.to_string());
        self.set_annotation(
            i,
            MAX_REPLICAS,
            (self.p.replicas + self.p.max_surge).to_string(),
        );
        if from != n {
            self.rss[i].spec.replicas = Some(n);
            self.touch(i);
        }
        from != n
    }

    /// scaleReplicaSetAndRecordEvent: nothing at all when the size is right.
    fn scale_if_needed(&mut self, i: usize, n: i32) -> bool {
        self.spec_of(i) != n && self.scale_to(i, n)
    }

    fn find_new(&self) -> Option<usize> {
        let mut idx: Vec<usize> = (0..self.rss.len()).collect();
        self.sort_by_creation(&mut idx);
        // Several can match (Kubernetes issue 40415); the oldest wins, deterministically.
        idx.into_iter().find(|i| {
            self.rss[*i]
                .spec
                .template
                .as_ref()
                .is_some_and(|t| equal_ignore_hash(t, &self.spec.template))
        })
    }

    fn max_old_revision(&self) -> i64 {
        self.olds()
            .into_iter()
            .map(|i| revision(&self.rss[i].metadata))
            .max()
            .unwrap_or(0)
    }

    /// Copies the Deployment's annotations (change-cause...) to its new RS.
    fn copy_annotations(&mut self, i: usize) {
        let ann = self.d.metadata.annotations.clone().unwrap_or_default();
        for (k, v) in ann {
            if !SKIP_COPY.contains(&k.as_str()) {
                self.set_annotation(i, &k, v);
            }
        }
    }

    /// Gives the new RS a revision above every old one. A rollback brings back an RS that
    /// had a revision: that one moves to revision-history.
    fn bump_revision(&mut self, i: usize, new_rev: i64) {
        let old = self.rss[i]
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION))
            .cloned();
        let old_rev = match old.as_deref().map(str::parse::<i64>) {
            None => 0,
            Some(Ok(r)) => r,
            // Kubernetes leaves an RS with a garbled revision alone.
            Some(Err(_)) => return,
        };
        if old_rev >= new_rev {
            return;
        }
        self.set_annotation(i, REVISION, new_rev.to_string());
        if let Some(old) = old {
            let hist = self.rss[i]
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(REVISION_HISTORY))
                .cloned()
                .unwrap_or_default();
            let mut revs: Vec<&str> = hist.split(',').filter(|s| !s.is_empty()).collect();
            revs.push(&old);
            while revs.len() > 1 && revs.join(",").len() > MAX_REVISION_HISTORY_CHARS {
                revs.remove(0);
            }
            let joined = revs.join(",");
            self.set_annotation(i, REVISION_HISTORY, joined);
        }
    }

    fn set_deployment_revision(&mut self, rev: String) {
        let cur = self
            .d
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REVISION));
        if cur != Some(&rev) {
            self.revision = Some(rev);
        }
    }

    /// getNewReplicaSet: sync the annotations of the RS that runs the current template,
    /// or (with `create`) build one.
    fn sync_new_rs(&mut self, create: bool) {
        let new_rev = self.max_old_revision() + 1;
        if let Some(i) = self.new {
            self.copy_annotations(i);
            self.bump_revision(i, new_rev);
            if self.rss[i].spec.min_ready_seconds.unwrap_or(0) != self.p.min_ready_seconds {
                self.rss[i].spec.min_ready_seconds = Some(self.p.min_ready_seconds);
                self.touch(i);
            }
            let rev = revision(&self.rss[i].metadata).to_string();
            self.set_deployment_revision(rev);
            if self.p.progress_deadline.is_some()
                && get_condition(&self.status, PROGRESSING).is_none()
            {
                let msg = format!("Found new replica set \"{}\"", self.rss[i].name_any());
                set_condition(
                    &mut self.status,
                    condition(PROGRESSING, "True", FOUND_NEW_RS, msg, self.now),
                );
            }
            return;
        }
        if !create {
            return;
        }
        let rs = self.new_replica_set(new_rev);
        let name = rs.name_any();
        self.rss.push(rs);
        let i = self.rss.len() - 1;
        self.new = Some(i);
        let n = self.new_rs_new_replicas(i);
        self.rss[i].spec.replicas = Some(n);
        self.set_deployment_revision(new_rev.to_string());
        if self.p.progress_deadline.is_some() {
            let msg = format!("Created new replica set \"{name}\"");
            set_condition(
                &mut self.status,
                condition(PROGRESSING, "True", NEW_RS_CREATED, msg, self.now),
            );
        }
    }

    fn new_replica_set(&self, rev: i64) -> ReplicaSet {
        let hash = pod_template_hash(&self.spec.template, self.status.collision_count);
        let mut template = self.spec.template.clone();
        let labels = template
            .metadata
            .get_or_insert_default()
            .labels
            .get_or_insert_default();
        labels.insert(HASH_LABEL.into(), hash.clone());
        let labels = labels.clone();
        let mut selector = self.spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_default()
            .insert(HASH_LABEL.into(), hash.clone());
        let mut annotations: BTreeMap<String, String> = self
            .d
            .metadata
            .annotations
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| !SKIP_COPY.contains(&k.as_str()))
            .collect();
        annotations.insert(REVISION.into(), rev.to_string());
        annotations.insert(DESIRED_REPLICAS.into(), self.p.replicas.to_string());
        annotations.insert(
            MAX_REPLICAS.into(),
            (self.p.replicas + self.p.max_surge).to_string(),
        );
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some(format!("{}-{hash}", self.d.name_any())),
                namespace: self.d.namespace(),
                labels: Some(labels),
                annotations: Some(annotations),
                owner_references: Some(vec![owner_ref(self.d)]),
                ..Default::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(0),
                min_ready_seconds: self.spec.min_ready_seconds,
                selector,
                template: Some(template),
            },
            status: None,
        }
    }

    /// NewRSNewReplicas: how far the new RS may grow now.
    fn new_rs_new_replicas(&self, new: usize) -> i32 {
        if self.p.recreate {
            return self.p.replicas;
        }
        let current: i32 = (0..self.rss.len()).map(|i| self.spec_of(i)).sum();
        let max_total = self.p.replicas + self.p.max_surge;
        let cur_new = self.spec_of(new);
        if current >= max_total {
            return cur_new;
        }
        let up = (max_total - current).min(self.p.replicas - cur_new);
        cur_new + up.max(0)
    }

    fn check_paused_conditions(&mut self) {
        if self.p.progress_deadline.is_none() {
            return;
        }
        let reason = get_condition(&self.status, PROGRESSING).and_then(|c| c.reason.clone());
        // A reported timeout is not overwritten by pausing.
        if reason.as_deref() == Some(TIMED_OUT) {
            return;
        }
        let paused_cond = reason.as_deref() == Some(PAUSED);
        if self.p.paused && !paused_cond {
            let c = condition(
                PROGRESSING,
                "Unknown",
                PAUSED,
                "Deployment is paused".into(),
                self.now,
            );
            set_condition(&mut self.status, c);
        } else if !self.p.paused && paused_cond {
            let c = condition(
                PROGRESSING,
                "Unknown",
                RESUMED,
                "Deployment is resumed".into(),
                self.now,
            );
            set_condition(&mut self.status, c);
        }
    }

    /// An active RS sized for another replica count: `kubectl scale`, not a rollout.
    fn is_scaling_event(&self) -> bool {
        (0..self.rss.len()).any(|i| {
            self.spec_of(i) > 0
                && annotation(&self.rss[i], DESIRED_REPLICAS).is_some_and(|n| n != self.p.replicas)
        })
    }

    /// Paused or scaled: resize without rolling anything forward.
    fn sync(&mut self) -> DeploymentStatus {
        self.scale();
        if self.p.paused {
            self.cleanup();
        }
        self.calculate_status()
    }

    /// Kubernetes' proportional scaling: a lone active RS takes the whole count; during a
    /// rollout the change is spread over the active RSs by their share.
    fn scale(&mut self) {
        let mut olds = self.olds();
        self.sort_by_creation(&mut olds);
        olds.reverse();
        let mut all = olds.clone();
        all.extend(self.new);
        let mut active: Vec<usize> = all
            .iter()
            .copied()
            .filter(|i| self.spec_of(*i) > 0)
            .collect();
        let target = match active.len() {
            0 => self.new.or(olds.first().copied()),
            1 => Some(active[0]),
            _ => None,
        };
        if active.len() <= 1 {
            // Unlike Kubernetes this also corrects stale annotations at the right size,
            // which would otherwise look like a scaling event forever.
            if let Some(i) = target {
                self.scale_to(i, self.p.replicas);
            }
            return;
        }
        if self.new.is_some_and(|n| self.is_saturated(n)) {
            let new = self.new;
            for i in active.into_iter().filter(|i| Some(*i) != new) {
                self.scale_if_needed(i, 0);
            }
            return;
        }
        if self.p.recreate {
            return;
        }
        let total: i32 = active.iter().map(|i| self.spec_of(*i)).sum();
        let allowed = if self.p.replicas > 0 {
            self.p.replicas + self.p.max_surge
        } else {
            0
        };
        let to_add = allowed - total;
        // Largest first; among equals grow the newest, shrink the oldest.
        if to_add > 0 {
            active.sort_by_key(|i| (Reverse(self.spec_of(*i)), Reverse(self.creation_key(*i))));
        } else if to_add < 0 {
            active.sort_by_key(|i| (Reverse(self.spec_of(*i)), self.creation_key(*i)));
        }
        let mut added = 0;
        let mut sizes = Vec::with_capacity(active.len());
        for &i in &active {
            let cur = self.spec_of(i);
            if to_add != 0 {
                let prop = self.proportion(i, to_add, added);
                sizes.push(cur + prop);
                added += prop;
            } else {
                sizes.push(cur);
            }
        }
        for (k, &i) in active.iter().enumerate() {
            let mut n = sizes[k];
            // Leftovers from rounding go to the largest.
            if k == 0 && to_add != 0 {
                n = (n + to_add - added).max(0);
            }
            self.scale_to(i, n);
        }
    }

    fn proportion(&self, i: usize, to_add: i32, added: i32) -> i32 {
        let cur = self.spec_of(i);
        if cur == 0 || to_add == 0 || to_add == added {
            return 0;
        }
        let allowed = to_add - added;
        let fraction = self.fraction(i);
        if to_add > 0 {
            fraction.min(allowed)
        } else {
            fraction.max(allowed)
        }
    }

    /// This RS's change if it keeps its share of the (old max-replicas) total.
    fn fraction(&self, i: usize) -> i32 {
        let cur = self.spec_of(i);
        if self.p.replicas == 0 {
            return -cur;
        }
        let max_now = self.p.replicas + self.p.max_surge;
        let before = match annotation(&self.rss[i], MAX_REPLICAS) {
            Some(n) if n != 0 => n,
            _ => self.d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0),
        };
        if before == 0 {
            return 0;
        }
        let size = f64::from(cur) * f64::from(max_now) / f64::from(before);
        size.round() as i32 - cur
    }

    fn is_saturated(&self, i: usize) -> bool {
        self.spec_of(i) == self.p.replicas
            && annotation(&self.rss[i], DESIRED_REPLICAS) == Some(self.p.replicas)
            && self.status_of(i).2 == self.p.replicas
    }

    fn rollout_rolling(&mut self) -> DeploymentStatus {
        self.sync_new_rs(true);
        if self.reconcile_new() || self.reconcile_old() {
            return self.sync_rollout_status();
        }
        self.cleanup();
        self.sync_rollout_status()
    }

    fn reconcile_new(&mut self) -> bool {
        let Some(new) = self.new else { return false };
        let cur = self.spec_of(new);
        if cur == self.p.replicas {
            return false;
        }
        if cur > self.p.replicas {
            return self.scale_if_needed(new, self.p.replicas);
        }
        let n = self.new_rs_new_replicas(new);
        self.scale_if_needed(new, n)
    }

    /// Scales old RSs down as far as availability allows: first their unavailable pods
    /// (removing those costs nothing), then available ones down to the minimum.
    fn reconcile_old(&mut self) -> bool {
        let mut olds: Vec<usize> = self.olds();
        if olds.iter().map(|i| self.spec_of(*i)).sum::<i32>() == 0 {
            return false;
        }
        let all_pods: i32 = (0..self.rss.len()).map(|i| self.spec_of(i)).sum();
        let min_available = self.p.replicas - self.p.max_unavailable;
        let new_unavailable = self
            .new
            .map_or(0, |n| self.spec_of(n) - self.available_capped(n));
        let max_scaled_down = all_pods - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return false;
        }
        self.sort_by_creation(&mut olds);
        // Unhealthy replicas first, else they would block the rollout (Kubernetes 16737).
        let mut cleaned = 0;
        for &i in &olds {
            if cleaned >= max_scaled_down {
                break;
            }
            let cur = self.spec_of(i);
            let unhealthy = cur - self.available_capped(i);
            if cur == 0 || unhealthy == 0 {
                continue;
            }
            let n = (max_scaled_down - cleaned).min(unhealthy);
            self.scale_if_needed(i, cur - n);
            cleaned += n;
        }
        let available: i32 = (0..self.rss.len()).map(|i| self.available_capped(i)).sum();
        let mut scaled = 0;
        if available > min_available {
            let budget = available - min_available;
            for &i in &olds {
                if scaled >= budget {
                    break;
                }
                let cur = self.spec_of(i);
                if cur == 0 {
                    continue;
                }
                let n = cur.min(budget - scaled);
                self.scale_if_needed(i, cur - n);
                scaled += n;
            }
        }
        cleaned + scaled > 0
    }

    fn rollout_recreate(&mut self) -> DeploymentStatus {
        let olds = self.olds();
        let mut scaled_down = false;
        for &i in &olds {
            if self.spec_of(i) > 0 {
                scaled_down |= self.scale_if_needed(i, 0);
            }
        }
        if scaled_down {
            return self.sync_rollout_status();
        }
        let running = olds.iter().any(|&i| {
            self.status_of(i).0 > 0
                || self.rss[i]
                    .metadata
                    .uid
                    .as_ref()
                    .and_then(|u| self.pods_by_rs.get(u))
                    .is_some_and(|n| *n > 0)
        });
        if running {
            self.requeue = Some(RECREATE_POLL);
            return self.sync_rollout_status();
        }
        if self.new.is_none() {
            self.sync_new_rs(true);
        }
        if let Some(new) = self.new {
            self.scale_if_needed(new, self.p.replicas);
        }
        if self.complete(&self.status.clone()) {
            self.cleanup();
        }
        self.sync_rollout_status()
    }

    /// Deletes the oldest old RSs beyond revisionHistoryLimit; only empty, settled ones.
    fn cleanup(&mut self) {
        let Some(limit) = self.p.history_limit else {
            return;
        };
        let mut cleanable: Vec<usize> = self
            .olds()
            .into_iter()
            .filter(|i| !self.created(*i) && self.orig[*i].metadata.deletion_timestamp.is_none())
            .collect();
        let excess = cleanable.len() as i64 - i64::from(limit);
        if excess <= 0 {
            return;
        }
        cleanable.sort_by_key(|i| (revision(&self.orig[*i].metadata), self.creation_key(*i)));
        for &i in cleanable.iter().take(excess as usize) {
            let rs = &self.orig[i];
            let st = rs.status.clone().unwrap_or_default();
            let settled =
                rs.metadata.generation.unwrap_or(0) <= st.observed_generation.unwrap_or(0);
            if st.replicas != 0 || replicas_of(rs) != 0 || !settled || self.touched.contains(&i) {
                continue;
            }
            self.deletes.push((rs.name_any(), rs.metadata.uid.clone()));
        }
    }

    fn complete(&self, s: &DeploymentStatus) -> bool {
        let r = self.p.replicas;
        s.updated_replicas.unwrap_or(0) == r
            && s.replicas.unwrap_or(0) == r
            && s.available_replicas.unwrap_or(0) == r
            && s.observed_generation.unwrap_or(0) >= self.d.metadata.generation.unwrap_or(0)
    }

    /// Counts from the ReplicaSets plus the Available condition (calculateStatus).
    fn calculate_status(&self) -> DeploymentStatus {
        let all = 0..self.rss.len();
        let available: i32 = all.clone().map(|i| self.status_of(i).2).sum();
        let total: i32 = all.clone().map(|i| self.spec_of(i)).sum();
        let mut s = DeploymentStatus {
            observed_generation: self.d.metadata.generation,
            replicas: nz(all.clone().map(|i| self.status_of(i).0).sum()),
            updated_replicas: nz(self.new.map_or(0, |n| self.status_of(n).0)),
            ready_replicas: nz(all.map(|i| self.status_of(i).1).sum()),
            available_replicas: nz(available),
            unavailable_replicas: nz((total - available).max(0)),
            collision_count: self.status.collision_count,
            conditions: self.status.conditions.clone(),
            terminating_replicas: self.status.terminating_replicas,
        };
        let c = if available >= self.p.replicas - self.p.max_unavailable {
            condition(
                AVAILABLE,
                "True",
                MIN_AVAILABLE,
                "Deployment has minimum availability.".into(),
                self.now,
            )
        } else {
            condition(
                AVAILABLE,
                "False",
                MIN_UNAVAILABLE,
                "Deployment does not have minimum availability.".into(),
                self.now,
            )
        };
        set_condition(&mut s, c);
        s
    }

    /// calculateStatus plus the Progressing condition (syncRolloutStatus).
    fn sync_rollout_status(&mut self) -> DeploymentStatus {
        let mut s = self.calculate_status();
        let Some(deadline) = self.p.progress_deadline else {
            remove_condition(&mut s, PROGRESSING);
            return self.with_replica_failures(s);
        };
        let cur = get_condition(&self.status, PROGRESSING).cloned();
        let done_before = s.replicas == s.updated_replicas
            && cur.as_ref().and_then(|c| c.reason.as_deref()) == Some(NEW_RS_AVAILABLE);
        let what = match self.new {
            Some(n) => format!("ReplicaSet \"{}\"", self.rss[n].name_any()),
            None => format!("Deployment \"{}\"", self.d.name_any()),
        };
        if !done_before {
            if self.complete(&s) {
                let msg = format!("{what} has successfully progressed.");
                set_condition(
                    &mut s,
                    condition(PROGRESSING, "True", NEW_RS_AVAILABLE, msg, self.now),
                );
            } else if self.progressed(&s) {
                let msg = format!("{what} is progressing.");
                let mut c = condition(PROGRESSING, "True", RS_UPDATED, msg, self.now);
                // Progress refreshes lastUpdateTime even with the same reason.
                if let Some(cur) = &cur {
                    if cur.status.as_deref() == Some("True") {
                        c.last_transition_time = cur.last_transition_time.clone();
                    }
                    remove_condition(&mut s, PROGRESSING);
                }
                set_condition(&mut s, c);
            } else if self.timed_out(&s, deadline) {
                let msg = format!("{what} has timed out progressing.");
                set_condition(
                    &mut s,
                    condition(PROGRESSING, "False", TIMED_OUT, msg, self.now),
                );
            }
        }
        // Look again when the deadline passes, unless done or already timed out.
        if let Some(c) = get_condition(&s, PROGRESSING)
            && !self.complete(&s)
            && !matches!(c.reason.as_deref(), Some(TIMED_OUT | NEW_RS_AVAILABLE))
            && let Some(since) = &c.last_update_time
        {
            let left = since.0.as_second() + deadline - self.now.as_second();
            let wait = Duration::from_secs(left.max(0) as u64 + 1);
            self.requeue = Some(self.requeue.map_or(wait, |r| r.min(wait)));
        }
        self.with_replica_failures(s)
    }

    fn progressed(&self, s: &DeploymentStatus) -> bool {
        let old = &self.status;
        let g = |o: Option<i32>| o.unwrap_or(0);
        let old_olds = g(old.replicas) - g(old.updated_replicas);
        let new_olds = g(s.replicas) - g(s.updated_replicas);
        g(s.updated_replicas) > g(old.updated_replicas)
            || new_olds < old_olds
            || g(s.ready_replicas) > g(old.ready_replicas)
            || g(s.available_replicas) > g(old.available_replicas)
    }

    fn timed_out(&self, s: &DeploymentStatus, deadline: i64) -> bool {
        let Some(c) = get_condition(s, PROGRESSING) else {
            return false;
        };
        match c.reason.as_deref() {
            Some(NEW_RS_AVAILABLE) => false,
            Some(TIMED_OUT) => true,
            _ => c
                .last_update_time
                .as_ref()
                .is_some_and(|t| t.0.as_second() + deadline < self.now.as_second()),
        }
    }

    /// ReplicaFailure from the RSs (the new one's first), mirrored on the Deployment.
    fn with_replica_failures(&self, mut s: DeploymentStatus) -> DeploymentStatus {
        let failure_of = |i: usize| {
            self.rss[i]
                .status
                .as_ref()
                .and_then(|st| st.conditions.as_ref())
                .and_then(|cs| {
                    cs.iter()
                        .find(|c| c.type_.as_deref() == Some(REPLICA_FAILURE))
                })
                .cloned()
        };
        let found = self
            .new
            .and_then(failure_of)
            .or_else(|| (0..self.rss.len()).find_map(failure_of));
        match found {
            Some(c) => set_condition(
                &mut s,
                DeploymentCondition {
                    type_: Some(REPLICA_FAILURE.into()),
                    status: c.status,
                    reason: c.reason,
                    message: c.message,
                    last_update_time: c.last_transition_time.clone(),
                    last_transition_time: c.last_transition_time,
                },
            ),
            None => remove_condition(&mut s, REPLICA_FAILURE),
        }
        s
    }

    fn finish(self, status: DeploymentStatus) -> Plan {
        let mut plan = Plan {
            revision: self.revision,
            deletes: self.deletes,
            requeue: self.requeue,
            ..Default::default()
        };
        let old = normalized(&self.d.status.clone().unwrap_or_default());
        let status = normalized(&status);
        if status != old {
            plan.status = Some(status);
        }
        for &i in &self.touched {
            let rs = &self.rss[i];
            if i >= self.orig.len() {
                continue;
            }
            let orig = &self.orig[i];
            let was = orig.metadata.annotations.clone().unwrap_or_default();
            let annotations: BTreeMap<String, String> = rs
                .metadata
                .annotations
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter(|(k, v)| was.get(k) != Some(v))
                .collect();
            let mrs = |r: &ReplicaSet| r.spec.min_ready_seconds;
            let u = RsUpdate {
                name: rs.name_any(),
                from: replicas_of(orig),
                to: replicas_of(rs),
                annotations,
                min_ready_seconds: (mrs(rs) != mrs(orig)).then(|| mrs(rs).unwrap_or(0)),
            };
            if u.from != u.to || !u.annotations.is_empty() || u.min_ready_seconds.is_some() {
                plan.updates.push(u);
            }
        }
        if let Some(n) = self.new
            && n >= self.orig.len()
        {
            plan.create = self.rss.into_iter().nth(n);
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        DeploymentStrategy, ReplicaSetStatus, RollingUpdateDeployment,
    };
    use k8s_openapi::api::core::v1::{Container, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn template(image: &str) -> PodTemplateSpec {
        PodTemplateSpec {
            metadata: Some(ObjectMeta {
                labels: Some([("app".to_string(), "web".to_string())].into()),
                ..Default::default()
            }),
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "c".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
        }
    }

    fn deployment(replicas: i32, image: &str, surge: IntOrString, unav: IntOrString) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                uid: Some("d-uid".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: DeploymentSpec {
                replicas: Some(replicas),
                selector: LabelSelector {
                    match_labels: Some([("app".to_string(), "web".to_string())].into()),
                    match_expressions: None,
                },
                template: template(image),
                strategy: Some(DeploymentStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateDeployment {
                        max_surge: Some(surge),
                        max_unavailable: Some(unav),
                    }),
                }),
                ..Default::default()
            },
            status: None,
        }
    }

    fn recreate(replicas: i32, image: &str) -> Deployment {
        let mut d = deployment(replicas, image, IntOrString::Int(0), IntOrString::Int(0));
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        d
    }

    /// A cluster in miniature: the RSs as stored, plus the real pods behind each.
    #[derive(Default)]
    struct Sim {
        rss: Vec<ReplicaSet>,
        /// (pods, available pods) per RS name.
        pods: HashMap<String, (i32, i32)>,
        clock: i64,
        events: Vec<String>,
    }

    impl Sim {
        /// Runs one sync and applies its writes to the stored objects.
        fn sync(&mut self, d: &mut Deployment) -> Plan {
            self.clock += 1;
            let by_uid: HashMap<String, usize> = self
                .rss
                .iter()
                .filter_map(|rs| {
                    let (pods, _) = self.pods.get(&rs.name_any()).copied().unwrap_or_default();
                    Some((rs.metadata.uid.clone()?, pods as usize))
                })
                .collect();
            let plan = plan(d, self.rss.clone(), &by_uid, ts(self.clock)).unwrap();
            if let Some(mut rs) = plan.create.clone() {
                let name = rs.name_any();
                rs.metadata.uid = Some(format!("uid-{name}"));
                rs.metadata.creation_timestamp = Some(Time(ts(self.clock)));
                rs.metadata.generation = Some(1);
                self.events
                    .push(format!("create {name} {}", replicas_of(&rs)));
                self.rss.push(rs);
            }
            for u in &plan.updates {
                let rs = self
                    .rss
                    .iter_mut()
                    .find(|r| r.name_any() == u.name)
                    .unwrap();
                assert_eq!(replicas_of(rs), u.from);
                rs.spec.replicas = Some(u.to);
                rs.metadata
                    .annotations
                    .get_or_insert_default()
                    .extend(u.annotations.clone());
                if u.from != u.to {
                    *rs.metadata.generation.get_or_insert(1) += 1;
                    self.events
                        .push(format!("scale {} {} {}", u.name, u.from, u.to));
                }
            }
            for (name, _) in &plan.deletes {
                self.rss.retain(|r| &r.name_any() != name);
                self.events.push(format!("delete {name}"));
            }
            if let Some(rev) = &plan.revision {
                d.metadata
                    .annotations
                    .get_or_insert_default()
                    .insert(REVISION.into(), rev.clone());
            }
            if let Some(s) = &plan.status {
                d.status = Some(s.clone());
            }
            plan
        }

        /// The ReplicaSet controller: pods follow spec (unavailable ones deleted first)
        /// and status reports them.
        fn rs_controller(&mut self, name: &str) {
            let Some(rs) = self.rss.iter_mut().find(|r| r.name_any() == name) else {
                return;
            };
            let want = replicas_of(rs);
            let (pods, avail) = self.pods.entry(name.to_string()).or_default();
            *pods = want;
            *avail = (*avail).min(want);
            rs.status = Some(ReplicaSetStatus {
                replicas: *pods,
                ready_replicas: Some(*avail),
                available_replicas: Some(*avail),
                observed_generation: rs.metadata.generation,
                ..Default::default()
            });
        }

        fn rs_controller_all(&mut self) {
            let names: Vec<String> = self.rss.iter().map(|r| r.name_any()).collect();
            for n in names {
                self.rs_controller(&n);
            }
        }

        /// Up to `k` pending pods of every RS become available.
        fn kubelet(&mut self, k: i32) {
            for (pods, avail) in self.pods.values_mut() {
                *avail = (*avail + k).min(*pods);
            }
        }

        fn available(&self) -> i32 {
            self.pods.values().map(|(_, a)| a).sum()
        }

        fn spec_total(&self) -> i32 {
            self.rss.iter().map(replicas_of).sum()
        }

        fn rs(&self, name: &str) -> &ReplicaSet {
            self.rss.iter().find(|r| r.name_any() == name).unwrap()
        }

        /// Syncs until the Deployment is stable, with everything running its template.
        fn settle(&mut self, d: &mut Deployment) {
            for _ in 0..100 {
                self.sync(d);
                self.rs_controller_all();
                self.kubelet(100);
            }
        }
    }

    fn cond<'a>(d: &'a Deployment, t: &str) -> &'a DeploymentCondition {
        get_condition(d.status.as_ref().unwrap(), t).unwrap()
    }

    fn ann(rs: &ReplicaSet, k: &str) -> Option<String> {
        rs.metadata.annotations.as_ref()?.get(k).cloned()
    }

    fn set_image(d: &mut Deployment, image: &str) {
        d.spec.template = template(image);
        *d.metadata.generation.get_or_insert(1) += 1;
    }

    fn new_rs_name(d: &Deployment) -> String {
        let s = d.status.as_ref().and_then(|s| s.collision_count);
        format!("web-{}", pod_template_hash(&d.spec.template, s))
    }

    #[test]
    fn fnv_and_safe_encoding() {
        assert_eq!(fnv32a(b""), 0x811c9dc5);
        assert_eq!(fnv32a(b"a"), 0xe40c292c);
        assert_eq!(fnv32a(b"foobar"), 0xbf9cf968);
        assert_eq!(safe_encode("0123456789"), "456789bcdf");
    }

    #[test]
    fn hash_is_stable_and_ignores_its_own_label() {
        let t = template("nginx:1");
        let h = pod_template_hash(&t, None);
        assert_eq!(h, pod_template_hash(&t.clone(), None));
        assert!(h.len() <= 10 && !h.is_empty());
        assert!(h.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
        // The hash label itself and empty-vs-missing fields do not matter.
        let mut t2 = t.clone();
        t2.metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(HASH_LABEL.into(), h.clone());
        t2.metadata.as_mut().unwrap().annotations = Some(BTreeMap::new());
        assert_eq!(pod_template_hash(&t2, None), h);
        assert!(equal_ignore_hash(&t, &t2));
        // A different template or collision count moves it.
        assert_ne!(pod_template_hash(&template("nginx:2"), None), h);
        assert!(!equal_ignore_hash(&t, &template("nginx:2")));
        assert_ne!(pod_template_hash(&t, Some(1)), h);
        assert_ne!(
            pod_template_hash(&t, Some(1)),
            pod_template_hash(&t, Some(2))
        );
        assert_eq!(
            pod_template_hash(&t, Some(0)),
            pod_template_hash(&t, Some(0))
        );
    }

    #[test]
    fn surge_rounds_up_unavailable_down() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(fenceposts(&pct("25%"), &pct("25%"), 10), Ok((3, 2)));
        assert_eq!(fenceposts(&pct("25%"), &pct("25%"), 1), Ok((1, 0)));
        assert_eq!(fenceposts(&IntOrString::Int(0), &pct("10%"), 5), Ok((0, 1)));
        assert_eq!(
            fenceposts(&IntOrString::Int(2), &IntOrString::Int(1), 5),
            Ok((2, 1))
        );
        assert!(fenceposts(&pct("abc"), &pct("25%"), 5).is_err());
        assert!(fenceposts(&pct("5"), &pct("25%"), 5).is_err());
        let d = deployment(3, "a", IntOrString::Int(1), IntOrString::Int(9));
        assert_eq!(params(&d.spec).unwrap().max_unavailable, 3);
        assert!(
            plan(
                &deployment(3, "a", pct("x%"), pct("1%")),
                vec![],
                &HashMap::new(),
                ts(0)
            )
            .is_err()
        );
    }

    #[test]
    fn first_sync_creates_rs_with_hash_revision_and_owner() {
        let mut d = deployment(3, "nginx:1", IntOrString::Int(1), IntOrString::Int(0));
        d.metadata.annotations = Some(
            [(
                "kubernetes.io/change-cause".to_string(),
                "first".to_string(),
            )]
            .into(),
        );
        let p = plan(&d, vec![], &HashMap::new(), ts(0)).unwrap();
        let rs = p.create.expect("creates the new RS");
        let hash = pod_template_hash(&d.spec.template, None);
        assert_eq!(rs.name_any(), format!("web-{hash}"));
        assert_eq!(replicas_of(&rs), 3);
        let spec = &rs.spec;
        assert_eq!(
            spec.selector.match_labels.as_ref().unwrap()[HASH_LABEL],
            hash
        );
        let tl = spec
            .template
            .as_ref()
            .unwrap()
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(tl[HASH_LABEL], hash);
        assert_eq!(rs.labels()[HASH_LABEL], hash);
        assert_eq!(rs.labels()["app"], "web");
        assert_eq!(ann(&rs, REVISION).as_deref(), Some("1"));
        assert_eq!(ann(&rs, DESIRED_REPLICAS).as_deref(), Some("3"));
        assert_eq!(ann(&rs, MAX_REPLICAS).as_deref(), Some("4"));
        assert_eq!(
            ann(&rs, "kubernetes.io/change-cause").as_deref(),
            Some("first")
        );
        let o = &rs.owner_references()[0];
        assert_eq!((o.kind.as_str(), o.uid.as_str()), ("Deployment", "d-uid"));
        assert_eq!(
            (o.controller, o.block_owner_deletion),
            (Some(true), Some(true))
        );
        assert_eq!(p.revision.as_deref(), Some("1"));
        let s = p.status.unwrap();
        assert_eq!(s.observed_generation, Some(1));
        let c = get_condition(&s, PROGRESSING).unwrap();
        assert_eq!(c.reason.as_deref(), Some(NEW_RS_CREATED));
        assert_eq!(
            c.message.as_deref(),
            Some(&*format!("Created new replica set \"web-{hash}\""))
        );
        assert_eq!(
            get_condition(&s, AVAILABLE).unwrap().status.as_deref(),
            Some("False")
        );
        assert!(p.requeue.is_some(), "requeues for the progress deadline");
    }

    /// Runs a rolling update from `image` "v1" to "v2" and checks the invariants on every
    /// step. `lag`: the old RS's status is stale most of the time.
    fn roll(replicas: i32, surge: IntOrString, unav: IntOrString, lag: bool) {
        let mut d = deployment(replicas, "v1", surge, unav);
        let p = params(&d.spec).unwrap();
        let mut sim = Sim::default();
        sim.settle(&mut d);
        assert_eq!(sim.available(), replicas);
        assert_eq!(
            cond(&d, PROGRESSING).reason.as_deref(),
            Some(NEW_RS_AVAILABLE)
        );
        assert_eq!(cond(&d, AVAILABLE).status.as_deref(), Some("True"));

        set_image(&mut d, "v2");
        let new = new_rs_name(&d);
        let min_available = replicas - p.max_unavailable;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps < 500, "rollout stuck: {:?}", sim.events);
            sim.sync(&mut d);
            assert!(
                sim.spec_total() <= replicas + p.max_surge,
                "{} pods wanted, max {}",
                sim.spec_total(),
                replicas + p.max_surge
            );
            if lag {
                // The new RS's status is current but the old one's lags four syncs
                // behind, so several scale-downs see its stale availableReplicas.
                let names: Vec<String> = sim.rss.iter().map(|r| r.name_any()).collect();
                for n in names {
                    if n == new || steps % 4 == 0 {
                        sim.rs_controller(&n);
                    }
                }
            } else {
                sim.rs_controller_all();
                let pods: i32 = sim.pods.values().map(|(p, _)| p).sum();
                assert!(pods <= replicas + p.max_surge);
            }
            assert!(
                sim.available() >= min_available,
                "availability {} < {min_available}: {:?}",
                sim.available(),
                sim.events
            );
            sim.kubelet(1);
            let s = d.status.clone().unwrap_or_default();
            if sim.rss.len() == 2
                && replicas_of(sim.rs(&new)) == replicas
                && sim
                    .rss
                    .iter()
                    .filter(|r| r.name_any() != new)
                    .all(|r| replicas_of(r) == 0)
                && s.updated_replicas.unwrap_or(0) == replicas
                && s.replicas.unwrap_or(0) == replicas
                && s.available_replicas.unwrap_or(0) == replicas
            {
                break;
            }
        }
        sim.sync(&mut d);
        let c = cond(&d, PROGRESSING);
        assert_eq!(
            c.reason.as_deref(),
            Some(NEW_RS_AVAILABLE),
            "{:?}",
            d.status
        );
        assert_eq!(
            c.message.as_deref(),
            Some(&*format!(
                "ReplicaSet \"{new}\" has successfully progressed."
            ))
        );
        assert_eq!(ann(sim.rs(&new), REVISION).as_deref(), Some("2"));
        assert_eq!(
            d.metadata.annotations.as_ref().unwrap()[REVISION],
            "2",
            "the Deployment carries the new revision"
        );
    }

    #[test]
    fn rolling_update_respects_surge_and_unavailability() {
        let pct = |s: &str| IntOrString::String(s.into());
        for lag in [false, true] {
            roll(10, IntOrString::Int(3), IntOrString::Int(2), lag);
            roll(4, pct("25%"), pct("25%"), lag);
            roll(5, IntOrString::Int(0), IntOrString::Int(1), lag);
            roll(5, IntOrString::Int(1), IntOrString::Int(0), lag);
            roll(1, pct("25%"), pct("25%"), lag);
            roll(7, pct("100%"), pct("0%"), lag);
        }
    }

    #[test]
    fn first_rolling_step_scales_up_by_surge_then_down() {
        let mut d = deployment(10, "v1", IntOrString::Int(3), IntOrString::Int(2));
        let mut sim = Sim::default();
        sim.settle(&mut d);
        let old = sim.rss[0].name_any();
        set_image(&mut d, "v2");
        let new = new_rs_name(&d);
        sim.events.clear();
        let p = sim.sync(&mut d);
        // Created at the surge, and old pods beyond the minimum go in the same sync.
        assert_eq!(replicas_of(p.create.as_ref().unwrap()), 3);
        assert_eq!(
            sim.events,
            vec![format!("create {new} 3"), format!("scale {old} 10 8")]
        );
        let s = d.status.as_ref().unwrap();
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.updated_replicas, None);
        assert_eq!(
            cond(&d, PROGRESSING).reason.as_deref(),
            Some(NEW_RS_CREATED)
        );
    }

    #[test]
    fn unhealthy_old_replicas_are_removed_first() {
        let mut d = deployment(4, "v1", IntOrString::Int(0), IntOrString::Int(1));
        let mut sim = Sim::default();
        sim.settle(&mut d);
        let old = sim.rss[0].name_any();
        // Two old pods crash: available 2 < minimum 3.
        sim.pods.insert(old.clone(), (4, 2));
        sim.rs_controller(&old);
        set_image(&mut d, "v2");
        sim.events.clear();
        sim.sync(&mut d);
        // No surge: the broken pods are the only room to make.
        assert_eq!(
            sim.events,
            vec![
                format!("create {} 0", new_rs_name(&d)),
                format!("scale {old} 4 3")
            ]
        );
    }

    #[test]
    fn recreate_waits_for_old_pods_to_be_gone() {
        let mut d = recreate(3, "v1");
        let mut sim = Sim::default();
        sim.settle(&mut d);
        let old = sim.rss[0].name_any();
        set_image(&mut d, "v2");
        sim.events.clear();
        let p = sim.sync(&mut d);
        assert!(p.create.is_none());
        assert_eq!(sim.events, vec![format!("scale {old} 3 0")]);
        // The RS reports 0 but its pods are still terminating.
        sim.rss[0].status = Some(ReplicaSetStatus {
            replicas: 0,
            observed_generation: sim.rss[0].metadata.generation,
            ..Default::default()
        });
        let p = sim.sync(&mut d);
        assert!(p.create.is_none());
        assert_eq!(p.requeue, Some(RECREATE_POLL));
        // Gone: now the new RS starts at full size.
        sim.pods.insert(old.clone(), (0, 0));
        let p = sim.sync(&mut d);
        let rs = p.create.expect("new RS once old pods are gone");
        assert_eq!(replicas_of(&rs), 3);
        assert_eq!(ann(&rs, MAX_REPLICAS).as_deref(), Some("3"));
        sim.settle(&mut d);
        assert_eq!(
            cond(&d, PROGRESSING).reason.as_deref(),
            Some(NEW_RS_AVAILABLE)
        );
        assert_eq!(cond(&d, AVAILABLE).status.as_deref(), Some("True"));
        assert_eq!(d.status.as_ref().unwrap().updated_replicas, Some(3));
    }

    #[test]
    fn rollback_reuses_the_old_replica_set_with_a_new_revision() {
        let mut d = deployment(2, "v1", IntOrString::Int(1), IntOrString::Int(0));
        let mut sim = Sim::default();
        sim.settle(&mut d);
        let v1 = new_rs_name(&d);
        set_image(&mut d, "v2");
        sim.settle(&mut d);
        let v2 = new_rs_name(&d);
        assert_eq!(ann(sim.rs(&v2), REVISION).as_deref(), Some("2"));
        // `kubectl rollout undo`: the template goes back to v1's.
        set_image(&mut d, "v1");
        sim.events.clear();
        sim.settle(&mut d);
        assert_eq!(sim.rss.len(), 2, "no new RS: {:?}", sim.events);
        assert_eq!(ann(sim.rs(&v1), REVISION).as_deref(), Some("3"));
        assert_eq!(ann(sim.rs(&v1), REVISION_HISTORY).as_deref(), Some("1"));
        assert_eq!(replicas_of(sim.rs(&v1)), 2);
        assert_eq!(replicas_of(sim.rs(&v2)), 0);
        assert_eq!(d.metadata.annotations.as_ref().unwrap()[REVISION], "3");
        // And forward again: v2 becomes revision 4.
        set_image(&mut d, "v2");
        sim.settle(&mut d);
        assert_eq!(ann(sim.rs(&v2), REVISION).as_deref(), Some("4"));
        assert_eq!(ann(sim.rs(&v2), REVISION_HISTORY).as_deref(), Some("2"));
    }

    #[test]
    fn change_cause_follows_to_the_new_rs_only() {
        let mut d = deployment(1, "v1", IntOrString::Int(1), IntOrString::Int(0));
        d.metadata.annotations = Some([("kubernetes.io/change-cause".into(), "one".into())].into());
        let mut sim = Sim::default();
        sim.settle(&mut d);
        let v1 = new_rs_name(&d);
        set_image(&mut d, "v2");
        d.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert("kubernetes.io/change-cause".into(), "two".into());
        sim.settle(&mut d);
        assert_eq!(
            ann(sim.rs(&v1), "kubernetes.io/change-cause").as_deref(),
            Some("one")
        );
        assert_eq!(
            ann(sim.rs(&new_rs_name(&d)), "kubernetes.io/change-cause").as_deref(),
            Some("two")
        );
    }

    #[test]
    fn history_limit_deletes_oldest_empty_replica_sets() {
        let mut d = deployment(1, "v0", IntOrString::Int(1), IntOrString::Int(0));
        d.spec.revision_history_limit = Some(2);
        let mut sim = Sim::default();
        sim.settle(&mut d);
        for v in 1..=5 {
            set_image(&mut d, &format!("v{v}"));
            sim.settle(&mut d);
        }
        // v5 is current; 2 old ones kept, the most recent revisions.
        let mut revs: Vec<String> = sim.rss.iter().filter_map(|r| ann(r, REVISION)).collect();
        revs.sort();
        assert_eq!(revs, vec!["4", "5", "6"]);
        assert!(sim.events.iter().any(|e| e.starts_with("delete ")));

        // A non-empty old RS is never deleted, even beyond the limit.
        let mut d = deployment(1, "a", IntOrString::Int(1), IntOrString::Int(0));
        d.spec.revision_history_limit = Some(0);
        let mut old = rs_at("web-old", "old", 1, 1, 1);
        old.metadata
            .annotations
            .get_or_insert_default()
            .insert(REVISION.into(), "1".into());
        let p = plan(&d, vec![old], &HashMap::new(), ts(0)).unwrap();
        assert!(p.deletes.is_empty());
    }

    /// An owned RS stored with `replicas` (spec and status) and `avail` available.
    fn rs_at(name: &str, image: &str, replicas: i32, avail: i32, created: i64) -> ReplicaSet {
        let mut t = template(image);
        t.metadata
            .as_mut()
            .unwrap()
            .labels
            .as_mut()
            .unwrap()
            .insert(HASH_LABEL.into(), name.into());
        ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.into()),
                uid: Some(format!("uid-{name}")),
                generation: Some(1),
                creation_timestamp: Some(Time(ts(created))),
                owner_references: Some(vec![OwnerReference {
                    uid: "d-uid".into(),
                    controller: Some(true),
                    ..Default::default()
                }]),
                ..Default::default()
            },
            spec: ReplicaSetSpec {
                replicas: Some(replicas),
                template: Some(t),
                ..Default::default()
            },
            status: Some(ReplicaSetStatus {
                replicas,
                available_replicas: Some(avail),
                ready_replicas: Some(avail),
                observed_generation: Some(1),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn scaling_resizes_the_current_replica_set() {
        let mut d = deployment(3, "v1", IntOrString::Int(1), IntOrString::Int(0));
        let mut sim = Sim::default();
        sim.settle(&mut d);
        let rs = sim.rss[0].name_any();
        d.spec.replicas = Some(5);
        *d.metadata.generation.get_or_insert(1) += 1;
        sim.events.clear();
        sim.sync(&mut d);
        assert_eq!(sim.events, vec![format!("scale {rs} 3 5")]);
        assert_eq!(ann(sim.rs(&rs), DESIRED_REPLICAS).as_deref(), Some("5"));
        assert_eq!(ann(sim.rs(&rs), MAX_REPLICAS).as_deref(), Some("6"));
        sim.settle(&mut d);
        let s = d.status.as_ref().unwrap();
        assert_eq!(
            (s.replicas, s.updated_replicas, s.available_replicas),
            (Some(5), Some(5), Some(5))
        );
        // And to zero.
        d.spec.replicas = Some(0);
        sim.settle(&mut d);
        assert_eq!(replicas_of(sim.rs(&rs)), 0);
        assert_eq!(d.status.as_ref().unwrap().replicas, None);
    }

    #[test]
    fn scaling_mid_rollout_is_proportional() {
        // 10 replicas, surge 3: old 8 + new 5 = 13 at max, annotated for 10/13.
        let d0 = deployment(10, "new", IntOrString::Int(3), IntOrString::Int(2));
        let mut old = rs_at("web-old", "old", 8, 8, 1);
        let mut new = rs_at("web-new", "new", 5, 0, 2);
        for rs in [&mut old, &mut new] {
            let a = rs.metadata.annotations.get_or_insert_default();
            a.insert(DESIRED_REPLICAS.into(), "10".into());
            a.insert(MAX_REPLICAS.into(), "13".into());
        }
        old.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(REVISION.into(), "1".into());
        new.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(REVISION.into(), "2".into());
        // Scale to 20 (max 23): +10 split about 8:5.
        let mut d = d0.clone();
        d.spec.replicas = Some(20);
        let p = plan(&d, vec![old.clone(), new.clone()], &HashMap::new(), ts(0)).unwrap();
        let to: HashMap<&str, i32> = p.updates.iter().map(|u| (u.name.as_str(), u.to)).collect();
        assert_eq!(to["web-old"] + to["web-new"], 23);
        assert_eq!((to["web-old"], to["web-new"]), (14, 9));
        assert!(
            p.updates
                .iter()
                .all(|u| u.annotations[DESIRED_REPLICAS] == "20")
        );
        // Paused: the same scaling happens, but no rollout and the paused condition.
        d.spec.paused = Some(true);
        let p = plan(&d, vec![old, new], &HashMap::new(), ts(0)).unwrap();
        assert_eq!(p.updates.len(), 2);
        let s = p.status.unwrap();
        assert_eq!(
            get_condition(&s, PROGRESSING).unwrap().reason.as_deref(),
            Some(PAUSED)
        );
    }

    #[test]
    fn paused_does_not_roll_out_and_resume_continues() {
        let mut d = deployment(3, "v1", IntOrString::Int(1), IntOrString::Int(0));
        let mut sim = Sim::default();
        sim.settle(&mut d);
        d.spec.paused = Some(true);
        set_image(&mut d, "v2");
        sim.events.clear();
        sim.settle(&mut d);
        assert!(sim.events.is_empty(), "{:?}", sim.events);
        let c = cond(&d, PROGRESSING);
        assert_eq!(
            (c.status.as_deref().unwrap_or_default(), c.reason.as_deref()),
            ("Unknown", Some(PAUSED))
        );
        assert_eq!(c.message.as_deref(), Some("Deployment is paused"));
        assert_eq!(d.status.as_ref().unwrap().observed_generation, Some(2));
        assert_eq!(d.status.as_ref().unwrap().updated_replicas, None);

        d.spec.paused = Some(false);
        let p = sim.sync(&mut d);
        assert!(p.create.is_some());
        sim.settle(&mut d);
        assert_eq!(
            cond(&d, PROGRESSING).reason.as_deref(),
            Some(NEW_RS_AVAILABLE)
        );
        assert_eq!(replicas_of(sim.rs(&new_rs_name(&d))), 3);
    }

    #[test]
    fn progress_deadline_and_condition_times() {
        let mut d = deployment(2, "v1", IntOrString::Int(1), IntOrString::Int(0));
        d.spec.progress_deadline_seconds = Some(60);
        let mut sim = Sim::default();
        let p = sim.sync(&mut d);
        let created = cond(&d, PROGRESSING).clone();
        assert_eq!(created.reason.as_deref(), Some(NEW_RS_CREATED));
        assert_eq!(p.requeue, Some(Duration::from_secs(61)));
        // Pods never become ready: status unchanged, nothing written.
        sim.rs_controller_all();
        sim.clock += 30;
        let p = sim.sync(&mut d);
        assert!(p.status.is_some(), "replicas counted");
        let p = sim.sync(&mut d);
        assert!(p.status.is_none(), "unchanged status is not written");
        assert!(p.requeue.is_some_and(|r| r <= Duration::from_secs(61)));
        // One pod becomes ready: progress refreshes lastUpdateTime only.
        sim.kubelet(1);
        sim.rs_controller_all();
        sim.sync(&mut d);
        let c = cond(&d, PROGRESSING).clone();
        assert_eq!(c.reason.as_deref(), Some(RS_UPDATED));
        assert_eq!(c.last_transition_time, created.last_transition_time);
        assert_ne!(c.last_update_time, created.last_update_time);
        assert!(c.message.as_deref().unwrap().ends_with("is progressing."));
        // Then nothing for longer than the deadline.
        sim.clock += 100;
        let p = sim.sync(&mut d);
        let c = cond(&d, PROGRESSING).clone();
        assert_eq!(
            (c.status.as_deref().unwrap_or_default(), c.reason.as_deref()),
            ("False", Some(TIMED_OUT))
        );
        assert!(
            c.message
                .as_deref()
                .unwrap()
                .ends_with("has timed out progressing.")
        );
        assert_ne!(c.last_transition_time, created.last_transition_time);
        assert!(p.requeue.is_none());
        assert_eq!(cond(&d, AVAILABLE).reason.as_deref(), Some(MIN_UNAVAILABLE));
        // Recovery completes it.
        sim.settle(&mut d);
        let c = cond(&d, PROGRESSING);
        assert_eq!(
            (c.status.as_deref().unwrap_or_default(), c.reason.as_deref()),
            ("True", Some(NEW_RS_AVAILABLE))
        );
    }

    #[test]
    fn status_counts_and_available_threshold() {
        // 4 replicas, 25%: one may be unavailable.
        let d = deployment(
            4,
            "new",
            IntOrString::String("25%".into()),
            IntOrString::String("25%".into()),
        );
        let mut new = rs_at("web-new", "new", 2, 1, 2);
        new.status.as_mut().unwrap().ready_replicas = Some(2);
        let old = rs_at("web-old", "old", 3, 2, 1);
        let p = plan(&d, vec![old.clone(), new.clone()], &HashMap::new(), ts(0)).unwrap();
        let s = p.status.unwrap();
        assert_eq!(s.replicas, Some(5));
        assert_eq!(s.updated_replicas, Some(2));
        assert_eq!(s.ready_replicas, Some(4));
        assert_eq!(s.available_replicas, Some(3));
        // The unhealthy old replica is scaled away in this same sync: 4 wanted, 3 there.
        assert_eq!(s.unavailable_replicas, Some(1));
        let a = get_condition(&s, AVAILABLE).unwrap();
        assert_eq!(
            (a.status.as_deref().unwrap_or_default(), a.reason.as_deref()),
            ("True", Some(MIN_AVAILABLE))
        );
        assert_eq!(
            a.message.as_deref(),
            Some("Deployment has minimum availability.")
        );
        let mut old2 = old;
        old2.status.as_mut().unwrap().available_replicas = Some(1);
        let p = plan(&d, vec![old2, new], &HashMap::new(), ts(0)).unwrap();
        let a = get_condition(p.status.as_ref().unwrap(), AVAILABLE)
            .unwrap()
            .clone();
        assert_eq!(
            (a.status.as_deref().unwrap_or_default(), a.reason.as_deref()),
            ("False", Some(MIN_UNAVAILABLE))
        );

        // Zeroed counters are cleared in the patch.
        let v = status_patch(&DeploymentStatus::default());
        assert!(v["unavailableReplicas"].is_null() && v.get("unavailableReplicas").is_some());
    }

    #[test]
    fn condition_transition_time_kept_when_status_unchanged() {
        let mut s = DeploymentStatus::default();
        set_condition(
            &mut s,
            condition(PROGRESSING, "True", NEW_RS_CREATED, "a".into(), ts(1)),
        );
        set_condition(
            &mut s,
            condition(PROGRESSING, "True", NEW_RS_CREATED, "b".into(), ts(2)),
        );
        let c = get_condition(&s, PROGRESSING).unwrap();
        assert_eq!(c.message.as_deref(), Some("a"), "same reason is no change");
        set_condition(
            &mut s,
            condition(PROGRESSING, "True", NEW_RS_AVAILABLE, "c".into(), ts(3)),
        );
        let c = get_condition(&s, PROGRESSING).unwrap();
        assert_eq!(c.last_transition_time, Some(Time(ts(1))));
        assert_eq!(c.last_update_time, Some(Time(ts(3))));
        set_condition(
            &mut s,
            condition(PROGRESSING, "False", TIMED_OUT, "d".into(), ts(4)),
        );
        assert_eq!(
            get_condition(&s, PROGRESSING).unwrap().last_transition_time,
            Some(Time(ts(4)))
        );
    }

    #[test]
    fn collision_count_changes_the_new_name() {
        let mut d = deployment(1, "v1", IntOrString::Int(1), IntOrString::Int(0));
        let a = plan(&d, vec![], &HashMap::new(), ts(0))
            .unwrap()
            .create
            .unwrap()
            .name_any();
        d.status = Some(DeploymentStatus {
            collision_count: Some(1),
            ..Default::default()
        });
        let b = plan(&d, vec![], &HashMap::new(), ts(0))
            .unwrap()
            .create
            .unwrap()
            .name_any();
        assert_ne!(a, b);
        assert_eq!(b, new_rs_name(&d));
    }

    #[test]
    fn bad_specs_are_refused_not_panicked_on() {
        let mut d = deployment(1, "v1", IntOrString::Int(1), IntOrString::Int(0));
        d.spec.selector = LabelSelector::default();
        assert_eq!(check_spec(&d).unwrap_err().0, "SelectingAll");
        let mut d = deployment(1, "v1", IntOrString::Int(1), IntOrString::Int(0));
        d.spec.template = PodTemplateSpec::default();
        assert!(check_spec(&d).is_err());
        let mut d = deployment(1, "v1", IntOrString::Int(1), IntOrString::Int(0));
        d.spec.strategy.as_mut().unwrap().type_ = Some("Blue".into());
        assert!(plan(&d, vec![], &HashMap::new(), ts(0)).is_err());
    }
}
