//! A small synchronous rtnetlink (NETLINK_ROUTE) client and named network namespaces,
//! in process: what pod network setup and teardown ([`super::network`]) used to spawn
//! `ip` for, several times per pod.
//!
//! - [`Socket`]: one netlink socket; a socket acts on the network namespace it was
//!   created in, so [`Socket::open_in_netns`] creates one on a short-lived thread that
//!   entered the pod's namespace (the caller's thread never changes namespace). Requests
//!   are the ones iproute2 sends for the matching `ip` command (same header fields, same
//!   attributes), each acknowledged before the next one is sent; a failure names the
//!   operation and the link or address, the kernel's errno and, when the kernel gives
//!   one, its extended-ack message.
//! - [`netns_add`] / [`netns_del`]: `ip netns add` / `ip netns del`: a file under
//!   [`NETNS_RUN_DIR`] (a shared mount, made so the way iproute2 does) with a new
//!   network namespace bind-mounted onto it by a dedicated thread that unshared one.
//!   Namespaces made here are listed, entered and deleted by `ip netns` / `ip -n` /
//!   `nsenter --net=` like any other.
//!
//! Why hand-written: the handful of fixed-layout messages below (link, address, route,
//! neighbour) is smaller than the crates' type trees and keeps the agent's blocking
//! setup path synchronous (it runs on tokio's blocking pool).
//!
//! Every `unsafe` block is a single libc call on buffers this module owns, with the
//! reason it is sound next to it.

use std::{
    fs, io,
    net::Ipv4Addr,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
        unix::fs::{DirBuilderExt, OpenOptionsExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    mount::{MntFlags, MsFlags},
    sched::CloneFlags,
};

/// Where named network namespaces live (iproute2's NETNS_RUN_DIR).
pub const NETNS_RUN_DIR: &str = "/run/netns";

// Constants of the kernel uapi (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
// linux/veth.h, linux/neighbour.h, linux/if_addr.h), spelled as there.
const NLMSG_HDRLEN: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_REPLACE: u16 = 0x100;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// In an ack: the original request was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
/// In an ack: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const SOL_NETLINK: libc::c_int = 270;
const NETLINK_CAP_ACK: libc::c_int = 10;
const NETLINK_EXT_ACK: libc::c_int = 11;

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_NET_NS_FD: u16 = 28;
const IFLA_EXT_MASK: u16 = 29;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const VETH_INFO_PEER: u16 = 1;
const RTEXT_FILTER_SKIP_STATS: u32 = 1 << 3;
const IFF_UP: u32 = 0x1;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const RT_TABLE_MAIN: u8 = 254;
const RTPROT_BOOT: u8 = 3;
const RTN_UNICAST: u8 = 1;
const RT_SCOPE_NOWHERE: u8 = 255;

const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;

const AF_INET: u8 = libc::AF_INET as u8;

/// Route scopes (`scope link`, `scope global`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// RT_SCOPE_UNIVERSE (`scope global`).
    Universe,
    /// RT_SCOPE_LINK (`scope link`).
    Link,
}

impl Scope {
    fn raw(self) -> u8 {
        match self {
            Scope::Universe => 0,
            Scope::Link => 253,
        }
    }
}

/// A failed netlink request or namespace operation: what was attempted, the errno.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What was attempted, e.g. `creating veth skv…/eth0 (peer in netns skiff-…)`.
    pub what: String,
    /// The kernel's errno.
    pub errno: Errno,
    /// The kernel's extended-ack message, if any.
    pub detail: Option<String>,
}

