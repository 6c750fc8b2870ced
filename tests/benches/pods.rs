//! `cargo xtask bench pods`: pod startup latency on one skiff-agent.
//!
//! Starts a local registry with the busybox image, containerd, the control plane
//! (skiff-apiserver, -controller-manager, -scheduler) and one agent (node bench-1), pre-pulls
//! the image (one pod, Running, deleted), then creates N pods (busybox `sleep 3600`, each
//! its own Pod object, all at once through the kube client) and measures for each the
//! time from its create call to phase Running seen on a watch. Prints p50/p99/max and
//! the agent's idle RSS (VmRSS, after the pods are deleted and 5 s of idle) as a Markdown
//! table, and the goal line (p50 < 1 s).
//!
//! With cargo bench's `--bench` flag: 50 pods (`--pods N` to change). Without it (as
//! under `cargo test --benches`): 5 pods, a quick smoke test.
//!
//! Binaries: the ones next to this executable (target/release for `cargo bench`), else
//! those of target/debug. Needs root and the packages of `cargo xtask setup`. Everything
//! it creates is removed by Drop guards (processes by pid, netns, veths, cgroups, files
//! under /tmp/skiff-bench-pods-<pid>).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;
use skiff_agent::kubelet::{containerd_process::ContainerdProcess, test_images::LocalRegistry};
use support::{Cluster, Proc, bin_dir, eventually, start_apiserver};

const NODE: &str = "bench-1";
const LABEL: &str = "skiff-bench=pods";

/// The binary `name` of this profile, else of target/debug.
fn find_binary(name: &str) -> PathBuf {
    let own = bin_dir().join(name);
    if own.is_file() {
        return own;
    }
    let debug = bin_dir()
        .parent()
        .map(|t| t.join("debug").join(name))
        .filter(|p| p.is_file());
    debug.unwrap_or_else(|| {
        panic!(
            "{} is missing: run `cargo build --release -p skiff-agent -p skiff-control --bins`",
            own.display()
        )
    })
}

fn pod(name: &str, image: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"skiff-bench": "pods"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{
                "name": "c",
                "image": image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["sleep", "3600"],
            }],
        },
    }))
    .expect("pod")
}

