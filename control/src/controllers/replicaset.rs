//! ReplicaSet controller: keeps `spec.replicas` Pods that match the selector and are
//! controlled by the ReplicaSet, and reports what it sees in status.
//!
//! Input: ReplicaSets, plus Pods (a pod event wakes its controller, or for an orphan every
//! ReplicaSet whose selector matches it). Each reconcile counts pods from the controller's
//! pod cache (one watch), as Kubernetes' podLister does: listing from the apiserver on
//! every pod event cost ~300 ms of apiserver CPU per reconcile at 2000 pods. A cache can
//! lag the controller's own writes, so, as in Kubernetes, "expectations" remember the
//! pods it created or deleted until the cache shows them; until then a reconcile only
//! reports status. Output: pod creates/deletes, ownerReference adoption and release,
//! Events and status.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::shared_pods::SharedPods;
use super::{Backoff, Error, Result, done_unless_error, is_conflict, is_not_found, key_of};
use crate::events::EventRecorder;
use crate::objects::{controller_ref, is_active, is_ready, ready_since, selector_matches};

const COMPONENT: &str = "replicaset-controller";
/// Kubernetes caps one sync's creates/deletes so a huge scale does not starve others.
const BURST: usize = 500;

/// How long an expectation may stay unmet before the reconcile acts anyway (a lost watch
/// event must not wedge a ReplicaSet; Kubernetes waits 5 minutes).
const EXPECTATION_TTL: Duration = Duration::from_secs(60);

pub struct Ctx {
    client: Client,
    events: EventRecorder,
    backoff: Backoff,
    pods: Store<Pod>,
    expectations: Expectations,
}

/// Pods a ReplicaSet's reconcile created or deleted that the pod cache may not show yet.
#[derive(Default)]
struct Expectations {
    by_rs: Mutex<HashMap<String, Expected>>,
}

struct Expected {
    /// Namespaced pod names created, to be seen in the cache.
    created: HashSet<String>,
    /// Namespaced pod names deleted, to be seen deleting or gone.
    deleted: HashSet<String>,
    since: Instant,
}

impl Expectations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Expected>> {
        self.by_rs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records what one reconcile wrote (nothing recorded when it wrote nothing).
    fn expect(&self, rs: &str, created: HashSet<String>, deleted: HashSet<String>) {
        if created.is_empty() && deleted.is_empty() {
            return;
        }
        let mut all = self.lock();
        // Entries of ReplicaSets that are gone are never checked again: drop expired ones.
        all.retain(|_, e| e.since.elapsed() <= EXPECTATION_TTL);
        all.insert(
            rs.to_string(),
            Expected {
                created,
                deleted,
                since: Instant::now(),
            },
        );
    }

    /// True when the cache shows every recorded write (or they expired): the pod count
    /// can be trusted. Clears what is met.
    fn satisfied(&self, rs: &str, pods: &Store<Pod>, ns: &str) -> bool {
        let mut all = self.lock();
        let Some(e) = all.get_mut(rs) else {
            return true;
        };
        let cached = |name: &str| pods.get(&ObjectRef::new(name).within(ns));
        e.created.retain(|name| cached(name).is_none());
        e.deleted
            .retain(|name| cached(name).is_some_and(|p| p.metadata.deletion_timestamp.is_none()));
        let met =
            (e.created.is_empty() && e.deleted.is_empty()) || e.since.elapsed() > EXPECTATION_TTL;
        if met {
            all.remove(rs);
        }
        met
    }
}

