//! EndpointSlice controller: for every Service with a selector, discovery.k8s.io/v1
//! EndpointSlices (at most 100 endpoints each, one port list per slice) that the node
//! agents' service proxy reads. Every endpoint carries the three conditions a proxy
//! needs: `ready` (serving and not terminating), `serving` (the pod's readiness, even
//! while it terminates, so connections can drain) and `terminating`.
//!
//! Reconcile compares the desired slices with the Service's existing ones and changes
//! only what differs: a slice whose port list is still wanted is updated in place, new
//! ones are created, leftovers deleted. Slices are owned (controller=true) by their
//! Service, so the garbage collector removes them with it.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

use super::endpoints::{Backend, Membership, ResolvedPort, current_backends};
use super::shared_pods::SharedPods;
use super::{Backoff, ControllerConfig, Error, Result, done_unless_error, key_of};

const COMPONENT: &str = "endpointslice-controller";
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
/// Kubernetes' default --max-endpoints-per-slice.
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;

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
    let managed = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let ctrl = ctrl
        .watches_shared_stream(pods.events(), move |pod: Arc<Pod>| {
            m.services_for(&pod, &store)
        })
        // Our slices changed by someone else are put back.
        .owns(Api::<EndpointSlice>::all(client.clone()), managed);
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
    tracing::warn!("endpointslices {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

/// One slice's content: its port list and its endpoints.
pub type SliceContent = (Vec<EndpointPort>, Vec<Endpoint>);

/// The desired slice contents, endpoints sorted and chunked.
pub fn desired_slices(backends: &[Backend]) -> Vec<SliceContent> {
    let mut by_ports: BTreeMap<Vec<ResolvedPort>, Vec<Endpoint>> = BTreeMap::new();
    for b in backends {
        by_ports.entry(b.ports.clone()).or_default().push(Endpoint {
            addresses: vec![b.ip.clone()],
            conditions: Some(EndpointConditions {
                ready: Some(b.ready && !b.terminating),
                serving: Some(b.ready),
                terminating: Some(b.terminating),
            }),
            node_name: b.node_name.clone(),
            target_ref: Some(k8s_openapi::api::core::v1::ObjectReference {
                kind: Some("Pod".into()),
                name: Some(b.pod_name.clone()),
                namespace: Some(b.pod_namespace.clone()),
                uid: Some(b.pod_uid.clone()),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    let mut out = Vec::new();
    for (ports, endpoints) in by_ports {
        let ports: Vec<EndpointPort> = ports
            .into_iter()
            .map(|p| EndpointPort {
                name: Some(p.name),
                port: Some(p.port),
                protocol: Some(p.protocol),
                app_protocol: p.app_protocol,
            })
            .collect();
        for chunk in endpoints.chunks(MAX_ENDPOINTS_PER_SLICE) {
            out.push((ports.clone(), chunk.to_vec()));
        }
    }
    out
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(svc.as_ref());
    let Some(backends) = current_backends(&ctx.pods, &ctx.membership, &svc).await? else {
        return Ok(Action::await_change());
    };
    let ns = svc.namespace().unwrap_or_default();
    let mut desired = desired_slices(&backends);
    // A Service with no backends still gets one empty slice (what proxies read as "no
    // endpoints", as Kubernetes does), carrying the Service's ports.
    if desired.is_empty() {
        desired.push((Vec::new(), Vec::new()));
    }

    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &ns);
    let sel = format!(
        "{SERVICE_NAME_LABEL}={},{MANAGED_BY_LABEL}={MANAGED_BY}",
        svc.name_any()
    );
    let mut existing = api.list(&ListParams::default().labels(&sel)).await?.items;
    existing.sort_by_key(|s| s.name_any());

    let owner = super::endpoints::service_owner(&svc, true);
    let mut labels = svc.labels().clone();
    labels.insert(SERVICE_NAME_LABEL.into(), svc.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());

    let mut leftovers: Vec<EndpointSlice> = Vec::new();
    let mut unmatched = desired;
    // Reuse slices in place: first ones whose content is already right, then any.
    let mut reuse: Vec<(EndpointSlice, SliceContent)> = Vec::new();
    for slice in existing {
        let ports = slice.ports.clone().unwrap_or_default();
        if let Some(i) = unmatched
            .iter()
            .position(|(p, e)| *p == ports && *e == slice.endpoints.clone().unwrap_or_default())
        {
            unmatched.remove(i);
        } else {
            leftovers.push(slice);
        }
    }
    for slice in std::mem::take(&mut leftovers) {
        if unmatched.is_empty() {
            leftovers.push(slice);
        } else {
            reuse.push((slice, unmatched.remove(0)));
        }
    }
    for (mut slice, (ports, endpoints)) in reuse {
        slice.ports = Some(ports);
        slice.endpoints = Some(endpoints);
        slice.address_type = "IPv4".into();
        slice.metadata.labels = Some(labels.clone());
        slice.metadata.owner_references = Some(vec![owner.clone()]);
        let name = slice.name_any();
        match api.replace(&name, &PostParams::default(), &slice).await {
            Ok(_) => {}
            Err(e) if super::is_conflict(&e) => return Ok(Action::requeue(Backoff::BASE)),
            Err(e) => done_unless_error::<()>(Err(e))?,
        }
    }
    for (ports, endpoints) in unmatched {
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", svc.name_any())),
                namespace: Some(ns.clone()),
                labels: Some(labels.clone()),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(endpoints),
            ports: Some(ports),
        };
        api.create(&PostParams::default(), &slice).await?;
    }
    for slice in leftovers {
        done_unless_error(
            api.delete(&slice.name_any(), &DeleteParams::default())
                .await,
        )?;
    }
    ctx.backoff.succeeded(&key);
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(i: usize, ready: bool, terminating: bool, port: i32) -> Backend {
        Backend {
            ip: format!("10.244.{}.{}", i / 200, i % 200 + 2),
            node_name: Some("n1".into()),
            pod_name: format!("p{i}"),
            pod_namespace: "default".into(),
            pod_uid: format!("u{i}"),
            ready,
            terminating,
            ports: vec![ResolvedPort {
                name: "http".into(),
                port,
                protocol: "TCP".into(),
                app_protocol: None,
            }],
        }
    }

    #[test]
    fn slices_chunk_at_100_and_split_by_ports() {
        let mut b: Vec<Backend> = (0..250).map(|i| backend(i, true, false, 8080)).collect();
        b.push(backend(300, true, false, 9090));
        let slices = desired_slices(&b);
        let sizes: Vec<usize> = slices.iter().map(|(_, e)| e.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50, 1]);
        assert_eq!(slices[3].0[0].port, Some(9090));
    }

    #[test]
    fn terminating_endpoints_keep_serving_but_are_not_ready() {
        let slices = desired_slices(&[
            backend(1, true, true, 80),
            backend(2, false, false, 80),
            backend(3, true, false, 80),
        ]);
        let conds: Vec<(bool, bool, bool)> = slices[0]
            .1
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
            })
            .collect();
        assert_eq!(
            conds,
            vec![
                (false, true, true),
                (false, false, false),
                (true, true, false)
            ]
        );
    }
}
