//! Static pods seen through the API, end to end: a pod manifest in a skiff-agent's
//! --manifest-dir runs on real containerd, and its mirror pod `<pod>-<node>` is what
//! `kubectl logs` and `kubectl exec` (real kubectl, through the apiserver's pods/log and
//! pods/exec proxy to the agent's kubelet API) reach, also after the mirror pod was
//! deleted through the API and recreated by the agent without restarting the container.
//!
//! Processes: skiff-apiserver, skiff-controller-manager (the node's podCIDR), one
//! containerd, a local registry with busybox and one skiff-agent (node `static-node`,
//! cgroup parent /skiff/static-node). No scheduler: static pods are not scheduled.
//!
//! Binaries: the ones next to this test's executable (target/<profile>/); run
//! `cargo build -p skiff-agent -p skiff-control --bins` first (`cargo xtask test` does).
//! Needs root and the packages of `cargo xtask setup`; CI runs as root, so it fails
//! rather than skips. Everything it creates (processes, netns, veths, cgroups, files under
//! /tmp/skiff-sp-<pid>) is removed by Drop guards, by pid and by name, also on failure.

use std::{
    fs,
    time::{Duration, Instant},
};

use serde_json::Value;
#[path = "support/mod.rs"]
mod support;
use skiff_agent::kubelet::{
    containerd_process::ContainerdProcess,
    runtime::{ContainerState, Runtime},
    test_images::LocalRegistry,
};
use support::*;

const NODE: &str = "static-node";
const NS: &str = "kube-system";
const MIRROR: &str = "talker-static-node";

/// The static pod: a start line, a marker file written once, then a tick a second.
fn manifest(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: talker
  namespace: {NS}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: "{image}"
    command: ["sh", "-c"]
    args:
    - |
      echo static-hello
      echo written-at-start > /marker
      i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done
"#
    )
}

/// The `tick-N` numbers of a log, in order.
fn ticks(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .collect()
}

