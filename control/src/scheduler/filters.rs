//! Filters: can this pod run on this node at all? Each check returns kube-scheduler's
//! reason text, because users (and tooling) read those in FailedScheduling events.
//! Checks run in kube-scheduler's plugin order and stop at the first failing one, so a
//! node contributes the same reason it would with kube-scheduler.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::{NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};

use super::cache::{Cache, NodeInfo, NodeState};
use super::pod_info::{AffinityTerm, PodInfo};

pub const REASON_NOT_READY: &str = "node(s) were not ready";
pub const REASON_UNSCHEDULABLE: &str = "node(s) were unschedulable";
pub const REASON_NODE_AFFINITY: &str = "node(s) didn't match Pod's node affinity/selector";
pub const REASON_PORTS: &str = "node(s) didn't have free ports for the requested pod ports";
pub const REASON_CPU: &str = "Insufficient cpu";
pub const REASON_MEMORY: &str = "Insufficient memory";
pub const REASON_PODS: &str = "Too many pods";
pub const REASON_POD_AFFINITY: &str = "node(s) didn't match pod affinity rules";
pub const REASON_POD_ANTI_AFFINITY: &str = "node(s) didn't match pod anti-affinity rules";
pub const REASON_EXISTING_ANTI_AFFINITY: &str =
    "node(s) didn't satisfy existing pods anti-affinity rules";

pub const TAINT_NOT_READY: &str = "node.kubernetes.io/not-ready";
pub const TAINT_UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// What kind of cluster change could make a failed node fit, so a waiting pod is only
/// retried when it might help (kube-scheduler's queueing hints, coarsely).
pub mod kind {
    /// Only a Node change helps (readiness, taints, labels, allocatable).
    pub const NODE: u8 = 1;
    /// A pod leaving frees room (resources, host ports, anti-affinity).
    pub const POD_REMOVED: u8 = 2;
    /// A pod arriving may satisfy pod affinity.
    pub const POD_ADDED: u8 = 4;
}

/// Why a node was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unfit {
    pub reasons: Vec<String>,
    /// Bits from [`kind`].
    pub kind: u8,
}

impl Unfit {
    fn one(reason: &str, kind: u8) -> Unfit {
        Unfit {
            reasons: vec![reason.to_string()],
            kind,
        }
    }
}

/// Runs every filter against one node.
pub fn filter_node(
    pod: &PodInfo,
    node: &NodeInfo,
    state: &NodeState,
    inter_pod: &InterPodState,
) -> Result<(), Unfit> {
    check_ready(pod, state)?;
    check_unschedulable(pod, state)?;
    check_taints(pod, state)?;
    check_node_affinity(pod, &node.name, state)?;
    check_ports(pod, node)?;
    check_resources(pod, node, state)?;
    inter_pod.check(pod, state)
}

/// A node whose Ready condition is not True, unless the pod tolerates the not-ready
/// taint with either effect (DaemonSet pods such as the CNI must reach nodes that are
/// not ready yet; the DaemonSet controller gives them the NoExecute toleration).
pub fn check_ready(pod: &PodInfo, state: &NodeState) -> Result<(), Unfit> {
    if state.ready
        || tolerates_any(&pod.tolerations, TAINT_NOT_READY, "NoSchedule")
        || tolerates_any(&pod.tolerations, TAINT_NOT_READY, "NoExecute")
    {
        return Ok(());
    }
    Err(Unfit::one(REASON_NOT_READY, kind::NODE))
}

/// spec.unschedulable (cordon), unless tolerated as kube-scheduler's NodeUnschedulable does.
pub fn check_unschedulable(pod: &PodInfo, state: &NodeState) -> Result<(), Unfit> {
    if !state.unschedulable || tolerates_any(&pod.tolerations, TAINT_UNSCHEDULABLE, "NoSchedule") {
        return Ok(());
    }
    Err(Unfit::one(REASON_UNSCHEDULABLE, kind::NODE))
}

fn tolerates_any(tolerations: &[Toleration], key: &str, effect: &str) -> bool {
    let taint = Taint {
        key: key.to_string(),
        effect: effect.to_string(),
        ..Default::default()
    };
    tolerations.iter().any(|t| tolerates(t, &taint))
}

