//! Map key/value types shared between skiff's eBPF programs (`ebpf/programs`, built for
//! `bpfel-unknown-none`) and userspace (`skiff-agent`, with the `user` feature).
//!
//! Rules for every type in this crate:
//! - `#[repr(C)]`, only fixed-size integer fields, padding spelled out as `_pad` fields
//!   (the kernel copies raw bytes; implicit padding would leak uninitialised memory and
//!   differ between the two compilers);
//! - size and field offsets asserted at compile time, so a layout change breaks the build
//!   of both sides instead of silently corrupting maps;
//! - `aya::Pod` only behind the `user` feature (the eBPF side is `no_std` and has no aya).
#![no_std]

use core::mem::{offset_of, size_of};

/// Name of the per-CPU packet counter map of the `skiff_count` program (the symbol name of
/// the `#[map]` static in `ebpf/programs`, and the file name it is pinned under).
pub const COUNTER_MAP: &str = "SKIFF_COUNTERS";
/// Name of the tc classifier that counts packets.
pub const COUNT_PROGRAM: &str = "skiff_count";

/// Slots of [`COUNTER_MAP`] (a `PerCpuArray<PacketCounter>`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CounterSlot {
    /// Every packet the classifier saw.
    All = 0,
}

impl CounterSlot {
    /// Number of slots, i.e. `max_entries` of the map.
    pub const COUNT: u32 = 1;
}

/// Per-CPU packet counter value. Userspace sums the per-CPU values.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketCounter {
    pub packets: u64,
    pub bytes: u64,
}

impl PacketCounter {
    /// Adds another counter (used to sum per-CPU values).
    pub fn add(&mut self, other: &PacketCounter) {
        self.packets = self.packets.wrapping_add(other.packets);
        self.bytes = self.bytes.wrapping_add(other.bytes);
    }
}

const _: () = assert!(size_of::<PacketCounter>() == 16);
const _: () = assert!(offset_of!(PacketCounter, packets) == 0);
const _: () = assert!(offset_of!(PacketCounter, bytes) == 8);

#[cfg(feature = "user")]
// SAFETY: repr(C), only u64 fields, no padding (asserted above); every bit pattern is valid.
unsafe impl aya::Pod for PacketCounter {}

// ---------------------------------------------------------------------------------------
// Pod networking (node-agent/src/cni): tc programs on the host side of every pod veth and
// on the node's VXLAN device in external (collect_md) mode.
//
// Addresses are stored as the packet carries them: an IPv4 address key is the u32 whose
// in-memory bytes are the address octets (`u32::from_ne_bytes(ip.octets())`), so the
// programs compare the raw word loaded from the IP header without byte swapping.

/// Local pods: pod IPv4 (packet byte order) -> [`LocalPod`]. A `HashMap`.
pub const LOCAL_PODS_MAP: &str = "SKIFF_LOCAL_PODS";
/// Other nodes: LPM trie of remote podCIDRs and remote node IPs (/32) -> [`NodeRoute`].
pub const NODE_ROUTES_MAP: &str = "SKIFF_NODE_ROUTES";
/// One-slot array: the VXLAN device and VNI ([`TunnelConfig`]).
pub const TUNNEL_CONFIG_MAP: &str = "SKIFF_TUNNEL_CONFIG";
/// Per-CPU [`PacketCounter`]s indexed by [`DatapathStat`].
pub const DATAPATH_STATS_MAP: &str = "SKIFF_DATAPATH_STATS";

/// tc ingress of a pod's host-side veth (packets leaving the pod).
pub const FROM_POD_PROGRAM: &str = "skiff_from_pod";
/// tc egress of a pod's host-side veth (packets the node's stack sends to the pod).
pub const TO_POD_PROGRAM: &str = "skiff_to_pod";
/// tc egress of the VXLAN device: sets the tunnel key of every packet.
pub const TUNNEL_EGRESS_PROGRAM: &str = "skiff_tunnel_egress";
/// tc ingress of the VXLAN device: decapsulated packets for local pods.
pub const TUNNEL_INGRESS_PROGRAM: &str = "skiff_tunnel_ingress";

