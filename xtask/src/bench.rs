//! `cargo xtask bench <name> [args...]`: runs one of skiff's benchmarks.
//!
//! Each bench is a `harness = false` cargo bench target, so it builds with the bench
//! (release) profile; xtask only forwards arguments and does not link skiff crates.
//! Benches listed in [`NEEDS_RELEASE_BINS`] run the skiff binaries of target/release,
//! which xtask builds first (`cargo build --release -p skiff-agent -p skiff-control --bins`).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// (name, cargo package, bench target, what it measures)
const BENCHES: &[(&str, &str, &str, &str)] = &[
    (
        "api",
        "skiff-control",
        "api",
        "apiserver create/list/watch fan-out, embedded store vs etcd \
         (args: --quick, --objects N, --updates M, --watchers W)",
    ),
    (
        "scheduler",
        "skiff-control",
        "scheduler",
        "pods bound per second and Deployment-to-Ready time on hollow nodes \
         (args: --pods N (1000), --nodes M (100))",
    ),
    (
        "pods",
        "skiff-tests",
        "pods",
        "pod create -> Running p50/p99/max on one skiff-agent, agent idle RSS \
         (args: --pods N (50); runs the binaries of target/release, which xtask builds first)",
    ),
    (
        "pod-network",
        "skiff-tests",
        "pod_network",
        "iperf3 Gbit/s and TCP_RR p50/p99, pod-to-pod on one node and across nodes vs \
         node-to-node over the bridge, with ratios (args: --quick; 2 nodes, eBPF data path)",
    ),
    (
        "programming",
        "skiff-tests",
        "programming",
        "EndpointSlice write -> service map updated on every node, p50/p99/max at 10, 1k and \
         10k Services on 3 nodes (args: --quick (10, 100), --changes M (100), \
         --budget-minutes M (15))",
    ),
];

/// Benches that start skiff-agent / skiff-control binaries from target/release.
const NEEDS_RELEASE_BINS: &[&str] = &["pods", "pod-network", "programming"];

pub fn run(args: &[String]) -> Result<()> {
    let Some((name, rest)) = args.split_first() else {
        bail!("which bench?\n{}", available());
    };
    let Some(&(_, package, target, _)) = BENCHES.iter().find(|b| b.0 == name) else {
        bail!("unknown bench {name:?}\n{}", available());
    };
    // The same cargo that runs xtask, from the workspace root (parent of xtask/).
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?;
    if NEEDS_RELEASE_BINS.contains(&name.as_str()) {
        let mut build = Command::new(&cargo);
        build.current_dir(root).args([
            "build",
            "--release",
            "-p",
            "skiff-agent",
            "-p",
            "skiff-control",
            "-p",
            "skiff-shim",
            "--bins",
        ]);
        let status = build
            .status()
            .with_context(|| format!("cannot start {build:?}"))?;
        if !status.success() {
            bail!("building the release binaries for bench {name} failed ({status}): {build:?}");
        }
    }
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args(["bench", "-p", package, "--bench", target, "--"])
        .args(rest);
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("bench {name} failed ({status}): {cmd:?}");
    }
    Ok(())
}

fn available() -> String {
    let mut out = String::from("available benches:");
    for (name, _, _, about) in BENCHES {
        out.push_str(&format!("\n  {name:<12} {about}"));
    }
    out
}
