//! The eBPF data path of pod networking.
//!
//! Where things live: the programs of ebpf/programs/src/pod_network.rs, their maps
//! pinned under `--bpffs-dir` (/sys/fs/bpf/skiff/<node>), one VXLAN device
//! [`VXLAN_DEVICE`] in external (collect_md) mode, and a tc filter (priority/handle
//! [`TC_PRIORITY`]/[`TC_HANDLE`]) on every pod's host veth and on the VXLAN device.
//!
//! Restarts: filters stay attached when the agent exits (links are released, not
//! detached) and maps are pinned, so traffic keeps flowing without the agent. A new agent
//! loads the object against the pinned maps and *replaces* each filter in place (same
//! priority and handle), reuses the VXLAN device, and rewrites map entries only where
//! they differ from the desired state.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        SchedClassifier, TcAttachType,
        tc::{NlOptions, SchedClassifierLink, TcAttachOptions, qdisc_add_clsact},
    },
};
use skiff_ebpf_common::{
    DATAPATH_STATS_MAP, FROM_POD_PROGRAM, LOCAL_PODS_MAP, LocalPod, NODE_CONFIG_MAP,
    NODE_INGRESS_PROGRAM, NODE_ROUTES_MAP, NodeConfig, NodeRoute, PacketCounter, TO_POD_PROGRAM,
    TUNNEL_CONFIG_MAP, TUNNEL_EGRESS_PROGRAM, TUNNEL_FLAG_STACK, TUNNEL_INGRESS_PROGRAM,
    TunnelConfig, ipv4_key,
};

use super::{
    network::Ipv4Net,
    preflight::{self, CniError, NodeInterface, ip},
};
use crate::ebpf::{EbpfError, ObjectSource, bpffs, require_root};

pub use skiff_ebpf_common::DatapathStat;

/// The node's VXLAN device (external mode: one device for every remote node).
pub const VXLAN_DEVICE: &str = "skiff_vxlan";
/// UDP port of the VXLAN device (the Linux/flannel default).
pub const VXLAN_PORT: u16 = 8472;
/// VNI of the cluster.
pub const DEFAULT_VNI: u32 = 1;
/// MAC of every node's VXLAN device (locally administered, "skf"); see [`TunnelConfig::mac`].
pub const VXLAN_MAC: [u8; 6] = [0x02, 0x73, 0x6b, 0x66, 0x00, 0x01];
/// Outer IPv4 + UDP + VXLAN + inner Ethernet headers.
pub const VXLAN_OVERHEAD: u32 = 50;
/// tc filter priority and handle of every skiff program (a restart replaces in place).
pub const TC_PRIORITY: u16 = 1;
pub const TC_HANDLE: u32 = 1;

/// What [`Datapath::start`] needs.
#[derive(Clone, Debug)]
pub struct DatapathConfig {
    pub node_ip: Ipv4Addr,
    /// bpffs directory of this node's pinned maps.
    pub pin_dir: PathBuf,
    pub vni: u32,
    pub object: ObjectSource,
    /// Pod packets go through the node's stack (`--proxy-mode=iptables`).
    pub stack_only: bool,
}

/// Remote prefixes -> the node that has them: the desired content of the routes map.
pub type RemoteRoutes = BTreeMap<Ipv4Net, Ipv4Addr>;

struct Maps {
    ebpf: Ebpf,
    local_pods: HashMap<MapData, u32, LocalPod>,
    routes: LpmTrie<MapData, u32, NodeRoute>,
}

/// The loaded data path of one node.
pub struct Datapath {
    node_ip: Ipv4Addr,
    node_if: NodeInterface,
    pin_dir: PathBuf,
    maps: Mutex<Maps>,
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, EbpfError> {
    let p = ebpf
        .program_mut(name)
        .ok_or_else(|| EbpfError::NotInObject {
            kind: "program",
            name: name.into(),
        })?;
    p.try_into().map_err(|source| EbpfError::Program {
        name: name.into(),
        source,
    })
}

fn take_map(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or_else(|| EbpfError::NotInObject {
        kind: "map",
        name: name.into(),
    })
}

fn map_err(name: &str) -> impl Fn(aya::maps::MapError) -> EbpfError + '_ {
    move |source| EbpfError::Map {
        name: name.into(),
        source,
    }
}

