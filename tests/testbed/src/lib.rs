//! skiff's test network topology: one Linux bridge with an address of the host on it,
//! and one network namespace per node joined to the bridge by a veth pair. `cargo xtask
//! up`/`down` build and remove the local cluster's topology with it (bridge `skiff0`,
//! 10.90.0.0/24, netns `sknode-<node>`: [`TopologyConfig::local_cluster`]); end-to-end
//! tests build their own with other names and another subnet.
//!
//! Nothing in the topology routes out of it: a node netns has only its `eth0` on the
//! bridge subnet (no default route), and the host routes only the subnets it is told to
//! ([`Topology::add_host_route`]) to node IPs on the bridge.
//!
//! Everything is done with iproute2 (`ip`), util-linux `nsenter` and procps `sysctl`; all
//! of it needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Where `ip netns add` pins named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// The name of a node's interface on the bridge, inside its netns.
pub const NODE_IFNAME: &str = "eth0";
/// The MTU of the node veth pairs.
pub const MTU: u32 = 1500;
/// Linux interface names are at most 15 bytes (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;

/// Names and addresses of one topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyConfig {
    /// The Linux bridge (at most 15 bytes).
    pub bridge: String,
    /// The host's address on the bridge; with `prefix_len` it defines the subnet.
    pub host_addr: Ipv4Addr,
    /// Prefix length of the bridge subnet (8..=30).
    pub prefix_len: u8,
    /// A node `n`'s netns is `<netns_prefix><n>`.
    pub netns_prefix: String,
}

impl TopologyConfig {
    /// `cargo xtask up`'s topology: bridge `skiff0`, host 10.90.0.1/24, netns `sknode-*`.
    pub fn local_cluster() -> Self {
        TopologyConfig {
            bridge: "skiff0".into(),
            host_addr: Ipv4Addr::new(10, 90, 0, 1),
            prefix_len: 24,
            netns_prefix: "sknode-".into(),
        }
    }

    /// Checks the names and the subnet.
    pub fn validate(&self) -> Result<()> {
        check_ifname(&self.bridge).context("bridge name")?;
        if !(8..=30).contains(&self.prefix_len) {
            bail!("prefix length {} is not in 8..=30", self.prefix_len);
        }
        if self.host_addr == self.network() || self.host_addr == self.broadcast() {
            bail!(
                "host address {} is the network or broadcast address of {}",
                self.host_addr,
                self.subnet()
            );
        }
        if self.netns_prefix.is_empty() {
            bail!("the netns prefix is empty");
        }
        check_name(&self.netns_prefix).context("netns prefix")?;
        Ok(())
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix_len.clamp(1, 32)))
    }

    /// The subnet's network address (10.90.0.0).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.host_addr) & self.mask())
    }

    fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.host_addr) | !self.mask())
    }

    /// The bridge subnet in CIDR notation (10.90.0.0/24).
    pub fn subnet(&self) -> String {
        format!("{}/{}", self.network(), self.prefix_len)
    }

    /// `ip` is in the bridge subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// The conventional IP of node number `index` (1-based): network + 10 + index
    /// (10.90.0.11 for node 1).
    pub fn node_ip(&self, index: u32) -> Result<Ipv4Addr> {
        let ip = u32::from(self.network())
            .checked_add(10 + index)
            .map(Ipv4Addr::from)
            .context("node index overflows")?;
        if !self.contains(ip) || ip == self.broadcast() || ip == self.host_addr {
            bail!("node index {index} does not fit in {}", self.subnet());
        }
        Ok(ip)
    }

    /// The netns name of `node`: `<netns_prefix><node>`.
    pub fn netns_name(&self, node: &str) -> String {
        format!("{}{node}", self.netns_prefix)
    }

    /// The netns file of `node`: /run/netns/<netns_prefix><node>.
    pub fn netns_path(&self, node: &str) -> PathBuf {
        Path::new(NETNS_DIR).join(self.netns_name(node))
    }

    /// The host end of `node`'s veth pair: the bridge name's first 6 bytes, `-`, and 8 hex
    /// digits of a hash of the netns name (at most 15 bytes, stable across processes).
    pub fn host_veth_name(&self, node: &str) -> String {
        format!(
            "{}{:08x}",
            self.host_veth_prefix(),
            fnv1a(self.netns_name(node).as_bytes())
        )
    }

    /// What every host veth name of this topology starts with.
    fn host_veth_prefix(&self) -> String {
        let mut end = self.bridge.len().min(6);
        while !self.bridge.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}-", &self.bridge[..end])
    }
}

