//! What a Service should look like in the maps of one node: pure functions from a
//! Service and its EndpointSlices to frontends and backends, with Kubernetes' rules
//! (ready endpoints only, named target ports, internalTrafficPolicy Local, sessionAffinity
//! ClientIP, headless and SCTP services skipped).
//!
//! Traffic policies, as kube-proxy applies them:
//! - ClusterIPs (and externalIPs): every ready endpoint, or the node's own under
//!   internalTrafficPolicy Local;
//! - external destinations (LoadBalancer IPs, this node's IP at a nodePort) for clients
//!   outside the cluster: every ready endpoint, or the node's own under
//!   externalTrafficPolicy Local;
//! - pods connecting to an external destination (a nodePort on any node's IP, a
//!   LoadBalancer IP): every ready endpoint whatever the policies (kube-proxy's "pod
//!   traffic for external destinations" short-circuit to the cluster chain). These are
//!   [`Scope::Pods`] entries: the NodePort wildcard 0.0.0.0:nodePort, which the socket
//!   load balancer uses for every node address, and under externalTrafficPolicy Local a
//!   twin of each LoadBalancer IP.

use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use skiff_ebpf_common::{PROTO_TCP, PROTO_UDP};

/// The default of sessionAffinityConfig.clientIP.timeoutSeconds (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT: u32 = 10_800;
/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A service address a client can connect to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

/// Which clients an entry is for (`skiff_ebpf_common::SCOPE_*`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Everyone: pods' sockets and packets arriving at the node.
    #[default]
    All,
    /// Pods only (the socket load balancer): see the module doc.
    Pods,
}

/// A frontend entry: an address and who it is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FrontendKey {
    pub frontend: Frontend,
    pub scope: Scope,
}

impl FrontendKey {
    pub fn all(frontend: Frontend) -> FrontendKey {
        FrontendKey {
            frontend,
            scope: Scope::All,
        }
    }

    pub fn pods(frontend: Frontend) -> FrontendKey {
        FrontendKey {
            frontend,
            scope: Scope::Pods,
        }
    }

    /// The NodePort wildcard of `port` (pods connecting to any node's IP).
    pub fn node_port_wildcard(port: u16, proto: u8) -> FrontendKey {
        FrontendKey::pods(Frontend {
            addr: Ipv4Addr::UNSPECIFIED,
            port,
            proto,
        })
    }
}

/// A backend address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

/// One frontend's desired state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    /// Sorted, without duplicates.
    pub backends: Vec<BackendAddr>,
    /// Some(timeout seconds) under sessionAffinity ClientIP.
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy Local on a NodePort/LoadBalancer frontend: local backends
    /// only, the client address is kept.
    pub local_only: bool,
    /// A NodePort or LoadBalancer frontend (traffic from outside the cluster).
    pub external: bool,
    /// The Service port has ready endpoints somewhere (a traffic policy may still leave
    /// this frontend none): kube-proxy DROPs where a policy left none and REJECTs where
    /// there are none at all.
    pub has_endpoints: bool,
}

/// A service's frontends; empty for headless services.
pub type DesiredService = BTreeMap<FrontendKey, DesiredFrontend>;

/// Why a Service was skipped (reported as an Event).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub reason: &'static str,
    pub message: String,
}

fn proto_of(p: Option<&str>) -> Result<u8, String> {
    match p.unwrap_or("TCP") {
        "TCP" => Ok(PROTO_TCP),
        "UDP" => Ok(PROTO_UDP),
        other => Err(other.to_string()),
    }
}