/// `kubectl logs` of the mirror pod: one start line, then ticks 1..=N without a gap
/// (one container instance from its start), N >= `min_ticks`.
fn logs_of_one_instance(c: &Cluster, min_ticks: u64) -> Vec<u64> {
    eventually(
        &format!("kubectl logs {MIRROR}: {min_ticks} ticks"),
        Duration::from_secs(30),
        || {
            let o = c.kubectl_out(&["logs", "-n", NS, MIRROR], None);
            let out = String::from_utf8_lossy(&o.stdout).into_owned();
            assert!(
                o.status.success(),
                "kubectl logs {MIRROR}: {}\n{out}{}",
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
            let lines: Vec<&str> = out.lines().collect();
            if let Some((first, rest)) = lines.split_first() {
                assert_eq!(*first, "static-hello", "{out}");
                assert!(rest.iter().all(|l| l.starts_with("tick-")), "{out}");
            }
            let t = ticks(&out);
            assert_eq!(t, (1..=t.len() as u64).collect::<Vec<_>>(), "{out}");
            (t.len() as u64 >= min_ticks).then_some(t)
        },
    )
}

/// The start time of a process (clock ticks since boot, field 22 of `/proc/<pid>/stat`).
fn start_time(stat: &str) -> String {
    // `pid (comm) state ppid ...`: the fields after the command name, which may hold spaces.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let start = rest.split_whitespace().nth(19).unwrap_or_default();
    assert!(!start.is_empty(), "bad /proc/<pid>/stat: {stat:?}");
    start.to_string()
}

/// The start time of the container's pid 1, read inside the container with `kubectl exec`.
fn pid1_start_time(c: &Cluster) -> String {
    start_time(&c.kubectl(&["exec", "-n", NS, MIRROR, "--", "cat", "/proc/1/stat"]))
}

#[test]
fn static_pod_mirror_logs_exec_recreate() {
    require_root_and(
        "static_pod_e2e",
        &[
            "/usr/bin/containerd",
            "/usr/sbin/runc",
            "/usr/bin/docker-registry",
            KUBECTL,
        ],
    );
    let apiserver_bin = binary("skiff-apiserver");
    let cm_bin = binary("skiff-controller-manager");
    let agent_bin = binary("skiff-agent");

    let (dir, _cleanup) = test_dir("skiff-sp", vec![NODE.to_string()]);
    let tokio = tokio_runtime();

    let registry = LocalRegistry::start(dir.join("registry")).expect("start docker-registry");
    let image = push_busybox(&tokio, &registry);
    let containerd = ContainerdProcess::start(dir.join("ctrd")).expect("start containerd");

    let (_apiserver, kubeconfig) = start_apiserver(&dir, "127.0.0.1", &apiserver_bin);
    let c = Cluster::new(&dir, &kubeconfig);
    let mut cm = spawn_component("controller-manager", &dir, &cm_bin, &kubeconfig, &[]);
    cm.wait_stdout("is the leader", Duration::from_secs(30));

    // The manifest is in place before the agent starts: it runs from the first poll.
    let manifests = dir.join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    fs::write(manifests.join("talker.yaml"), manifest(&image)).unwrap();
    let pod_logs_dir = dir.join("pod-logs");
    let mut agent = Proc::spawn(
        NODE,
        &dir,
        agent_command(&agent_bin, NODE, &kubeconfig, containerd.socket(), &dir)
            .arg("--pod-logs-dir")
            .arg(&pod_logs_dir)
            .arg("--manifest-dir")
            .arg(&manifests)
            .args(["--insecure-registry", &registry.host()])
            .args(["--node-lease-renew-interval", "2", "--sync-frequency", "2"])
            .args(["--port", "0", "--pod-network", "host-routes"]),
    );
    agent.wait_stdout(
        &format!("skiff-agent {NODE} ready"),
        Duration::from_secs(30),
    );
    let rt = tokio
        .block_on(Runtime::connect(containerd.socket(), NODE))
        .expect("connect to containerd");
    let task_pid = |cid: &str| match tokio.block_on(rt.status(cid)) {
        Ok(ContainerState::Running { pid }) => pid,
        other => panic!("container {cid}: {other:?}\n{}", agent.logs()),
    };

    // --- the mirror pod appears, Running and Ready, with the static pod's identity.
    let t = Instant::now();
    let get_mirror = || -> Option<Value> {
        let o = c.kubectl_out(&["get", "pod", "-n", NS, MIRROR, "-o", "json"], None);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).ok())
            .flatten()
    };
    let p = eventually(
        &format!("mirror pod {NS}/{MIRROR} Running and Ready"),
        Duration::from_secs(90),
        || get_mirror().filter(|p| is_ready(p) && !container_id(p).is_empty()),
    );
    println!("mirror pod Ready after {} ms", t.elapsed().as_millis());
    let md = &p["metadata"];
    assert_eq!(md["annotations"]["kubernetes.io/config.source"], "file");
    let hash = md["annotations"]["kubernetes.io/config.mirror"]
        .as_str()
        .expect("config.mirror annotation")
        .to_string();
    let mirror_uid = md["uid"].as_str().unwrap().to_string();
    assert_ne!(hash, mirror_uid, "the mirror pod has its own API uid");
    assert_eq!(p["spec"]["nodeName"], NODE);
    assert_eq!(md["ownerReferences"][0]["kind"], "Node");
    assert_eq!(md["ownerReferences"][0]["name"], NODE);
    let cid = container_id(&p);
    let pid = task_pid(&cid);

    // --- kubectl logs: the container's output, from the static pod's CRI log file
    // (`<ns>_<mirror name>_<static pod uid>`, not the mirror pod's API uid).
    let before = logs_of_one_instance(&c, 2);
    let file = pod_logs_dir.join(format!("{NS}_{MIRROR}_{hash}/main/0.log"));
    let text = fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    assert!(text.contains(" stdout F static-hello\n"), "{text}");
    let tail = c.kubectl(&["logs", "-n", NS, MIRROR, "-c", "main", "--tail", "1"]);
    assert_eq!(ticks(&tail).len(), 1, "{tail}");
    assert!(ticks(&tail)[0] >= *before.last().unwrap(), "{tail}");

    // --- kubectl exec: runs inside the container (its filesystem, its hostname, its pid
    // namespace), exit codes and stdin pass through.
    assert_eq!(
        c.kubectl(&["exec", "-n", NS, MIRROR, "--", "cat", "/marker"]),
        "written-at-start\n"
    );
    assert_eq!(
        c.kubectl(&[
            "exec",
            "-n",
            NS,
            MIRROR,
            "-c",
            "main",
            "--",
            "cat",
            "/etc/hostname"
        ]),
        format!("{MIRROR}\n")
    );
    let o = c.kubectl_out(
        &["exec", "-n", NS, MIRROR, "--", "sh", "-c", "exit 3"],
        None,
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "exec exit code: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = c.kubectl_out(
        &["exec", "-i", "-n", NS, MIRROR, "--", "cat"],
        Some("through stdin\n"),
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "through stdin\n");
    // pid 1 of the container's pid namespace is containerd's task (the same process).
    let start = pid1_start_time(&c);
    let host_stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("task's stat");
    assert_eq!(start, start_time(&host_stat), "exec saw another pid 1");

    // --- deleting the mirror pod through the API: the agent recreates it (new uid), the
    // container is the same one, still running, never restarted.
    let t = Instant::now();
    c.kubectl(&["delete", "pod", "-n", NS, MIRROR, "--timeout=60s"]);
    let p2 = eventually("mirror pod recreated", Duration::from_secs(30), || {
        get_mirror().filter(|p| p["metadata"]["uid"] != mirror_uid.as_str() && is_ready(p))
    });
    println!("mirror pod recreated after {} ms", t.elapsed().as_millis());
    assert_eq!(
        p2["metadata"]["annotations"]["kubernetes.io/config.mirror"],
        hash.as_str()
    );
    assert_eq!(
        container_id(&p2),
        cid,
        "the static pod's container was replaced"
    );
    assert_eq!(
        p2["status"]["containerStatuses"][0]["restartCount"], 0,
        "{}",
        p2["status"]
    );
    assert_eq!(task_pid(&cid), pid, "the container's task was restarted");
    // logs and exec on the new mirror pod reach the same container instance.
    let after = logs_of_one_instance(&c, before.len() as u64 + 1);
    assert!(after.len() > before.len(), "{before:?} -> {after:?}");
    assert_eq!(pid1_start_time(&c), start, "the container's pid 1 changed");
    assert_eq!(
        c.kubectl(&["exec", "-n", NS, MIRROR, "--", "cat", "/marker"]),
        "written-at-start\n"
    );
    assert!(
        !pod_logs_dir
            .join(format!("{NS}_{MIRROR}_{hash}/main/1.log"))
            .exists(),
        "a second container instance wrote a log"
    );

    // --- the manifest removed: mirror pod and container gone.
    fs::remove_file(manifests.join("talker.yaml")).unwrap();
    eventually("static pod removed", Duration::from_secs(60), || {
        let gone = get_mirror().is_none();
        let ctrs = tokio.block_on(rt.list()).expect("list containers");
        (gone && !ctrs.iter().any(|ci| ci.id == cid)).then_some(())
    });
}
