//! What the eBPF pod network needs from the kernel and the node, checked before anything
//! is created or attached, so a refusal leaves nothing behind. Every error says what is
//! missing and how to fix it.

use std::{net::Ipv4Addr, process::Command};

use super::network::Ipv4Net;
use crate::ebpf::EbpfError;

/// The oldest kernel the programs are written for (bpf_redirect_peer is 5.10).
pub const MIN_KERNEL: (u32, u32) = (5, 10);

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error(
        "kernel {found} is too old for skiff's eBPF pod network (needs >= {}.{}: bpf_redirect_peer): \
         run the node on Linux 5.10 or newer, or start the agent with --pod-network host-routes",
        MIN_KERNEL.0, MIN_KERNEL.1
    )]
    KernelTooOld { found: String },

    #[error(
        "the node IP {ip} is not assigned to any interface in this network namespace: \
         pass the address of the node's network interface with --node-ip (see `ip -4 addr`)"
    )]
    NodeIpNotFound { ip: Ipv4Addr },

    #[error(
        "cannot create the VXLAN device {device}: {detail}; the vxlan kernel module is missing: \
         run `modprobe vxlan` (Debian: package linux-image-$(uname -r) ships it)"
    )]
    VxlanUnavailable { device: String, detail: String },

    #[error(
        "the node's podCIDR {pod_cidr} overlaps the node network {node_network} (interface {interface}): \
         pods and nodes would be unreachable; give the cluster a pod range that is disjoint from \
         the node network (skiff-controller-manager --cluster-cidr)"
    )]
    PodCidrOverlap {
        pod_cidr: Ipv4Net,
        node_network: Ipv4Net,
        interface: String,
    },

    #[error("{what}: {detail}")]
    Command { what: String, detail: String },

    #[error(transparent)]
    Ebpf(#[from] EbpfError),
}

/// `major.minor` of a kernel release string such as `6.1.0-27-amd64`.
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32)> {
    let mut it = release.trim().split(['.', '-', '+']);
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Fails unless the running kernel is at least [`MIN_KERNEL`].
pub fn check_kernel() -> Result<(), CniError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    match parse_kernel_release(&release) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(CniError::KernelTooOld {
            found: release.trim().to_string(),
        }),
    }
}

/// Fails when `pod_cidr` and the node network share an address.
pub fn check_overlap(pod_cidr: Ipv4Net, node: &NodeInterface) -> Result<(), CniError> {
    let overlap = pod_cidr.contains(node.network.addr) || node.network.contains(pod_cidr.addr);
    if overlap {
        return Err(CniError::PodCidrOverlap {
            pod_cidr,
            node_network: node.network,
            interface: node.name.clone(),
        });
    }
    Ok(())
}

/// The interface that holds the node IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInterface {
    pub name: String,
    pub network: Ipv4Net,
    pub mtu: u32,
}

