//! `containerd-shim-skiff-v1`: containerd's runtime v2 shim for skiff's pods
//! (runtime `io.containerd.skiff.v1`, or this binary's absolute path as the runtime name).
//!
//! Why: containerd's Go runc shim costs three Go processes per container (`start`, the
//! daemon, and `delete` after every task delete) and runs the OCI runtime five times; on a
//! small node that is most of the CPU of starting a pod. This shim does the same job for
//! what the agent uses — Create, Start, State, Wait, Kill, Delete, Connect, Shutdown, with
//! `binary://` and `file://` stdio — and runs crun directly (create, start, delete; signals
//! go straight to the container's init).
//!
//! The process model is containerd's (the containerd-shim crate, pinned to 0.11: the last
//! release that speaks containerd 1.6's task v2 API): `start` spawns the daemon, which
//! serves ttrpc on a socket whose address goes to `<bundle>/address` (so containerd finds
//! it again after a restart); containers of one pod share a daemon (the
//! `io.containerd.runc.v2.group` annotation); `delete` cleans up after a dead daemon.
//! The daemon is a child subreaper: the crate reaps every child and reports exits by pid
//! ([`oci`] waits for its own commands that way, [`service`] for the containers' inits).

mod oci;
mod service;
mod stdio;

fn main() {
    // One thread: a shim serves a handful of containers; blocking work (crun, reading
    // pipes) runs on tokio's blocking pool.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("containerd-shim-skiff-v1: cannot start tokio: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(containerd_shim::asynchronous::run::<service::Shim>(
        "io.containerd.skiff.v1",
        None,
    ));
}