pub async fn run(client: Client, events: EventRecorder, shared_pods: Arc<SharedPods>) {
    let rs_api: Api<ReplicaSet> = Api::all(client.clone());
    let pods = shared_pods.store();
    let pod_events = shared_pods.events();
    let ctrl = Controller::new(rs_api, watcher::Config::default());
    let store = ctrl.store();
    // One pod watch serves both triggers: the controlling ReplicaSet, or for an orphan
    // every ReplicaSet in its namespace whose selector matches (adoption).
    let ctrl = ctrl.watches_shared_stream(pod_events, move |pod: Arc<Pod>| {
        let ns = pod.namespace().unwrap_or_default();
        if let Some(owner) = controller_ref(&pod.metadata) {
            if owner.kind == "ReplicaSet" {
                return vec![ObjectRef::new(&owner.name).within(&ns)];
            }
            return vec![];
        }
        store
            .state()
            .iter()
            .filter(|rs| rs.namespace().as_deref() == Some(ns.as_str()))
            .filter(|rs| selector_matches(&Some(&rs.spec.selector), pod.labels()))
            .map(|rs| ObjectRef::from_obj(rs.as_ref()))
            .collect()
    });
    let ctx = Arc::new(Ctx {
        client,
        events,
        backoff: Backoff::default(),
        pods,
        expectations: Expectations::default(),
    });
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(rs: Arc<ReplicaSet>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(rs.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("replicaset {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

/// Deletion order as Kubernetes ranks it: unscheduled before scheduled, pending before
/// running, not ready before ready, then the newest first.
fn deletion_rank(p: &Pod) -> (bool, u8, bool, std::cmp::Reverse<Option<i64>>) {
    let scheduled = p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
    let phase = match p.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Pending") | None => 0,
        Some("Running") => 2,
        _ => 1,
    };
    let created = p
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_microsecond());
    (scheduled, phase, is_ready(p), std::cmp::Reverse(created))
}

fn owner_ref(rs: &ReplicaSet) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: rs.name_any(),
        uid: rs.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn pod_from_template(rs: &ReplicaSet, template: &PodTemplateSpec) -> Pod {
    let tm = template.metadata.clone().unwrap_or_default();
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", rs.name_any())),
            namespace: rs.namespace(),
            labels: tm.labels,
            annotations: tm.annotations,
            finalizers: tm.finalizers,
            owner_references: Some(vec![owner_ref(rs)]),
            ..Default::default()
        },
        spec: template.spec.clone(),
        status: None,
    }
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(rs.as_ref());
    // A ReplicaSet being deleted belongs to the garbage collector: creating or adopting
    // pods now would fight foreground/orphan deletion.
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    let spec = rs.spec.clone();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    ctx.pods
        .wait_until_ready()
        .await
        .map_err(|e| Error::Other(format!("pod cache: {e}")))?;
    let in_sync = ctx.expectations.satisfied(&key, &ctx.pods, &ns);
    // Only the pods this ReplicaSet controls or could adopt (shared with the cache, not
    // copied: a reconcile runs on every pod event).
    let all: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        .filter(|p| match controller_ref(&p.metadata) {
            Some(o) => o.uid == uid,
            None => selector_matches(&Some(&spec.selector), p.labels()),
        })
        .collect();

    let mut owned: Vec<Arc<Pod>> = Vec::new();
    for pod in all {
        let matches = selector_matches(&Some(&spec.selector), pod.labels());
        match controller_ref(&pod.metadata) {
            Some(o) if o.uid == uid => {
                if matches {
                    owned.push(pod);
                } else if pod.metadata.deletion_timestamp.is_none() {
                    // Labels changed: let the pod go (it becomes an orphan).
                    release(&pods, &pod, &uid).await?;
                }
            }
            Some(_) => {}
            None if matches && pod.metadata.deletion_timestamp.is_none() => {
                if let Some(p) = adopt(&pods, &pod, &rs).await? {
                    owned.push(Arc::new(p));
                }
            }
            None => {}
        }
    }

    let mut active: Vec<Arc<Pod>> = owned.iter().filter(|p| is_active(p)).cloned().collect();
    let want = spec.replicas.unwrap_or(1).max(0) as usize;
    let mut failure: Option<String> = None;
    let (mut created, mut deleted) = (HashSet::new(), HashSet::new());
    if !in_sync {
        // The cache has not caught up with our last writes: report, do not act. Those
        // pods' events wake this ReplicaSet again; the requeue is a safety net.
        update_status(&ctx.client, &rs, &active, None).await?;
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    if active.len() < want {
        let template = spec.template.clone().unwrap_or_default();
        for _ in 0..(want - active.len()).min(BURST) {
            match pods
                .create(&PostParams::default(), &pod_from_template(&rs, &template))
                .await
            {
                Ok(p) => {
                    created.insert(p.name_any());
                    let msg = format!("Created pod: {}", p.name_any());
                    ctx.events
                        .record(COMPONENT, rs.as_ref(), "Normal", "SuccessfulCreate", &msg);
                    active.push(Arc::new(p));
                }
                Err(e) => {
                    let msg = format!("Error creating: {e}");
                    ctx.events
                        .record(COMPONENT, rs.as_ref(), "Warning", "FailedCreate", &msg);
                    failure = Some(msg);
                    break;
                }
            }
        }
    } else if active.len() > want {
        active.sort_by_key(|p| deletion_rank(p));
        let surplus = (active.len() - want).min(BURST);
        let victims: Vec<Arc<Pod>> = active.drain(..surplus).collect();
        for p in victims {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: p.uid(),
                    resource_version: None,
                }),
                ..DeleteParams::background()
            };
            match pods.delete(&p.name_any(), &dp).await {
                Ok(_) => {
                    deleted.insert(p.name_any());
                    let msg = format!("Deleted pod: {}", p.name_any());
                    ctx.events
                        .record(COMPONENT, rs.as_ref(), "Normal", "SuccessfulDelete", &msg);
                }
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    let msg = format!("Error deleting: {e}");
                    ctx.events
                        .record(COMPONENT, rs.as_ref(), "Warning", "FailedDelete", &msg);
                    active.push(p);
                    failure = Some(msg);
                    break;
                }
            }
        }
    }

    ctx.expectations.expect(&key, created, deleted);
    update_status(&ctx.client, &rs, &active, failure.as_deref()).await?;
    if let Some(msg) = failure {
        return Err(Error::Other(msg));
    }
    ctx.backoff.succeeded(&key);
    // A ready pod becomes available minReadySeconds later with no event to say so:
    // look again then.
    Ok(match next_available_in(&rs, &active) {
        Some(wait) => Action::requeue(wait),
        None => Action::await_change(),
    })
}

