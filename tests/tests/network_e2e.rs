//! eBPF pod networking end to end, on the topology of `cargo xtask up`: a bridge and one
//! network namespace per node (skiff-testbed), a real control plane on the bridge's host
//! address, and three real skiff-agent processes, each inside its node namespace with
//! `--pod-network ebpf` (tc programs on pod veths and on a VXLAN device, maps pinned
//! under /sys/fs/bpf/skiff/<node>).
//!
//! Pods are real (busybox containers through containerd). TCP runs between containers
//! (httpd, wget, nc); UDP, ICMP and the long TCP stream run from this process inside the
//! pods' network namespaces (setns on a thread, or nsenter of the host's ping), which
//! exercises the same kernel path with tools busybox lacks (UDP). The data path's
//! per-CPU counters prove the packets took the eBPF path (redirect_peer, tunnel) rather
//! than a kernel route.
//!
//! Needs root and `cargo build -p skiff-agent -p skiff-control --bins` (xtask test does).

#[path = "support/mod.rs"]
mod support;

use std::{
    collections::BTreeMap,
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};
use skiff_agent::cni::{
    datapath::{DatapathStat, VXLAN_DEVICE, read_pinned_routes, read_pinned_stats},
    network::{Ipv4Net, netns_name},
};
use skiff_agent::kubelet::{
    containerd_process::ContainerdProcess,
    test_images::{LocalRegistry, busybox_image},
};
use skiff_testbed::{Topology, TopologyConfig};
use support::*;

const NODE_COUNT: u32 = 3;

/// Removes the bridge and node namespaces on drop (after the agents stopped).
struct TopologyGuard(Topology);

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.destroy() {
            eprintln!("topology cleanup: {e:#}");
        }
    }
}

/// Removes bpffs pin directories on drop.
struct PinsGuard(Vec<PathBuf>);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn pin_dir(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/skiff").join(node)
}

/// Runs `f` on a thread inside the network namespace at `path`.
fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the pod network namespace");
        f()
    })
}

/// `program args...` inside `node`'s namespace.
fn node_cmd(topo: &Topology, node: &str, program: &str, args: &[&str]) -> Command {
    let mut cmd = topo.node_command(node, program);
    cmd.args(args);
    cmd
}

/// `GET /` on `ip`:8080 from the calling thread's namespace; the body's last line.
fn raw_http_get(ip: Ipv4Addr) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(5))
        .map_err(|e| format!("connect {ip}:8080: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out.lines().last().unwrap_or_default().trim().to_string())
}

fn pod_netns(uid: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(netns_name(uid))
}

fn stat(node: &str, s: DatapathStat) -> u64 {
    read_pinned_stats(&pin_dir(node))
        .expect("read the pinned datapath stats")
        .into_iter()
        .find(|(k, _)| *k == s)
        .map(|(_, c)| c.packets)
        .unwrap_or(0)
}

fn pod_manifest(name: &str, node: &str, image: &str, script: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: net-e2e}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", {script:?}]
"#
    )
}

/// TCP echo over `nc -ll -e cat`, HTTP on 8080 with httpd.
const SERVER_SCRIPT: &str = "mkdir -p /www && hostname > /www/index.html && \
     httpd -p 8080 -h /www && nc -ll -p 9000 -e cat";

