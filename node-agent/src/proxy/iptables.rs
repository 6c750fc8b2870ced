//! `--proxy-mode=iptables`: kube-proxy-shaped NAT rules, for comparing against the eBPF
//! proxy in benchmarks only. Same desired state ([`super::model`]), rendered as
//! kube-proxy's iptables mode renders it: KUBE-SERVICES -> KUBE-SVC-* (one rule per
//! endpoint with `statistic --mode random` probabilities) -> KUBE-SEP-* (DNAT, hairpin
//! masquerade), KUBE-NODEPORTS and KUBE-EXT-* for NodePorts and LoadBalancer IPs,
//! KUBE-MARK-MASQ / KUBE-POSTROUTING for masquerading. Every sync rewrites all of
//! skiff's chains in one `iptables-restore --noflush` (kube-proxy's full sync); the jumps
//! from the built-in chains are ensured with `iptables -C`/`-I`.
//! sessionAffinity ClientIP is `-m recent` per endpoint. externalTrafficPolicy Local: the
//! EXT chain sends pod traffic (kube-proxy's `--detect-local-mode=InterfaceNamePrefix`
//! with the pod veths' prefix, so pods of this node) and the node's own traffic
//! (masqueraded) to a chain over every endpoint, and the rest, unmasqueraded, to the
//! local endpoints.
//! Services without endpoints, as kube-proxy: no NAT rules, and in the filter table
//! `-j REJECT` (icmp-port-unreachable, so clients get "connection refused" at once) for
//! the ClusterIP in KUBE-SERVICES (hooked into FORWARD and OUTPUT) and for node ports and
//! LoadBalancer IPs in KUBE-EXTERNAL-SERVICES (INPUT and FORWARD), all for new connections
//! only; `-j DROP` where a traffic policy Local leaves a node without endpoints. The next
//! sync that sees endpoints rewrites the chains without them.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::Write as _,
    process::Command,
};

use sha2::{Digest, Sha256};

use super::model::{DesiredFrontend, DesiredService, FrontendKey, Scope};
use crate::cni::network::VETH_PREFIX;

/// Jumps from the built-in chains: (table, chain, rule). Comments without spaces: the
/// rules are split at spaces.
const JUMPS: &[(&str, &str, &str)] = &[
    (
        "nat",
        "PREROUTING",
        "-m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
    ),
    (
        "nat",
        "OUTPUT",
        "-m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
    ),
    (
        "nat",
        "POSTROUTING",
        "-m comment --comment kubernetes-postrouting-rules -j KUBE-POSTROUTING",
    ),
    (
        "filter",
        "INPUT",
        "-m conntrack --ctstate NEW -m comment --comment kubernetes-externally-visible-service-portals -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment kubernetes-externally-visible-service-portals -j KUBE-EXTERNAL-SERVICES",
    ),
    (
        "filter",
        "FORWARD",
        "-m conntrack --ctstate NEW -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
    ),
    (
        "filter",
        "OUTPUT",
        "-m conntrack --ctstate NEW -m comment --comment kubernetes-service-portals -j KUBE-SERVICES",
    ),
];

/// (protocol, endpoints, externalTrafficPolicy Local, affinity timeout): frontends of one
/// Service with the same answer share one KUBE-SVC chain (the cluster IP, LoadBalancer
/// IPs and the node port of one port).
type GroupKey = (u8, String, bool, Option<u32>);

fn chain(prefix: &str, parts: &str) -> String {
    let h = Sha256::digest(parts.as_bytes());
    let hex: String = h.iter().take(8).map(|b| format!("{b:02X}")).collect();
    format!("{prefix}{hex}")
}

fn proto_name(p: u8) -> &'static str {
    if p == skiff_ebpf_common::PROTO_UDP {
        "udp"
    } else {
        "tcp"
    }
}

fn group_key(f: &FrontendKey, want: &DesiredFrontend) -> GroupKey {
    let backends: Vec<String> = want
        .backends
        .iter()
        .map(|b| format!("{}:{}", b.addr, b.port))
        .collect();
    (
        f.frontend.proto,
        backends.join(","),
        want.local_only,
        want.affinity_timeout,
    )
}

