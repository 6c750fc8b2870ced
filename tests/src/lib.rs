//! Cluster-level end-to-end tests live here once `cargo xtask up` starts nodes (node agent
//! and eBPF networking milestones). The control plane's own end-to-end suites are in
//! control/tests (apiserver with real kubectl and etcd, controllers), and the eBPF load
//! test is in node-agent/tests.
