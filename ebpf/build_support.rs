//! How skiff builds its eBPF object. Shared, via `#[path]`, by `cargo xtask build-ebpf`
//! (xtask/src/build_ebpf.rs) and node-agent/build.rs, so that both run the exact same
//! cargo invocation into the same target directory (`ebpf/programs/target`) and a build
//! by one is a no-op for the other.
//!
//! The command is `cargo +nightly build --release --target bpfel-unknown-none
//! -Z build-std=core` in ebpf/programs (spelled `rustup run nightly cargo ...` so that it
//! also works from inside a build script of a stable build); the linker is `bpf-linker`,
//! which is the default linker of the bpfel-unknown-none target.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

/// The toolchain the eBPF programs build with.
pub const NIGHTLY: &str = "nightly";
/// The bpf-linker release the build is tested with.
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// Target triple of the eBPF object.
pub const BPF_TARGET: &str = "bpfel-unknown-none";
/// Name of the binary target of ebpf/programs (the ELF object file).
pub const OBJECT_NAME: &str = "skiff-ebpf";

const SETUP_HINT: &str =
    "run `cargo xtask setup` (installs the nightly toolchain, rust-src and bpf-linker)";

/// `ebpf/programs` under the given `ebpf/` directory.
pub fn programs_dir(ebpf_dir: &Path) -> PathBuf {
    ebpf_dir.join("programs")
}

/// Where the object lands after [`build`].
pub fn object_path(ebpf_dir: &Path) -> PathBuf {
    programs_dir(ebpf_dir)
        .join("target")
        .join(BPF_TARGET)
        .join("release")
        .join(OBJECT_NAME)
}

/// Files and directories whose change requires a rebuild of the object.
pub fn inputs(ebpf_dir: &Path) -> Vec<PathBuf> {
    let programs = programs_dir(ebpf_dir);
    let common = ebpf_dir.join("common");
    vec![
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join("Cargo.lock"),
        common.join("src"),
        common.join("Cargo.toml"),
        ebpf_dir.join("build_support.rs"),
    ]
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rustup() -> Command {
    let mut cmd = Command::new("rustup");
    // A stable cargo/rustup proxy exports RUSTUP_TOOLCHAIN to its children; it must not
    // override the explicit nightly below.
    cmd.env_remove("RUSTUP_TOOLCHAIN");
    cmd
}

/// Checks nightly, rust-src and bpf-linker; the error says what is missing and what to run.
pub fn check_toolchain() -> Result<(), String> {
    let Some(sysroot) = output(rustup().args(["run", NIGHTLY, "rustc", "--print", "sysroot"]))
    else {
        return Err(format!(
            "the Rust {NIGHTLY} toolchain is not installed (needed to build the eBPF programs): {SETUP_HINT}"
        ));
    };
    let core_src = Path::new(sysroot.trim()).join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        return Err(format!(
            "the rust-src component of the {NIGHTLY} toolchain is missing (needed for -Z build-std=core): {SETUP_HINT}"
        ));
    }
    match output(Command::new("bpf-linker").arg("--version")) {
        None => Err(format!("bpf-linker is not on PATH: {SETUP_HINT}")),
        Some(v) if !v.contains(BPF_LINKER_VERSION) => Err(format!(
            "bpf-linker {BPF_LINKER_VERSION} is required, found `{}`: {SETUP_HINT}",
            v.trim()
        )),
        Some(_) => Ok(()),
    }
}

/// Builds ebpf/programs and returns the path of the object. `stdout_to_stderr`: send the
/// child's stdout to our stderr (build scripts must not print non-`cargo:` lines on stdout).
pub fn build(ebpf_dir: &Path, stdout_to_stderr: bool) -> Result<PathBuf, String> {
    check_toolchain()?;
    let programs = programs_dir(ebpf_dir);
    let mut cmd = rustup();
    cmd.current_dir(&programs)
        .args(["run", NIGHTLY, "cargo", "build", "--release"])
        .args(["--target", BPF_TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(programs.join("target"))
        // Nothing from an outer (stable) cargo may leak into the nightly eBPF build:
        // clippy's wrapper, a pinned rustc, host rustflags, an outer target dir.
        .env("CARGO_ENCODED_RUSTFLAGS", "")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTDOC")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_BUILD_RUSTFLAGS");
    if stdout_to_stderr {
        cmd.stdout(std::io::stderr());
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run `rustup run {NIGHTLY} cargo`: {e}; {SETUP_HINT}"))?;
    if !status.success() {
        return Err(format!(
            "building the eBPF programs in {} failed ({status}); see the cargo output above. \
             If the toolchain is broken, {SETUP_HINT}",
            programs.display()
        ));
    }
    let object = object_path(ebpf_dir);
    if !object.is_file() {
        return Err(format!(
            "the eBPF build succeeded but {} does not exist",
            object.display()
        ));
    }
    Ok(object)
}
