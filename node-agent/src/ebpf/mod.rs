//! eBPF loader: where skiff's programs come from, how they get into the kernel, where their
//! maps live.
//!
//! - The object comes from ebpf/programs. node-agent's build.rs builds it (nightly +
//!   bpf-linker, the same command as `cargo xtask build-ebpf`) and it is embedded in the
//!   agent ([`EMBEDDED_OBJECT`]); [`ObjectSource::File`] loads another build instead.
//! - Programs are loaded with aya and tc programs are attached through a clsact qdisc
//!   over netlink (not tcx: the portability floor is kernel 5.10), optionally inside a
//!   network namespace ([`netns`]).
//! - Maps declared `pinned` in the eBPF code are pinned by name under a directory on the
//!   bpf filesystem ([`bpffs`]), e.g. /sys/fs/bpf/skiff/<node>, so an agent restart
//!   reuses them and `skiff-net` can read them without the agent.
//!
//! Every error says what to do about it ([`EbpfError`]).

pub mod bpffs;
mod counter;
mod error;
pub mod netns;

pub use counter::{Direction, PacketCounterProgram, read_pinned_counters};
pub use error::EbpfError;
pub use skiff_ebpf_common::{COUNT_PROGRAM, COUNTER_MAP, PacketCounter};

use std::path::PathBuf;

/// The eBPF object built from ebpf/programs by build.rs, aligned for the ELF parser.
pub static EMBEDDED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/skiff-ebpf.o"));

/// Where to take the eBPF object from.
#[derive(Clone, Debug, Default)]
pub enum ObjectSource {
    /// The object embedded at build time ([`EMBEDDED_OBJECT`]).
    #[default]
    Embedded,
    /// An object file, e.g. ebpf/programs/target/bpfel-unknown-none/release/skiff-ebpf
    /// as produced by `cargo xtask build-ebpf`.
    File(PathBuf),
}

impl ObjectSource {
    pub(crate) fn bytes(&self) -> Result<std::borrow::Cow<'static, [u8]>, EbpfError> {
        match self {
            ObjectSource::Embedded if EMBEDDED_OBJECT.is_empty() => Err(EbpfError::ObjectMissing {
                what: "the embedded eBPF object is empty".into(),
            }),
            ObjectSource::Embedded => Ok(EMBEDDED_OBJECT.into()),
            ObjectSource::File(path) => match std::fs::read(path) {
                Ok(bytes) => Ok(bytes.into()),
                Err(e) => Err(EbpfError::ObjectMissing {
                    what: format!("cannot read eBPF object {}: {e}", path.display()),
                }),
            },
        }
    }
}

/// Fails with [`EbpfError::NotRoot`] unless the effective uid is 0.
pub fn require_root() -> Result<(), EbpfError> {
    let euid = nix::unistd::geteuid();
    if euid.is_root() {
        Ok(())
    } else {
        Err(EbpfError::NotRoot {
            euid: euid.as_raw(),
        })
    }
}
