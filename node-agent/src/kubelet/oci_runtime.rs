//! Which containerd shim runs the containers — skiff's (`containerd-shim-skiff-v1`, crate
//! skiff-shim; the default, `--container-shim`) or containerd's runc v2 shim — and which
//! OCI runtime binary the shim runs: crun where it works, else runc (`--oci-runtime`).
//!
//! Why: most of a pod's start on a small node is CPU in processes outside the agent, and
//! runc is the largest part of it (a Go binary run several times per container, and it
//! re-executes itself as the container's init). crun (C) does the same from the same OCI
//! spec in about a third of the CPU (`cargo xtask bench pods`: p50 2.2 s -> 1.6-1.8 s for 50
//! pods at once on 2 cores). Both take the same command line, so the shim is told the
//! binary through its options (`containerd.runc.v1.Options.binary_name`, as containerd's
//! CRI plugin does with `BinaryName`).
//!
//! crun refuses the hybrid cgroup layout (v1 controllers, plus a cgroup2 hierarchy at
//! /sys/fs/cgroup/unified) when the cgroup2 hierarchy has controllers of its own
//! ("cgroups in hybrid mode not supported, drop all controllers from cgroupv2").
//! `cargo xtask setup` moves such controllers to v1 hierarchies; where that was not done,
//! `auto` picks runc and says why.

use std::path::{Path, PathBuf};

/// `--oci-runtime`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum OciRuntimeChoice {
    /// crun when it is installed and supports this host's cgroup layout, else runc.
    #[default]
    Auto,
    Crun,
    Runc,
}

/// The OCI runtime binary the shim runs, and which shim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRuntime {
    /// Binary name or path, as the shim's `BinaryName`.
    pub binary: PathBuf,
    /// skiff's own shim (`containerd-shim-skiff-v1`, crate skiff-shim) by absolute path,
    /// or None for containerd's runc v2 shim.
    pub shim: Option<PathBuf>,
}

impl Default for OciRuntime {
    /// runc through containerd's runc shim.
    fn default() -> Self {
        OciRuntime {
            binary: PathBuf::from("runc"),
            shim: None,
        }
    }
}

/// skiff's shim binary, installed next to skiff-agent.
pub const SKIFF_SHIM_BIN: &str = "containerd-shim-skiff-v1";

/// `--container-shim`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ShimChoice {
    /// containerd's runc v2 shim (`io.containerd.runc.v2`).
    Runc,
    /// skiff's shim (`containerd-shim-skiff-v1` next to skiff-agent).
    #[default]
    Skiff,
}

/// The runc v2 shim's options message (containerd runtime/v2/runc/options/oci.proto);
/// only the field skiff sets.
#[derive(Clone, PartialEq, prost::Message)]
struct RuncShimOptions {
    #[prost(string, tag = "6")]
    binary_name: String,
}

const RUNC_SHIM_OPTIONS_TYPE: &str = "containerd.runc.v1.Options";

impl OciRuntime {
    /// The runtime name of the container record: the shim's path, or containerd's runc
    /// v2 shim.
    pub fn runtime_name(&self) -> String {
        match &self.shim {
            Some(path) => path.display().to_string(),
            None => super::runtime::RUNTIME_NAME.to_string(),
        }
    }

    /// Runs containers through skiff's shim at `path` (absolute).
    pub fn with_shim(mut self, path: PathBuf) -> Self {
        self.shim = Some(path);
        self
    }

    /// The container's runtime options for containerd; None for runc (the shim's default).
    pub fn shim_options(&self) -> Option<prost_types::Any> {
        if self.is_runc() {
            return None;
        }
        let opts = RuncShimOptions {
            binary_name: self.binary.to_string_lossy().into_owned(),
        };
        Some(prost_types::Any {
            type_url: RUNC_SHIM_OPTIONS_TYPE.into(),
            value: prost::Message::encode_to_vec(&opts),
        })
    }

    fn is_runc(&self) -> bool {
        self.binary.file_name().is_some_and(|n| n == "runc")
    }

    /// Resolves `--oci-runtime`. `Err` only when crun was asked for and cannot run here;
    /// for `auto` the second value says why runc was picked (for the log).
    pub fn choose(choice: OciRuntimeChoice) -> Result<(OciRuntime, Option<String>), String> {
        let runc = OciRuntime::default();
        match choice {
            OciRuntimeChoice::Runc => Ok((runc, None)),
            OciRuntimeChoice::Crun => crun_here().map(|c| (c, None)),
            OciRuntimeChoice::Auto => Ok(match crun_here() {
                Ok(c) => (c, None),
                Err(why) => (runc, Some(why)),
            }),
        }
    }
}

/// crun if it is on PATH and this host's cgroup layout is one it supports.
fn crun_here() -> Result<OciRuntime, String> {
    let binary = find_on_path("crun").ok_or_else(|| {
        "crun is not installed (run `cargo xtask setup`, or apt-get install crun)".to_string()
    })?;
    if let Some(controllers) = hybrid_cgroup2_controllers(Path::new("/sys/fs/cgroup")) {
        return Err(format!(
            "crun cannot run in this hybrid cgroup layout: the cgroup2 hierarchy at \
             /sys/fs/cgroup/unified has controllers ({}); mount them as cgroup v1 \
             hierarchies (`cargo xtask setup` does) to use crun",
            controllers.join(" ")
        ));
    }
    Ok(OciRuntime { binary, shim: None })
}

/// In the hybrid layout (tmpfs at `root`, cgroup2 at `root`/unified): the cgroup2
/// hierarchy's controllers, if it has any. None for pure v1 or v2 hosts.
pub fn hybrid_cgroup2_controllers(root: &Path) -> Option<Vec<String>> {
    let unified = root.join("unified");
    if !is_cgroup2(&unified) || is_cgroup2(root) {
        return None;
    }
    let list = std::fs::read_to_string(unified.join("cgroup.controllers")).ok()?;
    let controllers: Vec<String> = list.split_whitespace().map(str::to_owned).collect();
    (!controllers.is_empty()).then_some(controllers)
}

fn is_cgroup2(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_sends_no_options_crun_names_its_binary() {
        assert_eq!(OciRuntime::default().shim_options(), None);
        let crun = OciRuntime {
            binary: "/usr/bin/crun".into(),
            shim: None,
        };
        let any = crun.shim_options().expect("options for crun");
        assert_eq!(any.type_url, "containerd.runc.v1.Options");
        // field 6, length-delimited, then the path.
        let mut want = vec![0x32, 13];
        want.extend_from_slice(b"/usr/bin/crun");
        assert_eq!(any.value, want);
    }

    #[test]
    fn runc_is_always_available_to_choose() {
        let (rt, why) = OciRuntime::choose(OciRuntimeChoice::Runc).unwrap();
        assert_eq!(rt, OciRuntime::default());
        assert!(why.is_none());
    }
}
