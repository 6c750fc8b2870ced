//! Pod networking without a bridge and without iptables (DESIGN.md, "CNI"):
//!
//! - `skiff_from_pod` (tc ingress of a pod's host veth): a packet for a pod on this node is
//!   handed straight into that pod's netns with `bpf_redirect_peer`; a packet for another
//!   node's podCIDR (or another node's IP) goes into the VXLAN device; anything else goes
//!   up the node's stack (pod -> node).
//! - `skiff_tunnel_egress` (tc egress of the VXLAN device, external/collect_md mode): sets
//!   the tunnel key (remote node IP, VNI) from the same routes map, for pod traffic and for
//!   the node's own traffic to remote pods (the kernel routes remote podCIDRs there).
//! - `skiff_tunnel_ingress` (tc ingress of the VXLAN device): decapsulated packets for a
//!   local pod are redirected into it like local ones; the rest goes to the stack.
//! - `skiff_to_pod` (tc egress of a pod's host veth): node -> pod; counted, passed.
//!
//! Kernel 5.10: bpf_redirect_peer (5.10), bpf_skb_set_tunnel_key with the 5.10 key
//! layout, hash/LPM/array/per-CPU maps; nothing newer.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{bpf_redirect, bpf_redirect_peer, bpf_skb_set_tunnel_key},
    macros::{classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::TcContext,
};
use skiff_ebpf_common::{
    DatapathStat, LocalPod, MAX_LOCAL_PODS, TUNNEL_FLAG_STACK, MAX_NODE_ROUTES, NodeRoute, PacketCounter,
    TunnelConfig,
};

#[map]
pub(crate) static SKIFF_LOCAL_PODS: HashMap<u32, LocalPod> = HashMap::pinned(MAX_LOCAL_PODS, 0);

/// BPF_F_NO_PREALLOC: the kernel requires it for LPM tries.
#[map]
static SKIFF_NODE_ROUTES: LpmTrie<u32, NodeRoute> = LpmTrie::pinned(MAX_NODE_ROUTES, 1);

#[map]
pub(crate) static SKIFF_TUNNEL_CONFIG: Array<TunnelConfig> = Array::pinned(1, 0);

#[map]
static SKIFF_DATAPATH_STATS: PerCpuArray<PacketCounter> =
    PerCpuArray::pinned(DatapathStat::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offset of the IPv4 destination address in an Ethernet frame.
const IPV4_DST_OFFSET: usize = ETH_HLEN + 16;
/// Size of `struct bpf_tunnel_key` up to and including `tunnel_label`: the 5.10 layout,
/// which newer kernels still accept (they added the local address after it).
const TUNNEL_KEY_SIZE_5_10: u32 = 28;
/// The outer TTL of encapsulated packets.
const TUNNEL_TTL: u8 = 64;

#[inline(always)]
fn count(stat: DatapathStat, ctx: &TcContext) {
    if let Some(c) = SKIFF_DATAPATH_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: pointer from a successful lookup of a per-CPU slot; tc programs run with
        // preemption disabled, so nothing else writes this CPU's slot meanwhile.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(ctx.len());
        }
    }
}

/// The IPv4 destination (packet byte order) of an Ethernet/IPv4 frame.
#[inline(always)]
fn ipv4_dst(ctx: &TcContext) -> Option<u32> {
    let proto: u16 = ctx.load(12).ok()?;
    if u16::from_be(proto) != ETH_P_IP {
        return None;
    }
    ctx.load::<u32>(IPV4_DST_OFFSET).ok()
}

#[inline(always)]
fn route_of(dst: u32) -> Option<&'static NodeRoute> {
    SKIFF_NODE_ROUTES.get(&Key::new(32, dst))
}

/// Rewrites the MACs (pod's eth0 <- host veth) and moves the packet into the pod's netns.
#[inline(always)]
pub(crate) fn deliver(ctx: &mut TcContext, pod: &LocalPod, stat: DatapathStat) -> i32 {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&pod.pod_mac);
    macs[6..].copy_from_slice(&pod.host_mac);
    if ctx.store(0, &macs, 0).is_err() {
        count(DatapathStat::DropRedirect, ctx);
        return TC_ACT_SHOT;
    }
    count(stat, ctx);
    // SAFETY: plain helper call; the verdict is TC_ACT_REDIRECT or TC_ACT_SHOT.
    unsafe { bpf_redirect_peer(pod.host_ifindex, 0) as i32 }
}