/// Kubernetes' `Toleration.ToleratesTaint`.
pub fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    if !key.is_empty() && key != taint.key {
        return false;
    }
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => true,
        "" | "Equal" => {
            toleration.value.as_deref().unwrap_or_default()
                == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// The first NoSchedule/NoExecute taint the pod does not tolerate.
pub fn check_taints(pod: &PodInfo, state: &NodeState) -> Result<(), Unfit> {
    let untolerated = state.taints.iter().find(|taint| {
        matches!(taint.effect.as_str(), "NoSchedule" | "NoExecute")
            && !pod.tolerations.iter().any(|t| tolerates(t, taint))
    });
    match untolerated {
        None => Ok(()),
        Some(taint) => Err(Unfit::one(
            &format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key,
                taint.value.as_deref().unwrap_or_default()
            ),
            kind::NODE,
        )),
    }
}

/// nodeSelector and required node affinity.
pub fn check_node_affinity(pod: &PodInfo, node_name: &str, state: &NodeState) -> Result<(), Unfit> {
    let selector_ok = pod
        .node_selector
        .iter()
        .all(|(k, v)| state.labels.get(k) == Some(v));
    let affinity_ok = match &pod.required_node_affinity {
        None => true,
        Some(terms) => terms
            .iter()
            .any(|t| node_selector_term_matches(t, &state.labels, node_name)),
    };
    if selector_ok && affinity_ok {
        return Ok(());
    }
    Err(Unfit::one(REASON_NODE_AFFINITY, kind::NODE))
}

/// A node selector term: all expressions and all fields must match; a term with
/// neither matches nothing.
pub fn node_selector_term_matches(
    term: &NodeSelectorTerm,
    labels: &BTreeMap<String, String>,
    node_name: &str,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            // metadata.name is the only field selector Kubernetes supports here.
            r.key == "metadata.name"
                && matches!(r.operator.as_str(), "In" | "NotIn")
                && requirement_matches(r, Some(node_name))
        })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let as_int = |v: &str| v.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(have), [want]) = (value.and_then(as_int), values) else {
                return false;
            };
            let Some(want) = as_int(want) else {
                return false;
            };
            if r.operator == "Gt" {
                have > want
            } else {
                have < want
            }
        }
        _ => false,
    }
}

/// Host ports already taken on the node.
pub fn check_ports(pod: &PodInfo, node: &NodeInfo) -> Result<(), Unfit> {
    if pod.host_ports.iter().any(|p| node.port_in_use(p)) {
        return Err(Unfit::one(REASON_PORTS, kind::POD_REMOVED));
    }
    Ok(())
}

/// cpu, memory and pod count against allocatable; every shortfall is reported, as
/// NodeResourcesFit does. Zero requests always fit.
pub fn check_resources(pod: &PodInfo, node: &NodeInfo, state: &NodeState) -> Result<(), Unfit> {
    let alloc = &state.allocatable;
    let used = &node.requested;
    let want = &pod.requests;
    let mut reasons = Vec::new();
    if used.pods.saturating_add(1) > alloc.pods {
        reasons.push(REASON_PODS.to_string());
    }
    if want.milli_cpu > 0 && used.milli_cpu.saturating_add(want.milli_cpu) > alloc.milli_cpu {
        reasons.push(REASON_CPU.to_string());
    }
    if want.memory > 0 && used.memory.saturating_add(want.memory) > alloc.memory {
        reasons.push(REASON_MEMORY.to_string());
    }
    if reasons.is_empty() {
        return Ok(());
    }
    Err(Unfit {
        reasons,
        kind: kind::POD_REMOVED,
    })
}