impl Error {
    fn new(what: impl Into<String>, errno: Errno) -> Error {
        Error {
            what: what.into(),
            errno,
            detail: None,
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.what, self.errno.desc(), self.errno)?;
        if let Some(d) = &self.detail {
            write!(f, ": {d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

impl From<Error> for String {
    fn from(e: Error) -> String {
        e.to_string()
    }
}

fn io_errno(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

/// A link as RTM_GETLINK reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    /// The hardware address, if the link has a 6-byte one (Ethernet, veth, VXLAN).
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    /// IFF_UP is set.
    pub up: bool,
}

/// A route for [`Socket::route_replace`] (main table, IPv4 unicast, protocol boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub dst: Ipv4Addr,
    pub prefix: u8,
    pub oif: u32,
    pub gateway: Option<Ipv4Addr>,
    pub src: Option<Ipv4Addr>,
    pub scope: Scope,
}

/// One netlink message under construction: header, fixed part, attributes.
struct Msg {
    buf: Vec<u8>,
}

impl Msg {
    fn new(ty: u16, flags: u16, fixed: &[u8]) -> Msg {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&[0u8; 4]); // nlmsg_len, set by `finish`
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        buf.extend_from_slice(&[0u8; 8]); // nlmsg_seq (set by `finish`), nlmsg_pid 0
        let mut m = Msg { buf };
        m.put(fixed);
        m
    }

    /// Appends `bytes`, padded to 4 bytes (NLMSG_ALIGN / RTA_ALIGN).
    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(self.buf.len().next_multiple_of(4), 0);
    }

    fn attr(&mut self, ty: u16, payload: &[u8]) -> &mut Self {
        // rtattr: rta_len (header + payload, unpadded), rta_type.
        let len = (4 + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.put(payload);
        self
    }

    fn attr_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.attr(ty, &v.to_ne_bytes())
    }

    fn attr_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut b = Vec::with_capacity(s.len() + 1);
        b.extend_from_slice(s.as_bytes());
        b.push(0);
        self.attr(ty, &b)
    }

    /// Opens a nested attribute; close it with [`Msg::end_nest`].
    fn begin_nest(&mut self, ty: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        at
    }

    fn end_nest(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }

    fn finish(mut self, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// struct ifinfomsg.
fn ifinfomsg(index: u32, flags: u32, change: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    // ifi_family AF_UNSPEC, pad, ifi_type 0.
    b[4..8].copy_from_slice(&index.to_ne_bytes());
    b[8..12].copy_from_slice(&flags.to_ne_bytes());
    b[12..16].copy_from_slice(&change.to_ne_bytes());
    b
}

/// Checks a link name the way the kernel will (IFNAMSIZ, no NUL, no `/`).
fn check_ifname(name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 15 || name.contains(['\0', '/']) || name.contains(' ') {
        return Err(Error::new(
            format!("invalid link name {name:?} (1 to 15 bytes, no '/', space or NUL)"),
            Errno::EINVAL,
        ));
    }
    Ok(())
}

/// Iterates over the rtattrs of `buf`: (type without flag bits, payload).
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let payload = &buf[4..len];
        buf = &buf[len.next_multiple_of(4).min(buf.len())..];
        Some((ty, payload))
    })
}

