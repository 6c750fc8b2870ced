//! `cargo xtask bench programming`: service programming latency, from the API write of an
//! EndpointSlice change to the service map update on every node, at growing numbers of
//! Services.
//!
//! Starts a three-node cluster on the topology of `cargo xtask up` (support/net_cluster.rs:
//! a bridge, one network namespace per node, the control plane, one skiff-agent per node
//! with `--pod-network ebpf` and its maps pinned under /sys/fs/bpf/skiff/<node>). For each
//! size N (in increasing order, on the same cluster) it:
//!
//! 1. creates the Services that are missing up to N through the kube client (ClusterIP,
//!    no selector, one TCP port; at most 32 requests in flight), each with a manual
//!    EndpointSlice (label kubernetes.io/service-name, one ready endpoint 10.200.x.y:8080);
//! 2. waits until every node's pinned SKIFF_SERVICES map holds all N master entries
//!    (slot 0) with one backend: "sync s" is the time from the first create of this step
//!    to that point (ClusterIP allocation and the creates included; for N > the previous
//!    size only the new Services are created, the others are already programmed);
//! 3. makes M changes, one at a time: a merge patch of one Service's EndpointSlice that
//!    toggles it between one and two endpoints. From the moment the PATCH is sent, the
//!    bench reads the pinned maps of all three nodes every 200 µs (at most 10 s) until
//!    the master entry's `count` shows the new number of backends on every node.
//!    Latency = the last node's observation - the PATCH response (0 if every node had it
//!    first); also reported from sending the PATCH (the API write included).
//!
//! Prints a Markdown table (N, create s, sync s, p50/p99/max ms) and the goal line (p99 <
//! 50 ms at every N, flat in N), and writes target/bench/programming.json.
//!
//! With cargo bench's `--bench` flag: N = 10, 1000, 10000 and M = 100 changes per size
//! (`--changes M` to change). With `--quick`, or without `--bench` (as under
//! `cargo test --benches`): N = 10, 100 and M = 20, a smoke test. Both fail if a change does
//! not reach every node within 10 s, or if the whole run exceeds its budget (15 min, 5 min
//! for the smoke sizes; `--budget-minutes M`): then the sizes measured so far are printed
//! and written with `"aborted"` set. On a 2-core machine the 10k size does not fit in 15
//! min: the apiserver's Service creates slow down as N grows (about 5 creates/s near 9k).
//!
//! Needs root, the packages of `cargo xtask setup` and the binaries next to this
//! executable: `cargo build --release -p skiff-agent -p skiff-control --bins` for
//! `cargo bench` (`cargo xtask bench programming` builds them), target/debug ones for
//! `cargo test --benches`. Everything is removed when the cluster drops (processes by pid,
//! pins, namespaces, the bridge, /tmp/skiff-bpg).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use skiff_agent::proxy::{maps::frontend_key, model::Frontend};
use skiff_ebpf_common::{PROTO_TCP, SERVICES_MAP, ServiceEntry, ServiceKey};
use support::net_cluster::{NetCluster, pin_dir};

const NODES: u32 = 3;
const NAMESPACE: &str = "default";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 8080;
/// API requests in flight while creating Services and slices.
const CONCURRENCY: usize = 32;
/// How often a change's wait reads the maps.
const POLL: Duration = Duration::from_micros(200);
/// How long one change may take to reach every node.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two measured changes.
const GAP: Duration = Duration::from_millis(5);

type ServicesMap = BpfHashMap<MapData, ServiceKey, ServiceEntry>;

struct Sizes {
    quick: bool,
    services: Vec<usize>,
    changes: usize,
    budget: Duration,
}

/// One bench Service: its frontend and how many endpoints its slice has now.
struct Svc {
    name: String,
    key: ServiceKey,
    count: u16,
}

struct Step {
    services: usize,
    created: usize,
    create_secs: f64,
    sync_secs: f64,
    /// PATCH response -> every node, sorted.
    lat: Vec<Duration>,
    /// PATCH sent -> every node, sorted.
    lat_send: Vec<Duration>,
    /// PATCH round trips, sorted.
    writes: Vec<Duration>,
}

/// p50, p99, max of sorted `v`, in ms.
fn stats(v: &[Duration]) -> Value {
    json!({
        "p50_ms": ms(pct(v, 50)),
        "p99_ms": ms(pct(v, 99)),
        "max_ms": ms(*v.last().expect("samples")),
    })
}

