//! `cargo xtask down`: stops what `up` started (by the pids it recorded) and removes
//! its state directory.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::up::{running_pid, state_dir};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep .skiff/ (cluster state, PKI, logs) instead of deleting it.
    #[arg(long)]
    pub keep_state: bool,
}

/// SIGTERM to the process group `up` started (pgid = pid), then SIGKILL if the leader
/// has not exited within the grace period.
fn stop(name: &str, pid: u32) {
    println!("[down] stopping {name} (pid {pid})");
    let group = format!("-{pid}");
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    }
}

pub fn run(args: &Args) -> Result<()> {
    // The apiserver first, so it does not log storage errors while etcd goes away.
    for name in [
        "hollow-nodes",
        "scheduler",
        "controller-manager",
        "apiserver",
        "etcd",
    ] {
        if let Some(pid) = running_pid(name) {
            stop(name, pid);
        }
    }
    let dir = state_dir();
    if !args.keep_state && dir.exists() {
        std::fs::remove_dir_all(&dir)?;
        println!("[down] removed {}", dir.display());
    }
    println!("[down] done");
    Ok(())
}
