//! The container runtime: containerd through its native gRPC API (containerd-client), one
//! containerd namespace per node (`skiff-<node>`), one cgroup parent per node
//! (`/skiff/<node>`).
//!
//! Pulling (containerd 1.6 has no transfer service, so this does what its client does):
//!   registry --(oci-client: manifest, config, layers)--> content store (Write, with the
//!   `containerd.io/gc.ref.*` labels that keep the chain alive) --> image record
//!   --> unpack: per layer Prepare(parent chain) -> diff Apply -> Commit(chainID).
//! Everything written during a pull belongs to a lease until the image record exists, so
//! containerd's garbage collector never sees it half-linked.
//!
//! Running: an OCI runtime spec (oci-spec) built from the image config and the container's
//! settings, a writable snapshot on top of the image's chain ID, a container record, then a
//! task through the shim (skiff's `containerd-shim-skiff-v1`, or containerd's runc v2
//! shim) whose stdout/stderr go to the log copier (`binary://` IO). The shim runs crun or
//! runc as the OCI runtime ([`super::oci_runtime`]).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use containerd_client::{
    services::v1::{
        self as v1, Container, CreateContainerRequest, CreateImageRequest, CreateTaskRequest,
        DeleteContainerRequest, DeleteTaskRequest, GetImageRequest, GetRequest, Image, InfoRequest,
        KillRequest, ListContainersRequest, ReadContentRequest, StartRequest, UpdateImageRequest,
        WaitRequest, WriteAction, WriteContentRequest,
        container::Runtime as ContainerRuntime,
        snapshots::{
            CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
            RemoveSnapshotRequest, StatSnapshotRequest,
        },
    },
    types::{Descriptor, Mount as CtrMount, v1::Status as TaskStatus},
};
use futures::StreamExt;
use oci_spec::runtime::{
    Capability, LinuxBuilder, LinuxDeviceCgroupBuilder, LinuxNamespaceBuilder, LinuxNamespaceType,
    LinuxResources, Mount, ProcessBuilder, RootBuilder, Spec, UserBuilder,
};
use sha2::{Digest, Sha256};
use tonic::{Code, Request, Status, transport::Channel};

/// The snapshotter skiff uses (the containerd config of
/// [`super::containerd_process`] keeps only overlayfs and native).
pub const SNAPSHOTTER: &str = "overlayfs";
/// The runc v2 shim.
pub const RUNTIME_NAME: &str = "io.containerd.runc.v2";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Content is sent to containerd in messages of at most this size.
const WRITE_CHUNK: usize = 1 << 20;

/// What went wrong, with the other side's own words in it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot connect to containerd at {socket}: {message}")]
    Connect { socket: String, message: String },
    /// The image reference does not parse (Kubernetes: InvalidImageName).
    #[error("invalid image name {image:?}: {message}")]
    InvalidImageName { image: String, message: String },
    /// The registry refused or failed (Kubernetes: ErrImagePull); `message` is the
    /// registry's answer as oci-client reports it.
    #[error("failed to pull image {image}: {message}")]
    Pull { image: String, message: String },
    #[error("image {0} is not present on this node (pull it first)")]
    ImageNotPresent(String),
    #[error("image {image} is not usable: {message}")]
    BadImage { image: String, message: String },
    #[error("container {0} not found")]
    ContainerNotFound(String),
    #[error("invalid container config: {0}")]
    Spec(String),
    #[error("containerd {op}: {code:?}: {message}")]
    Containerd {
        op: String,
        code: Code,
        message: String,
    },
}

/// Result of runtime calls.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

fn ctrd(op: impl Into<String>) -> impl FnOnce(Status) -> RuntimeError {
    let op = op.into();
    move |s| RuntimeError::Containerd {
        op,
        code: s.code(),
        message: s.message().to_string(),
    }
}

impl RuntimeError {
    /// True for a containerd NotFound answer.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            RuntimeError::Containerd {
                code: Code::NotFound,
                ..
            } | RuntimeError::ContainerNotFound(_)
        )
    }
}

/// imagePullPolicy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The parts of an image config a container is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub working_dir: String,
    pub user: String,
}

/// A pulled and unpacked image.
#[derive(Debug, Clone)]
pub struct ImageInfo {
    /// containerd image name: the normalized reference (e.g. `docker.io/library/busybox:latest`).
    pub name: String,
    /// Digest of what the tag points to (index or manifest): the imageID/imageRef.
    pub digest: String,
    /// Digest of the platform manifest.
    pub manifest_digest: String,
    pub config_digest: String,
    /// Chain ID of the top layer: the snapshot containers are prepared from.
    pub chain_id: String,
    pub config: ImageConfig,
    /// Compressed size of the layers.
    pub size: u64,
}

/// Where a task's stdout and stderr go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskIo {
    /// Both streams appended to this file by the shim (`file://` IO; survives agent restarts).
    File(PathBuf),
    /// FIFOs (or files) opened by the shim; the agent reads them (e.g. to write CRI-format logs).
    Fifos { stdout: PathBuf, stderr: PathBuf },
    /// Both streams to one IO URI, e.g. `binary://` (a program the shim starts with the
    /// pipes; the CRI log copier of [`super::cri_log`]).
    Uri(String),
    /// /dev/null.
    Null,
}

/// What to run. [`build_spec`] turns it and the image config into an OCI runtime spec.
#[derive(Debug, Clone)]
pub struct ContainerConfig {
    /// containerd container id (also the snapshot key and the runc id), unique per node.
    pub id: String,
    /// Image reference as given to [`Runtime::pull`].
    pub image: String,
    /// Kubernetes `command`: replaces the image Entrypoint when not empty.
    pub command: Vec<String>,
    /// Kubernetes `args`: replaces the image Cmd when not empty.
    pub args: Vec<String>,
    /// Added to (and overriding) the image's Env.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub hostname: Option<String>,
    /// A network namespace to join (e.g. /run/netns/<pod>); None = a new, empty one.
    pub netns_path: Option<PathBuf>,
    /// Full cgroup path, normally from [`Runtime::cgroups_path`]: /skiff/<node>/<pod>/<container>.
    pub cgroups_path: String,
    pub io: TaskIo,
    /// Mounts added after the defaults (/proc, /dev, /dev/pts, /dev/shm, /dev/mqueue, /sys, /sys/fs/cgroup).
    pub mounts: Vec<Mount>,
    /// cgroup limits (memory, cpu, pids); devices are always deny-all plus runc's defaults.
    pub resources: Option<LinuxResources>,
    /// Labels on the container record (e.g. pod uid, container name, restart count).
    pub labels: HashMap<String, String>,
    /// Containers with the same shim group share one runc shim process (the OCI
    /// annotation [`SHIM_GROUP_ANNOTATION`] the shim reads at start, as containerd's CRI
    /// plugin groups a pod's containers by sandbox id). None = a shim of its own.
    pub shim_group: Option<String>,
}

/// The OCI annotation containerd-shim-runc-v2 groups containers by: a container whose
/// spec has it joins the running shim of its group instead of starting a new one.
pub const SHIM_GROUP_ANNOTATION: &str = "io.containerd.runc.v2.group";

