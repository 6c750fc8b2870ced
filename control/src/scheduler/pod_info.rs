//! What the scheduler needs to know about a pod, extracted once from the API object:
//! resource requests, host ports, the controller it belongs to and its placement
//! constraints. Filters, scores and the cache work on this plain struct, never on the
//! raw `Pod`, so they are cheap to call per node and easy to test.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, NodeSelectorTerm, Pod, PodAffinityTerm, ResourceRequirements, Toleration,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::quantity::{milli_or_zero, units_or_zero};
use crate::objects::controller_ref;

/// Requests used when a container sets none, for scoring only (kube-scheduler's
/// `DefaultMilliCPURequest` / `DefaultMemoryRequest`), so best-effort pods still spread.
pub const DEFAULT_MILLI_CPU_REQUEST: i64 = 100;
pub const DEFAULT_MEMORY_REQUEST: i64 = 200 * 1024 * 1024;

/// Amounts of the resources the scheduler accounts for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub pods: i64,
}

impl Resources {
    pub fn add(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_add(other.milli_cpu);
        self.memory = self.memory.saturating_add(other.memory);
        self.pods = self.pods.saturating_add(other.pods);
    }

    pub fn sub(&mut self, other: &Resources) {
        self.milli_cpu = self.milli_cpu.saturating_sub(other.milli_cpu);
        self.memory = self.memory.saturating_sub(other.memory);
        self.pods = self.pods.saturating_sub(other.pods);
    }

    fn max(&self, other: &Resources) -> Resources {
        Resources {
            milli_cpu: self.milli_cpu.max(other.milli_cpu),
            memory: self.memory.max(other.memory),
            pods: self.pods.max(other.pods),
        }
    }
}

/// A host port a pod claims on its node. An empty hostIP is "0.0.0.0" (every address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub ip: String,
    pub protocol: String,
    pub port: i32,
}

pub const ANY_IP: &str = "0.0.0.0";

/// Which namespaces a pod (anti-)affinity term looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TermNamespaces {
    /// `namespaceSelector: {}`.
    All,
    /// The listed namespaces, or the pod's own when none are listed.
    Listed(Vec<String>),
}

/// A required pod (anti-)affinity term.
#[derive(Debug, Clone, PartialEq)]
pub struct AffinityTerm {
    pub selector: Option<LabelSelector>,
    pub namespaces: TermNamespaces,
    pub topology_key: String,
}

impl AffinityTerm {
    fn from_api(term: &PodAffinityTerm, own_namespace: &str) -> AffinityTerm {
        let listed = term.namespaces.clone().unwrap_or_default();
        let namespaces = match &term.namespace_selector {
            Some(sel) if is_empty_selector(sel) => TermNamespaces::All,
            // A non-empty namespaceSelector needs Namespace labels, which the scheduler
            // does not watch: only the listed namespaces count then.
            Some(_) => TermNamespaces::Listed(listed),
            None if listed.is_empty() => TermNamespaces::Listed(vec![own_namespace.to_string()]),
            None => TermNamespaces::Listed(listed),
        };
        AffinityTerm {
            selector: term.label_selector.clone(),
            namespaces,
            topology_key: term.topology_key.clone(),
        }
    }

    /// Whether a pod in `namespace` with `labels` is one this term is about.
    pub fn matches(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        let in_scope = match &self.namespaces {
            TermNamespaces::All => true,
            TermNamespaces::Listed(list) => list.iter().any(|n| n == namespace),
        };
        in_scope && term_selector_matches(self.selector.as_ref(), labels)
    }
}

fn is_empty_selector(sel: &LabelSelector) -> bool {
    sel.match_labels.as_ref().is_none_or(BTreeMap::is_empty)
        && sel.match_expressions.as_ref().is_none_or(Vec::is_empty)
}

