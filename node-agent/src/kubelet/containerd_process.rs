//! A private containerd daemon: the Debian `containerd` binary run with its own root, state
//! and socket under one directory, for tests and for `cargo xtask up` (one per node).
//!
//! Where it writes (all under `dir`):
//!   config.toml, containerd.log, containerd.sock (+ .ttrpc), root/, state/
//! The CRI plugin is disabled (skiff talks containerd's native API), the snapshotter is
//! overlayfs. [`ContainerdProcess::start`] returns once the gRPC socket accepts
//! connections; dropping the value stops the daemon by its pid (SIGTERM, then SIGKILL),
//! after killing what its shims still run (pids read from the bundles under state/) and
//! the shims themselves (found by the socket path on their command line),
//! removing those containers from runc, and unmounting what is left mounted under `dir`.
//! Nothing is ever killed by name.

use std::{
    fs,
    io::{self, Read},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

/// The containerd binary installed by `cargo xtask setup` (Debian package `containerd`).
pub const CONTAINERD_BIN: &str = "/usr/bin/containerd";

/// How long [`ContainerdProcess::start`] waits for the socket.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running private containerd, stopped on drop.
#[derive(Debug)]
pub struct ContainerdProcess {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl ContainerdProcess {
    /// Writes a config under `dir` (created if missing) and starts containerd with it.
    /// Fails if the binary is missing (install it with `cargo xtask setup`), if containerd
    /// exits early, or if the socket does not answer within 30 s; the error then carries
    /// the tail of containerd.log.
    pub fn start(dir: impl AsRef<Path>) -> io::Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let socket = dir.join("containerd.sock");
        // unix socket paths are limited to 108 bytes (sun_path), the ttrpc one is longer.
        if socket.as_os_str().len() + 6 >= 108 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "containerd directory {} is too long for a unix socket path",
                    dir.display()
                ),
            ));
        }
        if !Path::new(CONTAINERD_BIN).exists() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{CONTAINERD_BIN} is missing: run `cargo xtask setup` (apt-get install containerd runc)"
                ),
            ));
        }
        let config = dir.join("config.toml");
        fs::write(&config, config_toml(&dir))?;
        let log = fs::File::create(dir.join("containerd.log"))?;
        let child = Command::new(CONTAINERD_BIN)
            .arg("--config")
            .arg(&config)
            .arg("--address")
            .arg(&socket)
            .arg("--root")
            .arg(dir.join("root"))
            .arg("--state")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {CONTAINERD_BIN}: {e}")))?;
        let mut me = ContainerdProcess {
            child: Some(child),
            dir,
            socket,
        };
        me.wait_ready()?;
        Ok(me)
    }

    fn wait_ready(&mut self) -> io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                return Err(io::Error::other(format!(
                    "containerd exited early ({status}); containerd.log:\n{}",
                    self.log_tail(4000)
                )));
            }
            if UnixStream::connect(&self.socket).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "containerd socket {} did not answer within {START_TIMEOUT:?}; containerd.log:\n{}",
                        self.socket.display(),
                        self.log_tail(4000)
                    ),
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The gRPC socket (pass it to [`super::runtime::Runtime::connect`]).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The directory holding config, log, root and state.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// containerd's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The last `max` bytes of containerd.log (for error messages).
    pub fn log_tail(&self, max: usize) -> String {
        let mut s = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join("containerd.log")) {
            let _ = f.read_to_string(&mut s);
        }
        let start = s.len().saturating_sub(max);
        let start = (start..s.len())
            .find(|i| s.is_char_boundary(*i))
            .unwrap_or(s.len());
        s[start..].to_string()
    }

    /// Stops containerd now (what drop does).
    pub fn stop(&mut self) {
        // Containers still running: their shims outlive containerd, so end them first.
        let runc_roots = self.kill_leftover_tasks();
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(50))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        unmount_under(&self.dir);
        // The shims' runc roots of this containerd's namespaces, if nothing is left in them
        // (after containerd: its cleanup of dead shims recreates them).
        for root in runc_roots {
            let _ = fs::remove_dir(root);
        }
    }

    /// For each task bundle under state/io.containerd.runtime.v2.task/<namespace>/<id>:
    /// SIGKILL the container's init (init.pid), `crun`/`runc delete --force` it (removes its
    /// cgroups) and unmount its rootfs; SIGKILL the shims (see [`Self::shim_pids`]).
    /// Returns the namespaces' runc roots (/run/containerd/runc/<namespace>).
    fn kill_leftover_tasks(&self) -> Vec<PathBuf> {
        let tasks = self.dir.join("state/io.containerd.runtime.v2.task");
        let mut runc_roots = vec![];
        let namespaces = fs::read_dir(&tasks).into_iter().flatten();
        for ns in namespaces.flatten() {
            let Ok(bundles) = fs::read_dir(ns.path()) else {
                continue;
            };
            for bundle in bundles.flatten() {
                let bundle = bundle.path();
                let id = bundle
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                if let Some(pid) = read_pid(&bundle.join("init.pid")) {
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
                // The runc shim's runtime root is /run/containerd/runc/<namespace>, whichever
                // OCI runtime it ran (see super::oci_runtime); the other one finds nothing.
                let runc_root = Path::new("/run/containerd/runc").join(ns.file_name());
                for oci_runtime in ["crun", "runc"] {
                    let _ = Command::new(oci_runtime)
                        .arg("--root")
                        .arg(&runc_root)
                        .args(["delete", "--force", &id])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status();
                }
                let _ =
                    nix::mount::umount2(&bundle.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
            }
            runc_roots.push(Path::new("/run/containerd/runc").join(ns.file_name()));
        }
        // containerd 1.6's runc shim (and skiff's) writes no shim.pid: its shims are the
        // processes started with `-address <this containerd's socket>`.
        let shims = self.shim_pids();
        for pid in &shims {
            let _ = nix::sys::signal::kill(*pid, nix::sys::signal::Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while shims.iter().any(|p| is_live(*p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        runc_roots
    }

    /// Pids of the shims this containerd started (their command line names its socket).
    pub fn shim_pids(&self) -> Vec<nix::unistd::Pid> {
        let socket = self.socket.as_os_str().as_encoded_bytes();
        let Ok(procs) = fs::read_dir("/proc") else {
            return vec![];
        };
        procs
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
                    return false;
                };
                let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
                args.first().is_some_and(|a0| {
                    a0.ends_with(b"containerd-shim-runc-v2")
                        || a0.ends_with(super::oci_runtime::SKIFF_SHIM_BIN.as_bytes())
                }) && args
                    .windows(2)
                    .any(|w| w[0] == b"-address" && w[1] == socket)
            })
            .map(nix::unistd::Pid::from_raw)
            .collect()
    }
}

impl Drop for ContainerdProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// False once the process is gone or a zombie.
fn is_live(pid: nix::unistd::Pid) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

fn read_pid(path: &Path) -> Option<nix::unistd::Pid> {
    let s = fs::read_to_string(path).ok()?;
    let pid: i32 = s.trim().parse().ok()?;
    (pid > 1).then(|| nix::unistd::Pid::from_raw(pid))
}

/// Lazily unmounts every mount point at or below `dir`, deepest first.
pub fn unmount_under(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for p in points {
        let _ = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn unescape_mountinfo(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn config_toml(dir: &Path) -> String {
    let d = dir.display();
    format!(
        r#"# Written by skiff (node-agent/src/kubelet/containerd_process.rs).
version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.service.v1.diff-service"]
  default = ["walking"]
"#
    )
}
