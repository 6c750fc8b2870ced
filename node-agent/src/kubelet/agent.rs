//! The kubelet's main loop.
//!
//! Where the data comes from: a kube-rs watcher over the pods bound to this node
//! (`fieldSelector=spec.nodeName=<node>`), and containerd (what runs).
//! What it decides: one [`super::pod_worker`] task per pod uid, fed the newest Pod
//! object; the worker reconciles desired (spec) with actual (containers) level-triggered.
//! On start it lists containerd's containers once: those of pods that still exist are
//! handed to their workers (adopted, not restarted); after the first full list of pods,
//! containers, networks and cgroups of pods that are gone are removed.
//! Where it writes: pods/status, pod deletion (grace 0, after the containers stopped),
//! Node status and Lease ([`super::node`]).

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use k8s_openapi::{api::core::v1::Pod, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{Mutex, RwLock, watch};

use crate::cni::{
    PodNetworkMode,
    datapath::{DEFAULT_VNI, Datapath, DatapathConfig},
    network::{Ipv4Net, PodNetworks},
    node_routes,
};
use crate::proxy::{ProxyMode, ServiceProxy, reconciler::Sink};

use super::{
    node,
    pod_worker::{self, LABEL_POD_UID},
    runtime::{ContainerInfo, Runtime},
};

/// The agent's settings (flags of `skiff-agent`).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub containerd_address: PathBuf,
    /// State: IP allocations, pod files.
    pub root_dir: PathBuf,
    /// Container logs in the CRI layout (`--pod-logs-dir`), see [`super::cri_log`].
    pub pod_logs_dir: PathBuf,
    /// Registries reached over plain http (`127.0.0.1:5000`).
    pub insecure_registries: Vec<String>,
    /// The node's InternalIP (and pods' hostIP).
    pub node_ip: Ipv4Addr,
    pub lease_renew_interval: Duration,
    pub lease_duration_seconds: i32,
    /// How often each pod is re-synced without an event.
    pub resync: Duration,
    /// The kubelet API port (containerLogs, exec); 0 = any free port. After binding it
    /// holds the real port, which the Node publishes in status.daemonEndpoints.
    pub port: u16,
    /// Address the kubelet API listens on; None = the node IP.
    pub bind_address: Option<std::net::IpAddr>,
    /// Static pod manifests (`--manifest-dir`), see [`super::static_pods`].
    pub manifest_dir: Option<PathBuf>,
    /// How pods are connected (`--pod-network`).
    pub pod_network: PodNetworkMode,
    /// bpffs directory of the pinned maps; default /sys/fs/bpf/skiff/<node>.
    pub bpffs_dir: PathBuf,
    /// How Services are implemented (`--proxy-mode`).
    pub proxy_mode: ProxyMode,
    /// Container log rotation (`--container-log-max-size`, `--container-log-max-files`),
    /// done by each container's log copier, see [`super::cri_log`].
    pub container_log: super::cri_log::Rotation,
    /// The OCI runtime the shim runs (`--oci-runtime`, resolved).
    pub oci_runtime: super::oci_runtime::OciRuntime,
}

impl AgentConfig {
    pub fn new(node_name: &str, containerd_address: PathBuf) -> Self {
        AgentConfig {
            node_name: node_name.into(),
            kubeconfig: None,
            containerd_address,
            root_dir: PathBuf::from("/var/lib/skiff/agent").join(node_name),
            pod_logs_dir: PathBuf::from("/var/log/pods"),
            insecure_registries: vec![],
            node_ip: node::DEFAULT_NODE_IP,
            lease_renew_interval: Duration::from_secs(10),
            lease_duration_seconds: 40,
            resync: Duration::from_secs(5),
            port: 10250,
            bind_address: None,
            manifest_dir: None,
            pod_network: PodNetworkMode::Ebpf,
            bpffs_dir: PathBuf::from(crate::ebpf::bpffs::DEFAULT_MOUNT)
                .join("skiff")
                .join(node_name),
            proxy_mode: ProxyMode::Ebpf,
            container_log: super::cri_log::Rotation::default(),
            oci_runtime: Default::default(),
        }
    }
}

