//! The kubelet's container runtime against a real containerd (Debian 1.6 + runc).
//!
//! Everything is private to this test and removed by Drop guards, also on failure:
//!   /tmp/skiff-crt-<pid>/{containerd,registry,layout,logs}, containerd on a socket in
//!   there, docker-registry on 127.0.0.1:<free port>, netns skiff-crt-<pid>, cgroups under
//!   /skiff/t<pid>.
//! Flow: build a busybox-static OCI image in Rust, push it to the local registry, pull it
//! through containerd's content/diff/snapshot services, run containers in a netns with
//! the per-node cgroup parent, log to a file (and to FIFOs read here), stop (SIGTERM, and
//! SIGKILL after the grace period), delete, and check that nothing is left; then remove
//! the image and check containerd's GC takes its snapshot. Needs root and the packages from
//! `cargo xtask setup`: CI runs as root, so this fails (not skips) without them.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use skiff_agent::kubelet::{
    containerd_process::{ContainerdProcess, unmount_under},
    oci_runtime::{OciRuntime, OciRuntimeChoice, SKIFF_SHIM_BIN},
    runtime::{
        ContainerConfig, ContainerState, PullPolicy, Runtime, RuntimeError, TaskIo, cgroup_dirs,
        remove_cgroup_tree,
    },
    test_images::{LocalRegistry, busybox_image},
};

/// Removes what the test made outside the daemons' own directories. Declared first in the
/// test so it drops last (after containerd and the registry are stopped).
struct Cleanup {
    dir: PathBuf,
    netns: String,
    node_cgroup: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .output();
        let _ = remove_cgroup_tree(&self.node_cgroup);
        // The shared /skiff parent goes only when no other node uses it (rmdir of empty dirs).
        for d in cgroup_dirs("/skiff") {
            let _ = fs::remove_dir(d);
        }
        unmount_under(&self.dir);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn must_run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn wait_for_log(path: &Path, needle: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let s = fs::read_to_string(path).unwrap_or_default();
        if s.contains(needle) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in {} after {timeout:?}; it has:\n{s}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Through skiff's shim (`--container-shim skiff`, the agent's default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runtime_end_to_end_skiff_shim() {
    containerd_runtime_end_to_end(true).await;
}

/// Through containerd's runc shim (`--container-shim runc`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_runtime_end_to_end_runc_shim() {
    containerd_runtime_end_to_end(false).await;
}

/// skiff's shim, built next to this test's directory (target/<profile>/).
fn skiff_shim() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let shim = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .join(SKIFF_SHIM_BIN);
    assert!(
        shim.is_file(),
        "{} is missing: run `cargo build -p skiff-shim` (cargo test --workspace builds it)",
        shim.display()
    );
    shim
}

