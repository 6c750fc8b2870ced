//! Pod networking, in process (the CNI role), over rtnetlink ([`super::netlink`]; no
//! process per pod):
//!
//! - where the address comes from: the node's `spec.podCIDR` (node IPAM controller); one
//!   file per allocated address under `<root-dir>/ipam/<ip>` holding the pod's uid, so a
//!   restarted agent knows what is taken and what to clean up;
//! - what it builds, per pod: a named network namespace `skiff-<uid prefix>` (no pause
//!   container), a veth pair `skv<uid prefix>` (host side, root netns, no address,
//!   proxy_arp on) / `eth0` (pod side) with the pod's `/32`, a link route to the fake
//!   gateway 169.254.1.1 and a default route through it (the Calico pattern; the
//!   gateway's MAC is also a permanent neighbour entry, so no ARP answer is needed), and a
//!   host route `<podIP>/32 dev skv…` so the node reaches the pod (probes, tests);
//! - teardown removes the host route, the netns (which takes the veth pair with it) and
//!   the allocation file. Every step is idempotent.
//!
//! With the eBPF data path ([`super::datapath`]) both veth ends get the tunnel-sized MTU and
//! the pod is handed to the data path (tc programs on the host veth, local pods map);
//! forwarding between pods and across nodes is its job. Nothing here touches iptables.
//!
//! Links are looked up over netlink, not /sys/class/net: the agent may run in a node
//! network namespace while /sys still shows the host's.