/// One node's network namespace, as [`Topology::add_node`] made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeNetns {
    /// The node name.
    pub node: String,
    /// The netns name (`<netns_prefix><node>`).
    pub netns: String,
    /// /run/netns/<netns>.
    pub path: PathBuf,
    /// The node IP on `eth0`.
    pub ip: Ipv4Addr,
    /// Prefix length of `ip` (the bridge subnet's).
    pub prefix_len: u8,
    /// The host end of the veth pair, a port of the bridge.
    pub host_veth: String,
}

impl NodeNetns {
    /// `program` inside this netns (see [`nsenter_command`]).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        nsenter_command(&self.path, program)
    }
}

/// `nsenter --net=<netns_path> -- <program>`: runs `program` in that network namespace
/// and nothing else: no new mount namespace, so /sys/fs/bpf and /sys/fs/cgroup stay the
/// host's (unlike `ip netns exec`, which remounts /sys). nsenter execs the program, so a
/// spawned child's pid is the program's pid. Add arguments with `.arg(s)`.
pub fn nsenter_command(netns_path: &Path, program: impl AsRef<OsStr>) -> Command {
    let mut net = std::ffi::OsString::from("--net=");
    net.push(netns_path.as_os_str());
    let mut cmd = Command::new("nsenter");
    cmd.arg(net).arg("--").arg(program);
    cmd
}

/// A bridge plus node network namespaces (see the crate docs).
#[derive(Debug, Clone)]
pub struct Topology {
    config: TopologyConfig,
}

impl Topology {
    /// A handle on the topology `config` describes (creates nothing; see [`Self::ensure`]).
    pub fn new(config: TopologyConfig) -> Result<Self> {
        config.validate()?;
        Ok(Topology { config })
    }

    pub fn config(&self) -> &TopologyConfig {
        &self.config
    }

    /// The bridge interface exists.
    pub fn bridge_exists(&self) -> bool {
        link_exists(&self.config.bridge)
    }

    /// Creates the bridge with the host address and sets it up; idempotent (fails if an
    /// interface of that name exists and is not a bridge).
    pub fn ensure(&self) -> Result<()> {
        let c = &self.config;
        if !self.bridge_exists() {
            ip(&["link", "add", "name", &c.bridge, "type", "bridge"])
                .with_context(|| format!("creating bridge {}", c.bridge))?;
        }
        if !Path::new("/sys/class/net")
            .join(&c.bridge)
            .join("bridge")
            .exists()
        {
            bail!("{} exists and is not a bridge", c.bridge);
        }
        let addr = format!("{}/{}", c.host_addr, c.prefix_len);
        ip(&["addr", "replace", &addr, "dev", &c.bridge])
            .with_context(|| format!("adding {addr} to {}", c.bridge))?;
        ip(&["link", "set", "dev", &c.bridge, "up"])?;
        Ok(())
    }

    /// The netns name of `node`.
    pub fn netns_name(&self, node: &str) -> String {
        self.config.netns_name(node)
    }

    /// /run/netns/<netns_prefix><node>.
    pub fn netns_path(&self, node: &str) -> PathBuf {
        self.config.netns_path(node)
    }

    /// `program` inside `node`'s netns, without a new mount namespace (see
    /// [`nsenter_command`]).
    pub fn node_command(&self, node: &str, program: impl AsRef<OsStr>) -> Command {
        nsenter_command(&self.netns_path(node), program)
    }