fn svc_name(i: usize) -> String {
    format!("bpg-{i:05}")
}

/// Endpoint `k` (0 or 1) of Service `i`: 10.200.0.0 + 2i + k + 1, unique per Service.
fn endpoint_ip(i: usize, k: usize) -> Ipv4Addr {
    let base = u32::from(Ipv4Addr::new(10, 200, 0, 0));
    Ipv4Addr::from(base + 2 * i as u32 + k as u32 + 1)
}

fn endpoints(i: usize, count: u16) -> Value {
    Value::Array(
        (0..usize::from(count))
            .map(|k| {
                json!({
                    "addresses": [endpoint_ip(i, k).to_string()],
                    "conditions": {"ready": true},
                })
            })
            .collect(),
    )
}

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": svc_name(i), "labels": {"skiff-bench": "programming"}},
        "spec": {
            "type": "ClusterIP",
            "ports": [{
                "name": "http",
                "port": SERVICE_PORT,
                "protocol": "TCP",
                "targetPort": TARGET_PORT,
            }],
        },
    }))
    .expect("service")
}

fn slice(i: usize) -> EndpointSlice {
    serde_json::from_value(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{}-manual", svc_name(i)),
            "labels": {"kubernetes.io/service-name": svc_name(i), "skiff-bench": "programming"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints(i, 1),
        "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}],
    }))
    .expect("endpointslice")
}

/// Err (the reason to abort) if the run is over its budget.
fn check_budget(start: Instant, budget: Duration, what: &str) -> Result<(), String> {
    if start.elapsed() < budget {
        return Ok(());
    }
    Err(format!(
        "the programming bench exceeded its budget of {} s while {what}; aborted \
         (--budget-minutes M for a longer run, --quick for a shorter one)",
        budget.as_secs()
    ))
}

/// Creates Services `from..to` and their slices; returns their frontends' master keys,
/// or Err when the run goes over its budget. Panics on API errors.
async fn create_services(
    client: &Client,
    from: usize,
    to: usize,
    start: Instant,
    budget: Duration,
) -> Result<Vec<Svc>, String> {
    let svcs: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let t = Instant::now();
    let mut done = 0usize;
    let mut out: Vec<(usize, Svc)> = futures::stream::iter(from..to)
        .map(|i| {
            let (svcs, slices) = (svcs.clone(), slices.clone());
            async move {
                let s = svcs
                    .create(&PostParams::default(), &service(i))
                    .await
                    .unwrap_or_else(|e| panic!("create service {}: {e}", svc_name(i)));
                let ip: Ipv4Addr = s
                    .spec
                    .as_ref()
                    .and_then(|s| s.cluster_ip.as_deref())
                    .and_then(|ip| ip.parse().ok())
                    .unwrap_or_else(|| panic!("service {} has no IPv4 clusterIP", svc_name(i)));
                slices
                    .create(&PostParams::default(), &slice(i))
                    .await
                    .unwrap_or_else(|e| panic!("create endpointslice of {}: {e}", svc_name(i)));
                let f = Frontend {
                    addr: ip,
                    port: SERVICE_PORT,
                    proto: PROTO_TCP,
                };
                Ok::<_, String>((
                    i,
                    Svc {
                        name: svc_name(i),
                        key: frontend_key(&f, 0),
                        count: 1,
                    },
                ))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .and_then(|r| {
            done += 1;
            if done.is_multiple_of(1000) {
                println!(
                    "[programming]   {done}/{} created ({:.1} s)",
                    to - from,
                    t.elapsed().as_secs_f64()
                );
            }
            let over = check_budget(
                start,
                budget,
                &format!("creating Services ({done}/{} created)", to - from),
            );
            futures::future::ready(over.map(|()| r))
        })
        .try_collect()
        .await?;
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, s)| s).collect())
}

fn open_maps(net: &NetCluster) -> Vec<(String, ServicesMap)> {
    net.nodes
        .iter()
        .map(|n| {
            let path = pin_dir(n).join(SERVICES_MAP);
            let data = MapData::from_pin(&path)
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            let map = ServicesMap::try_from(Map::HashMap(data))
                .unwrap_or_else(|e| panic!("{} as a hash map: {e}", path.display()));
            (n.clone(), map)
        })
        .collect()
}