/// One pod's startup, split where the watch can see it: bound = spec.nodeName set.
struct Phases {
    create_to_running: Duration,
    create_to_bound: Duration,
    bound_to_running: Duration,
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: usize) -> Duration {
    let i = (v.len() * p).div_ceil(100).max(1) - 1;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn vm_rss_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

async fn delete_all(api: &Api<Pod>) {
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let _ = api
        .delete_collection(&dp, &ListParams::default().labels(LABEL))
        .await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = api
            .list(&ListParams::default().labels(LABEL))
            .await
            .map(|l| l.items.len())
            .unwrap_or(usize::MAX);
        if left == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "{left} bench pods not deleted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let n: usize = args
        .iter()
        .position(|a| a == "--pods")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(if bench { 50 } else { 5 });
    support::require_root_and(
        "the pods bench",
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            support::KUBECTL,
        ],
    );
    let apiserver_bin = find_binary("skiff-apiserver");
    let cm_bin = find_binary("skiff-controller-manager");
    let sched_bin = find_binary("skiff-scheduler");
    let agent_bin = find_binary("skiff-agent");
    println!("binaries: {}", agent_bin.parent().unwrap().display());

    let (dir, _cleanup) = support::test_dir("skiff-bench-pods", vec![NODE.to_string()]);
    let rt = support::tokio_runtime();
    let _ = rustls::crypto::ring::default_provider().install_default();

    let registry = LocalRegistry::start(dir.join("registry")).expect("start docker-registry");
    let image = support::push_busybox(&rt, &registry);
    let containerd = ContainerdProcess::start(dir.join("ctrd")).expect("start containerd");

    let (apiserver, kubeconfig) = start_apiserver(&dir, "127.0.0.1", &apiserver_bin);
    let c = Cluster::new(&dir, &kubeconfig);
    let component =
        |name: &str, bin: &Path| support::spawn_component(name, &dir, bin, &kubeconfig, &[]);
    let mut cm = component("controller-manager", &cm_bin);
    let mut sched = component("scheduler", &sched_bin);
    cm.wait_stdout("is the leader", Duration::from_secs(30));
    sched.wait_stdout("is the leader", Duration::from_secs(30));
    let mut agent = Proc::spawn(
        NODE,
        &dir,
        support::agent_command(&agent_bin, NODE, &kubeconfig, containerd.socket(), &dir)
            .args(["--insecure-registry", &registry.host()])
            .args(["--port", "0", "--pod-network", "host-routes"]),
    );
    agent.wait_stdout(
        &format!("skiff-agent {NODE} ready"),
        Duration::from_secs(30),
    );
    let agent_pid = agent.child.as_ref().expect("agent").id();
    eventually("node Ready with a podCIDR", Duration::from_secs(30), || {
        let n = c.json(&["get", "node", NODE]);
        let ready = n["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        (ready && n["spec"]["podCIDR"].is_string()).then_some(())
    });

    let result = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kube config");
        let client = Client::try_from(cfg).expect("kube client");
        let api: Api<Pod> = Api::namespaced(client, "default");

        // Running times from a watch, by pod name; bound times (nodeName set) beside them,
        // to split the latency between the control plane and the agent.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let bound_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let w = api.clone();
        let bound = bound_at.clone();
        let watch = tokio::spawn(async move {
            let mut s = watcher(w, watcher::Config::default().labels(LABEL))
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(ev) = s.next().await {
                let Ok(p) = ev else { continue };
                if p.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
                    let mut b = bound.lock().unwrap();
                    b.entry(p.name_any()).or_insert_with(Instant::now);
                }
                if running(&p) && tx.send((p.name_any(), Instant::now())).is_err() {
                    return;
                }
            }
        });

        // Pre-pull: one pod Running, then deleted.
        let t = Instant::now();
        api.create(&PostParams::default(), &pod("warmup", &image))
            .await
            .expect("create warmup");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = tokio::time::timeout_at(deadline.into(), rx.recv())
                .await
                .expect("warmup pod not Running within 120 s")
                .expect("watch ended");
            if r.0 == "warmup" {
                break;
            }
        }
        let warm = t.elapsed();
        delete_all(&api).await;
        while rx.try_recv().is_ok() {}

        // N pods at once.
        let creates = (0..n).map(|i| {
            let api = api.clone();
            let p = pod(&format!("bench-{i}"), &image);
            async move {
                let t0 = Instant::now();
                api.create(&PostParams::default(), &p)
                    .await
                    .unwrap_or_else(|e| panic!("create {}: {e}", p.name_any()));
                (p.name_any(), t0)
            }
        });
        let started: HashMap<String, Instant> = futures::future::join_all(creates)
            .await
            .into_iter()
            .collect();
        let mut running_at: HashMap<String, Instant> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(300);
        while running_at.len() < n {
            let Ok(Some((name, at))) = tokio::time::timeout_at(deadline.into(), rx.recv()).await
            else {
                panic!("only {} of {n} pods Running within 300 s", running_at.len());
            };
            if started.contains_key(&name) {
                running_at.entry(name).or_insert(at);
            }
        }
        watch.abort();
        delete_all(&api).await;
        let bound = bound_at.lock().unwrap();
        let phases = running_at
            .iter()
            .map(|(name, running)| {
                let created = started[name];
                // A pod seen Running in its first event was bound no later than that.
                let bound = bound.get(name).copied().unwrap_or(*running);
                Phases {
                    create_to_running: running.saturating_duration_since(created),
                    create_to_bound: bound.saturating_duration_since(created),
                    bound_to_running: running.saturating_duration_since(bound),
                }
            })
            .collect::<Vec<_>>();
        (warm, phases)
    });
    let (warm, phases) = result;
    let sorted = |f: fn(&Phases) -> Duration| {
        let mut v: Vec<Duration> = phases.iter().map(f).collect();
        v.sort();
        v
    };
    let lat = sorted(|p| p.create_to_running);
    let to_bound = sorted(|p| p.create_to_bound);
    let to_running = sorted(|p| p.bound_to_running);
    // The agent removes the containers after the pods are gone from the API: idle 5 s.
    std::thread::sleep(Duration::from_secs(5));
    let rss = vm_rss_kib(agent_pid);

    let p50 = pct(&lat, 50);
    println!();
    println!("### pods: create -> Running on one skiff-agent ({n} pods at once)");
    println!();
    println!("| metric | value |");
    println!("|---|---|");
    println!("| pods | {n} |");
    println!("| warm-up pod (image pull) | {} |", ms(warm));
    println!("| p50 create -> Running | {} |", ms(p50));
    println!("| p99 create -> Running | {} |", ms(pct(&lat, 99)));
    println!("| max create -> Running | {} |", ms(*lat.last().unwrap()));
    println!(
        "| p50 / p99 create -> bound (control plane) | {} / {} |",
        ms(pct(&to_bound, 50)),
        ms(pct(&to_bound, 99))
    );
    println!(
        "| p50 / p99 bound -> Running (agent) | {} / {} |",
        ms(pct(&to_running, 50)),
        ms(pct(&to_running, 99))
    );
    println!(
        "| agent idle RSS (VmRSS) | {} |",
        rss.map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
    );
    println!();
    println!(
        "goal: p50 < 1 s: {} (p50 {})",
        if p50 < Duration::from_secs(1) {
            "met"
        } else {
            "NOT met"
        },
        ms(p50)
    );

    drop(agent);
    drop(sched);
    drop(cm);
    drop(apiserver);
    drop(containerd);
    drop(registry);
}
