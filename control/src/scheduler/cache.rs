//! The scheduler's view of the cluster: per node what it offers (from the Node object)
//! and what is already taken, summed from the bound pods the watch reports PLUS the pods
//! this scheduler has decided on but whose binding the watch has not shown yet
//! ("assumed" pods, as kube-scheduler's cache has them). Without the assumed pods two
//! decisions made a millisecond apart would both see an empty node and overcommit it.
//!
//! Aggregates (requested resources, host ports, per-controller pod counts) are kept up to
//! date on every change, so a scheduling decision costs O(nodes), not O(pods).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Taint};

use super::pod_info::{ANY_IP, HostPort, PodInfo, Resources};
use super::quantity::{milli_or_zero, units_or_zero};

/// What a Node object says about scheduling onto it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NodeState {
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    pub unschedulable: bool,
    /// Ready condition is True.
    pub ready: bool,
    /// status.allocatable, falling back to status.capacity per resource. A node that
    /// states no pod limit at all is not limited by pod count.
    pub allocatable: Resources,
}

impl NodeState {
    pub fn from_node(node: &Node) -> NodeState {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let spec = node.spec.clone().unwrap_or_default();
        let status = node.status.clone().unwrap_or_default();
        let lookup = |res: &str| {
            status
                .allocatable
                .as_ref()
                .and_then(|m| m.get(res))
                .or_else(|| status.capacity.as_ref().and_then(|m| m.get(res)))
                .map(|q| q.0.clone())
        };
        let what = format!("node {name}");
        NodeState {
            labels: node.metadata.labels.clone().unwrap_or_default(),
            taints: spec.taints.unwrap_or_default(),
            unschedulable: spec.unschedulable == Some(true),
            ready: status
                .conditions
                .as_deref()
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            allocatable: Resources {
                milli_cpu: lookup("cpu").map_or(0, |q| milli_or_zero(&q, &what)),
                memory: lookup("memory").map_or(0, |q| units_or_zero(&q, &what)),
                pods: lookup("pods").map_or(i64::MAX, |q| units_or_zero(&q, &what)),
            },
        }
    }
}

/// One node and the sums over the pods placed on it.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    pub name: String,
    /// `None` while pods name a node the watch has not shown (or has deleted).
    pub node: Option<NodeState>,
    /// Sum of the pods' requests (pods = number of pods).
    pub requested: Resources,
    /// Sum with the scoring defaults for containers that request nothing.
    pub non_zero_requested: Resources,
    /// Host ports in use, by exact (ip, protocol, port) and by (protocol, port) so that
    /// 0.0.0.0 conflicts can be checked without scanning.
    ports_exact: HashMap<HostPort, u32>,
    ports_any_ip: HashMap<(String, i32), u32>,
    /// Pods per controller uid, for spreading siblings.
    controller_counts: HashMap<String, u32>,
}

impl NodeInfo {
    fn new(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            ..Default::default()
        }
    }

    /// Pods on this node controlled by `uid`.
    pub fn siblings(&self, uid: &str) -> u32 {
        self.controller_counts.get(uid).copied().unwrap_or(0)
    }

    /// Whether `want` collides with a host port in use: same port and protocol, and the
    /// same IP or either side being 0.0.0.0.
    pub fn port_in_use(&self, want: &HostPort) -> bool {
        if want.ip == ANY_IP {
            return self
                .ports_any_ip
                .contains_key(&(want.protocol.clone(), want.port));
        }
        self.ports_exact.contains_key(want)
            || self.ports_exact.contains_key(&HostPort {
                ip: ANY_IP.to_string(),
                protocol: want.protocol.clone(),
                port: want.port,
            })
    }

    fn account(&mut self, pod: &PodInfo, add: bool) {
        if add {
            self.requested.add(&pod.requests);
            self.non_zero_requested.add(&pod.non_zero_requests);
        } else {
            self.requested.sub(&pod.requests);
            self.non_zero_requested.sub(&pod.non_zero_requests);
        }
        for hp in &pod.host_ports {
            adjust(&mut self.ports_exact, hp.clone(), add);
            adjust(&mut self.ports_any_ip, (hp.protocol.clone(), hp.port), add);
        }
        if let Some(uid) = &pod.controller_uid {
            adjust(&mut self.controller_counts, uid.clone(), add);
        }
    }

    fn is_empty(&self) -> bool {
        self.requested.pods <= 0
    }
}

