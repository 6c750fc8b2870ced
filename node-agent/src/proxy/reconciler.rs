//! One reconciler for the service maps. Data: Services and EndpointSlices (watched).
//! Decision: per touched Service, [`super::model::desired_service`]. Output:
//! [`super::maps::ServiceMaps::apply`]/`remove` for that Service's frontends only.
//! Nothing is applied before both lists are complete; the first pass after them is a
//! full sync that also removes frontends no Service wants (left by an earlier agent).
//! In eBPF mode Nodes are watched too: every node's InternalIP/ExternalIP addresses go
//! to the node address map, where the socket programs apply the NodePort wildcard
//! (a pod connecting to any node's IP at a nodePort), written after the first full list.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use k8s_openapi::{
    api::{
        core::v1::{Event, EventSource, Node, ObjectReference, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client, ResourceExt,
    api::PostParams,
    runtime::{WatchStreamExt, watcher},
};

use super::{
    ServiceProxy,
    model::{FrontendKey, SERVICE_NAME_LABEL, Skipped, desired_service},
};

/// namespace/name of a Service.
type SvcKey = (String, String);

/// How many queued events are folded into one pass at most.
const BATCH: usize = 512;

enum Change {
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    Node(Box<watcher::Event<Node>>),
}

/// The reconciler's view of the cluster.
#[derive(Default)]
pub struct State {
    services: BTreeMap<SvcKey, Service>,
    /// Service -> its EndpointSlices by name.
    slices: BTreeMap<SvcKey, BTreeMap<String, EndpointSlice>>,
    /// Which Service an EndpointSlice belonged to (a relabelled slice moves).
    slice_owner: BTreeMap<(String, String), SvcKey>,
    /// What each Service has in the maps.
    owned: BTreeMap<SvcKey, BTreeSet<FrontendKey>>,
    /// Every node's IPv4 addresses by node name.
    nodes: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    staged_nodes: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    nodes_listed: bool,
    /// The node addresses changed since they were last written.
    nodes_dirty: bool,
    /// The last skip messages reported per Service (report changes only).
    reported: BTreeMap<SvcKey, Vec<String>>,
    staged_services: BTreeMap<SvcKey, Service>,
    staged_slices: Vec<EndpointSlice>,
    services_listed: bool,
    slices_listed: bool,
    synced: bool,
}

fn svc_key(s: &Service) -> SvcKey {
    (s.namespace().unwrap_or_default(), s.name_any())
}

/// A Node's InternalIP and ExternalIP addresses (IPv4).
pub fn node_addresses(n: &Node) -> BTreeSet<Ipv4Addr> {
    n.status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
        .filter_map(|a| a.address.parse().ok())
        .collect()
}

fn slice_service(s: &EndpointSlice) -> Option<SvcKey> {
    let svc = s.labels().get(SERVICE_NAME_LABEL)?;
    Some((s.namespace().unwrap_or_default(), svc.clone()))
}

impl State {
    fn put_slice(&mut self, s: EndpointSlice, dirty: &mut BTreeSet<SvcKey>) {
        let id = (s.namespace().unwrap_or_default(), s.name_any());
        if let Some(old) = self.slice_owner.remove(&id) {
            if let Some(m) = self.slices.get_mut(&old) {
                m.remove(&id.1);
            }
            dirty.insert(old);
        }
        if let Some(owner) = slice_service(&s) {
            self.slices
                .entry(owner.clone())
                .or_default()
                .insert(id.1.clone(), s);
            self.slice_owner.insert(id, owner.clone());
            dirty.insert(owner);
        }
    }

    fn drop_slice(&mut self, s: &EndpointSlice, dirty: &mut BTreeSet<SvcKey>) {
        let id = (s.namespace().unwrap_or_default(), s.name_any());
        if let Some(old) = self.slice_owner.remove(&id) {
            if let Some(m) = self.slices.get_mut(&old) {
                m.remove(&id.1);
            }
            dirty.insert(old);
        }
    }

    /// Folds one watch event into the state; the Services it touches become dirty.
    fn absorb(&mut self, c: Change, dirty: &mut BTreeSet<SvcKey>) {
        match c {
            Change::Service(ev) => match *ev {
                watcher::Event::Init => self.staged_services.clear(),
                watcher::Event::InitApply(s) => {
                    self.staged_services.insert(svc_key(&s), s);
                }
                watcher::Event::InitDone => {
                    let new = std::mem::take(&mut self.staged_services);
                    dirty.extend(self.services.keys().cloned());
                    dirty.extend(new.keys().cloned());
                    self.services = new;
                    self.services_listed = true;
                }
                watcher::Event::Apply(s) => {
                    let k = svc_key(&s);
                    self.services.insert(k.clone(), s);
                    dirty.insert(k);
                }
                watcher::Event::Delete(s) => {
                    let k = svc_key(&s);
                    self.services.remove(&k);
                    dirty.insert(k);
                }
            },
            Change::Slice(ev) => match *ev {
                watcher::Event::Init => self.staged_slices.clear(),
                watcher::Event::InitApply(s) => self.staged_slices.push(s),
                watcher::Event::InitDone => {
                    dirty.extend(self.slices.keys().cloned());
                    self.slices.clear();
                    self.slice_owner.clear();
                    for s in std::mem::take(&mut self.staged_slices) {
                        self.put_slice(s, dirty);
                    }
                    self.slices_listed = true;
                }
                watcher::Event::Apply(s) => self.put_slice(s, dirty),
                watcher::Event::Delete(s) => self.drop_slice(&s, dirty),
            },
            Change::Node(ev) => match *ev {
                watcher::Event::Init => self.staged_nodes.clear(),
                watcher::Event::InitApply(n) => {
                    self.staged_nodes.insert(n.name_any(), node_addresses(&n));
                }
                watcher::Event::InitDone => {
                    self.nodes = std::mem::take(&mut self.staged_nodes);
                    self.nodes_listed = true;
                    self.nodes_dirty = true;
                }
                watcher::Event::Apply(n) => {
                    let ips = node_addresses(&n);
                    if self.nodes.get(&n.name_any()) != Some(&ips) {
                        self.nodes.insert(n.name_any(), ips);
                        self.nodes_dirty = true;
                    }
                }
                watcher::Event::Delete(n) => {
                    self.nodes_dirty |= self.nodes.remove(&n.name_any()).is_some();
                }
            },
        }
    }

    /// Every node's addresses, once listed and changed since the last call.
    fn take_node_ips(&mut self) -> Option<BTreeSet<Ipv4Addr>> {
        if !(self.nodes_listed && self.nodes_dirty) {
            return None;
        }
        self.nodes_dirty = false;
        Some(self.nodes.values().flatten().copied().collect())
    }
}

/// Writes the node addresses if they changed.
fn sync_node_ips(state: &mut State, proxy: &ServiceProxy) {
    let Some(ips) = state.take_node_ips() else {
        return;
    };
    let mut maps = proxy.maps.lock().unwrap_or_else(|e| e.into_inner());
    match maps.set_node_ips(&ips) {
        Ok(0) => {}
        Ok(ops) => tracing::info!(addresses = ips.len(), ops, "node addresses updated"),
        Err(e) => {
            super::metrics::PROGRAM_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::error!("writing the node addresses: {e}");
            // Try again with the next change.
            state.nodes_dirty = true;
        }
    }
}

/// Applies the dirty Services; returns the skip reports to publish.
pub fn reconcile(
    state: &mut State,
    proxy: &ServiceProxy,
    node: &str,
    dirty: &mut BTreeSet<SvcKey>,
) -> Vec<(SvcKey, Skipped)> {
    let mut reports = vec![];
    let mut maps = proxy.maps.lock().unwrap_or_else(|e| e.into_inner());
    for key in std::mem::take(dirty) {
        let (desired, skipped) = match state.services.get(&key) {
            Some(svc) => {
                let slices: Vec<&EndpointSlice> = state
                    .slices
                    .get(&key)
                    .map(|m| m.values().collect())
                    .unwrap_or_default();
                desired_service(svc, &slices, node, proxy.node_ip)
            }
            None => Default::default(),
        };
        let before = state.owned.remove(&key).unwrap_or_default();
        let mut now = BTreeSet::new();
        for (f, want) in &desired {
            match maps.apply(f, want) {
                Ok(()) => {
                    now.insert(*f);
                }
                Err(e) => {
                    // Full maps: the old entries stay intact (see ServiceMaps::apply).
                    super::metrics::PROGRAM_ERRORS
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(service = %format!("{}/{}", key.0, key.1), frontend = ?f, "cannot program the service: {e}");
                    if before.contains(f) {
                        now.insert(*f);
                    }
                }
            }
        }
        for f in before.difference(&now) {
            maps.remove(f);
        }
        if !now.is_empty() {
            state.owned.insert(key.clone(), now);
        }
        let messages: Vec<String> = skipped.iter().map(|s| s.message.clone()).collect();
        if state.reported.get(&key) != Some(&messages) {
            if messages.is_empty() {
                state.reported.remove(&key);
            } else {
                state.reported.insert(key.clone(), messages);
                reports.extend(skipped.into_iter().map(|s| (key.clone(), s)));
            }
        }
    }
    if !state.synced {
        // The first full pass: frontends nobody owns are leftovers.
        let owned: BTreeSet<FrontendKey> = state.owned.values().flatten().copied().collect();
        let stale: Vec<FrontendKey> = maps
            .frontends()
            .filter(|f| !owned.contains(f))
            .copied()
            .collect();
        for f in &stale {
            maps.remove(f);
        }
        if !stale.is_empty() {
            tracing::info!(
                removed = stale.len(),
                "removed service entries no Service wants"
            );
        }
        state.synced = true;
    }
    reports
}

async fn report(client: Client, node: &str, key: &SvcKey, s: &Skipped) {
    let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let ev = Event {
        metadata: ObjectMeta {
            name: Some(format!(
                "{}.{nanos:x}",
                key.1.chars().take(200).collect::<String>()
            )),
            namespace: Some(key.0.clone()),
            ..Default::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            name: Some(key.1.clone()),
            namespace: Some(key.0.clone()),
            ..Default::default()
        },
        reason: Some(s.reason.into()),
        message: Some(s.message.clone()),
        type_: Some("Warning".into()),
        source: Some(EventSource {
            component: Some("skiff-proxy".into()),
            host: Some(node.into()),
        }),
        reporting_component: Some("skiff-proxy".into()),
        reporting_instance: Some(node.into()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Default::default()
    };
    if let Err(e) = Api::<Event>::namespaced(client, &key.0)
        .create(&PostParams::default(), &ev)
        .await
    {
        tracing::warn!("recording an event for {}/{}: {e}", key.0, key.1);
    }
}

/// Where the desired state goes.
pub enum Sink {
    /// The eBPF maps (the default).
    Ebpf(Arc<ServiceProxy>),
    /// kube-proxy-shaped iptables rules (`--proxy-mode=iptables`, for benchmarks).
    Iptables { node_ip: std::net::Ipv4Addr },
}

/// The whole rule set for `--proxy-mode=iptables` (a full sync, as kube-proxy does).
pub fn render_iptables(
    state: &mut State,
    node: &str,
    node_ip: std::net::Ipv4Addr,
    dirty: &mut BTreeSet<SvcKey>,
) -> (String, Vec<(SvcKey, Skipped)>) {
    let mut all = BTreeMap::new();
    let mut reports = vec![];
    for (key, svc) in &state.services {
        let slices: Vec<&EndpointSlice> = state
            .slices
            .get(key)
            .map(|m| m.values().collect())
            .unwrap_or_default();
        let (desired, skipped) = desired_service(svc, &slices, node, node_ip);
        if dirty.contains(key) {
            let messages: Vec<String> = skipped.iter().map(|s| s.message.clone()).collect();
            if !messages.is_empty() && state.reported.get(key) != Some(&messages) {
                state.reported.insert(key.clone(), messages);
                reports.extend(skipped.into_iter().map(|s| (key.clone(), s)));
            }
        }
        if !desired.is_empty() {
            all.insert(key.clone(), desired);
        }
    }
    dirty.clear();
    (super::iptables::render(&all, node_ip), reports)
}

/// Runs until the process ends.
pub async fn run(client: Client, node: String, sink: Sink) {
    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|r| r.map(|e| Change::Service(Box::new(e))));
    let slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|r| r.map(|e| Change::Slice(Box::new(e))));
    // Node addresses matter to the socket programs only.
    let nodes = match &sink {
        Sink::Ebpf(_) => watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .map(|r| r.map(|e| Change::Node(Box::new(e))))
            .boxed(),
        Sink::Iptables { .. } => futures::stream::pending().boxed(),
    };
    let mut changes =
        futures::stream::select(futures::stream::select(services, slices), nodes).boxed();
    let mut state = State::default();
    let mut dirty = BTreeSet::new();
    let mut last_rules: Option<String> = None;
    loop {
        let Some(first) = changes.next().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match changes.next().now_or_never() {
                Some(Some(c)) => batch.push(c),
                _ => break,
            }
        }
        for c in batch {
            match c {
                Ok(c) => state.absorb(c, &mut dirty),
                Err(e) => tracing::warn!("watching services, endpoint slices or nodes: {e}"),
            }
        }
        if let Sink::Ebpf(proxy) = &sink {
            // A few map operations when a node comes, goes or changes its addresses.
            sync_node_ips(&mut state, proxy);
        }
        if !(state.services_listed && state.slices_listed) || dirty.is_empty() {
            continue;
        }
        let started = std::time::Instant::now();
        let n = dirty.len();
        let proxy = match &sink {
            Sink::Ebpf(p) => p.clone(),
            Sink::Iptables { node_ip } => {
                let (rules, reports) = render_iptables(&mut state, &node, *node_ip, &mut dirty);
                if last_rules.as_deref() != Some(rules.as_str()) {
                    let r = rules.clone();
                    match tokio::task::spawn_blocking(move || super::iptables::apply(&r)).await {
                        Ok(Ok(())) => last_rules = Some(rules),
                        Ok(Err(e)) => tracing::error!("iptables-restore: {e}"),
                        Err(e) => tracing::error!("iptables task: {e}"),
                    }
                }
                for (key, s) in reports {
                    report(client.clone(), &node, &key, &s).await;
                }
                continue;
            }
        };
        let reports = {
            let proxy = proxy.clone();
            let node = node.clone();
            let mut st = std::mem::take(&mut state);
            let mut d = std::mem::take(&mut dirty);
            let (st, reports) = tokio::task::spawn_blocking(move || {
                let r = reconcile(&mut st, &proxy, &node, &mut d);
                (st, r)
            })
            .await
            .unwrap_or_else(|e| panic!("service reconcile task: {e}"));
            state = st;
            reports
        };
        tracing::debug!(services = n, elapsed = ?started.elapsed(), "services programmed");
        for (key, s) in reports {
            report(client.clone(), &node, &key, &s).await;
        }
        // Let a burst of changes collect into the next batch.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