/// A NETLINK_ROUTE socket bound to the network namespace it was created in.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("fd", &self.fd.as_raw_fd())
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Socket {
    /// A socket in the calling thread's network namespace.
    pub fn open() -> Result<Socket, Error> {
        // SAFETY: plain socket(2); the returned descriptor is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(Error::new("opening a netlink socket", Errno::last()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for opt in [NETLINK_EXT_ACK, NETLINK_CAP_ACK] {
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads sizeof(int) bytes from `one`, which lives across the
            // call. Failure is fine (older kernels): acks are then longer and plainer.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    SOL_NETLINK,
                    opt,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        Ok(Socket {
            fd,
            seq: 0,
            buf: vec![0u8; 32 * 1024],
        })
    }

    /// A socket in the network namespace mounted at `netns` (e.g. /run/netns/NAME),
    /// created on a thread that enters it; the caller's namespace is untouched.
    pub fn open_in_netns(netns: &Path) -> Result<Socket, Error> {
        in_netns(netns, Socket::open)?
    }

    /// Sends one request and reads up to its acknowledgement; returns the payloads
    /// (fixed part and attributes) of the replies before the ack.
    fn request(&mut self, msg: Msg, what: &dyn Fn() -> String) -> Result<Vec<Vec<u8>>, Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let req = msg.finish(seq);
        // SAFETY: sockaddr_nl is plain data; all-zero then nl_family set is a valid
        // address of the kernel (pid 0).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: sendto reads `req.len()` bytes of `req` and the address, both alive.
            let n = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    req.as_ptr().cast(),
                    req.len(),
                    0,
                    (&kernel as *const libc::sockaddr_nl).cast(),
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if n >= 0 {
                break;
            }
            let e = Errno::last();
            if e != Errno::EINTR {
                return Err(Error::new(format!("{} (sending)", what()), e));
            }
        }
        let mut replies = vec![];
        loop {
            // SAFETY: recv writes at most `self.buf.len()` bytes into `self.buf`.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                let e = Errno::last();
                if e == Errno::EINTR {
                    continue;
                }
                return Err(Error::new(format!("{} (receiving)", what()), e));
            }
            let mut data = &self.buf[..n as usize];
            while data.len() >= NLMSG_HDRLEN {
                let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
                let ty = u16::from_ne_bytes([data[4], data[5]]);
                let flags = u16::from_ne_bytes([data[6], data[7]]);
                let mseq = u32::from_ne_bytes([data[8], data[9], data[10], data[11]]);
                if len < NLMSG_HDRLEN || len > data.len() {
                    return Err(Error::new(
                        format!("{}: malformed netlink reply", what()),
                        Errno::EBADMSG,
                    ));
                }
                let payload = &data[NLMSG_HDRLEN..len];
                data = &data[len.next_multiple_of(4).min(data.len())..];
                if mseq != seq {
                    continue; // a late answer to an earlier request
                }
                match ty {
                    NLMSG_ERROR => {
                        if payload.len() < 4 {
                            return Err(Error::new(
                                format!("{}: short netlink ack", what()),
                                Errno::EBADMSG,
                            ));
                        }
                        let code =
                            i32::from_ne_bytes([payload[0], payload[1], payload[2], payload[3]]);
                        if code == 0 {
                            return Ok(replies);
                        }
                        let mut err = Error::new(what(), Errno::from_raw(-code));
                        err.detail = ext_ack_message(payload, flags);
                        return Err(err);
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(payload.to_vec()),
                }
            }
        }
    }

    /// The link `name` (`ip link show dev NAME`); None if there is none.
    pub fn link_get(&mut self, name: &str) -> Result<Option<Link>, Error> {
        check_ifname(name)?;
        let mut m = Msg::new(RTM_GETLINK, 0, &ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name)
            .attr_u32(IFLA_EXT_MASK, RTEXT_FILTER_SKIP_STATS);
        let replies = match self.request(m, &|| format!("looking up link {name}")) {
            Ok(r) => r,
            Err(e) if e.errno == Errno::ENODEV => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(reply) = replies.iter().find(|r| r.len() >= 16) else {
            return Ok(None);
        };
        let index = u32::from_ne_bytes([reply[4], reply[5], reply[6], reply[7]]);
        let flags = u32::from_ne_bytes([reply[8], reply[9], reply[10], reply[11]]);
        let mut link = Link {
            index,
            mac: None,
            mtu: None,
            up: flags & IFF_UP != 0,
        };
        for (ty, p) in attrs(&reply[16..]) {
            match ty {
                IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(p).ok(),
                IFLA_MTU if p.len() == 4 => {
                    link.mtu = Some(u32::from_ne_bytes([p[0], p[1], p[2], p[3]]))
                }
                _ => {}
            }
        }
        Ok(Some(link))
    }

    /// `ip link add HOST type veth peer name PEER netns NETNS`: the peer is created
    /// directly in the namespace `peer_netns` (an open namespace file) refers to.
    pub fn veth_add(
        &mut self,
        host: &str,
        peer: &str,
        peer_netns: BorrowedFd<'_>,
        peer_netns_name: &str,
    ) -> Result<(), Error> {
        check_ifname(host)?;
        check_ifname(peer)?;
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, host);
        let info = m.begin_nest(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        let data = m.begin_nest(IFLA_INFO_DATA);
        let peer_at = m.begin_nest(VETH_INFO_PEER);
        m.put(&ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, peer)
            .attr_u32(IFLA_NET_NS_FD, peer_netns.as_raw_fd() as u32);
        m.end_nest(peer_at);
        m.end_nest(data);
        m.end_nest(info);
        self.request(m, &|| {
            format!("creating veth pair {host} / {peer} (peer in netns {peer_netns_name})")
        })?;
        Ok(())
    }

    /// `ip link set dev NAME [mtu MTU] up` on the link with index `index`.
    pub fn link_set_up(&mut self, index: u32, name: &str, mtu: Option<u32>) -> Result<(), Error> {
        let mut m = Msg::new(RTM_NEWLINK, 0, &ifinfomsg(index, IFF_UP, IFF_UP));
        if let Some(mtu) = mtu {
            m.attr_u32(IFLA_MTU, mtu);
        }
        self.request(m, &|| match mtu {
            Some(mtu) => format!("setting link {name} (index {index}) mtu {mtu} up"),
            None => format!("setting link {name} (index {index}) up"),
        })?;
        Ok(())
    }

    /// `ip link del NAME`.
    pub fn link_del(&mut self, name: &str) -> Result<(), Error> {
        check_ifname(name)?;
        let mut m = Msg::new(RTM_DELLINK, 0, &ifinfomsg(0, 0, 0));
        m.attr_str(IFLA_IFNAME, name);
        self.request(m, &|| format!("deleting link {name}"))?;
        Ok(())
    }

    /// `ip addr replace ADDR/PREFIX dev IFINDEX`.
    pub fn addr_replace(
        &mut self,
        index: u32,
        name: &str,
        addr: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), Error> {
        // struct ifaddrmsg: family, prefixlen, flags, scope (universe), index.
        let mut fixed = [AF_INET, prefix, 0, 0, 0, 0, 0, 0];
        fixed[4..8].copy_from_slice(&index.to_ne_bytes());
        let mut m = Msg::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, &fixed);
        m.attr(IFA_LOCAL, &addr.octets())
            .attr(IFA_ADDRESS, &addr.octets());
        self.request(m, &|| format!("adding address {addr}/{prefix} to {name}"))?;
        Ok(())
    }

    /// `ip route replace DST/PREFIX [via GW] dev OIF [scope link] [src SRC]`.
    pub fn route_replace(&mut self, r: &Route, oif_name: &str) -> Result<(), Error> {
        let fixed = rtmsg(r.prefix, RTPROT_BOOT, r.scope.raw(), RTN_UNICAST);
        let mut m = Msg::new(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, &fixed);
        if r.prefix > 0 {
            m.attr(RTA_DST, &r.dst.octets());
        }
        if let Some(gw) = r.gateway {
            m.attr(RTA_GATEWAY, &gw.octets());
        }
        m.attr_u32(RTA_OIF, r.oif);
        if let Some(src) = r.src {
            m.attr(RTA_PREFSRC, &src.octets());
        }
        self.request(m, &|| {
            let mut s = format!("adding route {}/{}", r.dst, r.prefix);
            if let Some(gw) = r.gateway {
                s += &format!(" via {gw}");
            }
            s += &format!(" dev {oif_name}");
            if let Some(src) = r.src {
                s += &format!(" src {src}");
            }
            s
        })?;
        Ok(())
    }

    /// `ip route del DST/PREFIX dev OIF` (ESRCH if there is no such route).
    pub fn route_del(
        &mut self,
        dst: Ipv4Addr,
        prefix: u8,
        oif: u32,
        oif_name: &str,
    ) -> Result<(), Error> {
        let fixed = rtmsg(prefix, 0, RT_SCOPE_NOWHERE, 0);
        let mut m = Msg::new(RTM_DELROUTE, 0, &fixed);
        if prefix > 0 {
            m.attr(RTA_DST, &dst.octets());
        }
        m.attr_u32(RTA_OIF, oif);
        self.request(m, &|| {
            format!("deleting route {dst}/{prefix} dev {oif_name}")
        })?;
        Ok(())
    }

    /// `ip neigh replace ADDR lladdr MAC dev IFINDEX nud permanent`.
    pub fn neigh_replace_permanent(
        &mut self,
        index: u32,
        name: &str,
        addr: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), Error> {
        // struct ndmsg: family, pad1, pad2, ifindex, state, flags, type.
        let mut fixed = [0u8; 12];
        fixed[0] = AF_INET;
        fixed[4..8].copy_from_slice(&index.to_ne_bytes());
        fixed[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
        let mut m = Msg::new(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, &fixed);
        m.attr(NDA_DST, &addr.octets()).attr(NDA_LLADDR, &mac);
        self.request(m, &|| {
            format!(
                "adding permanent neighbour {addr} lladdr {} on {name}",
                super::preflight::format_mac(&mac)
            )
        })?;
        Ok(())
    }
}

