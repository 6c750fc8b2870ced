//! Hollow nodes, as kubemark has them: Node objects with a kubelet's API behaviour and no
//! containers. Each hollow node registers itself, renews its Lease in kube-node-lease,
//! reports pods bound to it Running and Ready (with a pod IP from 10.250.<node>.0/24), and
//! confirms the deletion of its terminating pods, all through the apiserver. Tests and
//! `cargo xtask bench scheduler` use them to drive the scheduler and controllers
//! without containerd; the real kubelet is skiff-agent.
//!
//! A node can be "killed" (`stop`): it stops renewing and stops acting on its pods, as a
//! crashed kubelet would, so the node lifecycle controller's handling can be observed.
//!
//! A pod annotated `skiff.dev/hollow-ready: "false"` is reported Running but not Ready
//! (a failing readiness probe).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStatus, Node, NodeAddress, NodeCondition,
    NodeSpec, NodeStatus, NodeSystemInfo, Pod, PodCondition, PodIP, PodStatus, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::controllers::{is_conflict, is_not_found, now, now_timestamp};
use crate::objects::PodWithoutManagedFields;

pub const READY_ANNOTATION: &str = "skiff.dev/hollow-ready";

/// What the hollow nodes look like.
#[derive(Debug, Clone)]
pub struct HollowConfig {
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    /// How often each node renews its Lease (the kubelet's default is 10 s).
    pub lease_renew_interval: Duration,
    /// Pod status writes in flight at once across all nodes.
    pub parallel_writes: usize,
}

impl Default for HollowConfig {
    fn default() -> Self {
        HollowConfig {
            cpu: "4".into(),
            memory: "8Gi".into(),
            pods: "110".into(),
            lease_renew_interval: Duration::from_secs(2),
            parallel_writes: 32,
        }
    }
}

/// One hollow node's description at registration.
#[derive(Debug, Clone, Default)]
pub struct HollowNode {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Overrides HollowConfig's cpu for this node.
    pub cpu: Option<String>,
}

impl HollowNode {
    pub fn named(name: &str) -> HollowNode {
        HollowNode {
            name: name.into(),
            ..Default::default()
        }
    }

    pub fn label(mut self, k: &str, v: &str) -> HollowNode {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn cpu(mut self, cpu: &str) -> HollowNode {
        self.cpu = Some(cpu.into());
        self
    }

    pub fn taint(mut self, key: &str, value: &str, effect: &str) -> HollowNode {
        self.taints.push(Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            time_added: None,
        });
        self
    }
}

struct Shared {
    client: Client,
    cfg: HollowConfig,
    /// Nodes that are alive (renewing and acting on pods), with their index.
    alive: Mutex<HashMap<String, u32>>,
    /// Pods already reported running, by uid (so each gets one status write).
    reported: Mutex<HashSet<String>>,
    /// Next pod IP host part per node.
    next_ip: Mutex<HashMap<String, u32>>,
    writes: Semaphore,
}

/// A set of hollow nodes; dropping it stops them all (the Node objects stay).
pub struct HollowCluster {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    leases: Mutex<HashMap<String, JoinHandle<()>>>,
    next_index: Mutex<u32>,
}

impl HollowCluster {
    /// Registers `nodes` and starts their kubelet loops.
    pub async fn start(
        client: Client,
        cfg: HollowConfig,
        nodes: Vec<HollowNode>,
    ) -> anyhow::Result<HollowCluster> {
        let shared = Arc::new(Shared {
            writes: Semaphore::new(cfg.parallel_writes.max(1)),
            client: client.clone(),
            cfg,
            alive: Mutex::new(HashMap::new()),
            reported: Mutex::new(HashSet::new()),
            next_ip: Mutex::new(HashMap::new()),
        });
        let cluster = HollowCluster {
            tasks: vec![tokio::spawn(pod_loop(shared.clone()))],
            shared,
            leases: Mutex::new(HashMap::new()),
            next_index: Mutex::new(0),
        };
        for n in nodes {
            cluster.add(n).await?;
        }
        Ok(cluster)
    }

