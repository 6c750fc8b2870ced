//! The scheduler: assigns pending pods to nodes, as kube-scheduler does.
//!
//! Input comes only through the apiserver: reflectors over Nodes and over all Pods feed
//! a [`cache::Cache`] of per-node usage and a [`queue::SchedulingQueue`] of pods to place.
//! The scheduling loop pops one pod at a time and decides synchronously against the
//! cache ([`algorithm::find_node`]: filters, then scores); the decision is "assumed" in
//! the cache at once so the next decision sees it, and the binding (POST
//! pods/{name}/binding) runs concurrently, up to `parallel_binds` at a time, so the loop
//! never waits for API round-trips. Pods that fit nowhere get PodScheduled=False and a
//! FailedScheduling event, and wait in the queue until a cluster change may help.
//!
//! Pure logic (filters, scores, queue, cache) lives in the submodules with unit tests;
//! this module is the IO wiring.

pub mod algorithm;
pub mod cache;
pub mod filters;
pub mod pod_info;
pub mod quantity;
pub mod queue;
pub mod scores;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Binding, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::controllers::{is_conflict, is_not_found, key_of, now};
use crate::events::EventRecorder;
use crate::objects::{PodWithoutManagedFields, without_managed_fields};
use cache::{Cache, PodChange};
use pod_info::{PodInfo, bound_node, is_terminated, wants_scheduling};
use queue::{ClusterEvent, Popped, QueueConfig, SchedulingQueue};

/// Settings from the skiff-scheduler command line.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Pods whose spec.schedulerName is this are ours ("default-scheduler" when unset).
    pub scheduler_name: String,
    /// How many bindings may be in flight at once.
    pub parallel_binds: usize,
    /// First retry delay of a pod that failed to schedule; doubles per failure.
    pub pod_initial_backoff: Duration,
    /// Upper bound of the per-pod retry delay.
    pub pod_max_backoff: Duration,
    /// An unschedulable pod is retried at least this often even if no cluster event
    /// suggests it might fit now.
    pub unschedulable_retry_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        let queue = QueueConfig::default();
        SchedulerConfig {
            scheduler_name: "default-scheduler".into(),
            parallel_binds: 16,
            pod_initial_backoff: queue.initial_backoff,
            pod_max_backoff: queue.max_backoff,
            unschedulable_retry_interval: queue.unschedulable_timeout,
        }
    }
}

/// How often timeouts (unschedulable retry, assumed-pod expiry) are checked.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(1);
/// A bound pod the watch has not confirmed after this long is forgotten, so a lost
/// event cannot reserve capacity forever.
const ASSUMED_POD_TTL: Duration = Duration::from_secs(30);
/// Concurrent PodScheduled=False status writes.
const UNSCHEDULABLE_WRITES_IN_FLIGHT: usize = 8;

/// Runs the scheduler until the watches end (they retry on errors, so: forever).
/// Watches nodes and pods from the start and places pods once `leading` completes (a
/// standby scheduler keeps warm caches, as kube-scheduler does, so a failover places pods
/// at once instead of first listing every pod).
pub async fn run(
    client: Client,
    cfg: SchedulerConfig,
    leading: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (node_store, node_writer) = reflector::store::<Node>();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let node_events = reflector::reflector(
        node_writer,
        watcher::watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff(),
    );
    let pod_events = reflector::reflector(
        pod_writer,
        without_managed_fields(
            watcher::watcher(
                Api::<PodWithoutManagedFields>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff(),
        ),
    );
    let sched = Arc::new(Scheduler {
        events: EventRecorder::new(client.clone()),
        client,
        permits: Arc::new(Semaphore::new(cfg.parallel_binds.max(1))),
        unschedulable_permits: Arc::new(Semaphore::new(UNSCHEDULABLE_WRITES_IN_FLIGHT)),
        state: Mutex::new(State {
            cache: Cache::default(),
            queue: SchedulingQueue::new(QueueConfig {
                initial_backoff: cfg.pod_initial_backoff,
                max_backoff: cfg.pod_max_backoff,
                unschedulable_timeout: cfg.unschedulable_retry_interval,
            }),
            pod_relist: None,
            node_relist: None,
        }),
        wake: Notify::new(),
        pods: pod_store.clone(),
        cfg,
    });
    tracing::info!(scheduler = %sched.cfg.scheduler_name, "scheduler starting");

    // Separate tasks, so decoding watch events and deciding run in parallel; the
    // JoinSet aborts the others when one ends or when this future is dropped.
    let mut tasks = tokio::task::JoinSet::new();
    let for_nodes = sched.clone();
    tasks.spawn(drive("nodes", node_events, move |ev| {
        for_nodes.on_node_event(ev)
    }));
    let for_pods = sched.clone();
    tasks.spawn(drive("pods", pod_events, move |ev| {
        for_pods.on_pod_event(ev)
    }));
    tasks.spawn({
        let sched = sched.clone();
        async move {
            // Deciding before both caches are filled would overcommit nodes whose pods
            // have not been listed yet.
            if node_store.wait_until_ready().await.is_err()
                || pod_store.wait_until_ready().await.is_err()
            {
                return;
            }
            tracing::info!("scheduler caches synced");
            leading.await;
            sched.scheduling_loop().await;
        }
    });
    if let Some(Err(e)) = tasks.join_next().await {
        tracing::error!("scheduler task failed: {e}");
    }
    tracing::warn!("scheduler stopped");
}

/// Feeds a watch stream into a handler, logging (and surviving) watch errors.
async fn drive<K>(
    what: &'static str,
    stream: impl Stream<Item = Result<Event<K>, watcher::Error>>,
    mut handle: impl FnMut(Event<K>),
) {
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(ev) => handle(ev),
            Err(e) => tracing::warn!("scheduler {what} watch: {e}"),
        }
    }
}