impl ContainerConfig {
    /// A config with defaults: image command, no extra env, new netns, no labels.
    pub fn new(
        id: impl Into<String>,
        image: impl Into<String>,
        cgroups_path: impl Into<String>,
        io: TaskIo,
    ) -> Self {
        ContainerConfig {
            id: id.into(),
            image: image.into(),
            command: vec![],
            args: vec![],
            env: vec![],
            working_dir: None,
            hostname: None,
            netns_path: None,
            cgroups_path: cgroups_path.into(),
            io,
            mounts: vec![],
            resources: None,
            labels: HashMap::new(),
            shim_group: None,
        }
    }
}

/// A task's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerState {
    /// The container record exists but has no task (created, or its task was deleted).
    NoTask,
    Created {
        pid: u32,
    },
    Running {
        pid: u32,
    },
    Paused {
        pid: u32,
    },
    /// Exit code as the shim reports it (128 + signal when killed by a signal).
    Exited {
        exit_code: u32,
    },
    Unknown,
}

/// One container of this node (for adoption after an agent restart).
#[derive(Debug, Clone)]
pub struct ContainerInfo {
    pub id: String,
    pub image: String,
    pub labels: HashMap<String, String>,
    pub state: ContainerState,
}

/// One snapshot in this node's namespace.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub name: String,
    pub parent: String,
    /// 1 view, 2 active, 3 committed.
    pub kind: i32,
}

/// A registry client error as containerd words an HTTP failure (the status code shown:
/// 401 for a missing or wrong login).
fn registry_error(e: &oci_client::errors::OciDistributionError) -> String {
    match e {
        oci_client::errors::OciDistributionError::UnauthorizedError { url } => {
            format!("unexpected status from GET request to {url}: 401 Unauthorized")
        }
        e => e.to_string(),
    }
}

/// A registry client for `insecure_hosts` over plain http (e.g. `127.0.0.1:5000`), https
/// elsewhere. Installs rustls' ring provider as the process default if none is set.
pub fn registry_client(insecure_hosts: &[String]) -> Result<oci_client::Client, String> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = oci_client::client::ClientConfig {
        protocol: oci_client::client::ClientProtocol::HttpsExcept(insecure_hosts.to_vec()),
        connect_timeout: Some(Duration::from_secs(10)),
        platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
        ..Default::default()
    };
    Ok(oci_client::Client::new(config))
}

/// `sha256:<hex>` of bytes.
fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Chain IDs of a layer stack (OCI image spec): chain(0) = diff(0),
/// chain(n) = sha256(chain(n-1) + " " + diff(n)).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => sha256(format!("{prev} {d}").as_bytes()),
        };
        out.push(next);
    }
    out
}

/// A connection to containerd for one node.
#[derive(Debug, Clone)]
pub struct Runtime {
    channel: Channel,
    namespace: String,
    node: String,
    socket: PathBuf,
    /// What the content store says about an image target (by image name and target
    /// digest; content is immutable), so looking an image up costs two calls
    /// (image record, snapshot) instead of five.
    image_infos: Arc<Mutex<HashMap<(String, String), ImageInfo>>>,
    /// The OCI runtime binary the runc shim runs for new containers.
    oci_runtime: super::oci_runtime::OciRuntime,
}

impl Runtime {
    /// New containers run with this OCI runtime (default runc); see [`super::oci_runtime`].
    pub fn with_oci_runtime(mut self, oci_runtime: super::oci_runtime::OciRuntime) -> Self {
        self.oci_runtime = oci_runtime;
        self
    }

    /// Connects to containerd's socket and makes sure the node's namespace exists.
    pub async fn connect(socket: impl AsRef<Path>, node: &str) -> Result<Self> {
        let socket = socket.as_ref().to_path_buf();
        let shown = socket.display().to_string();
        let connect_err = |message: String| RuntimeError::Connect {
            socket: shown.clone(),
            message,
        };
        let channel = containerd_client::connect(&socket)
            .await
            .map_err(|e| connect_err(format!("{e:?}")))?;
        let rt = Runtime {
            channel,
            namespace: format!("skiff-{node}"),
            node: node.to_string(),
            socket,
            image_infos: Arc::default(),
            oci_runtime: Default::default(),
        };
        let mut labels = HashMap::new();
        labels.insert("skiff.io/node".to_string(), node.to_string());
        let req = v1::CreateNamespaceRequest {
            namespace: Some(v1::Namespace {
                name: rt.namespace.clone(),
                labels,
            }),
        };
        // containerd 1.6 publishes a namespace event and wants the namespace header for it.
        match v1::namespaces_client::NamespacesClient::new(rt.channel.clone())
            .create(rt.req(req, None))
            .await
        {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => {
                return Err(connect_err(format!(
                    "create namespace {}: {}",
                    rt.namespace,
                    s.message()
                )));
            }
        }
        Ok(rt)
    }

    /// The containerd namespace of this node.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The socket this runtime talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The node's cgroup parent: `/skiff/<node>`.
    pub fn cgroup_parent(&self) -> String {
        format!("/skiff/{}", self.node)
    }

    /// A container's cgroup path: `/skiff/<node>/<pod>/<container>`.
    pub fn cgroups_path(&self, pod: &str, container: &str) -> String {
        format!("/skiff/{}/{pod}/{container}", self.node)
    }

    /// containerd's version string.
    pub async fn version(&self) -> Result<String> {
        let v = v1::version_client::VersionClient::new(self.channel.clone())
            .version(())
            .await
            .map_err(ctrd("version"))?
            .into_inner();
        Ok(v.version)
    }

