//! Cgroup attachments that outlive the agent: a BPF link (`BPF_LINK_CREATE`) pinned on
//! bpffs, updated in place (`BPF_LINK_UPDATE`) by the next agent. aya 0.13 creates cgroup
//! links but cannot pin or update them, so these three syscalls are made here directly.
//! Kernel 5.7+ (bpf_link for cgroups); the floor is 5.10.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

/// `enum bpf_attach_type` values of the hooks skiff uses (uapi/linux/bpf.h).
pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
pub const BPF_CGROUP_UDP4_SENDMSG: u32 = 14;
pub const BPF_CGROUP_UDP4_RECVMSG: u32 = 19;
pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Every command here takes a 16-byte prefix of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct Attr16([u32; 4]);

fn bpf(cmd: libc::c_long, attr: &mut Attr16) -> io::Result<i64> {
    // SAFETY: `attr` is a valid, initialised 16-byte buffer for the duration of the call
    // and the size passed matches it; the kernel zero-extends the rest of bpf_attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut Attr16,
            std::mem::size_of::<Attr16>() as u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn path_attr(path: &Path, fd: u32) -> io::Result<(Attr16, CString)> {
    let c = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let ptr = c.as_ptr() as u64;
    Ok((Attr16([ptr as u32, (ptr >> 32) as u32, fd, 0]), c))
}

/// Attaches `prog_fd` to the cgroup at `cgroup_dir` for `attach_type`, or swaps the
/// program of the link pinned at `pin` if there is one; pins the link at `pin`.
/// Returns true when an existing link was updated.
pub fn attach_pinned(
    prog_fd: RawFd,
    cgroup_dir: &Path,
    attach_type: u32,
    pin: &Path,
) -> io::Result<bool> {
    if pin.exists() {
        let (mut attr, _c) = path_attr(pin, 0)?;
        let link = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: BPF_OBJ_GET returned a new file descriptor that we now own.
        let link = unsafe { OwnedFd::from_raw_fd(link as RawFd) };
        let mut attr = Attr16([link.as_raw_fd() as u32, prog_fd as u32, 0, 0]);
        bpf(BPF_LINK_UPDATE, &mut attr)?;
        return Ok(true);
    }
    let cgroup = std::fs::File::open(cgroup_dir)?;
    let mut attr = Attr16([prog_fd as u32, cgroup.as_raw_fd() as u32, attach_type, 0]);
    let link = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that we now own.
    let link = unsafe { OwnedFd::from_raw_fd(link as RawFd) };
    let (mut attr, _c) = path_attr(pin, link.as_raw_fd() as u32)?;
    bpf(BPF_OBJ_PIN, &mut attr)?;
    Ok(false)
}