struct Scheduler {
    client: Client,
    cfg: SchedulerConfig,
    state: Mutex<State>,
    /// Woken when a pod becomes active.
    wake: Notify,
    /// Bindings in flight.
    permits: Arc<Semaphore>,
    /// PodScheduled=False writes in flight, capped so a burst of unschedulable pods
    /// does not crowd out the bindings at the apiserver.
    unschedulable_permits: Arc<Semaphore>,
    /// Scheduled / FailedScheduling events (queued, written one at a time).
    events: EventRecorder,
    /// Latest pod objects, for status patches.
    pods: Store<Pod>,
}

struct State {
    cache: Cache,
    queue: SchedulingQueue,
    /// Keys seen since a watch (re)list began; what was not seen is gone.
    pod_relist: Option<HashSet<String>>,
    node_relist: Option<HashSet<String>>,
}

/// What a decision led to, acted on after the lock is released.
enum Outcome {
    Bind { pod: Arc<Pod>, node: String },
    Unschedulable { pod: Arc<Pod>, message: String },
    Skip,
}

impl Scheduler {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not stop scheduling: the state stays consistent
        // because every mutation is done under one short critical section.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn on_node_event(&self, ev: Event<Node>) {
        let now = Instant::now();
        let mut st = self.lock();
        let changed = match ev {
            Event::Init => {
                st.node_relist = Some(HashSet::new());
                false
            }
            Event::InitApply(node) => {
                if let Some(seen) = st.node_relist.as_mut() {
                    seen.insert(node.name_any());
                }
                st.cache.update_node(&node)
            }
            Event::InitDone => {
                if let Some(seen) = st.node_relist.take() {
                    let gone: Vec<String> = st
                        .cache
                        .node_names()
                        .filter(|n| !seen.contains(*n))
                        .cloned()
                        .collect();
                    for name in gone {
                        st.cache.remove_node(&name);
                    }
                }
                false
            }
            Event::Apply(node) => st.cache.update_node(&node),
            Event::Delete(node) => {
                st.cache.remove_node(&node.name_any());
                false
            }
        };
        if changed && st.queue.on_event(ClusterEvent::NodeChanged, now) {
            self.wake.notify_one();
        }
    }

    fn on_pod_event(&self, ev: Event<Pod>) {
        let now = Instant::now();
        let mut st = self.lock();
        let mut woke = false;
        let mut events = Vec::new();
        match ev {
            Event::Init => st.pod_relist = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let Some(seen) = st.pod_relist.as_mut() {
                    seen.insert(key_of(&pod));
                }
                woke |= self.apply_pod(&mut st, pod, now, &mut events);
            }
            Event::InitDone => {
                if let Some(seen) = st.pod_relist.take() {
                    let gone: Vec<String> = st
                        .cache
                        .pod_keys()
                        .filter(|k| !seen.contains(*k) && !st.cache.is_assumed(k))
                        .cloned()
                        .collect();
                    for key in gone {
                        if st.cache.remove_pod(&key) {
                            events.push(ClusterEvent::PodRemoved);
                        }
                    }
                    let gone: Vec<String> = st
                        .queue
                        .keys()
                        .filter(|k| !seen.contains(*k))
                        .cloned()
                        .collect();
                    for key in gone {
                        st.queue.remove(&key);
                    }
                }
            }
            Event::Apply(pod) => woke |= self.apply_pod(&mut st, pod, now, &mut events),
            Event::Delete(pod) => {
                let key = key_of(&pod);
                st.queue.remove(&key);
                if st.cache.remove_pod(&key) {
                    events.push(ClusterEvent::PodRemoved);
                }
            }
        }
        events.dedup();
        for event in events {
            woke |= st.queue.on_event(event, now);
        }
        if woke {
            self.wake.notify_one();
        }
    }

    /// A pod was added or changed. Bound pods go into the cache (confirming any
    /// assumption); unbound pods of ours into the queue. Returns true when a pod
    /// became ready to schedule.
    fn apply_pod(
        &self,
        st: &mut State,
        pod: Pod,
        now: Instant,
        events: &mut Vec<ClusterEvent>,
    ) -> bool {
        let key = key_of(&pod);
        if let Some(node) = bound_node(&pod) {
            st.queue.remove(&key);
            if is_terminated(&pod) {
                if st.cache.remove_pod(&key) {
                    events.push(ClusterEvent::PodRemoved);
                }
                return false;
            }
            let node = node.to_string();
            match st
                .cache
                .add_bound_pod(Arc::new(PodInfo::from_pod(&pod)), &node)
            {
                PodChange::None => {}
                PodChange::Added => events.push(ClusterEvent::PodAdded),
                PodChange::Changed => events.push(ClusterEvent::PodChanged),
            }
            return false;
        }
        if !wants_scheduling(&pod, &self.cfg.scheduler_name) {
            st.queue.remove(&key);
            // An unbound pod only holds capacity while assumed; if it can no longer be
            // bound (deleting, finished), the binding will fail and drop it.
            return false;
        }
        // Already decided and bound, the watch just has not shown the binding yet.
        if st.cache.is_assumed(&key) && !st.queue.contains(&key) {
            return false;
        }
        st.queue.add_or_update(&key, Arc::new(pod), now)
    }

    async fn scheduling_loop(self: &Arc<Self>) {
        let mut next_housekeeping = Instant::now();
        loop {
            // Take a binding slot first, so a pod is only popped when it can be bound
            // right away (decisions then use the freshest cache).
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            let popped = loop {
                let now = Instant::now();
                let (popped, backoff_expiry) = {
                    let mut st = self.lock();
                    if now >= next_housekeeping {
                        next_housekeeping = now + HOUSEKEEPING_INTERVAL;
                        housekeeping(&mut st, now);
                    }
                    (st.queue.pop(now), st.queue.next_backoff_expiry())
                };
                if let Some(p) = popped {
                    break p;
                }
                let deadline = backoff_expiry
                    .map_or(next_housekeeping, |t| t.min(next_housekeeping))
                    .max(now + Duration::from_millis(1));
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline)) => {}
                }
            };
            match self.schedule_one(popped) {
                Outcome::Bind { pod, node } => {
                    let sched = self.clone();
                    tokio::spawn(async move { sched.bind(pod, node, permit).await });
                }
                Outcome::Unschedulable { pod, message } => {
                    drop(permit);
                    let sched = self.clone();
                    tokio::spawn(async move { sched.report_unschedulable(pod, message).await });
                }
                Outcome::Skip => drop(permit),
            }
        }
    }

    /// One decision, under the lock so it sees every earlier decision.
    fn schedule_one(&self, popped: Popped) -> Outcome {
        let now = Instant::now();
        let info = Arc::new(PodInfo::from_pod(&popped.pod));
        let mut st = self.lock();
        if st.cache.pod(&popped.key).is_some() {
            // Bound or assumed meanwhile.
            st.queue.done(&popped.key);
            return Outcome::Skip;
        }
        let decision = algorithm::find_node(&info, &st.cache, &mut rand::rng());
        match decision {
            Ok(node) => {
                tracing::debug!("assuming {} on {node}", popped.key);
                st.cache.assume(info, &node);
                Outcome::Bind {
                    pod: popped.pod,
                    node,
                }
            }
            Err(fit) => {
                let message = fit.message();
                st.queue.unschedulable(&popped.key, fit.kind, now);
                if st.queue.set_message(&popped.key, &message) {
                    tracing::info!("pod {} is unschedulable: {message}", popped.key);
                    Outcome::Unschedulable {
                        pod: popped.pod,
                        message,
                    }
                } else {
                    tracing::debug!("pod {} still unschedulable: {message}", popped.key);
                    Outcome::Skip
                }
            }
        }
    }

    /// POSTs the binding; the permit is held until the apiserver answers.
    async fn bind(self: Arc<Self>, pod: Arc<Pod>, node: String, permit: OwnedSemaphorePermit) {
        let key = key_of(pod.as_ref());
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                uid: pod.uid(),
                ..Default::default()
            },
            target: k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.clone()),
                ..Default::default()
            },
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        let result = api
            .create_subresource::<_, serde_json::Value>(
                "binding",
                &name,
                &PostParams::default(),
                &binding,
            )
            .await;
        drop(permit);

        let now = Instant::now();
        let mut st = self.lock();
        match result {
            Ok(_) => {
                st.cache.finish_binding(&key, now);
                st.queue.done(&key);
                drop(st);
                tracing::debug!("bound {key} to {node}");
                let message = format!("Successfully assigned {key} to {node}");
                self.events.record(
                    &self.cfg.scheduler_name,
                    pod.as_ref(),
                    "Normal",
                    "Scheduled",
                    &message,
                );
            }
            Err(e) if is_not_found(&e) || (is_conflict(&e) && is_final_conflict(&e)) => {
                // Deleted, or bound by someone else (or an earlier attempt of ours): the
                // watch shows where it really is.
                tracing::debug!("binding {key}: {e}; dropping it");
                st.cache.forget(&key);
                st.queue.done(&key);
                if st.queue.on_event(ClusterEvent::PodRemoved, now) {
                    self.wake.notify_one();
                }
            }
            Err(e) => {
                tracing::warn!("binding {key} to {node} failed: {e}; retrying");
                st.cache.forget(&key);
                st.queue.retry_after_error(&key, now);
                let woke = st.queue.on_event(ClusterEvent::PodRemoved, now);
                drop(st);
                if woke {
                    self.wake.notify_one();
                }
                self.events.record(
                    &self.cfg.scheduler_name,
                    pod.as_ref(),
                    "Warning",
                    "FailedScheduling",
                    &format!("Binding rejected: {e}"),
                );
            }
        }
    }

    /// PodScheduled=False/Unschedulable plus a FailedScheduling event, as kube-scheduler
    /// reports it. The other conditions are kept; the list is sent whole because a JSON
    /// merge patch replaces lists.
    async fn report_unschedulable(self: Arc<Self>, pod: Arc<Pod>, message: String) {
        let Ok(_permit) = self.unschedulable_permits.clone().acquire_owned().await else {
            return;
        };
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let latest = self
            .pods
            .get(&ObjectRef::new(&name).within(&ns))
            .unwrap_or_else(|| pod.clone());
        let existing = latest
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let since = existing
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or_else(now);
        let mut conditions: Vec<serde_json::Value> = existing
            .iter()
            .filter(|c| c.type_ != "PodScheduled")
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect();
        conditions.push(json!({
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastProbeTime": null,
            "lastTransitionTime": since,
        }));
        let patch = json!({"status": {"conditions": conditions}});
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => return,
            Err(e) => tracing::warn!("setting PodScheduled on {ns}/{name}: {e}"),
        }
        self.events.record(
            &self.cfg.scheduler_name,
            latest.as_ref(),
            "Warning",
            "FailedScheduling",
            &message,
        );
    }
}

/// Periodic work: retry pods unschedulable for too long, expire assumptions the
/// watch never confirmed.
fn housekeeping(st: &mut State, now: Instant) {
    st.queue.flush_unschedulable_timeout(now);
    if st.cache.expire_assumed(now, ASSUMED_POD_TTL) > 0 {
        st.queue.on_event(ClusterEvent::PodRemoved, now);
    }
}

/// A 409 from pods/binding that retrying cannot fix: the pod is already assigned or
/// is being deleted (as opposed to a storage write conflict).
fn is_final_conflict(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.message.contains("already assigned") || s.message.contains("being deleted")
        }
        _ => false,
    }
}
