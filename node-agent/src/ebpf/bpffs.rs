//! The bpf filesystem: where pinned maps live.

use std::path::{Path, PathBuf};

use super::EbpfError;

/// `BPF_FS_MAGIC` from linux/magic.h.
pub const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is conventionally mounted.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

fn fs_type(path: &Path) -> std::io::Result<i64> {
    let st = nix::sys::statfs::statfs(path).map_err(std::io::Error::from)?;
    #[allow(clippy::unnecessary_cast)] // f_type is i64 on x86_64 but u32/i32 elsewhere
    Ok(st.filesystem_type().0 as i64)
}

/// Checks that `dir` is (or, once created, will be) on a bpf filesystem, then creates it.
pub fn ensure_pin_dir(dir: &Path) -> Result<(), EbpfError> {
    // The closest existing ancestor decides which filesystem the directory ends up on.
    let mut checked: PathBuf = dir.to_path_buf();
    while !checked.exists() {
        match checked.parent() {
            Some(parent) => checked = parent.to_path_buf(),
            None => break,
        }
    }
    let fs_type = fs_type(&checked).map_err(|source| EbpfError::PinDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if fs_type != BPF_FS_MAGIC {
        return Err(EbpfError::BpffsNotMounted {
            path: dir.to_path_buf(),
            checked,
            fs_type,
        });
    }
    std::fs::create_dir_all(dir).map_err(|source| EbpfError::PinDir {
        path: dir.to_path_buf(),
        source,
    })
}