/// The nat rules of one group's KUBE-SVC chain and its KUBE-SEP chains.
fn render_svc_chain(
    svc_name: &str,
    (proto, backends, local_only, affinity): &GroupKey,
    chains: &mut BTreeSet<String>,
    rules: &mut String,
) -> String {
    let p = proto_name(*proto);
    let group = format!("{svc_name}:{p}:{backends}:{local_only}:{affinity:?}");
    let svc_chain = chain("KUBE-SVC-", &group);
    if !chains.insert(svc_chain.clone()) {
        return svc_chain;
    }
    let eps: Vec<&str> = backends.split(',').filter(|b| !b.is_empty()).collect();
    let n = eps.len();
    let seps: Vec<String> = eps
        .iter()
        .map(|ep| chain("KUBE-SEP-", &format!("{group}:{ep}")))
        .collect();
    // sessionAffinity ClientIP: a client that used an endpoint lately goes back.
    if let Some(t) = affinity {
        for sep in &seps {
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m recent --name {sep} --mask 255.255.255.255 --rsource --rcheck --seconds {t} --reap -j {sep}"
            );
        }
    }
    for (i, ep) in eps.iter().enumerate() {
        let sep = seps[i].clone();
        chains.insert(sep.clone());
        if i + 1 < n {
            let prob = 1.0 / (n - i) as f64;
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{svc_name} -> {ep}\" -m statistic --mode random --probability {prob:.10} -j {sep}"
            );
        } else {
            let _ = writeln!(
                rules,
                "-A {svc_chain} -m comment --comment \"{svc_name} -> {ep}\" -j {sep}"
            );
        }
        let ip = ep.split(':').next().unwrap_or_default();
        let _ = writeln!(rules, "-A {sep} -s {ip}/32 -j KUBE-MARK-MASQ");
        let recent = if affinity.is_some() {
            format!(" -m recent --name {sep} --mask 255.255.255.255 --rsource --set")
        } else {
            String::new()
        };
        let _ = writeln!(
            rules,
            "-A {sep} -p {p}{recent} -m {p} -j DNAT --to-destination {ep}"
        );
    }
    svc_chain
}