/// What every component of the agent shares.
pub struct Kubelet {
    pub cfg: AgentConfig,
    pub client: Client,
    /// None until containerd answered once.
    pub runtime: RwLock<Option<Runtime>>,
    pub runtime_ok: AtomicBool,
    pub networks: PodNetworks,
    pub pod_cidr: watch::Receiver<Option<Ipv4Net>>,
    pub pod_cidr_tx: watch::Sender<Option<Ipv4Net>>,
    /// Containers found at start, by pod uid, until the pod's worker takes them.
    pub adoptable: Mutex<HashMap<String, Vec<ContainerInfo>>>,
    /// Pods building their network or creating containers at once (FIFO): many pods at
    /// once then start one after the other at full speed instead of all together at the
    /// end, each waiting on the others for CPU, netlink and containerd.
    /// A pod holds its slot from its network to its containers' start, so the first
    /// pods are Running before the last ones begin.
    pub start_slots: Arc<tokio::sync::Semaphore>,
}

/// How many pods start at once: twice the CPUs (the work is mostly runc, the shim, `ip`
/// and containerd's fsyncs).
fn start_slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()) * 2
}

pub fn now_ts() -> Timestamp {
    let micros = chrono::Utc::now().timestamp_micros();
    Timestamp::from_microsecond(micros).unwrap_or(Timestamp::UNIX_EPOCH)
}

pub fn now() -> Time {
    Time(now_ts())
}

impl Kubelet {
    /// The runtime, if containerd is connected and answered the last health check.
    pub async fn rt(&self) -> Option<Runtime> {
        if !self.runtime_ok.load(Ordering::SeqCst) {
            return None;
        }
        self.runtime.read().await.clone()
    }

    /// Connects to containerd when not connected yet.
    pub async fn reconnect_runtime_if_needed(&self) {
        if self.runtime.read().await.is_some() {
            return;
        }
        match tokio::time::timeout(
            Duration::from_secs(5),
            Runtime::connect(&self.cfg.containerd_address, &self.cfg.node_name),
        )
        .await
        {
            Ok(Ok(rt)) => {
                tracing::info!(
                    "connected to containerd at {}",
                    self.cfg.containerd_address.display()
                );
                *self.runtime.write().await =
                    Some(rt.with_oci_runtime(self.cfg.oci_runtime.clone()));
            }
            Ok(Err(e)) => tracing::debug!("containerd: {e}"),
            Err(_) => tracing::debug!("containerd: connect timed out"),
        }
    }
}

