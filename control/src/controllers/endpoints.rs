//! Endpoints controller: for every Service with a selector, the v1 Endpoints object of
//! the same name lists the pods that back it — ready pods under `addresses`, not-ready
//! ones under `notReadyAddresses`, grouped into subsets by the ports they resolve to
//! (a named targetPort can mean different numbers on different pods).
//!
//! Also home of what both endpoint controllers share: which pods back a Service and on
//! which ports (`backends`), and the pod -> Services trigger that remembers past
//! membership, so a pod whose labels stop matching still wakes the Service it left.
//!
//! Departure from Kubernetes: the Endpoints carry a non-controller ownerReference to
//! their Service, so the garbage collector deletes them with the Service (Kubernetes'
//! controller deletes them itself on the Service delete event, which a level-triggered
//! reconcile of a vanished Service never sees).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, EndpointSubset, Endpoints, ObjectReference, Pod, Service,
    ServicePort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::shared_pods::SharedPods;
use super::{Backoff, ControllerConfig, Error, Result, done_unless_error, is_conflict, key_of};
use crate::objects::is_ready;

const COMPONENT: &str = "endpoint-controller";

/// One pod behind a Service, with the Service's ports resolved against it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Backend {
    pub ip: String,
    pub node_name: Option<String>,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_uid: String,
    /// The pod's Ready condition (or publishNotReadyAddresses).
    pub ready: bool,
    pub terminating: bool,
    /// (service port name, resolved port number, protocol, appProtocol), in the
    /// Service's port order; ports that do not resolve on this pod are left out.
    pub ports: Vec<ResolvedPort>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResolvedPort {
    pub name: String,
    pub port: i32,
    pub protocol: String,
    pub app_protocol: Option<String>,
}

/// The port a Service port reaches on this pod: a number as is, a name through the
/// pod's container ports.
fn resolve_port(sp: &ServicePort, pod: &Pod) -> Option<i32> {
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(n)) if *n > 0 => Some(*n),
        Some(IntOrString::Int(_)) => Some(sp.port),
        Some(IntOrString::String(name)) => {
            if let Ok(n) = name.parse::<i32>() {
                return Some(n);
            }
            let proto = sp.protocol.as_deref().unwrap_or("TCP");
            pod.spec.as_ref()?.containers.iter().find_map(|c| {
                c.ports.as_deref().unwrap_or_default().iter().find_map(|p| {
                    (p.name.as_deref() == Some(name.as_str())
                        && p.protocol.as_deref().unwrap_or("TCP") == proto)
                        .then_some(p.container_port)
                })
            })
        }
    }
}

/// The pods backing `svc` among `pods` (already filtered by its selector): pods with an
/// IP that have not finished. Sorted, so equal inputs give equal outputs.
pub fn backends<'a>(svc: &Service, pods: impl IntoIterator<Item = &'a Pod>) -> Vec<Backend> {
    let spec = svc.spec.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let ports = spec.ports.unwrap_or_default();
    let mut out: Vec<Backend> = pods
        .into_iter()
        .filter_map(|pod| {
            let status = pod.status.as_ref()?;
            let ip = status.pod_ip.clone().filter(|ip| !ip.is_empty())?;
            if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                return None;
            }
            let resolved = ports
                .iter()
                .filter_map(|sp| {
                    Some(ResolvedPort {
                        name: sp.name.clone().unwrap_or_default(),
                        port: resolve_port(sp, pod)?,
                        protocol: sp.protocol.clone().unwrap_or_else(|| "TCP".into()),
                        app_protocol: sp.app_protocol.clone(),
                    })
                })
                .collect();
            Some(Backend {
                ip,
                node_name: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                pod_name: pod.name_any(),
                pod_namespace: pod.namespace().unwrap_or_default(),
                pod_uid: pod.uid().unwrap_or_default(),
                ready: publish_not_ready || is_ready(pod),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                ports: resolved,
            })
        })
        .collect();
    out.sort();
    out
}

/// The ownerReference endpoint objects carry to their Service.
pub fn service_owner(svc: &Service, controller: bool) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: svc.name_any(),
        uid: svc.uid().unwrap_or_default(),
        controller: Some(controller),
        block_owner_deletion: Some(true),
    }
}

/// Which Services each pod was last seen backing (by pod uid). A pod event wakes the
/// Services its labels match now and the ones it backed before.
#[derive(Default)]
pub struct Membership {
    by_pod: Mutex<HashMap<String, HashSet<ObjectRef<Service>>>>,
}

impl Membership {
    /// Records that `svc` is backed by exactly `pod_uids`.
    pub fn record(&self, svc: &Service, pod_uids: impl IntoIterator<Item = String>) {
        let key = ObjectRef::from_obj(svc);
        let mut by_pod = self.by_pod.lock().expect("membership lock");
        for set in by_pod.values_mut() {
            set.remove(&key);
        }
        for uid in pod_uids {
            by_pod.entry(uid).or_default().insert(key.clone());
        }
        by_pod.retain(|_, s| !s.is_empty());
    }

