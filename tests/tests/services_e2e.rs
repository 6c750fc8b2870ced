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
    tcp_answers(c, client, addr, count).unwrap_or_else(|e| panic!("{e}"))
}

/// [`tcp_backends`], or why not.
fn tcp_answers(c: &Cluster, client: &str, addr: &str, count: usize) -> Result<Vec<String>, String> {
    let n = count.to_string();
    let out = exec(
        c,
        client,
        &["timeout", "20", "/echo", "tcp", addr, "/lb", &n],
    )
    .map_err(|e| format!("{client} -> {addr}: {e}"))?;
    let names: Vec<String> = out
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect();
    if names.len() != count {
        return Err(format!("{client} -> {addr}: {out}"));
    }
    // getpeername shows the service address, not the backend's.
    for l in out.lines() {
        assert!(l.ends_with(&format!("peer {addr}")), "peer is the VIP: {l}");
    }
    Ok(names)
}

/// A connection from `client` to `addr` fails at once (not by a timeout); the error.
fn refused_from_pod(c: &Cluster, client: &str, addr: &str) -> Option<String> {
    let t = Instant::now();
    let r = exec(c, client, &["timeout", "5", "/echo", "tcp", addr, "/", "1"]);
    assert!(
        r.is_err(),
        "{client} -> {addr}: an endpoint-less service answered: {r:?}"
    );
    let took = t.elapsed();
    let err = r.err().unwrap_or_default();
    // The exec round trip is in `took` too; a dropped SYN would take seconds.
    (took < Duration::from_secs(2)).then_some(err)
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

/// Who sends the requests of [`answered_by`].
#[derive(Clone, Copy, Debug)]
enum Client<'a> {
    /// A pod, with skiff-echo's TCP client: a request that fails fails the test at once
    /// (the path is expected to work already).
    Pod(&'a str),
    /// A pod: a request that fails is printed and retried (the path may still be being
    /// programmed).
    PodRetrying(&'a str),
    /// The test host (`GET /np`): requests that fail are left out.
    Host,
}

/// Waits up to `timeout` until `count` TCP requests from `client` to `addr` are answered
/// by exactly the pods `want` (every one of them, and no other).
fn answered_by(
    c: &Cluster,
    client: Client,
    addr: &str,
    count: usize,
    want: &BTreeSet<String>,
    timeout: Duration,
) {
    eventually(
        &format!("{client:?} -> {addr}: {count} requests answered by exactly {want:?}"),
        timeout,
        || {
            let names: BTreeSet<String> = match client {
                Client::Pod(pod) => tcp_backends(c, pod, addr, count).into_iter().collect(),
                Client::PodRetrying(pod) => tcp_answers(c, pod, addr, count)
                    .map_err(|e| eprintln!("{e}"))
                    .ok()?
                    .into_iter()
                    .collect(),
                Client::Host => (0..count).filter_map(|_| host_get(addr).ok()).collect(),
            };
            (names == *want).then_some(())
        },
    );
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
    let started = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "[services_e2e {mode:?}] {:6.1} s  {what}",
            started.elapsed().as_secs_f64()
        )
    };
    let tag = std::process::id() % 10000;
    let (name, octet, args): (String, u8, &[&str]) = match mode {
        Mode::Ebpf => (format!("sv{tag}"), 95, &[]),
        Mode::Iptables => (format!("si{tag}"), 97, &["--proxy-mode", "iptables"]),
    };
    let mut net = NetCluster::start_with(&name, octet, 2, args);
    // Real nodes have a default route, so a packet for a ClusterIP without DNAT is
    // forwarded (through the filter table's REJECT) instead of failing the route lookup.
    // Here it leads into a veth whose peer (in the node's namespace too) stays down:
    // whatever is routed there is dropped, nothing leaves the namespace.
    for n in &net.nodes {
        for cmd in [
            &[
                "link",
                "add",
                "skdefault",
                "type",
                "veth",
                "peer",
                "name",
                "skdefault-p",
            ][..],
            &["link", "set", "skdefault", "up"],
            &["route", "add", "default", "dev", "skdefault"],
        ] {
            let mut ip = net.topo.0.node_command(n, "ip");
            ip.args(cmd);
            let o = run_bounded(ip, None, Duration::from_secs(10));
            assert!(o.status.success(), "ip {cmd:?} in {n}: {o:?}");
        }
    }
    let image = push_echo_image(&net);
    let c = net.c.clone();
    let (n1, n2) = (net.nodes[0].clone(), net.nodes[1].clone());
    // `kubectl patch svc echo -p <patch>`.
    let patch_echo = |patch: &str| {
        c.kubectl(&["patch", "svc", "echo", "-p", patch]);
    };

    phase("cluster up; the workload");
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
    // `kubectl run <name>` of a client pod (label role=client) on `node`, `command` the
    // rest of kubectl's arguments.
    let run_client = |name: &str, node: &str, command: &[&str]| {
        let overrides = format!(r#"{{"spec":{{"nodeName":"{node}"}}}}"#);
        let mut args = vec!["run", name, "--image", &image, "--restart", "Never"];
        args.extend(["--labels", "role=client", "--overrides", &overrides]);
        args.extend_from_slice(command);
        c.kubectl(&args);
    };
    // One client pod per node (not selected by the Service).
    for (i, n) in [&n1, &n2].iter().enumerate() {
        run_client(&format!("client-{}", i + 1), n, &[]);
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

    phase("every client reaches every backend through the ClusterIP");
    // --- every client reaches every backend through the ClusterIP.
    for client in ["client-1", "client-2"] {
        let client = Client::Pod(client);
        answered_by(&c, client, &vip, 30, &backends, Duration::from_secs(60));
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

    phase("UDP");
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

    phase("a readiness failure takes a backend out");
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

    phase("sessionAffinity ClientIP");
    // --- sessionAffinity ClientIP: a client sticks to one backend.
    patch_echo(r#"{"spec":{"sessionAffinity":"ClientIP"}}"#);
    eventually("affinity sticks", Duration::from_secs(30), || {
        let names: BTreeSet<String> = tcp_backends(&c, "client-1", &vip, 20).into_iter().collect();
        (names.len() == 1).then_some(())
    });
    patch_echo(r#"{"spec":{"sessionAffinity":"None"}}"#);

    phase("NodePort on every node IP, from the test host");
    // --- NodePort on every node IP, from the test host (outside every node). Node 1 has
    // local and remote backends, so both DNAT paths (and SNAT for remote) run.
    patch_echo(r#"{"spec":{"type":"NodePort"}}"#);
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
        answered_by(
            &c,
            Client::Host,
            &addr,
            30,
            &backends,
            Duration::from_secs(60),
        );
    }
    if ebpf {
        assert!(lb_stat(&n1, LbStat::NodePortForward) > forwards);
        assert!(lb_stat(&n1, LbStat::NodePortReply) > 0);
    }
    phase("pods -> NodePort on both node IPs");
    // A pod on node 1 reaches the nodePort on the other node's IP and on its own, and
    // (externalTrafficPolicy Cluster) every backend answers there.
    for n in [&n2, &n1] {
        let addr = format!("{}:{}", net.node_ips[n], np.trim());
        let client = Client::PodRetrying("client-1");
        answered_by(&c, client, &addr, 30, &backends, Duration::from_secs(30));
    }
    // externalTrafficPolicy Local: only the node's own backends answer.
    patch_echo(r#"{"spec":{"externalTrafficPolicy":"Local"}}"#);
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
        answered_by(&c, Client::Host, &addr, 20, &local, Duration::from_secs(30));
    }
    // Pods are no outside clients: at their own node's IP they get every endpoint, as
    // kube-proxy's "pod traffic for external destinations" short-circuit gives them.
    for (client, n) in [("client-1", &n1), ("client-2", &n2)] {
        let addr = format!("{}:{}", net.node_ips[n], np.trim());
        let client = Client::PodRetrying(client);
        answered_by(&c, client, &addr, 30, &backends, Duration::from_secs(30));
    }
    patch_echo(r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#);
    // LoadBalancer: an address from the pool answers from the host.
    patch_echo(r#"{"spec":{"type":"LoadBalancer"}}"#);
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
    answered_by(
        &c,
        Client::Host,
        &lb_addr,
        30,
        &backends,
        Duration::from_secs(60),
    );
    // A pod going to the LoadBalancer IP of a Service with externalTrafficPolicy Local
    // still gets every endpoint (eBPF: the pods-only twin; iptables: the EXT chain's
    // pod short-circuit).
    patch_echo(r#"{"spec":{"externalTrafficPolicy":"Local"}}"#);
    let client = Client::PodRetrying("client-2");
    answered_by(&c, client, &lb_addr, 30, &backends, Duration::from_secs(30));
    patch_echo(r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#);
    patch_echo(r#"{"spec":{"type":"ClusterIP"}}"#);

    phase("scale down");
    // --- scale down: the removed backends are never chosen again.
    c.kubectl(&["scale", "deployment", "echo", "--replicas", "1"]);
    let left = eventually("one echo pod left", Duration::from_secs(60), || {
        let r = ready_pods(&c, "app=echo");
        let all = c.items(&["get", "pods", "-l", "app=echo"]).len();
        (r.len() == 1 && all == 1).then_some(r)
    });
    answered_by(
        &c,
        Client::Pod("client-2"),
        &vip,
        20,
        &left,
        Duration::from_secs(30),
    );
    for client in ["client-1", "client-2"] {
        let names: BTreeSet<String> = tcp_backends(&c, client, &vip, 20).into_iter().collect();
        assert_eq!(names, left, "{client} chose a removed backend");
    }

    phase("a Service without endpoints");
    // --- a Service without endpoints (its selector matches no pod): refused at once,
    // from pods (ClusterIP, a nodePort on either node's IP) and from outside (nodePort),
    // counted as "no backend" by eBPF. eBPF refuses pods' connect() (EPERM), iptables
    // REJECTs (ICMP port unreachable: ECONNREFUSED); a nodePort from outside is refused by
    // the node's stack (eBPF) or REJECTed (iptables).
    c.kubectl(&[
        "create", "service", "nodeport", "nothing", "--tcp", "80:8080",
    ]);
    let nip = c.kubectl(&["get", "svc", "nothing", "-o", "jsonpath={.spec.clusterIP}"]);
    let nnp = c.kubectl(&[
        "get",
        "svc",
        "nothing",
        "-o",
        "jsonpath={.spec.ports[0].nodePort}",
    ]);
    let naddr = format!("{}:80", nip.trim());
    let node_addrs: Vec<String> = [&n1, &n2]
        .iter()
        .map(|n| format!("{}:{}", net.node_ips[*n], nnp.trim()))
        .collect();
    let before = if ebpf {
        lb_stat(&n1, LbStat::NoBackend)
    } else {
        0
    };
    let pod_error = if ebpf { "not permitted" } else { "refused" };
    for addr in std::iter::once(&naddr).chain(&node_addrs) {
        eventually(
            &format!("client-1 -> the empty service at {addr} fails at once"),
            Duration::from_secs(30),
            || refused_from_pod(&c, "client-1", addr).filter(|e| e.contains(pod_error)),
        );
    }
    for addr in &node_addrs {
        eventually(
            &format!("the test host -> the empty service at {addr} is refused at once"),
            Duration::from_secs(30),
            || {
                let t = Instant::now();
                let r = host_get(addr);
                assert!(r.is_err(), "an endpoint-less service answered: {r:?}");
                let err = r.err().unwrap_or_default();
                (err.contains("refused") && t.elapsed() < Duration::from_secs(1)).then_some(())
            },
        );
    }
    if ebpf {
        assert!(
            lb_stat(&n1, LbStat::NoBackend) > before,
            "no-backend drops are counted"
        );
    }
    let reject_rules = |n: &str| -> usize {
        let o = run_bounded(
            net.topo.0.node_command(n, "iptables-save"),
            None,
            Duration::from_secs(20),
        );
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains("default/nothing has no endpoints") && l.contains("REJECT"))
            .count()
    };
    if !ebpf {
        // The ClusterIP (KUBE-SERVICES) and the nodePort (KUBE-EXTERNAL-SERVICES).
        assert_eq!(reject_rules(&n1), 2, "kube-proxy's REJECT rules on {n1}");
    }
    // An endpoint appears (client-2 gets the selected label): the refusals are gone.
    c.kubectl(&["label", "pod", "client-2", "app=nothing"]);
    let endpoint = BTreeSet::from(["client-2".to_string()]);
    for addr in std::iter::once(&naddr).chain(&node_addrs) {
        let client = Client::PodRetrying("client-1");
        answered_by(&c, client, addr, 2, &endpoint, Duration::from_secs(30));
    }
    let from_host = eventually(
        "the test host -> the former empty service answers",
        Duration::from_secs(30),
        || host_get(&node_addrs[0]).ok(),
    );
    assert_eq!(from_host, "client-2");
    if !ebpf {
        assert_eq!(reject_rules(&n1), 0, "REJECT rules left on {n1}");
    }

    phase("a Service without a selector, with a manual EndpointSlice");
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

    phase("SCTP is skipped with an Event");
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

    phase("agent restart in the middle of a long TCP connection through the ClusterIP");
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
    run_client(
        "long-client",
        &n1,
        &["--command", "--", "sh", "-c", &script],
    );
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
    phase("done");
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