    /// Creates `node`'s netns with `eth0` = `ip`/prefix_len on the bridge (veth pair,
    /// MTU 1500), lo up, no default route, net.ipv4.ip_forward=1 and rp_filter=0
    /// (all, default, eth0). Creates the bridge first if it is missing. Idempotent: a
    /// netns that already has this address on eth0 and its veth on the bridge is kept;
    /// one that does not is removed and made again.
    pub fn add_node(&self, node: &str, ip: Ipv4Addr) -> Result<NodeNetns> {
        let c = &self.config;
        check_name(node).context("node name")?;
        if !c.contains(ip) || ip == c.network() || ip == c.broadcast() || ip == c.host_addr {
            bail!(
                "node IP {ip} is not a free host address of {} (host {})",
                c.subnet(),
                c.host_addr
            );
        }
        if !self.bridge_exists() {
            self.ensure()?;
        }
        let n = NodeNetns {
            node: node.into(),
            netns: c.netns_name(node),
            path: c.netns_path(node),
            ip,
            prefix_len: c.prefix_len,
            host_veth: c.host_veth_name(node),
        };
        if n.path.exists() && self.node_configured(&n) {
            return Ok(n);
        }
        self.remove_node(node)?;
        if let Err(e) = self.create_node(&n) {
            let _ = self.remove_node(node);
            return Err(e.context(format!("creating node netns {}", n.netns)));
        }
        Ok(n)
    }

    fn create_node(&self, n: &NodeNetns) -> Result<()> {
        let mtu = MTU.to_string();
        let addr = format!("{}/{}", n.ip, n.prefix_len);
        ip(&["netns", "add", &n.netns])?;
        // The peer is created directly inside the netns, so the host's own eth0 is
        // never in the way of its name.
        ip(&[
            "link",
            "add",
            "name",
            &n.host_veth,
            "mtu",
            &mtu,
            "type",
            "veth",
            "peer",
            "name",
            NODE_IFNAME,
            "mtu",
            &mtu,
            "netns",
            &n.netns,
        ])?;
        ip(&[
            "link",
            "set",
            "dev",
            &n.host_veth,
            "master",
            &self.config.bridge,
        ])?;
        ip(&["link", "set", "dev", &n.host_veth, "up"])?;
        ip(&["-n", &n.netns, "link", "set", "dev", "lo", "up"])?;
        ip(&["-n", &n.netns, "addr", "add", &addr, "dev", NODE_IFNAME])?;
        ip(&["-n", &n.netns, "link", "set", "dev", NODE_IFNAME, "up"])?;
        // net.* sysctls are per network namespace: /proc/sys/net shows the caller's, so
        // nsenter --net is enough (no /sys remount).
        run(n.command("sysctl").args([
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            &format!("net.ipv4.conf.{NODE_IFNAME}.rp_filter=0"),
        ]))
        .context("setting sysctls")?;
        Ok(())
    }

    /// The netns has the address on eth0 and the host veth is a port of the bridge.
    fn node_configured(&self, n: &NodeNetns) -> bool {
        let want = format!(" {}/{} ", n.ip, n.prefix_len);
        let has_addr = ip(&[
            "-n",
            &n.netns,
            "-o",
            "-4",
            "addr",
            "show",
            "dev",
            NODE_IFNAME,
        ])
        .is_ok_and(|out| out.contains(&want));
        let master = std::fs::read_link(
            Path::new("/sys/class/net")
                .join(&n.host_veth)
                .join("master"),
        )
        .ok();
        let on_bridge = master
            .as_deref()
            .and_then(Path::file_name)
            .is_some_and(|m| m == OsStr::new(&self.config.bridge));
        has_addr && on_bridge
    }

    /// Removes `node`'s veth pair and netns; idempotent. (Processes still inside the
    /// netns keep it alive, unnamed, without its eth0.)
    pub fn remove_node(&self, node: &str) -> Result<()> {
        let veth = self.config.host_veth_name(node);
        if link_exists(&veth) {
            // Deleting one end deletes the pair.
            if let Err(e) = ip(&["link", "del", "dev", &veth])
                && link_exists(&veth)
            {
                return Err(e);
            }
        }
        let ns = self.netns_name(node);
        if self.netns_path(node).exists() {
            ip(&["netns", "del", &ns]).with_context(|| format!("deleting netns {ns}"))?;
        }
        Ok(())
    }

