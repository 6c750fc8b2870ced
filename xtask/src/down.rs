//! `cargo xtask down`: stops what `up` started (by the pids it recorded) and removes
//! its state directory.
//!
//! Order: the sample namespace is deleted first (bounded wait) so the agents tear its
//! pods down (containers, netns, veths, cgroups); the controllers stop, leftover pods
//! are deleted the same way; then the agents stop, then the rest of the control plane,
//! containerd and the registry. Last resort for what is still there (an agent that was
//! not running, say): the shims of this containerd (their command line names its
//! socket), processes in the cgroups /skiff/node-N of this cluster's nodes, runc state of
//! the containerd namespaces skiff-node-N, the pod netns listed in the agents' IP
//! allocation files, mounts under .skiff. Nothing is killed by name.
//!
//! Then the network (what .skiff/topology recorded, and whatever else of the local
//! cluster's topology is left): the host routes to the podCIDRs, the node netns
//! sknode-node-N with their veths, the bridge skiff0, and the nodes' bpffs directories
//! /sys/fs/bpf/skiff/node-N.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::up::{self, running_pid, state_dir};

/// Namespaces of manifests/sample-app.yaml.
const SAMPLE_NAMESPACES: &[&str] = &["demo"];
/// How long `down` waits for the agents to remove pods.
const POD_TEARDOWN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep .skiff/ (cluster state, PKI, logs) instead of deleting it.
    #[arg(long)]
    pub keep_state: bool,
}

/// Pids of the processes in process group `pgid` (that are not zombies).
fn group_members(pgid: u32) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // pid (comm) state ppid pgrp ...
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            f.first() != Some(&"Z") && f.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(pgid)
        })
        .collect()
}

/// SIGTERM to the process group `up` started (pgid = pid), then SIGKILL if any member
/// is still there after the grace period.
fn stop(name: &str, pid: u32) {
    println!("[down] stopping {name} (pid {pid})");
    let group = format!("-{pid}");
    let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
    let start = Instant::now();
    while !group_members(pid).is_empty() && start.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !group_members(pid).is_empty() {
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    }
}

/// The node names of this cluster's agents (from .skiff/agent/<node>).
fn nodes() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(state_dir().join("agent"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    v.sort();
    v
}

/// Agent pid-file names (`agent-node-N`) that have a live pid.
fn running_agents() -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = std::fs::read_dir(state_dir())
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let f = e.file_name().into_string().ok()?;
            let name = f.strip_suffix(".pid")?.to_string();
            name.starts_with("agent-").then_some(name)
        })
        .filter_map(|n| running_pid(&n).map(|p| (n, p)))
        .collect();
    v.sort();
    v
}

