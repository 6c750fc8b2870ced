//! NodePort and LoadBalancer traffic arriving on the node's interface (what sockets do
//! not cover): `skiff_node_ingress` looks the destination up in the same services map as
//! the socket programs, picks a backend (kept per connection in `SKIFF_CT`), rewrites the
//! destination (DNAT) and, when the backend is on another node and the Service's
//! externalTrafficPolicy is Cluster, the source too (SNAT to the node IP) so the reply
//! comes back here. Replies are translated back by [`reply`], called from the pod veth
//! (local backends) and the VXLAN device (remote backends), and leave through the node's
//! interface with `bpf_redirect_neigh` (5.10).
//!
//! Only [`SCOPE_ALL`] entries apply here: the pods-only ones (the NodePort wildcard,
//! Cluster-semantics twins) are for the socket programs (see service_lb.rs). A frontend
//! at the node's IP without any endpoint is handed to the stack, which refuses it.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_redirect, bpf_redirect_neigh},
    macros::{classifier, map},
    maps::{Array, LruHashMap},
    programs::TcContext,
};
use skiff_ebpf_common::{
    CT_FLAG_REPLY, CT_FLAG_SNAT, CtEntry, CtKey, DatapathStat, LbStat, MAX_CT, NodeConfig,
    PROTO_TCP, PROTO_UDP, SCOPE_ALL, SVC_FLAG_LOCAL, ServiceKey,
};

use crate::{
    pod_network::{SKIFF_LOCAL_PODS, SKIFF_TUNNEL_CONFIG, deliver},
    service_lb::{SKIFF_BACKENDS, SKIFF_SERVICES, count},
};

#[map]
static SKIFF_CT: LruHashMap<CtKey, CtEntry> = LruHashMap::pinned(MAX_CT, 0);