/// Capacity of [`LOCAL_PODS_MAP`] (a node's podCIDR is a /24 by default).
pub const MAX_LOCAL_PODS: u32 = 1024;
/// Capacity of [`NODE_ROUTES_MAP`]: two entries (podCIDR, node IP) per remote node.
pub const MAX_NODE_ROUTES: u32 = 16384;

/// A pod on this node, as the data path delivers to it with `bpf_redirect_peer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LocalPod {
    /// ifindex of the host-side veth (redirect_peer lands in its peer, the pod's eth0).
    pub host_ifindex: u32,
    /// MAC of the pod's eth0 (destination MAC of delivered frames).
    pub pod_mac: [u8; 6],
    /// MAC of the host-side veth (source MAC of delivered frames: the pod's gateway).
    pub host_mac: [u8; 6],
}

const _: () = assert!(size_of::<LocalPod>() == 16);
const _: () = assert!(offset_of!(LocalPod, host_ifindex) == 0);
const _: () = assert!(offset_of!(LocalPod, pod_mac) == 4);
const _: () = assert!(offset_of!(LocalPod, host_mac) == 10);

/// Where a remote prefix lives: the node whose VXLAN endpoint receives it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeRoute {
    /// The remote node's IPv4 in host byte order (what `bpf_skb_set_tunnel_key` takes).
    pub node_ip: u32,
    /// Reserved, zero.
    pub _pad: u32,
}

const _: () = assert!(size_of::<NodeRoute>() == 8);
const _: () = assert!(offset_of!(NodeRoute, node_ip) == 0);

/// Key of [`NODE_ROUTES_MAP`]: an LPM trie key (`prefix_len`, then the address in packet
/// byte order), the layout of both `aya::maps::lpm_trie::Key<u32>` and the kernel's
/// `struct bpf_lpm_trie_key`.
pub const NODE_ROUTES_KEY_SIZE: usize = 8;

/// The node's VXLAN device, written by the agent when it (re)creates the device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TunnelConfig {
    /// ifindex of the VXLAN device (0: not configured, remote traffic goes to the stack).
    pub ifindex: u32,
    /// VXLAN network identifier of the cluster.
    pub vni: u32,
    /// MAC address every node gives its VXLAN device: inner frames carry it as their
    /// destination so the receiving device takes them as PACKET_HOST.
    pub mac: [u8; 6],
    /// [`TUNNEL_FLAG_STACK`].
    pub flags: u8,
    /// Reserved, zero.
    pub _pad: u8,
}

/// Hand every pod packet to the node's stack instead of redirecting it (iptables proxy
/// mode: netfilter must see both directions of a connection).
pub const TUNNEL_FLAG_STACK: u8 = 1;

const _: () = assert!(size_of::<TunnelConfig>() == 16);
const _: () = assert!(offset_of!(TunnelConfig, ifindex) == 0);
const _: () = assert!(offset_of!(TunnelConfig, vni) == 4);
const _: () = assert!(offset_of!(TunnelConfig, mac) == 8);

/// Slots of [`DATAPATH_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatapathStat {
    /// Pod -> pod on the same node (redirect_peer from a pod veth).
    LocalDelivered = 0,
    /// Pod -> other node (redirected into the VXLAN device).
    TunnelOut = 1,
    /// Other node -> local pod (redirect_peer from the VXLAN device).
    TunnelIn = 2,
    /// Handed to the node's stack (pod -> node, pod -> outside the cluster).
    ToStack = 3,
    /// Node's stack -> pod (host veth egress).
    ToPod = 4,
    /// Dropped: a packet for the VXLAN device with no remote node for its destination.
    DropNoRoute = 5,
    /// Dropped: the kernel refused a redirect.
    DropRedirect = 6,
}