/// The nat and filter tables for every Service (`ns/name` -> its frontends), as
/// iptables-restore input.
pub fn render(
    services: &BTreeMap<(String, String), DesiredService>,
    node_ip: std::net::Ipv4Addr,
) -> String {
    let mut chains: BTreeSet<String> = [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    let mut rules = String::new();
    let mut nodeports = String::new();
    let mut filter = String::new();
    for ((ns, name), frontends) in services {
        let svc_name = format!("{ns}/{name}");
        let mut groups: BTreeMap<GroupKey, Vec<&FrontendKey>> = BTreeMap::new();
        for (f, want) in frontends {
            if f.scope == Scope::All {
                groups.entry(group_key(f, want)).or_default().push(f);
            }
        }
        for (gk, fs) in &groups {
            let local_only = gk.2;
            let p = proto_name(gk.0);
            let has_backends = !gk.1.is_empty();
            // Pods' chain under externalTrafficPolicy Local: the one of the pods-only twin
            // (every endpoint; the NodePort wildcard for the node's own address).
            let cluster_chain = fs
                .iter()
                .filter(|f| local_only && frontends[f].external)
                .find_map(|f| {
                    let twin = if f.frontend.addr == node_ip {
                        FrontendKey::node_port_wildcard(f.frontend.port, f.frontend.proto)
                    } else {
                        FrontendKey::pods(f.frontend)
                    };
                    let want = frontends.get(&twin)?;
                    (!want.backends.is_empty()).then(|| {
                        render_svc_chain(
                            &svc_name,
                            &group_key(&twin, want),
                            &mut chains,
                            &mut rules,
                        )
                    })
                });
            let ext_chain = chain(
                "KUBE-EXT-",
                &format!("{svc_name}:{p}:{}:{local_only}:{:?}", gk.1, gk.3),
            );
            let mut uses_ext = false;
            for f in fs {
                let want = &frontends[f];
                let (addr, port) = (f.frontend.addr, f.frontend.port);
                let at_node = want.external && addr == node_ip;
                // Filter: no endpoints at all -> REJECT; a policy left none -> DROP.
                if !has_backends {
                    let (target, why) = if want.has_endpoints {
                        ("DROP", "has no local endpoints")
                    } else {
                        (
                            "REJECT --reject-with icmp-port-unreachable",
                            "has no endpoints",
                        )
                    };
                    let (chain, dst) = if at_node {
                        (
                            "KUBE-EXTERNAL-SERVICES",
                            "-m addrtype --dst-type LOCAL".to_string(),
                        )
                    } else if want.external {
                        ("KUBE-EXTERNAL-SERVICES", format!("-d {addr}/32"))
                    } else {
                        ("KUBE-SERVICES", format!("-d {addr}/32"))
                    };
                    let _ = writeln!(
                        filter,
                        "-A {chain} -m comment --comment \"{svc_name} {why}\" {dst} -p {p} -m {p} --dport {port} -j {target}"
                    );
                }
                // Nat: only where some endpoint answers.
                if !want.external {
                    if has_backends {
                        let svc_chain = render_svc_chain(&svc_name, gk, &mut chains, &mut rules);
                        let _ = writeln!(
                            rules,
                            "-A KUBE-SERVICES -m comment --comment \"{svc_name} cluster IP\" -d {addr}/32 -p {p} -m {p} --dport {port} -j {svc_chain}"
                        );
                    }
                    continue;
                }
                if !has_backends && cluster_chain.is_none() {
                    continue;
                }
                uses_ext = true;
                if at_node {
                    let _ = writeln!(
                        nodeports,
                        "-A KUBE-NODEPORTS -m comment --comment \"{svc_name}\" -p {p} -m {p} --dport {port} -j {ext_chain}"
                    );
                } else {
                    // External addresses (LoadBalancer IPs) masquerade like node ports.
                    let _ = writeln!(
                        rules,
                        "-A KUBE-SERVICES -m comment --comment \"{svc_name} external IP\" -d {addr}/32 -p {p} -m {p} --dport {port} -j {ext_chain}"
                    );
                }
            }
            if !uses_ext {
                continue;
            }
            chains.insert(ext_chain.clone());
            if local_only {
                // externalTrafficPolicy Local: pods and the node itself get every
                // endpoint (kube-proxy's short-circuit); others keep their address.
                if let Some(cluster) = &cluster_chain {
                    let _ = writeln!(
                        rules,
                        "-A {ext_chain} -m comment --comment \"pod traffic for {svc_name} external destinations\" -i {VETH_PREFIX}+ -j {cluster}\n\
                         -A {ext_chain} -m comment --comment \"masquerade LOCAL traffic for {svc_name} external destinations\" -m addrtype --src-type LOCAL -j KUBE-MARK-MASQ\n\
                         -A {ext_chain} -m comment --comment \"route LOCAL traffic for {svc_name} external destinations\" -m addrtype --src-type LOCAL -j {cluster}"
                    );
                }
            } else {
                let _ = writeln!(rules, "-A {ext_chain} -j KUBE-MARK-MASQ");
            }
            if has_backends {
                let svc_chain = render_svc_chain(&svc_name, gk, &mut chains, &mut rules);
                let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
            }
        }
    }
    let mut out = String::from("*nat\n");
    for c in &chains {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    out.push_str(&rules);
    out.push_str(&nodeports);
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n\
         COMMIT\n\
         *filter\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n",
    );
    out.push_str(&filter);
    out.push_str("COMMIT\n");
    out
}

fn run(cmd: &mut Command, input: Option<&str>) -> Result<(), String> {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("{desc}: {e} (install iptables: `cargo xtask setup`)"))?;
    if let Some(input) = input
        && let Some(mut stdin) = child.stdin.take()
    {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("{desc}: writing rules: {e}"))?;
    }
    drop(child.stdin.take());
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{desc}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{desc}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Writes `rules` (from [`render`]) and makes sure the built-in chains jump to them.
pub fn apply(rules: &str) -> Result<(), String> {
    run(
        Command::new("iptables-restore").args(["--noflush", "--wait"]),
        Some(rules),
    )?;
    for (table, chain, rule) in JUMPS {
        let args: Vec<&str> = rule.split(' ').collect();
        let exists = run(
            Command::new("iptables")
                .args(["-w", "-t", table, "-C", chain])
                .args(split_quoted(&args)),
            None,
        )
        .is_ok();
        if !exists {
            run(
                Command::new("iptables")
                    .args(["-w", "-t", table, "-I", chain, "1"])
                    .args(split_quoted(&args)),
                None,
            )?;
        }
    }
    Ok(())
}

