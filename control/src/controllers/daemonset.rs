//! DaemonSet controller: one pod of the template on every node the pod may run on
//! (nodeSelector, required node affinity and NoSchedule/NoExecute taints decide, with
//! the tolerations Kubernetes gives every daemon pod), none elsewhere.
//!
//! As in Kubernetes since 1.12, the controller does not place pods itself: each pod is
//! created with a required node affinity on `metadata.name` of its node and the default
//! scheduler binds it there. Eligibility reuses the scheduler's own filters, so the two
//! never disagree about taints or affinity.
//!
//! Updates: RollingUpdate replaces pods whose `controller-revision-hash` label differs
//! from the template's, at most maxUnavailable (default 1) nodes at a time; OnDelete
//! waits for the user to delete them. Departure from Kubernetes: the hash is computed
//! from the template and no ControllerRevision objects are written (so
//! `kubectl rollout undo daemonset` has no history to go back to).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::shared_pods::SharedPods;
use super::{Backoff, ControllerConfig, Error, Result, done_unless_error, is_not_found, key_of};
use crate::events::EventRecorder;
use crate::objects::{controller_ref, is_active, is_ready};
use crate::scheduler::cache::NodeState;
use crate::scheduler::filters::{check_node_affinity, check_taints};
use crate::scheduler::pod_info::PodInfo;

const COMPONENT: &str = "daemonset-controller";
pub const REVISION_HASH_LABEL: &str = "controller-revision-hash";

pub struct Ctx {
    client: Client,
    events: EventRecorder,
    backoff: Backoff,
}

pub async fn run(
    client: Client,
    events: EventRecorder,
    _cfg: ControllerConfig,
    pods: Arc<SharedPods>,
) {
    let ds_api: Api<DaemonSet> = Api::all(client.clone());
    let ctrl = Controller::new(ds_api, watcher::Config::default());
    let store = ctrl.store();
    let ctrl = ctrl
        .owns_shared_stream(pods.events())
        // A node coming, going or changing labels/taints concerns every DaemonSet.
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |_node: Node| {
                store
                    .state()
                    .iter()
                    .map(|ds| ObjectRef::from_obj(ds.as_ref()))
                    .collect::<Vec<_>>()
            },
        );
    let ctx = Arc::new(Ctx {
        client,
        events,
        backoff: Backoff::default(),
    });
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(ds: Arc<DaemonSet>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(ds.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("daemonset {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

/// FNV-1a over the template's JSON, as a short label value.
pub fn template_hash(ds: &DaemonSet) -> String {
    let bytes = serde_json::to_vec(&ds.spec.template).unwrap_or_default();
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{h:08x}")
}

/// Tolerations every daemon pod gets (Kubernetes' AddOrUpdateDaemonPodTolerations), so
/// node problems do not evict or block it.
fn daemon_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Default::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t("node.kubernetes.io/unschedulable", "NoSchedule"),
    ]
}

/// The pod the DaemonSet runs on `node`, before the node pinning.
fn base_pod(ds: &DaemonSet, hash: &str) -> Pod {
    let template = ds.spec.template.clone();
    let tm = template.metadata.unwrap_or_default();
    let mut labels = tm.labels.unwrap_or_default();
    labels.insert(REVISION_HASH_LABEL.into(), hash.into());
    let mut spec = template.spec.unwrap_or_default();
    let mut tolerations = spec.tolerations.take().unwrap_or_default();
    for t in daemon_tolerations() {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    spec.tolerations = Some(tolerations);
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", ds.name_any())),
            namespace: ds.namespace(),
            labels: Some(labels),
            annotations: tm.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "DaemonSet".into(),
                name: ds.name_any(),
                uid: ds.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    }
}

/// Pins the pod to `node` with a required node affinity on metadata.name, replacing any
/// other node-name field terms (Kubernetes' ReplaceDaemonSetPodNodeNameNodeAffinity).
fn pin_to_node(mut pod: Pod, node: &str) -> Pod {
    let spec = pod.spec.get_or_insert_with(Default::default);
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let na = affinity
        .node_affinity
        .get_or_insert_with(NodeAffinity::default);
    na.required_during_scheduling_ignored_during_execution = Some(NodeSelector {
        node_selector_terms: vec![NodeSelectorTerm {
            match_fields: Some(vec![NodeSelectorRequirement {
                key: "metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![node.into()]),
            }]),
            match_expressions: None,
        }],
    });
    pod
}

/// Whether the daemon pod should run on this node: its own nodeSelector/affinity and
/// the node's NoSchedule/NoExecute taints, judged by the scheduler's filters.
pub fn should_run(pod: &PodInfo, node: &Node) -> bool {
    let state = NodeState::from_node(node);
    let name = node.name_any();
    check_node_affinity(pod, &name, &state).is_ok() && check_taints(pod, &state).is_ok()
}

fn max_unavailable(ds: &DaemonSet, desired: usize) -> usize {
    let ru = ds
        .spec
        .update_strategy
        .as_ref()
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone());
    let n = match ru {
        None => 1,
        Some(IntOrString::Int(n)) => n.max(0) as usize,
        Some(IntOrString::String(s)) => {
            let pct: usize = s.trim_end_matches('%').parse().unwrap_or(0);
            // Percentages round up for DaemonSets.
            (desired * pct).div_ceil(100)
        }
    };
    n.max(1)
}

