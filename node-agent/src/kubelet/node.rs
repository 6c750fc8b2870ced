//! The Node side of the kubelet:
//! - registration: the Node object (labels, capacity/allocatable from this machine,
//!   addresses, nodeInfo, conditions) through create + status patch;
//! - heartbeat: the Lease `kube-node-lease/<node>` renewed every interval (what the node
//!   lifecycle controller watches);
//! - health: containerd is asked for its version every few seconds; Ready is True
//!   (KubeletReady) while it answers, False (KubeletNotReady, "container runtime is
//!   down ...") while it does not; the Node status is written when that changes, when the
//!   API shows another Ready status (e.g. Unknown from the lifecycle controller after an
//!   agent restart) and at least every minute;
//! - the node's podCIDR (from the IPAM controller), published to the pod workers.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc, time::Duration};

use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::{
            DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeStatus,
            NodeSystemInfo,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{MicroTime, ObjectMeta, Time},
    },
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;

use super::agent::{Kubelet, now, now_ts};
use crate::cni::network::Ipv4Net;

/// kubelet version reported in nodeInfo.
pub const KUBELET_VERSION: &str = "v1.37.0-skiff";

/// Memory of this machine in bytes (/proc/meminfo MemTotal).
pub fn mem_total_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn resources() -> BTreeMap<String, Quantity> {
    [
        ("cpu".to_string(), Quantity(cpus().to_string())),
        (
            "memory".to_string(),
            Quantity(format!("{}Ki", mem_total_bytes() / 1024)),
        ),
        ("pods".to_string(), Quantity("110".into())),
        ("ephemeral-storage".to_string(), Quantity("10Gi".into())),
    ]
    .into()
}

fn uname() -> (String, String) {
    let u = nix::sys::utsname::uname().ok();
    let kernel = u
        .as_ref()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let os_image = std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| "Linux".into());
    (kernel, os_image)
}

fn machine_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn arch() -> &'static str {
    super::test_images::oci_arch()
}

/// The health the node reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub ready: bool,
    pub message: String,
}

fn conditions(h: &Health, since: &Time) -> Vec<NodeCondition> {
    let hb = now();
    let ok = |type_: &str, reason: &str, message: &str| NodeCondition {
        type_: type_.into(),
        status: "False".into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(hb.clone()),
        last_transition_time: Some(since.clone()),
    };
    vec![
        ok(
            "MemoryPressure",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        ok(
            "DiskPressure",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
        ),
        ok(
            "PIDPressure",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        NodeCondition {
            type_: "Ready".into(),
            status: if h.ready { "True" } else { "False" }.into(),
            reason: Some(
                if h.ready {
                    "KubeletReady"
                } else {
                    "KubeletNotReady"
                }
                .into(),
            ),
            message: Some(h.message.clone()),
            last_heartbeat_time: Some(hb.clone()),
            last_transition_time: Some(since.clone()),
        },
    ]
}

fn node_status(k: &Kubelet, h: &Health, since: &Time, runtime_version: &str) -> NodeStatus {
    let (kernel, os_image) = uname();
    NodeStatus {
        capacity: Some(resources()),
        allocatable: Some(resources()),
        conditions: Some(conditions(h, since)),
        // Where the apiserver reaches this kubelet's API (logs, exec).
        daemon_endpoints: Some(NodeDaemonEndpoints {
            kubelet_endpoint: Some(DaemonEndpoint {
                port: i32::from(k.cfg.port),
            }),
        }),
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: k.cfg.node_ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: k.cfg.node_name.clone(),
            },
        ]),
        node_info: Some(NodeSystemInfo {
            kubelet_version: KUBELET_VERSION.into(),
            kube_proxy_version: String::new(),
            container_runtime_version: format!("containerd://{runtime_version}"),
            operating_system: "linux".into(),
            architecture: arch().into(),
            os_image,
            kernel_version: kernel,
            machine_id: machine_id(),
            system_uuid: machine_id(),
            boot_id: std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the Node (if missing) and writes its status.
pub async fn register(k: &Kubelet, h: &Health, runtime_version: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(k.client.clone());
    let name = &k.cfg.node_name;
    let labels: BTreeMap<String, String> = [
        ("kubernetes.io/hostname".to_string(), name.clone()),
        ("kubernetes.io/os".to_string(), "linux".to_string()),
        ("kubernetes.io/arch".to_string(), arch().to_string()),
        ("beta.kubernetes.io/os".to_string(), "linux".to_string()),
        ("beta.kubernetes.io/arch".to_string(), arch().to_string()),
    ]
    .into();
    let since = now();
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels.clone()),
            ..Default::default()
        },
        spec: None,
        status: Some(node_status(k, h, &since, runtime_version)),
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Already registered (agent restart): make sure the labels are there.
            nodes
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": labels}})),
                )
                .await?;
        }
        Err(e) => return Err(e.into()),
    }
    write_status(k, h, &since, runtime_version).await
}

