//! skiff-agent: the node agent (kubelet, CNI, service proxy, observability).
//!
//! Components, one folder each:
//! - [`ebpf`]: loading skiff's eBPF object, attaching its programs, pinned maps.
//! - [`kubelet`]: pods on this node: Node registration and Lease, pod workers, pod
//!   networks (netns + veth), probes, and the containerd runtime. Binary: `skiff-agent`.
//! - [`cni`]: pod networks: per-pod netns + veth + address, and the eBPF data path that
//!   connects pods on this node and across nodes over VXLAN.

pub mod cni;
pub mod ebpf;
pub mod kubelet;
pub mod proxy;