/// struct rtmsg of an IPv4 route in the main table.
fn rtmsg(dst_len: u8, protocol: u8, scope: u8, ty: u8) -> [u8; 12] {
    // family, dst_len, src_len, tos, table, protocol, scope, type, flags (u32).
    [
        AF_INET,
        dst_len,
        0,
        0,
        RT_TABLE_MAIN,
        protocol,
        scope,
        ty,
        0,
        0,
        0,
        0,
    ]
}

/// The extended-ack message of an NLMSG_ERROR payload (error code, original request
/// header or whole request, attributes).
fn ext_ack_message(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || payload.len() < 4 + NLMSG_HDRLEN {
        return None;
    }
    let orig_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HDRLEN
    } else {
        u32::from_ne_bytes([payload[4], payload[5], payload[6], payload[7]]) as usize
    };
    let tlvs = payload.get((4 + orig_len).next_multiple_of(4)..)?;
    attrs(tlvs)
        .find(|(ty, _)| *ty == NLMSGERR_ATTR_MSG)
        .map(|(_, p)| {
            String::from_utf8_lossy(p)
                .trim_end_matches('\0')
                .to_string()
        })
        .filter(|s| !s.is_empty())
}

/// Runs `f` on a new thread that has entered the network namespace mounted at `netns`,
/// and returns its result. Only that thread changes namespace, and it ends with `f`.
pub fn in_netns<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let file = fs::File::open(netns).map_err(|e| {
        Error::new(
            format!("opening network namespace {}", netns.display()),
            io_errno(&e),
        )
    })?;
    std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("skiff-netns".into())
            .spawn_scoped(s, || {
                nix::sched::setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
                    Error::new(format!("entering network namespace {}", netns.display()), e)
                })?;
                Ok(f())
            })
            .map_err(|e| {
                Error::new(
                    format!(
                        "starting a thread for network namespace {}",
                        netns.display()
                    ),
                    io_errno(&e),
                )
            })?;
        thread.join().unwrap_or_else(|_| {
            Err(Error::new(
                format!("thread in network namespace {} panicked", netns.display()),
                Errno::EIO,
            ))
        })
    })
}