/// Runs `ip` with `args`; stdout, or the error text.
pub fn ip(args: &[&str]) -> Result<String, CniError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| CniError::Command {
            what: format!("ip {}", args.join(" ")),
            detail: format!("cannot run ip: {e} (install iproute2)"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CniError::Command {
            what: format!("ip {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Finds the interface (in this network namespace) that holds `node_ip`.
pub fn node_interface(node_ip: Ipv4Addr) -> Result<NodeInterface, CniError> {
    let addrs = ip(&["-o", "-4", "addr", "show"])?;
    let (name, network) = parse_addr_lines(&addrs, node_ip)
        .filter(|(name, _)| name != "lo")
        .ok_or(CniError::NodeIpNotFound { ip: node_ip })?;
    let link = ip(&["-o", "link", "show", "dev", &name])?;
    let mtu = parse_mtu(&link).unwrap_or(1500);
    Ok(NodeInterface { name, network, mtu })
}

/// From `ip -o -4 addr show` lines (`2: eth0    inet 10.90.0.11/24 brd ... scope global
/// eth0`), the interface and network of `addr`.
pub fn parse_addr_lines(text: &str, addr: Ipv4Addr) -> Option<(String, Ipv4Net)> {
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(pos) = f.iter().position(|w| *w == "inet") else {
            continue;
        };
        let (Some(name), Some(cidr)) = (f.get(1), f.get(pos + 1)) else {
            continue;
        };
        let Some((a, _)) = cidr.split_once('/') else {
            continue;
        };
        if a.parse::<Ipv4Addr>().ok() == Some(addr) {
            return Some((
                name.trim_end_matches(':').to_string(),
                Ipv4Net::parse(cidr)?,
            ));
        }
    }
    None
}

/// The `mtu N` of an `ip -o link show` line.
pub fn parse_mtu(text: &str) -> Option<u32> {
    let f: Vec<&str> = text.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "mtu")?;
    f.get(i + 1)?.parse().ok()
}

/// ifindex and MAC of an `ip -o link show dev X` line
/// (`7: skv1@if2: <...> mtu 1450 ... link/ether 3a:..:.. brd ...`).
pub fn parse_link(text: &str) -> Option<(u32, [u8; 6])> {
    let ifindex = text.split(':').next()?.trim().parse().ok()?;
    let f: Vec<&str> = text.split_whitespace().collect();
    let i = f.iter().position(|w| *w == "link/ether")?;
    Some((ifindex, parse_mac(f.get(i + 1)?)?))
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases() {
        assert_eq!(parse_kernel_release("6.1.0-27-amd64"), Some((6, 1)));
        assert_eq!(parse_kernel_release("5.10.0"), Some((5, 10)));
        assert!(parse_kernel_release("5.4.0-generic").unwrap() < MIN_KERNEL);
        assert!(parse_kernel_release("5.10.209").unwrap() >= MIN_KERNEL);
        assert_eq!(parse_kernel_release("garbage"), None);
    }

    #[test]
    fn addr_and_link_lines() {
        let addrs = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever\n\
                     2: eth0    inet 10.90.0.11/24 brd 10.90.0.255 scope global eth0\\ valid_lft forever\n";
        let (name, net) = parse_addr_lines(addrs, "10.90.0.11".parse().unwrap()).unwrap();
        assert_eq!(name, "eth0");
        assert_eq!(net.to_string(), "10.90.0.0/24");
        assert!(parse_addr_lines(addrs, "10.90.0.12".parse().unwrap()).is_none());
        let link = "7: skv3f2a9c1e77b0@if2: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1450 qdisc noqueue state UP mode DEFAULT group default \\    link/ether 3a:0b:cc:dd:ee:0f brd ff:ff:ff:ff:ff:ff link-netns skiff-3f2a";
        assert_eq!(
            parse_link(link),
            Some((7, [0x3a, 0x0b, 0xcc, 0xdd, 0xee, 0x0f]))
        );
        assert_eq!(parse_mtu(link), Some(1450));
        assert_eq!(
            format_mac(&[0x3a, 0x0b, 0xcc, 0xdd, 0xee, 0x0f]),
            "3a:0b:cc:dd:ee:0f"
        );
        assert_eq!(parse_mac("zz:00:00:00:00:00"), None);
    }

    #[test]
    fn overlap() {
        let node = NodeInterface {
            name: "eth0".into(),
            network: Ipv4Net::parse("10.244.0.0/16").unwrap(),
            mtu: 1500,
        };
        let err = check_overlap(Ipv4Net::parse("10.244.1.0/24").unwrap(), &node).unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps the node network 10.244.0.0/16"),
            "{err}"
        );
        let node = NodeInterface {
            network: Ipv4Net::parse("10.90.0.0/24").unwrap(),
            ..node
        };
        assert!(check_overlap(Ipv4Net::parse("10.244.1.0/24").unwrap(), &node).is_ok());
    }
}