impl DatapathStat {
    /// Number of slots, i.e. `max_entries` of the map.
    pub const COUNT: u32 = 7;
    /// Every slot, in index order (for readers such as `skiff-net`).
    pub const ALL: [DatapathStat; 7] = [
        DatapathStat::LocalDelivered,
        DatapathStat::TunnelOut,
        DatapathStat::TunnelIn,
        DatapathStat::ToStack,
        DatapathStat::ToPod,
        DatapathStat::DropNoRoute,
        DatapathStat::DropRedirect,
    ];

    /// snake_case name for tables and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DatapathStat::LocalDelivered => "local_delivered",
            DatapathStat::TunnelOut => "tunnel_out",
            DatapathStat::TunnelIn => "tunnel_in",
            DatapathStat::ToStack => "to_stack",
            DatapathStat::ToPod => "to_pod",
            DatapathStat::DropNoRoute => "drop_no_route",
            DatapathStat::DropRedirect => "drop_redirect",
        }
    }
}

/// The key word of an IPv4 address as the maps store it (see the section comment).
pub const fn ipv4_key(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integer/byte-array fields, no implicit padding (asserted above).
unsafe impl aya::Pod for LocalPod {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for NodeRoute {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for TunnelConfig {}

// ---------------------------------------------------------------------------------------
// Service load balancing (node-agent/src/proxy): socket-level programs at the node's pod
// cgroup (connect4, sendmsg4, recvmsg4, getpeername4). The layout follows Cilium's lb4
// maps: one hash map holds, per service frontend, a master entry (slot 0: backend count,
// flags) and one entry per backend slot (slot i: backend id), so choosing a backend is
// two lookups and a one-service change touches only that service's keys.

/// Service frontends and their backend slots: [`ServiceKey`] -> [`ServiceEntry`].
pub const SERVICES_MAP: &str = "SKIFF_SERVICES";
/// Backends by id: `u32` -> [`Backend`].
pub const BACKENDS_MAP: &str = "SKIFF_BACKENDS";
/// Per socket: the frontend a socket was translated from (LRU) for replies and
/// getpeername: [`SockRevNatKey`] -> [`SockRevNat`].
pub const SOCK_REV_NAT_MAP: &str = "SKIFF_SOCK_REV_NAT";
/// sessionAffinity ClientIP (LRU): [`AffinityKey`] -> [`AffinityValue`].
pub const AFFINITY_MAP: &str = "SKIFF_AFFINITY";
/// Per-CPU [`PacketCounter`]s of the load balancer indexed by [`LbStat`].
pub const LB_STATS_MAP: &str = "SKIFF_LB_STATS";

pub const CONNECT4_PROGRAM: &str = "skiff_connect4";
pub const SENDMSG4_PROGRAM: &str = "skiff_sendmsg4";
pub const RECVMSG4_PROGRAM: &str = "skiff_recvmsg4";
pub const GETPEERNAME4_PROGRAM: &str = "skiff_getpeername4";

/// Capacity of [`SERVICES_MAP`] (frontends plus backend slots).
pub const MAX_SERVICE_ENTRIES: u32 = 262_144;
/// Capacity of [`BACKENDS_MAP`].
pub const MAX_BACKENDS: u32 = 131_072;
/// Capacity of [`SOCK_REV_NAT_MAP`] (LRU).
pub const MAX_SOCK_REV_NAT: u32 = 131_072;
/// Capacity of [`AFFINITY_MAP`] (LRU).
pub const MAX_AFFINITY: u32 = 65_536;

/// `IPPROTO_TCP` / `IPPROTO_UDP`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// A service frontend (VIP, port, protocol, scope) and a slot: 0 is the service itself,
/// 1..=count its backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Packet byte order (see [`ipv4_key`]); 0.0.0.0 in the NodePort wildcard.
    pub addr: u32,
    /// Network byte order, as `bpf_sock_addr.user_port` carries it.
    pub port: u16,
    pub proto: u8,
    /// [`SCOPE_ALL`] or [`SCOPE_PODS`].
    pub scope: u8,
    pub slot: u16,
    pub _pad1: u16,
}

/// An entry for every client: pods' sockets and packets arriving at the node (ClusterIPs,
/// LoadBalancer IPs, the node's own IP at a nodePort). The only scope the per-packet
/// program looks up.
pub const SCOPE_ALL: u8 = 0;
/// An entry only the socket load balancer (pods) uses, where pods must see other backends
/// than outside clients (Cilium's "internal scope"). Kubernetes sends pod traffic to
/// "external" destinations (nodePorts, LoadBalancer IPs) with Cluster semantics, whatever
/// the externalTrafficPolicy:
/// - NodePort wildcard: `addr` 0.0.0.0 at the nodePort, used when a pod connects to any
///   address in [`NODE_IPS_MAP`] (its own node's or another node's);
/// - the twin of a LoadBalancer IP whose Service has externalTrafficPolicy Local (the
///   [`SCOPE_ALL`] entry carries [`SVC_FLAG_LOCAL`], which says to look for it).
pub const SCOPE_PODS: u8 = 1;

/// Every node's addresses (InternalIP, ExternalIP) in packet byte order -> 1 (reserved).
/// A `HashMap` the proxy fills from Node objects.
pub const NODE_IPS_MAP: &str = "SKIFF_NODE_IPS";
/// Capacity of [`NODE_IPS_MAP`].
pub const MAX_NODE_IPS: u32 = 16_384;

const _: () = assert!(size_of::<ServiceKey>() == 12);
const _: () = assert!(offset_of!(ServiceKey, port) == 4);
const _: () = assert!(offset_of!(ServiceKey, proto) == 6);
const _: () = assert!(offset_of!(ServiceKey, scope) == 7);
const _: () = assert!(offset_of!(ServiceKey, slot) == 8);

/// Flags of a service's master entry.
pub const SVC_FLAG_AFFINITY: u8 = 1;

/// Slot 0: `count` backends, flags, affinity timeout, the reverse-NAT id. Slot i:
/// `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u8,
    pub _pad: u8,
    /// sessionAffinityConfig.clientIP.timeoutSeconds.
    pub affinity_timeout: u32,
    /// Identifies the frontend (affinity key, reverse NAT).
    pub rev_nat_id: u32,
}

const _: () = assert!(size_of::<ServiceEntry>() == 16);
const _: () = assert!(offset_of!(ServiceEntry, count) == 4);
const _: () = assert!(offset_of!(ServiceEntry, flags) == 6);
const _: () = assert!(offset_of!(ServiceEntry, affinity_timeout) == 8);
const _: () = assert!(offset_of!(ServiceEntry, rev_nat_id) == 12);

/// A backend address (pod IP and target port).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Packet byte order.
    pub addr: u32,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

const _: () = assert!(size_of::<Backend>() == 8);
const _: () = assert!(offset_of!(Backend, port) == 4);

/// A translated socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNatKey {
    pub cookie: u64,
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}