/// `/run/netns/NAME`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

fn check_netns_name(name: &str) -> Result<(), Error> {
    if name.is_empty() || name == "." || name == ".." || name.contains(['/', '\0']) {
        return Err(Error::new(
            format!("invalid network namespace name {name:?}"),
            Errno::EINVAL,
        ));
    }
    Ok(())
}

/// Whether `path` is a mounted namespace (nsfs), not a leftover plain file.
pub fn is_netns_mount(path: &Path) -> bool {
    // NSFS_MAGIC (linux/magic.h); FsType's integer type varies by libc.
    let nsfs = nix::sys::statfs::FsType(0x6e73_6673);
    nix::sys::statfs::statfs(path).is_ok_and(|st| st.filesystem_type() == nsfs)
}

/// Makes [`NETNS_RUN_DIR`] a shared mount point, as `ip netns add` does, so namespaces
/// mounted there are seen by every mount namespace that shares it: make it shared; if
/// it is not a mount point yet (EINVAL), bind-mount it onto itself first.
fn ensure_run_dir_shared() -> Result<(), Error> {
    let dir = Path::new(NETNS_RUN_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .map_err(|e| Error::new(format!("creating {NETNS_RUN_DIR}"), io_errno(&e)))?;
    let mut bound = false;
    loop {
        match nix::mount::mount(
            None::<&str>,
            dir,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        ) {
            Ok(()) => return Ok(()),
            Err(Errno::EINVAL) if !bound => {
                nix::mount::mount(
                    Some(dir),
                    dir,
                    Some("none"),
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .map_err(|e| Error::new(format!("bind-mounting {NETNS_RUN_DIR} onto itself"), e))?;
                bound = true;
            }
            Err(e) => {
                return Err(Error::new(
                    format!("making {NETNS_RUN_DIR} a shared mount"),
                    e,
                ));
            }
        }
    }
}

/// `ip netns add NAME`: a new network namespace mounted at /run/netns/NAME. Fails with
/// EEXIST if the file exists. Returns the path.
pub fn netns_add(name: &str) -> Result<PathBuf, Error> {
    check_netns_name(name)?;
    ensure_run_dir_shared()?;
    let path = netns_path(name);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o000)
        .open(&path)
        .map_err(|e| {
            Error::new(
                format!("creating network namespace file {}", path.display()),
                io_errno(&e),
            )
        })?;
    let mounted = std::thread::scope(|s| {
        let thread = std::thread::Builder::new()
            .name("skiff-netns-add".into())
            .spawn_scoped(s, || -> Result<(), Error> {
                // This thread alone moves to the new namespace, and ends right after.
                nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::new(format!("creating network namespace {name}"), e))?;
                let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
                nix::mount::mount(
                    Some(own.as_str()),
                    &path,
                    Some("none"),
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|e| Error::new(format!("bind-mounting {own} onto {}", path.display()), e))
            })
            .map_err(|e| {
                Error::new(
                    format!("starting a thread to create network namespace {name}"),
                    io_errno(&e),
                )
            })?;
        thread.join().unwrap_or_else(|_| {
            Err(Error::new(
                format!("thread creating network namespace {name} panicked"),
                Errno::EIO,
            ))
        })
    });
    if let Err(e) = mounted {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(path)
}

/// `ip netns del NAME`: detaches the mount (the namespace goes when its last user does)
/// and removes the file. A missing file is fine.
pub fn netns_del(name: &str) -> Result<(), Error> {
    check_netns_name(name)?;
    let path = netns_path(name);
    // Not mounted (a leftover file) is fine: the unlink below is what matters.
    let _ = nix::mount::umount2(&path, MntFlags::MNT_DETACH);
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::new(
            format!("removing network namespace file {}", path.display()),
            io_errno(&e),
        )),
    }
}

