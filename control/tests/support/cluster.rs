//! A whole control plane for tests and the scheduler benchmark: a real apiserver,
//! controller-manager and scheduler (processes), and hollow nodes running in this
//! process (skiff_control::hollow) standing in for kubelets.

use std::time::Duration;

use serde_json::Value;
use skiff_control::hollow::{HollowCluster, HollowConfig, HollowNode};

use super::{ApiServer, Backend, Component, assert_success, eventually};

pub struct Cluster {
    /// Declared first so it stops (and its tasks abort) before the runtime goes.
    pub hollow: HollowCluster,
    pub scheduler: Component,
    pub controller_manager: Component,
    pub rt: tokio::runtime::Runtime,
    pub api: ApiServer,
}

/// Controller-manager flags that make node failure visible within seconds.
pub const FAST_NODE_LIFECYCLE: &[&str] = &[
    "--node-monitor-grace-period",
    "3",
    "--default-not-ready-toleration-seconds",
    "2",
];

pub struct ClusterOpts<'a> {
    pub backend: Backend,
    pub nodes: Vec<HollowNode>,
    pub hollow: HollowConfig,
    pub controller_manager_args: &'a [&'a str],
    pub scheduler_args: &'a [&'a str],
}

impl Default for ClusterOpts<'_> {
    fn default() -> Self {
        ClusterOpts {
            backend: Backend::Embedded,
            nodes: ["node-1", "node-2", "node-3"]
                .into_iter()
                .map(HollowNode::named)
                .collect(),
            hollow: HollowConfig {
                lease_renew_interval: Duration::from_millis(500),
                ..HollowConfig::default()
            },
            controller_manager_args: &[],
            scheduler_args: &[],
        }
    }
}

impl Cluster {
    pub fn start(opts: ClusterOpts) -> Cluster {
        let api = ApiServer::start(opts.backend);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let client = rt.block_on(api.kube_client());
        let hollow = rt
            .block_on(HollowCluster::start(client, opts.hollow, opts.nodes))
            .unwrap_or_else(|e| panic!("starting hollow nodes: {e:#}"));
        let controller_manager = Component::start(
            &api,
            env!("CARGO_BIN_EXE_skiff-controller-manager"),
            "controller-manager-0",
            opts.controller_manager_args,
        );
        let scheduler = Component::start(
            &api,
            env!("CARGO_BIN_EXE_skiff-scheduler"),
            "scheduler-0",
            opts.scheduler_args,
        );
        controller_manager.wait_leader(Duration::from_secs(30));
        scheduler.wait_leader(Duration::from_secs(30));
        Cluster {
            hollow,
            scheduler,
            controller_manager,
            rt,
            api,
        }
    }

    pub fn client(&self) -> kube::Client {
        self.rt.block_on(self.api.kube_client())
    }

    pub fn add_node(&self, node: HollowNode) {
        self.rt
            .block_on(self.hollow.add(node))
            .unwrap_or_else(|e| panic!("adding a hollow node: {e:#}"));
    }

    /// kubectl that must succeed; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        assert_success(
            &self.api.kubectl(args),
            &format!("kubectl {}", args.join(" ")),
        )
    }

    #[track_caller]
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.ok(&a);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("kubectl {a:?}: bad JSON ({e}):\n{out}"))
    }

    #[track_caller]
    pub fn apply(&self, name: &str, manifest: &str) {
        let f = self.api.write_file(name, manifest);
        self.ok(&["apply", "-f", f.to_str().expect("utf-8 path")]);
    }

    /// Items of `kubectl get <what> -o json` with extra args.
    #[track_caller]
    pub fn items(&self, args: &[&str]) -> Vec<Value> {
        self.json(args)["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Pods with label app=<app> in `ns`, terminating ones included.
    pub fn pods(&self, ns: &str, app: &str) -> Vec<Value> {
        let l = format!("app={app}");
        self.items(&["get", "pods", "-n", ns, "-l", &l])
    }

    /// Waits for exactly `n` pods app=<app>, all Running, Ready, bound, not terminating.
    pub fn wait_ready_pods(&self, ns: &str, app: &str, n: usize, timeout: Duration) -> Vec<Value> {
        eventually(
            &format!("{n} ready pods app={app} in {ns}"),
            timeout,
            || {
                let p = self.pods(ns, app);
                (p.len() == n && p.iter().all(pod_is_ready_and_live)).then_some(p)
            },
        )
    }

    /// Event messages with `reason` about the object named `name` in `ns`.
    pub fn events(&self, ns: &str, name: &str, reason: &str) -> Vec<String> {
        self.items(&["get", "events", "-n", ns])
            .into_iter()
            .filter(|e| e["involvedObject"]["name"] == name && e["reason"] == reason)
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

pub fn pod_is_ready_and_live(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["phase"] == "Running"
        && p["spec"]["nodeName"]
            .as_str()
            .is_some_and(|n| !n.is_empty())
        && p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

pub fn node_of(p: &Value) -> String {
    p["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