/// Required inter-pod (anti-)affinity, precomputed once per decision as sets of
/// topology values (e.g. node names for kubernetes.io/hostname) so each node is checked
/// by lookups instead of scanning pods.
#[derive(Debug, Default)]
pub struct InterPodState {
    /// Per affinity term of the incoming pod: topology values holding a matching pod.
    affinity_domains: Vec<HashSet<String>>,
    /// No pod anywhere matches the affinity terms but the pod matches them itself:
    /// the first pod of a group may go anywhere (kube-scheduler's special case).
    affinity_self_satisfied: bool,
    /// Per anti-affinity term of the incoming pod: topology values it must avoid.
    anti_affinity_domains: Vec<HashSet<String>>,
    /// (topology key, value) pairs where an existing pod's anti-affinity rejects this pod.
    existing_anti_affinity: HashSet<(String, String)>,
}

impl InterPodState {
    pub fn build(pod: &PodInfo, cache: &Cache) -> InterPodState {
        let mut st = InterPodState {
            affinity_domains: vec![HashSet::new(); pod.pod_affinity.len()],
            anti_affinity_domains: vec![HashSet::new(); pod.pod_anti_affinity.len()],
            ..Default::default()
        };
        let topology_value = |node: &str, key: &str| -> Option<String> {
            cache.node(node)?.node.as_ref()?.labels.get(key).cloned()
        };

        if !pod.pod_affinity.is_empty() || !pod.pod_anti_affinity.is_empty() {
            for other in cache.pods().filter(|p| p.info.key != pod.key) {
                let (ns, labels) = (&other.info.namespace, &other.info.labels);
                let terms = pod
                    .pod_affinity
                    .iter()
                    .zip(st.affinity_domains.iter_mut())
                    .chain(
                        pod.pod_anti_affinity
                            .iter()
                            .zip(st.anti_affinity_domains.iter_mut()),
                    );
                for (term, domains) in terms {
                    if term.matches(ns, labels)
                        && let Some(v) = topology_value(&other.node, &term.topology_key)
                    {
                        domains.insert(v);
                    }
                }
            }
        }
        st.affinity_self_satisfied = !pod.pod_affinity.is_empty()
            && st.affinity_domains.iter().all(HashSet::is_empty)
            && pod
                .pod_affinity
                .iter()
                .all(|t| t.matches(&pod.namespace, &pod.labels));

        for other in cache.anti_affinity_pods().filter(|p| p.info.key != pod.key) {
            for term in &other.info.pod_anti_affinity {
                if term.matches(&pod.namespace, &pod.labels)
                    && let Some(v) = topology_value(&other.node, &term.topology_key)
                {
                    st.existing_anti_affinity
                        .insert((term.topology_key.clone(), v));
                }
            }
        }
        st
    }

    /// kube-scheduler's InterPodAffinity filter order: affinity, anti-affinity, then
    /// existing pods' anti-affinity.
    pub fn check(&self, pod: &PodInfo, state: &NodeState) -> Result<(), Unfit> {
        if !self.satisfies_affinity(&pod.pod_affinity, state) {
            return Err(Unfit::one(REASON_POD_AFFINITY, kind::POD_ADDED));
        }
        let violates_anti = pod
            .pod_anti_affinity
            .iter()
            .zip(&self.anti_affinity_domains)
            .any(|(term, domains)| {
                state
                    .labels
                    .get(&term.topology_key)
                    .is_some_and(|v| domains.contains(v))
            });
        if violates_anti {
            return Err(Unfit::one(REASON_POD_ANTI_AFFINITY, kind::POD_REMOVED));
        }
        let repelled = self
            .existing_anti_affinity
            .iter()
            .any(|(key, value)| state.labels.get(key) == Some(value));
        if repelled {
            return Err(Unfit::one(REASON_EXISTING_ANTI_AFFINITY, kind::POD_REMOVED));
        }
        Ok(())
    }

