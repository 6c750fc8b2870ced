//! `cargo xtask build-ebpf`: builds ebpf/programs with
//! `cargo +nightly build --release --target bpfel-unknown-none -Z build-std=core`
//! (bpf-linker links). The command itself lives in ebpf/build_support.rs, shared with
//! node-agent/build.rs, so both produce the same object in ebpf/programs/target.

#[path = "../../ebpf/build_support.rs"]
#[allow(dead_code)] // shared with node-agent/build.rs, which uses `inputs`
mod build_support;

use std::{path::PathBuf, time::Instant};

use anyhow::{Result, anyhow};

use crate::util;

#[derive(clap::Args)]
pub struct Args {}

/// Builds the object and returns its path.
pub fn run(_args: &Args) -> Result<PathBuf> {
    let ebpf_dir = util::root().join("ebpf");
    eprintln!(
        "[build-ebpf] building {}",
        build_support::programs_dir(&ebpf_dir).display()
    );
    let started = Instant::now();
    let object = build_support::build(&ebpf_dir, false).map_err(|e| anyhow!(e))?;
    let size = std::fs::metadata(&object).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "[build-ebpf] object: {} ({size} bytes, {:.1}s)",
        object.display(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", object.display());
    Ok(object)
}
