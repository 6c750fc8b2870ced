//! Node IPAM controller (kube-controller-manager's range allocator): every Node without
//! spec.podCIDR gets the lowest free `/node_cidr_mask_size` subnet of the cluster CIDR.
//!
//! There is no allocation bookkeeping: the used set is read from the Nodes themselves
//! each time, so a deleted Node frees its range and a restart loses nothing. Two Nodes
//! registering together cannot get the same range: allocations run one at a time under
//! an in-process lock, each one lists Nodes fresh from the apiserver, and the write pins
//! the Node's resourceVersion (a 409 means "look again").

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{Backoff, ControllerConfig, Error, Result, is_conflict, is_not_found, key_of};
use crate::events::EventRecorder;

const COMPONENT: &str = "node-ipam-controller";
/// How soon a Node that found the cluster CIDR full looks again (a Node going away is
/// not an event on the waiting Node).
const EXHAUSTED_RETRY: Duration = Duration::from_secs(5);
/// Conflicting writes tolerated in one reconcile before backing off.
const ATTEMPTS: usize = 5;
/// Kubernetes refuses node masks more than 16 bits longer than the cluster mask (65536
/// node ranges); the same bound keeps the free-range search small.
const MAX_SUBNET_BITS: u8 = 16;

/// An IPv4 network: address with host bits cleared, and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Cidr {
    addr: u32,
    prefix: u8,
}

impl Ipv4Cidr {
    /// Parses "a.b.c.d/n". Host bits are cleared, as Go's net.ParseCIDR does, so
    /// "10.244.1.0/16" means 10.244.0.0/16.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (ip, len) = s
            .split_once('/')
            .ok_or_else(|| format!("invalid CIDR {s:?}: missing \"/prefix\""))?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|_| format!("invalid CIDR {s:?}: {ip:?} is not an IPv4 address"))?;
        let prefix: u8 = len
            .parse()
            .ok()
            .filter(|p| *p <= 32)
            .ok_or_else(|| format!("invalid CIDR {s:?}: prefix length must be 0-32"))?;
        Ok(Self::new(u32::from(ip), prefix))
    }

    fn new(addr: u32, prefix: u8) -> Self {
        Ipv4Cidr {
            addr: addr & Self::mask(prefix),
            prefix,
        }
    }

    fn mask(prefix: u8) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
    }

    pub fn first(&self) -> u32 {
        self.addr
    }

    pub fn last(&self) -> u32 {
        self.addr | !Self::mask(self.prefix)
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Number of addresses (u64: a /0 holds 2^32).
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    pub fn overlaps(&self, other: &Ipv4Cidr) -> bool {
        self.first() <= other.last() && other.first() <= self.last()
    }

    pub fn contains(&self, other: &Ipv4Cidr) -> bool {
        self.first() <= other.first() && other.last() <= self.last()
    }
}

impl fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", Ipv4Addr::from(self.addr), self.prefix)
    }
}

/// The cluster CIDR and the size of the range each Node gets from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterCidr {
    net: Ipv4Cidr,
    node_prefix: u8,
}

/// Validates --cluster-cidr and --node-cidr-mask-size together (the binary calls this
/// at startup so a typo fails loudly instead of leaving Nodes without ranges).
pub fn parse_cluster_cidr(cidr: &str, node_mask: u8) -> Result<ClusterCidr, String> {
    if cidr.contains(':') {
        return Err(format!(
            "cluster CIDR {cidr:?}: only IPv4 is supported by the node IPAM controller"
        ));
    }
    let net = Ipv4Cidr::parse(cidr).map_err(|e| format!("cluster CIDR: {e}"))?;
    if node_mask > 32 {
        return Err(format!("node CIDR mask size {node_mask} is larger than 32"));
    }
    if node_mask < net.prefix {
        return Err(format!(
            "node CIDR mask size /{node_mask} is shorter than the cluster CIDR {net}"
        ));
    }
    if node_mask - net.prefix > MAX_SUBNET_BITS {
        return Err(format!(
            "node CIDR mask size /{node_mask} is more than {MAX_SUBNET_BITS} bits longer than \
             the cluster CIDR {net}"
        ));
    }
    Ok(ClusterCidr {
        net,
        node_prefix: node_mask,
    })
}

/// Checks the parts of the config this controller reads.
pub fn validate(cfg: &ControllerConfig) -> Result<(), String> {
    parse_cluster_cidr(&cfg.cluster_cidr, cfg.node_cidr_mask_size).map(|_| ())
}

