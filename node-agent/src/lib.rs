//! skiff-agent: the node agent (kubelet, CNI, service proxy, observability).
//!
//! Components, one folder each:
//! - [`ebpf`]: loading skiff's eBPF object, attaching its programs, pinned maps.
//! - [`kubelet`]: pods on this node: Node registration and Lease, pod workers, pod
//!   networks (netns + veth), probes, and the containerd runtime. Binary: `skiff-agent`.

pub mod ebpf;
pub mod kubelet;