/// What to do, computed from the nodes and the DaemonSet's active pods.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub create_on: Vec<String>,
    /// Pods to delete: on nodes they should not be on, duplicates, and old revisions
    /// within the rolling-update budget.
    pub delete: Vec<String>,
    pub status: DaemonSetStatus,
}

pub fn plan(ds: &DaemonSet, nodes: &[Node], pods: &[Pod], hash: &str) -> Plan {
    let info = PodInfo::from_pod(&base_pod(ds, hash));
    let mut by_node: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
    for p in pods {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .or_else(|| pinned_node(p))
            .unwrap_or_default();
        by_node.entry(node).or_default().push(p);
    }
    let mut out = Plan::default();
    let mut desired = 0usize;
    let (mut current, mut ready, mut updated, mut misscheduled) = (0, 0, 0, 0);
    let mut old_on_node: Vec<&Pod> = Vec::new();
    let mut unavailable = 0usize;
    let eligible: HashMap<String, bool> = nodes
        .iter()
        .map(|n| (n.name_any(), should_run(&info, n)))
        .collect();
    for node in nodes {
        let name = node.name_any();
        let run = eligible.get(&name).copied().unwrap_or(false);
        let mut here: Vec<&Pod> = by_node.remove(&name).unwrap_or_default();
        if run {
            desired += 1;
            if here.is_empty() {
                out.create_on.push(name);
                unavailable += 1;
                continue;
            }
            current += 1;
            // Keep the oldest; extra ones go.
            here.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
            for extra in &here[1..] {
                out.delete.push(extra.name_any());
            }
            let p = here[0];
            if is_ready(p) {
                ready += 1;
            } else {
                unavailable += 1;
            }
            if p.labels().get(REVISION_HASH_LABEL).map(String::as_str) == Some(hash) {
                updated += 1;
            } else {
                old_on_node.push(p);
            }
        } else if !here.is_empty() {
            misscheduled += 1;
            out.delete.extend(here.iter().map(|p| p.name_any()));
        }
    }
    // Pods pinned to nodes that no longer exist (and not yet bound) are removed too.
    for (node, pods) in by_node {
        if !node.is_empty() {
            out.delete.extend(pods.iter().map(|p| p.name_any()));
        }
    }
    let rolling = ds
        .spec
        .update_strategy
        .as_ref()
        .and_then(|s| s.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    if rolling {
        // Not-ready old pods first: replacing them costs no availability.
        old_on_node.sort_by_key(|p| is_ready(p));
        let mut budget = max_unavailable(ds, desired).saturating_sub(unavailable);
        for p in old_on_node {
            if !is_ready(p) {
                out.delete.push(p.name_any());
            } else if budget > 0 {
                budget -= 1;
                out.delete.push(p.name_any());
            }
        }
    }
    out.status = DaemonSetStatus {
        desired_number_scheduled: desired as i32,
        current_number_scheduled: current,
        number_misscheduled: misscheduled,
        number_ready: ready,
        number_available: Some(ready),
        number_unavailable: Some((desired as i32 - ready).max(0)),
        updated_number_scheduled: Some(updated),
        observed_generation: ds.metadata.generation,
        collision_count: None,
        conditions: None,
    };
    out
}

/// The node a not-yet-bound daemon pod is pinned to.
fn pinned_node(p: &Pod) -> Option<String> {
    p.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.as_deref().unwrap_or_default())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(ds.as_ref());
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = ds.namespace().unwrap_or_default();
    let uid = ds.uid().unwrap_or_default();
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let pods: Vec<Pod> = pods_api
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| controller_ref(&p.metadata).is_some_and(|o| o.uid == uid))
        .filter(is_active)
        .collect();
    let hash = template_hash(&ds);
    let plan = plan(&ds, &nodes, &pods, &hash);

    let mut failure = None;
    let base = base_pod(&ds, &hash);
    for node in &plan.create_on {
        let pod = pin_to_node(base.clone(), node);
        match pods_api.create(&PostParams::default(), &pod).await {
            Ok(p) => {
                let msg = format!("Created pod: {}", p.name_any());
                ctx.events
                    .record(COMPONENT, ds.as_ref(), "Normal", "SuccessfulCreate", &msg);
            }
            Err(e) => {
                let msg = format!("Error creating: {e}");
                ctx.events
                    .record(COMPONENT, ds.as_ref(), "Warning", "FailedCreate", &msg);
                failure = Some(msg);
                break;
            }
        }
    }
    for name in &plan.delete {
        let uid = pods
            .iter()
            .find(|p| p.name_any() == *name)
            .and_then(|p| p.uid());
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        match pods_api.delete(name, &dp).await {
            Ok(_) => {
                let msg = format!("Deleted pod: {name}");
                ctx.events
                    .record(COMPONENT, ds.as_ref(), "Normal", "SuccessfulDelete", &msg);
            }
            Err(e) if is_not_found(&e) => {}
            Err(e) => failure = Some(format!("Error deleting: {e}")),
        }
    }

    let old = ds.status.clone().unwrap_or_default();
    if old != plan.status {
        let api: Api<DaemonSet> = Api::namespaced(ctx.client.clone(), &ns);
        done_unless_error(
            api.patch_status(
                &ds.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": plan.status})),
            )
            .await,
        )?;
    }
    if let Some(msg) = failure {
        return Err(Error::Other(msg));
    }
    ctx.backoff.succeeded(&key);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetSpec;
    use k8s_openapi::api::core::v1::{
        Container, NodeCondition, NodeSpec, NodeStatus, PodCondition, PodSpec, PodStatus,
        PodTemplateSpec, Taint,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn node(name: &str, taint: Option<(&str, &str)>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("kubernetes.io/hostname".to_string(), name.to_string())].into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: taint.map(|(k, e)| {
                    vec![Taint {
                        key: k.into(),
                        effect: e.into(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn ds() -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta {
                name: Some("agent".into()),
                namespace: Some("kube-system".into()),
                uid: Some("ds-uid".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec: DaemonSetSpec {
                selector: LabelSelector {
                    match_labels: Some([("app".to_string(), "agent".to_string())].into()),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        labels: Some([("app".to_string(), "agent".to_string())].into()),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        containers: vec![Container {
                            name: "c".into(),
                            image: Some("agent:1".into()),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                },
                ..Default::default()
            },
            status: None,
        }
    }

    fn running_pod(ds: &DaemonSet, name: &str, node: &str, hash: &str, ready: bool) -> Pod {
        let mut p = pin_to_node(base_pod(ds, hash), node);
        p.metadata.name = Some(name.into());
        p.metadata.uid = Some(format!("uid-{name}"));
        p.spec.as_mut().unwrap().node_name = Some(node.into());
        p.status = Some(PodStatus {
            phase: Some("Running".into()),
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        });
        p
    }

    #[test]
    fn one_pod_per_eligible_node_and_tainted_nodes_skipped() {
        let d = ds();
        let hash = template_hash(&d);
        let nodes = vec![
            node("a", None),
            node("b", None),
            node("t", Some(("dedicated", "NoSchedule"))),
        ];
        let pods = vec![
            running_pod(&d, "p-a", "a", &hash, true),
            running_pod(&d, "p-t", "t", &hash, true),
        ];
        let p = plan(&d, &nodes, &pods, &hash);
        assert_eq!(p.create_on, vec!["b".to_string()]);
        assert_eq!(p.delete, vec!["p-t".to_string()], "misscheduled pod goes");
        assert_eq!(p.status.desired_number_scheduled, 2);
        assert_eq!(p.status.number_misscheduled, 1);
        assert_eq!(p.status.number_ready, 1);
    }

    #[test]
    fn daemon_pods_tolerate_node_problems() {
        let d = ds();
        let info = PodInfo::from_pod(&base_pod(&d, "h"));
        assert!(should_run(
            &info,
            &node("x", Some(("node.kubernetes.io/unreachable", "NoExecute")))
        ));
        assert!(should_run(
            &info,
            &node(
                "x",
                Some(("node.kubernetes.io/unschedulable", "NoSchedule"))
            )
        ));
        assert!(!should_run(&info, &node("x", Some(("gpu", "NoExecute")))));
    }

    #[test]
    fn rolling_update_replaces_one_node_at_a_time() {
        let d = ds();
        let hash = template_hash(&d);
        let nodes = vec![node("a", None), node("b", None), node("c", None)];
        let old: Vec<Pod> = ["a", "b", "c"]
            .iter()
            .map(|n| running_pod(&d, &format!("old-{n}"), n, "old", true))
            .collect();
        let p = plan(&d, &nodes, &old, &hash);
        assert_eq!(p.delete.len(), 1, "maxUnavailable 1: {:?}", p.delete);
        assert!(p.create_on.is_empty());
        // With one node already without a pod, nothing more is deleted.
        let p = plan(&d, &nodes, &old[1..], &hash);
        assert_eq!(p.create_on, vec!["a".to_string()]);
        assert!(p.delete.is_empty(), "{:?}", p.delete);
    }

    #[test]
    fn hash_follows_the_template() {
        let a = ds();
        let mut b = ds();
        assert_eq!(template_hash(&a), template_hash(&b));
        b.spec.template.spec.as_mut().unwrap().containers[0].image = Some("agent:2".into());
        assert_ne!(template_hash(&a), template_hash(&b));
    }
}