#[cfg(test)]
mod tests {
    //! Needs root (CI runs as root): fails, not skips, without it. Everything lives in two
    //! network namespaces the test creates and a guard deletes, also on failure.

    use super::*;

    /// Deletes the named namespaces on drop (their links and routes go with them).
    struct Netns(Vec<String>);

    impl Drop for Netns {
        fn drop(&mut self) {
            for n in &self.0 {
                if let Err(e) = netns_del(n) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }

    fn ip_json(ns: &str, args: &[&str]) -> serde_json::Value {
        let out = std::process::Command::new("ip")
            .args(["-n", ns, "-j"])
            .args(args)
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip -n {ns} -j {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("ip -j output")
    }

    fn has(v: &serde_json::Value, f: impl Fn(&serde_json::Value) -> bool) -> bool {
        v.as_array().is_some_and(|a| a.iter().any(f))
    }

    #[test]
    fn messages_are_aligned_and_nested() {
        let mut m = Msg::new(RTM_NEWLINK, NLM_F_CREATE, &ifinfomsg(7, IFF_UP, IFF_UP));
        m.attr_str(IFLA_IFNAME, "abc");
        let n = m.begin_nest(IFLA_LINKINFO);
        m.attr_str(IFLA_INFO_KIND, "veth");
        m.end_nest(n);
        let b = m.finish(9);
        assert_eq!(b.len() % 4, 0);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(u32::from_ne_bytes(b[8..12].try_into().unwrap()), 9);
        let got: Vec<(u16, Vec<u8>)> = attrs(&b[NLMSG_HDRLEN + 16..])
            .map(|(t, p)| (t, p.to_vec()))
            .collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], (IFLA_IFNAME, b"abc\0".to_vec()));
        assert_eq!(got[1].0, IFLA_LINKINFO);
        let inner: Vec<_> = attrs(&got[1].1).collect();
        assert_eq!(inner, vec![(IFLA_INFO_KIND, &b"veth\0"[..])]);
        // Truncated or garbage attribute data ends the walk instead of panicking.
        assert_eq!(attrs(&[200, 0, 1, 0, 1]).count(), 0);
        assert_eq!(attrs(&[2, 0, 1, 0]).count(), 0);
    }

