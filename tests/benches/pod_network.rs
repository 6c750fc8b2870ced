//! `cargo xtask bench pod-network`: pod-to-pod throughput and TCP_RR-style latency on the
//! eBPF data path, against node-to-node over the same bridge (the limit).
//!
//! Starts a two-node cluster on the topology of `cargo xtask up` (support/net_cluster.rs:
//! a bridge, one network namespace per node, the control plane, one skiff-agent per node
//! with `--pod-network ebpf`), runs three busybox pods (`sleep 100000`): a and b on node
//! 1, c on node 2, and measures three paths in the same run:
//!
//! - pod-to-pod on one node (a -> b: veth, redirect_peer),
//! - pod-to-pod across nodes (a -> c: veth, VXLAN tunnel, bridge),
//! - node-to-node (node 1's namespace -> node 2's, plain TCP over the bridge): the limit
//!   for the cross-node pod path.
//!
//! For each path: throughput with the host's iperf3 (`nsenter --net=<netns> iperf3`, a
//! one-off server bound to the server's IP, Gbit/s = end.sum_received of the client's
//! JSON), and TCP_RR-style latency without netperf (a server thread inside the server's
//! namespace echoes 1-byte messages on one TCP connection; a client thread inside the
//! client's namespace does N request/response round trips with TCP_NODELAY, timing each).
//! The tools run in the pods' network namespaces (not inside the containers), which is
//! the same kernel and eBPF path.
//!
//! Prints a Markdown table (path, Gbit/s, RR p50/p99 µs, transactions/s), the ratios of
//! each pod path to node-to-node, and writes target/bench/pod-network.json.
//!
//! With cargo bench's `--bench` flag: iperf3 `-t 5 -O 1` (one omitted warm-up second)
//! and 5000 round trips. With `--quick`, or without `--bench` (as under
//! `cargo test --benches`): `-t 1` and 200 round trips, a smoke test that still asserts
//! every throughput > 0 and every round-trip series complete.
//!
//! Needs root, the packages of `cargo xtask setup` (iperf3) and the binaries next to this
//! executable: `cargo build --release -p skiff-agent -p skiff-control --bins` for
//! `cargo bench` (`cargo xtask bench pod-network` builds them), target/debug ones for
//! `cargo test --benches`. Everything is removed on drop (iperf3 servers and agents by
//! pid, pod networks, pins, namespaces, the bridge, /tmp/skiff-bpn).

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use skiff_testbed::nsenter_command;
use support::net_cluster::{NetCluster, in_netns, pod_manifest, pod_netns};
use support::{Proc, run_bounded};

const IPERF3: &str = "/usr/bin/iperf3";
const LABEL: &str = "bench-net";
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7001;
/// Bytes per request and per response (netperf TCP_RR's default is 1).
const RR_BYTES: usize = 1;
/// Untimed round trips before the measured ones.
const RR_WARMUP: usize = 20;
/// Upper bound on one path's round trips (all of them), and on one read or write.
const RR_BUDGET: Duration = Duration::from_secs(60);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Copy)]
struct Sizes {
    quick: bool,
    iperf_secs: u32,
    iperf_omit: u32,
    round_trips: usize,
}

/// One side of a path: a network namespace and the address the server binds.
#[derive(Clone)]
struct End {
    name: String,
    netns: PathBuf,
    ip: Ipv4Addr,
}

struct Rr {
    round_trips: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    per_sec: f64,
}

struct PathResult {
    key: &'static str,
    label: &'static str,
    client: End,
    server: End,
    gbps: f64,
    retransmits: Option<u64>,
    rr: Rr,
}