    /// The nodes whose netns (with this topology's prefix) exists, sorted.
    pub fn nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(NETNS_DIR)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let node = name.strip_prefix(&self.config.netns_prefix)?;
                (!node.is_empty()).then(|| node.to_string())
            })
            .collect();
        v.sort();
        v
    }

    /// Removes every node netns with this topology's prefix, the host veths of this
    /// topology still on the bridge, and the bridge (with its address and the routes over
    /// it). Idempotent; tries everything and returns the first error.
    pub fn destroy(&self) -> Result<()> {
        let mut first: Option<anyhow::Error> = None;
        for node in self.nodes() {
            if let Err(e) = self.remove_node(&node) {
                first.get_or_insert(e);
            }
        }
        let prefix = self.config.host_veth_prefix();
        let brif = Path::new("/sys/class/net")
            .join(&self.config.bridge)
            .join("brif");
        for port in std::fs::read_dir(brif).into_iter().flatten().flatten() {
            let name = port.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix)
                && let Err(e) = ip(&["link", "del", "dev", &name])
                && link_exists(&name)
            {
                first.get_or_insert(e);
            }
        }
        if self.bridge_exists()
            && let Err(e) = ip(&["link", "del", "dev", &self.config.bridge])
            && self.bridge_exists()
        {
            first.get_or_insert(e);
        }
        first.map_or(Ok(()), Err)
    }

    /// Routes `cidr` (e.g. a node's podCIDR) on the host to `via`, a node IP on the
    /// bridge (`ip route replace <cidr> via <via> dev <bridge>`; idempotent). `via` must
    /// be in the bridge subnet, so the route only leads into the topology.
    pub fn add_host_route(&self, cidr: &str, via: Ipv4Addr) -> Result<()> {
        let cidr = self.check_route(cidr, via)?;
        ip(&[
            "route",
            "replace",
            &cidr,
            "via",
            &via.to_string(),
            "dev",
            &self.config.bridge,
        ])
        .with_context(|| format!("routing {cidr} via {via}"))?;
        Ok(())
    }

    /// Removes a route [`Self::add_host_route`] added; a missing route (or bridge) is fine.
    pub fn remove_host_route(&self, cidr: &str, via: Ipv4Addr) -> Result<()> {
        let cidr = self.check_route(cidr, via)?;
        if !self.bridge_exists() {
            return Ok(()); // the routes went with it
        }
        let via_s = via.to_string();
        if let Err(e) = ip(&[
            "route",
            "del",
            &cidr,
            "via",
            &via_s,
            "dev",
            &self.config.bridge,
        ]) {
            let left = ip(&["-4", "route", "show", "exact", &cidr]).unwrap_or_default();
            if left.contains(&format!("via {via_s} ")) {
                return Err(e.context(format!("removing the route {cidr} via {via}")));
            }
        }
        Ok(())
    }

    /// The canonical `network/len` of `cidr`, if `via` is a node address of the subnet.
    fn check_route(&self, cidr: &str, via: Ipv4Addr) -> Result<String> {
        let (net, len) = parse_cidr(cidr)?;
        let c = &self.config;
        if !c.contains(via) || via == c.host_addr || via == c.network() || via == c.broadcast() {
            bail!("{via} is not a node address in {}", c.subnet());
        }
        Ok(format!("{net}/{len}"))
    }
}

/// Parses `a.b.c.d/len` (host bits are cleared); `a.b.c.d` alone is a /32.
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8)> {
    let (addr, len) = s.split_once('/').unwrap_or((s, "32"));
    let addr: Ipv4Addr = addr
        .trim()
        .parse()
        .with_context(|| format!("bad IPv4 CIDR {s:?}"))?;
    let len: u8 = len
        .trim()
        .parse()
        .ok()
        .filter(|l| *l <= 32)
        .with_context(|| format!("bad prefix length in {s:?}"))?;
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    Ok((Ipv4Addr::from(u32::from(addr) & mask), len))
}

/// 32-bit FNV-1a (stable, unlike std's hasher).
fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// An interface name the kernel accepts.
fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        bail!("interface name {name:?} must be 1..={IFNAME_MAX} bytes");
    }
    check_name(name)?;
    if name.contains(':') {
        bail!("interface name {name:?} contains ':'");
    }
    Ok(())
}

/// Usable as a file name under /run/netns and an `ip` argument.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c.is_whitespace() || c.is_control())
    {
        bail!("{name:?} is not a valid name");
    }
    Ok(())
}

fn link_exists(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && Path::new("/sys/class/net").join(name).exists()
}

