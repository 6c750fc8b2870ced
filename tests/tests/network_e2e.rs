//! eBPF pod networking end to end, on the topology of `cargo xtask up` (see
//! support/net_cluster.rs): a bridge and one network namespace per node, a real control
//! plane on the bridge's host address, and three real skiff-agent processes, each inside
//! its node namespace with `--pod-network ebpf`.
//!
//! Pods are real (busybox containers through containerd). TCP runs between containers
//! (httpd and nc); UDP, ICMP and the long TCP stream run from this process inside the
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
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use skiff_agent::cni::datapath::{DatapathStat, VXLAN_DEVICE, read_pinned_routes};
use support::net_cluster::{NetCluster, in_netns, pin_dir, pod_manifest, pod_netns, stat};
use support::*;

/// `program args...` inside `node`'s namespace.
fn node_cmd(net: &NetCluster, node: &str, program: &str, args: &[&str]) -> Command {
    let mut cmd = net.topo.0.node_command(node, program);
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

/// HTTP on 8080 with httpd (the page is the hostname), TCP echo on 9000 with nc.
const SERVER_SCRIPT: &str = "mkdir -p /www && hostname > /www/index.html && \
     httpd -p 8080 -h /www && nc -ll -p 9000 -e cat";

#[test]
fn pod_network_end_to_end() {
    let tag = std::process::id() % 10000;
    let mut net = NetCluster::start(&format!("nt{tag}"), 93, 3);
    let nodes = net.nodes.clone();
    let (n1, n2, n3) = (nodes[0].clone(), nodes[1].clone(), nodes[2].clone());
    let node_ips = net.node_ips.clone();
    let cidrs = net.cidrs.clone();

    // --- bad input, in an extra namespace with no agent: bpffs missing, a node IP that
    // is not on any interface. The agent refuses, says what to do, and leaves nothing.
    let spare = format!("nt{tag}-x");
    let spare_ip = Ipv4Addr::new(10, 93, 0, 99);
    net.topo
        .0
        .add_node(&spare, spare_ip)
        .expect("spare namespace");
    let not_bpffs = net.dir.join("not-bpffs");
    let cases: [(Ipv4Addr, &std::path::Path, [&str; 2]); 2] = [
        (
            spare_ip,
            &not_bpffs,
            ["not on a bpf filesystem", "mount -t bpf bpf /sys/fs/bpf"],
        ),
        (
            Ipv4Addr::new(10, 93, 0, 98),
            &pin_dir(&spare),
            ["10.93.0.98 is not assigned to any interface", "--node-ip"],
        ),
    ];
    for (ip, pins, wanted) in cases {
        let mut bad = net.agent_command(&spare, &spare, ip);
        bad.arg("--bpffs-dir").arg(pins);
        let out = run_bounded(bad, None, Duration::from_secs(30));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "the agent must refuse to start: {wanted:?}"
        );
        for w in wanted {
            assert!(err.contains(w), "the refusal says {w:?}: {err}");
        }
        let vx = run_bounded(
            node_cmd(&net, &spare, "ip", &["link", "show", VXLAN_DEVICE]),
            None,
            Duration::from_secs(10),
        );
        assert!(
            !vx.status.success(),
            "a refused start leaves no VXLAN device behind"
        );
    }
    let _ = std::fs::remove_dir_all(pin_dir(&spare));
    net.topo
        .0
        .remove_node(&spare)
        .expect("remove the spare namespace");
    assert_eq!(
        net.c.items(&["get", "nodes"]).len(),
        3,
        "refused agents registered no Node"
    );

    // --- pods: a server on node 1 and node 2, a client on node 1.
    // A hostNetwork pod on node 1 serves HTTP on 8081 with the node's address.
    let mut manifests = String::new();
    for (name, node, script) in [
        ("srv-1", &n1, SERVER_SCRIPT),
        ("srv-2", &n2, SERVER_SCRIPT),
        ("cli-1", &n1, "sleep 100000"),
        (
            "host-1",
            &n1,
            "mkdir -p /www && echo host-1 > /www/index.html && httpd -f -p 8081 -h /www",
        ),
    ] {
        manifests.push_str(&pod_manifest(name, "net-e2e", node, &net.image, script));
        if name == "host-1" {
            manifests.push_str("  hostNetwork: true\n");
        }
        manifests.push_str("---\n");
    }
    let pods: BTreeMap<String, (Ipv4Addr, String)> = net.run_pods("net-e2e", 4, &manifests);
    let c = net.c.clone();
    let ip_of = |p: &str| pods[p].0;
    assert_eq!(
        ip_of("host-1"),
        node_ips[&n1],
        "a hostNetwork pod has the node's IP"
    );
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
        net.logs()
    );
    // The agent's /metrics shows the same counters (Prometheus text).
    let metrics = run_bounded(
        {
            let mut cmd = Command::new("curl");
            cmd.args(["-sk", "--max-time", "5"])
                .arg(format!("https://{}:10250/metrics", node_ips[&n1]));
            cmd
        },
        None,
        Duration::from_secs(10),
    );
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let tunnel_out = metrics
        .lines()
        .find_map(|l| l.strip_prefix("skiff_datapath_packets_total{path=\"tunnel_out\"} "))
        .and_then(|v| v.trim().parse::<u64>().ok());
    assert!(
        tunnel_out.is_some_and(|v| v > 0),
        "/metrics of {n1} counts tunnelled packets:\n{metrics}"
    );
    assert!(
        metrics.contains("skiff_lb_map_capacity{map=\"services\"}"),
        "{metrics}"
    );
    // The hostNetwork pod answers on the node's address from a local and a remote pod.
    for (client, dst) in [("cli-1", node_ips[&n1]), ("srv-2", node_ips[&n1])] {
        let body = eventually(
            &format!("{client} -> the hostNetwork pod"),
            Duration::from_secs(30),
            || {
                exec(
                    client,
                    &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {dst} 8081"),
                )
                .and_then(|r| r.lines().last().map(|l| l.trim().to_string()))
                .filter(|l| !l.is_empty())
            },
        );
        assert_eq!(body, "host-1");
    }

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
    let body = in_netns(&net.topo.0.netns_path(&n2), move || raw_http_get(srv1))
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
            net.topo.0.node_command(n, "iptables-save"),
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
            node_cmd(&net, n, "nft", &["list", "ruleset"]),
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
        net.start_agent(n);
    }
    let at_restart = echoed.load(Ordering::SeqCst);
    eventually(
        "the stream continues after the restarts",
        Duration::from_secs(20),
        || (echoed.load(Ordering::SeqCst) > at_restart + 20).then_some(()),
    );
    stop.store(true, Ordering::SeqCst);
    let r = stream.join().unwrap();
    assert!(r.is_ok(), "the TCP stream broke: {r:?}\n{}", net.logs());
    // The restarted agents still deliver (new connections, both directions).
    let body = eventually(
        "cli-1 -> srv-2 after the restarts",
        Duration::from_secs(30),
        || http_get("cli-1", srv2_ip),
    );
    assert_eq!(body, "srv-2");

    // --- a node leaves: its agent stops, the Node is deleted, its CIDR leaves the maps.
    net.stop_agent(&n3);
    net.c.kubectl(&["delete", "node", &n3]);
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
            node_cmd(&net, n, "ip", &["-4", "route", "show", "dev", VXLAN_DEVICE]),
            None,
            Duration::from_secs(10),
        );
        let text = String::from_utf8_lossy(&kernel.stdout);
        assert!(
            !text.contains(&cidrs[&n3].to_string()),
            "{n}'s kernel routes still lead to {n3}: {text}"
        );
    }

    net.c.kubectl(&[
        "delete",
        "pods",
        "-l",
        "app=net-e2e",
        "--wait=true",
        "--timeout=60s",
    ]);
}