async fn write_status(
    k: &Kubelet,
    h: &Health,
    since: &Time,
    runtime_version: &str,
) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(k.client.clone());
    let st = node_status(k, h, since, runtime_version);
    nodes
        .patch_status(
            &k.cfg.node_name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": st })),
        )
        .await?;
    Ok(())
}

/// Asks containerd for its version, bounded.
pub async fn check_runtime(k: &Kubelet) -> Result<String, String> {
    let rt = k.runtime.read().await.clone();
    let Some(rt) = rt else {
        return Err(format!(
            "container runtime is down: containerd is unreachable at {}",
            k.cfg.containerd_address.display()
        ));
    };
    match tokio::time::timeout(Duration::from_secs(3), rt.version()).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!(
            "container runtime is down: containerd is unreachable at {}: {e}",
            k.cfg.containerd_address.display()
        )),
        Err(_) => Err(format!(
            "container runtime is down: containerd is unreachable at {}: no answer within 3s",
            k.cfg.containerd_address.display()
        )),
    }
}

pub fn health_of(r: &Result<String, String>) -> Health {
    match r {
        Ok(_) => Health {
            ready: true,
            message: "kubelet is posting ready status".into(),
        },
        Err(m) => Health {
            ready: false,
            message: m.clone(),
        },
    }
}

/// Renews the Lease every interval.
pub async fn lease_loop(k: Arc<Kubelet>) {
    let leases: Api<Lease> = Api::namespaced(k.client.clone(), "kube-node-lease");
    let node = k.cfg.node_name.clone();
    loop {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(node.clone()),
                namespace: Some("kube-node-lease".into()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(node.clone()),
                lease_duration_seconds: Some(k.cfg.lease_duration_seconds),
                renew_time: Some(MicroTime(now_ts())),
                ..Default::default()
            }),
        };
        if let Err(e) = leases
            .patch(
                &node,
                &PatchParams::apply("skiff-agent").force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            tracing::warn!("renewing lease kube-node-lease/{node}: {e}");
        }
        tokio::time::sleep(k.cfg.lease_renew_interval).await;
    }
}

/// Watches containerd's health, keeps the Node's Ready condition and podCIDR current.
pub async fn status_loop(k: Arc<Kubelet>, mut health: Health, mut runtime_version: String) {
    let nodes: Api<Node> = Api::all(k.client.clone());
    let mut since = now();
    let mut last_write = std::time::Instant::now();
    loop {
        // Poll fast until the podCIDR is known, then every few seconds.
        let have_cidr = k.pod_cidr.borrow().is_some();
        tokio::time::sleep(if have_cidr {
            Duration::from_secs(3)
        } else {
            Duration::from_millis(300)
        })
        .await;
        k.reconnect_runtime_if_needed().await;
        let r = check_runtime(&k).await;
        if let Ok(v) = &r {
            runtime_version = v.clone();
        }
        if r.is_err() {
            // A fresh connection next time: containerd may come back on a new socket inode.
            *k.runtime.write().await = None;
        }
        let h = health_of(&r);
        k.runtime_ok
            .store(h.ready, std::sync::atomic::Ordering::SeqCst);
        let mut write = false;
        if h != health {
            if h.ready {
                tracing::info!("containerd answers again: node Ready");
            } else {
                tracing::warn!("node NotReady: {}", h.message);
            }
            health = h;
            since = now();
            write = true;
        }
        match nodes.get_opt(&k.cfg.node_name).await {
            Ok(Some(n)) => {
                let cidr = n
                    .spec
                    .as_ref()
                    .and_then(|s| s.pod_cidr.as_deref())
                    .and_then(Ipv4Net::parse);
                if cidr.is_some() && *k.pod_cidr.borrow() != cidr {
                    tracing::info!(
                        "podCIDR {}",
                        cidr.map(|c| c.to_string()).unwrap_or_default()
                    );
                    let _ = k.pod_cidr_tx.send(cidr);
                }
                let api_ready = n
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
                    .map(|c| c.status.clone());
                let want = if health.ready { "True" } else { "False" };
                if api_ready.as_deref() != Some(want) {
                    write = true;
                }
            }
            Ok(None) => {
                // Deleted under us: register again.
                if let Err(e) = register(&k, &health, &runtime_version).await {
                    tracing::warn!("re-registering node: {e}");
                }
                last_write = std::time::Instant::now();
            }
            Err(e) => tracing::debug!("reading node: {e}"),
        }
        if write || last_write.elapsed() > Duration::from_secs(60) {
            match write_status(&k, &health, &since, &runtime_version).await {
                Ok(()) => last_write = std::time::Instant::now(),
                Err(e) => tracing::warn!("writing node status: {e}"),
            }
        }
    }
}

/// InternalIP default.
pub const DEFAULT_NODE_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;