async fn client_from(cfg: &AgentConfig) -> anyhow::Result<Client> {
    let config = match &cfg.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| anyhow::anyhow!("reading kubeconfig {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs the agent until the process ends. `on_ready` is called once the Node is
/// registered.
pub async fn run(mut cfg: AgentConfig, on_ready: impl FnOnce()) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The data path first: an unusable kernel or node refuses the start before anything
    // (Node object, containers) exists.
    let datapath = match cfg.pod_network {
        PodNetworkMode::Ebpf => {
            let dp_cfg = DatapathConfig {
                node_ip: cfg.node_ip,
                pin_dir: cfg.bpffs_dir.clone(),
                vni: DEFAULT_VNI,
                object: Default::default(),
                stack_only: cfg.proxy_mode == ProxyMode::Iptables,
            };
            let node = cfg.node_name.clone();
            let mode = cfg.proxy_mode;
            let (dp, proxy) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let dp = Datapath::start(&dp_cfg)?;
                let sink = match mode {
                    ProxyMode::Ebpf => Sink::Ebpf(Arc::new(ServiceProxy::start(&dp, &node)?)),
                    ProxyMode::Iptables => {
                        crate::proxy::detach_pinned_links(dp.pin_dir());
                        Sink::Iptables {
                            node_ip: dp.node_ip(),
                        }
                    }
                };
                Ok((dp, sink))
            })
            .await??;
            Some((Arc::new(dp), proxy))
        }
        PodNetworkMode::HostRoutes => None,
    };
    let (datapath, proxy) = match datapath {
        Some((d, p)) => (Some(d), Some(p)),
        None => (None, None),
    };
    std::fs::create_dir_all(&cfg.root_dir)?;
    let listener = super::server::bind(
        cfg.bind_address
            .unwrap_or(std::net::IpAddr::V4(cfg.node_ip)),
        cfg.port,
    )
    .await?;
    cfg.port = listener.local_addr()?.port();
    tracing::info!("kubelet API on https://{}", listener.local_addr()?);
    let client = client_from(&cfg).await?;
    let mut networks = PodNetworks::new(&cfg.root_dir, cfg.node_ip)?;
    if let Some(dp) = &datapath {
        networks = networks.with_datapath(dp.clone());
    }
    let (pod_cidr_tx, pod_cidr) = watch::channel(None);
    let k = Arc::new(Kubelet {
        cfg,
        client,
        runtime: RwLock::new(None),
        runtime_ok: AtomicBool::new(false),
        networks,
        pod_cidr,
        pod_cidr_tx,
        adoptable: Mutex::new(HashMap::new()),
        start_slots: Arc::new(tokio::sync::Semaphore::new(start_slots())),
    });

    k.reconnect_runtime_if_needed().await;
    let r = node::check_runtime(&k).await;
    let version = r.clone().unwrap_or_else(|_| "unknown".into());
    let health = node::health_of(&r);
    k.runtime_ok.store(health.ready, Ordering::SeqCst);
    // Containers that already run (an agent restart): adopted by their pods' workers.
    if let Some(rt) = k.rt().await {
        match rt.list().await {
            Ok(list) => {
                let mut by_pod: HashMap<String, Vec<ContainerInfo>> = HashMap::new();
                for c in list {
                    if let Some(uid) = c.labels.get(LABEL_POD_UID) {
                        by_pod.entry(uid.clone()).or_default().push(c);
                    }
                }
                tracing::info!("found containers of {} pods to adopt", by_pod.len());
                *k.adoptable.lock().await = by_pod;
            }
            Err(e) => tracing::warn!("listing containers: {e}"),
        }
    }
    node::register(&k, &health, &version).await?;
    // The podCIDR, if the node already has one (agent restart): pods adopted below need
    // it before their first sync.
    if let Ok(Some(n)) = Api::<k8s_openapi::api::core::v1::Node>::all(k.client.clone())
        .get_opt(&k.cfg.node_name)
        .await
        && let Some(cidr) = n
            .spec
            .and_then(|s| s.pod_cidr)
            .as_deref()
            .and_then(Ipv4Net::parse)
    {
        let _ = k.pod_cidr_tx.send(Some(cidr));
    }
    let server = k.clone();
    tokio::spawn(async move {
        if let Err(e) = super::server::serve(server, listener).await {
            tracing::error!("kubelet API server: {e}");
        }
    });
    on_ready();
    tokio::spawn(node::lease_loop(k.clone()));
    tokio::spawn(node::status_loop(k.clone(), health, version));
    tokio::spawn(super::static_pods::run(k.clone()));
    let Some(dp) = datapath else {
        return pod_loop(k).await;
    };
    tokio::spawn(node_routes::run(
        k.client.clone(),
        k.cfg.node_name.clone(),
        dp.clone(),
    ));
    if let Some(sink) = proxy {
        tokio::spawn(crate::proxy::reconciler::run(
            k.client.clone(),
            k.cfg.node_name.clone(),
            sink,
        ));
    }
    tokio::select! {
        r = pod_loop(k.clone()) => r,
        r = guard_pod_cidr(k, dp) => r,
    }
}

/// Stops the agent when the node's podCIDR overlaps the node network.
async fn guard_pod_cidr(k: Arc<Kubelet>, dp: Arc<Datapath>) -> anyhow::Result<()> {
    let mut cidr = k.pod_cidr.clone();
    loop {
        if let Some(c) = *cidr.borrow_and_update() {
            dp.check_pod_cidr(c)?;
        }
        if cidr.changed().await.is_err() {
            return Ok(());
        }
    }
}

struct WorkerHandle {
    tx: watch::Sender<Option<Pod>>,
    task: tokio::task::JoinHandle<()>,
}

