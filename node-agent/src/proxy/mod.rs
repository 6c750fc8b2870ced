//! The service proxy (kube-proxy's role) in eBPF.
//!
//! - [`model`]: a Service and its EndpointSlices -> the frontends and backends this node
//!   should have (pure functions with Kubernetes' rules).
//! - [`maps`]: those frontends -> the pinned services/backends maps, applying only
//!   differences in an order that never exposes a dangling entry.
//! - [`reconciler`]: watches Services and EndpointSlices, marks the touched Services
//!   dirty and applies them; a full sync after the first lists removes what no Service
//!   wants any more (entries left by an earlier agent included).
//! - [`cgroup_link`]: the socket programs attached at the node's pod cgroup through
//!   pinned BPF links, so they stay attached across agent restarts.
//!
//! Data path (ebpf/programs/src/service_lb.rs): connect4/sendmsg4 translate a pod's
//! socket to a backend, recvmsg4/getpeername4 translate back.

pub mod cgroup_link;
pub mod iptables;
pub mod maps;
pub mod metrics;
pub mod model;
pub mod reconciler;

use std::{
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::programs::CgroupSockAddr;
use skiff_ebpf_common::{
    CONNECT4_PROGRAM, GETPEERNAME4_PROGRAM, LB_STATS_MAP, LbStat, PacketCounter, RECVMSG4_PROGRAM,
    SENDMSG4_PROGRAM,
};

use crate::{cni::datapath::Datapath, ebpf::EbpfError};
use maps::ServiceMaps;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "cgroup v2 is not mounted, so the socket load balancer cannot attach: mount it (e.g. \
         `mount -t cgroup2 none /sys/fs/cgroup/unified`) or start the agent with --pod-network host-routes"
    )]
    NoCgroup2,

    #[error("creating the pod cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "attaching {program} to {}: {source}; the kernel needs cgroup BPF links (>= 5.7)",
        cgroup.display()
    )]
    Attach {
        program: String,
        cgroup: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(transparent)]
    Ebpf(#[from] EbpfError),
}

/// The cgroup v2 mount point (the unified hierarchy; /sys/fs/cgroup/unified in the
/// hybrid layout, /sys/fs/cgroup on a pure v2 host).
pub fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split(' ').next()? != "cgroup2" {
            return None;
        }
        Some(PathBuf::from(left.split(' ').nth(4)?))
    })
}

/// The node's pod cgroup in the v2 hierarchy (`<mount>/skiff/<node>`, where runc puts
/// every container of this node).
pub fn pod_cgroup_dir(node: &str) -> Result<PathBuf, ProxyError> {
    let dir = cgroup2_mount()
        .ok_or(ProxyError::NoCgroup2)?
        .join("skiff")
        .join(node);
    std::fs::create_dir_all(&dir).map_err(|source| ProxyError::Cgroup {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}

/// How Services are implemented (`--proxy-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyMode {
    /// eBPF: socket programs for pods, tc programs for NodePort/LoadBalancer traffic.
    #[default]
    Ebpf,
    /// kube-proxy-shaped iptables rules (for the comparison benchmark only).
    Iptables,
}

/// Removes the pinned cgroup links an eBPF-mode agent left (iptables mode).
pub fn detach_pinned_links(pin_dir: &Path) {
    let links = pin_dir.join("links");
    for name in [
        CONNECT4_PROGRAM,
        SENDMSG4_PROGRAM,
        RECVMSG4_PROGRAM,
        GETPEERNAME4_PROGRAM,
    ] {
        let _ = std::fs::remove_file(links.join(name));
    }
}

/// The loaded socket load balancer of one node.
pub struct ServiceProxy {
    pub maps: Mutex<ServiceMaps>,
    pub cgroup_dir: PathBuf,
    pub node_ip: std::net::Ipv4Addr,
    pin_dir: PathBuf,
}

impl ServiceProxy {
    /// Loads the socket programs from the data path's object, attaches them at the node's
    /// pod cgroup (or updates the pinned links an earlier agent left), and opens the maps.
    pub fn start(dp: &Datapath, node: &str) -> Result<ServiceProxy, ProxyError> {
        let cgroup_dir = pod_cgroup_dir(node)?;
        let pin_dir = dp.pin_dir().to_path_buf();
        let links = pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| EbpfError::PinDir {
            path: links.clone(),
            source,
        })?;
        let maps = dp.with_ebpf(|ebpf| -> Result<ServiceMaps, ProxyError> {
            for (name, attach_type) in [
                (CONNECT4_PROGRAM, cgroup_link::BPF_CGROUP_INET4_CONNECT),
                (SENDMSG4_PROGRAM, cgroup_link::BPF_CGROUP_UDP4_SENDMSG),
                (RECVMSG4_PROGRAM, cgroup_link::BPF_CGROUP_UDP4_RECVMSG),
                (
                    GETPEERNAME4_PROGRAM,
                    cgroup_link::BPF_CGROUP_INET4_GETPEERNAME,
                ),
            ] {
                let prog: &mut CgroupSockAddr = ebpf
                    .program_mut(name)
                    .ok_or_else(|| EbpfError::NotInObject {
                        kind: "program",
                        name: name.into(),
                    })?
                    .try_into()
                    .map_err(|source| EbpfError::Program {
                        name: name.into(),
                        source,
                    })?;
                prog.load().map_err(|source| EbpfError::Program {
                    name: name.into(),
                    source,
                })?;
                let fd = prog
                    .fd()
                    .map_err(|source| EbpfError::Program {
                        name: name.into(),
                        source,
                    })?
                    .as_fd()
                    .as_raw_fd();
                let updated =
                    cgroup_link::attach_pinned(fd, &cgroup_dir, attach_type, &links.join(name))
                        .map_err(|source| ProxyError::Attach {
                            program: name.into(),
                            cgroup: cgroup_dir.clone(),
                            source,
                        })?;
                tracing::debug!(program = name, updated, "socket load balancer attached");
            }
            Ok(ServiceMaps::open(ebpf)?)
        })?;
        tracing::info!(cgroup = %cgroup_dir.display(), "socket load balancer ready");
        Ok(ServiceProxy {
            maps: Mutex::new(maps),
            cgroup_dir,
            node_ip: dp.node_ip(),
            pin_dir,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// The load balancer's counters from the pinned map (no agent needed).
pub fn read_pinned_lb_stats(pin_dir: &Path) -> Result<Vec<(LbStat, PacketCounter)>, EbpfError> {
    let totals = crate::cni::datapath::read_pinned_slots(pin_dir, LB_STATS_MAP, LbStat::COUNT)?;
    Ok(LbStat::ALL.into_iter().zip(totals).collect())
}
