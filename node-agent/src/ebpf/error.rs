use std::path::PathBuf;

/// Errors of the eBPF loader. Each message ends with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "loading eBPF programs needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) but the effective uid is {euid}: run skiff-agent (or the test) as root, e.g. with sudo"
    )]
    NotRoot { euid: u32 },

    #[error(
        "{} is not on a bpf filesystem (found filesystem type {fs_type:#x} at {}), so maps cannot be pinned there: mount it with `mount -t bpf bpf /sys/fs/bpf`",
        path.display(), checked.display()
    )]
    BpffsNotMounted {
        path: PathBuf,
        checked: PathBuf,
        fs_type: i64,
    },

    #[error("cannot use pin directory {}: {source}", path.display())]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{what}: run `cargo xtask build-ebpf` (and rebuild skiff-agent to embed it)")]
    ObjectMissing { what: String },

    #[error(
        "the kernel or aya rejected the eBPF object: {source}; check `dmesg` and that the kernel is >= 5.10, or rebuild it with `cargo xtask build-ebpf`"
    )]
    Load {
        #[source]
        source: aya::EbpfError,
    },

    #[error(
        "{kind} `{name}` is not in the eBPF object: the object is stale, run `cargo xtask build-ebpf`"
    )]
    NotInObject { kind: &'static str, name: String },

    #[error("loading or attaching program `{name}`: {source}")]
    Program {
        name: String,
        #[source]
        source: aya::programs::ProgramError,
    },

    #[error(
        "interface `{interface}` does not exist{}: check `ip link` (in that namespace)",
        netns.as_ref().map(|n| format!(" in network namespace {}", n.display())).unwrap_or_default()
    )]
    NoSuchInterface {
        interface: String,
        netns: Option<PathBuf>,
    },

    #[error("adding the clsact qdisc to `{interface}`: {source}")]
    Qdisc {
        interface: String,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "cannot enter network namespace {}: {source}; check that it exists (`ip netns list`)",
        path.display()
    )]
    Netns {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("map `{name}`: {source}")]
    Map {
        name: String,
        #[source]
        source: aya::maps::MapError,
    },
}