/// Throughput from `client` to `server` with iperf3, in bit/s (and the sender's
/// retransmits).
fn iperf3(dir: &Path, key: &str, client: &End, server: &End, sizes: Sizes) -> (f64, Option<u64>) {
    // nsenter execs iperf3, so the Proc's pid is iperf3's: stopped by pid on drop.
    let mut srv = nsenter_command(&server.netns, IPERF3);
    srv.args(["-s", "-1", "-B", &server.ip.to_string()])
        .args(["-p", &IPERF_PORT.to_string()]);
    let mut srv = Proc::spawn(&format!("iperf3-server-{key}"), dir, &mut srv);

    let run_for = Duration::from_secs(u64::from(sizes.iperf_secs + sizes.iperf_omit));
    // The server may not listen yet: retry while the client cannot connect.
    let deadline = Instant::now() + Duration::from_secs(20);
    let doc = loop {
        let mut cmd = nsenter_command(&client.netns, IPERF3);
        cmd.args(["-c", &server.ip.to_string(), "-p", &IPERF_PORT.to_string()])
            .args(["-t", &sizes.iperf_secs.to_string()])
            .args(["--connect-timeout", "3000", "-J"]);
        if sizes.iperf_omit > 0 {
            cmd.args(["-O", &sizes.iperf_omit.to_string()]);
        }
        let out = run_bounded(cmd, None, run_for + Duration::from_secs(30));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let doc: Value = serde_json::from_str(&stdout).unwrap_or(Value::Null);
        if out.status.success() && doc["error"].is_null() {
            break doc;
        }
        let error = doc["error"].as_str().unwrap_or_default().to_string();
        let refused = error.contains("unable to connect") || error.contains("refused");
        assert!(
            refused && Instant::now() < deadline,
            "iperf3 {} -> {} ({key}) failed: {} {error}\n{}\n{}",
            client.name,
            server.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            srv.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    srv.stop();
    let end = &doc["end"];
    let bps = end["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 JSON without end.sum_received.bits_per_second: {end}"));
    (bps, end["sum_sent"]["retransmits"].as_u64())
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: usize) -> Duration {
    let i = (v.len() * p).div_ceil(100).max(1) - 1;
    v[i.min(v.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `n` request/response round trips of `RR_BYTES` from `client`'s namespace to an echo
/// server in `server`'s, on one TCP connection with TCP_NODELAY on both sides.
fn tcp_rr(client: &End, server: &End, n: usize) -> Rr {
    let total = RR_WARMUP + n;
    let ip = server.ip;
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let srv = in_netns(&server.netns, move || -> Result<usize, String> {
        let listener = match TcpListener::bind((ip, RR_PORT)) {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("bind {ip}:{RR_PORT}: {e}");
                let _ = ready_tx.send(Err(msg.clone()));
                return Err(msg);
            }
        };
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        let _ = ready_tx.send(Ok(()));
        // Accept one connection, bounded.
        let deadline = Instant::now() + IO_TIMEOUT * 2;
        let mut s = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err("no connection within 10 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(format!("accept: {e}")),
            }
        };
        s.set_nonblocking(false).map_err(|e| e.to_string())?;
        s.set_nodelay(true).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        s.set_write_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; RR_BYTES];
        let mut served = 0;
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(served),
                Err(e) => return Err(format!("read after {served}: {e}")),
            }
            s.write_all(&buf)
                .map_err(|e| format!("write after {served}: {e}"))?;
            served += 1;
        }
    });
    match ready_rx.recv_timeout(IO_TIMEOUT) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("RR server in {}: {e}", server.name),
        Err(e) => panic!("RR server in {} not ready: {e}", server.name),
    }

    let cli = in_netns(
        &client.netns,
        move || -> Result<(Vec<Duration>, Duration), String> {
            let mut s = TcpStream::connect_timeout(&(ip, RR_PORT).into(), IO_TIMEOUT)
                .map_err(|e| format!("connect {ip}:{RR_PORT}: {e}"))?;
            s.set_nodelay(true).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            s.set_write_timeout(Some(IO_TIMEOUT))
                .map_err(|e| e.to_string())?;
            let req = [0x5au8; RR_BYTES];
            let mut resp = [0u8; RR_BYTES];
            let mut rtts = Vec::with_capacity(n);
            let budget = Instant::now() + RR_BUDGET;
            let mut started = Instant::now();
            for i in 0..total {
                if i == RR_WARMUP {
                    started = Instant::now();
                }
                let t = Instant::now();
                s.write_all(&req).map_err(|e| format!("write {i}: {e}"))?;
                s.read_exact(&mut resp)
                    .map_err(|e| format!("read {i}: {e}"))?;
                let rtt = t.elapsed();
                if resp != req {
                    return Err(format!("round trip {i}: echoed {resp:?}"));
                }
                if i >= RR_WARMUP {
                    rtts.push(rtt);
                }
                if Instant::now() > budget {
                    break;
                }
            }
            Ok((rtts, started.elapsed()))
        },
    );
    let (mut rtts, wall) = cli
        .join()
        .expect("RR client thread")
        .unwrap_or_else(|e| panic!("RR client {} -> {}: {e}", client.name, server.name));
    // The client's socket is closed: the server sees EOF.
    let served = srv
        .join()
        .expect("RR server thread")
        .unwrap_or_else(|e| panic!("RR server in {}: {e}", server.name));
    assert_eq!(
        rtts.len(),
        n,
        "RR {} -> {}: only {} of {n} round trips within {RR_BUDGET:?}",
        client.name,
        server.name,
        rtts.len()
    );
    assert_eq!(served, total, "RR server in {} echoed", server.name);
    rtts.sort();
    Rr {
        round_trips: rtts.len(),
        p50_us: us(pct(&rtts, 50)),
        p99_us: us(pct(&rtts, 99)),
        max_us: us(*rtts.last().expect("round trips")),
        per_sec: rtts.len() as f64 / wall.as_secs_f64(),
    }
}