/// Polls `kubectl get pods <scope> -o name` until it is empty (true) or the time is up.
fn wait_no_pods(kubeconfig: &Path, scope: &[&str], deadline: Instant) -> bool {
    loop {
        let out = crate::util::output(
            up::kubectl(kubeconfig)
                .args(["get", "pods", "-o", "name"])
                .args(scope),
        );
        match out {
            Some(o) if o.trim().is_empty() => return true,
            None => return false, // the apiserver does not answer: nothing to wait for
            _ => {}
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Lets the agents remove the pods while the apiserver and they still run.
fn delete_pods(kubeconfig: &Path) {
    let deadline = Instant::now() + POD_TEARDOWN_TIMEOUT;
    for ns in SAMPLE_NAMESPACES {
        println!("[down] deleting namespace {ns} (the agents remove its pods)");
        let _ = up::kubectl(kubeconfig)
            .args([
                "delete",
                "namespace",
                ns,
                "--ignore-not-found",
                "--wait=false",
            ])
            .status();
        if !wait_no_pods(kubeconfig, &["-n", ns], deadline) {
            println!("[down] pods of {ns} still there; going on");
        }
    }
    // Controllers off, so nothing recreates what is deleted next.
    for name in ["scheduler", "controller-manager"] {
        if let Some(pid) = running_pid(name) {
            stop(name, pid);
        }
    }
    let left =
        crate::util::output(up::kubectl(kubeconfig).args(["get", "pods", "-A", "-o", "name"]))
            .unwrap_or_default();
    if !left.trim().is_empty() {
        println!("[down] deleting the remaining pods");
        let _ = up::kubectl(kubeconfig)
            .args(["delete", "pods", "--all", "-A", "--wait=false"])
            .status();
        if !wait_no_pods(kubeconfig, &["-A"], deadline) {
            println!("[down] some pods are still there; removing them by hand below");
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let kubeconfig = state_dir().join("control/admin.kubeconfig");
    let agents = running_agents();
    if !agents.is_empty() && running_pid("apiserver").is_some() && kubeconfig.exists() {
        delete_pods(&kubeconfig);
    }
    for (name, pid) in &agents {
        stop(name, *pid);
    }
    // The apiserver before etcd, so it does not log storage errors while etcd goes away.
    for name in [
        "hollow-nodes",
        "scheduler",
        "controller-manager",
        "apiserver",
        "etcd",
        "containerd",
    ] {
        if let Some(pid) = running_pid(name) {
            stop(name, pid);
        }
    }
    leftovers();
    if let Some(pid) = running_pid("registry") {
        stop("registry", pid);
    }
    remove_network();
    let dir = state_dir();
    unmount_under(&dir);
    if !args.keep_state && dir.exists() {
        std::fs::remove_dir_all(&dir)?;
        println!("[down] removed {}", dir.display());
    }
    println!("[down] done");
    Ok(())
}

/// Removes the host routes, node netns, bridge and bpffs directories of the local
/// cluster (recorded by `up` in .skiff/topology, plus the fixed names, so a missing
/// record still leaves nothing behind). Errors are reported, not fatal.
fn remove_network() {
    let topo = up::topology();
    let rec = up::recorded();
    for w in rec.iter().filter(|w| w[0] == "route" && w.len() == 3) {
        let Ok(via) = w[2].parse() else { continue };
        println!("[down] removing the route {} via {via}", w[1]);
        if let Err(e) = topo.remove_host_route(&w[1], via) {
            println!("[down] warning: {e:#}");
        }
    }
    let mut nodes: Vec<String> = rec
        .iter()
        .filter(|w| w[0] == "node" && w.len() >= 2)
        .map(|w| w[1].clone())
        .collect();
    for node in topo.nodes() {
        if !nodes.contains(&node) {
            nodes.push(node);
        }
    }
    for node in &nodes {
        if topo.netns_path(node).exists() {
            println!("[down] removing netns {}", topo.netns_name(node));
        }
        if let Err(e) = topo.remove_node(node) {
            println!("[down] warning: {e:#}");
        }
    }
    if topo.bridge_exists() {
        println!("[down] removing the bridge {}", topo.config().bridge);
    }
    if let Err(e) = topo.destroy() {
        println!("[down] warning: {e:#}");
    }
    // Pinned maps and programs: only <BPFFS_ROOT>/<node> directories.
    let root = Path::new(up::BPFFS_ROOT);
    let mut dirs: Vec<PathBuf> = rec
        .iter()
        .filter(|w| w[0] == "bpffs" && w.len() == 2)
        .map(|w| PathBuf::from(&w[1]))
        .chain(self::nodes().iter().map(|n| up::bpffs_dir(n)))
        .chain(nodes.iter().map(|n| up::bpffs_dir(n)))
        .filter(|d| d.parent() == Some(root) && d.file_name().is_some())
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in dirs {
        if d.exists() {
            println!("[down] removing {}", d.display());
            if let Err(e) = std::fs::remove_dir_all(&d) {
                println!("[down] warning: removing {}: {e}", d.display());
            }
        }
    }
    // The parent too, once nothing else (e.g. a test's node) uses it.
    let _ = std::fs::remove_dir(root);
    let _ = std::fs::remove_file(up::topology_record());
}

/// What a dead or stopped agent could leave behind, only this cluster's.
fn leftovers() {
    // Shims of this containerd (containerd 1.6's runc shim has its own process group
    // and outlives containerd): their command line has `-address <socket>`.
    let socket = up::containerd_socket();
    let socket = socket.as_os_str().as_encoded_bytes();
    for pid in all_pids() {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let a: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if a.first()
            .is_some_and(|a0| a0.ends_with(b"containerd-shim-runc-v2"))
            && a.windows(2).any(|w| w[0] == b"-address" && w[1] == socket)
        {
            println!("[down] killing leftover shim {pid}");
            kill9(pid);
        }
    }
    let nodes = nodes();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let cgroup_roots: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let fstype = post.split(' ').next()?;
            let point = pre.split(' ').nth(4)?;
            (fstype == "cgroup" || fstype == "cgroup2").then(|| PathBuf::from(unescape(point)))
        })
        .collect();
    for node in &nodes {
        // Containers still in the node's cgroups.
        for root in &cgroup_roots {
            let dir = root.join("skiff").join(node);
            if dir.exists() {
                remove_cgroup_tree(&dir);
            }
        }
        // runc state of the node's containerd namespace (runc root of the runc shim).
        let runc_root = Path::new("/run/containerd/runc").join(format!("skiff-{node}"));
        for e in std::fs::read_dir(&runc_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            let id = e.file_name().to_string_lossy().into_owned();
            let _ = Command::new("runc")
                .arg("--root")
                .arg(&runc_root)
                .args(["delete", "--force", &id])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir(&runc_root);
        // Pod netns from the agent's allocation files (<root>/ipam/<ip> holds the pod uid);
        // deleting the netns removes the veth pair and the host route with it.
        let ipam = state_dir().join("agent").join(node).join("ipam");
        for e in std::fs::read_dir(&ipam).into_iter().flatten().flatten() {
            let uid = std::fs::read_to_string(e.path()).unwrap_or_default();
            let hex: String = uid
                .chars()
                .filter(|c| c.is_ascii_hexdigit())
                .map(|c| c.to_ascii_lowercase())
                .take(12)
                .collect();
            if hex.is_empty() {
                continue;
            }
            let ns = format!("skiff-{hex}");
            if Path::new("/run/netns").join(&ns).exists() {
                println!("[down] removing leftover netns {ns}");
                let _ = Command::new("ip").args(["netns", "del", &ns]).status();
            }
        }
    }
    // /skiff itself, once no other node (e.g. a test's) uses it.
    for root in &cgroup_roots {
        let _ = std::fs::remove_dir(root.join("skiff"));
    }
}

/// Kills what is in a cgroup subtree, then removes its directories deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let mut dirs = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
        dirs.push(d);
    }
    for d in &dirs {
        for pid in std::fs::read_to_string(d.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
        {
            println!("[down] killing leftover container process {pid}");
            kill9(pid);
        }
    }
    dirs.sort_by_key(|d| std::cmp::Reverse(d.as_os_str().len()));
    for d in dirs {
        let start = Instant::now();
        // rmdir fails (EBUSY) until the killed processes are gone.
        while std::fs::remove_dir(&d).is_err()
            && d.exists()
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .collect()
}

fn kill9(pid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status();
}

/// Lazily unmounts every mount point under `dir` (container rootfs, volumes), deepest first.
fn unmount_under(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else { return };
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mounts
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.as_os_str().len()));
    points.dedup();
    for p in points {
        let _ = Command::new("umount").arg("-l").arg(&p).status();
    }
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
