//! eBPF Service load balancing end to end: a real two-node cluster (support/net_cluster:
//! bridge + node namespaces, agents with `--pod-network ebpf`, scheduler and
//! controller-manager), the echo image, and the real kubectl:
//! `kubectl create deployment` + `kubectl expose`, then clients in pods on every node.
//! Clients are `/echo tcp|udp` (skiff-echo's client modes) and busybox nc, run with
//! `kubectl exec` (which joins the pod's cgroup, where the socket programs apply).
//!
//! Needs root and `cargo build -p skiff-agent -p skiff-control --bins`.

#[path = "support/mod.rs"]
mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use skiff_agent::proxy::read_pinned_lb_stats;
use skiff_ebpf_common::LbStat;
use support::net_cluster::{NetCluster, pin_dir, push_echo_image};
use support::*;

/// `kubectl exec <pod> -- <cmd...>`: stdout if it succeeded.
fn exec(c: &Cluster, pod: &str, cmd: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", pod, "--"];
    args.extend_from_slice(cmd);
    let o = c.kubectl_out(&args, None);
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

/// The pod names that answered `count` TCP requests to `addr` from `client`.
fn tcp_backends(c: &Cluster, client: &str, addr: &str, count: usize) -> Vec<String> {
    let n = count.to_string();
    let out = exec(c, client, &["/echo", "tcp", addr, "/lb", &n])
        .unwrap_or_else(|e| panic!("{client} -> {addr}: {e}"));
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    assert_eq!(names.len(), count, "{client} -> {addr}: {out}");
    // getpeername shows the service address, not the backend's.
    for l in out.lines() {
        assert!(l.ends_with(&format!("peer {addr}")), "peer is the VIP: {l}");
    }
    names
}

/// `GET /np` to `addr` from the test host; the answering pod's name.
fn host_get(addr: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let sa: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /np HTTP/1.0\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    body.split_whitespace()
        .next()
        .map(String::from)
        .ok_or_else(|| format!("{addr}: no body in {out:?}"))
}

fn lb_stat(node: &str, s: LbStat) -> u64 {
    read_pinned_lb_stats(&pin_dir(node))
        .expect("read the pinned LB stats")
        .into_iter()
        .find(|(k, _)| *k == s)
        .map(|(_, c)| c.packets)
        .unwrap_or(0)
}

fn ready_pods(c: &Cluster, selector: &str) -> BTreeSet<String> {
    c.items(&["get", "pods", "-l", selector])
        .iter()
        .filter(|p| {
            p["metadata"]["deletionTimestamp"].is_null()
                && p["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        })
        .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
        .collect()
}

/// The two proxy modes run one after the other (each is a whole cluster).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn services_end_to_end_ebpf() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    services_end_to_end(Mode::Ebpf);
}

/// `--proxy-mode=iptables` (kube-proxy-shaped rules, the benchmark's comparison) passes
/// the same suite; only the eBPF counters are not there to check.
#[test]
fn services_end_to_end_iptables() {
    let _g = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    services_end_to_end(Mode::Iptables);
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Ebpf,
    Iptables,
}

fn services_end_to_end(mode: Mode) {
    let ebpf = mode == Mode::Ebpf;
    let tag = std::process::id() % 10000;
    let (name, octet, args): (String, u8, &[&str]) = match mode {
        Mode::Ebpf => (format!("sv{tag}"), 95, &[]),
        Mode::Iptables => (format!("si{tag}"), 97, &["--proxy-mode", "iptables"]),
    };
    let mut net = NetCluster::start_with(&name, octet, 2, args);
    let image = push_echo_image(&net);
    let c = net.c.clone();
    let (n1, n2) = (net.nodes[0].clone(), net.nodes[1].clone());

    // --- the workload, the way a user makes it.
    c.kubectl(&[
        "create",
        "deployment",
        "echo",
        "--image",
        &image,
        "--replicas",
        "3",
        "--port",
        "8080",
    ]);
    // A readiness probe the test can fail from inside a pod.
    c.kubectl(&[
        "patch",
        "deployment",
        "echo",
        "--type",
        "json",
        "-p",
        r#"[{"op":"add","path":"/spec/template/spec/containers/0/readinessProbe","value":{"exec":{"command":["sh","-c","test ! -e /tmp/unready"]},"periodSeconds":1}}]"#,
    ]);
    c.kubectl(&[
        "expose",
        "deployment",
        "echo",
        "--port",
        "80",
        "--target-port",
        "8080",
    ]);
    c.kubectl(&[
        "expose",
        "deployment",
        "echo",
        "--name",
        "echo-udp",
        "--port",
        "53",
        "--target-port",
        "8080",
        "--protocol",
        "UDP",
    ]);
    // One client pod per node (not selected by the Service).
    for (i, n) in [&n1, &n2].iter().enumerate() {
        c.kubectl(&[
            "run",
            &format!("client-{}", i + 1),
            "--image",
            &image,
            "--restart",
            "Never",
            "--labels",
            "role=client",
            "--overrides",
            &format!(r#"{{"spec":{{"nodeName":"{n}"}}}}"#),
        ]);
    }
    c.kubectl(&[
        "rollout",
        "status",
        "deployment",
        "echo",
        "--timeout",
        "120s",
    ]);
    let backends = eventually("3 echo pods Ready", Duration::from_secs(120), || {
        let r = ready_pods(&c, "app=echo");
        let all = c.items(&["get", "pods", "-l", "app=echo"]).len();
        (r.len() == 3 && all == 3).then_some(r)
    });
    eventually("the clients Ready", Duration::from_secs(60), || {
        (ready_pods(&c, "role=client").len() == 2).then_some(())
    });
    let cip = c.kubectl(&["get", "svc", "echo", "-o", "jsonpath={.spec.clusterIP}"]);
    let vip = format!("{}:80", cip.trim());
    let uip = c.kubectl(&["get", "svc", "echo-udp", "-o", "jsonpath={.spec.clusterIP}"]);
    let uvip = format!("{}:53", uip.trim());

    // --- every client reaches every backend through the ClusterIP.
    for client in ["client-1", "client-2"] {
        let seen = eventually(
            &format!("{client} reaches all 3 backends of {vip}"),
            Duration::from_secs(60),
            || {
                let names: BTreeSet<String> =
                    tcp_backends(&c, client, &vip, 30).into_iter().collect();
                (names == backends).then_some(names)
            },
        );
        assert_eq!(seen, backends);
    }
    if ebpf {
        assert!(lb_stat(&n1, LbStat::Translated) > 0 && lb_stat(&n2, LbStat::Translated) > 0);
    } else {
        let rules = run_bounded(
            net.topo.0.node_command(&n1, "iptables-save"),
            None,
            Duration::from_secs(20),
        );
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            rules.contains("-j KUBE-SVC-") && rules.contains("--mode random --probability"),
            "kube-proxy-shaped rules in {n1}:\n{rules}"
        );
    }

    // --- UDP: replies come back from the service address.
    let out = exec(&c, "client-1", &["/echo", "udp", &uvip, "ping", "12"]).expect("udp");
    let mut udp_seen = BTreeSet::new();
    for l in out.lines() {
        assert!(
            l.ends_with(&format!("ping from {uvip}")),
            "UDP reply from the VIP: {l}"
        );
        udp_seen.insert(l.split_whitespace().next().unwrap_or_default().to_string());
    }
    // One unconnected socket is one conntrack flow for iptables: one backend is right.
    let spread = if ebpf { 2 } else { 1 };
    assert!(
        udp_seen.len() >= spread && udp_seen.is_subset(&backends),
        "UDP spread: {udp_seen:?}"
    );

    // --- a readiness failure takes a backend out; it is never chosen while unready.
    let victim = backends.iter().next().unwrap().clone();
    exec(&c, &victim, &["touch", "/tmp/unready"]).expect("fail readiness");
    eventually(
        &format!("{victim} NotReady"),
        Duration::from_secs(30),
        || (!ready_pods(&c, "app=echo").contains(&victim)).then_some(()),
    );
    eventually(
        &format!("{victim} out of the service"),
        Duration::from_secs(30),
        || {
            let names = tcp_backends(&c, "client-2", &vip, 30);
            (!names.contains(&victim)).then_some(())
        },
    );
    for client in ["client-1", "client-2"] {
        let names = tcp_backends(&c, client, &vip, 30);
        assert!(
            !names.contains(&victim),
            "unready {victim} chosen by {client}"
        );
    }
    exec(&c, &victim, &["rm", "/tmp/unready"]).expect("recover readiness");
    eventually(
        &format!("{victim} back in the service"),
        Duration::from_secs(60),
        || {
            let names: BTreeSet<String> =
                tcp_backends(&c, "client-1", &vip, 30).into_iter().collect();
            names.contains(&victim).then_some(())
        },
    );

    // --- sessionAffinity ClientIP: a client sticks to one backend.
    c.kubectl(&[
        "patch",
        "svc",
        "echo",
        "-p",
        r#"{"spec":{"sessionAffinity":"ClientIP"}}"#,
    ]);
    eventually("affinity sticks", Duration::from_secs(30), || {
        let names: BTreeSet<String> = tcp_backends(&c, "client-1", &vip, 20).into_iter().collect();
        (names.len() == 1).then_some(())
    });
    c.kubectl(&[
        "patch",
        "svc",
        "echo",
        "-p",
        r#"{"spec":{"sessionAffinity":"None"}}"#,
    ]);

    // --- NodePort on every node IP, from the test host (outside every node). Node 1 has
    // local and remote backends, so both DNAT paths (and SNAT for remote) run.
    c.kubectl(&[
        "patch",
        "svc",
        "echo",
        "-p",
        r#"{"spec":{"type":"NodePort"}}"#,
    ]);
    let np = c.kubectl(&[
        "get",
        "svc",
        "echo",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    let forwards = lb_stat(&n1, LbStat::NodePortForward);
    for n in [&n1, &n2] {
        let addr = format!("{}:{}", net.node_ips[n], np.trim());
        eventually(
            &format!("NodePort {addr} reaches every backend"),
            Duration::from_secs(60),
            || {
                let names: BTreeSet<String> =
                    (0..30).filter_map(|_| host_get(&addr).ok()).collect();
                (names == backends).then_some(())
            },
        );
    }
    if ebpf {
        assert!(lb_stat(&n1, LbStat::NodePortForward) > forwards);
        assert!(lb_stat(&n1, LbStat::NodePortReply) > 0);
    }
    // externalTrafficPolicy Local: only the node's own backends answer.
    c.kubectl(&[
        "patch",
        "svc",
        "echo",
        "-p",
        r#"{"spec":{"externalTrafficPolicy":"Local"}}"#,
    ]);
    for n in [&n1, &n2] {
        let local: BTreeSet<String> = c
            .items(&[
                "get",
                "pods",
                "-l",
                "app=echo",
                "--field-selector",
                &format!("spec.nodeName={n}"),
            ])
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
            .collect();
        if local.is_empty() {
            continue;
        }
        let addr = format!("{}:{}", net.node_ips[n], np.trim());
        eventually(
            &format!("NodePort {addr} with Local policy"),
            Duration::from_secs(30),
            || {
                let names: BTreeSet<String> =
                    (0..20).filter_map(|_| host_get(&addr).ok()).collect();
                (names == local).then_some(())
            },
        );
    }
    c.kubectl(&[
        "patch",
        "svc",
        "echo",
        "-p",
        r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#,
    ]);
    // LoadBalancer: an address from the pool answers from the host.
    c.kubectl(&[
        "patch",
        "svc",
        "echo",
        "-p",
        r#"{"spec":{"type":"LoadBalancer"}}"#,
    ]);
    let lb_ip = eventually("a LoadBalancer IP", Duration::from_secs(30), || {
        let ip = c.kubectl(&[
            "get",
            "svc",
            "echo",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ]);
        (!ip.trim().is_empty()).then(|| ip.trim().to_string())
    });
    let lb_addr = format!("{lb_ip}:80");
    eventually(
        &format!("LoadBalancer {lb_addr} reaches every backend"),
        Duration::from_secs(60),
        || {
            let names: BTreeSet<String> = (0..30).filter_map(|_| host_get(&lb_addr).ok()).collect();
            (names == backends).then_some(())
        },
    );
    c.kubectl(&[
        "patch",
        "svc",
        "echo",
        "-p",
        r#"{"spec":{"type":"ClusterIP"}}"#,
    ]);

    // --- scale down: the removed backends are never chosen again.
    c.kubectl(&["scale", "deployment", "echo", "--replicas", "1"]);
    let left = eventually("one echo pod left", Duration::from_secs(60), || {
        let r = ready_pods(&c, "app=echo");
        let all = c.items(&["get", "pods", "-l", "app=echo"]).len();
        (r.len() == 1 && all == 1).then_some(r)
    });
    eventually(
        "only the remaining backend answers",
        Duration::from_secs(30),
        || {
            let names: BTreeSet<String> =
                tcp_backends(&c, "client-2", &vip, 20).into_iter().collect();
            (names == left).then_some(())
        },
    );
    for client in ["client-1", "client-2"] {
        let names: BTreeSet<String> = tcp_backends(&c, client, &vip, 20).into_iter().collect();
        assert_eq!(names, left, "{client} chose a removed backend");
    }

    // --- a Service without endpoints: refused at once, counted as "no backend".
    c.kubectl(&[
        "create",
        "service",
        "clusterip",
        "nothing",
        "--tcp",
        "80:8080",
    ]);
    // eBPF: the connect is refused (EPERM) and counted; iptables: no DNAT, so the VIP has
    // no route in this topology and the connect fails at once too.
    let nip = c.kubectl(&["get", "svc", "nothing", "-o", "jsonpath={.spec.clusterIP}"]);
    let naddr = format!("{}:80", nip.trim());
    let before = if ebpf {
        lb_stat(&n1, LbStat::NoBackend)
    } else {
        0
    };
    eventually(
        "the empty service fails at once",
        Duration::from_secs(30),
        || {
            let t = Instant::now();
            let r = exec(&c, "client-1", &["/echo", "tcp", &naddr, "/", "1"]);
            assert!(r.is_err(), "an endpoint-less service answered: {r:?}");
            let err = r.err().unwrap_or_default();
            let expected = if ebpf {
                err.contains("not permitted")
            } else {
                err.contains("unreachable") || err.contains("refused")
            };
            (expected && t.elapsed() < Duration::from_secs(5)).then_some(())
        },
    );
    if ebpf {
        assert!(
            lb_stat(&n1, LbStat::NoBackend) > before,
            "no-backend drops are counted"
        );
    }

    // --- a Service without a selector, with a manual EndpointSlice.
    let pod_ip = c.kubectl(&[
        "get",
        "pods",
        "-l",
        "app=echo",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ]);
    c.apply(&format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: manual}}
spec:
  ports: [{{name: web, port: 8000, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: manual-1
  labels: {{kubernetes.io/service-name: manual}}
addressType: IPv4
ports: [{{name: web, port: 8080, protocol: TCP}}]
endpoints:
- addresses: ["{}"]
  conditions: {{ready: true}}
"#,
        pod_ip.trim()
    ));
    let mip = c.kubectl(&["get", "svc", "manual", "-o", "jsonpath={.spec.clusterIP}"]);
    let maddr = format!("{}:8000", mip.trim());
    eventually(
        "the selector-less service answers",
        Duration::from_secs(30),
        || {
            exec(&c, "client-2", &["/echo", "tcp", &maddr, "/m", "2"])
                .ok()
                .filter(|o| {
                    o.lines().count() == 2
                        && o.lines()
                            .all(|l| left.iter().any(|n| l.starts_with(n.as_str())))
                })
        },
    );

    // --- SCTP is skipped with an Event; the agent keeps going.
    c.apply(
        r#"apiVersion: v1
kind: Service
metadata: {name: sctp}
spec:
  selector: {app: echo}
  ports: [{name: s, port: 9999, protocol: SCTP}]
"#,
    );
    eventually(
        "an UnsupportedProtocol event",
        Duration::from_secs(30),
        || {
            c.items(&[
                "get",
                "events",
                "--field-selector",
                "involvedObject.name=sctp",
            ])
            .iter()
            .any(|e| e["reason"] == "UnsupportedProtocol")
            .then_some(())
        },
    );

    // --- agent restart in the middle of a long TCP connection through the ClusterIP.
    c.kubectl(&["scale", "deployment", "echo", "--replicas", "2"]);
    eventually("2 echo pods Ready", Duration::from_secs(60), || {
        (ready_pods(&c, "app=echo").len() == 2).then_some(())
    });
    // The client is a pod's own process (an exec session would end with the agent).
    let script = format!(
        "echo start; (for i in $(seq 1 60); do printf 'GET /long HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'; sleep 0.25; done) | nc -w 5 {} 80 | grep -c '/long'; sleep 100000",
        cip.trim()
    );
    c.kubectl(&[
        "run",
        "long-client",
        "--image",
        &image,
        "--restart",
        "Never",
        "--labels",
        "role=client",
        "--overrides",
        &format!(r#"{{"spec":{{"nodeName":"{n1}"}}}}"#),
        "--command",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    eventually("the long connection runs", Duration::from_secs(60), || {
        let o = c.kubectl_out(&["logs", "long-client"], None);
        String::from_utf8_lossy(&o.stdout)
            .contains("start")
            .then_some(())
    });
    let restart_started = Instant::now();
    net.start_agent(&n1);
    net.start_agent(&n2);
    assert!(
        restart_started.elapsed() < Duration::from_secs(14),
        "both agents restarted while the 15 s connection ran"
    );
    let answered = eventually("the long connection ends", Duration::from_secs(60), || {
        let o = c.kubectl_out(&["logs", "long-client"], None);
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        out.lines().nth(1).map(|l| l.trim().to_string())
    });
    assert_eq!(
        answered, "60",
        "every request on the long connection was answered"
    );
    // New connections work with the restarted agents' programs.
    let after: BTreeMap<String, usize> =
        tcp_backends(&c, "client-2", &vip, 10)
            .into_iter()
            .fold(BTreeMap::new(), |mut m, n| {
                *m.entry(n).or_default() += 1;
                m
            });
    assert!(!after.is_empty());
    c.kubectl(&["delete", "deployment", "echo", "--wait=true"]);
    c.kubectl(&[
        "delete",
        "pods",
        "-l",
        "role=client",
        "--wait=true",
        "--timeout=60s",
    ]);
}