/// How long until the next ready-but-not-yet-available pod passes minReadySeconds.
fn next_available_in(rs: &ReplicaSet, active: &[Arc<Pod>]) -> Option<Duration> {
    let min_ready = rs.spec.min_ready_seconds.unwrap_or(0);
    if min_ready <= 0 {
        return None;
    }
    let now = super::now_timestamp().as_second();
    active
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| ready_since(p))
        .map(|t| t.as_second() + i64::from(min_ready) - now)
        .filter(|left| *left >= 0)
        .min()
        .map(|left| Duration::from_secs(left as u64 + 1))
}

/// Adds the ReplicaSet as controller of an orphan. The resourceVersion in the patch makes
/// it fail (409) if someone else adopted or changed the pod meanwhile.
async fn adopt(pods: &Api<Pod>, pod: &Pod, rs: &ReplicaSet) -> Result<Option<Pod>> {
    let mut refs = pod.metadata.owner_references.clone().unwrap_or_default();
    refs.push(owner_ref(rs));
    let patch =
        json!({"metadata": {"resourceVersion": pod.resource_version(), "ownerReferences": refs}});
    match pods
        .patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(p) => Ok(Some(p)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) if is_conflict(&e) => Err(Error::Other(format!(
            "pod {} changed while adopting it",
            pod.name_any()
        ))),
        Err(e) => Err(e.into()),
    }
}

async fn release(pods: &Api<Pod>, pod: &Pod, uid: &str) -> Result<()> {
    let refs: Vec<&OwnerReference> = pod
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|o| o.uid != uid)
        .collect();
    let patch =
        json!({"metadata": {"resourceVersion": pod.resource_version(), "ownerReferences": refs}});
    done_unless_error(
        pods.patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await,
    )
}