#[test]
fn pod_network_end_to_end() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (CI runs as root)"
    );
    let pid = std::process::id();
    let tag = pid % 10000;
    let dir = PathBuf::from(format!("/tmp/skiff-net-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let nodes: Vec<String> = (1..=NODE_COUNT).map(|i| format!("nt{tag}-{i}")).collect();
    let _cleanup = Cleanup {
        dir: dir.clone(),
        nodes: nodes.clone(),
    };
    let _pins = PinsGuard(nodes.iter().map(|n| pin_dir(n)).collect());
    let topo = Topology::new(TopologyConfig {
        bridge: format!("sknt{tag}"),
        host_addr: Ipv4Addr::new(10, 93, 0, 1),
        prefix_len: 24,
        netns_prefix: format!("sknt{tag}-"),
    })
    .expect("topology config");
    topo.ensure().expect("create the test bridge");
    let topo = TopologyGuard(topo);
    let host_ip = Ipv4Addr::new(10, 93, 0, 1);
    let node_ips: BTreeMap<String, Ipv4Addr> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), Ipv4Addr::new(10, 93, 0, 11 + i as u8)))
        .collect();
    for (n, ip) in &node_ips {
        topo.0.add_node(n, *ip).expect("create a node namespace");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let registry = LocalRegistry::start_on(dir.join("registry"), host_ip).expect("registry");
    let image = registry.image_ref("skiff/busybox:1.0");
    rt.block_on(busybox_image().expect("busybox image").push(&image))
        .expect("push busybox");
    let containerd = ContainerdProcess::start(dir.join("ctrd")).expect("start containerd");

    // --- control plane on the bridge's host address.
    let mut apiserver = Proc::spawn(
        "apiserver",
        &dir,
        Command::new(binary("skiff-apiserver"))
            .arg("--data-dir")
            .arg(dir.join("api"))
            .args(["--bind-address", &host_ip.to_string(), "--secure-port", "0"]),
    );
    let out = apiserver.wait_stdout("kubeconfig: ", Duration::from_secs(30));
    let kubeconfig = PathBuf::from(
        out.lines()
            .find_map(|l| l.strip_prefix("kubeconfig: "))
            .expect("kubeconfig line")
            .trim(),
    );
    let c = Cluster {
        dir: dir.clone(),
        kubeconfig: kubeconfig.clone(),
    };
    let mut cm = Proc::spawn(
        "controller-manager",
        &dir,
        Command::new(binary("skiff-controller-manager"))
            .arg("--kubeconfig")
            .arg(&kubeconfig),
    );
    cm.wait_stdout("is the leader", Duration::from_secs(30));

    // --- the bad-input case first, in node 3's namespace: no bpffs at --bpffs-dir.
    let agent_cmd = |node: &str| {
        let mut cmd = topo.0.node_command(node, binary("skiff-agent"));
        cmd.args(["--node-name", node])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--containerd-address")
            .arg(containerd.socket())
            .arg("--root-dir")
            .arg(dir.join(node))
            .args(["--insecure-registry", &registry.host()])
            .args(["--node-ip", &node_ips[node].to_string()])
            .args(["--node-lease-renew-interval", "2", "--sync-frequency", "2"])
            .args(["--port", "10250", "--pod-network", "ebpf"]);
        cmd
    };
    let n3 = nodes[2].clone();
    let mut bad = agent_cmd(&n3);
    bad.arg("--bpffs-dir").arg(dir.join("not-bpffs"));
    let out = run_bounded(bad, None, Duration::from_secs(30));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent must refuse a bpffs-less pin dir"
    );
    assert!(
        err.contains("not on a bpf filesystem") && err.contains("mount -t bpf bpf /sys/fs/bpf"),
        "the refusal says what to do: {err}"
    );
    let vx = run_bounded(
        node_cmd(&topo.0, &n3, "ip", &["link", "show", VXLAN_DEVICE]),
        None,
        Duration::from_secs(10),
    );
    assert!(
        !vx.status.success(),
        "a refused start leaves no VXLAN device behind"
    );

    // --- the agents, each in its node namespace.
    let mut agents: BTreeMap<String, Proc> = BTreeMap::new();
    for n in &nodes {
        let mut cmd = agent_cmd(n);
        cmd.arg("--bpffs-dir").arg(pin_dir(n));
        agents.insert(
            n.clone(),
            Proc::spawn(&format!("agent-{n}"), &dir, &mut cmd),
        );
    }
    for (n, a) in agents.iter_mut() {
        a.wait_stdout(&format!("skiff-agent {n} ready"), Duration::from_secs(60));
    }
    let dump = |agents: &BTreeMap<String, Proc>| -> String {
        agents
            .values()
            .map(Proc::logs)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let cidrs: BTreeMap<String, Ipv4Net> =
        eventually("nodes Ready with podCIDRs", Duration::from_secs(60), || {
            let mut m = BTreeMap::new();
            for n in c.items(&["get", "nodes"]) {
                let ready = n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                if let (true, Some(cidr)) = (
                    ready,
                    n["spec"]["podCIDR"].as_str().and_then(Ipv4Net::parse),
                ) {
                    m.insert(n["metadata"]["name"].as_str()?.to_string(), cidr);
                }
            }
            (m.len() == nodes.len()).then_some(m)
        });
    // Every node's routes map holds every other node's podCIDR and IP.
    for n in &nodes {
        eventually(
            &format!("{n}'s routes map lists the other nodes"),
            Duration::from_secs(30),
            || {
                let routes = read_pinned_routes(&pin_dir(n)).ok()?;
                let ok = nodes.iter().filter(|o| *o != n).all(|o| {
                    routes.get(&cidrs[o]) == Some(&node_ips[o])
                        && routes.get(&Ipv4Net {
                            addr: node_ips[o],
                            prefix: 32,
                        }) == Some(&node_ips[o])
                }) && !routes.contains_key(&cidrs[n]);
                ok.then_some(())
            },
        );
    }

    // --- pods: a server on node 1 and node 2, a client on node 1.
    let (n1, n2) = (nodes[0].clone(), nodes[1].clone());
    let mut manifests = String::new();
    for (name, node, script) in [
        ("srv-1", &n1, SERVER_SCRIPT),
        ("srv-2", &n2, SERVER_SCRIPT),
        ("cli-1", &n1, "sleep 100000"),
    ] {
        manifests.push_str(&pod_manifest(name, node, &image, script));
        manifests.push_str("---\n");
    }
    c.apply(&manifests);
    let pods: BTreeMap<String, (Ipv4Addr, String)> =
        eventually("the pods Running with IPs", Duration::from_secs(90), || {
            let mut m = BTreeMap::new();
            for p in c.items(&["get", "pods", "-l", "app=net-e2e"]) {
                if p["status"]["phase"] != "Running" {
                    return None;
                }
                let ip: Ipv4Addr = p["status"]["podIP"].as_str()?.parse().ok()?;
                m.insert(
                    p["metadata"]["name"].as_str()?.to_string(),
                    (ip, p["metadata"]["uid"].as_str()?.to_string()),
                );
            }
            (m.len() == 3).then_some(m)
        });
    let ip_of = |p: &str| pods[p].0;
    assert!(cidrs[&n1].contains(ip_of("srv-1")) && cidrs[&n2].contains(ip_of("srv-2")));

    let exec = |pod: &str, cmd: &str| -> Option<String> {
        let o = c.kubectl_out(&["exec", pod, "--", "sh", "-c", cmd], None);
        o.status
            .success()
            .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let before_local = stat(&n1, DatapathStat::LocalDelivered);
    let before_tunnel = stat(&n1, DatapathStat::TunnelOut);
    let before_in = stat(&n2, DatapathStat::TunnelIn);

    // TCP, same node and across nodes (container to container; servers answer their
    // name). busybox's wget crashes in a bare static rootfs (NSS), so HTTP goes over nc.
    let http_get = |pod: &str, ip: Ipv4Addr| {
        exec(
            pod,
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 8080"),
        )
        .and_then(|r| r.lines().last().map(|l| l.trim().to_string()))
        .filter(|l| !l.is_empty())
    };
    for target in ["srv-1", "srv-2"] {
        let body = eventually(
            &format!("cli-1 -> {target} over TCP"),
            Duration::from_secs(30),
            || http_get("cli-1", ip_of(target)),
        );
        assert_eq!(body, target, "{target} answered");
    }
    assert!(
        stat(&n1, DatapathStat::LocalDelivered) > before_local,
        "same-node traffic took bpf_redirect_peer"
    );
    assert!(
        stat(&n1, DatapathStat::TunnelOut) > before_tunnel
            && stat(&n2, DatapathStat::TunnelIn) > before_in,
        "cross-node traffic went through the VXLAN tunnel programs\n{}",
        dump(&agents)
    );

    // ICMP: the host's ping inside cli-1's namespace, to both servers and to both nodes.
    for dst in [ip_of("srv-1"), ip_of("srv-2"), node_ips[&n1], node_ips[&n2]] {
        let o = run_bounded(
            {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", pod_netns(&pods["cli-1"].1).display()))
                    .args(["ping", "-c", "2", "-W", "2", &dst.to_string()]);
                cmd
            },
            None,
            Duration::from_secs(20),
        );
        assert!(
            o.status.success(),
            "ping {dst} from cli-1: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    // UDP across nodes: an echo socket in srv-2's namespace, a client in cli-1's.
    let srv2_ip = ip_of("srv-2");
    let server = in_netns(&pod_netns(&pods["srv-2"].1), move || {
        let s = UdpSocket::bind((srv2_ip, 9999)).expect("bind udp in srv-2");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let Ok((n, from)) = s.recv_from(&mut buf) else {
                return;
            };
            let _ = s.send_to(&buf[..n], from);
        }
    });
    let client = in_netns(&pod_netns(&pods["cli-1"].1), move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("bind udp in cli-1");
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 64];
        for _ in 0..3 {
            let _ = s.send_to(b"skiff-udp", (srv2_ip, 9999));
            if let Ok((n, from)) = s.recv_from(&mut buf) {
                return Some((buf[..n].to_vec(), from));
            }
        }
        None
    });
    let reply = client.join().unwrap();
    let _ = server.join();
    assert_eq!(
        reply,
        Some((b"skiff-udp".to_vec(), SocketAddr::from((srv2_ip, 9999)))),
        "UDP echo across nodes"
    );

    // Node -> pod and pod -> node: node 2's namespace fetches from srv-1 (remote pod via
    // the tunnel), cli-1 connects to node 2's kubelet port.
    let srv1 = ip_of("srv-1");
    let body = in_netns(&topo.0.netns_path(&n2), move || raw_http_get(srv1))
        .join()
        .unwrap();
    assert_eq!(body.as_deref(), Ok("srv-1"), "node {n2} -> pod srv-1");
    for n in [&n1, &n2] {
        let ip = node_ips[n];
        eventually(
            &format!("cli-1 -> node {n} TCP 10250"),
            Duration::from_secs(20),
            || {
                exec(
                    "cli-1",
                    &format!("nc -w 3 {ip} 10250 </dev/null && echo ok"),
                )
            },
        );
    }

    // No iptables or nftables rules in any node namespace.
    for n in &nodes {
        let o = run_bounded(
            topo.0.node_command(n, "iptables-save"),
            None,
            Duration::from_secs(20),
        );
        let rules: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("-A"))
            .map(String::from)
            .collect();
        assert!(rules.is_empty(), "iptables rules in {n}: {rules:?}");
        let o = run_bounded(
            node_cmd(&topo.0, n, "nft", &["list", "ruleset"]),
            None,
            Duration::from_secs(20),
        );
        if o.status.success() {
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(
                !text.contains("jump") && !text.contains("dnat") && !text.contains("masquerade"),
                "nftables rules in {n}:\n{text}"
            );
        }
    }

    // --- a TCP stream srv-1 (node 1) <- cli on node 2's pod, across agent restarts.
    let srv1_ip = ip_of("srv-1");
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let stream = {
        let (stop, echoed) = (stop.clone(), echoed.clone());
        in_netns(
            &pod_netns(&pods["srv-2"].1),
            move || -> Result<(), String> {
                let mut s =
                    TcpStream::connect_timeout(&(srv1_ip, 9000).into(), Duration::from_secs(5))
                        .map_err(|e| format!("connect: {e}"))?;
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut i = 0u64;
                let deadline = Instant::now() + Duration::from_secs(180);
                while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                    let msg = format!("{i:08}\n");
                    s.write_all(msg.as_bytes())
                        .map_err(|e| format!("write {i}: {e}"))?;
                    let mut buf = [0u8; 9];
                    s.read_exact(&mut buf)
                        .map_err(|e| format!("read {i}: {e}"))?;
                    if buf != msg.as_bytes() {
                        return Err(format!("echo {i} mismatched"));
                    }
                    echoed.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                    thread::sleep(Duration::from_millis(50));
                }
                Ok(())
            },
        )
    };
    eventually("the stream runs", Duration::from_secs(10), || {
        (echoed.load(Ordering::SeqCst) > 5).then_some(())
    });
    for n in [&n1, &n2] {
        let mut a = agents.remove(n).unwrap();
        a.stop();
        let mut cmd = agent_cmd(n);
        cmd.arg("--bpffs-dir").arg(pin_dir(n));
        let mut a = Proc::spawn(&format!("agent-{n}-restarted"), &dir, &mut cmd);
        a.wait_stdout(&format!("skiff-agent {n} ready"), Duration::from_secs(60));
        agents.insert(n.clone(), a);
    }
    let at_restart = echoed.load(Ordering::SeqCst);
    eventually(
        "the stream continues after the restarts",
        Duration::from_secs(20),
        || (echoed.load(Ordering::SeqCst) > at_restart + 20).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    let r = stream.join().unwrap();
    assert!(r.is_ok(), "the TCP stream broke: {r:?}\n{}", dump(&agents));
    // The restarted agents still deliver (new connections, both directions).
    let body = eventually(
        "cli-1 -> srv-2 after the restarts",
        Duration::from_secs(30),
        || http_get("cli-1", srv2_ip),
    );
    assert_eq!(body, "srv-2");

    // --- a node leaves: its agent stops, the Node is deleted, its CIDR leaves the maps.
    let mut a3 = agents.remove(&n3).unwrap();
    a3.stop();
    c.kubectl(&["delete", "node", &n3]);
    for n in [&n1, &n2] {
        eventually(
            &format!("{n3}'s podCIDR leaves {n}'s routes map"),
            Duration::from_secs(30),
            || {
                let routes = read_pinned_routes(&pin_dir(n)).ok()?;
                (!routes.contains_key(&cidrs[&n3])
                    && !routes.values().any(|ip| *ip == node_ips[&n3]))
                .then_some(())
            },
        );
        let kernel = run_bounded(
            node_cmd(
                &topo.0,
                n,
                "ip",
                &["-4", "route", "show", "dev", VXLAN_DEVICE],
            ),
            None,
            Duration::from_secs(10),
        );
        let text = String::from_utf8_lossy(&kernel.stdout);
        assert!(
            !text.contains(&cidrs[&n3].to_string()),
            "{n}'s kernel routes still lead to {n3}: {text}"
        );
    }

    c.kubectl(&[
        "delete",
        "pods",
        "-l",
        "app=net-e2e",
        "--wait=true",
        "--timeout=60s",
    ]);
    drop(agents);
    drop(cm);
    drop(apiserver);
}
