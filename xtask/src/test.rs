//! `cargo xtask test [-- <cargo test args>]`: everything CI checks, in order, stopping at
//! the first failure: setup, build-ebpf, `cargo fmt --all --check`,
//! `cargo clippy --workspace --all-targets -- -D warnings`, `cargo test --workspace`,
//! then the benchmarks at smoke size.
//! Tests get `SKIFF_KUBECTL_LATEST` = the PyPI kubectl installed by setup.

use anyhow::{Context, Result};

use crate::{build_ebpf, setup, util};

#[derive(clap::Args)]
pub struct Args {
    /// Extra arguments for `cargo test --workspace` (after `--`).
    #[arg(last = true)]
    pub cargo_test_args: Vec<String>,
}

pub fn run(args: &Args) -> Result<()> {
    step("setup", || setup::run(&setup::Args::default()))?;
    step("build-ebpf", || {
        build_ebpf::run(&build_ebpf::Args {}).map(|_| ())
    })?;
    let kubectl = setup::kubectl_latest_path()?;
    step("cargo fmt --all --check", || {
        util::run_cmd("cargo fmt", util::cargo().args(["fmt", "--all", "--check"]))
            .context("formatting differs: run `cargo fmt --all`")
    })?;
    step("cargo clippy", || {
        util::run_cmd(
            "cargo clippy",
            util::cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )
    })?;
    step("cargo test", || {
        util::run_cmd(
            "cargo test",
            util::cargo()
                .args(["test", "--workspace"])
                .args(&args.cargo_test_args)
                .env("SKIFF_KUBECTL_LATEST", &kubectl),
        )
    })?;
    // The benchmarks at smoke size: they assert what they measure (list counts, watch
    // delivery order, every pod bound and Ready), so a broken path fails CI, not just
    // the bench. --workspace keeps the feature resolution of the step above (no rebuild).
    step("benches (smoke size)", || {
        util::run_cmd(
            "cargo test --benches",
            util::cargo().args(["test", "--workspace", "--benches"]),
        )
    })?;
    eprintln!("[test] all steps passed");
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("[test] ==> {name}");
    f().with_context(|| format!("[test] step `{name}` failed"))
}
