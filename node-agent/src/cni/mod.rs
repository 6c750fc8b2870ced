//! Pod networking in process (the CNI role; DESIGN.md "CNI").
//!
//! - [`network`]: per pod, a network namespace, a veth pair and a `/32` out of the node's
//!   podCIDR, with the allocations on disk.
//! - [`netlink`]: the rtnetlink requests and named network namespaces that setup and
//!   teardown use (in process: no `ip` per pod).
//! - [`datapath`]: the eBPF data path (`--pod-network ebpf`, the default): tc programs on
//!   every pod's host veth and on one VXLAN device in external mode; maps pinned under
//!   /sys/fs/bpf/skiff/<node>. Checks what the kernel and the node must offer first
//!   ([`preflight`]) and refuses to start with a message saying what is missing.
//! - [`node_routes`]: where other nodes' pods live: Nodes (spec.podCIDR, InternalIP) ->
//!   the routes map and kernel routes through the VXLAN device, reconciled as nodes come
//!   and go.
//!
//! `--pod-network host-routes` keeps only the `/32` host routes (node <-> its pods); it
//! is for several agents sharing one network namespace (the single-host kubelet tests).

pub mod datapath;
pub mod netlink;
pub mod network;
pub mod node_routes;
pub mod preflight;

/// How the agent connects pods (`--pod-network`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PodNetworkMode {
    /// eBPF data path: pod to pod on this node and across nodes over VXLAN.
    #[default]
    Ebpf,
    /// Only host routes to this node's pods (no pod-to-pod forwarding across nodes).
    HostRoutes,
}