async fn containerd_runtime_end_to_end(through_skiff_shim: bool) {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (CI runs as root)"
    );
    for bin in [
        "/usr/bin/containerd",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/usr/bin/docker-registry",
        "/bin/busybox",
    ] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: run `cargo xtask setup`"
        );
    }
    // Both variants run at once in this process: names carry the shim.
    let pid = format!(
        "{}{}",
        std::process::id(),
        if through_skiff_shim { "s" } else { "r" }
    );
    let node = format!("t{pid}");
    let dir = PathBuf::from(format!("/tmp/skiff-crt-{pid}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    let netns = format!("skiff-crt-{pid}");
    let _cleanup = Cleanup {
        dir: dir.clone(),
        netns: netns.clone(),
        node_cgroup: format!("/skiff/{node}"),
    };

    // --- image: build, write as OCI layout, push to a local registry.
    let registry = LocalRegistry::start(dir.join("registry")).expect("start docker-registry");
    let t = Instant::now();
    let image = busybox_image().expect("build busybox image");
    image
        .write_layout(dir.join("layout"), "latest")
        .expect("write OCI layout");
    let build_ms = t.elapsed().as_millis();
    let image_ref = registry.image_ref("skiff/busybox:latest");
    let t = Instant::now();
    image.push(&image_ref).await.expect("push image");
    println!(
        "image: layer {} KiB gz, built in {build_ms} ms, pushed to {image_ref} in {} ms",
        image.layer.len() / 1024,
        t.elapsed().as_millis()
    );

    // --- containerd.
    let t = Instant::now();
    let containerd = ContainerdProcess::start(dir.join("containerd")).expect("start containerd");
    println!(
        "containerd: up in {} ms (pid {:?})",
        t.elapsed().as_millis(),
        containerd.pid()
    );
    // The agent's default: crun where it works (`cargo xtask setup` makes it work here).
    let (mut oci, why_runc) = OciRuntime::choose(OciRuntimeChoice::Auto).unwrap();
    if through_skiff_shim {
        oci = oci.with_shim(skiff_shim());
    }
    println!(
        "OCI runtime: {} {}",
        oci.binary.display(),
        why_runc.unwrap_or_default()
    );
    let rt = Runtime::connect(containerd.socket(), &node)
        .await
        .expect("connect to containerd")
        .with_oci_runtime(oci.clone());
    println!(
        "containerd version {}, namespace {}",
        rt.version().await.unwrap(),
        rt.namespace()
    );
    let insecure = vec![registry.host()];

    // --- a missing image: the error carries the registry's answer.
    let missing = registry.image_ref("skiff/missing:latest");
    let err = rt
        .pull(&missing, &insecure)
        .await
        .expect_err("pulling a missing image must fail");
    let msg = err.to_string();
    println!("missing image error: {msg}");
    assert!(matches!(err, RuntimeError::Pull { .. }), "{err:?}");
    assert!(
        msg.contains("manifest unknown") || msg.contains("MANIFEST_UNKNOWN") || msg.contains("404"),
        "error does not carry the registry's answer: {msg}"
    );

    // --- pull, then IfNotPresent finds it.
    let t = Instant::now();
    let info = rt.pull(&image_ref, &insecure).await.expect("pull busybox");
    let pull_ms = t.elapsed().as_millis();
    assert_eq!(info.manifest_digest, image.manifest_digest);
    assert_eq!(
        info.chain_id, image.diff_id,
        "one layer: chain ID = diff ID"
    );
    assert_eq!(info.config.cmd, ["sh"]);
    let t = Instant::now();
    let again = rt
        .ensure_image(&image_ref, &insecure, PullPolicy::IfNotPresent)
        .await
        .expect("ensure_image");
    println!(
        "pull: {pull_ms} ms; ensure_image(IfNotPresent) on a present image: {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(again.chain_id, info.chain_id);
    assert_eq!(rt.list_images().await.unwrap(), vec![info.name.clone()]);
    let snaps = rt.list_snapshots().await.unwrap();
    assert_eq!(snaps.len(), 1, "one committed layer snapshot: {snaps:?}");
    assert_eq!(snaps[0].name, info.chain_id);

    // --- a netns with only lo.
    must_run(&["ip", "netns", "add", &netns]);
    let netns_path = PathBuf::from(format!("/run/netns/{netns}"));

    // --- container 1: traps SIGTERM, prints its env and its interfaces.
    let pod = format!("pod-{pid}");
    let log1 = dir.join("logs/c1.log");
    let cg1 = rt.cgroups_path("pod1", "c1");
    let mut c1 = ContainerConfig::new("c1", &image_ref, &cg1, TaskIo::File(log1.clone()));
    c1.command = vec!["sh".into(), "-c".into()];
    c1.args = vec!["trap 'echo got-TERM; exit 143' TERM; echo hello-$POD; ls /sys/class/net; echo ifaces-done; sleep 30 & wait".into()];
    c1.env = vec![("POD".into(), pod.clone())];
    c1.netns_path = Some(netns_path.clone());
    c1.hostname = Some("pod1".into());
    c1.labels = HashMap::from([("skiff.io/pod".to_string(), "pod1".to_string())]);
    let t = Instant::now();
    let pid1 = rt.run_container(&c1).await.expect("run c1");
    let start_ms = t.elapsed().as_millis();
    let log = wait_for_log(&log1, "ifaces-done", Duration::from_secs(10)).await;
    println!(
        "c1: create+start {start_ms} ms, first output after {} ms; log:\n{log}",
        t.elapsed().as_millis()
    );
    assert!(log.contains(&format!("hello-{pod}")), "{log}");
    let ifaces: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.starts_with("hello-"))
        .skip(1)
        .take_while(|l| *l != "ifaces-done")
        .collect();
    assert_eq!(
        ifaces,
        ["lo"],
        "the container sees the netns's interfaces only"
    );
    // Same network namespace as /run/netns/<name>, by inode.
    let ns_ino = fs::metadata(&netns_path).unwrap().ino();
    let proc_ns = fs::read_link(format!("/proc/{pid1}/ns/net")).unwrap();
    assert_eq!(proc_ns.to_string_lossy(), format!("net:[{ns_ino}]"));
    assert_eq!(
        rt.status("c1").await.unwrap(),
        ContainerState::Running { pid: pid1 }
    );
    // The chosen OCI runtime ran it: its own state of c1 is in the shim's runtime root
    // (crun cannot read runc's state, so this fails if the shim ignored the options).
    let oci_root = format!("/run/containerd/runc/{}", rt.namespace());
    let state = Command::new(&oci.binary)
        .args(["--root", &oci_root, "state", "c1"])
        .output()
        .expect("run the OCI runtime");
    let state_json = String::from_utf8_lossy(&state.stdout);
    assert!(
        state.status.success() && state_json.contains(r#""status": "running""#),
        "{} state c1: {state_json} {}",
        oci.binary.display(),
        String::from_utf8_lossy(&state.stderr)
    );
    // cgroup: the per-node parent, in the v2 hierarchy too.
    let dirs1 = cgroup_dirs(&cg1);
    let existing: Vec<&PathBuf> = dirs1.iter().filter(|d| d.exists()).collect();
    println!("c1 cgroup dirs: {existing:?}");
    assert!(!existing.is_empty(), "no cgroup dir for {cg1}");
    let v2 = dirs1
        .iter()
        .find(|d| d.starts_with("/sys/fs/cgroup/unified"))
        .expect("v2 hierarchy mounted");
    let procs =
        fs::read_to_string(v2.join("cgroup.procs")).expect("container cgroup in the v2 hierarchy");
    assert!(
        procs.lines().any(|l| l == pid1.to_string()),
        "pid {pid1} not in {}: {procs}",
        v2.display()
    );
    // Adoption view.
    let listed = rt.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, "c1");
    assert_eq!(
        listed[0].labels.get("skiff.io/pod").map(String::as_str),
        Some("pod1")
    );
    assert_eq!(listed[0].image, info.name);

    // --- container 2: plain sleep as pid 1 ignores SIGTERM -> SIGKILL after the grace period.
    let log2 = dir.join("logs/c2.log");
    let cg2 = rt.cgroups_path("pod1", "c2");
    let mut c2 = ContainerConfig::new("c2", &image_ref, &cg2, TaskIo::File(log2.clone()));
    c2.command = vec!["sleep".into(), "30".into()];
    c2.netns_path = Some(netns_path.clone());
    let t = Instant::now();
    rt.run_container(&c2).await.expect("run c2");
    println!("c2: create+start {} ms", t.elapsed().as_millis());

    // --- stop: c1 exits 143 from its trap, c2 is killed after 1 s.
    let t = Instant::now();
    let code1 = rt
        .stop("c1", Duration::from_secs(10))
        .await
        .expect("stop c1");
    println!(
        "c1: SIGTERM -> exit {code1} in {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(code1, 143);
    wait_for_log(&log1, "got-TERM", Duration::from_secs(5)).await;
    assert_eq!(
        rt.status("c1").await.unwrap(),
        ContainerState::Exited { exit_code: 143 }
    );
    let t = Instant::now();
    let code2 = rt
        .stop("c2", Duration::from_secs(1))
        .await
        .expect("stop c2");
    let stop2 = t.elapsed();
    println!(
        "c2: SIGTERM ignored, SIGKILL -> exit {code2} after {} ms",
        stop2.as_millis()
    );
    assert_eq!(code2, 137);
    assert!(stop2 >= Duration::from_secs(1));

    // --- container 3: stdout and stderr through FIFOs the agent reads (for CRI-format logs).
    let fifo_out = dir.join("logs/c3.stdout");
    let fifo_err = dir.join("logs/c3.stderr");
    for f in [&fifo_out, &fifo_err] {
        nix::unistd::mkfifo(f, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    }
    let readers: Vec<_> = [fifo_out.clone(), fifo_err.clone()]
        .into_iter()
        .map(|f| std::thread::spawn(move || fs::read_to_string(f).unwrap()))
        .collect();
    let mut c3 = ContainerConfig::new(
        "c3",
        &image_ref,
        rt.cgroups_path("pod1", "c3"),
        TaskIo::Fifos {
            stdout: fifo_out,
            stderr: fifo_err,
        },
    );
    c3.command = vec![
        "sh".into(),
        "-c".into(),
        "echo out-line; echo err-line >&2; exit 3".into(),
    ];
    rt.run_container(&c3).await.expect("run c3");
    assert_eq!(rt.wait("c3").await.unwrap(), 3);
    let outputs: Vec<String> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert_eq!(outputs, ["out-line\n", "err-line\n"], "stdout, stderr");
    rt.delete("c3").await.expect("delete c3");

    // --- delete and check nothing is left.
    let t = Instant::now();
    rt.delete("c1").await.expect("delete c1");
    rt.delete("c2").await.expect("delete c2");
    println!("delete both: {} ms", t.elapsed().as_millis());
    rt.delete("c1").await.expect("deleting twice is fine");
    assert!(matches!(
        rt.status("c1").await,
        Err(RuntimeError::ContainerNotFound(_))
    ));
    assert!(rt.list().await.unwrap().is_empty(), "containers left");
    let snaps = rt.list_snapshots().await.unwrap();
    assert_eq!(
        snaps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        [info.chain_id.as_str()],
        "container snapshots left"
    );
    for d in cgroup_dirs(&cg1).into_iter().chain(cgroup_dirs(&cg2)) {
        assert!(!d.exists(), "cgroup {} left after delete", d.display());
    }
    remove_cgroup_tree(&rt.cgroup_parent()).expect("remove the node's cgroup parent");
    for d in cgroup_dirs(&rt.cgroup_parent()) {
        assert!(!d.exists(), "cgroup {} left", d.display());
    }
    let bundles = dir
        .join("containerd/state/io.containerd.runtime.v2.task")
        .join(rt.namespace());
    let left: Vec<_> = fs::read_dir(&bundles)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "task bundles left: {left:?}");

    // --- removing the image lets containerd's GC take its snapshot and content.
    rt.remove_image(&image_ref).await.expect("remove image");
    assert!(rt.list_images().await.unwrap().is_empty());
    assert!(
        rt.list_snapshots().await.unwrap().is_empty(),
        "image snapshot not collected"
    );
    let info2 = rt
        .ensure_image(&image_ref, &insecure, PullPolicy::IfNotPresent)
        .await
        .expect("pull again");
    assert_eq!(info2.chain_id, info.chain_id);

    drop(containerd);
    drop(registry);
}
