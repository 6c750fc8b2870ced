//! One pod, level-triggered.
//!
//! Where the data comes from: the newest Pod object (from the agent's watcher), the state
//! of the pod's containers in containerd (found by id; at start also by the labels
//! [`LABEL_POD_UID`] and friends, which is how an agent restart adopts what runs), probe
//! results.
//! What it decides, every sync: network first (netns + veth + IP, [`crate::cni::network`]),
//! then init containers in order (each must exit 0), then app containers: start what is
//! missing, restart what exited when restartPolicy says so (CrashLoopBackOff: 10 s
//! doubling to 5 min; the first restart is immediate), restart what failed its liveness
//! probe; pulls honour imagePullPolicy, failures give ErrImagePull then
//! ImagePullBackOff (10 s doubling to 5 min).
//! Where it writes: pods/status (only when it changed), Events, and on deletion: SIGTERM,
//! SIGKILL after the grace period, removal of containers, snapshots, network, cgroups,
//! then `DELETE` with gracePeriodSeconds=0.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerState as K8sState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStateWaiting, ContainerStatus, Event, EventSource, HostIP, ObjectReference, Pod,
        PodCondition, PodIP, PodStatus,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions},
};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResources, LinuxResourcesBuilder, Mount, MountBuilder,
};
use serde_json::json;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

use crate::cni::network::{PodNetwork, uid_prefix};

use super::{
    agent::{Kubelet, now},
    credentials, cri_log,
    env::{self, PodFields},
    pod_status::{parse_quantity, phase, should_restart},
    probes::{ProbeTarget, Prober},
    runtime::{
        ContainerConfig, ContainerInfo, ContainerState, ImageInfo, PullPolicy, Runtime,
        RuntimeError, TaskIo,
    },
};

pub const LABEL_POD_UID: &str = "skiff.io/pod-uid";
pub const LABEL_POD_NAME: &str = "skiff.io/pod-name";
pub const LABEL_POD_NAMESPACE: &str = "skiff.io/pod-namespace";
pub const LABEL_CONTAINER: &str = "skiff.io/container";
pub const LABEL_ATTEMPT: &str = "skiff.io/attempt";
pub const LABEL_INIT: &str = "skiff.io/init";
pub const LABEL_STARTED_AT: &str = "skiff.io/started-at";

const BACKOFF_START: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long before exiting starts its backoff over.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);