impl ClusterCidr {
    pub fn net(&self) -> Ipv4Cidr {
        self.net
    }

    /// The lowest node-sized range that overlaps none of `used`, or None when the
    /// cluster CIDR is full. Ranges outside the cluster CIDR are ignored.
    pub fn allocate(&self, used: &[Ipv4Cidr]) -> Option<Ipv4Cidr> {
        let size = 1u64 << (32 - u32::from(self.node_prefix));
        let base = u64::from(self.net.first());
        let end = base + self.net.size();
        let mut taken: Vec<(u64, u64)> = used
            .iter()
            .filter(|c| c.overlaps(&self.net))
            .map(|c| (u64::from(c.first()), u64::from(c.last())))
            .collect();
        taken.sort_unstable();
        let mut candidate = base;
        // Sweep the ranges in address order, jumping past each one that overlaps the
        // candidate to the next aligned range.
        for (first, last) in taken {
            if candidate + size > end {
                return None;
            }
            if last < candidate {
                continue;
            }
            if first >= candidate + size {
                break;
            }
            candidate = base + (last + 1 - base).div_ceil(size) * size;
        }
        (candidate + size <= end).then(|| Ipv4Cidr::new(candidate as u32, self.node_prefix))
    }
}

/// The IPv4 ranges a Node holds (spec.podCIDR and spec.podCIDRs).
fn node_cidrs(node: &Node) -> Vec<Ipv4Cidr> {
    let Some(spec) = node.spec.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<Ipv4Cidr> = spec
        .pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .filter(|s| !s.contains(':'))
        .filter_map(|s| Ipv4Cidr::parse(s).ok())
        .collect();
    out.sort_unstable_by_key(|c| (c.first(), c.prefix));
    out.dedup();
    out
}

fn has_pod_cidr(node: &Node) -> bool {
    node.spec.as_ref().is_some_and(|s| {
        s.pod_cidr.as_deref().is_some_and(|c| !c.is_empty())
            || s.pod_cidrs.as_deref().is_some_and(|c| !c.is_empty())
    })
}

/// Why a Node's existing range is a problem, if it is.
fn check_existing(
    cluster: &ClusterCidr,
    node: &Node,
    others: &[(String, Vec<Ipv4Cidr>)],
) -> Option<String> {
    let name = node.name_any();
    let spec = node.spec.as_ref()?;
    let raw: Vec<&String> = spec
        .pod_cidr
        .iter()
        .chain(spec.pod_cidrs.iter().flatten())
        .filter(|s| !s.contains(':'))
        .collect();
    for s in raw {
        let Ok(c) = Ipv4Cidr::parse(s) else {
            return Some(format!("Node {name} has an invalid podCIDR {s:?}"));
        };
        if !cluster.net.contains(&c) {
            return Some(format!(
                "Node {name} podCIDR {c} is outside the cluster CIDR {}",
                cluster.net
            ));
        }
        if let Some((other, _)) = others
            .iter()
            .find(|(_, theirs)| theirs.iter().any(|t| t.overlaps(&c)))
        {
            return Some(format!(
                "Node {name} podCIDR {c} overlaps the podCIDR of Node {other}"
            ));
        }
    }
    None
}

pub struct Ctx {
    client: Client,
    events: EventRecorder,
    backoff: Backoff,
    nodes: Store<Node>,
    cluster: ClusterCidr,
    /// Serializes allocations so two Nodes never pick the same free range.
    alloc: tokio::sync::Mutex<()>,
    /// Node uid + message already reported, so an unchanged problem is one Event, not
    /// one per Node status update.
    reported: Mutex<HashSet<String>>,
}

impl Ctx {
    /// True the first time this (node, message) is seen.
    fn first_report(&self, node: &Node, msg: &str) -> bool {
        let key = format!("{}\n{msg}", node.uid().unwrap_or_default());
        self.reported
            .lock()
            .map(|mut r| r.insert(key))
            .unwrap_or(true)
    }

    fn forget_reports(&self, node: &Node) {
        let prefix = format!("{}\n", node.uid().unwrap_or_default());
        if let Ok(mut r) = self.reported.lock() {
            r.retain(|k| !k.starts_with(&prefix));
        }
    }
}