    /// Registers one more node and starts its kubelet loop.
    pub async fn add(&self, n: HollowNode) -> anyhow::Result<()> {
        let index = {
            let mut next = self.next_index.lock().expect("hollow lock");
            *next += 1;
            *next - 1
        };
        let nodes: Api<Node> = Api::all(self.shared.client.clone());
        let mut labels = n.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), n.name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), "amd64".into());
        labels.insert("skiff.dev/hollow".into(), "true".into());
        let resources: BTreeMap<String, Quantity> = [
            ("cpu", n.cpu.as_ref().unwrap_or(&self.shared.cfg.cpu)),
            ("memory", &self.shared.cfg.memory),
            ("pods", &self.shared.cfg.pods),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.clone())))
        .collect();
        let node = Node {
            metadata: ObjectMeta {
                name: Some(n.name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!n.taints.is_empty()).then(|| n.taints.clone()),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                capacity: Some(resources.clone()),
                allocatable: Some(resources),
                conditions: Some(vec![ready_condition()]),
                // TEST-NET-1 addresses: nothing is ever sent to them.
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: hollow_node_ip(index).to_string(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: n.name.clone(),
                    },
                ]),
                node_info: Some(NodeSystemInfo {
                    kubelet_version: "v1.37.0-skiff-hollow".into(),
                    container_runtime_version: "hollow://0".into(),
                    operating_system: "linux".into(),
                    architecture: "amd64".into(),
                    os_image: "hollow".into(),
                    kernel_version: "hollow".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        match nodes.create(&PostParams::default(), &node).await {
            Ok(_) => {}
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(e.into()),
        }
        // Status is a subresource: what create carried may have been dropped.
        nodes
            .patch_status(
                &n.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": node.status})),
            )
            .await?;
        self.shared
            .alive
            .lock()
            .expect("hollow lock")
            .insert(n.name.clone(), index);
        let task = tokio::spawn(lease_loop(self.shared.clone(), n.name.clone()));
        self.leases
            .lock()
            .expect("hollow lock")
            .insert(n.name, task);
        Ok(())
    }

    /// The node "crashes": no more Lease renewals, status heartbeats or pod updates.
    pub fn stop(&self, node: &str) {
        self.shared.alive.lock().expect("hollow lock").remove(node);
        if let Some(t) = self.leases.lock().expect("hollow lock").remove(node) {
            t.abort();
        }
    }

    pub fn node_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .shared
            .alive
            .lock()
            .expect("hollow lock")
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }
}

impl Drop for HollowCluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.leases.lock().expect("hollow lock").values() {
            t.abort();
        }
    }
}

/// 192.0.2.0/24 and on (TEST-NET-1), one per node.
fn hollow_node_ip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 0, 2, 1)) + index)
}

fn ready_condition() -> NodeCondition {
    NodeCondition {
        type_: "Ready".into(),
        status: "True".into(),
        reason: Some("KubeletReady".into()),
        message: Some("kubelet is posting ready status".into()),
        last_heartbeat_time: Some(now()),
        last_transition_time: Some(now()),
    }
}

/// Renews the node's Lease every interval, and (like the kubelet) posts Ready=True
/// again if something else changed it while the node is alive.
async fn lease_loop(shared: Arc<Shared>, node: String) {
    let leases: Api<Lease> = Api::namespaced(shared.client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(shared.client.clone());
    loop {
        let renew = MicroTime(now_timestamp());
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(node.clone()),
                namespace: Some("kube-node-lease".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.clone()),
                lease_duration_seconds: Some(40),
                renew_time: Some(renew),
                ..Default::default()
            }),
        };
        let r = leases
            .patch(
                &node,
                &PatchParams::apply("hollow-kubelet").force(),
                &Patch::Apply(&lease),
            )
            .await;
        if let Err(e) = r {
            tracing::debug!("hollow {node}: lease renewal: {e}");
        }
        if let Ok(n) = nodes.get(&node).await {
            let ready = n
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                .is_some_and(|c| c.status == "True");
            if !ready {
                let _ = nodes
                    .patch_status(
                        &node,
                        &PatchParams::default(),
                        &Patch::Strategic(json!({"status": {"conditions": [ready_condition()]}})),
                    )
                    .await;
            }
        }
        tokio::time::sleep(shared.cfg.lease_renew_interval).await;
    }
}