/// The pod's cgroup: `/skiff/<node>/pod-<uid>` (containers below it).
pub fn pod_cgroup(k: &Kubelet, uid: &str) -> String {
    format!("/skiff/{}/pod-{uid}", k.cfg.node_name)
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Observed {
    #[default]
    Absent,
    Created,
    Running {
        pid: u32,
    },
    Exited {
        code: i32,
    },
}

/// What the worker knows about one container (by name) across its attempts.
#[derive(Default)]
struct Ctr {
    /// containerd id of the current attempt.
    id: Option<String>,
    /// restartCount.
    attempt: u32,
    image_id: String,
    started_at: Option<Time>,
    finished_at: Option<Time>,
    ran_since: Option<Instant>,
    observed: Observed,
    /// Termination of the previous attempt (lastState).
    last_terminated: Option<ContainerStateTerminated>,
    /// Why it is not running (reason, message).
    waiting: Option<(String, String)>,
    restart_delay: Duration,
    backoff_until: Option<Instant>,
    pull_delay: Duration,
    pull_backoff_until: Option<Instant>,
    readiness: Option<Prober>,
    liveness: Option<Prober>,
    /// The startupProbe of the current attempt while it has not succeeded yet.
    startup: Option<Prober>,
    /// The current attempt passed its startupProbe (or has none): liveness and readiness
    /// probes run, containerStatuses[].started is true.
    started_ok: bool,
    /// The container id the probers/waiter run for.
    watched: Option<String>,
    /// Adopted after an agent restart while the API showed it ready: the readiness
    /// prober starts from success (no Ready flap on agent restarts).
    adopted_ready: bool,
    waiter: Option<Waiter>,
}

/// Files of a configMap/secret volume, and its `items` (key, path) if given.
type VolumeData = (BTreeMap<String, Vec<u8>>, Option<Vec<(String, String)>>);

/// A task aborted when dropped.
struct Waiter(JoinHandle<()>);

impl Drop for Waiter {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Ctr {
    fn terminated(&self, code: i32) -> ContainerStateTerminated {
        ContainerStateTerminated {
            exit_code: code,
            reason: Some(if code == 0 { "Completed" } else { "Error" }.into()),
            started_at: self.started_at.clone(),
            finished_at: self.finished_at.clone(),
            container_id: self.id.as_ref().map(|i| format!("containerd://{i}")),
            ..Default::default()
        }
    }

    fn stop_watching(&mut self) {
        self.readiness = None;
        self.liveness = None;
        self.startup = None;
        self.watched = None;
        self.waiter = None;
    }
}

struct Worker {
    k: Arc<Kubelet>,
    uid: String,
    pod: Pod,
    ctrs: HashMap<String, Ctr>,
    net: Option<PodNetwork>,
    /// Why the pod cannot start containers yet.
    blocked: Option<String>,
    wake: Arc<Notify>,
    last_status: Option<serde_json::Value>,
    cond_since: HashMap<String, (String, Time)>,
    start_time: Time,
    terminal: Option<&'static str>,
    net_released: bool,
    next_wake: Option<Instant>,
    /// The pod's start slot ([`Kubelet::start_slots`]), held from the network setup to
    /// the containers' start (released while an image is pulled and after each sync).
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// Where the current sync's time went (logged at debug when it started containers).
    timing: SyncTiming,
}

/// Time spent in one sync, by step: where pod startup latency goes.
#[derive(Default)]
struct SyncTiming {
    slot_wait: Duration,
    containers_started: usize,
    create_and_start: Duration,
}

/// Runs the worker of pod `uid` until the pod is deleted and cleaned up.
pub async fn run(k: Arc<Kubelet>, uid: String, mut rx: watch::Receiver<Option<Pod>>) {
    let Some(pod) = rx.borrow_and_update().clone() else {
        return;
    };
    let start_time = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.clone())
        .unwrap_or_else(now);
    let mut w = Worker {
        k,
        uid,
        pod,
        ctrs: HashMap::new(),
        net: None,
        blocked: None,
        wake: Arc::new(Notify::new()),
        last_status: None,
        cond_since: HashMap::new(),
        start_time,
        terminal: None,
        net_released: false,
        next_wake: None,
        slot: None,
        timing: SyncTiming::default(),
    };
    w.adopt().await;
    loop {
        let current = rx.borrow_and_update().clone();
        match current {
            None => {
                w.terminate(false).await;
                return;
            }
            Some(p) if p.metadata.deletion_timestamp.is_some() => {
                w.pod = p;
                w.terminate(true).await;
                return;
            }
            Some(p) => {
                // A static pod's new mirror pod: write the status onto it again.
                let mirror = |p: &Pod| {
                    p.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(super::static_pods::ANN_MIRROR_UID).cloned())
                };
                if mirror(&p) != mirror(&w.pod) {
                    w.last_status = None;
                }
                w.pod = p;
            }
        }
        w.next_wake = None;
        w.sync().await;
        w.slot = None;
        let mut sleep = w.k.cfg.resync;
        if let Some(t) = w.next_wake {
            sleep =
                sleep.min(t.saturating_duration_since(Instant::now()) + Duration::from_millis(20));
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = w.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

fn parse_time(s: &str) -> Option<Time> {
    s.parse::<Timestamp>().ok().map(Time)
}

fn pull_policy(c: &Container) -> PullPolicy {
    match c.image_pull_policy.as_deref() {
        Some("Always") => PullPolicy::Always,
        Some("Never") => PullPolicy::Never,
        Some("IfNotPresent") => PullPolicy::IfNotPresent,
        _ => {
            let image = c.image.as_deref().unwrap_or_default();
            let last = image.rsplit('/').next().unwrap_or(image);
            let tagged = last.contains(':') && !last.ends_with(":latest");
            if image.contains('@') || tagged {
                PullPolicy::IfNotPresent
            } else {
                PullPolicy::Always
            }
        }
    }
}

fn resources(c: &Container) -> Option<LinuxResources> {
    let r = c.resources.as_ref()?;
    let get =
        |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
         k: &str| {
            m.as_ref()
                .and_then(|m| m.get(k))
                .and_then(|q| parse_quantity(&q.0))
        };
    let mem = get(&r.limits, "memory");
    let cpu_limit = get(&r.limits, "cpu");
    let cpu_request = get(&r.requests, "cpu").or(cpu_limit);
    let mut b = LinuxResourcesBuilder::default();
    if let Some(m) = mem
        && let Ok(m) = LinuxMemoryBuilder::default().limit(m as i64).build()
    {
        b = b.memory(m);
    }
    let mut cpu = LinuxCpuBuilder::default();
    let mut any_cpu = false;
    if let Some(l) = cpu_limit {
        cpu = cpu
            .quota(((l * 100_000.0) as i64).max(1000))
            .period(100_000u64);
        any_cpu = true;
    }
    if let Some(r) = cpu_request {
        cpu = cpu.shares(((r * 1024.0) as u64).max(2));
        any_cpu = true;
    }
    if any_cpu && let Ok(c) = cpu.build() {
        b = b.cpu(c);
    }
    b.build().ok()
}

/// The readiness and liveness probers of a running (and started) container.
fn start_probers(c: &mut Ctr, cs: &Container, target: &ProbeTarget, wake: &Arc<Notify>) {
    if let Some(p) = &cs.readiness_probe {
        c.readiness = Some(Prober::start(
            p.clone(),
            cs.clone(),
            target.clone(),
            std::mem::take(&mut c.adopted_ready),
            wake.clone(),
        ));
    }
    if let Some(p) = &cs.liveness_probe {
        c.liveness = Some(Prober::start(
            p.clone(),
            cs.clone(),
            target.clone(),
            true,
            wake.clone(),
        ));
    }
}

impl Worker {
    fn name(&self) -> String {
        self.pod.name_any()
    }

    fn ns(&self) -> String {
        self.pod.namespace().unwrap_or_else(|| "default".into())
    }

    fn policy(&self) -> String {
        self.pod
            .spec
            .as_ref()
            .and_then(|s| s.restart_policy.clone())
            .unwrap_or_else(|| "Always".into())
    }

    fn grace(&self) -> Duration {
        let s = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0);
        Duration::from_secs(s as u64)
    }

    fn note_wake(&mut self, at: Instant) {
        self.next_wake = Some(self.next_wake.map_or(at, |t| t.min(at)));
    }

    fn event(&self, type_: &str, reason: &str, message: String) {
        let client = self.k.client.clone();
        let ns = self.ns();
        let ts = now();
        let nanos = chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default();
        let name: String = self.name().chars().take(200).collect();
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{nanos:x}")),
                namespace: Some(ns.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(self.name()),
                namespace: Some(ns.clone()),
                uid: Some(self.uid.clone()),
                ..Default::default()
            },
            reason: Some(reason.into()),
            message: Some(message),
            type_: Some(type_.into()),
            source: Some(EventSource {
                component: Some("kubelet".into()),
                host: Some(self.k.cfg.node_name.clone()),
            }),
            reporting_component: Some("kubelet".into()),
            reporting_instance: Some(self.k.cfg.node_name.clone()),
            first_timestamp: Some(ts.clone()),
            last_timestamp: Some(ts),
            count: Some(1),
            ..Default::default()
        };
        tokio::spawn(async move {
            let _ = Api::<Event>::namespaced(client, &ns)
                .create(&PostParams::default(), &ev)
                .await;
        });
    }

    /// Takes over the containers found at agent start (and the last reported
    /// lastState/restart bookkeeping from the API).
    async fn adopt(&mut self) {
        let found: Vec<ContainerInfo> = self
            .k
            .adoptable
            .lock()
            .await
            .remove(&self.uid)
            .unwrap_or_default();
        if found.is_empty() {
            return;
        }
        let prior: HashMap<String, ContainerStatus> = self
            .pod
            .status
            .iter()
            .flat_map(|s| {
                s.container_statuses
                    .iter()
                    .flatten()
                    .chain(s.init_container_statuses.iter().flatten())
            })
            .map(|s| (s.name.clone(), s.clone()))
            .collect();
        let mut newest: HashMap<String, ContainerInfo> = HashMap::new();
        let mut stale = vec![];
        for c in found {
            let Some(name) = c.labels.get(LABEL_CONTAINER).cloned() else {
                stale.push(c.id);
                continue;
            };
            let attempt = |c: &ContainerInfo| -> u32 {
                c.labels
                    .get(LABEL_ATTEMPT)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0)
            };
            match newest.get(&name) {
                Some(old) if attempt(old) >= attempt(&c) => stale.push(c.id),
                Some(_) => {
                    if let Some(old) = newest.insert(name, c) {
                        stale.push(old.id);
                    }
                }
                None => {
                    newest.insert(name, c);
                }
            }
        }
        if let Some(rt) = self.k.rt().await {
            for id in stale {
                let _ = rt.delete(&id).await;
            }
        }
        for (name, c) in newest {
            let mut ctr = Ctr {
                attempt: c
                    .labels
                    .get(LABEL_ATTEMPT)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0),
                started_at: c.labels.get(LABEL_STARTED_AT).and_then(|s| parse_time(s)),
                observed: match c.state {
                    ContainerState::Running { pid } | ContainerState::Paused { pid } => {
                        Observed::Running { pid }
                    }
                    ContainerState::Created { .. } => Observed::Created,
                    ContainerState::Exited { exit_code } => Observed::Exited {
                        code: exit_code as i32,
                    },
                    ContainerState::NoTask | ContainerState::Unknown => {
                        Observed::Exited { code: 137 }
                    }
                },
                ran_since: Some(Instant::now()),
                ..Default::default()
            };
            if let Some(p) = prior.get(&name)
                && p.container_id.as_deref() == Some(&format!("containerd://{}", c.id))
            {
                ctr.last_terminated = p.last_state.as_ref().and_then(|l| l.terminated.clone());
                ctr.adopted_ready = p.ready;
                ctr.started_ok = p.started.unwrap_or(false);
                ctr.image_id = p.image_id.clone();
                if let Some(t) = p.state.as_ref().and_then(|s| s.terminated.as_ref()) {
                    ctr.finished_at = t.finished_at.clone();
                }
            }
            tracing::info!(
                pod = %self.name(),
                "adopting container {} ({name}, restartCount {}, {:?})",
                c.id,
                ctr.attempt,
                ctr.observed
            );
            ctr.id = Some(c.id);
            self.ctrs.insert(name, ctr);
        }
    }

    async fn refresh(&mut self, rt: &Runtime) {
        for c in self.ctrs.values_mut() {
            let Some(id) = c.id.clone() else { continue };
            let obs = match rt.status(&id).await {
                Ok(ContainerState::Running { pid } | ContainerState::Paused { pid }) => {
                    Observed::Running { pid }
                }
                Ok(ContainerState::Created { .. }) => Observed::Created,
                Ok(ContainerState::Exited { exit_code }) => Observed::Exited {
                    code: exit_code as i32,
                },
                Ok(ContainerState::NoTask) | Err(RuntimeError::ContainerNotFound(_)) => {
                    match c.observed {
                        Observed::Exited { code } => Observed::Exited { code },
                        _ => Observed::Exited { code: 137 },
                    }
                }
                Ok(ContainerState::Unknown) => c.observed,
                Err(e) => {
                    tracing::warn!("status of container {id}: {e}");
                    c.observed
                }
            };
            if matches!(obs, Observed::Exited { .. })
                && !matches!(c.observed, Observed::Exited { .. })
            {
                c.finished_at = Some(now());
                c.stop_watching();
            }
            if matches!(obs, Observed::Exited { .. }) && c.finished_at.is_none() {
                c.finished_at = Some(now());
            }
            c.observed = obs;
        }
    }

    async fn ensure_network(&mut self) -> Result<(), String> {
        if let Some(n) = &self.net
            && n.netns_path.exists()
        {
            return Ok(());
        }
        let host_network = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if host_network {
            // The node's own network namespace (the one the agent runs in) and address.
            self.net = Some(PodNetwork {
                netns: "host".into(),
                netns_path: std::path::PathBuf::from(format!(
                    "/proc/{}/ns/net",
                    std::process::id()
                )),
                host_veth: String::new(),
                ip: self.k.cfg.node_ip,
            });
            return Ok(());
        }
        let cidr = (*self.k.pod_cidr.borrow())
            .ok_or_else(|| format!("node {} has no podCIDR yet", self.k.cfg.node_name))?;
        self.take_slot().await;
        let k = self.k.clone();
        let uid = self.uid.clone();
        let net = tokio::task::spawn_blocking(move || k.networks.setup(&uid, cidr))
            .await
            .map_err(|e| format!("network setup task: {e}"))??;
        tracing::info!(pod = %self.name(), "network {} {} ip {}", net.netns, net.host_veth, net.ip);
        self.net = Some(net);
        Ok(())
    }

    /// Waits for a start slot (FIFO) unless the pod holds one.
    async fn take_slot(&mut self) {
        if self.slot.is_none() {
            let t = Instant::now();
            self.slot = self.k.start_slots.clone().acquire_owned().await.ok();
            self.timing.slot_wait += t.elapsed();
        }
    }

    async fn sync(&mut self) {
        let Some(rt) = self.k.rt().await else {
            self.blocked = Some(format!(
                "container runtime is down: containerd is unreachable at {}",
                self.k.cfg.containerd_address.display()
            ));
            self.write_status().await;
            return;
        };
        self.refresh(&rt).await;
        if self.terminal.is_some() && !self.net_released {
            // Completed pods keep their status (podIP included) but not their network.
            self.net_released = true;
            let k = self.k.clone();
            let uid = self.uid.clone();
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || k.networks.teardown(&uid)).await
            {
                tracing::warn!(pod = %self.name(), "network teardown: {e}");
            }
        }
        self.timing = SyncTiming::default();
        let t_sync = Instant::now();
        if self.terminal.is_none() {
            match self.ensure_network().await {
                Ok(()) => self.blocked = None,
                Err(e) => {
                    if self.blocked.as_deref() != Some(e.as_str()) {
                        self.event(
                            "Warning",
                            "FailedCreatePodSandBox",
                            format!("Failed to create pod sandbox: {e}"),
                        );
                    }
                    self.blocked = Some(e);
                    self.write_status().await;
                    return;
                }
            }
            if let Err(e) = self.prepare_volumes().await {
                if self.blocked.as_deref() != Some(e.as_str()) {
                    self.event(
                        "Warning",
                        "FailedMount",
                        format!("MountVolume.SetUp failed: {e}"),
                    );
                }
                self.blocked = Some(e);
                self.write_status().await;
                return;
            }
            self.reconcile(&rt).await;
            // The next pod may start while this one's status is written.
            self.slot = None;
            self.watch_running(&rt);
        }
        let t_status = Instant::now();
        self.write_status().await;
        if self.timing.containers_started > 0 {
            let ms = |d: Duration| d.as_millis();
            tracing::debug!(
                pod = %self.name(),
                "started {} container(s): sync {} ms = start slot wait {} ms + \
                 create and start {} ms + status {} ms + other {} ms",
                self.timing.containers_started,
                ms(t_sync.elapsed()),
                ms(self.timing.slot_wait),
                ms(self.timing.create_and_start),
                ms(t_status.elapsed()),
                ms(t_status.duration_since(t_sync)
                    .saturating_sub(self.timing.slot_wait + self.timing.create_and_start)),
            );
        }
    }

    async fn reconcile(&mut self, rt: &Runtime) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let policy = self.policy();
        for ic in spec.init_containers.iter().flatten() {
            let obs = self
                .ctrs
                .get(&ic.name)
                .map(|c| c.observed)
                .unwrap_or_default();
            match obs {
                Observed::Exited { code: 0 } => continue,
                Observed::Running { .. } => return,
                Observed::Created => {
                    self.start_created(rt, &ic.name).await;
                    return;
                }
                Observed::Exited { .. } if policy == "Never" => return,
                Observed::Exited { .. } | Observed::Absent => {
                    self.start(rt, ic, true).await;
                    return;
                }
            }
        }
        for ac in &spec.containers {
            let obs = self
                .ctrs
                .get(&ac.name)
                .map(|c| c.observed)
                .unwrap_or_default();
            match obs {
                Observed::Running { .. } => {
                    let failed = self.ctrs.get(&ac.name).and_then(|c| {
                        let startup = c.startup.as_ref().filter(|p| p.failed());
                        let liveness = c.liveness.as_ref().filter(|p| p.failed());
                        startup
                            .map(|p| ("Startup", "startup", p.message()))
                            .or_else(|| liveness.map(|p| ("Liveness", "liveness", p.message())))
                    });
                    if let Some((kind, kind_lc, msg)) = failed {
                        self.kill_unhealthy(rt, &ac.name, kind, kind_lc, &msg).await;
                        if let Some(Observed::Exited { code }) =
                            self.ctrs.get(&ac.name).map(|c| c.observed)
                            && should_restart(&policy, code)
                        {
                            self.start(rt, ac, false).await;
                        }
                    }
                }
                Observed::Created => self.start_created(rt, &ac.name).await,
                Observed::Exited { code } => {
                    if should_restart(&policy, code) {
                        self.start(rt, ac, false).await;
                    }
                }
                Observed::Absent => self.start(rt, ac, false).await,
            }
        }
    }

    async fn start_created(&mut self, rt: &Runtime, name: &str) {
        let Some(c) = self.ctrs.get_mut(name) else {
            return;
        };
        let Some(id) = c.id.clone() else { return };
        match rt.start(&id).await {
            Ok(pid) => c.observed = Observed::Running { pid },
            Err(e) => {
                c.waiting = Some(("RunContainerError".into(), e.to_string()));
                let _ = rt.delete(&id).await;
                c.observed = Observed::Exited { code: 128 };
            }
        }
    }

    /// Stops a container that failed its liveness or startup probe (`kind`: "Liveness"
    /// or "Startup", `kind_lc` the same in lower case), with the kubelet's events.
    async fn kill_unhealthy(
        &mut self,
        rt: &Runtime,
        name: &str,
        kind: &str,
        kind_lc: &str,
        msg: &str,
    ) {
        let grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .unwrap_or(30)
            .max(0) as u64;
        self.event(
            "Warning",
            "Unhealthy",
            format!("{kind} probe failed: {msg}"),
        );
        self.event(
            "Normal",
            "Killing",
            format!("Container {name} failed {kind_lc} probe, will be restarted"),
        );
        let Some(c) = self.ctrs.get_mut(name) else {
            return;
        };
        c.stop_watching();
        let Some(id) = c.id.clone() else { return };
        let code = match rt.stop(&id, Duration::from_secs(grace)).await {
            Ok(code) => code as i32,
            Err(e) => {
                tracing::warn!("stopping unhealthy container {id}: {e}");
                137
            }
        };
        c.observed = Observed::Exited { code };
        c.finished_at = Some(now());
    }

    /// The image per pull policy, pulled with the pod's imagePullSecrets (and its
    /// ServiceAccount's): each matching login in turn, anonymously when none matches.
    async fn ensure_image(
        &self,
        rt: &Runtime,
        image: &str,
        policy: PullPolicy,
    ) -> Result<ImageInfo, RuntimeError> {
        let insecure = &self.k.cfg.insecure_registries;
        if policy != PullPolicy::Always
            && let Some(info) = rt.image(image).await?
        {
            return Ok(info);
        }
        if policy == PullPolicy::Never {
            return Err(RuntimeError::ImageNotPresent(image.to_string()));
        }
        let (ring, missing) = credentials::pod_keyring(&self.k.client, &self.pod).await;
        if !missing.is_empty() {
            self.event(
                "Warning",
                "FailedToRetrieveImagePullSecret",
                format!(
                    "Unable to retrieve some image pull secrets ({}); attempting to pull the image may not succeed.",
                    missing.join(", ")
                ),
            );
        }
        let mut last = None;
        for cred in credentials::lookup(&ring, image) {
            match rt
                .pull_with_auth(image, insecure, &cred.registry_auth())
                .await
            {
                Ok(info) => return Ok(info),
                Err(e) => {
                    tracing::info!(pod = %self.name(), "pull of {image} with the login of secret {}: {e}", cred.secret);
                    last = Some(e);
                }
            }
        }
        match last {
            Some(e) => Err(e),
            None => rt.pull(image, insecure).await,
        }
    }

    /// Starts (or restarts) one container, honouring backoffs.
    async fn start(&mut self, rt: &Runtime, spec: &Container, init: bool) {
        let name = spec.name.clone();
        let pod_desc = format!("{}_{}({})", self.name(), self.ns(), self.uid);
        let image = spec.image.clone().unwrap_or_default();
        let nowi = Instant::now();
        let c = self.ctrs.entry(name.clone()).or_default();
        if let Some(until) = c.backoff_until
            && nowi < until
        {
            if c.id.is_some() {
                c.waiting = Some((
                    "CrashLoopBackOff".into(),
                    format!(
                        "back-off {}s restarting failed container={name} pod={pod_desc}",
                        c.restart_delay.as_secs()
                    ),
                ));
            }
            self.note_wake(until);
            return;
        }
        if let Some(until) = c.pull_backoff_until
            && nowi < until
        {
            let err = c.waiting.as_ref().map(|w| w.1.clone()).unwrap_or_default();
            let err = err
                .strip_prefix(&format!("Back-off pulling image \"{image}\": "))
                .map(str::to_string)
                .unwrap_or(err);
            c.waiting = Some((
                "ImagePullBackOff".into(),
                format!("Back-off pulling image \"{image}\": {err}"),
            ));
            self.note_wake(until);
            return;
        }
        if image.is_empty() {
            c.waiting = Some(("InvalidImageName".into(), "no image given".into()));
            return;
        }
        // Image.
        let policy = pull_policy(spec);
        let local = rt.image(&image).await.ok().flatten();
        let present = local.is_some();
        if policy == PullPolicy::Always || !present {
            // No start slot while pulling: other pods' starts do not wait for a registry.
            self.slot = None;
            self.event("Normal", "Pulling", format!("Pulling image \"{image}\""));
            if self.last_status.is_none() {
                // Show ContainerCreating while the image is pulled (with the image at
                // hand, the first status written is the one after the start).
                self.write_status().await;
            }
        }
        let t = Instant::now();
        let pulled = match local {
            Some(info) if policy != PullPolicy::Always => Ok(info),
            _ => self.ensure_image(rt, &image, policy).await,
        };
        let c = self.ctrs.entry(name.clone()).or_default();
        let info = match pulled {
            Ok(info) => {
                c.pull_delay = Duration::ZERO;
                c.pull_backoff_until = None;
                let repo = info
                    .name
                    .rsplit_once(':')
                    .filter(|(_, tag)| !tag.contains('/'))
                    .map(|(r, _)| r.to_string())
                    .unwrap_or(info.name.clone());
                c.image_id = format!("{repo}@{}", info.digest);
                if policy == PullPolicy::Always || !present {
                    self.event(
                        "Normal",
                        "Pulled",
                        format!(
                            "Successfully pulled image \"{image}\" in {}ms",
                            t.elapsed().as_millis()
                        ),
                    );
                }
                info
            }
            Err(e) => {
                let reason = match &e {
                    RuntimeError::InvalidImageName { .. } => "InvalidImageName",
                    RuntimeError::ImageNotPresent(_) => "ErrImageNeverPull",
                    _ => "ErrImagePull",
                };
                let msg = e.to_string();
                c.pull_delay = if c.pull_delay.is_zero() {
                    BACKOFF_START
                } else {
                    (c.pull_delay * 2).min(BACKOFF_MAX)
                };
                let until = Instant::now() + c.pull_delay;
                c.pull_backoff_until = Some(until);
                c.waiting = Some((reason.into(), msg.clone()));
                self.note_wake(until);
                self.event(
                    "Warning",
                    "Failed",
                    format!("Failed to pull image \"{image}\": {msg}"),
                );
                self.event("Warning", "Failed", format!("Error: {reason}"));
                return;
            }
        };
        // Environment, volumes.
        let pod_ip = self
            .net
            .as_ref()
            .map(|n| n.ip.to_string())
            .unwrap_or_default();
        let fields = PodFields {
            pod_ip,
            host_ip: self.k.cfg.node_ip.to_string(),
            node_name: self.k.cfg.node_name.clone(),
        };
        let env = match env::resolve(&self.k.client, &self.pod, spec, &fields).await {
            Ok(e) => e,
            Err(m) => {
                let c = self.ctrs.entry(name.clone()).or_default();
                c.waiting = Some(("CreateContainerConfigError".into(), m.clone()));
                self.event("Warning", "Failed", format!("Error: {m}"));
                return;
            }
        };
        let mounts = match self.mounts(spec) {
            Ok(m) => m,
            Err(m) => {
                let c = self.ctrs.entry(name.clone()).or_default();
                c.waiting = Some(("CreateContainerConfigError".into(), m.clone()));
                self.event("Warning", "Failed", format!("Error: {m}"));
                return;
            }
        };
        let vars: BTreeMap<String, String> = env.iter().cloned().collect();
        let hostname = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .unwrap_or_else(|| self.name())
            .chars()
            .take(63)
            .collect::<String>();
        let netns_path = self.net.as_ref().map(|n| n.netns_path.clone());
        let log_dir = self.log_dir().join(&name);
        let c = self.ctrs.entry(name.clone()).or_default();
        // Replace the previous attempt.
        let restarting = c.id.is_some();
        let mut attempt = c.attempt;
        if let Some(old) = c.id.clone() {
            if let Observed::Exited { code } = c.observed {
                c.last_terminated = Some(c.terminated(code));
            }
            if c.ran_since
                .is_some_and(|s| s.elapsed() > BACKOFF_RESET_AFTER)
            {
                c.restart_delay = Duration::ZERO;
            }
            c.stop_watching();
            if let Err(e) = rt.delete(&old).await {
                tracing::warn!("removing container {old}: {e}");
            }
            c.id = None;
            attempt += 1;
        }
        let id = format!("{}-{name}-{attempt}", uid_prefix(&self.uid));
        let _ = rt.delete(&id).await;
        let _ = std::fs::create_dir_all(&log_dir);
        // The log of this attempt and the previous one are kept (as the kubelet keeps one
        // dead container per container).
        if let Some(old) = attempt.checked_sub(2) {
            let old = log_dir.join(format!("{old}.log"));
            for f in cri_log::copier::rotated_files(&old) {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_file(old);
        }
        let log_file = log_dir.join(format!("{attempt}.log"));
        let io = match cri_log::copier_program() {
            Ok(exe) => TaskIo::Uri(cri_log::copier_uri(
                &exe,
                &log_file,
                self.k.cfg.container_log,
            )),
            Err(e) => {
                tracing::warn!("no log copier ({e}); raw logs in {}", log_file.display());
                TaskIo::File(log_file)
            }
        };
        let mut cfg = ContainerConfig::new(
            id.clone(),
            image.clone(),
            rt.cgroups_path(&format!("pod-{}", self.uid), &name),
            io,
        );
        cfg.command = spec
            .command
            .iter()
            .flatten()
            .map(|s| env::expand(s, &vars))
            .collect();
        cfg.args = spec
            .args
            .iter()
            .flatten()
            .map(|s| env::expand(s, &vars))
            .collect();
        cfg.env = env;
        cfg.working_dir = spec.working_dir.clone().filter(|w| !w.is_empty());
        cfg.hostname = Some(hostname);
        cfg.netns_path = netns_path;
        cfg.mounts = mounts;
        cfg.resources = resources(spec);
        let started_at = now();
        cfg.labels = HashMap::from([
            (LABEL_POD_UID.to_string(), self.uid.clone()),
            (LABEL_POD_NAME.to_string(), self.name()),
            (LABEL_POD_NAMESPACE.to_string(), self.ns()),
            (LABEL_CONTAINER.to_string(), name.clone()),
            (LABEL_ATTEMPT.to_string(), attempt.to_string()),
            (LABEL_INIT.to_string(), init.to_string()),
            (LABEL_STARTED_AT.to_string(), started_at.0.to_string()),
        ]);
        // All containers of the pod in one runc shim (as the CRI plugin does per sandbox).
        cfg.shim_group = Some(format!("skiff-pod-{}", self.uid));
        self.take_slot().await;
        let t = Instant::now();
        let r = rt.run_container_from(&cfg, &info).await;
        self.timing.create_and_start += t.elapsed();
        let c = self.ctrs.entry(name.clone()).or_default();
        c.attempt = attempt;
        if restarting || r.is_err() {
            // Backoff before the next restart.
            c.restart_delay = if c.restart_delay.is_zero() {
                BACKOFF_START
            } else {
                (c.restart_delay * 2).min(BACKOFF_MAX)
            };
            c.backoff_until = Some(Instant::now() + c.restart_delay);
        }
        match r {
            Ok(pid) => {
                c.id = Some(id.clone());
                c.started_ok = false;
                c.started_at = Some(started_at);
                c.finished_at = None;
                c.ran_since = Some(Instant::now());
                c.observed = Observed::Running { pid };
                self.timing.containers_started += 1;
                c.waiting = None;
                self.event("Normal", "Created", format!("Created container {name}"));
                self.event("Normal", "Started", format!("Started container {name}"));
            }
            Err(e) => {
                let msg = e.to_string();
                c.waiting = Some(("RunContainerError".into(), msg.clone()));
                c.observed = Observed::Absent;
                let until = c.backoff_until;
                if let Some(u) = until {
                    self.note_wake(u);
                }
                self.event("Warning", "Failed", format!("Error: {msg}"));
            }
        }
    }

    /// Exit waiters and probers for running containers.
    fn watch_running(&mut self, rt: &Runtime) {
        let Some(net) = self.net.clone() else { return };
        let spec = self.pod.spec.clone().unwrap_or_default();
        let all: Vec<(&Container, bool)> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| (c, true))
            .chain(spec.containers.iter().map(|c| (c, false)))
            .collect();
        for (cs, init) in all {
            let Some(c) = self.ctrs.get_mut(&cs.name) else {
                continue;
            };
            let (Some(id), Observed::Running { pid }) = (c.id.clone(), c.observed) else {
                continue;
            };
            let target = ProbeTarget {
                pod_ip: std::net::IpAddr::V4(net.ip),
                pid,
            };
            if c.watched.as_deref() == Some(id.as_str()) {
                // The startupProbe succeeded: it stops, liveness and readiness begin.
                if c.startup.as_ref().is_some_and(|p| p.ok()) {
                    c.startup = None;
                    c.started_ok = true;
                    start_probers(c, cs, &target, &self.wake);
                }
                continue;
            }
            c.stop_watching();
            c.watched = Some(id.clone());
            let wake = self.wake.clone();
            let rt2 = rt.clone();
            let wid = id.clone();
            c.waiter = Some(Waiter(tokio::spawn(async move {
                let _ = rt2.wait(&wid).await;
                wake.notify_one();
            })));
            if init {
                continue;
            }
            match &cs.startup_probe {
                Some(p) if !c.started_ok => {
                    c.startup = Some(Prober::start(
                        p.clone(),
                        cs.clone(),
                        target.clone(),
                        false,
                        self.wake.clone(),
                    ));
                }
                _ => {
                    c.started_ok = true;
                    start_probers(c, cs, &target, &self.wake);
                }
            }
        }
    }

    fn pod_dir(&self) -> PathBuf {
        self.k.cfg.root_dir.join("pods").join(&self.uid)
    }

    /// `<pod-logs-dir>/<ns>_<pod>_<uid>` (the CRI layout, see [`cri_log`]).
    fn log_dir(&self) -> PathBuf {
        self.k
            .cfg
            .pod_logs_dir
            .join(format!("{}_{}_{}", self.ns(), self.name(), self.uid))
    }

    /// Bind mounts for the container's volumeMounts (emptyDir, hostPath, configMap and
    /// secret volumes; the latter written once per pod) plus /etc/hosts and /etc/hostname.
    fn mounts(&self, spec: &Container) -> Result<Vec<Mount>, String> {
        let mut out = vec![];
        let pod_dir = self.pod_dir();
        let vols = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        let bind = |src: PathBuf, dst: &str, ro: bool| -> Result<Mount, String> {
            let mut opts = vec!["rbind".to_string(), "rprivate".to_string()];
            opts.push(if ro { "ro" } else { "rw" }.to_string());
            MountBuilder::default()
                .destination(PathBuf::from(dst))
                .typ("bind")
                .source(src)
                .options(opts)
                .build()
                .map_err(|e| e.to_string())
        };
        // /etc/hosts and /etc/hostname, as the kubelet writes them.
        let etc = pod_dir.join("etc");
        std::fs::create_dir_all(&etc).map_err(|e| format!("{}: {e}", etc.display()))?;
        let hostname = self.name();
        let ip = self
            .net
            .as_ref()
            .map(|n| n.ip.to_string())
            .unwrap_or_default();
        std::fs::write(
            etc.join("hosts"),
            format!("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{ip}\t{hostname}\n"),
        )
        .map_err(|e| e.to_string())?;
        std::fs::write(etc.join("hostname"), format!("{hostname}\n")).map_err(|e| e.to_string())?;
        out.push(bind(etc.join("hosts"), "/etc/hosts", false)?);
        out.push(bind(etc.join("hostname"), "/etc/hostname", false)?);
        for vm in spec.volume_mounts.iter().flatten() {
            let v = vols
                .iter()
                .find(|v| v.name == vm.name)
                .ok_or_else(|| format!("volume {:?} not found in the pod spec", vm.name))?;
            let dir = pod_dir.join("volumes").join(&v.name);
            let src = if v.empty_dir.is_some() {
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                dir
            } else if let Some(h) = &v.host_path {
                let p = PathBuf::from(&h.path);
                if matches!(h.type_.as_deref(), Some("DirectoryOrCreate")) {
                    std::fs::create_dir_all(&p).map_err(|e| e.to_string())?;
                }
                if !p.exists() {
                    return Err(format!("hostPath {} does not exist", p.display()));
                }
                p
            } else if v.config_map.is_some() || v.secret.is_some() {
                if !dir.exists() {
                    return Err(format!("volume {:?} is not ready yet", v.name));
                }
                dir
            } else {
                return Err(format!("volume {:?}: unsupported volume type", v.name));
            };
            let src = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
                Some(sp) if !sp.contains("..") => {
                    let p = src.join(sp);
                    if !p.exists() {
                        std::fs::create_dir_all(&p).map_err(|e| e.to_string())?;
                    }
                    p
                }
                Some(sp) => return Err(format!("invalid subPath {sp:?}")),
                None => src,
            };
            out.push(bind(src, &vm.mount_path, vm.read_only.unwrap_or(false))?);
        }
        Ok(out)
    }

    /// Writes configMap and secret volumes (before containers start).
    async fn prepare_volumes(&self) -> Result<(), String> {
        let vols = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.clone())
            .unwrap_or_default();
        for v in vols {
            let dir = self.pod_dir().join("volumes").join(&v.name);
            let data: Option<VolumeData> = if let Some(cm) = &v.config_map {
                let got = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
                    self.k.client.clone(),
                    &self.ns(),
                )
                .get_opt(&cm.name)
                .await
                .map_err(|e| e.to_string())?;
                match got {
                    Some(o) => {
                        let mut d: BTreeMap<String, Vec<u8>> = o
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes()))
                            .collect();
                        for (k, v) in o.binary_data.unwrap_or_default() {
                            d.insert(k, v.0);
                        }
                        Some((
                            d,
                            cm.items.as_ref().map(|i| {
                                i.iter().map(|i| (i.key.clone(), i.path.clone())).collect()
                            }),
                        ))
                    }
                    None if cm.optional.unwrap_or(false) => Some((BTreeMap::new(), None)),
                    None => return Err(format!("configmap {:?} not found", cm.name)),
                }
            } else if let Some(s) = &v.secret {
                let name = s.secret_name.clone().unwrap_or_default();
                let got = Api::<k8s_openapi::api::core::v1::Secret>::namespaced(
                    self.k.client.clone(),
                    &self.ns(),
                )
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?;
                match got {
                    Some(o) => {
                        let mut d: BTreeMap<String, Vec<u8>> = o
                            .data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0))
                            .collect();
                        for (k, v) in o.string_data.unwrap_or_default() {
                            d.insert(k, v.into_bytes());
                        }
                        Some((
                            d,
                            s.items.as_ref().map(|i| {
                                i.iter().map(|i| (i.key.clone(), i.path.clone())).collect()
                            }),
                        ))
                    }
                    None if s.optional.unwrap_or(false) => Some((BTreeMap::new(), None)),
                    None => return Err(format!("secret {name:?} not found")),
                }
            } else {
                None
            };
            let Some((data, items)) = data else { continue };
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let files: Vec<(String, Vec<u8>)> = match items {
                Some(items) => items
                    .into_iter()
                    .filter_map(|(k, p)| data.get(&k).map(|d| (p, d.clone())))
                    .collect(),
                None => data.into_iter().collect(),
            };
            for (p, d) in files {
                if p.contains("..") || p.starts_with('/') {
                    return Err(format!("invalid path {p:?} in volume {:?}", v.name));
                }
                let f = dir.join(&p);
                if let Some(parent) = f.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                std::fs::write(&f, d).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    fn container_status(&self, cs: &Container, init: bool, initialized: bool) -> ContainerStatus {
        let policy = self.policy();
        let empty = Ctr::default();
        let c = self.ctrs.get(&cs.name).unwrap_or(&empty);
        let mut last_state = c.last_terminated.clone().map(|t| K8sState {
            terminated: Some(t),
            ..Default::default()
        });
        let waiting = |reason: &str, message: &str| K8sState {
            waiting: Some(ContainerStateWaiting {
                reason: Some(reason.into()),
                message: (!message.is_empty()).then(|| message.to_string()),
            }),
            ..Default::default()
        };
        let terminating = self.pod.metadata.deletion_timestamp.is_some();
        let (state, ready, started) = match c.observed {
            Observed::Running { .. } | Observed::Created => {
                // With a startupProbe: started once it succeeded (kept across agent
                // restarts through the API's containerStatuses[].started).
                let started = init
                    || cs.startup_probe.is_none()
                    || c.started_ok
                    || c.startup.as_ref().is_some_and(|p| p.ok());
                let ready = !init
                    && !terminating
                    && started
                    && c.readiness.as_ref().map(|p| p.ok()).unwrap_or(
                        // No probe: ready once running. A probe not started yet: not ready,
                        // unless adopted as ready after an agent restart.
                        cs.readiness_probe.is_none() || c.adopted_ready,
                    );
                (
                    K8sState {
                        running: Some(ContainerStateRunning {
                            started_at: c.started_at.clone(),
                        }),
                        ..Default::default()
                    },
                    ready,
                    started,
                )
            }
            Observed::Exited { code } => {
                let term = c.terminated(code);
                let restarts = self.terminal.is_none()
                    && should_restart(&policy, code)
                    && !(init && code == 0)
                    && !terminating;
                if restarts {
                    last_state = Some(K8sState {
                        terminated: Some(term),
                        ..Default::default()
                    });
                    let (r, m) = c
                        .waiting
                        .clone()
                        .unwrap_or_else(|| ("CrashLoopBackOff".into(), String::new()));
                    (waiting(&r, &m), false, false)
                } else {
                    (
                        K8sState {
                            terminated: Some(term),
                            ..Default::default()
                        },
                        false,
                        false,
                    )
                }
            }
            Observed::Absent => {
                let (r, m) = match (&c.waiting, &self.blocked) {
                    (Some(w), _) => w.clone(),
                    (None, Some(b)) => ("ContainerCreating".to_string(), b.clone()),
                    (None, None) if !init && !initialized => {
                        ("PodInitializing".to_string(), String::new())
                    }
                    (None, None) => ("ContainerCreating".to_string(), String::new()),
                };
                (waiting(&r, &m), false, false)
            }
        };
        ContainerStatus {
            name: cs.name.clone(),
            image: cs.image.clone().unwrap_or_default(),
            image_id: c.image_id.clone(),
            container_id: c.id.as_ref().map(|i| format!("containerd://{i}")),
            ready,
            started: Some(started),
            restart_count: c.attempt as i32,
            state: Some(state),
            last_state,
            ..Default::default()
        }
    }

    fn condition(
        &mut self,
        type_: &str,
        ok: bool,
        reason: Option<&str>,
        message: Option<String>,
    ) -> PodCondition {
        let status = if ok { "True" } else { "False" }.to_string();
        let since = match self.cond_since.get(type_) {
            Some((s, t)) if *s == status => t.clone(),
            _ => {
                // Keep the API's transition time when it matches (agent restart).
                let api = self
                    .pod
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .and_then(|c| c.iter().find(|c| c.type_ == type_))
                    .filter(|c| c.status == status)
                    .and_then(|c| c.last_transition_time.clone());
                let t = api.unwrap_or_else(now);
                self.cond_since
                    .insert(type_.into(), (status.clone(), t.clone()));
                t
            }
        };
        PodCondition {
            type_: type_.into(),
            status,
            last_transition_time: Some(since),
            reason: if ok { None } else { reason.map(str::to_string) },
            message: if ok { None } else { message },
            ..Default::default()
        }
    }

    async fn write_status(&mut self) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        let inits = spec.init_containers.clone().unwrap_or_default();
        let init_done = inits.iter().all(|ic| {
            self.ctrs
                .get(&ic.name)
                .is_some_and(|c| c.observed == Observed::Exited { code: 0 })
        });
        let init_statuses: Vec<ContainerStatus> = inits
            .iter()
            .map(|c| self.container_status(c, true, init_done))
            .collect();
        let statuses: Vec<ContainerStatus> = spec
            .containers
            .iter()
            .map(|c| self.container_status(c, false, init_done))
            .collect();
        let policy = self.policy();
        let ph = self
            .terminal
            .unwrap_or_else(|| phase(&policy, &init_statuses, &statuses));
        if matches!(ph, "Succeeded" | "Failed") && self.terminal.is_none() {
            tracing::info!(pod = %self.name(), "pod is {ph}");
            self.terminal = Some(ph);
        }
        let not_ready: Vec<String> = statuses
            .iter()
            .filter(|s| !s.ready)
            .map(|s| s.name.clone())
            .collect();
        let incomplete: Vec<String> = init_statuses
            .iter()
            .filter(|s| {
                s.state
                    .as_ref()
                    .and_then(|s| s.terminated.as_ref())
                    .is_none_or(|t| t.exit_code != 0)
            })
            .map(|s| s.name.clone())
            .collect();
        let completed = matches!(ph, "Succeeded" | "Failed");
        // Ready and ContainersReady say the same thing about the containers.
        let ready = not_ready.is_empty() && !completed;
        let ready_reason = if completed {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        let ready_message = format!("containers with unready status: [{}]", not_ready.join(" "));
        let conditions = vec![
            self.condition("PodReadyToStartContainers", self.net.is_some(), None, None),
            self.condition(
                "Initialized",
                init_done,
                Some("ContainersNotInitialized"),
                Some(format!(
                    "containers with incomplete status: [{}]",
                    incomplete.join(" ")
                )),
            ),
            self.condition(
                "Ready",
                ready,
                Some(ready_reason),
                Some(ready_message.clone()),
            ),
            self.condition(
                "ContainersReady",
                ready,
                Some(ready_reason),
                Some(ready_message),
            ),
            self.condition("PodScheduled", true, None, None),
        ];
        let host_ip = self.k.cfg.node_ip.to_string();
        let pod_ip = self.net.as_ref().map(|n| n.ip.to_string());
        let status = PodStatus {
            phase: Some(ph.into()),
            conditions: Some(conditions),
            host_ip: Some(host_ip.clone()),
            host_ips: Some(vec![HostIP { ip: host_ip }]),
            pod_ip: pod_ip.clone(),
            pod_ips: pod_ip.map(|ip| vec![PodIP { ip }]),
            start_time: Some(self.start_time.clone()),
            init_container_statuses: (!init_statuses.is_empty()).then_some(init_statuses),
            container_statuses: Some(statuses),
            qos_class: self.pod.status.as_ref().and_then(|s| s.qos_class.clone()),
            ..Default::default()
        };
        let body = json!({ "status": status });
        if self.last_status.as_ref() == Some(&body) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.k.client.clone(), &self.ns());
        match api
            .patch_status(&self.name(), &PatchParams::default(), &Patch::Merge(&body))
            .await
        {
            Ok(_) => self.last_status = Some(body),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                tracing::warn!(pod = %self.name(), "writing pod status: {e}");
                self.last_status = None;
            }
        }
    }

    /// Graceful stop and cleanup; with `api_delete` the pod object is then removed.
    async fn terminate(&mut self, api_delete: bool) {
        let grace = self.grace();
        tracing::info!(pod = %self.name(), "stopping pod (grace {grace:?})");
        for c in self.ctrs.values_mut() {
            c.stop_watching();
        }
        // The runtime must answer for containers to be stopped: wait for it.
        let rt = loop {
            if let Some(rt) = self.k.rt().await {
                break rt;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        };
        let running: Vec<(String, String)> = self
            .ctrs
            .iter()
            .filter(|(_, c)| matches!(c.observed, Observed::Running { .. } | Observed::Created))
            .filter_map(|(n, c)| c.id.clone().map(|id| (n.clone(), id)))
            .collect();
        for (n, _) in &running {
            self.event("Normal", "Killing", format!("Stopping container {n}"));
        }
        let stops = running.iter().map(|(_, id)| {
            let rt = rt.clone();
            let id = id.clone();
            async move {
                if let Err(e) = rt.stop(&id, grace).await
                    && !e.is_not_found()
                {
                    tracing::warn!("stopping container {id}: {e}");
                }
            }
        });
        futures::future::join_all(stops).await;
        // Every container of this pod, also ones this worker never knew.
        let mut ids: Vec<String> = self.ctrs.values().filter_map(|c| c.id.clone()).collect();
        if let Ok(list) = rt.list().await {
            ids.extend(
                list.into_iter()
                    .filter(|c| c.labels.get(LABEL_POD_UID) == Some(&self.uid))
                    .map(|c| c.id),
            );
        }
        ids.sort();
        ids.dedup();
        for id in ids {
            if let Err(e) = rt.delete(&id).await {
                tracing::warn!("removing container {id}: {e}");
            }
        }
        self.ctrs.clear();
        let k = self.k.clone();
        let uid = self.uid.clone();
        match tokio::task::spawn_blocking(move || k.networks.teardown(&uid)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(pod = %self.name(), "network teardown: {e}"),
            Err(e) => tracing::warn!(pod = %self.name(), "network teardown task: {e}"),
        }
        if let Err(e) = super::runtime::remove_cgroup_tree(&pod_cgroup(&self.k, &self.uid)) {
            tracing::warn!(pod = %self.name(), "removing pod cgroup: {e}");
        }
        let _ = std::fs::remove_dir_all(self.pod_dir());
        let _ = std::fs::remove_dir_all(self.log_dir());
        if api_delete {
            let api: Api<Pod> = Api::namespaced(self.k.client.clone(), &self.ns());
            let dp = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..Default::default()
            };
            match api.delete(&self.name(), &dp).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => tracing::warn!(pod = %self.name(), "deleting pod: {e}"),
            }
        }
        tracing::info!(pod = %self.name(), "pod stopped and cleaned up");
    }
}
