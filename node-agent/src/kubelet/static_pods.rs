//! Static pods: `--manifest-dir DIR`. Every `*.yaml`/`*.yml`/`*.json` file of DIR holding
//! a v1 Pod is run by this agent without the apiserver being the source.
//!
//! Where the data comes from: the directory, polled every [`POLL`] (a changed file is a
//! new pod: its uid is a hash of node, file and content), and the mirror pods in the API.
//! What it decides: one [`super::pod_worker`] per static pod (the same worker as API pods,
//! fed the Pod read from the file under the mirror pod's name), and that each static pod
//! has a mirror pod `<pod>-<node>` in the API (recreated when deleted or stale).
//! Where it writes: mirror pods (create, delete with grace 0); the workers write their
//! status onto the mirror pod (same namespace/name). A removed file stops the pod and
//! deletes its mirror. Malformed files are logged (once per content) and skipped.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{Node, Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, PostParams, Preconditions},
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::{agent::Kubelet, pod_worker};

/// How often the directory and the mirror pods are checked.
pub const POLL: Duration = Duration::from_secs(1);
/// The hash of the static pod (its uid) on its mirror pod.
pub const ANN_MIRROR: &str = "kubernetes.io/config.mirror";
pub const ANN_SOURCE: &str = "kubernetes.io/config.source";
pub const ANN_HASH: &str = "kubernetes.io/config.hash";
/// On the Pod given to a static pod's worker: the uid of the current mirror pod (a new
/// mirror makes the worker write its status again).
pub const ANN_MIRROR_UID: &str = "skiff.io/mirror-uid";

/// Whether `p` is a mirror pod (run from a file, not from the API).
pub fn is_mirror(p: &Pod) -> bool {
    p.annotations().contains_key(ANN_MIRROR)
}

/// One static pod read from a file: the Pod as its worker runs it (name `<pod>-<node>`,
/// uid = hash, spec.nodeName = node, config annotations).
#[derive(Clone)]
pub struct StaticPod {
    pub file: PathBuf,
    pub uid: String,
    pub pod: Pod,
}

fn manifest_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .and_then(|e| e.to_str())
                    .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        })
        .collect();
    v.sort();
    v
}

/// Parses one manifest into the static pod this node runs.
pub fn parse(node: &str, file: &Path, text: &str) -> Result<StaticPod, String> {
    let value: serde_json::Value = if file.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(text).map_err(|e| e.to_string())?
    } else {
        serde_yaml::from_str(text).map_err(|e| e.to_string())?
    };
    if value["apiVersion"] != "v1" || value["kind"] != "Pod" {
        return Err(format!(
            "not a v1 Pod (apiVersion {}, kind {})",
            value["apiVersion"], value["kind"]
        ));
    }
    let mut pod: Pod = serde_json::from_value(value).map_err(|e| e.to_string())?;
    let name = pod
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or("metadata.name is missing")?;
    let ns = pod
        .metadata
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    let spec = pod.spec.as_mut().ok_or("spec is missing")?;
    if spec.containers.is_empty() {
        return Err("spec.containers is empty".into());
    }
    spec.node_name = Some(node.to_string());
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0]);
    h.update(file.to_string_lossy().as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    let hex = hex::encode(h.finalize());
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    );
    pod.metadata.name = Some(format!("{name}-{node}"));
    pod.metadata.namespace = Some(ns);
    pod.metadata.uid = Some(uid.clone());
    pod.metadata.resource_version = None;
    pod.metadata.owner_references = None;
    pod.metadata.deletion_timestamp = None;
    let ann = pod.metadata.annotations.get_or_insert_with(BTreeMap::new);
    ann.insert(ANN_MIRROR.into(), uid.clone());
    ann.insert(ANN_HASH.into(), uid.clone());
    ann.insert(ANN_SOURCE.into(), "file".into());
    pod.status = None;
    Ok(StaticPod {
        file: file.to_path_buf(),
        uid,
        pod,
    })
}

/// Reads every manifest of `dir`; errors are (file, message). Duplicate pod names: the
/// first file (by name) wins.
pub fn load(node: &str, dir: &Path) -> (Vec<StaticPod>, Vec<(PathBuf, String)>) {
    let mut pods: Vec<StaticPod> = Vec::new();
    let mut errs = Vec::new();
    let mut names = HashSet::new();
    for f in manifest_files(dir) {
        let r = std::fs::read_to_string(&f)
            .map_err(|e| e.to_string())
            .and_then(|t| parse(node, &f, &t));
        match r {
            Ok(sp) => {
                let key = (sp.pod.namespace(), sp.pod.name_any());
                if names.insert(key) {
                    pods.push(sp);
                } else {
                    errs.push((f, format!("duplicate pod {}", sp.pod.name_any())));
                }
            }
            Err(e) => errs.push((f, e)),
        }
    }
    (pods, errs)
}

/// The uids of the static pods in the manifest dir (kept by the orphan cleanup at start).
pub fn uids(k: &Kubelet) -> HashSet<String> {
    match &k.cfg.manifest_dir {
        Some(d) => load(&k.cfg.node_name, d)
            .0
            .into_iter()
            .map(|p| p.uid)
            .collect(),
        None => HashSet::new(),
    }
}