/// One watch over all pods serves every hollow node.
async fn pod_loop(shared: Arc<Shared>) {
    // Without managedFields: the fixture shares the machine with the control plane it
    // measures, so it decodes no more than it reads.
    let pods: Api<PodWithoutManagedFields> = Api::all(shared.client.clone());
    let mut events =
        crate::objects::without_managed_fields(watcher(pods, watcher::Config::default())).boxed();
    while let Some(ev) = events.next().await {
        let objs = match ev {
            Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
            Ok(_) => continue,
            Err(e) => {
                tracing::debug!("hollow pod watch: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        for pod in objs {
            let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                continue;
            };
            let Some(index) = shared
                .alive
                .lock()
                .expect("hollow lock")
                .get(&node)
                .copied()
            else {
                continue;
            };
            let uid = pod.uid().unwrap_or_default();
            if pod.metadata.deletion_timestamp.is_some() {
                let s = shared.clone();
                tokio::spawn(async move { confirm_deletion(&s, &pod).await });
                continue;
            }
            let want_ready =
                pod.annotations().get(READY_ANNOTATION).map(String::as_str) != Some("false");
            let is_running = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Running");
            let is_ready = crate::objects::is_ready(&pod);
            if is_running && is_ready == want_ready {
                continue;
            }
            // A first report already in flight: the watch will show its result.
            if !shared.reported.lock().expect("hollow lock").insert(uid) && !is_running {
                continue;
            }
            let s = shared.clone();
            tokio::spawn(async move { report_running(&s, &pod, &node, index, want_ready).await });
        }
    }
}

/// The kubelet's final step of a graceful delete: containers are gone, remove the pod.
async fn confirm_deletion(shared: &Shared, pod: &Pod) {
    let _permit = shared.writes.acquire().await;
    let api: Api<Pod> =
        Api::namespaced(shared.client.clone(), &pod.namespace().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&pod.name_any(), &dp).await {
        Ok(_) => {}
        Err(e) if is_not_found(&e) || is_conflict(&e) => {}
        Err(e) => tracing::debug!("hollow: deleting {}: {e}", pod.name_any()),
    }
}

fn pod_ip(shared: &Shared, pod: &Pod, node: &str, index: u32) -> String {
    if let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) {
        return ip;
    }
    let mut next = shared.next_ip.lock().expect("hollow lock");
    let n = next.entry(node.to_string()).or_insert(2);
    let host = *n;
    *n += 1;
    // 10.250.<node>.<n> stays clear of the real pod network (10.244.0.0/16); the
    // fixture never sends traffic to these addresses.
    let base = u32::from(Ipv4Addr::new(10, 250, 0, 0)) + (index << 8);
    Ipv4Addr::from(base + (host % 254).max(2)).to_string()
}

async fn report_running(shared: &Shared, pod: &Pod, node: &str, index: u32, ready: bool) {
    let _permit = shared.writes.acquire().await;
    let ip = pod_ip(shared, pod, node, index);
    let t = now();
    let cond = |type_: &str, ok: bool| PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        last_transition_time: Some(t.clone()),
        ..Default::default()
    };
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.clone())
        .unwrap_or_default();
    let status = PodStatus {
        phase: Some("Running".into()),
        host_ip: Some(hollow_node_ip(index).to_string()),
        pod_ip: Some(ip.clone()),
        pod_ips: Some(vec![PodIP { ip }]),
        start_time: pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .or(Some(t.clone())),
        conditions: Some(vec![
            cond("PodScheduled", true),
            cond("Initialized", true),
            cond("ContainersReady", ready),
            cond("Ready", ready),
        ]),
        container_statuses: Some(
            containers
                .iter()
                .map(|c| ContainerStatus {
                    name: c.name.clone(),
                    image: c.image.clone().unwrap_or_default(),
                    image_id: String::new(),
                    ready,
                    started: Some(true),
                    restart_count: 0,
                    state: Some(ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: Some(t.clone()),
                        }),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect(),
        ),
        ..Default::default()
    };
    // The reply is decoded without managedFields (nothing here reads it).
    let api: Api<PodWithoutManagedFields> =
        Api::namespaced(shared.client.clone(), &pod.namespace().unwrap_or_default());
    let r = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await;
    if let Err(e) = r
        && !is_not_found(&e)
    {
        tracing::debug!("hollow: reporting {} running: {e}", pod.name_any());
        shared
            .reported
            .lock()
            .expect("hollow lock")
            .remove(&pod.uid().unwrap_or_default());
    }
}