/// The words of a rule (no quoting is used in [`JUMPS`]).
fn split_quoted<'a>(words: &[&'a str]) -> Vec<&'a str> {
    words.iter().copied().filter(|w| !w.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::model::{BackendAddr, DesiredFrontend, Frontend, desired_service};
    use serde_json::json;

    #[test]
    fn kube_proxy_shaped_rules() {
        let mut svc = DesiredService::new();
        let backends: Vec<BackendAddr> = (2..5)
            .map(|i| BackendAddr {
                addr: std::net::Ipv4Addr::new(10, 244, 1, i),
                port: 8080,
                proto: 6,
            })
            .collect();
        let want = DesiredFrontend {
            backends,
            affinity_timeout: None,
            local_only: false,
            external: false,
            has_endpoints: true,
        };
        let node_ip = std::net::Ipv4Addr::new(10, 90, 0, 11);
        svc.insert(
            FrontendKey::all(Frontend {
                addr: "10.96.0.20".parse().unwrap(),
                port: 80,
                proto: 6,
            }),
            want.clone(),
        );
        svc.insert(
            FrontendKey::all(Frontend {
                addr: node_ip,
                port: 30080,
                proto: 6,
            }),
            DesiredFrontend {
                external: true,
                ..want
            },
        );
        let mut all = BTreeMap::new();
        all.insert(("demo".to_string(), "echo".to_string()), svc);
        let r = render(&all, node_ip);
        assert!(r.starts_with("*nat\n:KUBE-EXT-"), "{r}");
        assert!(!r.contains("REJECT"), "{r}");
        assert!(r.contains("-d 10.96.0.20/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-"));
        assert!(r.contains("--probability 0.3333333333"));
        assert!(r.contains("--probability 0.5000000000"));
        assert!(r.contains("-j DNAT --to-destination 10.244.1.4:8080"));
        assert!(r.contains("-A KUBE-NODEPORTS -m comment --comment \"demo/echo\" -p tcp -m tcp --dport 30080 -j KUBE-EXT-"));
        assert_eq!(r.matches("-j DNAT").count(), 3, "one SEP per endpoint");
        let mut sticky = all.clone();
        for f in sticky.values_mut().flat_map(|s| s.values_mut()) {
            f.affinity_timeout = Some(60);
        }
        let r = render(&sticky, node_ip);
        assert_eq!(r.matches("--rcheck --seconds 60 --reap").count(), 3, "{r}");
        assert_eq!(
            r.matches("--rsource --set -m tcp -j DNAT").count(),
            3,
            "{r}"
        );
        assert!(r.ends_with("COMMIT\n"));
    }

    fn desired(
        svc: serde_json::Value,
        endpoints: serde_json::Value,
        node_ip: std::net::Ipv4Addr,
    ) -> BTreeMap<(String, String), DesiredService> {
        let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(svc).unwrap();
        let slice: k8s_openapi::api::discovery::v1::EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s-1"},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": endpoints
        }))
        .unwrap();
        let (d, _) = desired_service(&svc, &[&slice], "n1", node_ip);
        BTreeMap::from([(("demo".to_string(), "s".to_string()), d)])
    }

    #[test]
    fn reject_without_endpoints() {
        let node_ip = std::net::Ipv4Addr::new(10, 90, 0, 11);
        let svc = json!({
            "metadata": {"name": "s", "namespace": "demo"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.30",
                     "ports": [{"port": 80, "nodePort": 30090}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "172.18.0.60"}]}}
        });
        let r = render(&desired(svc.clone(), json!([]), node_ip), node_ip);
        let (nat, filter) = r.split_once("*filter\n").unwrap();
        assert!(
            !nat.contains("KUBE-SVC-") && !nat.contains("KUBE-EXT-"),
            "{r}"
        );
        for rule in [
            "-A KUBE-SERVICES -m comment --comment \"demo/s has no endpoints\" -d 10.96.0.30/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"demo/s has no endpoints\" -m addrtype --dst-type LOCAL -p tcp -m tcp --dport 30090 -j REJECT --reject-with icmp-port-unreachable",
            "-A KUBE-EXTERNAL-SERVICES -m comment --comment \"demo/s has no endpoints\" -d 172.18.0.60/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable",
        ] {
            assert!(filter.contains(rule), "{rule} in\n{r}");
        }
        assert_eq!(filter.matches("-j REJECT").count(), 3, "{r}");
        assert!(filter.starts_with(":KUBE-EXTERNAL-SERVICES - [0:0]\n:KUBE-SERVICES - [0:0]\n"));
        assert!(r.ends_with("COMMIT\n"));

        // Endpoints appear: no filter rules any more.
        let eps = json!([{"addresses": ["10.244.2.2"], "nodeName": "n2"}]);
        let r = render(&desired(svc.clone(), eps.clone(), node_ip), node_ip);
        let (_, filter) = r.split_once("*filter\n").unwrap();
        assert!(!filter.contains("-A "), "{r}");

        // externalTrafficPolicy Local without local endpoints: pods (and the node) still
        // reach the remote endpoint; other clients are dropped, not rejected.
        let mut local = svc;
        local["spec"]["externalTrafficPolicy"] = json!("Local");
        let r = render(&desired(local, eps, node_ip), node_ip);
        let (nat, filter) = r.split_once("*filter\n").unwrap();
        assert_eq!(filter.matches("-j DROP").count(), 2, "{r}");
        assert!(
            !filter.contains("REJECT") && !filter.contains("10.96.0.30"),
            "{r}"
        );
        assert!(nat.contains(" -i skv+ -j KUBE-SVC-"), "{r}");
        assert!(
            nat.contains("-m addrtype --src-type LOCAL -j KUBE-MARK-MASQ"),
            "{r}"
        );
        assert!(nat.contains("--dport 30090 -j KUBE-EXT-"), "{r}");
        assert!(
            nat.contains("-d 172.18.0.60/32 -p tcp -m tcp --dport 80 -j KUBE-EXT-"),
            "{r}"
        );
        assert_eq!(
            nat.matches("-j DNAT").count(),
            1,
            "one endpoint, one SEP: {r}"
        );
    }
}