    /// The Services to wake for a changed pod.
    pub fn services_for(&self, pod: &Pod, services: &Store<Service>) -> Vec<ObjectRef<Service>> {
        let ns = pod.namespace().unwrap_or_default();
        let mut out: HashSet<ObjectRef<Service>> = services
            .state()
            .iter()
            .filter(|s| s.namespace().as_deref() == Some(ns.as_str()))
            .filter(|s| {
                s.spec
                    .as_ref()
                    .and_then(|sp| sp.selector.as_ref())
                    .is_some_and(|sel| {
                        !sel.is_empty() && sel.iter().all(|(k, v)| pod.labels().get(k) == Some(v))
                    })
            })
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect();
        if let Some(uid) = pod.uid()
            && let Some(before) = self.by_pod.lock().expect("membership lock").get(&uid)
        {
            out.extend(before.iter().cloned());
        }
        out.into_iter().collect()
    }
}

/// The pods backing `svc` now (from the controller-manager's pod cache, as Kubernetes'
/// podLister: a LIST per Service reconcile made the apiserver parse every pod of the
/// namespace on each pod event), recorded in `membership`. None for a Service this
/// controller leaves alone: no selector (its endpoints are managed by hand) or being
/// deleted.
pub async fn current_backends(
    pods: &Store<Pod>,
    membership: &Membership,
    svc: &Service,
) -> Result<Option<Vec<Backend>>> {
    let Some(selector) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return Ok(None);
    };
    if selector.is_empty() || svc.metadata.deletion_timestamp.is_some() {
        return Ok(None);
    }
    pods.wait_until_ready()
        .await
        .map_err(|e| Error::Other(format!("pod cache: {e}")))?;
    let ns = svc.namespace().unwrap_or_default();
    let selected: Vec<Arc<Pod>> = pods
        .state()
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(ns.as_str()))
        .filter(|p| {
            let labels = p.labels();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .collect();
    let backends = backends(svc, selected.iter().map(|p| &**p));
    membership.record(svc, backends.iter().map(|b| b.pod_uid.clone()));
    Ok(Some(backends))
}

pub struct Ctx {
    client: Client,
    backoff: Backoff,
    membership: Arc<Membership>,
    pods: Store<Pod>,
}

pub async fn run(client: Client, _cfg: ControllerConfig, pods: Arc<SharedPods>) {
    let svc_api: Api<Service> = Api::all(client.clone());
    let ctrl = Controller::new(svc_api, watcher::Config::default());
    let store = ctrl.store();
    let membership = Arc::new(Membership::default());
    let m = membership.clone();
    let ctrl = ctrl
        .watches_shared_stream(pods.events(), move |pod: Arc<Pod>| {
            m.services_for(&pod, &store)
        })
        // Someone editing or deleting an Endpoints object gets it put back.
        .watches(
            Api::<Endpoints>::all(client.clone()),
            watcher::Config::default(),
            |ep: Endpoints| Some(ObjectRef::new(&ep.name_any()).within(&ep.namespace()?)),
        );
    let ctx = Arc::new(Ctx {
        client,
        backoff: Backoff::default(),
        membership,
        pods: pods.store(),
    });
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(svc: Arc<Service>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(svc.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("endpoints {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

/// Subsets as Kubernetes builds them: addresses grouped by identical port lists.
/// Terminating pods are left out (unless publishNotReadyAddresses).
pub fn subsets(svc: &Service, backends: &[Backend]) -> Vec<EndpointSubset> {
    let publish_not_ready = svc
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut groups: BTreeMap<Vec<ResolvedPort>, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    for b in backends {
        if b.terminating && !publish_not_ready {
            continue;
        }
        let addr = EndpointAddress {
            ip: b.ip.clone(),
            node_name: b.node_name.clone(),
            target_ref: Some(ObjectReference {
                kind: Some("Pod".into()),
                name: Some(b.pod_name.clone()),
                namespace: Some(b.pod_namespace.clone()),
                uid: Some(b.pod_uid.clone()),
                ..Default::default()
            }),
            hostname: None,
        };
        let (ready, not_ready) = groups.entry(b.ports.clone()).or_default();
        if b.ready {
            ready.push(addr);
        } else {
            not_ready.push(addr);
        }
    }
    groups
        .into_iter()
        .filter(|(ports, _)| !ports.is_empty())
        .map(|(ports, (ready, not_ready))| EndpointSubset {
            addresses: (!ready.is_empty()).then_some(ready),
            not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
            ports: Some(
                ports
                    .into_iter()
                    .map(|p| EndpointPort {
                        name: (!p.name.is_empty()).then_some(p.name),
                        port: p.port,
                        protocol: Some(p.protocol),
                        app_protocol: p.app_protocol,
                    })
                    .collect(),
            ),
        })
        .collect()
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(svc.as_ref());
    let Some(backends) = current_backends(&ctx.pods, &ctx.membership, &svc).await? else {
        return Ok(Action::await_change());
    };
    let ns = svc.namespace().unwrap_or_default();
    let subsets = subsets(&svc, &backends);

    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = api.get_opt(&svc.name_any()).await?;
    let mut labels = svc.labels().clone();
    labels.remove("service.kubernetes.io/headless");
    if svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None") {
        labels.insert("service.kubernetes.io/headless".into(), String::new());
    }
    let desired = Endpoints {
        metadata: ObjectMeta {
            name: Some(svc.name_any()),
            namespace: Some(ns.clone()),
            labels: (!labels.is_empty()).then_some(labels),
            owner_references: Some(vec![service_owner(&svc, false)]),
            ..Default::default()
        },
        subsets: (!subsets.is_empty()).then_some(subsets),
    };
    match existing {
        None => match api.create(&PostParams::default(), &desired).await {
            Ok(_) => {}
            // Created concurrently (or a stale cache): the next event reconciles again.
            Err(e) if is_conflict(&e) => return Ok(Action::requeue(Backoff::BASE)),
            Err(e) => return Err(e.into()),
        },
        Some(cur) => {
            let same = cur.subsets.clone().unwrap_or_default()
                == desired.subsets.clone().unwrap_or_default()
                && cur.metadata.labels == desired.metadata.labels
                && cur.metadata.owner_references == desired.metadata.owner_references;
            if !same {
                let mut next = desired;
                next.metadata.resource_version = cur.metadata.resource_version.clone();
                next.metadata.annotations = cur.metadata.annotations.clone();
                match api
                    .replace(&svc.name_any(), &PostParams::default(), &next)
                    .await
                {
                    Ok(_) => {}
                    Err(e) if is_conflict(&e) => return Ok(Action::requeue(Backoff::BASE)),
                    Err(e) => done_unless_error::<()>(Err(e))?,
                }
            }
        }
    }
    ctx.backoff.succeeded(&key);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, ContainerPort, PodCondition, PodSpec, PodStatus, ServiceSpec,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    pub fn pod(name: &str, ip: &str, ready: bool, http_port: i32) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n1".into()),
                containers: vec![Container {
                    name: "c".into(),
                    ports: Some(vec![ContainerPort {
                        name: Some("http".into()),
                        container_port: http_port,
                        ..Default::default()
                    }]),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: Some(PodStatus {
                pod_ip: (!ip.is_empty()).then(|| ip.to_string()),
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    fn svc(target: IntOrString) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: Some([("app".to_string(), "web".to_string())].into()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: Some(target),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn named_ports_split_subsets_and_readiness_splits_addresses() {
        let s = svc(IntOrString::String("http".into()));
        let pods = vec![
            pod("a", "10.244.0.2", true, 8080),
            pod("b", "10.244.0.3", false, 8080),
            pod("c", "10.244.1.2", true, 9090),
            pod("pending", "", true, 8080),
        ];
        let subsets = subsets(&s, &backends(&s, &pods));
        assert_eq!(subsets.len(), 2, "{subsets:?}");
        let on_8080 = subsets
            .iter()
            .find(|s| s.ports.as_ref().unwrap()[0].port == 8080)
            .unwrap();
        let ips = |a: &Option<Vec<EndpointAddress>>| {
            a.clone()
                .unwrap_or_default()
                .into_iter()
                .map(|a| a.ip)
                .collect::<Vec<_>>()
        };
        assert_eq!(ips(&on_8080.addresses), vec!["10.244.0.2"]);
        assert_eq!(ips(&on_8080.not_ready_addresses), vec!["10.244.0.3"]);
        let on_9090 = subsets
            .iter()
            .find(|s| s.ports.as_ref().unwrap()[0].port == 9090)
            .unwrap();
        assert_eq!(ips(&on_9090.addresses), vec!["10.244.1.2"]);
    }

    #[test]
    fn terminating_and_finished_pods_leave_endpoints() {
        let s = svc(IntOrString::Int(8080));
        let mut gone = pod("gone", "10.244.0.9", true, 8080);
        gone.metadata.deletion_timestamp = Some(Time(crate::controllers::now_timestamp()));
        let mut done = pod("done", "10.244.0.8", false, 8080);
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let b = backends(&s, &[gone, done, pod("live", "10.244.0.7", true, 8080)]);
        assert_eq!(b.len(), 2, "finished pods are not backends");
        assert!(b.iter().any(|b| b.terminating));
        let subsets = subsets(&s, &b);
        assert_eq!(subsets.len(), 1);
        assert_eq!(subsets[0].addresses.as_ref().unwrap().len(), 1);
        assert!(subsets[0].not_ready_addresses.is_none());
    }

    #[test]
    fn unresolvable_named_port_drops_the_pod_from_that_port() {
        let s = svc(IntOrString::String("metrics".into()));
        let b = backends(&s, &[pod("a", "10.244.0.2", true, 8080)]);
        assert!(b[0].ports.is_empty());
        assert!(subsets(&s, &b).is_empty());
    }
}