use std::{
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use super::{datapath::Datapath, netlink as nl};

/// Prefix of every pod network namespace (`/run/netns/skiff-<12 hex of the uid>`).
pub const NETNS_PREFIX: &str = "skiff-";
/// Prefix of every host-side veth (`skv<12 hex of the uid>`, 15 bytes: IFNAMSIZ - 1).
pub const VETH_PREFIX: &str = "skv";
/// The pod's default gateway (never assigned to an interface; the host veth answers).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// An IPv4 network (`10.244.1.0/24`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Net {
    /// Parses `a.b.c.d/n` (the address is masked to the network).
    pub fn parse(s: &str) -> Option<Ipv4Net> {
        let (a, p) = s.trim().split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        let prefix: u8 = p.parse().ok()?;
        if prefix > 32 {
            return None;
        }
        let mask = Self::mask_of(prefix);
        Some(Ipv4Net {
            addr: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    fn mask_of(prefix: u8) -> u32 {
        if prefix == 0 {
            0
        } else {
            u32::MAX << (32 - prefix)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.addr)
    }

    /// Pod addresses: everything but the network address, `.1` (kept for a gateway, as
    /// the usual plugins do) and the broadcast address.
    pub fn pod_hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let base = u32::from(self.addr);
        let size: u64 = 1u64 << (32 - self.prefix as u32);
        let last = (base as u64 + size).saturating_sub(1);
        (base as u64 + 2..last).map(|a| Ipv4Addr::from(a as u32))
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// 12 lowercase hex digits of a pod uid (dashes and anything else dropped).
pub fn uid_prefix(uid: &str) -> String {
    let hex: String = uid
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .take(12)
        .collect();
    if hex.is_empty() { "0".into() } else { hex }
}

/// The network namespace name of a pod.
pub fn netns_name(uid: &str) -> String {
    format!("{NETNS_PREFIX}{}", uid_prefix(uid))
}

/// The host-side veth of a pod.
pub fn veth_name(uid: &str) -> String {
    format!("{VETH_PREFIX}{}", uid_prefix(uid))
}

/// What [`PodNetworks::setup`] built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNetwork {
    pub netns: String,
    pub netns_path: PathBuf,
    pub host_veth: String,
    pub ip: Ipv4Addr,
}

/// The pod networks of one node.
#[derive(Debug)]
pub struct PodNetworks {
    ipam_dir: PathBuf,
    /// Source address for host -> pod traffic (None: the kernel picks one).
    host_src: Option<Ipv4Addr>,
    lock: Mutex<()>,
    /// The eBPF data path (`--pod-network ebpf`), None for host routes only.
    datapath: Option<Arc<Datapath>>,
}

impl PodNetworks {
    /// Allocation files live in `root_dir/ipam`. `node_ip` becomes the source address of
    /// the host routes when it is not a loopback address.
    pub fn new(root_dir: &Path, node_ip: Ipv4Addr) -> io::Result<Self> {
        let ipam_dir = root_dir.join("ipam");
        fs::create_dir_all(&ipam_dir)?;
        Ok(PodNetworks {
            ipam_dir,
            host_src: (!node_ip.is_loopback() && !node_ip.is_unspecified()).then_some(node_ip),
            lock: Mutex::new(()),
            datapath: None,
        })
    }

    /// Hands every pod network to `datapath` from now on, and drops its local pod entries
    /// that no allocation backs (pods removed while no agent ran).
    pub fn with_datapath(mut self, datapath: Arc<Datapath>) -> Self {
        let allocated: Vec<Ipv4Addr> = self.allocations().into_iter().map(|(ip, _)| ip).collect();
        for ip in datapath.local_pods() {
            if !allocated.contains(&ip) {
                datapath.remove_pod(ip);
            }
        }
        self.datapath = Some(datapath);
        self
    }

    pub fn datapath(&self) -> Option<&Arc<Datapath>> {
        self.datapath.as_ref()
    }

    /// (ip, uid) of every allocation.
    pub fn allocations(&self) -> Vec<(Ipv4Addr, String)> {
        let mut out = vec![];
        for e in fs::read_dir(&self.ipam_dir).into_iter().flatten().flatten() {
            let Some(ip) = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if let Ok(uid) = fs::read_to_string(e.path()) {
                out.push((ip, uid.trim().to_string()));
            }
        }
        out
    }

    /// The pod's address: the one it already holds in `cidr`, else the lowest free one.
    pub fn allocate(&self, uid: &str, cidr: Ipv4Net) -> Result<Ipv4Addr, String> {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mine: Vec<Ipv4Addr> = self
            .allocations()
            .into_iter()
            .filter(|(_, u)| u == uid)
            .map(|(ip, _)| ip)
            .collect();
        if let Some(ip) = mine.iter().find(|ip| cidr.contains(**ip)) {
            return Ok(*ip);
        }
        for host in cidr.pod_hosts() {
            let path = self.ipam_dir.join(host.to_string());
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(uid.as_bytes())
                        .map_err(|e| format!("writing {}: {e}", path.display()))?;
                    return Ok(host);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(format!("allocating {host}: {e}")),
            }
        }
        Err(format!("no free address left in {cidr}"))
    }

    /// Releases every address held by `uid`.
    pub fn release(&self, uid: &str) {
        let _g = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        for (ip, u) in self.allocations() {
            if u == uid {
                let _ = fs::remove_file(self.ipam_dir.join(ip.to_string()));
            }
        }
    }

    /// Builds (or completes) the pod's network: netns, veth pair, address, routes. Every
    /// step is a replace (or skipped when done), so a rerun after a failure or a restart
    /// completes what is missing.
    pub fn setup(&self, uid: &str, cidr: Ipv4Net) -> Result<PodNetwork, String> {
        let ipaddr = self.allocate(uid, cidr)?;
        let ns = netns_name(uid);
        let hv = veth_name(uid);
        let netns_path = nl::netns_path(&ns);
        let mut fresh_netns = !netns_path.exists();
        if !fresh_netns && !nl::is_netns_mount(&netns_path) {
            // A file without a namespace on it (a creation cut short): start over.
            nl::netns_del(&ns)?;
            fresh_netns = true;
        }
        if fresh_netns {
            nl::netns_add(&ns)?;
        }
        let in_ns = |e: nl::Error| format!("{e} (in netns {ns})");
        let mut host = nl::Socket::open()?;
        let mut pod = nl::Socket::open_in_netns(&netns_path)?;
        // The pod side lives in the netns; if the host side exists without it (an earlier
        // half-done setup), start the pair over. (A netns made just now has no eth0.)
        let pod_side_ok = !fresh_netns && pod.link_get("eth0").map_err(in_ns)?.is_some();
        let host_side = host.link_get(&hv)?.is_some();
        if host_side && !pod_side_ok {
            ignore_missing(host.link_del(&hv))?;
        }
        if !host_side || !pod_side_ok {
            if pod_side_ok {
                ignore_missing(pod.link_del("eth0")).map_err(in_ns)?;
            }
            let ns_file = fs::File::open(&netns_path)
                .map_err(|e| format!("opening network namespace {}: {e}", netns_path.display()))?;
            host.veth_add(&hv, "eth0", ns_file.as_fd(), &ns)?;
        }
        // Host side: its MTU (room for the VXLAN headers on the way to other nodes), up.
        let mtu = self.datapath.as_ref().map(|dp| dp.pod_mtu());
        let host_link = host
            .link_get(&hv)?
            .ok_or_else(|| format!("host veth {hv} is gone right after it was set up"))?;
        host.link_set_up(host_link.index, &hv, mtu)?;
        let _ = fs::write(format!("/proc/sys/net/ipv4/conf/{hv}/proxy_arp"), "1");
        let mac = host_link
            .mac
            .ok_or_else(|| format!("host veth {hv} has no Ethernet address"))?;
        // Pod side: lo and eth0 up, the /32, the gateway as a link route with a permanent
        // neighbour entry (the host veth's MAC), the default route through it.
        let lo = pod
            .link_get("lo")
            .map_err(in_ns)?
            .ok_or_else(|| format!("netns {ns} has no lo"))?;
        pod.link_set_up(lo.index, "lo", None).map_err(in_ns)?;
        let eth0 = pod
            .link_get("eth0")
            .map_err(in_ns)?
            .ok_or_else(|| format!("netns {ns} has no eth0 (peer of {hv})"))?;
        let eth0_link = |dst, prefix, gateway, scope| nl::Route {
            dst,
            prefix,
            oif: eth0.index,
            gateway,
            src: None,
            scope,
        };
        pod.link_set_up(eth0.index, "eth0", mtu).map_err(in_ns)?;
        pod.addr_replace(eth0.index, "eth0", ipaddr, 32)
            .map_err(in_ns)?;
        pod.route_replace(&eth0_link(GATEWAY, 32, None, nl::Scope::Link), "eth0")
            .map_err(in_ns)?;
        pod.neigh_replace_permanent(eth0.index, "eth0", GATEWAY, mac)
            .map_err(in_ns)?;
        pod.route_replace(
            &eth0_link(Ipv4Addr::UNSPECIFIED, 0, Some(GATEWAY), nl::Scope::Universe),
            "eth0",
        )
        .map_err(in_ns)?;
        // Host route to the pod.
        host.route_replace(
            &nl::Route {
                dst: ipaddr,
                prefix: 32,
                oif: host_link.index,
                gateway: None,
                src: self.host_src,
                scope: nl::Scope::Link,
            },
            &hv,
        )?;
        if let Some(dp) = &self.datapath {
            dp.add_pod(ipaddr, &hv, &ns)
                .map_err(|e| format!("connecting the pod to the eBPF data path: {e}"))?;
        }
        Ok(PodNetwork {
            netns: ns,
            netns_path,
            host_veth: hv,
            ip: ipaddr,
        })
    }

    /// Removes the pod's network. Missing parts are fine.
    pub fn teardown(&self, uid: &str) -> Result<(), String> {
        let ns = netns_name(uid);
        let hv = veth_name(uid);
        let mut errs = vec![];
        let mut host = nl::Socket::open()
            .map_err(|e| errs.push(e.to_string()))
            .ok();
        let host_link = match host.as_mut().map(|h| h.link_get(&hv)) {
            Some(Ok(link)) => link,
            Some(Err(e)) => {
                errs.push(e.to_string());
                None
            }
            None => None,
        };
        for (ipaddr, u) in self.allocations() {
            if u == uid {
                if let (Some(h), Some(link)) = (host.as_mut(), host_link) {
                    let _ = h.route_del(ipaddr, 32, link.index, &hv);
                }
                if let Some(dp) = &self.datapath {
                    dp.remove_pod(ipaddr);
                }
            }
        }
        if nl::netns_path(&ns).exists()
            && let Err(e) = nl::netns_del(&ns)
        {
            errs.push(e.to_string());
        }
        // Deleting the netns destroys the pair, asynchronously: the host side may still
        // be there for a moment.
        if let (Some(h), Some(_)) = (host.as_mut(), host_link)
            && let Err(e) = ignore_missing(h.link_del(&hv))
        {
            errs.push(e.to_string());
        }
        self.release(uid);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
    }
}

/// Ok if the link was not there (ENODEV).
fn ignore_missing(r: Result<(), nl::Error>) -> Result<(), nl::Error> {
    match r {
        Err(e) if e.errno == nix::errno::Errno::ENODEV => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_hosts() {
        let n = Ipv4Net::parse("10.244.3.7/24").unwrap();
        assert_eq!(n.to_string(), "10.244.3.0/24");
        assert!(n.contains("10.244.3.200".parse().unwrap()));
        assert!(!n.contains("10.244.4.1".parse().unwrap()));
        let hosts: Vec<_> = n.pod_hosts().collect();
        assert_eq!(hosts.first().unwrap().to_string(), "10.244.3.2");
        assert_eq!(hosts.last().unwrap().to_string(), "10.244.3.254");
        assert_eq!(hosts.len(), 253);
        assert!(Ipv4Net::parse("10.0.0.0/33").is_none());
        assert!(Ipv4Net::parse("garbage").is_none());
    }

    #[test]
    fn names_fit_in_ifnamsiz() {
        let uid = "3f2a9c1e-77b0-4d1e-9c55-0123456789ab";
        assert_eq!(veth_name(uid), "skv3f2a9c1e77b0");
        assert!(veth_name(uid).len() <= 15);
        assert_eq!(netns_name(uid), "skiff-3f2a9c1e77b0");
        assert_eq!(uid_prefix("!!"), "0");
    }

    #[test]
    fn ipam_allocates_lowest_free_and_reuses() {
        let dir = tempdir();
        let nets = PodNetworks::new(&dir, Ipv4Addr::LOCALHOST).unwrap();
        let cidr = Ipv4Net::parse("10.244.9.0/30").unwrap();
        assert_eq!(nets.allocate("a", cidr).unwrap().to_string(), "10.244.9.2");
        assert_eq!(nets.allocate("a", cidr).unwrap().to_string(), "10.244.9.2");
        assert!(
            nets.allocate("b", cidr).is_err(),
            "a /30 has one pod address"
        );
        nets.release("a");
        assert_eq!(nets.allocate("b", cidr).unwrap().to_string(), "10.244.9.2");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Deletes a pod netns on drop (its veth pair goes with it).
    struct NetnsGuard(String);

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = nl::netns_del(&self.0);
        }
    }

    fn ip_json(args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&ip(args).unwrap()).unwrap()
    }

    /// setup twice (a restart), repairs of half-done setups, teardown; the node side in
    /// a network namespace of this test's own (a thread that unshared one). Needs root.
    #[test]
    fn setup_is_idempotent_repairs_and_teardown_removes_everything() {
        let dir = tempdir();
        let uid = format!("cccc{:08x}-test", std::process::id());
        let ns = netns_name(&uid);
        let _guard = NetnsGuard(ns.clone());
        let d = dir.clone();
        let res = std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            ip(&["link", "set", "lo", "up"]).unwrap();
            ip(&["addr", "add", "10.250.0.1/32", "dev", "lo"]).unwrap();
            let nets = PodNetworks::new(&d, "10.250.0.1".parse().unwrap()).unwrap();
            let cidr = Ipv4Net::parse("10.251.0.0/24").unwrap();
            let hv = veth_name(&uid);
            let a = nets.setup(&uid, cidr).unwrap();
            assert_eq!(a.ip.to_string(), "10.251.0.2");
            assert_eq!(
                (a.netns.as_str(), a.host_veth.as_str()),
                (ns.as_str(), hv.as_str())
            );
            assert_eq!(
                nets.setup(&uid, cidr).unwrap(),
                a,
                "a rerun changes nothing"
            );
            let check = || {
                let routes = ip_json(&["-j", "route", "show", "dev", &hv]);
                assert_eq!(routes[0]["dst"], "10.251.0.2", "{routes}");
                assert_eq!(routes[0]["prefsrc"], "10.250.0.1", "{routes}");
                let pod = ip_json(&["-n", &ns, "-j", "addr", "show", "dev", "eth0"]);
                assert_eq!(pod[0]["addr_info"][0]["local"], "10.251.0.2", "{pod}");
                let default = ip_json(&["-n", &ns, "-j", "route", "show", "default"]);
                assert_eq!(default[0]["gateway"], "169.254.1.1", "{default}");
                let neigh = ip_json(&["-n", &ns, "-j", "neigh", "show", "169.254.1.1"]);
                assert_eq!(neigh[0]["state"][0], "PERMANENT", "{neigh}");
                let arp = fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{hv}/proxy_arp"));
                assert_eq!(arp.unwrap().trim(), "1");
            };
            check();
            // Pod side gone (the pair with it): setup builds it again.
            ip(&["-n", &ns, "link", "del", "eth0"]).unwrap();
            assert_eq!(nets.setup(&uid, cidr).unwrap(), a);
            check();
            // A netns file without a namespace on it (creation cut short).
            nets.teardown(&uid).unwrap();
            assert!(!a.netns_path.exists());
            assert!(
                ip(&["link", "show", "dev", &hv]).is_err(),
                "host veth removed"
            );
            assert!(nets.allocations().is_empty());
            fs::write(&a.netns_path, "").unwrap();
            assert_eq!(nets.setup(&uid, cidr).unwrap(), a);
            check();
            nets.teardown(&uid).unwrap();
            nets.teardown(&uid).expect("a second teardown is fine");
            assert!(!a.netns_path.exists());
        })
        .join();
        let _ = fs::remove_dir_all(&dir);
        if let Err(panic) = res {
            std::panic::resume_unwind(panic);
        }
    }

    fn ip(args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "skiff-ipam-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }
}
