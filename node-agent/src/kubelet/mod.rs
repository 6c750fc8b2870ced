//! kubelet: runs the pods bound to this node.
//!
//! - [`agent`]: the main loop: watch this node's pods, one worker per pod, adoption of
//!   running containers and cleanup of vanished pods at start.
//! - [`node`]: Node registration, Lease heartbeat, Ready condition from containerd's health.
//! - [`pod_worker`]: one pod, level-triggered: network, init and app containers,
//!   restarts with backoff, probes, status, graceful deletion.
//! - [`pod_status`]: phase and restart rules, quantities.
//! - pod networks: [`crate::cni`].
//! - [`env`]: container environment (valueFrom, envFrom, `$(VAR)` expansion).
//! - [`probes`]: httpGet/tcpSocket/exec probes.
//! - [`credentials`]: imagePullSecrets (dockerconfigjson/dockercfg) matched to images.
//! - [`runtime`]: containerd through its native API — pull (registry -> content store ->
//!   image -> snapshots), containers with an OCI runtime spec, tasks through the runc
//!   shim, status, stop, delete, list for adoption.
//! - [`oci_runtime`]: which shim (skiff's, crate skiff-shim, or containerd's runc shim)
//!   and which OCI runtime it runs (crun where it works, else runc).
//! - [`static_pods`]: pods from the files of `--manifest-dir`, with mirror pods in the API.
//! - [`cri_log`]: container logs in the CRI layout and format (a log copier per
//!   container, run by the shim), read back for containerLogs.
//! - [`server`]: the kubelet's HTTPS API (containerLogs, exec) the apiserver proxies to.
//! - [`containerd_process`]: a private containerd daemon (tests, `cargo xtask up`).
//! - [`test_images`]: a local registry and tiny OCI images built from busybox-static.

pub mod agent;
pub mod containerd_process;
pub mod credentials;
pub mod cri_log;
pub mod env;

pub mod node;
pub mod oci_runtime;
pub mod pod_status;
pub mod pod_worker;
pub mod probes;
pub mod runtime;
pub mod server;
pub mod static_pods;
pub mod test_images;