    fn req<T>(&self, msg: T, lease: Option<&str>) -> Request<T> {
        let mut r = Request::new(msg);
        let md = r.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace.parse().expect("namespace is ascii"),
        );
        if let Some(l) = lease {
            md.insert("containerd-lease", l.parse().expect("lease id is ascii"));
        }
        r
    }

    async fn create_lease(&self, what: &str) -> Result<String> {
        let id = format!("skiff-{what}-{}-{}", std::process::id(), nanos());
        let mut labels = HashMap::new();
        let expire = chrono::Utc::now() + chrono::Duration::hours(1);
        labels.insert(
            "containerd.io/gc.expire".to_string(),
            expire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        );
        v1::leases_client::LeasesClient::new(self.channel.clone())
            .create(self.req(
                v1::CreateRequest {
                    id: id.clone(),
                    labels,
                },
                None,
            ))
            .await
            .map_err(ctrd("create lease"))?;
        Ok(id)
    }

    async fn delete_lease(&self, id: &str) {
        let r = v1::leases_client::LeasesClient::new(self.channel.clone())
            .delete(self.req(
                v1::DeleteRequest {
                    id: id.to_string(),
                    sync: true,
                },
                None,
            ))
            .await;
        if let Err(e) = r {
            tracing::warn!(lease = id, error = %e.message(), "cannot delete containerd lease (it expires in 1h)");
        }
    }

    // ---------------------------------------------------------------- images

    /// Pulls `image` unless policy says otherwise: IfNotPresent skips when the image record
    /// and its unpacked snapshot exist, Never fails when they do not.
    pub async fn ensure_image(
        &self,
        image: &str,
        insecure_hosts: &[String],
        policy: PullPolicy,
    ) -> Result<ImageInfo> {
        if policy != PullPolicy::Always
            && let Some(info) = self.image(image).await?
        {
            return Ok(info);
        }
        if policy == PullPolicy::Never {
            return Err(RuntimeError::ImageNotPresent(image.to_string()));
        }
        self.pull(image, insecure_hosts).await
    }

    /// The local image `image`; ImageNotPresent unless it is pulled and unpacked.
    async fn local_image(&self, image: &str) -> Result<ImageInfo> {
        self.image(image)
            .await?
            .ok_or_else(|| RuntimeError::ImageNotPresent(image.to_string()))
    }

    /// The local image `image`, if it is pulled and unpacked.
    pub async fn image(&self, image: &str) -> Result<Option<ImageInfo>> {
        let name = normalize(image)?;
        let got = v1::images_client::ImagesClient::new(self.channel.clone())
            .get(self.req(GetImageRequest { name: name.clone() }, None))
            .await;
        let img = match got {
            Ok(r) => r.into_inner().image,
            Err(s) if s.code() == Code::NotFound => return Ok(None),
            Err(s) => return Err(ctrd("get image")(s)),
        };
        let Some(target) = img.and_then(|i| i.target) else {
            return Ok(None);
        };
        let key = (name.clone(), target.digest.clone());
        let cached = self
            .image_infos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let info = match cached {
            Some(i) => i,
            None => match self.image_info_from_store(&name, &target).await {
                Ok(i) => {
                    let mut c = self.image_infos.lock().unwrap_or_else(|e| e.into_inner());
                    c.retain(|k, _| k.0 != name);
                    c.insert(key, i.clone());
                    i
                }
                Err(e) if e.is_not_found() => return Ok(None),
                Err(e) => return Err(e),
            },
        };
        if self.stat_snapshot(&info.chain_id).await?.is_none() {
            return Ok(None);
        }
        Ok(Some(info))
    }

    async fn image_info_from_store(&self, name: &str, target: &Descriptor) -> Result<ImageInfo> {
        let bad = |m: String| RuntimeError::BadImage {
            image: name.to_string(),
            message: m,
        };
        let mut manifest_digest = target.digest.clone();
        let mut manifest = self.read_content(&manifest_digest).await?;
        let mut v: serde_json::Value =
            serde_json::from_slice(&manifest).map_err(|e| bad(e.to_string()))?;
        if v.get("manifests").is_some() {
            manifest_digest = pick_platform(&v)
                .ok_or_else(|| bad(format!("no {}/linux manifest", oci_arch())))?;
            manifest = self.read_content(&manifest_digest).await?;
            v = serde_json::from_slice(&manifest).map_err(|e| bad(e.to_string()))?;
        }
        let (config_desc, layers) = parse_manifest(&v).map_err(bad)?;
        let config = self.read_content(&config_desc.digest).await?;
        let (cfg, diff_ids) = parse_config(&config).map_err(bad)?;
        let chain = chain_ids(&diff_ids);
        Ok(ImageInfo {
            name: name.to_string(),
            digest: target.digest.clone(),
            manifest_digest,
            config_digest: config_desc.digest,
            chain_id: chain
                .last()
                .cloned()
                .ok_or_else(|| bad("image has no layers".into()))?,
            config: cfg,
            size: layers.iter().map(|l| l.size.max(0) as u64).sum(),
        })
    }

    /// Pulls `image` from its registry (plain http for `insecure_hosts`, e.g.
    /// `127.0.0.1:5000`), stores it in containerd's content store, records the image and
    /// unpacks it into overlayfs snapshots.
    pub async fn pull(&self, image: &str, insecure_hosts: &[String]) -> Result<ImageInfo> {
        let anonymous = oci_client::secrets::RegistryAuth::Anonymous;
        self.pull_with_auth(image, insecure_hosts, &anonymous).await
    }

    /// [`Runtime::pull`] with registry credentials (imagePullSecrets).
    pub async fn pull_with_auth(
        &self,
        image: &str,
        insecure_hosts: &[String],
        auth: &oci_client::secrets::RegistryAuth,
    ) -> Result<ImageInfo> {
        let name = normalize(image)?;
        let lease = self.create_lease("pull").await?;
        let r = self
            .pull_leased(image, &name, insecure_hosts, auth, &lease)
            .await;
        self.delete_lease(&lease).await;
        r
    }

    async fn pull_leased(
        &self,
        image: &str,
        name: &str,
        insecure_hosts: &[String],
        auth: &oci_client::secrets::RegistryAuth,
        lease: &str,
    ) -> Result<ImageInfo> {
        let reference: oci_client::Reference =
            image.parse().map_err(|e| RuntimeError::InvalidImageName {
                image: image.into(),
                message: format!("{e}"),
            })?;
        let pull_err = |m: String| RuntimeError::Pull {
            image: image.to_string(),
            message: m,
        };
        let client = registry_client(insecure_hosts).map_err(pull_err)?;
        let accept = [
            MT_OCI_MANIFEST,
            MT_OCI_INDEX,
            MT_DOCKER_MANIFEST,
            MT_DOCKER_LIST,
        ];

        let (top_bytes, top_digest) = client
            .pull_manifest_raw(&reference, auth, &accept)
            .await
            .map_err(|e| pull_err(format!("manifest: {}", registry_error(&e))))?;
        let top: serde_json::Value = serde_json::from_slice(&top_bytes)
            .map_err(|e| pull_err(format!("manifest is not JSON: {e}")))?;
        let top_media = media_type_of(&top);

        // An index: pick this platform's manifest and fetch it.
        let (manifest_bytes, manifest_digest, manifest_media, index) =
            if top.get("manifests").is_some() {
                let d = pick_platform(&top).ok_or_else(|| {
                    pull_err(format!("no linux/{} image in the index", oci_arch()))
                })?;
                let child = reference.clone_with_digest(d.clone());
                let (b, _) = client
                    .pull_manifest_raw(&child, auth, &accept)
                    .await
                    .map_err(|e| pull_err(format!("manifest {d}: {e}")))?;
                let v: serde_json::Value = serde_json::from_slice(&b)
                    .map_err(|e| pull_err(format!("manifest is not JSON: {e}")))?;
                let mt = media_type_of(&v);
                (
                    b,
                    d,
                    mt,
                    Some((top_bytes, top_digest.clone(), top_media.clone())),
                )
            } else {
                (top_bytes, top_digest.clone(), top_media.clone(), None)
            };
        if sha256(&manifest_bytes) != manifest_digest {
            return Err(pull_err(format!(
                "manifest digest mismatch: expected {manifest_digest}"
            )));
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&manifest_bytes).map_err(|e| pull_err(e.to_string()))?;
        let (config_desc, layers) = parse_manifest(&manifest).map_err(pull_err)?;

        // Config (small): fetch to memory, read diff_ids.
        let mut config = Vec::new();
        client
            .pull_blob(&reference, config_desc.digest.as_str(), &mut config)
            .await
            .map_err(|e| pull_err(format!("config {}: {e}", config_desc.digest)))?;
        let (image_config, diff_ids) = parse_config(&config).map_err(pull_err)?;
        if diff_ids.len() != layers.len() {
            return Err(pull_err(format!(
                "{} layers but {} diff_ids in the config",
                layers.len(),
                diff_ids.len()
            )));
        }
        let chain = chain_ids(&diff_ids);
        let top_chain = chain
            .last()
            .cloned()
            .ok_or_else(|| pull_err("image has no layers".into()))?;

        // Layers: streamed into the content store unless already there.
        for (layer, diff_id) in layers.iter().zip(&diff_ids) {
            let labels =
                HashMap::from([("containerd.io/uncompressed".to_string(), diff_id.clone())]);
            if self.content_exists(&layer.digest).await? {
                self.update_content_labels(&layer.digest, labels).await?;
                continue;
            }
            let stream = client
                .pull_blob_stream(&reference, layer.digest.as_str())
                .await
                .map_err(|e| pull_err(format!("layer {}: {e}", layer.digest)))?;
            let stream = stream.map(|r| r.map_err(|e| e.to_string()));
            self.write_content(lease, &layer.digest, layer.size, labels, stream)
                .await
                .map_err(|e| match e {
                    WriteError::Source(m) => pull_err(format!("layer {}: {m}", layer.digest)),
                    WriteError::Containerd(e) => e,
                })?;
        }

        // Config, manifest, index: with the labels that link them for the GC.
        let mut labels = HashMap::new();
        labels.insert(
            format!("containerd.io/gc.ref.snapshot.{SNAPSHOTTER}"),
            top_chain.clone(),
        );
        self.put_content(lease, &config_desc.digest, &config, labels)
            .await?;
        let mut labels = HashMap::new();
        labels.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            config_desc.digest.clone(),
        );
        for (i, l) in layers.iter().enumerate() {
            labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest.clone(),
            );
        }
        self.put_content(lease, &manifest_digest, &manifest_bytes, labels)
            .await?;
        let target = match &index {
            Some((bytes, digest, media)) => {
                let labels = HashMap::from([(
                    "containerd.io/gc.ref.content.m.0".to_string(),
                    manifest_digest.clone(),
                )]);
                self.put_content(lease, digest, bytes, labels).await?;
                Descriptor {
                    media_type: media.clone(),
                    digest: digest.clone(),
                    size: bytes.len() as i64,
                    annotations: HashMap::new(),
                }
            }
            None => Descriptor {
                media_type: manifest_media.clone(),
                digest: manifest_digest.clone(),
                size: manifest_bytes.len() as i64,
                annotations: HashMap::new(),
            },
        };

        self.unpack(lease, &layers, &diff_ids, &chain)
            .await
            .map_err(|e| match e {
                RuntimeError::Containerd { op, code, message } => RuntimeError::BadImage {
                    image: image.to_string(),
                    message: format!("unpack: {op}: {code:?}: {message}"),
                },
                e => e,
            })?;
        self.put_image(name, target.clone()).await?;

        Ok(ImageInfo {
            name: name.to_string(),
            digest: target.digest,
            manifest_digest,
            config_digest: config_desc.digest,
            chain_id: top_chain,
            config: image_config,
            size: layers.iter().map(|l| l.size.max(0) as u64).sum(),
        })
    }

    /// Applies each layer onto the snapshot of the layers below it, as containerd's
    /// unpacker does: Prepare(key, parent chain) -> diff Apply -> Commit(chain ID).
    async fn unpack(
        &self,
        lease: &str,
        layers: &[Descriptor],
        diff_ids: &[String],
        chain: &[String],
    ) -> Result<()> {
        let mut snapshots =
            v1::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let mut diff = v1::diff_client::DiffClient::new(self.channel.clone());
        let mut parent = String::new();
        for ((layer, diff_id), chain_id) in layers.iter().zip(diff_ids).zip(chain) {
            if self.stat_snapshot(chain_id).await?.is_some() {
                parent = chain_id.clone();
                continue;
            }
            let key = format!("extract-{}-{chain_id}", nanos());
            let mounts = snapshots
                .prepare(self.req(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: key.clone(),
                        parent: parent.clone(),
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await
                .map_err(ctrd(format!("prepare snapshot for layer {}", layer.digest)))?
                .into_inner()
                .mounts;
            let applied = diff
                .apply(self.req(
                    v1::ApplyRequest {
                        diff: Some(layer.clone()),
                        mounts,
                        payloads: HashMap::new(),
                        sync_fs: false,
                    },
                    Some(lease),
                ))
                .await;
            let applied = match applied {
                Ok(a) => a.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
                Err(s) => {
                    self.remove_snapshot_quiet(&key, Some(lease)).await;
                    return Err(ctrd(format!("apply layer {}", layer.digest))(s));
                }
            };
            if &applied != diff_id {
                self.remove_snapshot_quiet(&key, Some(lease)).await;
                return Err(RuntimeError::Containerd {
                    op: format!("apply layer {}", layer.digest),
                    code: Code::DataLoss,
                    message: format!("applied diff {applied} but the config says {diff_id}"),
                });
            }
            let committed = snapshots
                .commit(self.req(
                    CommitSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        name: chain_id.clone(),
                        key: key.clone(),
                        labels: HashMap::new(),
                    },
                    Some(lease),
                ))
                .await;
            match committed {
                Ok(_) => {}
                // Another pull committed the same chain meanwhile.
                Err(s) if s.code() == Code::AlreadyExists => {
                    self.remove_snapshot_quiet(&key, Some(lease)).await
                }
                Err(s) => {
                    self.remove_snapshot_quiet(&key, Some(lease)).await;
                    return Err(ctrd(format!("commit snapshot {chain_id}"))(s));
                }
            }
            parent = chain_id.clone();
        }
        Ok(())
    }

    async fn put_image(&self, name: &str, target: Descriptor) -> Result<()> {
        let mut images = v1::images_client::ImagesClient::new(self.channel.clone());
        let img = Image {
            name: name.to_string(),
            labels: HashMap::new(),
            target: Some(target),
            created_at: None,
            updated_at: None,
        };
        match images
            .create(self.req(
                CreateImageRequest {
                    image: Some(img.clone()),
                    source_date_epoch: None,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(self.req(
                        UpdateImageRequest {
                            image: Some(img),
                            update_mask: Some(prost_types::FieldMask {
                                paths: vec!["target".into()],
                            }),
                            source_date_epoch: None,
                        },
                        None,
                    ))
                    .await
                    .map_err(ctrd("update image"))?;
                Ok(())
            }
            Err(s) => Err(ctrd("create image")(s)),
        }
    }

    /// Deletes an image record (content and snapshots go with containerd's GC once no
    /// container uses them).
    pub async fn remove_image(&self, image: &str) -> Result<()> {
        let name = normalize(image)?;
        match v1::images_client::ImagesClient::new(self.channel.clone())
            .delete(self.req(
                v1::DeleteImageRequest {
                    name,
                    sync: true,
                    target: None,
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(ctrd("delete image")(s)),
        }
    }

    /// Names of the images of this node.
    pub async fn list_images(&self) -> Result<Vec<String>> {
        let r = v1::images_client::ImagesClient::new(self.channel.clone())
            .list(self.req(v1::ListImagesRequest { filters: vec![] }, None))
            .await
            .map_err(ctrd("list images"))?;
        Ok(r.into_inner().images.into_iter().map(|i| i.name).collect())
    }

    // ---------------------------------------------------------------- content

    async fn content_exists(&self, digest: &str) -> Result<bool> {
        match v1::content_client::ContentClient::new(self.channel.clone())
            .info(self.req(
                InfoRequest {
                    digest: digest.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(true),
            Err(s) if s.code() == Code::NotFound => Ok(false),
            Err(s) => Err(ctrd(format!("content info {digest}"))(s)),
        }
    }

    async fn update_content_labels(
        &self,
        digest: &str,
        labels: HashMap<String, String>,
    ) -> Result<()> {
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        v1::content_client::ContentClient::new(self.channel.clone())
            .update(self.req(
                v1::UpdateRequest {
                    info: Some(v1::Info {
                        digest: digest.to_string(),
                        size: 0,
                        created_at: None,
                        updated_at: None,
                        labels,
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                },
                None,
            ))
            .await
            .map_err(ctrd(format!("update labels of {digest}")))?;
        Ok(())
    }

    /// Stores small content from memory (or just relabels it when present).
    async fn put_content(
        &self,
        lease: &str,
        digest: &str,
        data: &[u8],
        labels: HashMap<String, String>,
    ) -> Result<()> {
        if self.content_exists(digest).await? {
            return self.update_content_labels(digest, labels).await;
        }
        let data = bytes::Bytes::copy_from_slice(data);
        let size = data.len() as i64;
        self.write_content(
            lease,
            digest,
            size,
            labels,
            futures::stream::iter([Ok::<_, String>(data)]),
        )
        .await
        .map_err(|e| match e {
            WriteError::Source(m) => RuntimeError::Containerd {
                op: format!("write {digest}"),
                code: Code::Internal,
                message: m,
            },
            WriteError::Containerd(e) => e,
        })
    }

    /// Content service Write, in lock-step (one request, one response): WRITE chunks of up
    /// to 1 MiB, then COMMIT with the expected digest and the labels. containerd verifies
    /// size and digest.
    async fn write_content<S>(
        &self,
        lease: &str,
        digest: &str,
        size: i64,
        labels: HashMap<String, String>,
        data: S,
    ) -> Result<(), WriteError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, String>> + Unpin,
    {
        let reference = format!("{lease}-{digest}");
        let r = self
            .write_content_inner(&reference, lease, digest, size, labels.clone(), data)
            .await;
        if let Err(WriteError::Containerd(RuntimeError::Containerd {
            code: Code::AlreadyExists,
            ..
        })) = r
        {
            // Committed by a concurrent pull meanwhile: same digest, same bytes.
            return self
                .update_content_labels(digest, labels)
                .await
                .map_err(WriteError::Containerd);
        }
        if r.is_err() {
            let _ = v1::content_client::ContentClient::new(self.channel.clone())
                .abort(self.req(v1::AbortRequest { r#ref: reference }, Some(lease)))
                .await;
        }
        r
    }

    async fn write_content_inner<S>(
        &self,
        reference: &str,
        lease: &str,
        digest: &str,
        size: i64,
        labels: HashMap<String, String>,
        mut data: S,
    ) -> Result<(), WriteError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, String>> + Unpin,
    {
        let op = format!("write content {digest}");
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(2);
        let msg = |action: WriteAction, offset: i64, data: Vec<u8>| WriteContentRequest {
            action: action as i32,
            r#ref: reference.to_string(),
            total: size,
            expected: digest.to_string(),
            offset,
            data,
            labels: HashMap::new(),
        };
        // The first message must be queued before the call: containerd answers (and sends
        // the response headers tonic waits for) only after reading it.
        tx.send(msg(WriteAction::Stat, 0, vec![])).await.ok();
        let mut responses = v1::content_client::ContentClient::new(self.channel.clone())
            .write(self.req(tokio_stream::wrappers::ReceiverStream::new(rx), Some(lease)))
            .await
            .map_err(|s| WriteError::Containerd(ctrd(op.clone())(s)))?
            .into_inner();
        let next =
            async |responses: &mut tonic::Streaming<v1::WriteContentResponse>| match responses
                .message()
                .await
            {
                Ok(Some(r)) => Ok(r),
                Ok(None) => Err(WriteError::Containerd(RuntimeError::Containerd {
                    op: op.clone(),
                    code: Code::Aborted,
                    message: "stream closed early".into(),
                })),
                Err(s) => Err(WriteError::Containerd(ctrd(op.clone())(s))),
            };
        let stat = next(&mut responses).await?;
        // A leftover ingest under this ref (same lease, same digest) restarts from 0.
        let _ = stat;
        let mut offset = 0i64;
        let mut buf: Vec<u8> = Vec::with_capacity(WRITE_CHUNK);
        let mut done = false;
        while !done {
            match data.next().await {
                Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(WriteError::Source(e)),
                None => done = true,
            }
            if buf.len() >= WRITE_CHUNK || (done && !buf.is_empty()) {
                let chunk = std::mem::take(&mut buf);
                let n = chunk.len() as i64;
                tx.send(msg(WriteAction::Write, offset, chunk)).await.ok();
                let r = next(&mut responses).await?;
                offset += n;
                if r.offset != offset {
                    return Err(WriteError::Containerd(RuntimeError::Containerd {
                        op,
                        code: Code::DataLoss,
                        message: format!(
                            "containerd is at offset {} after writing up to {offset}",
                            r.offset
                        ),
                    }));
                }
            }
        }
        let mut commit = msg(WriteAction::Commit, offset, vec![]);
        commit.labels = labels;
        tx.send(commit).await.ok();
        next(&mut responses).await.map(|_| ())
    }

    async fn read_content(&self, digest: &str) -> Result<Vec<u8>> {
        let mut stream = v1::content_client::ContentClient::new(self.channel.clone())
            .read(self.req(
                ReadContentRequest {
                    digest: digest.to_string(),
                    offset: 0,
                    size: 0,
                },
                None,
            ))
            .await
            .map_err(ctrd(format!("read content {digest}")))?
            .into_inner();
        let mut out = Vec::new();
        while let Some(chunk) = stream
            .message()
            .await
            .map_err(ctrd(format!("read content {digest}")))?
        {
            out.extend_from_slice(&chunk.data);
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- snapshots

    async fn stat_snapshot(&self, key: &str) -> Result<Option<SnapshotInfo>> {
        match v1::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .stat(self.req(
                StatSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.to_string(),
                },
                None,
            ))
            .await
        {
            Ok(r) => Ok(r.into_inner().info.map(|i| SnapshotInfo {
                name: i.name,
                parent: i.parent,
                kind: i.kind,
            })),
            Err(s) if s.code() == Code::NotFound => Ok(None),
            Err(s) => Err(ctrd(format!("stat snapshot {key}"))(s)),
        }
    }

    async fn remove_snapshot_quiet(&self, key: &str, lease: Option<&str>) {
        let _ = v1::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .remove(self.req(
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: key.to_string(),
                },
                lease,
            ))
            .await;
    }

    /// All snapshots of this node's namespace.
    pub async fn list_snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut stream =
            v1::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
                .list(self.req(
                    ListSnapshotsRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        filters: vec![],
                    },
                    None,
                ))
                .await
                .map_err(ctrd("list snapshots"))?
                .into_inner();
        let mut out = Vec::new();
        while let Some(r) = stream.message().await.map_err(ctrd("list snapshots"))? {
            out.extend(r.info.into_iter().map(|i| SnapshotInfo {
                name: i.name,
                parent: i.parent,
                kind: i.kind,
            }));
        }
        Ok(out)
    }

    // ---------------------------------------------------------------- containers

    /// Creates the container: container record with the OCI spec, writable snapshot on the
    /// image's chain ID (key = id), task through the shim (not started). Returns the
    /// task's pid. On failure, what was created is removed again.
    ///
    /// No lease: the container record is written first and names its snapshot key, which
    /// keeps the snapshot from containerd's garbage collector from the moment it exists
    /// (a lease would cost two more metadata transactions and, on delete, a collection).
    /// `image` is the local image of `cfg.image`, already looked up (the pod worker has it
    /// from its pull policy check).
    pub async fn create_container_from(
        &self,
        cfg: &ContainerConfig,
        image: &ImageInfo,
    ) -> Result<u32> {
        let spec = build_spec(cfg, &image.config)?;
        let spec_json = serde_json::to_vec(&spec).map_err(|e| RuntimeError::Spec(e.to_string()))?;
        let r = self.create_parts(cfg, image, spec_json).await;
        if r.is_err() {
            let _ = self.delete(&cfg.id).await;
        }
        r
    }

    async fn create_parts(
        &self,
        cfg: &ContainerConfig,
        image: &ImageInfo,
        spec: Vec<u8>,
    ) -> Result<u32> {
        let container = Container {
            id: cfg.id.clone(),
            labels: cfg.labels.clone(),
            image: image.name.clone(),
            runtime: Some(ContainerRuntime {
                name: self.oci_runtime.runtime_name(),
                options: self.oci_runtime.shim_options(),
            }),
            spec: Some(prost_types::Any {
                type_url: SPEC_TYPE_URL.into(),
                value: spec,
            }),
            snapshotter: SNAPSHOTTER.into(),
            snapshot_key: cfg.id.clone(),
            ..Default::default()
        };
        let t_record = Instant::now();
        v1::containers_client::ContainersClient::new(self.channel.clone())
            .create(self.req(
                CreateContainerRequest {
                    container: Some(container),
                },
                None,
            ))
            .await
            .map_err(ctrd(format!("create container {}", cfg.id)))?;
        let t_snapshot = Instant::now();
        let mut snapshots =
            v1::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone());
        let prepared = snapshots
            .prepare(self.req(
                PrepareSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: cfg.id.clone(),
                    parent: image.chain_id.clone(),
                    labels: HashMap::new(),
                },
                None,
            ))
            .await;
        let mounts: Vec<CtrMount> = match prepared {
            Ok(r) => r.into_inner().mounts,
            Err(s) if s.code() == Code::AlreadyExists => {
                snapshots
                    .mounts(self.req(
                        MountsRequest {
                            snapshotter: SNAPSHOTTER.into(),
                            key: cfg.id.clone(),
                        },
                        None,
                    ))
                    .await
                    .map_err(ctrd(format!("mounts of snapshot {}", cfg.id)))?
                    .into_inner()
                    .mounts
            }
            Err(s) => return Err(ctrd(format!("prepare snapshot {}", cfg.id))(s)),
        };
        let (stdout, stderr) = match &cfg.io {
            TaskIo::File(p) => {
                let uri = format!("file://{}", p.display());
                (uri.clone(), uri)
            }
            TaskIo::Fifos { stdout, stderr } => {
                (stdout.display().to_string(), stderr.display().to_string())
            }
            TaskIo::Uri(u) => (u.clone(), u.clone()),
            TaskIo::Null => (String::new(), String::new()),
        };
        let t_task = Instant::now();
        let created = v1::tasks_client::TasksClient::new(self.channel.clone())
            .create(self.req(
                CreateTaskRequest {
                    container_id: cfg.id.clone(),
                    rootfs: mounts,
                    stdin: String::new(),
                    stdout,
                    stderr,
                    terminal: false,
                    ..Default::default()
                },
                None,
            ))
            .await
            .map_err(ctrd(format!("create task {}", cfg.id)))?;
        tracing::debug!(
            "created {}: container record {} ms, snapshot {} ms, task {} ms",
            cfg.id,
            t_snapshot.duration_since(t_record).as_millis(),
            t_task.duration_since(t_snapshot).as_millis(),
            t_task.elapsed().as_millis()
        );
        Ok(created.into_inner().pid)
    }

    /// Starts a created task. Returns its pid.
    pub async fn start(&self, id: &str) -> Result<u32> {
        let r = v1::tasks_client::TasksClient::new(self.channel.clone())
            .start(self.req(
                StartRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(ctrd(format!("start task {id}")))?;
        Ok(r.into_inner().pid)
    }

    /// Creates (as [`Runtime::create_container_from`]) and starts the container of `cfg`
    /// from its local image; a failed start deletes it.
    pub async fn run_container(&self, cfg: &ContainerConfig) -> Result<u32> {
        let image = self.local_image(&cfg.image).await?;
        self.run_container_from(cfg, &image).await
    }

    /// [`Runtime::run_container`] with `image` already looked up.
    pub async fn run_container_from(
        &self,
        cfg: &ContainerConfig,
        image: &ImageInfo,
    ) -> Result<u32> {
        let t = Instant::now();
        self.create_container_from(cfg, image).await?;
        let t_start = Instant::now();
        match self.start(&cfg.id).await {
            Ok(pid) => {
                tracing::debug!(
                    "started {}: create {} ms, start {} ms",
                    cfg.id,
                    t_start.duration_since(t).as_millis(),
                    t_start.elapsed().as_millis()
                );
                Ok(pid)
            }
            Err(e) => {
                let _ = self.delete(&cfg.id).await;
                Err(e)
            }
        }
    }

    /// Waits for the task to exit; returns its exit code.
    pub async fn wait(&self, id: &str) -> Result<u32> {
        let r = v1::tasks_client::TasksClient::new(self.channel.clone())
            .wait(self.req(
                WaitRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
            .map_err(ctrd(format!("wait task {id}")))?;
        Ok(r.into_inner().exit_status)
    }

    /// Sends a signal to the task's init process.
    pub async fn kill(&self, id: &str, signal: i32) -> Result<()> {
        v1::tasks_client::TasksClient::new(self.channel.clone())
            .kill(self.req(
                KillRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                    signal: signal as u32,
                    all: false,
                },
                None,
            ))
            .await
            .map_err(ctrd(format!("kill task {id}")))?;
        Ok(())
    }

    /// Graceful stop: SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit code.
    pub async fn stop(&self, id: &str, grace: Duration) -> Result<u32> {
        if let ContainerState::Exited { exit_code } = self.status(id).await? {
            return Ok(exit_code);
        }
        // Subscribe to the exit before signalling so it cannot be missed.
        let waiter = {
            let me = self.clone();
            let id = id.to_string();
            tokio::spawn(async move { me.wait(&id).await })
        };
        self.kill(id, libc::SIGTERM).await?;
        let mut waiter = waiter;
        match tokio::time::timeout(grace, &mut waiter).await {
            Ok(joined) => joined.map_err(|e| RuntimeError::Spec(format!("wait task: {e}")))?,
            Err(_) => {
                self.kill(id, libc::SIGKILL).await?;
                waiter
                    .await
                    .map_err(|e| RuntimeError::Spec(format!("wait task: {e}")))?
            }
        }
    }

    /// The task's state; [`RuntimeError::ContainerNotFound`] if there is no such container.
    pub async fn status(&self, id: &str) -> Result<ContainerState> {
        match v1::tasks_client::TasksClient::new(self.channel.clone())
            .get(self.req(
                GetRequest {
                    container_id: id.into(),
                    exec_id: String::new(),
                },
                None,
            ))
            .await
        {
            Ok(r) => {
                let Some(p) = r.into_inner().process else {
                    return Ok(ContainerState::Unknown);
                };
                Ok(
                    match TaskStatus::try_from(p.status).unwrap_or(TaskStatus::Unknown) {
                        TaskStatus::Created => ContainerState::Created { pid: p.pid },
                        TaskStatus::Running => ContainerState::Running { pid: p.pid },
                        TaskStatus::Paused | TaskStatus::Pausing => {
                            ContainerState::Paused { pid: p.pid }
                        }
                        TaskStatus::Stopped => ContainerState::Exited {
                            exit_code: p.exit_status,
                        },
                        TaskStatus::Unknown => ContainerState::Unknown,
                    },
                )
            }
            Err(s) if s.code() == Code::NotFound => {
                match v1::containers_client::ContainersClient::new(self.channel.clone())
                    .get(self.req(v1::GetContainerRequest { id: id.into() }, None))
                    .await
                {
                    Ok(_) => Ok(ContainerState::NoTask),
                    Err(s) if s.code() == Code::NotFound => {
                        Err(RuntimeError::ContainerNotFound(id.into()))
                    }
                    Err(s) => Err(ctrd(format!("get container {id}"))(s)),
                }
            }
            Err(s) => Err(ctrd(format!("get task {id}"))(s)),
        }
    }

    /// Removes the container completely: kills a live task (SIGKILL), deletes the task
    /// (runc removes the container's cgroup), the container record and its snapshot.
    /// Missing parts are not errors.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let mut tasks = v1::tasks_client::TasksClient::new(self.channel.clone());
        let mut exists = true;
        match self.status(id).await {
            Ok(
                ContainerState::Created { .. }
                | ContainerState::Running { .. }
                | ContainerState::Paused { .. },
            ) => {
                let waiter = {
                    let me = self.clone();
                    let id = id.to_string();
                    tokio::spawn(async move { me.wait(&id).await })
                };
                match self.kill(id, libc::SIGKILL).await {
                    Ok(()) => {
                        let _ = tokio::time::timeout(Duration::from_secs(10), waiter).await;
                    }
                    Err(e) if e.is_not_found() => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(_) => {}
            Err(RuntimeError::ContainerNotFound(_)) => exists = false,
            Err(e) => return Err(e),
        }
        // No container record (and so no task): only a snapshot may be left (a failed
        // create).
        if exists {
            match tasks
                .delete(self.req(
                    DeleteTaskRequest {
                        container_id: id.into(),
                    },
                    None,
                ))
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(ctrd(format!("delete task {id}"))(s)),
            }
            match v1::containers_client::ContainersClient::new(self.channel.clone())
                .delete(self.req(DeleteContainerRequest { id: id.into() }, None))
                .await
            {
                Ok(_) => {}
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => return Err(ctrd(format!("delete container {id}"))(s)),
            }
        }
        match v1::snapshots::snapshots_client::SnapshotsClient::new(self.channel.clone())
            .remove(self.req(
                RemoveSnapshotRequest {
                    snapshotter: SNAPSHOTTER.into(),
                    key: id.into(),
                },
                None,
            ))
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(ctrd(format!("remove snapshot {id}"))(s)),
        }
    }

    /// All containers of this node with their task state (for adoption after a restart).
    pub async fn list(&self) -> Result<Vec<ContainerInfo>> {
        let r = v1::containers_client::ContainersClient::new(self.channel.clone())
            .list(self.req(ListContainersRequest { filters: vec![] }, None))
            .await
            .map_err(ctrd("list containers"))?;
        let mut out = Vec::new();
        for c in r.into_inner().containers {
            let state = match self.status(&c.id).await {
                Ok(s) => s,
                Err(RuntimeError::ContainerNotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            out.push(ContainerInfo {
                id: c.id,
                image: c.image,
                labels: c.labels,
                state,
            });
        }
        Ok(out)
    }
}

enum WriteError {
    /// Reading the data failed (registry side).
    Source(String),
    Containerd(RuntimeError),
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// The containerd image name for a reference: the fully qualified form
/// (`busybox` -> `docker.io/library/busybox:latest`).
pub fn normalize(image: &str) -> Result<String> {
    let r: oci_client::Reference = image.parse().map_err(|e| RuntimeError::InvalidImageName {
        image: image.into(),
        message: format!("{e}"),
    })?;
    Ok(r.whole())
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

fn media_type_of(v: &serde_json::Value) -> String {
    match v.get("mediaType").and_then(|m| m.as_str()) {
        Some(m) => m.to_string(),
        None if v.get("manifests").is_some() => MT_OCI_INDEX.into(),
        None => MT_OCI_MANIFEST.into(),
    }
}

/// The linux/<this arch> manifest digest of an index.
fn pick_platform(index: &serde_json::Value) -> Option<String> {
    index.get("manifests")?.as_array()?.iter().find_map(|m| {
        let p = m.get("platform")?;
        (p.get("os")?.as_str()? == "linux" && p.get("architecture")?.as_str()? == oci_arch())
            .then(|| m.get("digest")?.as_str().map(String::from))
            .flatten()
    })
}

fn descriptor(v: &serde_json::Value) -> Result<Descriptor, String> {
    Ok(Descriptor {
        media_type: v
            .get("mediaType")
            .and_then(|m| m.as_str())
            .unwrap_or_default()
            .to_string(),
        digest: v
            .get("digest")
            .and_then(|m| m.as_str())
            .ok_or("descriptor without digest")?
            .to_string(),
        size: v
            .get("size")
            .and_then(|m| m.as_i64())
            .ok_or("descriptor without size")?,
        annotations: HashMap::new(),
    })
}

fn parse_manifest(v: &serde_json::Value) -> Result<(Descriptor, Vec<Descriptor>), String> {
    let config = descriptor(v.get("config").ok_or("manifest without config")?)?;
    let layers = v
        .get("layers")
        .and_then(|l| l.as_array())
        .ok_or("manifest without layers")?
        .iter()
        .map(descriptor)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((config, layers))
}

fn parse_config(data: &[u8]) -> Result<(ImageConfig, Vec<String>), String> {
    let v: serde_json::Value =
        serde_json::from_slice(data).map_err(|e| format!("image config is not JSON: {e}"))?;
    let strings = |x: Option<&serde_json::Value>| -> Vec<String> {
        x.and_then(|a| a.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let c = v.get("config");
    let cfg = ImageConfig {
        env: strings(c.and_then(|c| c.get("Env"))),
        entrypoint: strings(c.and_then(|c| c.get("Entrypoint"))),
        cmd: strings(c.and_then(|c| c.get("Cmd"))),
        working_dir: c
            .and_then(|c| c.get("WorkingDir"))
            .and_then(|w| w.as_str())
            .unwrap_or_default()
            .to_string(),
        user: c
            .and_then(|c| c.get("User"))
            .and_then(|w| w.as_str())
            .unwrap_or_default()
            .to_string(),
    };
    let diff_ids = strings(v.get("rootfs").and_then(|r| r.get("diff_ids")));
    Ok((cfg, diff_ids))
}

/// The process arguments Kubernetes runs: `command` replaces the Entrypoint (and drops the
/// image Cmd), `args` replaces the Cmd.
pub fn container_args(cfg: &ContainerConfig, image: &ImageConfig) -> Vec<String> {
    let mut args = if cfg.command.is_empty() {
        image.entrypoint.clone()
    } else {
        cfg.command.clone()
    };
    if !cfg.args.is_empty() {
        args.extend(cfg.args.iter().cloned());
    } else if cfg.command.is_empty() {
        args.extend(image.cmd.iter().cloned());
    }
    args
}

/// The OCI runtime spec for a container, modelled on containerd's default Linux spec:
/// root (uid 0 unless the image sets a numeric User), Docker's default capabilities,
/// rlimits inherited from the shim (as with containerd's CRI plugin),
/// default mounts, new pid/ipc/uts/mount namespaces, the given network namespace, masked
/// and read-only /proc paths, devices deny-all (runc adds its default allow list), the
/// cgroup path.
pub fn build_spec(cfg: &ContainerConfig, image: &ImageConfig) -> Result<Spec> {
    let spec_err = |e: oci_spec::OciSpecError| RuntimeError::Spec(e.to_string());
    let args = container_args(cfg, image);
    if args.is_empty() {
        return Err(RuntimeError::Spec(format!(
            "container {}: no command and the image has none",
            cfg.id
        )));
    }
    let mut env: Vec<String> = image.env.clone();
    for (k, v) in &cfg.env {
        env.retain(|e| e.split_once('=').map(|(ek, _)| ek) != Some(k.as_str()));
        env.push(format!("{k}={v}"));
    }
    if !env.iter().any(|e| e.starts_with("PATH=")) {
        env.insert(
            0,
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        );
    }
    let cwd = cfg
        .working_dir
        .clone()
        .or_else(|| (!image.working_dir.is_empty()).then(|| image.working_dir.clone()))
        .unwrap_or_else(|| "/".into());
    let (uid, gid) = parse_numeric_user(&image.user);
    let caps: oci_spec::runtime::Capabilities = [
        Capability::Chown,
        Capability::DacOverride,
        Capability::Fsetid,
        Capability::Fowner,
        Capability::Mknod,
        Capability::NetRaw,
        Capability::Setgid,
        Capability::Setuid,
        Capability::Setfcap,
        Capability::Setpcap,
        Capability::NetBindService,
        Capability::SysChroot,
        Capability::Kill,
        Capability::AuditWrite,
    ]
    .into_iter()
    .collect();
    let capabilities = oci_spec::runtime::LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .build()
        .map_err(spec_err)?;
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(
            UserBuilder::default()
                .uid(uid)
                .gid(gid)
                .build()
                .map_err(spec_err)?,
        )
        .args(args)
        .env(env)
        .cwd(cwd)
        .capabilities(capabilities)
        .no_new_privileges(false)
        .build()
        .map_err(spec_err)?;

    let mut namespaces = vec![];
    for typ in [
        LinuxNamespaceType::Pid,
        LinuxNamespaceType::Ipc,
        LinuxNamespaceType::Uts,
        LinuxNamespaceType::Mount,
    ] {
        namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(typ)
                .build()
                .map_err(spec_err)?,
        );
    }
    let mut net = LinuxNamespaceBuilder::default().typ(LinuxNamespaceType::Network);
    if let Some(p) = &cfg.netns_path {
        net = net.path(p.clone());
    }
    namespaces.push(net.build().map_err(spec_err)?);

    let mut resources = cfg.resources.clone().unwrap_or_default();
    let mut devices = vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(false)
            .access("rwm")
            .build()
            .map_err(spec_err)?,
    ];
    devices.extend(resources.devices().clone().unwrap_or_default());
    resources.set_devices(Some(devices));

    let linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .cgroups_path(PathBuf::from(&cfg.cgroups_path))
        .resources(resources)
        .masked_paths(oci_spec::runtime::get_default_maskedpaths())
        .readonly_paths(oci_spec::runtime::get_default_readonly_paths())
        .build()
        .map_err(spec_err)?;

    let mut mounts = oci_spec::runtime::get_default_mounts();
    mounts.extend(cfg.mounts.iter().cloned());

    let mut spec = Spec::default();
    spec.set_process(Some(process));
    spec.set_root(Some(
        RootBuilder::default()
            .path("rootfs")
            .readonly(false)
            .build()
            .map_err(spec_err)?,
    ));
    spec.set_hostname(Some(
        cfg.hostname
            .clone()
            .unwrap_or_else(|| cfg.id.chars().take(63).collect()),
    ));
    spec.set_mounts(Some(mounts));
    spec.set_linux(Some(linux));
    spec.set_annotations(
        cfg.shim_group
            .as_ref()
            .map(|g| HashMap::from([(SHIM_GROUP_ANNOTATION.to_string(), g.clone())])),
    );
    Ok(spec)
}

/// `uid[:gid]` when numeric; names would need the image's /etc/passwd (not done: root).
fn parse_numeric_user(user: &str) -> (u32, u32) {
    let mut it = user.splitn(2, ':');
    let uid = it.next().and_then(|u| u.parse().ok()).unwrap_or(0);
    let gid = it.next().and_then(|g| g.parse().ok()).unwrap_or(0);
    (uid, gid)
}

/// The directories of a cgroup path (e.g. `/skiff/<node>/<pod>/<container>`) in every
/// mounted cgroup hierarchy (v1 controllers and the v2 one), whether or not they exist.
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let rel = path.trim_start_matches('/');
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return vec![];
    };
    let mut out = vec![];
    for line in info.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fstype = right.split(' ').next().unwrap_or_default();
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        if let Some(mp) = left.split(' ').nth(4) {
            out.push(Path::new(mp).join(rel));
        }
    }
    out
}

/// Removes a cgroup subtree (e.g. a pod's `/skiff/<node>/<pod>` once its containers are
/// deleted, or a node's `/skiff/<node>`) in every hierarchy, deepest first. Cgroups that
/// still hold processes stay and are reported.
pub fn remove_cgroup_tree(path: &str) -> std::io::Result<()> {
    let mut failed = vec![];
    for dir in cgroup_dirs(path) {
        if !dir.exists() {
            continue;
        }
        let mut all = vec![];
        collect_dirs(&dir, &mut all);
        all.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for d in all {
            if let Err(e) = std::fs::remove_dir(&d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                failed.push(format!("{}: {e}", d.display()));
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(std::io::Error::other(failed.join("; ")))
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                collect_dirs(&e.path(), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let d = vec!["sha256:a".to_string(), "sha256:b".to_string()];
        let c = chain_ids(&d);
        assert_eq!(c[0], "sha256:a");
        assert_eq!(c[1], sha256(b"sha256:a sha256:b"));
    }

    #[test]
    fn kubernetes_command_and_args_rules() {
        let img = ImageConfig {
            entrypoint: vec!["/ep".into()],
            cmd: vec!["c1".into()],
            ..Default::default()
        };
        let mut cfg = ContainerConfig::new("x", "busybox", "/skiff/n/p/c", TaskIo::Null);
        assert_eq!(container_args(&cfg, &img), ["/ep", "c1"]);
        cfg.args = vec!["a1".into()];
        assert_eq!(container_args(&cfg, &img), ["/ep", "a1"]);
        cfg.command = vec!["/cmd".into()];
        assert_eq!(container_args(&cfg, &img), ["/cmd", "a1"]);
        cfg.args.clear();
        assert_eq!(container_args(&cfg, &img), ["/cmd"]);
    }
}