/// `ip <args>`; its stdout, or an error with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_config(tag: &str) -> TopologyConfig {
        TopologyConfig {
            bridge: format!("sktb{tag}"),
            host_addr: Ipv4Addr::new(10, 92, 0, 1),
            prefix_len: 24,
            netns_prefix: format!("sktb{tag}-"),
        }
    }

    #[test]
    fn names() {
        let c = TopologyConfig::local_cluster();
        c.validate().unwrap();
        assert_eq!(c.netns_name("node-1"), "sknode-node-1");
        assert_eq!(
            c.netns_path("node-1"),
            Path::new("/run/netns/sknode-node-1")
        );
        assert_eq!(c.subnet(), "10.90.0.0/24");
        assert_eq!(c.node_ip(1).unwrap(), Ipv4Addr::new(10, 90, 0, 11));
        assert_eq!(c.node_ip(3).unwrap(), Ipv4Addr::new(10, 90, 0, 13));
        assert!(c.node_ip(245).is_err()); // .255 is the broadcast address
        assert!(c.contains(Ipv4Addr::new(10, 90, 0, 200)));
        assert!(!c.contains(Ipv4Addr::new(10, 90, 1, 1)));

        let a = c.host_veth_name("node-1");
        let b = c.host_veth_name("node-2");
        assert_ne!(a, b);
        assert_eq!(a, c.host_veth_name("node-1"), "stable");
        assert!(a.starts_with("skiff0-") && a.len() <= IFNAME_MAX, "{a}");
        let long = TopologyConfig {
            bridge: "a-very-long-br0".into(),
            ..c.clone()
        };
        long.validate().unwrap();
        let v = long.host_veth_name("a-node-with-a-rather-long-name-42");
        assert!(v.len() <= IFNAME_MAX && v.starts_with("a-very-"), "{v}");
        // Distinct node names get distinct veths (no hash collisions among many).
        let mut all: Vec<String> = (0..2000)
            .map(|i| c.host_veth_name(&format!("node-{i}")))
            .collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 2000);
    }

    #[test]
    fn validation() {
        let ok = test_config("1");
        ok.validate().unwrap();
        for bad in [
            TopologyConfig {
                bridge: "0123456789abcdef".into(),
                ..ok.clone()
            },
            TopologyConfig {
                bridge: "".into(),
                ..ok.clone()
            },
            TopologyConfig {
                prefix_len: 31,
                ..ok.clone()
            },
            TopologyConfig {
                host_addr: Ipv4Addr::new(10, 92, 0, 0),
                ..ok.clone()
            },
            TopologyConfig {
                netns_prefix: "a/b".into(),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let t = Topology::new(ok).unwrap();
        assert!(t.add_node("x", Ipv4Addr::new(10, 92, 1, 5)).is_err());
        assert!(t.add_node("x", Ipv4Addr::new(10, 92, 0, 1)).is_err());
        assert!(t.add_node("a/b", Ipv4Addr::new(10, 92, 0, 5)).is_err());
        assert!(
            t.add_host_route("10.93.0.0/24", Ipv4Addr::new(10, 1, 0, 5))
                .is_err()
        );
        assert!(
            t.add_host_route("10.93.0.0/33", Ipv4Addr::new(10, 92, 0, 5))
                .is_err()
        );
    }

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("10.244.1.7/24").unwrap(),
            (Ipv4Addr::new(10, 244, 1, 0), 24)
        );
        assert_eq!(
            parse_cidr("10.244.1.7").unwrap(),
            (Ipv4Addr::new(10, 244, 1, 7), 32)
        );
        assert_eq!(parse_cidr("0.0.0.0/0").unwrap(), (Ipv4Addr::UNSPECIFIED, 0));
        assert!(parse_cidr("10.244.1/24").is_err());
        assert!(parse_cidr("10.244.1.0/").is_err());
    }

    #[test]
    fn node_command_uses_nsenter_without_mount_ns() {
        let t = Topology::new(TopologyConfig::local_cluster()).unwrap();
        let mut cmd = t.node_command("node-2", "/bin/agent");
        cmd.arg("--flag");
        assert_eq!(cmd.get_program(), "nsenter");
        let args: Vec<&OsStr> = cmd.get_args().collect();
        assert_eq!(
            args,
            [
                "--net=/run/netns/sknode-node-2",
                "--",
                "/bin/agent",
                "--flag"
            ]
        );
    }

    fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
            })
            .unwrap_or(false)
    }

    /// Destroys the topology even if the test panics.
    struct Cleanup(Topology);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = self.0.destroy();
        }
    }

    /// Root only (CI runs tests as root): a bridge and two node netns, ping between them,
    /// a host route into the topology, then everything removed.
    #[test]
    fn bridge_two_nodes_ping_and_destroy() {
        if !is_root() {
            eprintln!("skipped: needs root");
            return;
        }
        let config = test_config(&(std::process::id() % 10000).to_string());
        let t = Topology::new(config.clone()).unwrap();
        let guard = Cleanup(t.clone());
        t.ensure().unwrap();
        t.ensure().unwrap(); // idempotent
        let a_ip = config.node_ip(1).unwrap();
        let b_ip = config.node_ip(2).unwrap();
        let a = t.add_node("a", a_ip).unwrap();
        let b = t.add_node("b", b_ip).unwrap();
        assert_eq!(t.add_node("a", a_ip).unwrap(), a, "idempotent");
        assert_eq!(t.nodes(), ["a", "b"]);
        assert!(a.path.exists() && b.path.exists());
        assert_ne!(a.host_veth, b.host_veth);

        let out = |cmd: &mut Command| run(cmd).unwrap();
        // Node netns: eth0 with the address and MTU 1500, no default route, sysctls.
        let link = out(a.command("ip").args(["-o", "link", "show", "dev", "eth0"]));
        assert!(link.contains("mtu 1500"), "{link}");
        let addr = out(a
            .command("ip")
            .args(["-o", "-4", "addr", "show", "dev", "eth0"]));
        assert!(addr.contains(&format!("{a_ip}/24")), "{addr}");
        assert_eq!(
            out(a.command("ip").args(["route", "show", "default"])).trim(),
            ""
        );
        for (key, want) in [
            ("ipv4/ip_forward", "1"),
            ("ipv4/conf/all/rp_filter", "0"),
            ("ipv4/conf/default/rp_filter", "0"),
            ("ipv4/conf/eth0/rp_filter", "0"),
        ] {
            let v = out(a.command("cat").arg(format!("/proc/sys/net/{key}")));
            assert_eq!(v.trim(), want, "{key}");
        }
        // nsenter keeps the host's mount namespace (bpffs, cgroup2 as on the host).
        let host_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
        let node_mnt = out(a.command("readlink").arg("/proc/self/ns/mnt"));
        assert_eq!(node_mnt.trim(), host_mnt.to_string_lossy());
        let host_net = std::fs::read_link("/proc/self/ns/net").unwrap();
        let node_net = out(a.command("readlink").arg("/proc/self/ns/net"));
        assert_ne!(node_net.trim(), host_net.to_string_lossy());

        // Node to node over the bridge, both ways, and host to node.
        out(a
            .command("ping")
            .args(["-c", "2", "-W", "1", &b_ip.to_string()]));
        out(b
            .command("ping")
            .args(["-c", "2", "-W", "1", &a_ip.to_string()]));
        out(Command::new("ping").args(["-c", "1", "-W", "1", &a_ip.to_string()]));

        // Host route into the topology.
        let cidr = "198.18.77.0/24"; // benchmarking range, unused elsewhere
        t.add_host_route(cidr, a_ip).unwrap();
        t.add_host_route(cidr, a_ip).unwrap();
        let r = ip(&["-4", "route", "show", "exact", cidr]).unwrap();
        assert!(
            r.contains(&format!("via {a_ip} dev {}", config.bridge)),
            "{r}"
        );
        t.remove_host_route(cidr, a_ip).unwrap();
        t.remove_host_route(cidr, a_ip).unwrap();
        assert_eq!(
            ip(&["-4", "route", "show", "exact", cidr]).unwrap().trim(),
            ""
        );

        t.remove_node("b").unwrap();
        assert!(!b.path.exists() && !link_exists(&b.host_veth));
        t.destroy().unwrap();
        t.destroy().unwrap(); // idempotent
        drop(guard);
        assert!(!a.path.exists(), "netns left");
        assert!(!link_exists(&a.host_veth), "veth left");
        assert!(!t.bridge_exists(), "bridge left");
        assert!(t.nodes().is_empty());
    }
}