fn count_on(map: &ServicesMap, key: &ServiceKey) -> Option<u16> {
    map.get(key, 0).ok().map(|e| e.count)
}

/// Waits until every node has every Service's master entry with its current count.
fn wait_synced(
    net: &NetCluster,
    maps: &[(String, ServicesMap)],
    svcs: &[Svc],
    start: Instant,
    budget: Duration,
) -> Result<(), String> {
    let mut pending: Vec<Vec<usize>> = vec![(0..svcs.len()).collect(); maps.len()];
    let mut report = Instant::now();
    loop {
        for ((_, map), p) in maps.iter().zip(pending.iter_mut()) {
            p.retain(|&i| count_on(map, &svcs[i].key) != Some(svcs[i].count));
        }
        if pending.iter().all(Vec::is_empty) {
            return Ok(());
        }
        if report.elapsed() > Duration::from_secs(5) {
            report = Instant::now();
            let left: Vec<String> = maps
                .iter()
                .zip(&pending)
                .map(|((n, _), p)| format!("{n}: {} missing", p.len()))
                .collect();
            println!("[programming]   syncing: {}", left.join(", "));
        }
        if start.elapsed() >= budget {
            let left: Vec<String> = maps
                .iter()
                .zip(&pending)
                .filter(|(_, p)| !p.is_empty())
                .map(|((n, _), p)| format!("{n}: {} missing (e.g. {})", p.len(), svcs[p[0]].name))
                .collect();
            eprintln!("{}", net.logs());
            return check_budget(
                start,
                budget,
                &format!(
                    "waiting for the Services in every node's {SERVICES_MAP} ({})",
                    left.join(", ")
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One change's timings.
struct Sample {
    /// PATCH response -> the last node showing the change (0 if all did before it).
    from_response: Duration,
    /// PATCH sent -> the last node showing the change.
    from_send: Duration,
    /// The PATCH round trip.
    write: Duration,
}

/// Toggles Service `i`'s endpoints (1 <-> 2) with a merge patch and reads every node's
/// map until it shows the new count. The maps are read from the moment the PATCH is sent
/// (a node can be programmed before the response arrives).
fn change(
    rt: &tokio::runtime::Runtime,
    net: &NetCluster,
    api: &Api<EndpointSlice>,
    maps: &[(String, ServicesMap)],
    i: usize,
    svc: &mut Svc,
) -> Sample {
    let want = 3 - svc.count;
    let patch = json!({"endpoints": endpoints(i, want)});
    let name = format!("{}-manual", svc.name);
    let api = api.clone();
    let sent = Instant::now();
    let mut write = Some(rt.spawn(async move {
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| format!("patch endpointslice {name}: {e}"))?;
        Ok::<_, String>(Instant::now())
    }));
    let mut written: Option<Instant> = None;
    svc.count = want;
    let mut seen: Vec<Option<Instant>> = vec![None; maps.len()];
    loop {
        for ((_, map), s) in maps.iter().zip(seen.iter_mut()) {
            if s.is_none() && count_on(map, &svc.key) == Some(want) {
                *s = Some(Instant::now());
            }
        }
        if write.as_ref().is_some_and(|w| w.is_finished()) {
            let w = write.take().expect("the write task");
            let at = rt
                .block_on(w)
                .unwrap_or_else(|e| panic!("the PATCH task of {}: {e}", svc.name))
                .unwrap_or_else(|e| panic!("{e}"));
            written = Some(at);
        }
        if written.is_some() && seen.iter().all(Option::is_some) {
            break;
        }
        if sent.elapsed() > CHANGE_TIMEOUT {
            let state: Vec<String> = maps
                .iter()
                .zip(&seen)
                .map(|((n, map), s)| match s {
                    Some(at) => format!("{n}: ok after {:?}", at.duration_since(sent)),
                    None => format!("{n}: count {:?}", count_on(map, &svc.key)),
                })
                .collect();
            panic!(
                "{}'s change to {want} endpoints did not reach every node within \
                 {CHANGE_TIMEOUT:?} of the PATCH (response {}): {}\n{}",
                svc.name,
                if written.is_some() {
                    "received"
                } else {
                    "not received"
                },
                state.join(", "),
                net.logs()
            );
        }
        std::thread::sleep(POLL);
    }
    let last = seen.into_iter().flatten().max().expect("three nodes");
    let written = written.expect("the PATCH response");
    Sample {
        from_response: last.saturating_duration_since(written),
        from_send: last - sent,
        write: written - sent,
    }
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: usize) -> Duration {
    let i = (v.len() * p).div_ceil(100).max(1) - 1;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let wall = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let quick = !bench || args.iter().any(|a| a == "--quick");
    let mut changes_arg = None;
    let mut budget_arg = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--bench" | "--quick" => {}
            "--changes" => {
                changes_arg = Some(
                    it.next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|m| *m > 0)
                        .expect("--changes needs a positive number"),
                )
            }
            "--budget-minutes" => {
                budget_arg = Some(
                    it.next()
                        .and_then(|v| v.parse::<u64>().ok())
                        .filter(|m| *m > 0)
                        .expect("--budget-minutes needs a positive number"),
                )
            }
            other => {
                eprintln!(
                    "[programming] ignoring argument {other:?} (known: --quick, --changes M, --budget-minutes M)"
                )
            }
        }
    }
    let sizes = if quick {
        Sizes {
            quick,
            services: vec![10, 100],
            changes: changes_arg.unwrap_or(20),
            budget: Duration::from_secs(budget_arg.unwrap_or(5) * 60),
        }
    } else {
        Sizes {
            quick,
            services: vec![10, 1000, 10_000],
            changes: changes_arg.unwrap_or(100),
            budget: Duration::from_secs(budget_arg.unwrap_or(15) * 60),
        }
    };
    support::require_root_and(
        "the programming bench",
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            support::KUBECTL,
        ],
    );
    let _ = rustls::crypto::ring::default_provider().install_default();

    // 10.89.0.0/24: outside the Service range 10.96.0.0/12 and the other clusters' subnets.
    let net = NetCluster::start("bpg", 89, NODES);
    println!(
        "binaries: {}",
        support::binary("skiff-agent").parent().unwrap().display()
    );
    println!(
        "[programming] cluster up in {:.1} s",
        wall.elapsed().as_secs_f64()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&net.c.kubeconfig).expect("kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kube config");
        Client::try_from(cfg).expect("kube client")
    });
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), NAMESPACE);
    let maps = open_maps(&net);

    let mut svcs: Vec<Svc> = vec![];
    let mut steps: Vec<Step> = vec![];
    let mut aborted: Option<String> = None;
    for &n in &sizes.services {
        let from = svcs.len();
        println!(
            "[programming] N = {n}: creating Services {from}..{n} ({} at a time)",
            CONCURRENCY
        );
        let t = Instant::now();
        let new = match rt.block_on(create_services(&client, from, n, wall, sizes.budget)) {
            Ok(new) => new,
            Err(e) => {
                aborted = Some(format!("N = {n}: {e}"));
                break;
            }
        };
        let create_secs = t.elapsed().as_secs_f64();
        svcs.extend(new);
        if let Err(e) = wait_synced(&net, &maps, &svcs, wall, sizes.budget) {
            aborted = Some(format!("N = {n}: {e}"));
            break;
        }
        let sync_secs = t.elapsed().as_secs_f64();
        println!(
            "[programming] N = {n}: created {} in {create_secs:.1} s, all {n} on every node \
             after {sync_secs:.1} s",
            n - from
        );
        // Spread the changes over the Services (each toggles 1 <-> 2 endpoints).
        let mut lat = Vec::with_capacity(sizes.changes);
        let mut lat_send = Vec::with_capacity(sizes.changes);
        let mut writes = Vec::with_capacity(sizes.changes);
        for j in 0..sizes.changes {
            if let Err(e) = check_budget(wall, sizes.budget, "measuring changes") {
                aborted = Some(format!("N = {n}: {e}"));
                break;
            }
            let i = (j * 7919) % n;
            let s = change(&rt, &net, &slices, &maps, i, &mut svcs[i]);
            lat.push(s.from_response);
            lat_send.push(s.from_send);
            writes.push(s.write);
            std::thread::sleep(GAP);
        }
        if aborted.is_some() {
            break;
        }
        lat.sort();
        lat_send.sort();
        writes.sort();
        println!(
            "[programming] N = {n}: {} changes, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms \
             (from the PATCH response; from sending it: p50 {:.2} ms, p99 {:.2} ms)",
            lat.len(),
            ms(pct(&lat, 50)),
            ms(pct(&lat, 99)),
            ms(*lat.last().unwrap()),
            ms(pct(&lat_send, 50)),
            ms(pct(&lat_send, 99)),
        );
        steps.push(Step {
            services: n,
            created: n - from,
            create_secs,
            sync_secs,
            lat,
            lat_send,
            writes,
        });
    }

    println!();
    println!(
        "### programming: EndpointSlice write -> service map updated on all {NODES} nodes \
         ({} changes per size{})",
        sizes.changes,
        if quick { ", quick" } else { "" }
    );
    println!();
    println!(
        "| N | create s | full sync s | p50 ms | p99 ms | max ms | p50 from send ms | \
         p99 from send ms | PATCH p50 ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for s in &steps {
        println!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            s.services,
            s.create_secs,
            s.sync_secs,
            ms(pct(&s.lat, 50)),
            ms(pct(&s.lat, 99)),
            ms(*s.lat.last().unwrap()),
            ms(pct(&s.lat_send, 50)),
            ms(pct(&s.lat_send, 99)),
            ms(pct(&s.writes, 50)),
        );
    }
    println!();
    println!(
        "(create s: creating the Services added at this size and their slices through the API, \
         {CONCURRENCY} at a time; full sync s: from the first create to all N master entries \
         with their backend on every node; p50/p99/max: from the PATCH response of an \
         EndpointSlice change to the last node's map showing the new backend count, 0 when \
         every node had it before the response; from send: from sending the PATCH, the \
         write itself included)"
    );
    let worst = steps
        .iter()
        .map(|s| pct(&s.lat, 99))
        .max()
        .unwrap_or_default();
    let met = !steps.is_empty() && worst < Duration::from_millis(50);
    if let (Some(first), Some(last)) = (steps.first(), steps.last()) {
        let growth = ms(pct(&last.lat, 99)) / ms(pct(&first.lat, 99)).max(0.001);
        println!(
            "goal: p99 < 50 ms at every N{}: {} (worst p99 {:.2} ms); p99 at N = {} / p99 at \
             N = {}: {growth:.2}",
            if aborted.is_some() { " measured" } else { "" },
            if met { "met" } else { "NOT met" },
            ms(worst),
            last.services,
            first.services
        );
    }
    if let Some(e) = &aborted {
        println!("ABORTED: {e}");
    }

    let doc = json!({
        "bench": "programming",
        "params": {
            "quick": sizes.quick,
            "services": sizes.services,
            "changes_per_size": sizes.changes,
            "nodes": NODES,
            "create_concurrency": CONCURRENCY,
            "poll_us": POLL.as_micros() as u64,
            "change_timeout_seconds": CHANGE_TIMEOUT.as_secs(),
            "budget_seconds": sizes.budget.as_secs(),
            "latency": "EndpointSlice PATCH response -> master entry count updated in the pinned SKIFF_SERVICES map of every node (0 if before the response)",
            "latency_from_send": "EndpointSlice PATCH sent -> the same",
        },
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default().trim(),
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "wall_seconds": wall.elapsed().as_secs_f64(),
        "goal": {"p99_ms_below": 50, "met": met},
        "aborted": aborted,
        "results": steps.iter().map(|s| json!({
            "services": s.services,
            "services_created": s.created,
            "create_seconds": s.create_secs,
            "full_sync_seconds": s.sync_secs,
            "changes": s.lat.len(),
            "p50_ms": ms(pct(&s.lat, 50)),
            "p99_ms": ms(pct(&s.lat, 99)),
            "max_ms": ms(*s.lat.last().unwrap()),
            "from_send": stats(&s.lat_send),
            "patch_round_trip": stats(&s.writes),
        })).collect::<Vec<_>>(),
    });
    let dir = support::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join("programming.json");
    let text = serde_json::to_string_pretty(&doc).expect("serialising results");
    std::fs::write(&path, text + "\n")
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("wrote {}", path.display());
    drop(maps);
    drop(rt);
    drop(net);
    if let Some(e) = aborted {
        panic!("{e}");
    }
}