/// Label selector semantics of affinity terms: a missing selector matches nothing, an
/// empty one matches everything (unlike a workload selector, see `objects`).
pub fn term_selector_matches(
    sel: Option<&LabelSelector>,
    labels: &BTreeMap<String, String>,
) -> bool {
    let Some(sel) = sel else { return false };
    if let Some(ml) = &sel.match_labels
        && !ml.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    sel.match_expressions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .all(|r| {
            let values = r.values.as_deref().unwrap_or_default();
            match r.operator.as_str() {
                "In" => labels.get(&r.key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(&r.key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(&r.key),
                "DoesNotExist" => !labels.contains_key(&r.key),
                _ => false,
            }
        })
}

/// The scheduling-relevant view of a pod.
#[derive(Debug, Clone, Default)]
pub struct PodInfo {
    /// "namespace/name".
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// What the pod reserves on a node (pods is always 1).
    pub requests: Resources,
    /// Requests with the scoring defaults filled in for containers that set none.
    pub non_zero_requests: Resources,
    pub host_ports: Vec<HostPort>,
    /// uid of the controlling owner (ReplicaSet, StatefulSet, ...), for spreading.
    pub controller_uid: Option<String>,
    pub priority: i32,
    pub tolerations: Vec<Toleration>,
    pub node_selector: BTreeMap<String, String>,
    /// `requiredDuringScheduling` node selector terms; `None` when absent. Present but
    /// empty matches no node, as in Kubernetes.
    pub required_node_affinity: Option<Vec<NodeSelectorTerm>>,
    pub preferred_node_affinity: Vec<(i32, NodeSelectorTerm)>,
    pub pod_affinity: Vec<AffinityTerm>,
    pub pod_anti_affinity: Vec<AffinityTerm>,
}

impl PodInfo {
    pub fn from_pod(pod: &Pod) -> PodInfo {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let key = format!("{namespace}/{name}");
        let spec = pod.spec.clone().unwrap_or_default();
        let (requests, non_zero_requests) = pod_requests(&spec, &key);

        let host_network = spec.host_network == Some(true);
        let sidecars = spec
            .init_containers
            .as_deref()
            .unwrap_or_default()
            .iter()
            .filter(|c| is_sidecar(c));
        let host_ports = spec
            .containers
            .iter()
            .chain(sidecars)
            .flat_map(|c| c.ports.as_deref().unwrap_or_default())
            .filter_map(|p| {
                // With hostNetwork the container port is the host port (apiserver defaulting).
                let port = match p.host_port {
                    Some(hp) if hp > 0 => hp,
                    _ if host_network && p.container_port > 0 => p.container_port,
                    _ => return None,
                };
                Some(HostPort {
                    ip: p
                        .host_ip
                        .clone()
                        .filter(|ip| !ip.is_empty())
                        .unwrap_or_else(|| ANY_IP.to_string()),
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".to_string()),
                    port,
                })
            })
            .collect();

        let affinity = spec.affinity.clone().unwrap_or_default();
        let node_affinity = affinity.node_affinity.unwrap_or_default();
        let terms = |t: Option<Vec<PodAffinityTerm>>| -> Vec<AffinityTerm> {
            t.unwrap_or_default()
                .iter()
                .map(|t| AffinityTerm::from_api(t, &namespace))
                .collect()
        };
        let pod_affinity = terms(
            affinity
                .pod_affinity
                .and_then(|a| a.required_during_scheduling_ignored_during_execution),
        );
        let pod_anti_affinity = terms(
            affinity
                .pod_anti_affinity
                .and_then(|a| a.required_during_scheduling_ignored_during_execution),
        );

        PodInfo {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            requests,
            non_zero_requests,
            host_ports,
            controller_uid: controller_ref(&pod.metadata).map(|o| o.uid.clone()),
            priority: spec.priority.unwrap_or(0),
            tolerations: spec.tolerations.unwrap_or_default(),
            node_selector: spec.node_selector.unwrap_or_default(),
            required_node_affinity: node_affinity
                .required_during_scheduling_ignored_during_execution
                .map(|s| s.node_selector_terms),
            preferred_node_affinity: node_affinity
                .preferred_during_scheduling_ignored_during_execution
                .unwrap_or_default()
                .into_iter()
                .map(|t| (t.weight, t.preference))
                .collect(),
            pod_affinity,
            pod_anti_affinity,
            key,
            namespace,
            name,
        }
    }
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// Effective requests as kube-scheduler computes them: the sum over containers (plus
/// sidecar init containers, which keep running), or the largest init container step if
/// that is bigger, plus the pod overhead. The second value fills the scoring defaults
/// into containers that request nothing.
fn pod_requests(spec: &k8s_openapi::api::core::v1::PodSpec, key: &str) -> (Resources, Resources) {
    let mut sum = Resources::default();
    let mut sum_nz = Resources::default();
    for c in &spec.containers {
        let (r, nz) = container_requests(c.resources.as_ref(), key);
        sum.add(&r);
        sum_nz.add(&nz);
    }
    let mut sidecars = Resources::default();
    let mut sidecars_nz = Resources::default();
    let mut init_peak = Resources::default();
    let mut init_peak_nz = Resources::default();
    for c in spec.init_containers.as_deref().unwrap_or_default() {
        let (r, nz) = container_requests(c.resources.as_ref(), key);
        if is_sidecar(c) {
            sidecars.add(&r);
            sidecars_nz.add(&nz);
        }
        // While this init container runs, the sidecars started before it run too.
        let mut step = sidecars;
        let mut step_nz = sidecars_nz;
        if !is_sidecar(c) {
            step.add(&r);
            step_nz.add(&nz);
        }
        init_peak = init_peak.max(&step);
        init_peak_nz = init_peak_nz.max(&step_nz);
    }
    sum.add(&sidecars);
    sum_nz.add(&sidecars_nz);
    let mut total = sum.max(&init_peak);
    let mut total_nz = sum_nz.max(&init_peak_nz);

    // Pod-level resources, when set, replace the container sums for what they name.
    if let Some(pod_level) = spec.resources.as_ref() {
        let (r, _) = container_requests(Some(pod_level), key);
        let named = |res: &str| {
            pod_level
                .requests
                .as_ref()
                .is_some_and(|m| m.contains_key(res))
                || pod_level
                    .limits
                    .as_ref()
                    .is_some_and(|m| m.contains_key(res))
        };
        if named("cpu") {
            total.milli_cpu = r.milli_cpu;
            total_nz.milli_cpu = r.milli_cpu;
        }
        if named("memory") {
            total.memory = r.memory;
            total_nz.memory = r.memory;
        }
    }

    if let Some(overhead) = &spec.overhead {
        let o = Resources {
            milli_cpu: quantity_milli(overhead.get("cpu"), key),
            memory: quantity_units(overhead.get("memory"), key),
            pods: 0,
        };
        total.add(&o);
        total_nz.add(&o);
    }
    total.pods = 1;
    total_nz.pods = 1;
    (total, total_nz)
}

/// A container's requests; a limit without a request counts as the request (what the
/// apiserver's defaulting does).
fn container_requests(res: Option<&ResourceRequirements>, key: &str) -> (Resources, Resources) {
    let get = |name: &str| -> Option<&Quantity> {
        let res = res?;
        res.requests
            .as_ref()
            .and_then(|m| m.get(name))
            .or_else(|| res.limits.as_ref().and_then(|m| m.get(name)))
    };
    let cpu = get("cpu");
    let memory = get("memory");
    let r = Resources {
        milli_cpu: quantity_milli(cpu, key),
        memory: quantity_units(memory, key),
        pods: 0,
    };
    let nz = Resources {
        milli_cpu: if cpu.is_some() {
            r.milli_cpu
        } else {
            DEFAULT_MILLI_CPU_REQUEST
        },
        memory: if memory.is_some() {
            r.memory
        } else {
            DEFAULT_MEMORY_REQUEST
        },
        pods: 0,
    };
    (r, nz)
}

fn quantity_milli(q: Option<&Quantity>, key: &str) -> i64 {
    q.map_or(0, |q| milli_or_zero(&q.0, key).max(0))
}

fn quantity_units(q: Option<&Quantity>, key: &str) -> i64 {
    q.map_or(0, |q| units_or_zero(&q.0, key).max(0))
}

/// True for a pod this scheduler should place: not bound, not terminating or finished,
/// not gated, and naming this scheduler.
pub fn wants_scheduling(pod: &Pod, scheduler_name: &str) -> bool {
    let Some(spec) = pod.spec.as_ref() else {
        return false;
    };
    spec.node_name.as_deref().unwrap_or_default().is_empty()
        && spec
            .scheduler_name
            .as_deref()
            .unwrap_or("default-scheduler")
            == scheduler_name
        && spec.scheduling_gates.as_ref().is_none_or(Vec::is_empty)
        && crate::objects::is_active(pod)
}

/// The node a pod is bound to, if any.
pub fn bound_node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()?
        .node_name
        .as_deref()
        .filter(|n| !n.is_empty())
}

/// Succeeded or Failed: such a pod no longer holds resources on its node.
pub fn is_terminated(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerPort, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn quantities(kv: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect()
    }

    pub fn container(requests: &[(&str, &str)]) -> Container {
        Container {
            name: "c".into(),
            resources: Some(ResourceRequirements {
                requests: Some(quantities(requests)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn pod_with(spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    #[test]
    fn requests_sum_containers_and_take_init_peak() {
        let pod = pod_with(PodSpec {
            containers: vec![
                container(&[("cpu", "100m"), ("memory", "100Mi")]),
                container(&[("cpu", "200m")]),
            ],
            init_containers: Some(vec![container(&[("cpu", "1"), ("memory", "10Mi")])]),
            overhead: Some(quantities(&[("cpu", "10m")])),
            ..Default::default()
        });
        let info = PodInfo::from_pod(&pod);
        assert_eq!(info.key, "ns/p");
        assert_eq!(
            info.requests,
            Resources {
                milli_cpu: 1010,
                memory: 100 << 20,
                pods: 1
            }
        );
        // The second container sets no memory: the scoring default fills it in.
        assert_eq!(
            info.non_zero_requests.memory,
            (100 << 20) + DEFAULT_MEMORY_REQUEST
        );
    }

    #[test]
    fn limits_stand_in_for_requests_and_bad_quantities_are_zero() {
        let mut c = container(&[("memory", "lots")]);
        if let Some(r) = c.resources.as_mut() {
            r.limits = Some(quantities(&[("cpu", "500m")]));
        }
        let info = PodInfo::from_pod(&pod_with(PodSpec {
            containers: vec![c],
            ..Default::default()
        }));
        assert_eq!(info.requests.milli_cpu, 500);
        assert_eq!(info.requests.memory, 0);
        let empty = PodInfo::from_pod(&pod_with(PodSpec::default()));
        assert_eq!(
            empty.requests,
            Resources {
                milli_cpu: 0,
                memory: 0,
                pods: 1
            }
        );
    }

    #[test]
    fn host_ports_default_ip_and_protocol() {
        let mut c = container(&[]);
        c.ports = Some(vec![
            ContainerPort {
                container_port: 80,
                host_port: Some(8080),
                ..Default::default()
            },
            ContainerPort {
                container_port: 53,
                ..Default::default()
            },
        ]);
        let info = PodInfo::from_pod(&pod_with(PodSpec {
            containers: vec![c.clone()],
            ..Default::default()
        }));
        assert_eq!(
            info.host_ports,
            vec![HostPort {
                ip: ANY_IP.into(),
                protocol: "TCP".into(),
                port: 8080
            }]
        );
        let host_net = PodInfo::from_pod(&pod_with(PodSpec {
            containers: vec![c],
            host_network: Some(true),
            ..Default::default()
        }));
        assert_eq!(host_net.host_ports.len(), 2);
    }

    #[test]
    fn empty_term_selector_matches_all_missing_matches_none() {
        let labels: BTreeMap<String, String> = [("a".to_string(), "b".to_string())].into();
        assert!(term_selector_matches(
            Some(&LabelSelector::default()),
            &labels
        ));
        assert!(!term_selector_matches(None, &labels));
    }
}
