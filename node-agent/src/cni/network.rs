//! Pod networking, in process (the CNI role), with `ip` commands:
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
//! Links are looked up with `ip`, not /sys/class/net: the agent may run in a node network
//! namespace while /sys still shows the host's.

use std::{
    fs,
    io::{self, Write},
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
};

use super::datapath::Datapath;

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

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
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

/// Runs `lines` (ip commands without the leading `ip`) through one `ip -batch -`
/// process, in network namespace `netns` if given: one process (and for a netns, one
/// namespace switch, which copies the mount table) instead of one per command. Stops at
/// the first failing command.
fn ip_batch(netns: Option<&str>, lines: &[String]) -> Result<(), String> {
    use std::process::Stdio;
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    let input = lines.join("\n") + "\n";
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| format!("writing to ip -batch: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("waiting for ip -batch: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip{} -batch ({}): {}",
            netns.map(|n| format!(" -n {n}")).unwrap_or_default(),
            lines.join("; "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn link_exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).is_ok()
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

    /// Builds (or completes) the pod's network: netns, veth pair, address, routes.
    pub fn setup(&self, uid: &str, cidr: Ipv4Net) -> Result<PodNetwork, String> {
        let ipaddr = self.allocate(uid, cidr)?;
        let ns = netns_name(uid);
        let hv = veth_name(uid);
        let netns_path = PathBuf::from(format!("/run/netns/{ns}"));
        let fresh_netns = !netns_path.exists();
        if fresh_netns {
            ip(&["netns", "add", &ns])?;
        }
        // The pod side lives in the netns; if the host side exists without it (an earlier
        // half-done setup), start the pair over. (A netns made just now has no eth0.)
        let pod_side_ok = !fresh_netns && ip(&["-n", &ns, "link", "show", "eth0"]).is_ok();
        let host_side = link_exists(&hv);
        if host_side && !pod_side_ok {
            ip(&["link", "del", &hv])?;
        }
        let mtu = self.datapath.as_ref().map(|dp| dp.pod_mtu().to_string());
        // Host side: the pair, its MTU (room for the VXLAN headers on the way to other
        // nodes), up.
        let mut host = vec![];
        if !host_side || !pod_side_ok {
            if pod_side_ok {
                ip(&["-n", &ns, "link", "del", "eth0"])?;
            }
            host.push(format!("link add {hv} type veth peer name eth0 netns {ns}"));
        }
        if let Some(mtu) = &mtu {
            host.push(format!("link set {hv} mtu {mtu}"));
        }
        host.push(format!("link set {hv} up"));
        ip_batch(None, &host)?;
        let _ = fs::write(format!("/proc/sys/net/ipv4/conf/{hv}/proxy_arp"), "1");
        let (_, mac) = super::datapath::link_info(&hv, None).map_err(|e| e.to_string())?;
        let mac = super::preflight::format_mac(&mac);
        let cidr32 = format!("{ipaddr}/32");
        let gw = GATEWAY;
        // Pod side, in one namespace switch.
        let mut pod = vec!["link set lo up".to_string()];
        if let Some(mtu) = &mtu {
            pod.push(format!("link set eth0 mtu {mtu}"));
        }
        pod.extend([
            "link set eth0 up".to_string(),
            format!("addr replace {cidr32} dev eth0"),
            format!("route replace {gw} dev eth0 scope link"),
            format!("neigh replace {gw} lladdr {mac} dev eth0 nud permanent"),
            format!("route replace default via {gw} dev eth0"),
        ]);
        ip_batch(Some(&ns), &pod)?;
        let mut route = vec!["route", "replace", &cidr32, "dev", &hv, "scope", "link"];
        let src = self.host_src.map(|s| s.to_string());
        if let Some(s) = &src {
            route.extend(["src", s.as_str()]);
        }
        ip(&route)?;
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
        for (ipaddr, u) in self.allocations() {
            if u == uid {
                let _ = ip(&["route", "del", &format!("{ipaddr}/32"), "dev", &hv]);
                if let Some(dp) = &self.datapath {
                    dp.remove_pod(ipaddr);
                }
            }
        }
        if Path::new("/run/netns").join(&ns).exists()
            && let Err(e) = ip(&["netns", "del", &ns])
        {
            errs.push(e);
        }
        // Deleting the netns destroys the pair, asynchronously: the host side may still
        // be listed for a moment.
        if link_exists(&hv)
            && let Err(e) = ip(&["link", "del", &hv])
            && !e.contains("Cannot find device")
        {
            errs.push(e);
        }
        self.release(uid);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
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