/// Attaches program `name` to `interface` (clsact + netlink filter), replacing a filter
/// that an earlier agent left at the same priority/handle, and leaves it attached when
/// the agent exits.
fn attach(ebpf: &mut Ebpf, name: &str, interface: &str, at: TcAttachType) -> Result<(), EbpfError> {
    match qdisc_add_clsact(interface) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(source) => {
            return Err(EbpfError::Qdisc {
                interface: interface.into(),
                source,
            });
        }
    }
    let prog = program(ebpf, name)?;
    let options = TcAttachOptions::Netlink(NlOptions {
        priority: TC_PRIORITY,
        handle: TC_HANDLE,
    });
    let id = match prog.attach_with_options(interface, at, options) {
        Ok(id) => id,
        // A filter is already there (agent restart): swap the program atomically.
        Err(first) => {
            let existing = SchedClassifierLink::attached(interface, at, TC_PRIORITY, TC_HANDLE)
                .map_err(|_| EbpfError::NoSuchInterface {
                    interface: interface.into(),
                    netns: None,
                })?;
            prog.attach_to_link(existing)
                .map_err(|_| EbpfError::Program {
                    name: name.into(),
                    source: first,
                })?
        }
    };
    let link = prog.take_link(id).map_err(|source| EbpfError::Program {
        name: name.into(),
        source,
    })?;
    // Dropping a link detaches it; the filter must outlive this process.
    std::mem::forget(link);
    Ok(())
}

/// Is `VXLAN_DEVICE` an external-mode VXLAN device on our port?
fn vxlan_ok() -> bool {
    ip(&["-d", "-o", "link", "show", "dev", VXLAN_DEVICE])
        .map(|s| {
            s.contains("vxlan")
                && s.contains("external")
                && s.contains(&format!("dstport {VXLAN_PORT}"))
        })
        .unwrap_or(false)
}

/// Creates (or keeps) the VXLAN device; returns its ifindex and whether it was created.
fn ensure_vxlan(mtu: u32) -> Result<(u32, bool), CniError> {
    let mut created = false;
    if !vxlan_ok() {
        let _ = ip(&["link", "del", VXLAN_DEVICE]);
        let port = VXLAN_PORT.to_string();
        ip(&[
            "link",
            "add",
            VXLAN_DEVICE,
            "type",
            "vxlan",
            "external",
            "dstport",
            &port,
            "nolearning",
        ])
        .map_err(|e| CniError::VxlanUnavailable {
            device: VXLAN_DEVICE.into(),
            detail: e.to_string(),
        })?;
        created = true;
    }
    let mac = preflight::format_mac(&VXLAN_MAC);
    let mtu = mtu.to_string();
    ip(&[
        "link",
        "set",
        VXLAN_DEVICE,
        "address",
        &mac,
        "mtu",
        &mtu,
        "arp",
        "off",
        "up",
    ])?;
    // The device never carries IPv6 (no tunnel key for it: the egress program drops it).
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{VXLAN_DEVICE}/disable_ipv6"),
        "1",
    );
    let (ifindex, _) = link_info(VXLAN_DEVICE, None)?;
    Ok((ifindex, created))
}

