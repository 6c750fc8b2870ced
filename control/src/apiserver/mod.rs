//! apiserver: the only gateway to storage. HTTPS with a generated CA, client
//! certificate and bearer-token authentication, one generic registry for every
//! resource, discovery and OpenAPI for kubectl.

pub mod apply;
pub mod defaults;
pub mod discovery;
pub mod handlers;
pub mod openapi;
pub mod patch;
pub mod protobuf;
pub mod proxy;
pub mod registry;
pub mod resources;
pub mod selectors;
pub mod service_alloc;
pub mod status;
pub mod table;
pub mod tls;
pub mod validation;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::storage::{Store, embedded::EmbeddedStore, etcd::EtcdStore};
use registry::{Registry, WriteOptions};
use validation::FieldValidation;

/// The Kubernetes version skiff's API corresponds to (k8s-openapi's v1_37 types).
pub const KUBE_MINOR: &str = "37";

pub fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": KUBE_MINOR,
        "gitVersion": format!("v1.{KUBE_MINOR}.0-skiff.{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "skiff",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
    })
}

pub struct AppState {
    pub registry: Arc<Registry>,
    pub tokens: tls::TokenFile,
    /// host:port clients use to reach this apiserver (discovery's serverAddress).
    pub advertise: String,
}

#[derive(Debug, Clone)]
pub struct Config {
    /// PKI, kubeconfig and the embedded store live here.
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    /// Address written into the kubeconfig and the `kubernetes` Endpoints.
    pub advertise_address: IpAddr,
    /// Empty: the embedded store in data_dir/state.redb.
    pub etcd_servers: Vec<String>,
    pub token_auth_file: Option<PathBuf>,
}

/// Opens the configured storage backend.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    if config.etcd_servers.is_empty() {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating {}", config.data_dir.display()))?;
        let path = config.data_dir.join("state.redb");
        let store = EmbeddedStore::open(&path)
            .with_context(|| format!("opening embedded store {}", path.display()))?;
        Ok(Arc::new(store))
    } else {
        let store = EtcdStore::connect(&config.etcd_servers)
            .await
            .with_context(|| format!("connecting to etcd at {}", config.etcd_servers.join(",")))?;
        Ok(Arc::new(store))
    }
}

/// A started apiserver: where it listens and where its admin kubeconfig is.
pub struct Running {
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    pub task: tokio::task::JoinHandle<Result<()>>,
}

/// Binds, bootstraps the default objects and serves in a background task.
pub async fn start(config: Config) -> Result<Running> {
    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("binding {}", config.bind))?;
    let addr = listener.local_addr()?;
    let advertise = SocketAddr::new(config.advertise_address, addr.port());
    let mut hosts = vec![config.advertise_address.to_string()];
    if !config.bind.ip().is_unspecified() && config.bind.ip() != config.advertise_address {
        hosts.push(config.bind.ip().to_string());
    }
    let pki = tls::Pki::ensure(&config.data_dir.join("pki"), &hosts)?;
    let kubeconfig = config.data_dir.join("admin.kubeconfig");
    pki.write_kubeconfig("admin", &format!("https://{advertise}"), &kubeconfig)?;
    let tokens = match &config.token_auth_file {
        Some(p) => tls::TokenFile::load(p)?,
        None => tls::TokenFile::default(),
    };
    let store = open_store(&config).await?;
    let registry = Arc::new(Registry::new(store));
    if let Err(e) = bootstrap(&registry, advertise).await {
        // etcd may be down at start; the apiserver still serves (503s) and bootstraps later.
        tracing::warn!(
            "bootstrap incomplete, retrying in the background: {}",
            e.message
        );
        let registry = registry.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                if bootstrap(&registry, advertise).await.is_ok() {
                    break;
                }
            }
        });
    }
    let state = Arc::new(AppState {
        registry,
        tokens,
        advertise: advertise.to_string(),
    });
    let app = axum::Router::new()
        .fallback(handlers::dispatch)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(state);
    let server_config = pki.server_config()?;
    let task = tokio::spawn(tls::serve(listener, server_config, app));
    Ok(Running {
        addr,
        kubeconfig,
        task,
    })
}

/// Logs each request's latency at debug (target `apiserver_requests`), and at info when a
/// non-watch request took longer than a second (the apiserver's "slow request" trace).
async fn log_request(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let watch = uri
        .query()
        .is_some_and(|q| q.contains("watch=true") || q.contains("watch=1"));
    let status = response.status().as_u16();
    if elapsed > std::time::Duration::from_secs(1) && !watch {
        tracing::info!(target: "apiserver_requests", "slow request: {method} {uri} {status} {} ms", elapsed.as_millis());
    } else {
        tracing::debug!(target: "apiserver_requests", "{method} {uri} {status} {:.1} ms", elapsed.as_secs_f64() * 1000.0);
    }
    response
}

/// The objects every cluster has: the four system namespaces and the `kubernetes`
/// Service (10.96.0.1:443) with Endpoints pointing at this apiserver.
async fn bootstrap(reg: &Registry, advertise: SocketAddr) -> Result<(), status::ApiError> {
    let opts = WriteOptions {
        dry_run: false,
        field_validation: FieldValidation::Strict,
        field_manager: "skiff-apiserver".into(),
    };
    let ns_r = resources::by_kind("v1", "Namespace").expect("served");
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
        ignore_exists(reg.create(ns_r, None, obj, &opts).await)?;
    }
    let svc_r = resources::by_kind("v1", "Service").expect("served");
    let svc = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": advertise.port()}]}});
    // Look first: re-creating it after a restart would fail IP allocation, not AlreadyExists.
    match reg.get(svc_r, Some("default"), "kubernetes").await {
        Ok(_) => {}
        Err(e) if e.code == 404 => {
            ignore_exists(reg.create(svc_r, Some("default"), svc, &opts).await)?
        }
        Err(e) => return Err(e),
    }
    let ep_r = resources::by_kind("v1", "Endpoints").expect("served");
    let ep = json!({"apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default", "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": [{"ip": advertise.ip().to_string()}], "ports": [{"name": "https", "port": advertise.port(), "protocol": "TCP"}]}]});
    match reg.get(ep_r, Some("default"), "kubernetes").await {
        Ok(mut old) if old["subsets"] != ep["subsets"] => {
            old["subsets"] = ep["subsets"].clone();
            let name = "kubernetes";
            reg.update(ep_r, Some("default"), name, old, None, &opts)
                .await?;
        }
        Ok(_) => {}
        Err(e) if e.code == 404 => {
            ignore_exists(reg.create(ep_r, Some("default"), ep, &opts).await)?
        }
        Err(e) => return Err(e),
    }
    Ok(())
}

fn ignore_exists(
    r: Result<registry::WriteResult, status::ApiError>,
) -> Result<(), status::ApiError> {
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.reason == "AlreadyExists" => Ok(()),
        Err(e) => Err(e),
    }
}