fn adjust<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, u32>, key: K, add: bool) {
    if add {
        *counts.entry(key).or_insert(0) += 1;
    } else if let Some(n) = counts.get_mut(&key) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            counts.remove(&key);
        }
    }
}

/// A pod the cache counts on a node.
#[derive(Debug, Clone)]
pub struct CachedPod {
    pub node: String,
    pub info: Arc<PodInfo>,
    /// Set while the placement is only our decision, not yet seen bound in the watch.
    pub assumed: Option<Assumption>,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Assumption {
    /// When the binding call returned; the assumption expires if the watch has still not
    /// confirmed it a while later (a lost event must not hold resources forever).
    pub binding_finished: Option<Instant>,
}

/// What adding a bound pod changed, for deciding which waiting pods to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodChange {
    /// Nothing that matters to other pods' placement.
    None,
    /// A pod newly appeared on a node (may satisfy pod affinity).
    Added,
    /// Labels or placement changed (may satisfy affinity or free anti-affinity).
    Changed,
}

#[derive(Debug, Default)]
pub struct Cache {
    nodes: HashMap<String, NodeInfo>,
    pods: HashMap<String, CachedPod>,
    /// Pods with required anti-affinity terms: every decision must honour them.
    anti_affinity_pods: HashSet<String>,
}

impl Cache {
    /// Records a Node; true when something scheduling depends on changed.
    pub fn update_node(&mut self, node: &Node) -> bool {
        let Some(name) = node.metadata.name.as_deref() else {
            return false;
        };
        let state = NodeState::from_node(node);
        let info = self
            .nodes
            .entry(name.to_string())
            .or_insert_with(|| NodeInfo::new(name));
        if info.node.as_ref() == Some(&state) {
            return false;
        }
        info.node = Some(state);
        true
    }

    pub fn remove_node(&mut self, name: &str) {
        if let Some(info) = self.nodes.get_mut(name) {
            info.node = None;
            if info.is_empty() {
                self.nodes.remove(name);
            }
        }
    }

    /// Nodes that exist (have a Node object).
    pub fn nodes(&self) -> impl Iterator<Item = (&NodeInfo, &NodeState)> {
        self.nodes
            .values()
            .filter_map(|n| n.node.as_ref().map(|s| (n, s)))
    }

    pub fn node(&self, name: &str) -> Option<&NodeInfo> {
        self.nodes.get(name)
    }