    #[test]
    fn bad_names_are_errors() {
        let e = check_ifname("much-too-long-name").unwrap_err();
        assert_eq!(e.errno, Errno::EINVAL);
        assert!(e.to_string().contains("much-too-long-name"), "{e}");
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
        assert!(netns_add("../etc").is_err());
        assert!(netns_del("").is_err());
    }

    #[test]
    fn veth_addresses_routes_neighbour_in_own_namespaces() {
        let pid = std::process::id();
        let (host_ns, pod_ns) = (format!("sknl-{pid}-h"), format!("sknl-{pid}-p"));
        let hv = format!("sknl{pid}");
        let _guard = Netns(vec![host_ns.clone(), pod_ns.clone()]);
        let host_path = netns_add(&host_ns).expect("netns add (host)");
        let pod_path = netns_add(&pod_ns).expect("netns add (pod)");
        assert!(is_netns_mount(&pod_path));
        let e = netns_add(&pod_ns).expect_err("a second add of the same name");
        assert_eq!(e.errno, Errno::EEXIST, "{e}");
        // iproute2 sees them, and /run/netns is a shared mount.
        let list = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .expect("ip netns list");
        assert!(String::from_utf8_lossy(&list.stdout).contains(&pod_ns));
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            mountinfo
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(NETNS_RUN_DIR) && l.contains(" shared:")),
            "{NETNS_RUN_DIR} is not a shared mount"
        );

        let node_ip: Ipv4Addr = "10.250.9.1".parse().unwrap();
        let pod_ip: Ipv4Addr = "10.251.9.5".parse().unwrap();
        let gw: Ipv4Addr = "169.254.1.1".parse().unwrap();
        let mut host = Socket::open_in_netns(&host_path).expect("socket in host netns");
        let mut pod = Socket::open_in_netns(&pod_path).expect("socket in pod netns");
        assert_eq!(host.link_get(&hv).unwrap(), None);
        let e = host.link_del(&hv).unwrap_err();
        assert_eq!(e.errno, Errno::ENODEV);
        assert!(e.to_string().contains(&hv), "{e}");

        let lo = host.link_get("lo").unwrap().expect("lo");
        host.link_set_up(lo.index, "lo", None).unwrap();
        host.addr_replace(lo.index, "lo", node_ip, 32).unwrap();
        let pod_file = fs::File::open(&pod_path).unwrap();
        host.veth_add(&hv, "eth0", pod_file.as_fd(), &pod_ns)
            .expect("veth add");
        let e = host
            .veth_add(&hv, "eth0", pod_file.as_fd(), &pod_ns)
            .expect_err("the pair exists");
        assert_eq!(e.errno, Errno::EEXIST);
        assert!(
            e.to_string().contains(&hv) && e.to_string().contains(&pod_ns),
            "{e}"
        );
        // Twice: every step is a replace.
        for _ in 0..2 {
            let h = host.link_get(&hv).unwrap().expect("host veth");
            host.link_set_up(h.index, &hv, Some(1400)).unwrap();
            let mac = h.mac.expect("veth mac");
            let plo = pod.link_get("lo").unwrap().expect("pod lo");
            pod.link_set_up(plo.index, "lo", None).unwrap();
            let eth0 = pod
                .link_get("eth0")
                .unwrap()
                .expect("eth0 in the pod netns");
            pod.link_set_up(eth0.index, "eth0", Some(1400)).unwrap();
            pod.addr_replace(eth0.index, "eth0", pod_ip, 32).unwrap();
            let route = |dst, prefix, gateway, scope| Route {
                dst,
                prefix,
                oif: eth0.index,
                gateway,
                src: None,
                scope,
            };
            pod.route_replace(&route(gw, 32, None, Scope::Link), "eth0")
                .unwrap();
            pod.neigh_replace_permanent(eth0.index, "eth0", gw, mac)
                .unwrap();
            pod.route_replace(
                &route(Ipv4Addr::UNSPECIFIED, 0, Some(gw), Scope::Universe),
                "eth0",
            )
            .unwrap();
            host.route_replace(
                &Route {
                    dst: pod_ip,
                    prefix: 32,
                    oif: h.index,
                    gateway: None,
                    src: Some(node_ip),
                    scope: Scope::Link,
                },
                &hv,
            )
            .unwrap();
            let again = host.link_get(&hv).unwrap().unwrap();
            assert_eq!((again.mtu, again.up), (Some(1400), true));
        }
        let mac =
            super::super::preflight::format_mac(&host.link_get(&hv).unwrap().unwrap().mac.unwrap());