/// Watches this node's pods and feeds one worker per pod uid.
async fn pod_loop(k: Arc<Kubelet>) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(k.client.clone());
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={}", k.cfg.node_name));
    let mut events = watcher(pods, wc).default_backoff().boxed();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let mut listing: Option<HashSet<String>> = None;
    let mut cleaned_orphans = false;
    while let Some(ev) = events.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!("pod watch: {e}");
                continue;
            }
        };
        workers.retain(|_, w| !w.task.is_finished());
        match ev {
            watcher::Event::Init => listing = Some(HashSet::new()),
            watcher::Event::InitApply(p) => {
                if let Some(l) = listing.as_mut() {
                    l.insert(p.uid().unwrap_or_default());
                }
                dispatch(&k, &mut workers, p);
            }
            watcher::Event::InitDone => {
                let live = listing.take().unwrap_or_default();
                // Pods that disappeared while we were not watching.
                for (uid, w) in &workers {
                    if !live.contains(uid) {
                        let _ = w.tx.send(None);
                    }
                }
                if !cleaned_orphans {
                    cleaned_orphans = true;
                    let k2 = k.clone();
                    tokio::spawn(async move { cleanup_orphans(&k2, &live).await });
                }
            }
            watcher::Event::Apply(p) => dispatch(&k, &mut workers, p),
            watcher::Event::Delete(p) => {
                let uid = p.uid().unwrap_or_default();
                if let Some(w) = workers.get(&uid) {
                    let _ = w.tx.send(None);
                }
            }
        }
    }
    Ok(())
}

fn dispatch(k: &Arc<Kubelet>, workers: &mut HashMap<String, WorkerHandle>, pod: Pod) {
    let uid = pod.uid().unwrap_or_default();
    // Mirror pods are run from their files (static_pods), not from the API.
    if uid.is_empty() || super::static_pods::is_mirror(&pod) {
        return;
    }
    if let Some(w) = workers.get(&uid) {
        let _ = w.tx.send(Some(pod));
        return;
    }
    let (tx, rx) = watch::channel(Some(pod));
    let task = tokio::spawn(pod_worker::run(k.clone(), uid.clone(), rx));
    workers.insert(uid, WorkerHandle { tx, task });
}

/// Removes what belongs to pods that no longer exist: containers (by label), pod
/// networks (by IP allocation) and pod cgroups under /skiff/<node>.
async fn cleanup_orphans(k: &Kubelet, live: &HashSet<String>) {
    // Static pods are not in the API under their own uid.
    let mut live = live.clone();
    live.extend(super::static_pods::uids(k));
    let live = &live;
    let orphans: Vec<(String, Vec<ContainerInfo>)> = {
        let mut a = k.adoptable.lock().await;
        let gone: Vec<String> = a.keys().filter(|u| !live.contains(*u)).cloned().collect();
        gone.into_iter()
            .filter_map(|u| a.remove(&u).map(|c| (u, c)))
            .collect()
    };
    if let Some(rt) = k.rt().await {
        for (uid, cs) in &orphans {
            for c in cs {
                tracing::info!("removing container {} of vanished pod {uid}", c.id);
                if let Err(e) = rt.delete(&c.id).await {
                    tracing::warn!("removing container {}: {e}", c.id);
                }
            }
        }
    }
    let mut uids: HashSet<String> = orphans.into_iter().map(|(u, _)| u).collect();
    for (_, uid) in k.networks.allocations() {
        if !live.contains(&uid) {
            uids.insert(uid);
        }
    }
    // Pod cgroups left without containers or network.
    for d in super::runtime::cgroup_dirs(&format!("/skiff/{}", k.cfg.node_name)) {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if let Some(uid) = e.file_name().to_str().and_then(|n| n.strip_prefix("pod-"))
                && !live.contains(uid)
            {
                uids.insert(uid.to_string());
            }
        }
    }
    for uid in uids {
        if let Err(e) = k.networks.teardown(&uid) {
            tracing::warn!("removing the network of vanished pod {uid}: {e}");
        }
        let _ = super::runtime::remove_cgroup_tree(&pod_worker::pod_cgroup(k, &uid));
    }
}
