//! skiff-agent: the node agent (kubelet, CNI, service proxy, observability).
//!
//! Components, one folder each:
//! - [`ebpf`]: loading skiff's eBPF object, attaching its programs, pinned maps.

pub mod ebpf;