/// ifindex and MAC of a link (in the pod netns `netns`, or here), over netlink (no `ip`
/// process: this runs for every pod).
pub fn link_info(name: &str, netns: Option<&str>) -> Result<(u32, [u8; 6]), CniError> {
    let what = || match netns {
        Some(ns) => format!("link {name} in netns {ns}"),
        None => format!("link {name}"),
    };
    let err = |e: super::netlink::Error| CniError::Command {
        what: what(),
        detail: e.to_string(),
    };
    let mut sock = match netns {
        Some(ns) => super::netlink::Socket::open_in_netns(&super::netlink::netns_path(ns)),
        None => super::netlink::Socket::open(),
    }
    .map_err(err)?;
    match sock.link_get(name).map_err(err)? {
        Some(super::netlink::Link {
            index,
            mac: Some(mac),
            ..
        }) => Ok((index, mac)),
        Some(_) => Err(CniError::Command {
            what: what(),
            detail: "the link has no Ethernet address".into(),
        }),
        None => Err(CniError::Command {
            what: what(),
            detail: "no such link".into(),
        }),
    }
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("node_ip", &self.node_ip)
            .field("node_if", &self.node_if)
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Checks the kernel and the node, loads the programs against the pinned maps,
    /// creates the VXLAN device and attaches to it. Nothing is created before every
    /// check passed; if attaching fails, a device this call created is removed again.
    pub fn start(cfg: &DatapathConfig) -> Result<Datapath, CniError> {
        require_root()?;
        preflight::check_kernel()?;
        bpffs::ensure_pin_dir(&cfg.pin_dir)?;
        let node_if = preflight::node_interface(cfg.node_ip)?;
        let bytes = cfg.object.bytes()?;
        let mut ebpf = EbpfLoader::new()
            .map_pin_path(&cfg.pin_dir)
            .load(&bytes)
            .map_err(|source| EbpfError::Load { source })?;
        for name in [
            FROM_POD_PROGRAM,
            TO_POD_PROGRAM,
            TUNNEL_EGRESS_PROGRAM,
            TUNNEL_INGRESS_PROGRAM,
            NODE_INGRESS_PROGRAM,
        ] {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| EbpfError::Program {
                    name: name.into(),
                    source,
                })?;
        }
        // Forwarding: host -> pod through this node, pod -> node network.
        let _ = std::fs::write("/proc/sys/net/ipv4/ip_forward", "1");

        let (ifindex, created) = ensure_vxlan(node_if.mtu.saturating_sub(VXLAN_OVERHEAD))?;
        let attached = (|| -> Result<(), CniError> {
            let mut config: Array<MapData, TunnelConfig> =
                Array::try_from(take_map(&mut ebpf, TUNNEL_CONFIG_MAP)?)
                    .map_err(map_err(TUNNEL_CONFIG_MAP))?;
            config
                .set(
                    0,
                    TunnelConfig {
                        ifindex,
                        vni: cfg.vni,
                        mac: VXLAN_MAC,
                        flags: if cfg.stack_only { TUNNEL_FLAG_STACK } else { 0 },
                        _pad: 0,
                    },
                    0,
                )
                .map_err(map_err(TUNNEL_CONFIG_MAP))?;
            let (node_ifindex, _) = link_info(&node_if.name, None)?;
            let mut node_config: Array<MapData, NodeConfig> =
                Array::try_from(take_map(&mut ebpf, NODE_CONFIG_MAP)?)
                    .map_err(map_err(NODE_CONFIG_MAP))?;
            node_config
                .set(
                    0,
                    NodeConfig {
                        node_ip: ipv4_key(cfg.node_ip.octets()),
                        ifindex: node_ifindex,
                    },
                    0,
                )
                .map_err(map_err(NODE_CONFIG_MAP))?;
            attach(
                &mut ebpf,
                TUNNEL_EGRESS_PROGRAM,
                VXLAN_DEVICE,
                TcAttachType::Egress,
            )?;
            attach(
                &mut ebpf,
                TUNNEL_INGRESS_PROGRAM,
                VXLAN_DEVICE,
                TcAttachType::Ingress,
            )?;
            // NodePort / LoadBalancer traffic arriving on the node's interface.
            attach(
                &mut ebpf,
                NODE_INGRESS_PROGRAM,
                &node_if.name,
                TcAttachType::Ingress,
            )?;
            Ok(())
        })();
        if let Err(e) = attached {
            if created {
                let _ = ip(&["link", "del", VXLAN_DEVICE]);
            }
            return Err(e);
        }
        let local_pods = HashMap::try_from(take_map(&mut ebpf, LOCAL_PODS_MAP)?)
            .map_err(map_err(LOCAL_PODS_MAP))?;
        let routes = LpmTrie::try_from(take_map(&mut ebpf, NODE_ROUTES_MAP)?)
            .map_err(map_err(NODE_ROUTES_MAP))?;
        tracing::info!(
            pin_dir = %cfg.pin_dir.display(),
            vxlan = VXLAN_DEVICE,
            ifindex,
            interface = %node_if.name,
            "eBPF pod network ready"
        );
        Ok(Datapath {
            node_ip: cfg.node_ip,
            node_if,
            pin_dir: cfg.pin_dir.clone(),
            maps: Mutex::new(Maps {
                ebpf,
                local_pods,
                routes,
            }),
        })
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the loaded object (the service proxy takes its maps and programs from
    /// it; they share the pin directory).
    pub fn with_ebpf<T>(&self, f: impl FnOnce(&mut Ebpf) -> T) -> T {
        f(&mut self.maps().ebpf)
    }

    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// MTU of pod interfaces: the node interface's minus the VXLAN overhead.
    pub fn pod_mtu(&self) -> u32 {
        self.node_if.mtu.saturating_sub(VXLAN_OVERHEAD)
    }

    /// Refuses a podCIDR that overlaps the node network.
    pub fn check_pod_cidr(&self, cidr: Ipv4Net) -> Result<(), CniError> {
        preflight::check_overlap(cidr, &self.node_if)
    }

    /// Connects a pod: programs on its host veth, then its entry in the local pods map.
    pub fn add_pod(&self, pod_ip: Ipv4Addr, host_veth: &str, netns: &str) -> Result<(), CniError> {
        let (host_ifindex, host_mac) = link_info(host_veth, None)?;
        let (_, pod_mac) = link_info("eth0", Some(netns))?;
        let mut m = self.maps();
        attach(
            &mut m.ebpf,
            FROM_POD_PROGRAM,
            host_veth,
            TcAttachType::Ingress,
        )?;
        attach(&mut m.ebpf, TO_POD_PROGRAM, host_veth, TcAttachType::Egress)?;
        let entry = LocalPod {
            host_ifindex,
            pod_mac,
            host_mac,
        };
        let key = ipv4_key(pod_ip.octets());
        if m.local_pods.get(&key, 0).ok() != Some(entry) {
            m.local_pods
                .insert(key, entry, 0)
                .map_err(map_err(LOCAL_PODS_MAP))?;
        }
        Ok(())
    }

    /// Forgets a pod (its filters go with its veth).
    pub fn remove_pod(&self, pod_ip: Ipv4Addr) {
        let mut m = self.maps();
        let _ = m.local_pods.remove(&ipv4_key(pod_ip.octets()));
    }

    /// Pod IPs in the local pods map.
    pub fn local_pods(&self) -> Vec<Ipv4Addr> {
        let m = self.maps();
        m.local_pods
            .keys()
            .flatten()
            .map(|k| Ipv4Addr::from(k.to_ne_bytes()))
            .collect()
    }

    /// The routes map as it is.
    pub fn remote_routes(&self) -> RemoteRoutes {
        routes_in(&self.maps().routes)
    }

    /// Makes the routes map and the kernel routes through the VXLAN device equal to
    /// `desired`: adds and changes first, then removes what is no longer wanted. Only
    /// differences touch the map. Returns the number of map writes and deletes.
    pub fn set_remote_routes(&self, desired: &RemoteRoutes) -> Result<usize, CniError> {
        let current = self.remote_routes();
        let mut ops = 0;
        let node_ip = self.node_ip.to_string();
        for (net, node) in desired {
            if current.get(net) != Some(node) {
                let key = Key::new(u32::from(net.prefix), ipv4_key(net.addr.octets()));
                let value = NodeRoute {
                    node_ip: u32::from(*node),
                    _pad: 0,
                };
                self.maps()
                    .routes
                    .insert(&key, value, 0)
                    .map_err(map_err(NODE_ROUTES_MAP))?;
                ops += 1;
            }
            // The node's own traffic to remote pods: a kernel route into the device (the
            // egress program sets the tunnel key). Node IPs keep their route via the node
            // network; only pod traffic to them is tunnelled.
            if net.prefix < 32 {
                let cidr = net.to_string();
                ip(&[
                    "route",
                    "replace",
                    &cidr,
                    "dev",
                    VXLAN_DEVICE,
                    "src",
                    &node_ip,
                ])?;
            }
        }
        for net in current.keys().filter(|n| !desired.contains_key(n)) {
            let key = Key::new(u32::from(net.prefix), ipv4_key(net.addr.octets()));
            let _ = self.maps().routes.remove(&key);
            ops += 1;
        }
        // Kernel routes on the device that are no longer wanted.
        let routes = ip(&["-o", "-4", "route", "show", "dev", VXLAN_DEVICE]).unwrap_or_default();
        for line in routes.lines() {
            let Some(dst) = line.split_whitespace().next().and_then(Ipv4Net::parse) else {
                continue;
            };
            if !desired.contains_key(&dst) {
                let _ = ip(&["route", "del", &dst.to_string(), "dev", VXLAN_DEVICE]);
            }
        }
        Ok(ops)
    }

    /// Per-counter totals over all CPUs.
    pub fn stats(&self) -> Vec<(DatapathStat, PacketCounter)> {
        read_pinned_stats(&self.pin_dir).unwrap_or_default()
    }
}

/// Sums, over all CPUs, slots `0..slots` of the pinned per-CPU counter map `name`.
pub fn read_pinned_slots(
    pin_dir: &Path,
    name: &str,
    slots: u32,
) -> Result<Vec<PacketCounter>, EbpfError> {
    let data = MapData::from_pin(pin_dir.join(name)).map_err(map_err(name))?;
    let map: PerCpuArray<MapData, PacketCounter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(map_err(name))?;
    Ok((0..slots)
        .map(|slot| {
            let mut total = PacketCounter::default();
            if let Ok(values) = map.get(&slot, 0) {
                for v in values.iter() {
                    total.add(v);
                }
            }
            total
        })
        .collect())
}

/// Reads the data path counters from the pinned map (no agent needed).
pub fn read_pinned_stats(pin_dir: &Path) -> Result<Vec<(DatapathStat, PacketCounter)>, EbpfError> {
    let totals = read_pinned_slots(pin_dir, DATAPATH_STATS_MAP, DatapathStat::COUNT)?;
    Ok(DatapathStat::ALL.into_iter().zip(totals).collect())
}

fn routes_in<T: std::borrow::Borrow<MapData>>(map: &LpmTrie<T, u32, NodeRoute>) -> RemoteRoutes {
    map.iter()
        .flatten()
        .filter_map(|(k, v)| {
            let net = Ipv4Net {
                addr: Ipv4Addr::from(k.data().to_ne_bytes()),
                prefix: u8::try_from(k.prefix_len()).ok()?,
            };
            Some((net, Ipv4Addr::from(v.node_ip)))
        })
        .collect()
}

/// Reads the routes map from its pin (no agent needed): prefix -> node IP.
pub fn read_pinned_routes(pin_dir: &Path) -> Result<RemoteRoutes, EbpfError> {
    let data =
        MapData::from_pin(pin_dir.join(NODE_ROUTES_MAP)).map_err(map_err(NODE_ROUTES_MAP))?;
    let map: LpmTrie<MapData, u32, NodeRoute> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data)).map_err(map_err(NODE_ROUTES_MAP))?;
    Ok(routes_in(&map))
}