fn measure(
    net: &NetCluster,
    key: &'static str,
    label: &'static str,
    client: End,
    server: End,
    sizes: Sizes,
) -> PathResult {
    eprintln!(
        "[pod-network] {label}: {} ({}) -> {} ({})",
        client.name, client.ip, server.name, server.ip
    );
    let rr = tcp_rr(&client, &server, sizes.round_trips);
    let (bps, retransmits) = iperf3(&net.dir, key, &client, &server, sizes);
    assert!(
        bps > 0.0,
        "{label}: iperf3 measured {bps} bit/s from {} to {}",
        client.name,
        server.name
    );
    PathResult {
        key,
        label,
        client,
        server,
        gbps: bps / 1e9,
        retransmits,
        rr,
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::NAN }
}

fn first_line(cmd: &mut std::process::Command) -> String {
    cmd.output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let bench = args.iter().any(|a| a == "--bench");
    let quick = !bench || args.iter().any(|a| a == "--quick");
    for a in &args {
        if a != "--bench" && a != "--quick" {
            eprintln!("[pod-network] ignoring argument {a:?} (known: --quick)");
        }
    }
    let sizes = if quick {
        Sizes {
            quick,
            iperf_secs: 1,
            iperf_omit: 0,
            round_trips: 200,
        }
    } else {
        Sizes {
            quick,
            iperf_secs: 5,
            iperf_omit: 1,
            round_trips: 5000,
        }
    };
    support::require_root_and(
        "the pod-network bench",
        &[
            IPERF3,
            "/usr/bin/nsenter",
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            support::KUBECTL,
        ],
    );
    let wall = Instant::now();

    let net = NetCluster::start("bpn", 94, 2);
    println!(
        "binaries: {}",
        support::binary("skiff-agent").parent().unwrap().display()
    );
    let (n1, n2) = (net.nodes[0].clone(), net.nodes[1].clone());
    let mut manifests = String::new();
    for (name, node) in [("a", &n1), ("b", &n1), ("c", &n2)] {
        manifests.push_str(&pod_manifest(name, LABEL, node, &net.image, "sleep 100000"));
        manifests.push_str("---\n");
    }
    let pods = net.run_pods(LABEL, 3, &manifests);
    let pod = |name: &str| End {
        name: format!("pod {name}"),
        netns: pod_netns(&pods[name].1),
        ip: pods[name].0,
    };
    let node = |n: &str| End {
        name: format!("node {n}"),
        netns: net.topo.0.netns_path(n),
        ip: net.node_ips[n],
    };

    let results = [
        measure(
            &net,
            "pod_same_node",
            "pod-to-pod, same node (a -> b)",
            pod("a"),
            pod("b"),
            sizes,
        ),
        measure(
            &net,
            "pod_cross_node",
            "pod-to-pod, across nodes (a -> c)",
            pod("a"),
            pod("c"),
            sizes,
        ),
        measure(
            &net,
            "node_to_node",
            "node-to-node over the bridge (limit)",
            node(&n1),
            node(&n2),
            sizes,
        ),
    ];
    let [same, cross, limit] = &results;

    println!();
    println!(
        "### pod-network: iperf3 -t {}{}, {} TCP_RR round trips of {RR_BYTES} byte{}",
        sizes.iperf_secs,
        if sizes.iperf_omit > 0 {
            format!(" -O {}", sizes.iperf_omit)
        } else {
            String::new()
        },
        sizes.round_trips,
        if quick { " (quick)" } else { "" }
    );
    println!();
    println!("| path | Gbit/s | RR p50 µs | RR p99 µs | trans/s |");
    println!("|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.0} |",
            r.label, r.gbps, r.rr.p50_us, r.rr.p99_us, r.rr.per_sec
        );
    }
    println!();
    println!("| ratio vs node-to-node | throughput | RR p50 latency | RR p99 latency |");
    println!("|---|---|---|---|");
    for r in [cross, same] {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.label,
            ratio(r.gbps, limit.gbps),
            ratio(r.rr.p50_us, limit.rr.p50_us),
            ratio(r.rr.p99_us, limit.rr.p99_us),
        );
    }
    println!();
    println!("(throughput ratio < 1 and latency ratio > 1: slower than node-to-node)");

    let path_json = |r: &PathResult| {
        json!({
            "label": r.label,
            "client": {"name": r.client.name, "ip": r.client.ip.to_string()},
            "server": {"name": r.server.name, "ip": r.server.ip.to_string()},
            "throughput_gbit_per_second": r.gbps,
            "iperf3_retransmits": r.retransmits,
            "rr": {
                "round_trips": r.rr.round_trips,
                "p50_us": r.rr.p50_us,
                "p99_us": r.rr.p99_us,
                "max_us": r.rr.max_us,
                "transactions_per_second": r.rr.per_sec,
            },
        })
    };
    let ratios = |r: &PathResult| {
        json!({
            "throughput": ratio(r.gbps, limit.gbps),
            "rr_p50_latency": ratio(r.rr.p50_us, limit.rr.p50_us),
            "rr_p99_latency": ratio(r.rr.p99_us, limit.rr.p99_us),
            "transactions_per_second": ratio(r.rr.per_sec, limit.rr.per_sec),
        })
    };
    let mut paths = serde_json::Map::new();
    for r in &results {
        paths.insert(r.key.into(), path_json(r));
    }
    let doc = json!({
        "bench": "pod-network",
        "params": {
            "quick": sizes.quick,
            "iperf3_seconds": sizes.iperf_secs,
            "iperf3_omit_seconds": sizes.iperf_omit,
            "rr_round_trips": sizes.round_trips,
            "rr_warmup_round_trips": RR_WARMUP,
            "rr_message_bytes": RR_BYTES,
            "nodes": 2,
            "pod_network": "ebpf",
        },
        "machine": {
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default().trim(),
            "iperf3": first_line(std::process::Command::new(IPERF3).arg("--version")),
            "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        },
        "wall_seconds": wall.elapsed().as_secs_f64(),
        "paths": paths,
        // Pod path ÷ node-to-node: throughput < 1 and latency > 1 mean slower.
        "ratio_vs_node_to_node": {
            "pod_cross_node": ratios(cross),
            "pod_same_node": ratios(same),
        },
    });
    let dir = support::target_dir().join("bench");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    let path = dir.join("pod-network.json");
    // NaN (an empty ratio) is not JSON; serde_json writes it as null.
    let text = serde_json::to_string_pretty(&doc).expect("serialising results");
    std::fs::write(&path, text + "\n")
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    println!("wrote {}", path.display());
    drop(net);
}
