//! Where other nodes' pods live. Data: Node objects (spec.podCIDR, the InternalIP
//! address), watched. Decision: every other node's podCIDR and its node IP (/32) route to
//! that node through the tunnel. Output: [`Datapath::set_remote_routes`], which writes
//! only the differences. Level-triggered: the whole desired table is recomputed after
//! every change and on a periodic resync; nothing is applied before the first full list,
//! so a restarted agent never flushes routes it has not seen yet.

use std::{collections::BTreeMap, net::Ipv4Addr, sync::Arc, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client, ResourceExt,
    runtime::{WatchStreamExt, watcher},
};

use super::{
    datapath::{Datapath, RemoteRoutes},
    network::Ipv4Net,
};

/// How often the table is re-applied without events (repairs manual changes).
pub const RESYNC: Duration = Duration::from_secs(30);

/// (podCIDR, InternalIP) of a Node, if it has both.
pub fn node_route(node: &Node) -> Option<(Ipv4Net, Ipv4Addr)> {
    let cidr = node
        .spec
        .as_ref()?
        .pod_cidr
        .as_deref()
        .and_then(Ipv4Net::parse)?;
    let ip = node
        .status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())?;
    Some((cidr, ip))
}

/// The desired routes for `self_name` given all known nodes.
pub fn desired_routes<'a>(
    self_name: &str,
    nodes: impl IntoIterator<Item = (&'a String, &'a (Ipv4Net, Ipv4Addr))>,
) -> RemoteRoutes {
    let mut out = RemoteRoutes::new();
    for (name, (cidr, ip)) in nodes {
        if name == self_name {
            continue;
        }
        out.insert(*cidr, *ip);
        out.insert(
            Ipv4Net {
                addr: *ip,
                prefix: 32,
            },
            *ip,
        );
    }
    out
}

/// Runs until the process ends.
pub async fn run(client: Client, self_name: String, datapath: Arc<Datapath>) {
    let api: Api<Node> = Api::all(client);
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut known: BTreeMap<String, (Ipv4Net, Ipv4Addr)> = BTreeMap::new();
    let mut staged: BTreeMap<String, (Ipv4Net, Ipv4Addr)> = BTreeMap::new();
    let mut listed = false;
    let mut resync = tokio::time::interval(RESYNC);
    loop {
        let changed = tokio::select! {
            ev = events.next() => match ev {
                None => return,
                Some(Err(e)) => {
                    tracing::warn!("watching nodes: {e}");
                    false
                }
                Some(Ok(watcher::Event::Init)) => {
                    staged.clear();
                    false
                }
                Some(Ok(watcher::Event::InitApply(n))) => {
                    if let Some(r) = node_route(&n) {
                        staged.insert(n.name_any(), r);
                    }
                    false
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    known = std::mem::take(&mut staged);
                    listed = true;
                    true
                }
                Some(Ok(watcher::Event::Apply(n))) => {
                    match node_route(&n) {
                        Some(r) => known.insert(n.name_any(), r) != Some(r),
                        None => known.remove(&n.name_any()).is_some(),
                    }
                }
                Some(Ok(watcher::Event::Delete(n))) => known.remove(&n.name_any()).is_some(),
            },
            _ = resync.tick() => true,
        };
        if !changed || !listed {
            continue;
        }
        let desired = desired_routes(&self_name, &known);
        let dp = datapath.clone();
        match tokio::task::spawn_blocking(move || dp.set_remote_routes(&desired)).await {
            Ok(Ok(ops)) if ops > 0 => {
                tracing::info!(nodes = known.len(), ops, "remote node routes updated")
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("updating remote node routes: {e}"),
            Err(e) => tracing::warn!("route update task: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_routes_skip_self() {
        let mut nodes = BTreeMap::new();
        let a = (
            Ipv4Net::parse("10.244.1.0/24").unwrap(),
            "10.90.0.11".parse().unwrap(),
        );
        let b = (
            Ipv4Net::parse("10.244.2.0/24").unwrap(),
            "10.90.0.12".parse().unwrap(),
        );
        nodes.insert("node-1".to_string(), a);
        nodes.insert("node-2".to_string(), b);
        let d = desired_routes("node-1", &nodes);
        assert_eq!(d.len(), 2);
        assert_eq!(d[&b.0], b.1);
        assert_eq!(d[&Ipv4Net::parse("10.90.0.12/32").unwrap()], b.1);
        assert!(!d.contains_key(&a.0));
    }
}
