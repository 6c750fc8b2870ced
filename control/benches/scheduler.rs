//! Scheduler benchmark (`cargo xtask bench scheduler`, or
//! `cargo bench -p skiff-control --bench scheduler [-- --pods N --nodes M]`).
//!
//! A real apiserver, controller-manager and scheduler (release builds) with M hollow
//! nodes (default 100) in this process. Two phases, one run:
//! 1. end to end: create a Deployment of N pods (default 1000) and time until every pod
//!    is bound and Ready — the ReplicaSet's pod creation, the scheduler and the hollow
//!    kubelets' status writes all count;
//! 2. scheduler alone: with the scheduler stopped, N more pods are created and left
//!    pending; a fresh scheduler is started and, once it leads, the time to bind them
//!    all is its own throughput. Like kube-scheduler, it fills its caches while it waits
//!    for the Lease (the killed leader's must expire first), so "leader -> first pod
//!    bound" is what is left of the informer sync after that; the first-to-last rate
//!    does not depend on it.
//!
//! Without cargo bench's `--bench` flag (under `cargo test --bench scheduler`) it runs
//! at smoke size (100 pods on 10 nodes) so the same code is tested in CI.

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;
use skiff_control::hollow::{HollowConfig, HollowNode};
use skiff_control::objects::PodWithoutManagedFields;
use support::Component;
use support::cluster::{Cluster, ClusterOpts};

const NAMESPACE: &str = "bench";
const PHASE_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench scheduler: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    pods: usize,
    nodes: usize,
}

fn args() -> Result<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let full = argv.iter().any(|a| a == "--bench");
    let mut a = if full {
        Args {
            pods: 1000,
            nodes: 100,
        }
    } else {
        Args {
            pods: 100,
            nodes: 10,
        }
    };
    let mut it = argv.iter();
    while let Some(flag) = it.next() {
        let mut value = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a number"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--pods" => a.pods = value("--pods")?,
            "--nodes" => a.nodes = value("--nodes")?,
            "--bench" | "--quick" => {}
            other if other.starts_with("--") => bail!("unknown flag {other}"),
            _ => {}
        }
    }
    Ok(a)
}

fn deployment(name: &str, replicas: usize) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {NAMESPACE}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      containers:
      - name: c
        image: registry.local/bench:1
        resources: {{requests: {{cpu: 100m, memory: 64Mi}}}}
"#
    )
}

/// When each pod of app=<app> was first seen bound, and first seen Ready.
#[derive(Default)]
struct Timeline {
    bound: HashMap<String, Instant>,
    ready: HashMap<String, Instant>,
}

fn watch_pods(c: &Cluster, app: &str) -> Arc<Mutex<Timeline>> {
    let t = Arc::new(Mutex::new(Timeline::default()));
    // Without managedFields: the bench shares the CPUs with what it measures.
    let api: Api<PodWithoutManagedFields> = Api::namespaced(c.client(), NAMESPACE);
    let cfg = watcher::Config::default().labels(&format!("app={app}"));
    let out = t.clone();
    c.rt.spawn(async move {
        let mut events = watcher(api, cfg).boxed();
        while let Some(ev) = events.next().await {
            let Ok(
                watcher::Event::Apply(PodWithoutManagedFields(p))
                | watcher::Event::InitApply(PodWithoutManagedFields(p)),
            ) = ev
            else {
                continue;
            };
            let now = Instant::now();
            let name = p.metadata.name.clone().unwrap_or_default();
            let mut t = out.lock().expect("timeline");
            if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some() {
                t.bound.entry(name.clone()).or_insert(now);
            }
            if skiff_control::objects::is_ready(&p) {
                t.ready.entry(name).or_insert(now);
            }
        }
    });
    t
}