const _: () = assert!(size_of::<SockRevNatKey>() == 16);

/// The frontend the socket asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevNat {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub rev_nat_id: u32,
}

const _: () = assert!(size_of::<SockRevNat>() == 12);

/// A client (its network namespace cookie: one pod) and a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityKey {
    pub client: u64,
    pub rev_nat_id: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<AffinityKey>() == 16);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<AffinityValue>() == 16);

/// Slots of [`LB_STATS_MAP`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbStat {
    /// A socket's destination was a service and got a backend.
    Translated = 0,
    /// A service without backends: the connect/sendmsg was refused.
    NoBackend = 1,
    /// A reply or getpeername was mapped back to the service address.
    RevNat = 2,
    /// The chosen slot or backend entry was missing (a map being updated).
    MissingBackend = 3,
    /// A NodePort/LoadBalancer packet was translated to a backend.
    NodePortForward = 4,
    /// A reply of a translated connection was translated back.
    NodePortReply = 5,
}

impl LbStat {
    pub const COUNT: u32 = 6;
    pub const ALL: [LbStat; 6] = [
        LbStat::Translated,
        LbStat::NoBackend,
        LbStat::RevNat,
        LbStat::MissingBackend,
        LbStat::NodePortForward,
        LbStat::NodePortReply,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            LbStat::Translated => "translated",
            LbStat::NoBackend => "no_backend",
            LbStat::RevNat => "rev_nat",
            LbStat::MissingBackend => "missing_backend",
            LbStat::NodePortForward => "nodeport_forward",
            LbStat::NodePortReply => "nodeport_reply",
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integer fields, padding explicit (sizes asserted above).
unsafe impl aya::Pod for ServiceKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for ServiceEntry {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for Backend {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SockRevNatKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SockRevNat {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for AffinityKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for AffinityValue {}

// ---------------------------------------------------------------------------------------
// Per-packet load balancing for traffic that sockets do not cover: NodePort and
// LoadBalancer IPs arriving on the node's interface. DNAT (and SNAT to the node IP when
// the backend is on another node and externalTrafficPolicy is Cluster), with an LRU
// connection table holding both directions.

/// Connections: [`CtKey`] (the packet's 5-tuple) -> [`CtEntry`].
pub const CT_MAP: &str = "SKIFF_CT";
/// One-slot array: the node's address and interface ([`NodeConfig`]).
pub const NODE_CONFIG_MAP: &str = "SKIFF_NODE_CONFIG";
/// tc ingress of the node's interface: NodePort/LoadBalancer traffic.
pub const NODE_INGRESS_PROGRAM: &str = "skiff_node_ingress";
/// Capacity of [`CT_MAP`] (LRU: the oldest connections go first when full).
pub const MAX_CT: u32 = 262_144;

/// externalTrafficPolicy Local: backends are local, the client address is kept.
pub const SVC_FLAG_LOCAL: u8 = 2;

/// A packet's 5-tuple, addresses and ports as in the packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<CtKey>() == 16);
const _: () = assert!(offset_of!(CtKey, sport) == 8);
const _: () = assert!(offset_of!(CtKey, proto) == 12);

/// Forward entries (client -> frontend): the backend `addr`:`port`, and `peer` = the
/// source to write (the node IP) when [`CT_FLAG_SNAT`]. Reply entries (backend -> client
/// or node), [`CT_FLAG_REPLY`]: the frontend `addr`:`port` to write as source, and with
/// [`CT_FLAG_SNAT`] the client `peer`:`peer_port` to write as destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub addr: u32,
    pub peer: u32,
    pub port: u16,
    pub peer_port: u16,
    pub flags: u32,
}

const _: () = assert!(size_of::<CtEntry>() == 16);
const _: () = assert!(offset_of!(CtEntry, port) == 8);
const _: () = assert!(offset_of!(CtEntry, flags) == 12);

pub const CT_FLAG_REPLY: u32 = 1;
pub const CT_FLAG_SNAT: u32 = 2;

/// The node's own address (packet byte order) and the ifindex of its interface.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_ip: u32,
    pub ifindex: u32,
}

const _: () = assert!(size_of::<NodeConfig>() == 8);

#[cfg(feature = "user")]
// SAFETY: repr(C), integer fields, padding explicit (sizes asserted above).
unsafe impl aya::Pod for CtKey {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for CtEntry {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for NodeConfig {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_key_is_the_packet_word() {
        // The word loaded from an IP header on a little-endian machine.
        assert_eq!(ipv4_key([10, 244, 1, 2]).to_ne_bytes(), [10, 244, 1, 2]);
        assert_eq!(DatapathStat::ALL.len() as u32, DatapathStat::COUNT);
        for (i, s) in DatapathStat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }

    #[test]
    fn add_sums_fields() {
        let mut a = PacketCounter {
            packets: 1,
            bytes: 100,
        };
        a.add(&PacketCounter {
            packets: 2,
            bytes: 50,
        });
        assert_eq!(
            a,
            PacketCounter {
                packets: 3,
                bytes: 150
            }
        );
    }
}
