//! Service load balancing at the socket (DESIGN.md "service proxy"): cgroup programs at
//! the node's pod cgroup translate a pod's connect()/sendmsg() to a ClusterIP (or a
//! LoadBalancer IP) straight to a backend before any packet exists, so there is no
//! per-packet NAT and no conntrack for pod -> Service traffic:
//!
//! - `skiff_connect4` (TCP and connected UDP) and `skiff_sendmsg4` (unconnected UDP): look
//!   up the frontend (slot 0), pick a backend slot (random, or the client's previous
//!   backend under sessionAffinity ClientIP), rewrite the destination, and remember the
//!   frontend per (socket, backend) for the way back. A frontend without backends
//!   refuses the call (EPERM) at once instead of letting it hang.
//! - `skiff_recvmsg4` (UDP replies) and `skiff_getpeername4`: show the frontend address
//!   instead of the backend's, so replies appear to come from the VIP.
//!
//! NodePorts from pods: a pod may connect to any node's IP at a nodePort (its own, or
//! another node's, which the tunnel would carry to that node untranslated, past the
//! per-packet program on its interface). As Cilium does, the destination is checked
//! against every node's addresses (`SKIFF_NODE_IPS`, filled from Node objects) and then
//! looked up as the wildcard frontend 0.0.0.0:nodePort ([`SCOPE_PODS`]). Why not one
//! frontend per node IP and nodePort: that is nodes x nodePorts entries (a million for
//! 1000 nodes and 1000 NodePort Services) and every node joining or leaving would
//! rewrite every NodePort Service; the wildcard is one entry per nodePort, and a node
//! change is one write to the address map. The wildcard has every ready backend
//! (Cluster semantics): kube-proxy gives pod traffic to "external" destinations that
//! whatever the externalTrafficPolicy. A LoadBalancer IP of a Service with policy Local
//! has a [`SCOPE_PODS`] twin for the same reason.
//!
//! Kernel 5.10: cgroup sock_addr hooks (recvmsg4 4.21, getpeername4 5.8), socket and
//! netns cookies (5.7), LRU hash maps.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_get_socket_cookie, bpf_ktime_get_ns},
    macros::{cgroup_sock_addr, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::SockAddrContext,
};
use skiff_ebpf_common::{
    AffinityKey, AffinityValue, Backend, LbStat, MAX_AFFINITY, MAX_BACKENDS, MAX_NODE_IPS,
    MAX_SERVICE_ENTRIES, MAX_SOCK_REV_NAT, PacketCounter, SCOPE_ALL, SCOPE_PODS, SVC_FLAG_AFFINITY,
    SVC_FLAG_LOCAL, ServiceEntry, ServiceKey, SockRevNat, SockRevNatKey,
};

#[map]
pub(crate) static SKIFF_SERVICES: HashMap<ServiceKey, ServiceEntry> =
    HashMap::pinned(MAX_SERVICE_ENTRIES, 0);

#[map]
pub(crate) static SKIFF_BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, 0);

#[map]
static SKIFF_NODE_IPS: HashMap<u32, u32> = HashMap::pinned(MAX_NODE_IPS, 0);

#[map]
static SKIFF_SOCK_REV_NAT: LruHashMap<SockRevNatKey, SockRevNat> =
    LruHashMap::pinned(MAX_SOCK_REV_NAT, 0);

#[map]
static SKIFF_AFFINITY: LruHashMap<AffinityKey, AffinityValue> = LruHashMap::pinned(MAX_AFFINITY, 0);

#[map]
static SKIFF_LB_STATS: PerCpuArray<PacketCounter> = PerCpuArray::pinned(LbStat::COUNT, 0);

/// Verdicts of cgroup sock_addr programs.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

#[inline(always)]
pub(crate) fn count(stat: LbStat) {
    if let Some(c) = SKIFF_LB_STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot from a successful lookup; no concurrent writer on this CPU.
        unsafe { (*c).packets += 1 };
    }
}