/// What comes before forwarding on the pod veth and the VXLAN device: in iptables proxy
/// mode every packet goes to the stack (netfilter must see both directions), and a
/// backend's reply to a NodePort client (local backend: on the veth; remote backend,
/// SNATed to this node: on the VXLAN device) is translated back and sent out.
#[inline(always)]
fn before_forwarding(ctx: &mut TcContext) -> Option<i32> {
    if let Some(t) = SKIFF_TUNNEL_CONFIG.get(0)
        && t.flags & TUNNEL_FLAG_STACK != 0
    {
        count(DatapathStat::ToStack, ctx);
        return Some(TC_ACT_OK);
    }
    let t = crate::nodeport::parse(ctx)?;
    crate::nodeport::reply(ctx, &t)
}

#[classifier]
pub fn skiff_from_pod(mut ctx: TcContext) -> i32 {
    let Some(dst) = ipv4_dst(&ctx) else {
        return TC_ACT_OK;
    };
    if let Some(verdict) = before_forwarding(&mut ctx) {
        return verdict;
    }
    // SAFETY: the map value is read before any helper that could free it runs.
    if let Some(pod) = unsafe { SKIFF_LOCAL_PODS.get(&dst) } {
        let pod = *pod;
        return deliver(&mut ctx, &pod, DatapathStat::LocalDelivered);
    }
    if route_of(dst).is_some() {
        let Some(tunnel) = SKIFF_TUNNEL_CONFIG.get(0) else {
            return TC_ACT_OK;
        };
        if tunnel.ifindex == 0 {
            return TC_ACT_OK;
        }
        let (ifindex, mac) = (tunnel.ifindex, tunnel.mac);
        // The receiving VXLAN device must see its own MAC as the destination.
        if ctx.store(0, &mac, 0).is_err() {
            count(DatapathStat::DropRedirect, &ctx);
            return TC_ACT_SHOT;
        }
        count(DatapathStat::TunnelOut, &ctx);
        // SAFETY: plain helper call. The tunnel key is set by skiff_tunnel_egress.
        return unsafe { bpf_redirect(ifindex, 0) as i32 };
    }
    count(DatapathStat::ToStack, &ctx);
    TC_ACT_OK
}

#[classifier]
pub fn skiff_to_pod(ctx: TcContext) -> i32 {
    count(DatapathStat::ToPod, &ctx);
    TC_ACT_OK
}

#[classifier]
pub fn skiff_tunnel_egress(mut ctx: TcContext) -> i32 {
    let Some(dst) = ipv4_dst(&ctx) else {
        // IPv6/ARP have no remote endpoint; the device would drop them without a key.
        return TC_ACT_SHOT;
    };
    let (Some(route), Some(tunnel)) = (route_of(dst), SKIFF_TUNNEL_CONFIG.get(0)) else {
        count(DatapathStat::DropNoRoute, &ctx);
        return TC_ACT_SHOT;
    };
    let (node_ip, vni, mac) = (route.node_ip, tunnel.vni, tunnel.mac);
    // Inner MACs: every node's device has the same MAC, so the receiver takes the frame
    // as PACKET_HOST; the source must differ from it, or the receiving VXLAN driver drops
    // the frame as its own looped-back one (this matters for the node's own traffic,
    // which the stack sends with the device MAC as both source and destination).
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&mac);
    macs[6..].copy_from_slice(&mac);
    macs[11] ^= 0xff;
    if ctx.store(0, &macs, 0).is_err() {
        count(DatapathStat::DropRedirect, &ctx);
        return TC_ACT_SHOT;
    }
    // SAFETY: bpf_tunnel_key is plain data; all-zero is a valid value.
    let mut key: bpf_tunnel_key = unsafe { core::mem::zeroed() };
    key.tunnel_id = vni;
    key.__bindgen_anon_1.remote_ipv4 = node_ip;
    key.tunnel_ttl = TUNNEL_TTL;
    // SAFETY: the key lives on the stack and is at least TUNNEL_KEY_SIZE_5_10 bytes.
    let r = unsafe {
        bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, TUNNEL_KEY_SIZE_5_10, 0)
    };
    if r != 0 {
        count(DatapathStat::DropRedirect, &ctx);
        return TC_ACT_SHOT;
    }
    TC_ACT_OK
}

#[classifier]
pub fn skiff_tunnel_ingress(mut ctx: TcContext) -> i32 {
    let Some(dst) = ipv4_dst(&ctx) else {
        return TC_ACT_OK;
    };
    if let Some(verdict) = before_forwarding(&mut ctx) {
        return verdict;
    }
    // SAFETY: as in skiff_from_pod.
    if let Some(pod) = unsafe { SKIFF_LOCAL_PODS.get(&dst) } {
        let pod = *pod;
        return deliver(&mut ctx, &pod, DatapathStat::TunnelIn);
    }
    count(DatapathStat::ToStack, &ctx);
    TC_ACT_OK
}
