//! `--proxy-mode=iptables`: kube-proxy-shaped NAT rules, for comparing against the eBPF
//! proxy in benchmarks only. Same desired state ([`super::model`]), rendered as
//! kube-proxy's iptables mode renders it: KUBE-SERVICES -> KUBE-SVC-* (one rule per
//! endpoint with `statistic --mode random` probabilities) -> KUBE-SEP-* (DNAT, hairpin
//! masquerade), KUBE-NODEPORTS and KUBE-EXT-* for NodePorts and LoadBalancer IPs,
//! KUBE-MARK-MASQ / KUBE-POSTROUTING for masquerading. Every sync rewrites all of
//! skiff's chains in one `iptables-restore --noflush` (kube-proxy's full sync); the jumps
//! from the built-in chains are ensured with `iptables -C`/`-I`.
//! sessionAffinity ClientIP is `-m recent` per endpoint, externalTrafficPolicy Local an
//! EXT chain without masquerade over the local endpoints. Not rendered: REJECT for
//! Services without endpoints (in the test topology a VIP without DNAT has no route, so
//! the client fails at once with "network unreachable" instead of "refused").

use std::{collections::BTreeMap, fmt::Write as _, io::Write as _, process::Command};

use sha2::{Digest, Sha256};

use super::model::{DesiredService, Frontend};

/// Jumps from the built-in chains: (table, chain, rule).
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
];

/// Per (protocol, endpoints, externalTrafficPolicy Local, affinity timeout): the
/// service's name and its frontends (with "external").
type PortChains<'a> = (String, Vec<(&'a Frontend, bool)>);
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

/// The nat table for every Service (`ns/name` -> its frontends), as iptables-restore
/// input.
pub fn render(
    services: &BTreeMap<(String, String), DesiredService>,
    node_ip: std::net::Ipv4Addr,
) -> String {
    let mut chains: Vec<String> = vec![
        "KUBE-SERVICES".into(),
        "KUBE-NODEPORTS".into(),
        "KUBE-POSTROUTING".into(),
        "KUBE-MARK-MASQ".into(),
    ];
    let mut rules = String::new();
    let mut nodeports = String::new();
    for ((ns, name), frontends) in services {
        // One KUBE-SVC chain per (service, port): frontends sharing port and protocol
        // share it (the cluster IP, LoadBalancer IPs and the node port of one port).
        let mut by_port: BTreeMap<GroupKey, PortChains> = BTreeMap::new();
        for (f, want) in frontends {
            let backends: Vec<String> = want
                .backends
                .iter()
                .map(|b| format!("{}:{}", b.addr, b.port))
                .collect();
            let key = (
                f.proto,
                backends.join(","),
                want.local_only,
                want.affinity_timeout,
            );
            by_port
                .entry(key)
                .or_insert_with(|| (format!("{ns}/{name}"), vec![]))
                .1
                .push((f, want.external));
        }
        for ((proto, backends, local_only, affinity), (svc_name, fs)) in by_port {
            let p = proto_name(proto);
            let group = format!("{svc_name}:{p}:{backends}:{local_only}:{affinity:?}");
            let svc_chain = chain("KUBE-SVC-", &group);
            let ext_chain = chain("KUBE-EXT-", &group);
            chains.push(svc_chain.clone());
            chains.push(ext_chain.clone());
            let eps: Vec<&str> = backends.split(',').filter(|b| !b.is_empty()).collect();
            for (f, external) in &fs {
                if *external && f.addr == node_ip {
                    let _ = writeln!(
                        nodeports,
                        "-A KUBE-NODEPORTS -m comment --comment \"{svc_name}\" -p {p} -m {p} --dport {} -j {ext_chain}",
                        f.port
                    );
                } else {
                    // External addresses (LoadBalancer IPs) masquerade like node ports.
                    let (what, target) = if *external {
                        ("external IP", &ext_chain)
                    } else {
                        ("cluster IP", &svc_chain)
                    };
                    let _ = writeln!(
                        rules,
                        "-A KUBE-SERVICES -m comment --comment \"{svc_name} {what}\" -d {}/32 -p {p} -m {p} --dport {} -j {target}",
                        f.addr, f.port
                    );
                }
            }
            // externalTrafficPolicy Local: local endpoints only (the model chose them)
            // and the client address is kept, so no masquerade.
            if !local_only {
                let _ = writeln!(rules, "-A {ext_chain} -j KUBE-MARK-MASQ");
            }
            let _ = writeln!(rules, "-A {ext_chain} -j {svc_chain}");
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
                chains.push(sep.clone());
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
        }
    }
    chains.sort();
    chains.dedup();
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
         COMMIT\n",
    );
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
    use crate::proxy::model::{BackendAddr, DesiredFrontend};

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
        };
        let node_ip = std::net::Ipv4Addr::new(10, 90, 0, 11);
        svc.insert(
            Frontend {
                addr: "10.96.0.20".parse().unwrap(),
                port: 80,
                proto: 6,
            },
            want.clone(),
        );
        svc.insert(
            Frontend {
                addr: node_ip,
                port: 30080,
                proto: 6,
            },
            DesiredFrontend {
                external: true,
                ..want
            },
        );
        let mut all = BTreeMap::new();
        all.insert(("demo".to_string(), "echo".to_string()), svc);
        let r = render(&all, node_ip);
        assert!(r.starts_with("*nat\n:KUBE-EXT-"), "{r}");
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
}
