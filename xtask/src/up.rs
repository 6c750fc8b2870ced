//! `cargo xtask up`: the main job. Installs what is missing, starts the control plane
//! (apiserver on the embedded store, or on a local etcd with `--etcd`) in the
//! background, applies the sample workload and prints how to use kubectl.
//! Everything it starts is recorded under .skiff/ so `cargo xtask down` can stop it by pid.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{setup, util};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep cluster state in a local etcd (Debian etcd-server) instead of the embedded store.
    #[arg(long)]
    pub etcd: bool,
    /// HTTPS port of the apiserver.
    #[arg(long, default_value_t = 6443)]
    pub port: u16,
    /// Do not apply manifests/sample-app.yaml.
    #[arg(long)]
    pub no_sample: bool,
    /// Hollow nodes to register (kubemark-style: the API behaviour of a kubelet, no
    /// containers) until skiff-agent joins real nodes.
    #[arg(long, default_value_t = 3)]
    pub hollow_nodes: usize,
}

/// Where `up` keeps state, logs and pid files (removed by `down`).
pub fn state_dir() -> PathBuf {
    util::root().join(".skiff")
}

fn pid_file(name: &str) -> PathBuf {
    state_dir().join(format!("{name}.pid"))
}

/// The pid recorded for `name`, if that process is still alive.
pub fn running_pid(name: &str) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(name))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

/// Starts `cmd` detached (own process group, output to a log) and records its pid.
fn spawn_daemon(name: &str, cmd: &mut Command) -> Result<u32> {
    use std::os::unix::process::CommandExt;
    let log = state_dir().join(format!("{name}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {name}: {cmd:?}"))?;
    std::fs::write(pid_file(name), child.id().to_string())?;
    Ok(child.id())
}

/// Waits (bounded) until `name`'s log contains `needle`; fails with the log's tail.
fn wait_for_log(name: &str, pid: u32, needle: &str, timeout: Duration) -> Result<String> {
    let log = state_dir().join(format!("{name}.log"));
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(text);
        }
        if !Path::new(&format!("/proc/{pid}")).exists() || start.elapsed() > timeout {
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{name} did not start (see {}):\n{}",
                log.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run(args: &Args) -> Result<()> {
    setup::run(&setup::Args {
        refresh_kubectl: false,
    })?;
    let dir = state_dir();
    std::fs::create_dir_all(&dir)?;
    if let Some(pid) = running_pid("apiserver") {
        println!(
            "[up] the control plane is already running (apiserver pid {pid}); `cargo xtask down` stops it"
        );
        print_usage(&dir.join("control/admin.kubeconfig"));
        return Ok(());
    }

    println!("[up] building the control plane");
    util::run_cmd(
        "cargo build",
        util::cargo().args([
            "build",
            "--quiet",
            "-p",
            "skiff-control",
            "--bin",
            "skiff-apiserver",
            "--bin",
            "skiff-controller-manager",
            "--bin",
            "skiff-scheduler",
            "--bin",
            "skiff-hollow-nodes",
        ]),
    )?;
    let bin = util::root().join("target/debug/skiff-apiserver");

    let mut apiserver = Command::new(&bin);
    apiserver
        .args(["--data-dir"])
        .arg(dir.join("control"))
        .args([
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            &args.port.to_string(),
        ]);
    if args.etcd {
        let endpoint = start_etcd(&dir)?;
        apiserver.args(["--etcd-servers", &endpoint]);
    }
    println!(
        "[up] starting the apiserver on https://127.0.0.1:{}",
        args.port
    );
    let pid = spawn_daemon("apiserver", &mut apiserver)?;
    let log = wait_for_log("apiserver", pid, "kubeconfig: ", Duration::from_secs(60))?;
    let kubeconfig = log
        .lines()
        .find_map(|l| l.strip_prefix("kubeconfig: "))
        .map(PathBuf::from)
        .context("apiserver log has no kubeconfig line")?;

    // The controller-manager and scheduler exit when they lose their Lease (e.g. the
    // apiserver restarted); a small shell loop is each one's supervisor. `down` stops
    // the whole process group.
    for component in ["controller-manager", "scheduler"] {
        println!("[up] starting the {component}");
        let bin = util::root().join(format!("target/debug/skiff-{component}"));
        spawn_daemon(
            component,
            Command::new("sh").args([
                "-c",
                "while :; do \"$0\" --kubeconfig \"$1\"; sleep 1; done",
                &bin.to_string_lossy(),
                &kubeconfig.to_string_lossy(),
            ]),
        )?;
    }
    if args.hollow_nodes > 0 {
        println!(
            "[up] registering {} hollow nodes (no containers run on them)",
            args.hollow_nodes
        );
        let pid = spawn_daemon(
            "hollow-nodes",
            Command::new(util::root().join("target/debug/skiff-hollow-nodes"))
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["--count", &args.hollow_nodes.to_string()]),
        )?;
        wait_for_log("hollow-nodes", pid, "running", Duration::from_secs(60))?;
    }

    if !args.no_sample {
        let manifest = util::root().join("manifests/sample-app.yaml");
        println!("[up] applying {}", manifest.display());
        util::run_cmd(
            "kubectl apply",
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["apply", "-f"])
                .arg(&manifest),
        )?;
    }
    print_usage(&kubeconfig);
    Ok(())
}

fn start_etcd(dir: &Path) -> Result<String> {
    const CLIENT: &str = "http://127.0.0.1:23790";
    if running_pid("etcd").is_some() {
        return Ok(CLIENT.into());
    }
    println!("[up] starting etcd on {CLIENT}");
    let pid = spawn_daemon(
        "etcd",
        Command::new("etcd")
            .args(["--name", "skiff", "--data-dir"])
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                CLIENT,
                "--advertise-client-urls",
                CLIENT,
                "--listen-peer-urls",
                "http://127.0.0.1:23800",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:23800",
                "--initial-cluster",
                "skiff=http://127.0.0.1:23800",
            ]),
    )?;
    wait_for_log(
        "etcd",
        pid,
        "ready to serve client requests",
        Duration::from_secs(30),
    )?;
    Ok(CLIENT.into())
}

fn print_usage(kubeconfig: &Path) {
    println!();
    println!("skiff control plane is up. Use it with the real kubectl:");
    println!("  export KUBECONFIG={}", kubeconfig.display());
    println!("  kubectl get namespaces");
    println!("  kubectl get all -n demo");
    println!(
        "ReplicaSets create Pods; they stay Pending until the scheduler and node agents join."
    );
    println!("Stop everything with: cargo xtask down");
}