/// Picks the backend for `frontend` (its master entry `svc`), honouring affinity.
#[inline(always)]
fn pick(
    ctx: &SockAddrContext,
    frontend: &ServiceKey,
    svc: &ServiceEntry,
) -> Option<(u32, Backend)> {
    let now = unsafe { bpf_ktime_get_ns() };
    let affinity = svc.flags & SVC_FLAG_AFFINITY != 0;
    let akey = AffinityKey {
        // SAFETY: plain helper call on the program's context.
        client: if affinity {
            unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
        } else {
            0
        },
        rev_nat_id: svc.rev_nat_id,
        _pad: 0,
    };
    if affinity {
        // SAFETY: the value is copied before any other map call.
        if let Some(prev) = unsafe { SKIFF_AFFINITY.get(&akey) } {
            let prev = *prev;
            let timeout = u64::from(svc.affinity_timeout) * 1_000_000_000;
            if now.wrapping_sub(prev.last_used_ns) < timeout {
                // SAFETY: as above.
                if let Some(b) = unsafe { SKIFF_BACKENDS.get(&prev.backend_id) } {
                    let b = *b;
                    let _ = SKIFF_AFFINITY.insert(
                        &akey,
                        &AffinityValue {
                            last_used_ns: now,
                            backend_id: prev.backend_id,
                            _pad: 0,
                        },
                        0,
                    );
                    return Some((prev.backend_id, b));
                }
            }
        }
    }
    // SAFETY: plain helper call.
    let slot = (unsafe { bpf_get_prandom_u32() } % u32::from(svc.count)) as u16 + 1;
    let skey = ServiceKey { slot, ..*frontend };
    // SAFETY: as above.
    let id = unsafe { SKIFF_SERVICES.get(&skey) }?.backend_id;
    // SAFETY: as above.
    let b = *unsafe { SKIFF_BACKENDS.get(&id) }?;
    if affinity {
        let _ = SKIFF_AFFINITY.insert(
            &akey,
            &AffinityValue {
                last_used_ns: now,
                backend_id: id,
                _pad: 0,
            },
            0,
        );
    }
    Some((id, b))
}

/// The frontend a pod's destination stands for (see the module doc): the NodePort
/// wildcard for node addresses, else the address itself, or its pods-only twin when the
/// entry says externalTrafficPolicy Local.
#[inline(always)]
fn lookup(addr: u32, port: u16, proto: u8) -> Option<(ServiceKey, ServiceEntry)> {
    // SAFETY: only tested for presence.
    if unsafe { SKIFF_NODE_IPS.get(&addr) }.is_some() {
        let wild = ServiceKey {
            addr: 0,
            port,
            proto,
            scope: SCOPE_PODS,
            slot: 0,
            _pad1: 0,
        };
        // SAFETY: copied at once.
        if let Some(svc) = unsafe { SKIFF_SERVICES.get(&wild) }.copied() {
            return Some((wild, svc));
        }
    }
    let key = ServiceKey {
        addr,
        port,
        proto,
        scope: SCOPE_ALL,
        slot: 0,
        _pad1: 0,
    };
    // SAFETY: copied at once.
    let svc = unsafe { SKIFF_SERVICES.get(&key) }.copied()?;
    if svc.flags & SVC_FLAG_LOCAL != 0 {
        let twin = ServiceKey {
            scope: SCOPE_PODS,
            ..key
        };
        // SAFETY: copied at once.
        if let Some(t) = unsafe { SKIFF_SERVICES.get(&twin) }.copied() {
            return Some((twin, t));
        }
    }
    Some((key, svc))
}

/// connect4/sendmsg4: frontend -> backend.
#[inline(always)]
fn translate(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr for the program's lifetime.
    let sa = unsafe { &mut *ctx.sock_addr };
    let (addr, port) = (sa.user_ip4, sa.user_port as u16);
    let Some((frontend, svc)) = lookup(addr, port, sa.protocol as u8) else {
        return ALLOW;
    };
    if svc.count == 0 {
        count(LbStat::NoBackend);
        return REFUSE;
    }
    let Some((_, backend)) = pick(ctx, &frontend, &svc) else {
        count(LbStat::MissingBackend);
        return REFUSE;
    };
    sa.user_ip4 = backend.addr;
    sa.user_port = u32::from(backend.port);
    // SAFETY: plain helper call on the program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The address the socket asked for (not the wildcard's 0.0.0.0).
    let _ = SKIFF_SOCK_REV_NAT.insert(
        &SockRevNatKey {
            cookie,
            addr: backend.addr,
            port: backend.port,
            _pad: 0,
        },
        &SockRevNat {
            addr,
            port,
            _pad: 0,
            rev_nat_id: svc.rev_nat_id,
        },
        0,
    );
    count(LbStat::Translated);
    ALLOW
}

/// recvmsg4/getpeername4: backend -> the frontend this socket asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as in translate.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: plain helper call.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let key = SockRevNatKey {
        cookie,
        addr: sa.user_ip4,
        port: sa.user_port as u16,
        _pad: 0,
    };
    // SAFETY: copied at once.
    if let Some(f) = (unsafe { SKIFF_SOCK_REV_NAT.get(&key) }).copied() {
        sa.user_ip4 = f.addr;
        sa.user_port = u32::from(f.port);
        count(LbStat::RevNat);
    }
    ALLOW
}

#[cgroup_sock_addr(connect4)]
pub fn skiff_connect4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn skiff_sendmsg4(ctx: SockAddrContext) -> i32 {
    translate(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn skiff_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn skiff_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx)
}