    fn satisfies_affinity(&self, terms: &[AffinityTerm], state: &NodeState) -> bool {
        if terms.is_empty() {
            return true;
        }
        // The node must carry every term's topology key in any case.
        let values: Option<Vec<&String>> = terms
            .iter()
            .map(|t| state.labels.get(&t.topology_key))
            .collect();
        let Some(values) = values else {
            return false;
        };
        self.affinity_self_satisfied
            || values
                .iter()
                .zip(&self.affinity_domains)
                .all(|(v, domains)| domains.contains(*v))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::scheduler::cache::tests::{node, pod_info};
    use crate::scheduler::pod_info::{ANY_IP, HostPort, TermNamespaces};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    const HOSTNAME: &str = "kubernetes.io/hostname";

    fn setup(nodes: &[&str]) -> Cache {
        let mut cache = Cache::default();
        for n in nodes {
            cache.update_node(&node(n, "2", "4Gi", "110"));
        }
        cache
    }

    fn run(pod: &PodInfo, cache: &Cache, node_name: &str) -> Result<(), Unfit> {
        let info = cache.node(node_name).expect("node");
        let state = info.node.as_ref().expect("node state");
        filter_node(pod, info, state, &InterPodState::build(pod, cache))
    }

    fn reasons(r: Result<(), Unfit>) -> Vec<String> {
        r.err().map(|u| u.reasons).unwrap_or_default()
    }

    fn toleration(key: &str, op: &str, value: &str, effect: &str) -> Toleration {
        let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
        Toleration {
            key: opt(key),
            operator: opt(op),
            value: opt(value),
            effect: opt(effect),
            toleration_seconds: None,
        }
    }

    fn taint(key: &str, value: &str, effect: &str) -> Taint {
        Taint {
            key: key.into(),
            value: (!value.is_empty()).then(|| value.to_string()),
            effect: effect.into(),
            time_added: None,
        }
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn state_of(
        cache: &mut Cache,
        name: &str,
        edit: impl FnOnce(&mut k8s_openapi::api::core::v1::Node),
    ) {
        let mut n = node(name, "2", "4Gi", "110");
        edit(&mut n);
        cache.update_node(&n);
    }

    #[test]
    fn not_ready_nodes_unless_tolerated() {
        let mut cache = setup(&[]);
        state_of(&mut cache, "a", |n| {
            if let Some(s) = n.status.as_mut() {
                s.conditions = None;
            }
        });
        let mut pod = pod_info("ns/p", 0, 0);
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_NOT_READY]);
        pod.tolerations = vec![toleration(TAINT_NOT_READY, "Exists", "", "")];
        assert!(run(&pod, &cache, "a").is_ok());
    }