fn wait_for(t: &Mutex<Timeline>, what: &str, n: usize, f: fn(&Timeline) -> usize) -> Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        let got = f(&t.lock().expect("timeline"));
        if got >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {got}/{n} pods {what} after {PHASE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn span(times: &HashMap<String, Instant>, from: Instant) -> Duration {
    times
        .values()
        .max()
        .map(|last| last.duration_since(from))
        .unwrap_or_default()
}

fn run() -> Result<()> {
    let a = args()?;
    println!(
        "scheduler bench: {} pods onto {} hollow nodes ({} build)",
        a.pods,
        a.nodes,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    let nodes = (0..a.nodes)
        .map(|i| HollowNode::named(&format!("hollow-{i:03}")))
        .collect();
    let mut c = Cluster::start(ClusterOpts {
        nodes,
        hollow: HollowConfig {
            cpu: "32".into(),
            memory: "64Gi".into(),
            pods: "110".into(),
            lease_renew_interval: Duration::from_secs(10),
            parallel_writes: 64,
        },
        ..ClusterOpts::default()
    });
    c.ok(&["create", "namespace", NAMESPACE]);

    // Phase 1: Deployment create -> all pods Ready.
    let t1 = watch_pods(&c, "e2e");
    std::thread::sleep(Duration::from_millis(500));
    let start = Instant::now();
    c.apply("e2e.yaml", &deployment("e2e", a.pods));
    wait_for(&t1, "bound", a.pods, |t| t.bound.len())?;
    wait_for(&t1, "ready", a.pods, |t| t.ready.len())?;
    let (bind_span, ready_span) = {
        let t = t1.lock().expect("timeline");
        let first_bind = t.bound.values().min().copied().unwrap_or(start);
        (span(&t.bound, first_bind), span(&t.ready, start))
    };

    // Phase 2: pods already pending, then a fresh scheduler.
    c.scheduler.kill();
    let t2 = watch_pods(&c, "backlog");
    c.apply("backlog.yaml", &deployment("backlog", a.pods));
    let created_by = Instant::now() + PHASE_TIMEOUT;
    loop {
        let n = c.pods(NAMESPACE, "backlog").len();
        if n >= a.pods {
            break;
        }
        if Instant::now() > created_by {
            bail!("only {n}/{} backlog pods created", a.pods);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let bound_early = t2.lock().expect("timeline").bound.len();
    if bound_early > 0 {
        bail!("{bound_early} pods bound with no scheduler running");
    }
    let binds = std::env::var("SKIFF_BENCH_PARALLEL_BINDS").ok();
    let extra: Vec<&str> = match &binds {
        Some(n) => vec!["--parallel-binds", n.as_str()],
        None => vec![],
    };
    let fresh = Component::start(
        &c.api,
        env!("CARGO_BIN_EXE_skiff-scheduler"),
        "scheduler-bench",
        &extra,
    );
    fresh.wait_leader(Duration::from_secs(60));
    let leader_at = Instant::now();
    wait_for(&t2, "bound", a.pods, |t| t.bound.len())?;
    let (backlog_span, first_bind, first_to_last) = {
        let t = t2.lock().expect("timeline");
        let first = t.bound.values().min().copied().unwrap_or(leader_at);
        // The leader line is polled, so bindings may be seen before it: start at
        // whichever came first.
        let from = first.min(leader_at);
        (
            span(&t.bound, from),
            first.saturating_duration_since(leader_at),
            span(&t.bound, first),
        )
    };

    let rate = |n: usize, d: Duration| n as f64 / d.as_secs_f64().max(1e-3);
    println!();
    println!("| measurement | value |");
    println!("|---|---|");
    println!(
        "| Deployment create -> {} pods Ready | {:.2} s |",
        a.pods,
        ready_span.as_secs_f64()
    );
    println!(
        "| pods bound/s while the ReplicaSet creates them | {:.0} |",
        rate(a.pods, bind_span)
    );
    println!(
        "| pods bound/s from a pending backlog (scheduler alone) | {:.0} |",
        rate(a.pods, backlog_span)
    );
    println!(
        "| of which: leader -> first pod bound (caches filled while standing by) | {:.2} s |",
        first_bind.as_secs_f64()
    );
    println!(
        "| pods bound/s from first to last binding (scheduler alone) | {:.0} |",
        rate(a.pods, first_to_last)
    );
    println!("target: >= 500 pods bound/s (scheduler alone)");
    drop(fresh);
    Ok(())
}