    pub fn node_names(&self) -> impl Iterator<Item = &String> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.node.is_some())
            .map(|(k, _)| k)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.values().filter(|n| n.node.is_some()).count()
    }

    /// Every pod the cache counts, bound or assumed.
    pub fn pods(&self) -> impl Iterator<Item = &CachedPod> {
        self.pods.values()
    }

    pub fn pod(&self, key: &str) -> Option<&CachedPod> {
        self.pods.get(key)
    }

    pub fn pod_keys(&self) -> impl Iterator<Item = &String> {
        self.pods.keys()
    }

    /// Pods that carry required anti-affinity terms.
    pub fn anti_affinity_pods(&self) -> impl Iterator<Item = &CachedPod> {
        self.anti_affinity_pods
            .iter()
            .filter_map(|k| self.pods.get(k))
    }

    pub fn is_assumed(&self, key: &str) -> bool {
        self.pods.get(key).is_some_and(|p| p.assumed.is_some())
    }

    /// A pod the watch shows bound to `node` (replacing any assumption about it).
    pub fn add_bound_pod(&mut self, info: Arc<PodInfo>, node: &str) -> PodChange {
        let change = match self.pods.get(&info.key) {
            None => PodChange::Added,
            Some(old) if old.node != node || old.info.labels != info.labels => PodChange::Changed,
            Some(old) if old.assumed.is_some() => PodChange::Added,
            Some(_) => PodChange::None,
        };
        self.insert(CachedPod {
            node: node.to_string(),
            info,
            assumed: None,
        });
        change
    }

    /// Counts a pod on `node` on the strength of our own decision, before binding.
    pub fn assume(&mut self, info: Arc<PodInfo>, node: &str) {
        self.insert(CachedPod {
            node: node.to_string(),
            info,
            assumed: Some(Assumption::default()),
        });
    }

    /// The binding call returned successfully; the watch will confirm it.
    pub fn finish_binding(&mut self, key: &str, now: Instant) {
        if let Some(a) = self.pods.get_mut(key).and_then(|p| p.assumed.as_mut()) {
            a.binding_finished = Some(now);
        }
    }

    /// Drops an assumption (binding failed). A pod the watch already shows bound stays.
    pub fn forget(&mut self, key: &str) -> bool {
        if self.is_assumed(key) {
            self.remove_pod(key);
            return true;
        }
        false
    }

    /// Drops assumptions whose binding finished more than `ttl` ago without the watch
    /// confirming them. Returns how many were dropped.
    pub fn expire_assumed(&mut self, now: Instant, ttl: Duration) -> usize {
        let expired: Vec<String> = self
            .pods
            .values()
            .filter(|p| {
                p.assumed
                    .and_then(|a| a.binding_finished)
                    .is_some_and(|t| now.saturating_duration_since(t) > ttl)
            })
            .map(|p| p.info.key.clone())
            .collect();
        for key in &expired {
            tracing::warn!("assumed pod {key} was never seen bound; forgetting it");
            self.remove_pod(key);
        }
        expired.len()
    }

    /// Removes a pod (deleted, finished, or assumption dropped); true if it was counted.
    pub fn remove_pod(&mut self, key: &str) -> bool {
        let Some(old) = self.pods.remove(key) else {
            return false;
        };
        self.anti_affinity_pods.remove(key);
        if let Some(node) = self.nodes.get_mut(&old.node) {
            node.account(&old.info, false);
            if node.node.is_none() && node.is_empty() {
                self.nodes.remove(&old.node);
            }
        }
        true
    }

    fn insert(&mut self, pod: CachedPod) {
        self.remove_pod(&pod.info.key);
        let node = self
            .nodes
            .entry(pod.node.clone())
            .or_insert_with(|| NodeInfo::new(&pod.node));
        node.account(&pod.info, true);
        if !pod.info.pod_anti_affinity.is_empty() {
            self.anti_affinity_pods.insert(pod.info.key.clone());
        }
        self.pods.insert(pod.info.key.clone(), pod);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use crate::scheduler::pod_info::tests::quantities;

    pub fn node(name: &str, cpu: &str, memory: &str, pods: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some([("kubernetes.io/hostname".to_string(), name.to_string())].into()),
                ..Default::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(quantities(&[
                    ("cpu", cpu),
                    ("memory", memory),
                    ("pods", pods),
                ])),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    pub fn pod_info(key: &str, milli_cpu: i64, memory: i64) -> PodInfo {
        let (ns, name) = key.split_once('/').unwrap_or(("default", key));
        PodInfo {
            key: key.into(),
            namespace: ns.into(),
            name: name.into(),
            requests: Resources {
                milli_cpu,
                memory,
                pods: 1,
            },
            non_zero_requests: Resources {
                milli_cpu,
                memory,
                pods: 1,
            },
            ..Default::default()
        }
    }

    #[test]
    fn node_state_falls_back_to_capacity_and_reads_ready() {
        let mut n = node("a", "2", "4Gi", "110");
        if let Some(s) = n.status.as_mut() {
            s.capacity = s.allocatable.take();
            s.conditions = None;
        }
        let st = NodeState::from_node(&n);
        assert_eq!(st.allocatable.milli_cpu, 2000);
        assert_eq!(st.allocatable.memory, 4 << 30);
        assert_eq!(st.allocatable.pods, 110);
        assert!(!st.ready);
    }

    #[test]
    fn assumed_pods_count_until_forgotten_or_confirmed() {
        let mut cache = Cache::default();
        assert!(cache.update_node(&node("a", "2", "4Gi", "110")));
        // The same node again changes nothing.
        assert!(!cache.update_node(&node("a", "2", "4Gi", "110")));

        let mut p1 = pod_info("ns/p1", 500, 1 << 30);
        p1.controller_uid = Some("rs1".into());
        let p1 = Arc::new(p1);
        cache.assume(p1.clone(), "a");
        let a = cache.node("a").expect("node a");
        assert_eq!(a.requested.milli_cpu, 500);
        assert_eq!(a.requested.pods, 1);
        assert_eq!(a.siblings("rs1"), 1);
        assert!(cache.is_assumed("ns/p1"));

        // Bind failed: the node is free again.
        assert!(cache.forget("ns/p1"));
        let a = cache.node("a").expect("node a");
        assert_eq!(a.requested, Resources::default());
        assert_eq!(a.siblings("rs1"), 0);

        // Assume, then the watch confirms: counted once, no longer assumed, and a later
        // forget (say a late 409) does not remove the confirmed pod.
        cache.assume(p1.clone(), "a");
        cache.finish_binding("ns/p1", Instant::now());
        assert_eq!(cache.add_bound_pod(p1.clone(), "a"), PodChange::Added);
        assert!(!cache.is_assumed("ns/p1"));
        assert!(!cache.forget("ns/p1"));
        assert_eq!(cache.node("a").expect("node a").requested.milli_cpu, 500);
        assert_eq!(cache.add_bound_pod(p1.clone(), "a"), PodChange::None);

        assert!(cache.remove_pod("ns/p1"));
        assert_eq!(cache.node("a").expect("node a").requested.pods, 0);
    }

    #[test]
    fn unconfirmed_assumptions_expire() {
        let mut cache = Cache::default();
        cache.update_node(&node("a", "2", "4Gi", "110"));
        cache.assume(Arc::new(pod_info("ns/p", 100, 0)), "a");
        let t0 = Instant::now();
        // Still binding: never expires.
        assert_eq!(
            cache.expire_assumed(t0 + Duration::from_secs(3600), Duration::from_secs(30)),
            0
        );
        cache.finish_binding("ns/p", t0);
        assert_eq!(
            cache.expire_assumed(t0 + Duration::from_secs(10), Duration::from_secs(30)),
            0
        );
        assert_eq!(
            cache.expire_assumed(t0 + Duration::from_secs(31), Duration::from_secs(30)),
            1
        );
        assert_eq!(cache.node("a").expect("node a").requested.milli_cpu, 0);
    }

    #[test]
    fn pods_on_unknown_nodes_are_kept_but_not_schedulable() {
        let mut cache = Cache::default();
        cache.add_bound_pod(Arc::new(pod_info("ns/p", 100, 0)), "ghost");
        assert_eq!(cache.node_count(), 0);
        cache.update_node(&node("ghost", "1", "1Gi", "10"));
        assert_eq!(cache.node_count(), 1);
        assert_eq!(cache.node("ghost").expect("node").requested.milli_cpu, 100);
        cache.remove_node("ghost");
        assert_eq!(cache.node_count(), 0);
        cache.remove_pod("ns/p");
        assert!(cache.node("ghost").is_none());
    }

    #[test]
    fn host_ports_conflict_with_wildcard() {
        let mut cache = Cache::default();
        let mut p = pod_info("ns/p", 0, 0);
        p.host_ports = vec![HostPort {
            ip: "10.0.0.1".into(),
            protocol: "TCP".into(),
            port: 80,
        }];
        cache.add_bound_pod(Arc::new(p), "a");
        let a = cache.node("a").expect("node a");
        let port = |ip: &str, proto: &str, port: i32| HostPort {
            ip: ip.into(),
            protocol: proto.into(),
            port,
        };
        assert!(a.port_in_use(&port("10.0.0.1", "TCP", 80)));
        assert!(a.port_in_use(&port(ANY_IP, "TCP", 80)));
        assert!(!a.port_in_use(&port("10.0.0.2", "TCP", 80)));
        assert!(!a.port_in_use(&port(ANY_IP, "UDP", 80)));
        assert!(!a.port_in_use(&port(ANY_IP, "TCP", 81)));
    }
}
