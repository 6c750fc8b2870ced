//! Running netlink work inside a network namespace.
//!
//! Interface names, clsact qdiscs and tc filters belong to a network namespace; the
//! netlink socket aya opens talks to the namespace of the calling thread. So attach and
//! detach run on a short-lived thread that first `setns(2)`s into the namespace (a
//! thread may switch its own network namespace; the rest of the process is unaffected).

use std::{fs::File, path::Path};

use nix::sched::{CloneFlags, setns};

use super::EbpfError;

/// Path of a namespace created with `ip netns add <name>`.
pub fn named(name: &str) -> std::path::PathBuf {
    Path::new("/var/run/netns").join(name)
}

/// Runs `f` in the network namespace at `netns` (e.g. /var/run/netns/<name> or
/// /proc/<pid>/ns/net), or in the current one if `None`.
pub fn run_in<T: Send>(
    netns: Option<&Path>,
    f: impl FnOnce() -> Result<T, EbpfError> + Send,
) -> Result<T, EbpfError> {
    let Some(path) = netns else {
        return f();
    };
    let file = File::open(path).map_err(|source| EbpfError::Netns {
        path: path.to_path_buf(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| EbpfError::Netns {
                path: path.to_path_buf(),
                source: e.into(),
            })?;
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}