    #[test]
    fn cordoned_nodes_unless_tolerated() {
        let mut cache = setup(&[]);
        state_of(&mut cache, "a", |n| {
            if let Some(s) = n.spec.as_mut() {
                s.unschedulable = Some(true);
            }
        });
        let mut pod = pod_info("ns/p", 0, 0);
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_UNSCHEDULABLE]);
        pod.tolerations = vec![toleration(TAINT_UNSCHEDULABLE, "Exists", "", "NoSchedule")];
        assert!(run(&pod, &cache, "a").is_ok());
    }

    #[test]
    fn toleration_matching() {
        let t = taint("dedicated", "gpu", "NoSchedule");
        assert!(tolerates(
            &toleration("dedicated", "Equal", "gpu", "NoSchedule"),
            &t
        ));
        assert!(tolerates(&toleration("dedicated", "", "gpu", ""), &t));
        assert!(tolerates(&toleration("dedicated", "Exists", "", ""), &t));
        // Empty key with Exists tolerates everything.
        assert!(tolerates(&toleration("", "Exists", "", ""), &t));
        assert!(!tolerates(&toleration("dedicated", "Equal", "cpu", ""), &t));
        assert!(!tolerates(
            &toleration("dedicated", "Exists", "", "NoExecute"),
            &t
        ));
        assert!(!tolerates(&toleration("other", "Exists", "", ""), &t));
        assert!(!tolerates(&toleration("dedicated", "Bogus", "gpu", ""), &t));
    }

    #[test]
    fn untolerated_taints_are_reported_like_kube_scheduler() {
        let mut cache = setup(&[]);
        state_of(&mut cache, "a", |n| {
            if let Some(s) = n.spec.as_mut() {
                s.taints = Some(vec![
                    taint("soft", "", "PreferNoSchedule"),
                    taint("dedicated", "gpu", "NoSchedule"),
                ]);
            }
        });
        let mut pod = pod_info("ns/p", 0, 0);
        assert_eq!(
            reasons(run(&pod, &cache, "a")),
            vec!["node(s) had untolerated taint {dedicated: gpu}"]
        );
        pod.tolerations = vec![toleration("dedicated", "Equal", "gpu", "NoSchedule")];
        assert!(run(&pod, &cache, "a").is_ok());
    }

    #[test]
    fn node_selector_and_required_affinity() {
        let mut cache = setup(&[]);
        state_of(&mut cache, "a", |n| {
            n.metadata.labels = Some(labels(&[("disk", "ssd"), ("cores", "8")]));
        });
        let mut pod = pod_info("ns/p", 0, 0);
        pod.node_selector = labels(&[("disk", "ssd")]);
        assert!(run(&pod, &cache, "a").is_ok());
        pod.node_selector = labels(&[("disk", "hdd")]);
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_NODE_AFFINITY]);
        pod.node_selector.clear();

        let req = |key: &str, op: &str, values: &[&str]| NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(values.iter().map(|v| v.to_string()).collect()),
        };
        let term = |exprs: Vec<NodeSelectorRequirement>, fields: Vec<NodeSelectorRequirement>| {
            NodeSelectorTerm {
                match_expressions: Some(exprs),
                match_fields: Some(fields),
            }
        };
        let node_labels = labels(&[("disk", "ssd"), ("cores", "8")]);
        let matches = |t: &NodeSelectorTerm| node_selector_term_matches(t, &node_labels, "a");
        assert!(matches(&term(
            vec![req("disk", "In", &["ssd", "nvme"])],
            vec![]
        )));
        assert!(!matches(&term(
            vec![req("disk", "NotIn", &["ssd"])],
            vec![]
        )));
        assert!(matches(&term(vec![req("zone", "NotIn", &["x"])], vec![])));
        assert!(matches(&term(vec![req("disk", "Exists", &[])], vec![])));
        assert!(matches(&term(
            vec![req("zone", "DoesNotExist", &[])],
            vec![]
        )));
        assert!(matches(&term(vec![req("cores", "Gt", &["4"])], vec![])));
        assert!(!matches(&term(vec![req("cores", "Lt", &["4"])], vec![])));
        assert!(!matches(&term(vec![req("disk", "Gt", &["4"])], vec![])));
        assert!(!matches(&term(vec![req("disk", "Near", &["ssd"])], vec![])));
        assert!(matches(&term(
            vec![],
            vec![req("metadata.name", "In", &["a"])]
        )));
        assert!(!matches(&term(
            vec![],
            vec![req("metadata.name", "In", &["b"])]
        )));
        assert!(!matches(&term(vec![], vec![])));

        // Terms are ORed.
        pod.required_node_affinity = Some(vec![
            term(vec![req("disk", "In", &["hdd"])], vec![]),
            term(vec![], vec![req("metadata.name", "In", &["a"])]),
        ]);
        assert!(run(&pod, &cache, "a").is_ok());
        pod.required_node_affinity = Some(vec![term(vec![req("disk", "In", &["hdd"])], vec![])]);
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_NODE_AFFINITY]);
        pod.required_node_affinity = Some(vec![]);
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_NODE_AFFINITY]);
    }

    #[test]
    fn resources_report_every_shortfall() {
        let mut cache = setup(&[]);
        cache.update_node(&node("a", "1", "1Gi", "2"));
        cache.add_bound_pod(Arc::new(pod_info("ns/x", 800, 512 << 20)), "a");
        assert!(run(&pod_info("ns/p", 200, 512 << 20), &cache, "a").is_ok());
        assert_eq!(
            reasons(run(&pod_info("ns/p", 201, 513 << 20), &cache, "a")),
            vec![REASON_CPU, REASON_MEMORY]
        );
        // Assumed pods count as well.
        cache.assume(Arc::new(pod_info("ns/y", 0, 0)), "a");
        assert_eq!(
            reasons(run(&pod_info("ns/p", 0, 0), &cache, "a")),
            vec![REASON_PODS]
        );
    }

    #[test]
    fn zero_requests_fit_a_full_node() {
        let mut cache = setup(&[]);
        cache.update_node(&node("a", "1", "1Gi", "110"));
        cache.add_bound_pod(Arc::new(pod_info("ns/x", 1000, 1 << 30)), "a");
        assert!(run(&pod_info("ns/p", 0, 0), &cache, "a").is_ok());
    }

    #[test]
    fn host_port_conflicts() {
        let mut cache = setup(&["a"]);
        let port = |ip: &str, port: i32| HostPort {
            ip: ip.into(),
            protocol: "TCP".into(),
            port,
        };
        let mut existing = pod_info("ns/x", 0, 0);
        existing.host_ports = vec![port(ANY_IP, 8080)];
        cache.add_bound_pod(Arc::new(existing), "a");
        let mut pod = pod_info("ns/p", 0, 0);
        pod.host_ports = vec![port("10.0.0.1", 8080)];
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_PORTS]);
        pod.host_ports = vec![port("10.0.0.1", 8081)];
        assert!(run(&pod, &cache, "a").is_ok());
    }

    fn term(kv: &[(&str, &str)]) -> AffinityTerm {
        AffinityTerm {
            selector: Some(LabelSelector {
                match_labels: Some(labels(kv)),
                match_expressions: None,
            }),
            namespaces: TermNamespaces::Listed(vec!["ns".into()]),
            topology_key: HOSTNAME.into(),
        }
    }

    fn labelled(key: &str, kv: &[(&str, &str)]) -> PodInfo {
        let mut p = pod_info(key, 0, 0);
        p.labels = labels(kv);
        p
    }

    #[test]
    fn pod_anti_affinity_on_hostname() {
        let mut cache = setup(&["a", "b"]);
        cache.add_bound_pod(Arc::new(labelled("ns/db-0", &[("app", "db")])), "a");
        // Same labels in another namespace do not count.
        cache.add_bound_pod(Arc::new(labelled("other/db-0", &[("app", "db")])), "b");
        let mut pod = labelled("ns/db-1", &[("app", "db")]);
        pod.pod_anti_affinity = vec![term(&[("app", "db")])];
        assert_eq!(
            reasons(run(&pod, &cache, "a")),
            vec![REASON_POD_ANTI_AFFINITY]
        );
        assert!(run(&pod, &cache, "b").is_ok());
        // Listing the other namespace makes node b conflict too.
        pod.pod_anti_affinity[0].namespaces = TermNamespaces::All;
        assert_eq!(
            reasons(run(&pod, &cache, "b")),
            vec![REASON_POD_ANTI_AFFINITY]
        );
    }

    #[test]
    fn existing_pods_anti_affinity_repels_incoming() {
        let mut cache = setup(&["a", "b"]);
        let mut loner = labelled("ns/loner", &[("app", "loner")]);
        loner.pod_anti_affinity = vec![term(&[("app", "web")])];
        cache.add_bound_pod(Arc::new(loner), "a");
        let web = labelled("ns/web", &[("app", "web")]);
        assert_eq!(
            reasons(run(&web, &cache, "a")),
            vec![REASON_EXISTING_ANTI_AFFINITY]
        );
        assert!(run(&web, &cache, "b").is_ok());
        // A pod the rule does not select is unaffected.
        assert!(run(&labelled("ns/api", &[("app", "api")]), &cache, "a").is_ok());
    }

    #[test]
    fn pod_affinity_on_hostname() {
        let mut cache = setup(&["a", "b"]);
        let mut pod = labelled("ns/web", &[("app", "web")]);
        pod.pod_affinity = vec![term(&[("app", "cache")])];
        // Nothing matches anywhere and the pod does not match itself: no node.
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_POD_AFFINITY]);
        cache.add_bound_pod(Arc::new(labelled("ns/cache", &[("app", "cache")])), "b");
        assert_eq!(reasons(run(&pod, &cache, "a")), vec![REASON_POD_AFFINITY]);
        assert!(run(&pod, &cache, "b").is_ok());

        // The first pod of a self-affine group may go anywhere.
        let mut first = labelled("ns/g-0", &[("group", "g")]);
        first.pod_affinity = vec![term(&[("group", "g")])];
        assert!(run(&first, &cache, "a").is_ok());
    }
}