async fn update_status(
    client: &Client,
    rs: &ReplicaSet,
    active: &[Arc<Pod>],
    failure: Option<&str>,
) -> Result<()> {
    let spec = rs.spec.clone();
    let template_labels = spec
        .template
        .as_ref()
        .and_then(|t| t.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let fully_labeled = active
        .iter()
        .filter(|p| {
            template_labels
                .iter()
                .all(|(k, v)| p.labels().get(k) == Some(v))
        })
        .count();
    let ready: Vec<&Pod> = active
        .iter()
        .map(|p| &**p)
        .filter(|p| is_ready(p))
        .collect();
    let min_ready = Duration::from_secs(spec.min_ready_seconds.unwrap_or(0).max(0) as u64);
    let now = super::now_timestamp();
    let available = ready
        .iter()
        .filter(|p| {
            min_ready.is_zero()
                || ready_since(p)
                    .is_some_and(|t| now.as_second() - t.as_second() >= min_ready.as_secs() as i64)
        })
        .count();
    let old = rs.status.clone().unwrap_or_default();
    let mut conditions: Vec<_> = old
        .conditions
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c.type_.as_deref() != Some("ReplicaFailure"))
        .collect();
    if let Some(msg) = failure {
        conditions.push(k8s_openapi::api::apps::v1::ReplicaSetCondition {
            type_: Some("ReplicaFailure".into()),
            status: Some("True".into()),
            reason: Some("FailedCreate".into()),
            message: Some(msg.to_string()),
            last_transition_time: Some(super::now()),
        });
    }
    let status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(fully_labeled as i32),
        ready_replicas: Some(ready.len() as i32),
        available_replicas: Some(available as i32),
        observed_generation: rs.metadata.generation,
        conditions: (!conditions.is_empty()).then_some(conditions),
        terminating_replicas: old.terminating_replicas,
    };
    let same = old.replicas == status.replicas
        && old.fully_labeled_replicas.unwrap_or(0) == fully_labeled as i32
        && old.ready_replicas.unwrap_or(0) == ready.len() as i32
        && old.available_replicas.unwrap_or(0) == available as i32
        && old.observed_generation == status.observed_generation
        && old.conditions.as_ref().map(Vec::len) == status.conditions.as_ref().map(Vec::len);
    // Writing an unchanged status would only wake this controller again.
    if same {
        return Ok(());
    }
    let api: Api<ReplicaSet> = Api::namespaced(client.clone(), &rs.namespace().unwrap_or_default());
    let patch = json!({"status": status});
    done_unless_error(
        api.patch_status(
            &rs.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;

    fn pod(name: &str, deleting: bool) -> Pod {
        let mut p = Pod::default();
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("ns".into());
        if deleting {
            p.metadata.deletion_timestamp = Some(super::super::now());
        }
        p
    }

    #[test]
    fn expectations_hold_until_the_cache_shows_the_writes() {
        let (store, mut writer) = reflector::store::<Pod>();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        writer.apply_watcher_event(&Event::Apply(pod("old", false)));
        let e = Expectations::default();
        assert!(e.satisfied("ns/rs", &store, "ns"), "nothing expected");

        e.expect("ns/rs", names(&["new"]), names(&["old"]));
        assert!(!e.satisfied("ns/rs", &store, "ns"), "neither write seen");
        writer.apply_watcher_event(&Event::Apply(pod("new", false)));
        assert!(
            !e.satisfied("ns/rs", &store, "ns"),
            "the delete is not seen yet"
        );
        writer.apply_watcher_event(&Event::Apply(pod("old", true)));
        assert!(
            e.satisfied("ns/rs", &store, "ns"),
            "deleting counts as seen"
        );
        // Met expectations are cleared; another ReplicaSet is unaffected.
        assert!(e.lock().is_empty());
        e.expect("ns/other", names(&["never"]), HashSet::new());
        assert!(e.satisfied("ns/rs", &store, "ns"));
        assert!(!e.satisfied("ns/other", &store, "ns"));
    }
}