pub async fn run(client: Client, events: EventRecorder, cfg: ControllerConfig) {
    let cluster = match parse_cluster_cidr(&cfg.cluster_cidr, cfg.node_cidr_mask_size) {
        Ok(c) => c,
        Err(e) => {
            // The binary validates flags first; this only guards other callers. The
            // other controllers keep running.
            tracing::error!("node IPAM controller disabled: {e}");
            return std::future::pending().await;
        }
    };
    let api: Api<Node> = Api::all(client.clone());
    let ctrl = Controller::new(api, watcher::Config::default());
    let ctx = Arc::new(Ctx {
        client,
        events,
        backoff: Backoff::default(),
        nodes: ctrl.store(),
        cluster,
        alloc: tokio::sync::Mutex::new(()),
        reported: Mutex::new(HashSet::new()),
    });
    super::drain(COMPONENT, ctrl.run(reconcile, error_policy, ctx)).await;
}

fn error_policy(node: Arc<Node>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let key = key_of(node.as_ref());
    let wait = ctx.backoff.failed(&key);
    tracing::warn!("node ipam {key}: {err}; retrying in {wait:?}");
    Action::requeue(wait)
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action> {
    let key = key_of(node.as_ref());
    if node.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let action = if has_pod_cidr(&node) {
        check(&node, &ctx).await?;
        Action::await_change()
    } else {
        allocate(&node, &ctx).await?
    };
    ctx.backoff.succeeded(&key);
    Ok(action)
}

/// A Node that already has a range keeps it; a bad one is reported, never changed.
/// Reads the watch cache: this only decides whether to warn, and runs on every Node
/// update.
async fn check(node: &Node, ctx: &Ctx) -> Result<()> {
    let name = node.name_any();
    let others: Vec<(String, Vec<Ipv4Cidr>)> = ctx
        .nodes
        .state()
        .iter()
        .filter(|n| n.name_any() != name)
        .map(|n| (n.name_any(), node_cidrs(n)))
        .collect();
    if let Some(msg) = check_existing(&ctx.cluster, node, &others) {
        if ctx.first_report(node, &msg) {
            tracing::warn!("{msg}");
            ctx.events
                .record(COMPONENT, node, "Warning", "CIDRNotAvailable", &msg);
        }
    } else {
        ctx.forget_reports(node);
    }
    Ok(())
}

async fn allocate(node: &Node, ctx: &Ctx) -> Result<Action> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let name = node.name_any();
    let _guard = ctx.alloc.lock().await;
    for _ in 0..ATTEMPTS {
        // Listed under the lock, after every earlier allocation's write returned, so the
        // used set includes them even if the watch cache has not caught up.
        let nodes = api.list(&ListParams::default()).await?.items;
        let Some(me) = nodes.iter().find(|n| n.name_any() == name) else {
            return Ok(Action::await_change());
        };
        if has_pod_cidr(me) || me.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        let used: Vec<Ipv4Cidr> = nodes
            .iter()
            .filter(|n| n.name_any() != name)
            .flat_map(node_cidrs)
            .collect();
        let Some(cidr) = ctx.cluster.allocate(&used) else {
            let msg = format!("Node {name} status is now: CIDRNotAvailable");
            if ctx.first_report(me, &msg) {
                tracing::warn!("no free podCIDR in {} for node {name}", ctx.cluster.net);
                ctx.events
                    .record(COMPONENT, me, "Normal", "CIDRNotAvailable", &msg);
            }
            return Ok(Action::requeue(EXHAUSTED_RETRY));
        };
        let patch = json!({
            "metadata": {"resourceVersion": me.resource_version()},
            "spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]},
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!("allocated podCIDR {cidr} to node {name}");
                ctx.forget_reports(me);
                return Ok(Action::await_change());
            }
            Err(e) if is_not_found(&e) => return Ok(Action::await_change()),
            Err(e) if is_conflict(&e) => {
                tracing::debug!("node {name} changed while allocating its podCIDR; retrying");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::Other(format!(
        "node {name} kept changing while allocating its podCIDR"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::NodeSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn c(s: &str) -> Ipv4Cidr {
        Ipv4Cidr::parse(s).expect("test CIDR")
    }

    fn node(name: &str, cidr: Option<&str>) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                pod_cidr: cidr.map(Into::into),
                pod_cidrs: cidr.map(|c| vec![c.to_string()]),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn parses_and_masks() {
        assert_eq!(c("10.244.1.7/16").to_string(), "10.244.0.0/16");
        assert_eq!(c("0.0.0.0/0").size(), 1 << 32);
        assert_eq!(c("1.2.3.4/32").first(), c("1.2.3.4/32").last());
        assert!(c("10.0.0.0/8").contains(&c("10.1.0.0/16")));
        assert!(!c("10.1.0.0/16").contains(&c("10.0.0.0/8")));
        assert!(c("10.0.0.0/8").overlaps(&c("10.1.0.0/16")));
        assert!(!c("10.0.0.0/24").overlaps(&c("10.0.1.0/24")));
    }

    #[test]
    fn bad_config_is_an_error() {
        for (cidr, mask) in [
            ("", 24),
            ("10.244.0.0", 24),
            ("10.244.0.0/33", 24),
            ("10.244.0.0/x", 24),
            ("10.244.0/16", 24),
            ("fd00::/48", 64),
            ("10.244.0.0/16", 8),
            ("10.244.0.0/16", 33),
            ("10.0.0.0/8", 25),
        ] {
            assert!(parse_cluster_cidr(cidr, mask).is_err(), "{cidr} /{mask}");
        }
        assert!(parse_cluster_cidr("10.244.0.0/16", 24).is_ok());
        assert!(parse_cluster_cidr(" 10.0.0.0/8 ", 24).is_ok());
        assert!(validate(&ControllerConfig::default()).is_ok());
    }

    #[test]
    fn allocates_in_order() {
        let cl = parse_cluster_cidr("10.244.0.0/16", 24).expect("cfg");
        let mut used = Vec::new();
        for want in ["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"] {
            let got = cl.allocate(&used).expect("free range");
            assert_eq!(got.to_string(), want);
            used.push(got);
        }
    }

    #[test]
    fn reuses_freed_ranges_and_skips_foreign_ones() {
        let cl = parse_cluster_cidr("10.244.0.0/16", 24).expect("cfg");
        let used = [c("10.244.0.0/24"), c("10.244.2.0/24"), c("192.168.0.0/24")];
        assert_eq!(cl.allocate(&used), Some(c("10.244.1.0/24")));
        // A bigger foreign-sized range blocks every /24 it overlaps.
        let used = [c("10.244.0.0/23"), c("10.244.2.128/25")];
        assert_eq!(cl.allocate(&used), Some(c("10.244.3.0/24")));
        // Unsorted input, overlapping entries.
        let used = [c("10.244.1.0/24"), c("10.244.0.0/16"), c("10.244.0.0/24")];
        assert_eq!(cl.allocate(&used), None);
    }

    #[test]
    fn exhaustion() {
        let cl = parse_cluster_cidr("10.0.0.0/30", 31).expect("cfg");
        let a = cl.allocate(&[]).expect("first");
        let b = cl.allocate(&[a]).expect("second");
        assert_eq!(b.to_string(), "10.0.0.2/31");
        assert_eq!(cl.allocate(&[a, b]), None);
        let whole = parse_cluster_cidr("10.0.0.0/24", 24).expect("cfg");
        assert_eq!(whole.allocate(&[]), Some(c("10.0.0.0/24")));
        assert_eq!(whole.allocate(&[c("10.0.0.9/32")]), None);
        let all = parse_cluster_cidr("0.0.0.0/0", 16).expect("cfg");
        assert_eq!(
            all.allocate(&[c("0.0.0.0/16")]),
            Some(c("0.1.0.0/16")),
            "no overflow at the top of the address space"
        );
        let top = parse_cluster_cidr("255.255.255.0/24", 25).expect("cfg");
        assert_eq!(
            top.allocate(&[c("255.255.255.0/25")]),
            Some(c("255.255.255.128/25"))
        );
        assert_eq!(
            top.allocate(&[c("255.255.255.0/25"), c("255.255.255.128/25")]),
            None
        );
    }

    #[test]
    fn existing_ranges_are_checked() {
        let cl = parse_cluster_cidr("10.244.0.0/16", 24).expect("cfg");
        let others = vec![("b".to_string(), vec![c("10.244.1.0/24")])];
        assert_eq!(
            check_existing(&cl, &node("a", Some("10.244.0.0/24")), &others),
            None
        );
        assert!(
            check_existing(&cl, &node("a", Some("10.244.1.0/24")), &others)
                .is_some_and(|m| m.contains("overlaps"))
        );
        assert!(
            check_existing(&cl, &node("a", Some("10.9.0.0/24")), &others)
                .is_some_and(|m| m.contains("outside"))
        );
        assert!(check_existing(&cl, &node("a", Some("garbage")), &others).is_some());
        assert!(has_pod_cidr(&node("a", Some("10.244.0.0/24"))));
        assert!(!has_pod_cidr(&node("a", None)));
        assert_eq!(node_cidrs(&node("a", Some("10.244.0.0/24"))).len(), 1);
    }
}