        // Read back with iproute2.
        let addrs = ip_json(&pod_ns, &["addr", "show", "dev", "eth0"]);
        assert_eq!(addrs[0]["mtu"], 1400);
        assert!(has(&addrs[0]["flags"], |f| f == "UP"), "{addrs}");
        assert!(
            has(&addrs[0]["addr_info"], |a| a["local"] == pod_ip.to_string()
                && a["prefixlen"] == 32),
            "{addrs}"
        );
        let routes = ip_json(&pod_ns, &["-4", "route", "show"]);
        assert!(
            has(&routes, |r| r["dst"] == "default"
                && r["gateway"] == gw.to_string()
                && r["dev"] == "eth0"),
            "{routes}"
        );
        assert!(
            has(&routes, |r| r["dst"] == gw.to_string()
                && r["dev"] == "eth0"
                && r["scope"] == "link"),
            "{routes}"
        );
        let neigh = ip_json(&pod_ns, &["neigh", "show", "dev", "eth0"]);
        assert!(
            has(&neigh, |n| n["dst"] == gw.to_string()
                && n["lladdr"] == mac.as_str()
                && has(&n["state"], |s| s == "PERMANENT")),
            "{neigh}"
        );
        let host_routes = ip_json(&host_ns, &["-4", "route", "show", "dev", &hv]);
        assert!(
            has(&host_routes, |r| r["dst"] == pod_ip.to_string()
                && r["scope"] == "link"
                && r["prefsrc"] == node_ip.to_string()),
            "{host_routes}"
        );
        // The node reaches the pod over the pair.
        let ping = std::process::Command::new("ip")
            .args(["netns", "exec", &host_ns, "ping", "-c1", "-W2"])
            .arg(pod_ip.to_string())
            .output()
            .expect("ping");
        assert!(
            ping.status.success(),
            "{}",
            String::from_utf8_lossy(&ping.stdout)
        );

        // A kernel refusal carries its extended-ack text.
        let eth0 = pod.link_get("eth0").unwrap().unwrap();
        let bad_gw = Route {
            dst: "10.9.0.0".parse().unwrap(),
            prefix: 16,
            oif: eth0.index,
            gateway: Some("10.99.99.99".parse().unwrap()),
            src: None,
            scope: Scope::Universe,
        };
        let e = pod.route_replace(&bad_gw, "eth0").unwrap_err();
        assert!(e.detail.is_some(), "no extended ack in {e}");
        assert!(e.to_string().contains("via 10.99.99.99 dev eth0"), "{e}");

        let h = host.link_get(&hv).unwrap().unwrap();
        host.route_del(pod_ip, 32, h.index, &hv).unwrap();
        let e = host.route_del(pod_ip, 32, h.index, &hv).unwrap_err();
        assert_eq!(e.errno, Errno::ESRCH, "{e}");
        host.link_del(&hv).unwrap();
        assert_eq!(host.link_get(&hv).unwrap(), None);
        assert_eq!(pod.link_get("eth0").unwrap(), None, "the peer goes too");
        drop(pod_file);
        netns_del(&pod_ns).unwrap();
        assert!(!pod_path.exists());
        netns_del(&pod_ns).expect("deleting a missing netns is fine");
    }
}