struct Running {
    sp: StaticPod,
    tx: watch::Sender<Option<Pod>>,
    task: tokio::task::JoinHandle<()>,
    mirror_uid: Option<String>,
}

/// Runs the static pods of `k.cfg.manifest_dir` until the process ends.
pub async fn run(k: Arc<Kubelet>) {
    let Some(dir) = k.cfg.manifest_dir.clone() else {
        return;
    };
    tracing::info!("static pods from {}", dir.display());
    let node = k.cfg.node_name.clone();
    let mut running: HashMap<String, Running> = HashMap::new();
    let mut logged: HashMap<PathBuf, String> = HashMap::new();
    let mut node_uid: Option<String> = None;
    loop {
        let (pods, errs) = load(&node, &dir);
        let mut now_logged = HashMap::new();
        for (f, e) in errs {
            if logged.get(&f) != Some(&e) {
                tracing::warn!("static pod manifest {}: {e} (skipped)", f.display());
            }
            now_logged.insert(f, e);
        }
        logged = now_logged;
        let want: HashSet<String> = pods.iter().map(|p| p.uid.clone()).collect();
        // Gone or changed: stop the pod, delete its mirror (unless the new version of the
        // same pod took the name).
        let gone: Vec<String> = running
            .keys()
            .filter(|u| !want.contains(*u))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(r) = running.remove(&uid) {
                tracing::info!(pod = %r.sp.pod.name_any(), file = %r.sp.file.display(), "static pod removed");
                let _ = r.tx.send(None);
                let k2 = k.clone();
                tokio::spawn(async move {
                    let _ = r.task.await;
                    delete_mirror(&k2, &r.sp.pod, r.mirror_uid).await;
                });
            }
        }
        for sp in pods {
            let r = running.entry(sp.uid.clone()).or_insert_with(|| {
                tracing::info!(pod = %sp.pod.name_any(), file = %sp.file.display(), "static pod added");
                let (tx, rx) = watch::channel(Some(sp.pod.clone()));
                let task = tokio::spawn(pod_worker::run(k.clone(), sp.uid.clone(), rx));
                Running {
                    sp: sp.clone(),
                    tx,
                    task,
                    mirror_uid: None,
                }
            });
            if node_uid.is_none() {
                node_uid = Api::<Node>::all(k.client.clone())
                    .get_opt(&node)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|n| n.metadata.uid);
            }
            if let Some(m) = ensure_mirror(&k, &r.sp, node_uid.as_deref()).await
                && r.mirror_uid.as_deref() != Some(m.as_str())
            {
                r.mirror_uid = Some(m.clone());
                let mut p = r.sp.pod.clone();
                p.annotations_mut().insert(ANN_MIRROR_UID.into(), m);
                let _ = r.tx.send(Some(p));
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Deletes the mirror pod of `pod` (grace 0), with the uid precondition when given.
async fn delete_mirror(k: &Kubelet, pod: &Pod, uid: Option<String>) {
    let api: Api<Pod> = Api::namespaced(k.client.clone(), &pod.namespace().unwrap_or_default());
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: uid.map(|u| Preconditions {
            uid: Some(u),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&pod.name_any(), &dp).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => tracing::warn!(pod = %pod.name_any(), "deleting mirror pod: {e}"),
    }
}

/// Makes sure the mirror pod of `sp` exists and is current; returns its uid.
async fn ensure_mirror(k: &Kubelet, sp: &StaticPod, node_uid: Option<&str>) -> Option<String> {
    let ns = sp.pod.namespace().unwrap_or_default();
    let name = sp.pod.name_any();
    let api: Api<Pod> = Api::namespaced(k.client.clone(), &ns);
    match api.get_opt(&name).await {
        Ok(Some(m)) => {
            let current = m.metadata.deletion_timestamp.is_none()
                && m.annotations().get(ANN_MIRROR) == Some(&sp.uid);
            if current {
                return m.metadata.uid;
            }
            if !is_mirror(&m) {
                // An API pod took the name: it is not ours to delete.
                tracing::warn!(pod = %name, "a pod that is not a mirror pod has the static pod's name");
                return None;
            }
            // Deleted through the API, or a stale version / foreign pod of that name.
            tracing::info!(pod = %name, "replacing mirror pod");
            delete_mirror(k, &sp.pod, m.metadata.uid.clone()).await;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(pod = %name, "reading mirror pod: {e}");
            return None;
        }
    }
    let mut m = sp.pod.clone();
    m.metadata.uid = None;
    m.metadata.owner_references = node_uid.map(|u| {
        vec![OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: k.cfg.node_name.clone(),
            uid: u.to_string(),
            controller: Some(true),
            block_owner_deletion: None,
        }]
    });
    match api.create(&PostParams::default(), &m).await {
        Ok(p) => {
            tracing::info!(pod = %name, "created mirror pod");
            p.metadata.uid
        }
        Err(kube::Error::Api(e)) if e.code == 409 => None,
        Err(e) => {
            tracing::warn!(pod = %name, "creating mirror pod: {e}");
            None
        }
    }
}