#[map]
static SKIFF_NODE_CONFIG: Array<NodeConfig> = Array::pinned(1, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IP_CSUM: usize = ETH_HLEN + 10;
const IP_SRC: usize = ETH_HLEN + 12;
const IP_DST: usize = ETH_HLEN + 16;

/// An IPv4 TCP/UDP packet's addresses (packet order) and where its ports are.
#[derive(Clone, Copy)]
pub(crate) struct Tuple {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    proto: u8,
    l4: usize,
}

impl Tuple {
    fn key(&self) -> CtKey {
        CtKey {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }

    fn csum_off(&self) -> usize {
        if self.proto == PROTO_TCP {
            self.l4 + 16
        } else {
            self.l4 + 6
        }
    }

    fn l4_flags(&self) -> u64 {
        if self.proto == PROTO_UDP {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        }
    }
}

#[inline(always)]
pub(crate) fn parse(ctx: &TcContext) -> Option<Tuple> {
    let proto: u16 = ctx.load(12).ok()?;
    if u16::from_be(proto) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let l4 = ETH_HLEN + usize::from(vihl & 0x0f) * 4;
    let proto: u8 = ctx.load(ETH_HLEN + 9).ok()?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    // Fragments after the first carry no ports.
    let frag: u16 = ctx.load(ETH_HLEN + 6).ok()?;
    if u16::from_be(frag) & 0x1fff != 0 {
        return None;
    }
    Some(Tuple {
        saddr: ctx.load(IP_SRC).ok()?,
        daddr: ctx.load(IP_DST).ok()?,
        sport: ctx.load(l4).ok()?,
        dport: ctx.load(l4 + 2).ok()?,
        proto,
        l4,
    })
}

/// Rewrites one address (at `addr_off`) and one port (at `port_off`), fixing checksums.
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    t: &Tuple,
    addr_off: usize,
    old_addr: u32,
    new_addr: u32,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    if old_addr != new_addr {
        ctx.l4_csum_replace(
            t.csum_off(),
            u64::from(old_addr),
            u64::from(new_addr),
            u64::from(BPF_F_PSEUDO_HDR) | t.l4_flags() | 4,
        )?;
        ctx.l3_csum_replace(IP_CSUM, u64::from(old_addr), u64::from(new_addr), 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        ctx.l4_csum_replace(
            t.csum_off(),
            u64::from(old_port),
            u64::from(new_port),
            t.l4_flags() | 2,
        )?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// Translates a reply of a NodePort connection back (source = the frontend, and the
/// client as destination if the request was SNATed) and sends it out of the node's
/// interface. None: not a reply we know; the caller carries on.
#[inline(always)]
pub(crate) fn reply(ctx: &mut TcContext, t: &Tuple) -> Option<i32> {
    // SAFETY: copied at once.
    let e = unsafe { SKIFF_CT.get(&t.key()) }.copied()?;
    if e.flags & CT_FLAG_REPLY == 0 {
        return None;
    }
    let node = SKIFF_NODE_CONFIG.get(0).copied()?;
    let t = *t;
    let ok = rewrite(ctx, &t, IP_SRC, t.saddr, e.addr, t.l4, t.sport, e.port).is_ok()
        && (e.flags & CT_FLAG_SNAT == 0
            || rewrite(
                ctx,
                &t,
                IP_DST,
                t.daddr,
                e.peer,
                t.l4 + 2,
                t.dport,
                e.peer_port,
            )
            .is_ok());
    if !ok {
        return Some(TC_ACT_SHOT);
    }
    count(LbStat::NodePortReply);
    // SAFETY: plain helper call; NULL params: the next hop is the packet's destination.
    Some(unsafe { bpf_redirect_neigh(node.ifindex, core::ptr::null_mut(), 0, 0) as i32 })
}

#[classifier]
pub fn skiff_node_ingress(mut ctx: TcContext) -> i32 {
    let Some(t) = parse(&ctx) else {
        return TC_ACT_OK;
    };
    let frontend = ServiceKey {
        addr: t.daddr,
        port: t.dport,
        proto: t.proto,
        scope: SCOPE_ALL,
        slot: 0,
        _pad1: 0,
    };
    // SAFETY: copied at once.
    let Some(svc) = (unsafe { SKIFF_SERVICES.get(&frontend) }).copied() else {
        return TC_ACT_OK;
    };
    let Some(node) = SKIFF_NODE_CONFIG.get(0).copied() else {
        return TC_ACT_OK;
    };
    let fwd = t.key();
    // The connection's backend, or a new one.
    // SAFETY: copied at once.
    let (baddr, bport, snat) = match unsafe { SKIFF_CT.get(&fwd) }.copied() {
        Some(e) if e.flags & CT_FLAG_REPLY == 0 => (e.addr, e.port, e.flags & CT_FLAG_SNAT != 0),
        _ => {
            if svc.count == 0 {
                count(LbStat::NoBackend);
                // No endpoints at all, at the node's own address: the node's stack, which
                // has no socket there, refuses at once (TCP RST, ICMP port unreachable),
                // as kube-proxy's REJECT does. A LoadBalancer IP is no address of this
                // node, and externalTrafficPolicy Local without local endpoints is a
                // drop for kube-proxy too.
                if t.daddr == node.node_ip && svc.flags & SVC_FLAG_LOCAL == 0 {
                    return TC_ACT_OK;
                }
                return TC_ACT_SHOT;
            }
            // SAFETY: plain helper call.
            let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(svc.count)) as u16 + 1;
            // SAFETY: copied at once.
            let Some(id) = (unsafe { SKIFF_SERVICES.get(&ServiceKey { slot, ..frontend }) })
                .map(|e| e.backend_id)
            else {
                count(LbStat::MissingBackend);
                return TC_ACT_SHOT;
            };
            // SAFETY: copied at once.
            let Some(b) = (unsafe { SKIFF_BACKENDS.get(&id) }).copied() else {
                count(LbStat::MissingBackend);
                return TC_ACT_SHOT;
            };
            // SAFETY: read at once. (Reading a field forces a null check the verifier can
            // follow; `is_some()` alone became arithmetic on the maybe-null pointer.)
            let local = unsafe { SKIFF_LOCAL_PODS.get(&b.addr) }
                .map(|p| p.host_ifindex != 0)
                .unwrap_or(false);
            let snat = !local && svc.flags & SVC_FLAG_LOCAL == 0;
            let flags = if snat { CT_FLAG_SNAT } else { 0 };
            let _ = SKIFF_CT.insert(
                &fwd,
                &CtEntry {
                    addr: b.addr,
                    peer: node.node_ip,
                    port: b.port,
                    peer_port: t.sport,
                    flags,
                },
                0,
            );
            let rev = CtKey {
                saddr: b.addr,
                daddr: if snat { node.node_ip } else { t.saddr },
                sport: b.port,
                dport: t.sport,
                proto: t.proto,
                _pad: [0; 3],
            };
            let _ = SKIFF_CT.insert(
                &rev,
                &CtEntry {
                    addr: t.daddr,
                    peer: t.saddr,
                    port: t.dport,
                    peer_port: t.sport,
                    flags: CT_FLAG_REPLY | flags,
                },
                0,
            );
            (b.addr, b.port, snat)
        }
    };
    if rewrite(
        &mut ctx,
        &t,
        IP_DST,
        t.daddr,
        baddr,
        t.l4 + 2,
        t.dport,
        bport,
    )
    .is_err()
        || (snat
            && rewrite(
                &mut ctx,
                &t,
                IP_SRC,
                t.saddr,
                node.node_ip,
                t.l4,
                t.sport,
                t.sport,
            )
            .is_err())
    {
        return TC_ACT_SHOT;
    }
    count(LbStat::NodePortForward);
    // SAFETY: copied at once.
    if let Some(pod) = unsafe { SKIFF_LOCAL_PODS.get(&baddr) }.copied() {
        return deliver(&mut ctx, &pod, DatapathStat::LocalDelivered);
    }
    let Some(tunnel) = SKIFF_TUNNEL_CONFIG.get(0).copied() else {
        return TC_ACT_SHOT;
    };
    if ctx.store(0, &tunnel.mac, 0).is_err() {
        return TC_ACT_SHOT;
    }
    // SAFETY: plain helper call; skiff_tunnel_egress sets the tunnel key.
    unsafe { bpf_redirect(tunnel.ifindex, 0) as i32 }
}