/// The desired frontends of `svc` on node `node`, from the EndpointSlices of that
/// Service. Ports with an unsupported protocol are left out and reported.
pub fn desired_service(
    svc: &Service,
    slices: &[&EndpointSlice],
    node: &str,
    node_ip: Ipv4Addr,
) -> (DesiredService, Vec<Skipped>) {
    let mut out = DesiredService::new();
    let mut skipped = vec![];
    let Some(spec) = svc.spec.as_ref() else {
        return (out, skipped);
    };
    let mut vips: Vec<Ipv4Addr> = vec![];
    let cluster_ips: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    for ip in cluster_ips {
        // "None" (headless) and IPv6 addresses do not parse as IPv4.
        if let Ok(a) = ip.parse() {
            vips.push(a);
        }
    }
    if vips.is_empty() {
        return (out, skipped);
    }
    for ip in spec.external_ips.iter().flatten() {
        if let Ok(a) = ip.parse() {
            vips.push(a);
        }
    }
    let lb_ips = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok());
    let lb_ips: Vec<Ipv4Addr> = lb_ips.collect();
    let type_ = spec.type_.as_deref().unwrap_or("ClusterIP");
    let external = type_ == "NodePort" || type_ == "LoadBalancer";
    let external_local = external && spec.external_traffic_policy.as_deref() == Some("Local");
    let affinity_timeout = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT)
    });
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    for p in spec.ports.iter().flatten() {
        let proto = match proto_of(p.protocol.as_deref()) {
            Ok(proto) => proto,
            Err(other) => {
                skipped.push(Skipped {
                    reason: "UnsupportedProtocol",
                    message: format!(
                        "port {} ({}) uses protocol {other}, which skiff's service proxy does not support (TCP and UDP only); the port is not load-balanced",
                        p.port,
                        p.name.as_deref().unwrap_or("unnamed")
                    ),
                });
                continue;
            }
        };
        let Ok(port) = u16::try_from(p.port) else {
            skipped.push(Skipped {
                reason: "InvalidPort",
                message: format!("port {} is out of range 1-65535", p.port),
            });
            continue;
        };
        if port == 0 {
            continue;
        }
        let name = p.name.as_deref().unwrap_or("");
        let mut all_backends = vec![];
        let mut local_backends = vec![];
        for slice in slices {
            if slice.address_type != "IPv4" {
                continue;
            }
            let Some(target) = slice.ports.iter().flatten().find(|sp| {
                sp.name.as_deref().unwrap_or("") == name
                    && proto_of(sp.protocol.as_deref()).ok() == Some(proto)
            }) else {
                continue;
            };
            let Some(tport) = target.port.and_then(|t| u16::try_from(t).ok()) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                let here = ep.node_name.as_deref() == Some(node);
                for a in &ep.addresses {
                    if let Ok(addr) = a.parse() {
                        let b = BackendAddr {
                            addr,
                            port: tport,
                            proto,
                        };
                        if here {
                            local_backends.push(b);
                        }
                        all_backends.push(b);
                    }
                }
            }
        }
        all_backends.sort();
        all_backends.dedup();
        local_backends.sort();
        local_backends.dedup();
        let has_endpoints = !all_backends.is_empty();
        let entry = |backends: &Vec<BackendAddr>, local: bool, external: bool| DesiredFrontend {
            backends: backends.clone(),
            affinity_timeout,
            local_only: local,
            external,
            has_endpoints,
        };
        let internal_backends = if internal_local {
            &local_backends
        } else {
            &all_backends
        };
        for vip in &vips {
            let f = Frontend {
                addr: *vip,
                port,
                proto,
            };
            out.insert(FrontendKey::all(f), entry(internal_backends, false, false));
        }
        // Traffic from outside: LoadBalancer IPs and this node's IP at the nodePort.
        let external_backends = if external_local {
            &local_backends
        } else {
            &all_backends
        };
        let node_port = p
            .node_port
            .filter(|_| external)
            .and_then(|np| u16::try_from(np).ok())
            .filter(|np| *np != 0);
        let lb = lb_ips.iter().map(|ip| (*ip, port));
        for (addr, port) in lb.clone().chain(node_port.map(|np| (node_ip, np))) {
            let f = Frontend { addr, port, proto };
            out.insert(
                FrontendKey::all(f),
                entry(external_backends, external_local, true),
            );
        }
        // Pods going to those destinations: Cluster semantics (see the module doc).
        if let Some(np) = node_port {
            out.insert(
                FrontendKey::node_port_wildcard(np, proto),
                entry(&all_backends, false, false),
            );
        }
        if external_local {
            for (addr, port) in lb {
                let f = Frontend { addr, port, proto };
                out.insert(FrontendKey::pods(f), entry(&all_backends, false, false));
            }
        }
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 90, 0, 11);

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }
    fn slice(v: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn ready_endpoints_named_ports_affinity() {
        let s = svc(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.20",
                "sessionAffinity": "ClientIP",
                "ports": [
                    {"name": "http", "port": 80, "targetPort": "web"},
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "sctp", "port": 99, "protocol": "SCTP"}
                ]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "172.18.0.50"}]}}
        }));
        let sl = slice(json!({
            "metadata": {"name": "web-abc", "namespace": "default",
                         "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}],
            "endpoints": [
                {"addresses": ["10.244.1.2"], "conditions": {"ready": true}, "nodeName": "n1"},
                {"addresses": ["10.244.2.2"], "conditions": {"ready": false, "terminating": true}, "nodeName": "n2"},
                {"addresses": ["10.244.2.3"], "nodeName": "n2"}
            ]
        }));
        let (d, skipped) = desired_service(&s, &[&sl], "n1", NODE_IP);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].message.contains("SCTP"), "{:?}", skipped);
        let http = Frontend {
            addr: "10.96.0.20".parse().unwrap(),
            port: 80,
            proto: PROTO_TCP,
        };
        let f = &d[&FrontendKey::all(http)];
        assert_eq!(f.affinity_timeout, Some(DEFAULT_AFFINITY_TIMEOUT));
        let addrs: Vec<String> = f
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.addr, b.port))
            .collect();
        assert_eq!(
            addrs,
            ["10.244.1.2:8080", "10.244.2.3:8080"],
            "the terminating one is out"
        );
        let dns = Frontend {
            addr: "10.96.0.20".parse().unwrap(),
            port: 53,
            proto: PROTO_UDP,
        };
        assert_eq!(d[&FrontendKey::all(dns)].backends[0].port, 5353);
        let lb = Frontend {
            addr: "172.18.0.50".parse().unwrap(),
            ..http
        };
        assert_eq!(
            d[&FrontendKey::all(lb)].backends.len(),
            2,
            "the LoadBalancer IP is a frontend too"
        );
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn headless_and_local_policy() {
        let headless = svc(json!({
            "metadata": {"name": "h"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }));
        assert!(desired_service(&headless, &[], "n1", NODE_IP).0.is_empty());
        let local = svc(json!({
            "metadata": {"name": "l"},
            "spec": {"clusterIP": "10.96.0.21", "internalTrafficPolicy": "Local",
                     "ports": [{"port": 80}]}
        }));
        let sl = slice(json!({
            "metadata": {"name": "l-1"},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [
                {"addresses": ["10.244.1.2"], "nodeName": "n1"},
                {"addresses": ["10.244.2.2"], "nodeName": "n2"}
            ]
        }));
        let (d, _) = desired_service(&local, &[&sl], "n2", NODE_IP);
        let f = d.values().next().unwrap();
        assert_eq!(f.backends.len(), 1);
        assert_eq!(f.backends[0].addr.to_string(), "10.244.2.2");
        assert_eq!(f.affinity_timeout, None);
    }

    #[test]
    fn node_ports_and_external_local_policy() {
        let s = svc(json!({
            "metadata": {"name": "np", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.22",
                "externalTrafficPolicy": "Local",
                "internalTrafficPolicy": "Local",
                "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "172.18.0.51"}]}}
        }));
        let sl = slice(json!({
            "metadata": {"name": "np-1"},
            "addressType": "IPv4",
            "ports": [{"port": 8080}],
            "endpoints": [
                {"addresses": ["10.244.1.2"], "nodeName": "n1"},
                {"addresses": ["10.244.2.2"], "nodeName": "n2"}
            ]
        }));
        let (d, _) = desired_service(&s, &[&sl], "n1", NODE_IP);
        let f = |addr: &str, port| Frontend {
            addr: addr.parse().unwrap(),
            port,
            proto: PROTO_TCP,
        };
        let n = |k: &FrontendKey| d[k].backends.len();
        // Clients outside: the node's own endpoints (externalTrafficPolicy Local).
        let node_port = FrontendKey::all(f("10.90.0.11", 30080));
        assert_eq!(n(&node_port), 1);
        assert!(d[&node_port].local_only && d[&node_port].external);
        assert_eq!(n(&FrontendKey::all(f("172.18.0.51", 80))), 1);
        // Pods: every endpoint, at any node's IP (the wildcard) and at the LB IP.
        let wild = FrontendKey::node_port_wildcard(30080, PROTO_TCP);
        assert_eq!(n(&wild), 2);
        assert!(!d[&wild].local_only);
        assert_eq!(n(&FrontendKey::pods(f("172.18.0.51", 80))), 2);
        // The ClusterIP follows internalTrafficPolicy Local.
        assert_eq!(n(&FrontendKey::all(f("10.96.0.22", 80))), 1);
        assert_eq!(d.len(), 5);
        assert!(d.values().all(|v| v.has_endpoints));

        // Cluster policy: no pods-only twin for the LB IP; the wildcard stays.
        let mut cluster = s.clone();
        if let Some(spec) = cluster.spec.as_mut() {
            spec.external_traffic_policy = Some("Cluster".into());
        }
        let (d, _) = desired_service(&cluster, &[&sl], "n1", NODE_IP);
        assert_eq!(d[&node_port].backends.len(), 2);
        assert!(!d.contains_key(&FrontendKey::pods(f("172.18.0.51", 80))));
        assert!(d.contains_key(&wild));
        assert_eq!(d.len(), 4);

        // No endpoints at all.
        let (d, _) = desired_service(&s, &[], "n1", NODE_IP);
        assert!(
            d.values()
                .all(|v| v.backends.is_empty() && !v.has_endpoints)
        );
    }
}
