//! The kubelet end to end: a real control plane (skiff-apiserver, -controller-manager,
//! -scheduler processes), one containerd, a local registry with the busybox image, and two
//! skiff-agent processes (nodes agent-1 and agent-2, each with its own containerd namespace
//! and cgroup parent /skiff/<node>), driven with the real kubectl.
//!
//! Binaries: this test runs the ones next to its own executable (target/<profile>/). They
//! are not built here: run `cargo build -p skiff-agent -p skiff-control --bins` first
//! (`cargo xtask test` does); a missing binary fails the test with that message.
//!
//! Needs root and the packages of `cargo xtask setup` (containerd, runc, docker-registry,
//! busybox-static, iproute2, kubectl); CI runs as root, so it fails rather than skips.
//! Everything it creates (processes, netns, veths, cgroups, files under
//! /tmp/skiff-ke-<pid>) is removed by Drop guards, by pid and by name, also on failure.
//! Network traffic goes only to 127.0.0.1 and to pod IPs in the namespaces the agents made.

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{Read, Write},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use skiff_agent::kubelet::pod_worker::LABEL_POD_UID;
#[path = "support/mod.rs"]
mod support;
use skiff_agent::cni::network::{Ipv4Net, VETH_PREFIX, netns_name, veth_name};
use skiff_agent::kubelet::{
    containerd_process::ContainerdProcess,
    runtime::{ContainerState, Runtime, cgroup_dirs},
    test_images::{LocalRegistry, RegistryAuth, busybox_image},
};
use support::*;

const NODES: [&str; 2] = ["agent-1", "agent-2"];

fn is_ready(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn container_id(p: &Value) -> String {
    p["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("containerd://")
        .to_string()
}

fn restart_count(p: &Value) -> i64 {
    p["status"]["containerStatuses"][0]["restartCount"]
        .as_i64()
        .unwrap_or(-1)
}

/// GET http://<ip>:8080/ from the root netns (a bounded HTTP/1.0 client; Debian's
/// static busybox wget crashes on some hosts). Returns the body of a 200 answer.
fn fetch(ip: &str) -> Result<String, String> {
    let addr: std::net::SocketAddr = format!("{ip}:8080").parse().map_err(|e| format!("{e}"))?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut buf = Vec::new();
    s.take(1 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| format!("read from {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("bad answer: {text:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!("answer: {head}"));
    }
    Ok(body.to_string())
}

fn netns_list() -> Vec<String> {
    let o = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn veth_list() -> Vec<String> {
    fs::read_dir("/sys/class/net")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(VETH_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

fn misc_pods(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ConfigMap
metadata: {{name: settings}}
data: {{greeting: hello}}
---
apiVersion: v1
kind: Secret
metadata: {{name: creds}}
stringData: {{password: s3cret}}
---
apiVersion: v1
kind: Pod
metadata: {{name: crash}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: c, image: "{image}", command: ["sh", "-c", "exit 3"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: job}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  volumes:
  - {{name: data, emptyDir: {{}}}}
  initContainers:
  - name: init
    image: "{image}"
    command: ["sh", "-c", "echo init-was-here > /data/x"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  containers:
  - name: c
    image: "{image}"
    command: ["sh", "-c"]
    args: ["test \"$GREETING-$PASSWORD-$(cat /data/x)-$ME\" = \"hello-s3cret-init-was-here-job\" && test \"$(cat /etc/hostname)\" = job"]
    workingDir: /data
    volumeMounts: [{{name: data, mountPath: /data}}]
    env:
    - name: GREETING
      valueFrom: {{configMapKeyRef: {{name: settings, key: greeting}}}}
    - name: PASSWORD
      valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}
    - name: ME
      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: fails}}
spec:
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - {{name: c, image: "{image}", command: ["sh", "-c", "exit 2"]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: unhealthy}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{image}"
    command: ["sleep", "3600"]
    livenessProbe:
      tcpSocket: {{port: 9999}}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {{name: notready}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{image}"
    command: ["httpd", "-f", "-p", "8080"]
    readinessProbe:
      httpGet: {{path: /, port: 9090}}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {{name: slowstart}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{image}"
    command: ["sh", "-c", "sleep 8; touch /tmp/up; exec sleep 3600"]
    startupProbe:
      exec: {{command: ["test", "-f", "/tmp/up"]}}
      periodSeconds: 1
      failureThreshold: 40
    # Would kill the container at once if it ran before the startupProbe succeeded.
    livenessProbe:
      exec: {{command: ["test", "-f", "/tmp/up"]}}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Pod
metadata: {{name: neverstarts}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{image}"
    command: ["sleep", "3600"]
    startupProbe:
      tcpSocket: {{port: 9999}}
      periodSeconds: 1
      failureThreshold: 2
"#
    )
}

fn deployment(image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      terminationGracePeriodSeconds: 3
      containers:
      - name: httpd
        image: {image}
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c"]
        args: ["mkdir -p /www && echo \"$POD_NAME on $NODE_NAME\" > /www/index.html && exec httpd -f -p 8080 -h /www"]
        env:
        - name: POD_NAME
          valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
        - name: NODE_NAME
          valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
        ports:
        - containerPort: 8080
          name: http
        resources:
          requests: {{cpu: 100m, memory: 32Mi}}
          limits: {{cpu: 500m, memory: 64Mi}}
        readinessProbe:
          httpGet: {{path: /, port: http}}
          periodSeconds: 1
        livenessProbe:
          tcpSocket: {{port: 8080}}
          periodSeconds: 2
          failureThreshold: 3
"#
    )
}

/// A 2-container pod whose `main` container fails its first run (instance-1) and then
/// ticks once a second (instance-2); `side` prints one line.
fn talker_pod(image: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: talker}}
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - {{name: data, emptyDir: {{}}}}
  containers:
  - name: main
    image: "{image}"
    command: ["sh", "-c"]
    args:
    - |
      n=$(cat /data/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /data/n
      echo instance-$n
      if [ $n = 1 ]; then sleep 1; exit 1; fi
      i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done
    volumeMounts: [{{name: data, mountPath: /data}}]
  - name: side
    image: "{image}"
    command: ["sh", "-c", "echo side-says-hi; echo side-err >&2; exec sleep 3600"]
"#
    )
}

/// The highest `tick-N` in `s`.
fn last_tick(s: &str) -> u64 {
    s.lines()
        .filter_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// The CRI log lines of `file` (every line must parse).
fn cri_lines(file: &Path) -> Vec<(String, String, String, String)> {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines()
        .map(|l| {
            let mut p = l.splitn(4, ' ');
            let (ts, stream, tag, msg) = (
                p.next().unwrap_or_default(),
                p.next().unwrap_or_default(),
                p.next().unwrap_or_default(),
                p.next().unwrap_or_default(),
            );
            assert!(
                ts.ends_with('Z') && ts.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
                "{}: not a CRI line: {l:?}",
                file.display()
            );
            assert!(matches!(stream, "stdout" | "stderr"), "{l:?}");
            assert!(matches!(tag, "F" | "P"), "{l:?}");
            (ts.into(), stream.into(), tag.into(), msg.into())
        })
        .collect()
}

/// The time of a `kubectl logs --timestamps` line.
fn line_time(l: &str) -> k8s_openapi::jiff::Timestamp {
    l.split(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {l:?}"))
}

/// `kubectl logs` (plain, -c, --previous, --tail, -f, --timestamps, --since-time) and
/// `kubectl exec`, proxied by the apiserver to the kubelet API of the pod's agent; the
/// files in the CRI layout under the agents' --pod-logs-dir.
fn logs_and_exec(c: &Cluster, image: &str, logs: &Path) {
    c.apply(&talker_pod(image));
    let t = Instant::now();
    eventually(
        "talker restarted once, both containers running",
        Duration::from_secs(90),
        || {
            let p = c.json(&["get", "pod", "talker"]);
            let running = p["status"]["containerStatuses"]
                .as_array()
                .is_some_and(|cs| {
                    cs.len() == 2 && cs.iter().all(|s| s["state"]["running"].is_object())
                });
            let main = p["status"]["containerStatuses"]
                .as_array()
                .and_then(|cs| cs.iter().find(|s| s["name"] == "main").cloned())
                .unwrap_or(Value::Null);
            (running && main["restartCount"] == 1).then_some(())
        },
    );
    println!("talker restarted once after {} ms", t.elapsed().as_millis());
    // The current instance.
    let main = eventually("talker ticks", Duration::from_secs(20), || {
        let out = c.kubectl(&["logs", "talker", "-c", "main"]);
        (last_tick(&out) >= 2).then_some(out)
    });
    assert!(main.starts_with("instance-2\ntick-1\n"), "{main}");
    assert!(!main.contains("instance-1"), "{main}");
    // The files: <ns>_<pod>_<uid>/<container>/<restartCount>.log, CRI lines.
    let uid = c.json(&["get", "pod", "talker"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let pod_logs = logs.join(format!("default_talker_{uid}"));
    let prev = cri_lines(&pod_logs.join("main/0.log"));
    assert_eq!(prev.len(), 1, "{prev:?}");
    assert_eq!(
        (prev[0].1.as_str(), prev[0].2.as_str(), prev[0].3.as_str()),
        ("stdout", "F", "instance-1")
    );
    let cur = cri_lines(&pod_logs.join("main/1.log"));
    assert_eq!(cur[0].3, "instance-2");
    assert!(cur.len() >= 3 && cur[1].3 == "tick-1", "{cur:?}");
    let side = cri_lines(&pod_logs.join("side/0.log"));
    let mut side_msgs: Vec<(String, String)> =
        side.iter().map(|l| (l.1.clone(), l.3.clone())).collect();
    side_msgs.sort();
    assert_eq!(
        side_msgs,
        [
            ("stderr".to_string(), "side-err".to_string()),
            ("stdout".to_string(), "side-says-hi".to_string())
        ]
    );
    // The other container (stdout and stderr), and the default (first) container
    // without -c.
    let side_out = c.kubectl(&["logs", "talker", "-c", "side"]);
    let mut side_lines: Vec<&str> = side_out.lines().collect();
    side_lines.sort();
    assert_eq!(side_lines, ["side-err", "side-says-hi"], "{side_out}");
    // --timestamps: each line's own time (ticks a second apart), as written in the file.
    let stamped = c.kubectl(&["logs", "talker", "-c", "main", "--timestamps"]);
    let ticks: Vec<&str> = stamped.lines().filter(|l| l.contains(" tick-")).collect();
    assert!(ticks.len() >= 2, "{stamped}");
    assert!(
        ticks[0].ends_with(" tick-1") && ticks[1].ends_with(" tick-2"),
        "{stamped}"
    );
    let (t1, t2) = (line_time(ticks[0]), line_time(ticks[1]));
    let gap = t2.duration_since(t1).as_secs_f64();
    assert!(
        (0.9..3.0).contains(&gap),
        "tick-1 -> tick-2: {gap} s\n{stamped}"
    );
    assert_eq!(
        t1,
        cur[1].0.parse::<k8s_openapi::jiff::Timestamp>().unwrap(),
        "the file's time of tick-1"
    );
    // --since-time (kubectl sends whole seconds): from tick-2 on.
    let since = t2.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let from2 = c.kubectl(&["logs", "talker", "-c", "main", "--since-time", &since]);
    assert!(from2.starts_with("tick-2\n"), "since {since}: {from2}");
    let dflt = c.kubectl_out(&["logs", "talker"], None);
    assert!(dflt.status.success());
    assert!(
        String::from_utf8_lossy(&dflt.stdout).starts_with("instance-2\n"),
        "{dflt:?}"
    );
    // The previous instance.
    assert_eq!(
        c.kubectl(&["logs", "talker", "-c", "main", "--previous"]),
        "instance-1\n"
    );
    let o = c.kubectl_out(&["logs", "talker", "-c", "side", "--previous"], None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(r#"previous terminated container "side" in pod "talker" not found"#),
        "{err}"
    );
    // --tail.
    let tail = c.kubectl(&["logs", "talker", "-c", "main", "--tail", "2"]);
    assert_eq!(tail.lines().count(), 2, "{tail}");
    assert!(tail.lines().all(|l| l.starts_with("tick-")), "{tail}");
    // Errors: a container that does not exist, a pod that does not exist.
    let o = c.kubectl_out(&["logs", "talker", "-c", "nope"], None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("container nope is not valid for pod talker"),
        "{err}"
    );
    let o = c.kubectl_out(&["logs", "ghost"], None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains(r#"pods "ghost" not found"#),
        "{err}"
    );
    // -f: a line printed after kubectl started arrives; kubectl is then killed by pid.
    let before = last_tick(&c.kubectl(&["logs", "talker", "-c", "main"]));
    let mut follow = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .args(["logs", "-f", "talker", "-c", "main", "--tail", "1"])
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn kubectl logs -f");
    let mut out = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0
                || tx
                    .send(String::from_utf8_lossy(&buf[..n]).into_owned())
                    .is_err()
            {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = String::new();
    while last_tick(&seen) <= before + 1 && Instant::now() < deadline {
        if let Ok(s) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push_str(&s);
        }
    }
    let still_running = follow.try_wait().expect("try_wait").is_none();
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(
        last_tick(&seen) > before + 1,
        "kubectl logs -f did not stream new lines (last before: tick-{before}): {seen:?}"
    );
    assert!(still_running, "kubectl logs -f ended on its own");
    println!("kubectl logs -f streamed up to tick-{}", last_tick(&seen));

    // --- exec.
    assert_eq!(
        c.kubectl(&["exec", "talker", "-c", "main", "--", "cat", "/etc/hostname"]),
        "talker\n"
    );
    let o = c.kubectl_out(
        &["exec", "talker", "-c", "main", "--", "sh", "-c", "exit 3"],
        None,
    );
    assert_eq!(
        o.status.code(),
        Some(3),
        "exec exit code: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = c.kubectl_out(
        &[
            "exec",
            "talker",
            "-c",
            "side",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2",
        ],
        None,
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "err\n");
    let o = c.kubectl_out(
        &["exec", "-i", "talker", "-c", "main", "--", "cat"],
        Some("from stdin\n"),
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "from stdin\n");
    // Without -t the command has no terminal.
    let o = c.kubectl_out(&["exec", "talker", "-c", "main", "--", "tty"], None);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "not a tty\n");
    // -it with a real terminal: script(1) gives kubectl one (and sets its size, which
    // kubectl sends as a resize message).
    let in_terminal = |shell: &str| -> String {
        let o = Command::new("script")
            .args(["-qec", shell, "/dev/null"])
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .output()
            .expect("run script");
        let out = String::from_utf8_lossy(&o.stdout).replace('\r', "");
        assert!(
            o.status.success(),
            "{shell}: {o:?}\n{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let kubectl = format!("{KUBECTL} --kubeconfig {}", c.kubeconfig.display());
    let out = in_terminal(&format!("{kubectl} exec -it talker -c main -- tty"));
    // (script may echo its own input, e.g. `^@`, before kubectl's output.)
    let pts = out
        .split_whitespace()
        .find_map(|w| w.rsplit_once("/dev/pts/"))
        .map(|(_, n)| n.to_string())
        .unwrap_or_default();
    assert!(
        pts.parse::<u32>().is_ok(),
        "tty in kubectl exec -it: {out:?}"
    );
    let line = format!("/dev/pts/{pts}");
    let out = in_terminal(&format!(
        "stty rows 33 cols 111; {kubectl} exec -it talker -c main -- sh -c 'sleep 1; stty size'"
    ));
    assert!(
        out.lines()
            .any(|l| l.trim_start_matches("^@").trim() == "33 111"),
        "terminal size after resize: {out:?}"
    );
    println!("kubectl exec -it: {line}, resized to 33x111");
    c.kubectl(&["delete", "pod", "talker", "--wait=true", "--timeout=60s"]);
    assert!(
        !pod_logs.exists(),
        "{} left after the pod was deleted",
        pod_logs.display()
    );
}

/// Log rotation by the copier (agents run with `--container-log-max-size 16Ki
/// --container-log-max-files 3`): a pod writes ~75 KB; at most 3 files stay, `kubectl logs`
/// shows the current file (ending with the last line), and `kubectl logs -f` started
/// before the output follows it across every rotation without losing a line.
fn log_rotation(c: &Cluster, image: &str, logs: &Path) {
    c.apply(&format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: chatty}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{image}"
    command: ["sh", "-c"]
    args:
    - |
      sleep 4
      pad=$(printf '%0200d' 0)
      i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo "line-$i $pad"; [ $((i % 10)) = 0 ] && sleep 0.1; done
      echo done; exec sleep 3600
"#
    ));
    eventually("chatty running", Duration::from_secs(60), || {
        let p = c.json(&["get", "pod", "chatty"]);
        (p["status"]["phase"] == "Running").then_some(())
    });
    let out_file = c.dir.join("chatty-follow.out");
    let mut follow = Command::new(KUBECTL)
        .arg("--kubeconfig")
        .arg(&c.kubeconfig)
        .env_remove("KUBECONFIG")
        .args(["logs", "-f", "chatty"])
        .stdout(fs::File::create(&out_file).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl logs -f");
    let uid = c.json(&["get", "pod", "chatty"])["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string();
    let dir = logs.join(format!("default_chatty_{uid}/c"));
    let shown = eventually("chatty wrote everything", Duration::from_secs(60), || {
        let out = c.kubectl(&["logs", "chatty"]);
        out.ends_with("done\n").then_some(out)
    });
    // kubectl logs: the current file only, whole lines, the newest output.
    let first: Vec<&str> = shown.lines().collect();
    assert!(
        first.len() < 300 && first[0].starts_with("line-"),
        "{} lines, first {:?}",
        first.len(),
        first.first()
    );
    for l in &first[..first.len() - 1] {
        assert!(l.starts_with("line-") && l.len() > 200, "{l:?}");
    }
    let mut files: Vec<String> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert!(
        files.len() == 3
            && files[0] == "0.log"
            && files[1..].iter().all(|f| f.starts_with("0.log.")),
        "{}: {files:?}",
        dir.display()
    );
    for f in &files {
        cri_lines(&dir.join(f));
    }
    // kubectl logs -f: every line from line-1 to done, in order.
    let followed = eventually(
        "kubectl logs -f reached done",
        Duration::from_secs(30),
        || {
            let s = fs::read_to_string(&out_file).unwrap_or_default();
            s.ends_with("done\n").then_some(s)
        },
    );
    let _ = follow.kill();
    let _ = follow.wait();
    let numbers: Vec<u32> = followed
        .lines()
        .filter_map(|l| l.strip_prefix("line-")?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(
        numbers,
        (1..=300).collect::<Vec<u32>>(),
        "kubectl logs -f across rotations"
    );
    println!(
        "log rotation: {files:?}, kubectl logs shows {} lines, -f followed all 300",
        first.len()
    );
    c.kubectl(&["delete", "pod", "chatty", "--wait=true", "--timeout=60s"]);
}

#[link(name = "crypt")]
unsafe extern "C" {
    fn crypt(key: *const std::ffi::c_char, salt: *const std::ffi::c_char) -> *mut std::ffi::c_char;
}

/// An htpasswd line with a bcrypt hash (libcrypt's `$2b$`; the registry takes bcrypt only).
fn htpasswd_line(user: &str, password: &str) -> String {
    const B64: &[u8] = b"./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let salt: String = (0..22)
        .map(|i| B64[(std::process::id() as usize * 31 + i * 7) % 64] as char)
        .collect();
    let key = std::ffi::CString::new(password).unwrap();
    let salt = std::ffi::CString::new(format!("$2b$05${salt}")).unwrap();
    // SAFETY: NUL-terminated inputs; crypt returns a static buffer (or NULL), copied at
    // once on this thread.
    let hash = unsafe {
        let h = crypt(key.as_ptr(), salt.as_ptr());
        assert!(!h.is_null(), "crypt failed");
        std::ffi::CStr::from_ptr(h).to_string_lossy().into_owned()
    };
    assert!(hash.starts_with("$2b$"), "libcrypt without bcrypt: {hash}");
    format!("{user}:{hash}\n")
}

/// imagePullSecrets against a registry with basic authentication: the pod's secret and a
/// ServiceAccount's secret pull the image; a wrong password, a missing secret and no
/// secret give ErrImagePull/ImagePullBackOff with the registry's 401.
fn pull_secrets(c: &Cluster, image: &str, host: &str) {
    let secret = |name: &str, pass: &str| {
        c.kubectl(&[
            "create",
            "secret",
            "docker-registry",
            name,
            "--docker-server",
            host,
            "--docker-username",
            "alice",
            "--docker-password",
            pass,
        ]);
    };
    secret("regcred", "pw");
    secret("wrongcred", "not-the-password");
    let pod = |name: &str, extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  terminationGracePeriodSeconds: 1\n{extra}  containers:\n  - {{name: c, image: \"{image}\", imagePullPolicy: Always, command: [sleep, \"3600\"]}}\n"
        )
    };
    let mut yaml = "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: puller}\nimagePullSecrets: [{name: regcred}]\n".to_string();
    yaml.push_str(&pod(
        "private-ok",
        "  imagePullSecrets: [{name: regcred}]\n",
    ));
    yaml.push_str(&pod("private-sa", "  serviceAccountName: puller\n"));
    yaml.push_str(&pod(
        "private-wrong",
        "  imagePullSecrets: [{name: wrongcred}]\n",
    ));
    yaml.push_str(&pod(
        "private-missing",
        "  imagePullSecrets: [{name: ghostcred}]\n",
    ));
    yaml.push_str(&pod("private-none", ""));
    c.apply(&yaml);
    let t = Instant::now();
    for name in ["private-ok", "private-sa"] {
        eventually(
            &format!("{name} Running with the pull secret"),
            Duration::from_secs(60),
            || is_ready(&c.json(&["get", "pod", name])).then_some(()),
        );
    }
    println!(
        "private image pulled with secrets in {} ms",
        t.elapsed().as_millis()
    );
    for name in ["private-wrong", "private-missing", "private-none"] {
        let w = eventually(
            &format!("{name} in ErrImagePull"),
            Duration::from_secs(60),
            || {
                let p = c.json(&["get", "pod", name]);
                let w = p["status"]["containerStatuses"][0]["state"]["waiting"].clone();
                (w["reason"] == "ErrImagePull" || w["reason"] == "ImagePullBackOff").then_some(w)
            },
        );
        let m = w["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("401") || m.contains("nauthorized") || m.contains("UNAUTHORIZED"),
            "{name}: {w}"
        );
        println!("{name}: {m}");
    }
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=private-missing",
    ]);
    assert!(
        events.contains("Unable to retrieve some image pull secrets (ghostcred)"),
        "{events}"
    );
    c.kubectl(&[
        "delete",
        "pod",
        "private-ok",
        "private-sa",
        "private-wrong",
        "private-missing",
        "private-none",
        "--wait=true",
        "--timeout=60s",
    ]);
}

/// Static pods: a manifest in agent-1's --manifest-dir runs without the apiserver as its
/// source, with a mirror pod `<pod>-agent-1`; deleting the mirror recreates it without
/// touching the containers; removing the file removes the pod. Garbage files are skipped.
fn static_pods(
    c: &Cluster,
    image: &str,
    manifests: &Path,
    rt: &Runtime,
    tokio: &tokio::runtime::Runtime,
) {
    let static_ctrs = |uid: &str| -> Vec<String> {
        tokio
            .block_on(rt.list())
            .expect("list containers")
            .into_iter()
            .filter(|ci| ci.labels.get(LABEL_POD_UID).map(String::as_str) == Some(uid))
            .map(|ci| ci.id)
            .collect()
    };
    fs::write(
        manifests.join("broken.yaml"),
        "apiVersion: v1\nkind: Pod\nspec: [oops\n",
    )
    .unwrap();
    fs::write(manifests.join("notes.txt"), "not a manifest").unwrap();
    let t = Instant::now();
    fs::write(
        manifests.join("static-web.yaml"),
        format!(
            r#"apiVersion: v1
kind: Pod
metadata:
  name: static-web
  labels: {{tier: static}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: "{image}"
    command: ["sleep", "3600"]
"#
        ),
    )
    .unwrap();
    let p = eventually(
        "static pod mirror static-web-agent-1 Running",
        Duration::from_secs(60),
        || {
            let o = c.kubectl_out(&["get", "pod", "static-web-agent-1", "-o", "json"], None);
            let p: Value = serde_json::from_slice(&o.stdout).ok()?;
            (o.status.success() && is_ready(&p) && !container_id(&p).is_empty()).then_some(p)
        },
    );
    println!("static pod Running after {} ms", t.elapsed().as_millis());
    let md = &p["metadata"];
    assert_eq!(md["namespace"], "default");
    assert_eq!(md["annotations"]["kubernetes.io/config.source"], "file");
    let hash = md["annotations"]["kubernetes.io/config.mirror"]
        .as_str()
        .expect("config.mirror annotation")
        .to_string();
    assert!(!hash.is_empty());
    let node_uid = c.json(&["get", "node", "agent-1"])["metadata"]["uid"].clone();
    let owner = &md["ownerReferences"][0];
    assert_eq!(owner["apiVersion"], "v1");
    assert_eq!(owner["kind"], "Node");
    assert_eq!(owner["name"], "agent-1");
    assert_eq!(owner["uid"], node_uid);
    assert_eq!(owner["controller"], true);
    assert_eq!(p["spec"]["nodeName"], "agent-1");
    let cid = container_id(&p);
    assert_eq!(static_ctrs(&hash), vec![cid.clone()]);
    let mirror_uid = md["uid"].as_str().unwrap().to_string();

    // Deleting the mirror pod: it comes back (new uid), the container keeps running.
    let t = Instant::now();
    c.kubectl(&["delete", "pod", "static-web-agent-1", "--timeout=60s"]);
    let p2 = eventually("mirror pod recreated", Duration::from_secs(30), || {
        let o = c.kubectl_out(&["get", "pod", "static-web-agent-1", "-o", "json"], None);
        let p: Value = serde_json::from_slice(&o.stdout).ok()?;
        (o.status.success() && p["metadata"]["uid"] != mirror_uid.as_str() && is_ready(&p))
            .then_some(p)
    });
    println!("mirror pod recreated after {} ms", t.elapsed().as_millis());
    assert_eq!(
        container_id(&p2),
        cid,
        "the static pod's container was replaced"
    );
    assert_eq!(restart_count(&p2), 0);
    assert_eq!(static_ctrs(&hash), vec![cid.clone()]);
    let info = tokio
        .block_on(rt.list())
        .unwrap()
        .into_iter()
        .find(|ci| ci.id == cid)
        .expect("static container");
    assert!(
        matches!(info.state, ContainerState::Running { .. }),
        "{info:?}"
    );

    // A second garbage file while it runs: nothing changes.
    fs::write(manifests.join("garbage.json"), "{\"kind\": 3").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let p3 = c.json(&["get", "pod", "static-web-agent-1"]);
    assert_eq!(p3["metadata"]["uid"], p2["metadata"]["uid"]);
    assert_eq!(container_id(&p3), cid);

    // Removing the file: pod and containers gone.
    let t = Instant::now();
    fs::remove_file(manifests.join("static-web.yaml")).unwrap();
    eventually("static pod gone", Duration::from_secs(60), || {
        let o = c.kubectl_out(
            &[
                "get",
                "pod",
                "static-web-agent-1",
                "--ignore-not-found",
                "-o",
                "name",
            ],
            None,
        );
        (o.status.success() && o.stdout.is_empty() && static_ctrs(&hash).is_empty()).then_some(())
    });
    println!("static pod removed after {} ms", t.elapsed().as_millis());
}

#[test]
fn kubelet_end_to_end() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (CI runs as root)"
    );
    for bin in [
        "/usr/bin/containerd",
        "/usr/sbin/runc",
        "/usr/bin/docker-registry",
        "/bin/busybox",
        KUBECTL,
    ] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: run `cargo xtask setup`"
        );
    }
    let apiserver_bin = binary("skiff-apiserver");
    let cm_bin = binary("skiff-controller-manager");
    let sched_bin = binary("skiff-scheduler");
    let agent_bin = binary("skiff-agent");

    let (dir, _cleanup) = test_dir("skiff-ke", NODES.iter().map(|n| n.to_string()).collect());
    let rt = tokio_runtime();

    // --- registry with the busybox image, containerd.
    let registry = LocalRegistry::start(dir.join("registry")).expect("start docker-registry");
    let image = push_busybox(&rt, &registry);
    // A second registry that wants a login (alice/pw), for imagePullSecrets.
    let auth_registry = LocalRegistry::start_with_htpasswd(
        dir.join("registry-auth"),
        &htpasswd_line("alice", "pw"),
    )
    .expect("start docker-registry with htpasswd");
    let private_image = auth_registry.image_ref("team/busybox:1.0");
    rt.block_on(busybox_image().expect("busybox image").push_with_auth(
        &private_image,
        &RegistryAuth::Basic("alice".into(), "pw".into()),
    ))
    .expect("push busybox with a login");
    let containerd = ContainerdProcess::start(dir.join("ctrd")).expect("start containerd");

    // --- control plane.
    let (apiserver, kubeconfig) = start_apiserver(&dir, "127.0.0.1", &apiserver_bin);
    let c = Cluster::new(&dir, &kubeconfig);
    let component = |name: &str, bin: &Path| {
        spawn_component(
            name,
            &dir,
            bin,
            &kubeconfig,
            &[
                "--lease-duration",
                "6",
                "--renew-deadline",
                "4",
                "--retry-period",
                "1",
            ],
        )
    };
    let mut cm = component("controller-manager", &cm_bin);
    let mut sched = component("scheduler", &sched_bin);
    cm.wait_stdout("is the leader", Duration::from_secs(30));
    sched.wait_stdout("is the leader", Duration::from_secs(30));

    // --- agents (agent-1 with a static pod manifest dir).
    let manifests = dir.join("manifests");
    fs::create_dir_all(&manifests).unwrap();
    // Both agents' logs in one directory, as /var/log/pods is one per host.
    let pod_logs_dir = dir.join("pod-logs");
    let start_agent = |node: &str, log: &str| {
        Proc::spawn(
            log,
            &dir,
            agent_command(&agent_bin, node, &kubeconfig, containerd.socket(), &dir)
                .arg("--pod-logs-dir")
                .arg(&pod_logs_dir)
                .args(["--insecure-registry", &registry.host()])
                .args(["--insecure-registry", &auth_registry.host()])
                .args(["--node-lease-renew-interval", "2", "--sync-frequency", "2"])
                // Small log files, so that log_rotation sees the copier rotate.
                .args([
                    "--container-log-max-size",
                    "16Ki",
                    "--container-log-max-files",
                    "3",
                ])
                // Several agents share 127.0.0.1: any free kubelet API port.
                .args(["--port", "0", "--pod-network", "host-routes"])
                .args(if node == "agent-1" {
                    vec![
                        "--manifest-dir".to_string(),
                        manifests.display().to_string(),
                    ]
                } else {
                    vec![]
                }),
        )
    };
    let mut agents: Vec<Proc> = NODES.iter().map(|n| start_agent(n, n)).collect();
    for (a, n) in agents.iter_mut().zip(NODES) {
        a.wait_stdout(&format!("skiff-agent {n} ready"), Duration::from_secs(30));
    }
    let dump = |agents: &[Proc]| -> String {
        agents.iter().map(Proc::logs).collect::<Vec<_>>().join("\n")
    };

    // Nodes Ready with podCIDRs and the agent's nodeInfo.
    let cidrs: BTreeMap<String, Ipv4Net> =
        eventually("nodes Ready with podCIDRs", Duration::from_secs(30), || {
            let nodes = c.items(&["get", "nodes"]);
            let mut m = BTreeMap::new();
            for n in &nodes {
                let ready = n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                let cidr = n["spec"]["podCIDR"].as_str().and_then(Ipv4Net::parse);
                if let (true, Some(cidr)) = (ready, cidr) {
                    m.insert(
                        n["metadata"]["name"]
                            .as_str()
                            .unwrap_or_default()
                            .to_string(),
                        cidr,
                    );
                }
            }
            (m.len() == NODES.len()).then_some(m)
        });
    let node1 = c.json(&["get", "node", "agent-1"]);
    assert_eq!(
        node1["status"]["nodeInfo"]["kubeletVersion"],
        "v1.37.0-skiff"
    );
    assert!(
        node1["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("containerd://1.")),
        "{}",
        node1["status"]["nodeInfo"]
    );
    assert_eq!(node1["status"]["capacity"]["pods"], "110");
    let lease = c.json(&["get", "lease", "-n", "kube-node-lease", "agent-1"]);
    assert_eq!(lease["spec"]["holderIdentity"], "agent-1");
    println!("nodes: {}", c.kubectl(&["get", "nodes", "-o", "wide"]));

    // --- static pods.
    {
        let rt1 = rt
            .block_on(Runtime::connect(containerd.socket(), "agent-1"))
            .expect("connect");
        static_pods(&c, &image, &manifests, &rt1, &rt);
    }

    // --- a 3-replica Deployment.
    let t = Instant::now();
    c.apply(&deployment(&image));
    let pods = eventually(
        "3 web pods Running and Ready",
        Duration::from_secs(90),
        || {
            let p = c.items(&["get", "pods", "-l", "app=web"]);
            (p.len() == 3 && p.iter().all(is_ready)).then_some(p)
        },
    );
    let create_to_ready = t.elapsed();
    println!(
        "Deployment applied -> 3 pods Running+Ready in {} ms",
        create_to_ready.as_millis()
    );
    let wide = c.kubectl(&["get", "pods", "-o", "wide", "-l", "app=web"]);
    println!("{wide}");
    let mut seen_ips = HashSet::new();
    for p in &pods {
        let name = p["metadata"]["name"].as_str().unwrap().to_string();
        let node = p["spec"]["nodeName"].as_str().unwrap().to_string();
        let ip = p["status"]["podIP"].as_str().unwrap().to_string();
        let cidr = cidrs
            .get(&node)
            .unwrap_or_else(|| panic!("pod {name} on unknown node {node}"));
        assert!(
            cidr.contains(ip.parse().unwrap()),
            "pod {name} IP {ip} not in {node}'s {cidr}"
        );
        assert!(seen_ips.insert(ip.clone()), "duplicate pod IP {ip}");
        assert!(wide.contains(&ip) && wide.contains(&node), "{wide}");
        assert_eq!(p["status"]["hostIP"], "127.0.0.1");
        let cs = &p["status"]["containerStatuses"][0];
        assert_eq!(cs["ready"], true);
        assert_eq!(cs["started"], true);
        assert!(cs["state"]["running"]["startedAt"].is_string(), "{cs}");
        assert!(
            cs["imageID"]
                .as_str()
                .is_some_and(|i| i.contains("@sha256:")),
            "{cs}"
        );
        let conds: Vec<&str> = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap())
            .collect();
        for want in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
            assert!(conds.contains(&want), "{name}: conditions {conds:?}");
        }
        // Limits as cgroup limits (memory in v1 or v2, whichever has the controller).
        let uid = p["metadata"]["uid"].as_str().unwrap();
        let cg = format!("/skiff/{node}/pod-{uid}/httpd");
        let read = |f: &str| -> Vec<String> {
            cgroup_dirs(&cg)
                .iter()
                .filter_map(|d| fs::read_to_string(d.join(f)).ok())
                .map(|s| s.trim().to_string())
                .collect()
        };
        let mem: Vec<String> = read("memory.limit_in_bytes")
            .into_iter()
            .chain(read("memory.max"))
            .collect();
        assert!(
            mem.iter().any(|m| m == "67108864"),
            "{cg}: memory limits {mem:?}"
        );
        let cpu: Vec<String> = read("cpu.cfs_quota_us")
            .into_iter()
            .chain(read("cpu.max"))
            .collect();
        assert!(
            cpu.iter().any(|c| c == "50000" || c == "50000 100000"),
            "{cg}: cpu limits {cpu:?}"
        );
        // The page from the root netns through the pod's /32 route.
        let page = fetch(&ip)
            .unwrap_or_else(|e| panic!("GET http://{ip}:8080/ of {name}: {e}\n{}", dump(&agents)));
        assert_eq!(page.trim(), format!("{name} on {node}"));
    }

    // --- kubectl logs and exec through the apiserver to the agents' kubelet API.
    logs_and_exec(&c, &image, &pod_logs_dir);
    log_rotation(&c, &image, &pod_logs_dir);

    // --- imagePullSecrets.
    pull_secrets(&c, &private_image, &auth_registry.host());

    // --- a missing image: ErrImagePull, then ImagePullBackOff.
    let missing = registry.image_ref("skiff/missing:1.0");
    c.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: nopull\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: {missing}\n"
    ));
    let row = eventually(
        "nopull in ErrImagePull/ImagePullBackOff",
        Duration::from_secs(60),
        || {
            let out = c.kubectl(&["get", "pod", "nopull"]);
            (out.contains("ErrImagePull") || out.contains("ImagePullBackOff")).then_some(out)
        },
    );
    println!("{row}");
    let p = c.json(&["get", "pod", "nopull"]);
    let w = &p["status"]["containerStatuses"][0]["state"]["waiting"];
    assert!(
        w["message"]
            .as_str()
            .is_some_and(|m| m.contains("manifest unknown")
                || m.contains("MANIFEST_UNKNOWN")
                || m.contains("404")
                || m.contains("Back-off pulling image")),
        "{w}"
    );
    eventually(
        "nopull in ImagePullBackOff",
        Duration::from_secs(30),
        || {
            c.kubectl(&["get", "pod", "nopull"])
                .contains("ImagePullBackOff")
                .then_some(())
        },
    );
    let o = c.kubectl_out(&["logs", "nopull"], None);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "logs of a pod that never started: {err}"
    );
    assert!(
        err.contains(r#"container "c" in pod "nopull" is waiting to start"#),
        "{err}"
    );
    let t = Instant::now();
    c.kubectl(&["delete", "pod", "nopull", "--wait=true", "--timeout=60s"]);
    println!(
        "delete of a pod without containers: {} ms",
        t.elapsed().as_millis()
    );

    // --- restart policies, CrashLoopBackOff, liveness, readiness, init containers, env.
    c.apply(&misc_pods(&image));
    let t = Instant::now();
    let pod = |name: &str| c.json(&["get", "pod", name]);
    let st = |p: &Value| p["status"]["containerStatuses"][0].clone();
    // startupProbe: running but neither started nor ready until it succeeds.
    let s = eventually(
        "slowstart running, not started yet",
        Duration::from_secs(30),
        || {
            let s = st(&pod("slowstart"));
            s["state"]["running"].is_object().then_some(s)
        },
    );
    assert_eq!(s["started"], false, "{s}");
    assert_eq!(s["ready"], false, "{s}");
    let crash = eventually("crash in CrashLoopBackOff", Duration::from_secs(60), || {
        let p = pod("crash");
        (st(&p)["state"]["waiting"]["reason"] == "CrashLoopBackOff").then_some(p)
    });
    let cs = st(&crash);
    println!(
        "crash: CrashLoopBackOff after {} ms: {}",
        t.elapsed().as_millis(),
        cs["state"]["waiting"]["message"]
    );
    assert!(cs["restartCount"].as_i64().unwrap_or(0) >= 1, "{cs}");
    assert_eq!(cs["lastState"]["terminated"]["exitCode"], 3, "{cs}");
    assert!(
        c.kubectl(&["get", "pod", "crash"])
            .contains("CrashLoopBackOff")
    );
    let job = eventually("job Succeeded", Duration::from_secs(60), || {
        let p = pod("job");
        (p["status"]["phase"] == "Succeeded").then_some(p)
    });
    assert_eq!(
        st(&job)["state"]["terminated"]["reason"],
        "Completed",
        "{}",
        st(&job)
    );
    assert_eq!(
        job["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"],
        0
    );
    let fails = eventually("fails Failed", Duration::from_secs(60), || {
        let p = pod("fails");
        (p["status"]["phase"] == "Failed").then_some(p)
    });
    assert_eq!(st(&fails)["state"]["terminated"]["exitCode"], 2);
    assert_eq!(st(&fails)["state"]["terminated"]["reason"], "Error");
    assert_eq!(st(&fails)["restartCount"], 0);
    let unhealthy = eventually(
        "unhealthy restarted by its liveness probe",
        Duration::from_secs(60),
        || {
            let p = pod("unhealthy");
            (st(&p)["restartCount"].as_i64().unwrap_or(0) >= 1).then_some(p)
        },
    );
    println!(
        "unhealthy: restarted by liveness after {} ms",
        t.elapsed().as_millis()
    );
    assert!(
        st(&unhealthy)["lastState"]["terminated"].is_object(),
        "{}",
        st(&unhealthy)
    );
    // startupProbe succeeded after ~8 s: started and ready, the liveness probe (which
    // fails before /tmp/up exists) never ran early, nothing restarted.
    let s = eventually("slowstart started", Duration::from_secs(40), || {
        let s = st(&pod("slowstart"));
        (s["started"] == true && s["ready"] == true).then_some(s)
    });
    assert_eq!(s["restartCount"], 0, "{s}");
    println!("slowstart: started after {} ms", t.elapsed().as_millis());
    // A startupProbe that never succeeds: killed and restarted, never started.
    let ns = eventually(
        "neverstarts restarted by its startup probe",
        Duration::from_secs(60),
        || {
            let s = st(&pod("neverstarts"));
            (s["restartCount"].as_i64().unwrap_or(0) >= 1).then_some(s)
        },
    );
    assert_eq!(ns["started"], false, "{ns}");
    assert_eq!(ns["ready"], false, "{ns}");
    assert!(ns["lastState"]["terminated"].is_object(), "{ns}");
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=neverstarts",
    ]);
    assert!(
        events.contains("Startup probe failed: dial tcp")
            && events.contains("Container c failed startup probe, will be restarted"),
        "{events}"
    );
    let notready = pod("notready");
    assert_eq!(
        notready["status"]["phase"], "Running",
        "{}",
        notready["status"]
    );
    assert_eq!(st(&notready)["ready"], false);
    assert!(!is_ready(&notready));
    let events = c.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=unhealthy",
    ]);
    println!("{events}");
    c.kubectl(&[
        "delete",
        "pod",
        "crash",
        "job",
        "fails",
        "unhealthy",
        "notready",
        "slowstart",
        "neverstarts",
        "--wait=true",
        "--timeout=60s",
    ]);

    // --- kill a container's main process: restarted, restartCount 1, lastState.
    let victim = pods[0]["metadata"]["name"].as_str().unwrap().to_string();
    let victim_node = pods[0]["spec"]["nodeName"].as_str().unwrap().to_string();
    let old_id = container_id(&pods[0]);
    let crt = rt
        .block_on(Runtime::connect(containerd.socket(), &victim_node))
        .expect("connect to containerd");
    let pid = match rt.block_on(crt.status(&old_id)).expect("victim status") {
        ContainerState::Running { pid } => pid,
        s => panic!("victim container {old_id} is {s:?}"),
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the container's main process");
    let t = Instant::now();
    let p = eventually(
        "the killed container restarted",
        Duration::from_secs(60),
        || {
            let p = c.json(&["get", "pod", &victim]);
            (restart_count(&p) == 1 && is_ready(&p)).then_some(p)
        },
    );
    println!(
        "killed pid {pid} of {victim}: restarted and Ready again in {} ms",
        t.elapsed().as_millis()
    );
    let cs = &p["status"]["containerStatuses"][0];
    let last = &cs["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 137, "{cs}");
    assert_eq!(last["reason"], "Error", "{cs}");
    assert!(last["finishedAt"].is_string(), "{cs}");
    assert_ne!(container_id(&p), old_id, "a new container");
    let ip = p["status"]["podIP"].as_str().unwrap().to_string();
    eventually("the restarted pod serves", Duration::from_secs(10), || {
        fetch(&ip).ok()
    });

    // --- agent restart: nothing restarts.
    let ready_since = |p: &Value| -> String {
        p["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
            .map(|c| c["lastTransitionTime"].to_string())
            .unwrap_or_default()
    };
    let before: BTreeMap<String, (String, i64, String)> = c
        .items(&["get", "pods", "-l", "app=web"])
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                (container_id(p), restart_count(p), ready_since(p)),
            )
        })
        .collect();
    // A pod that prints a line a second: its log goes on while the agents are down.
    c.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: ticker}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers:\n  - name: c\n    image: \"{image}\"\n    command: [sh, -c, 'i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done']\n"
    ));
    let ticker = eventually("ticker running", Duration::from_secs(60), || {
        let p = c.json(&["get", "pod", "ticker"]);
        is_ready(&p).then_some(p)
    });
    let ticker_uid = ticker["metadata"]["uid"].as_str().unwrap().to_string();
    let ticker_log = pod_logs_dir
        .join(format!("default_ticker_{ticker_uid}"))
        .join("c/0.log");
    for a in agents.iter_mut() {
        a.stop();
    }
    agents.clear();
    let lines_at_stop = cri_lines(&ticker_log).len();
    std::thread::sleep(Duration::from_secs(3));
    let lines_while_down = cri_lines(&ticker_log).len();
    assert!(
        lines_while_down >= lines_at_stop + 2,
        "the log stopped with the agents: {lines_at_stop} -> {lines_while_down} lines"
    );
    // While the agents are down, one pod is force-deleted: its containers and network
    // are orphans the restarted agent must remove (the Deployment makes a new pod).
    let orphan = c.json(&["get", "pod", &victim]);
    let orphan_uid = orphan["metadata"]["uid"].as_str().unwrap().to_string();
    let orphan_node = orphan["spec"]["nodeName"].as_str().unwrap().to_string();
    let orphan_id = container_id(&orphan);
    c.kubectl(&["delete", "pod", &victim, "--grace-period=0", "--force"]);
    let mut agents: Vec<Proc> = NODES
        .iter()
        .map(|n| start_agent(n, &format!("{n}-restarted")))
        .collect();
    for (a, n) in agents.iter_mut().zip(NODES) {
        a.wait_stdout(&format!("skiff-agent {n} ready"), Duration::from_secs(30));
    }
    // Several syncs and probe periods.
    std::thread::sleep(Duration::from_secs(6));
    let after = eventually(
        "pods Ready after the agent restart",
        Duration::from_secs(30),
        || {
            let p = c.items(&["get", "pods", "-l", "app=web"]);
            (p.len() == 3 && p.iter().all(is_ready)).then_some(p)
        },
    );
    let mut kept = 0;
    for p in &after {
        let name = p["metadata"]["name"].as_str().unwrap();
        let Some((id, restarts, since)) = before.get(name) else {
            // The force-deleted pod's replacement.
            assert_ne!(name, victim);
            continue;
        };
        kept += 1;
        assert_eq!(
            &container_id(p),
            id,
            "{name}: container replaced by the agent restart\n{}",
            dump(&agents)
        );
        assert_eq!(restart_count(p), *restarts, "{name}: restartCount changed");
        assert_eq!(
            &ready_since(p),
            since,
            "{name}: Ready flapped during the agent restart"
        );
        let ip = p["status"]["podIP"].as_str().unwrap();
        fetch(ip).unwrap_or_else(|e| panic!("{name} after agent restart: {e}"));
    }
    assert_eq!(
        kept, 2,
        "the two pods that were not deleted keep their containers"
    );
    println!(
        "agent restart: 2 pods kept their containers, the force-deleted one's replacement runs"
    );
    // The ticker: not restarted, its log complete across the agent restart.
    let out = c.kubectl(&["logs", "ticker"]);
    let n = last_tick(&out) as usize;
    let want: String = (1..=n).map(|i| format!("tick-{i}\n")).collect();
    assert_eq!(out, want, "ticker log with gaps");
    assert!(n > lines_while_down, "{out}");
    assert_eq!(restart_count(&c.json(&["get", "pod", "ticker"])), 0);
    c.kubectl(&["delete", "pod", "ticker", "--wait=true", "--timeout=60s"]);
    assert!(!ticker_log.exists(), "ticker log left after deletion");
    let orphan_rt = rt
        .block_on(Runtime::connect(containerd.socket(), &orphan_node))
        .expect("connect");
    eventually(
        "the orphaned pod's container and network removed",
        Duration::from_secs(30),
        || {
            let list = rt.block_on(orphan_rt.list()).expect("list");
            let gone = !list.iter().any(|c| c.id == orphan_id)
                && !Path::new("/run/netns")
                    .join(netns_name(&orphan_uid))
                    .exists()
                && !Path::new("/sys/class/net")
                    .join(veth_name(&orphan_uid))
                    .exists();
            gone.then_some(())
        },
    );

    // --- delete the Deployment: nothing is left on the nodes.
    let uids: Vec<String> = after
        .iter()
        .map(|p| p["metadata"]["uid"].as_str().unwrap().to_string())
        .collect();
    let t = Instant::now();
    c.kubectl(&["delete", "deployment", "web"]);
    eventually("web pods gone", Duration::from_secs(60), || {
        c.items(&["get", "pods", "-l", "app=web"])
            .is_empty()
            .then_some(())
    });
    println!(
        "delete Deployment -> pods gone in {} ms",
        t.elapsed().as_millis()
    );
    for node in NODES {
        let rtn = rt
            .block_on(Runtime::connect(containerd.socket(), node))
            .expect("connect");
        let left = rt.block_on(rtn.list()).expect("list");
        assert!(
            left.is_empty(),
            "{node}: containers left: {:?}",
            left.iter().map(|c| &c.id).collect::<Vec<_>>()
        );
        for d in cgroup_dirs(&format!("/skiff/{node}")) {
            let sub: Vec<_> = fs::read_dir(&d)
                .map(|r| {
                    r.flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.file_name())
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                sub.is_empty(),
                "cgroups left under {}: {sub:?}",
                d.display()
            );
        }
        let ipam: Vec<_> = fs::read_dir(dir.join(node).join("ipam"))
            .map(|r| r.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(ipam.is_empty(), "{node}: IP allocations left: {ipam:?}");
    }
    let ns_left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with("skiff-") && !n.starts_with("skiff-crt-"))
        .collect();
    assert!(ns_left.is_empty(), "netns left: {ns_left:?}");
    for uid in &uids {
        assert!(!Path::new("/run/netns").join(netns_name(uid)).exists());
        assert!(!Path::new("/sys/class/net").join(veth_name(uid)).exists());
    }
    assert!(veth_list().is_empty(), "veths left: {:?}", veth_list());

    // --- containerd unreachable: Ready=False with the reason, Ready again when it is back.
    let ctrd3_dir = dir.join("ctrd3");
    let mut agent3 = Proc::spawn(
        "agent-3",
        &dir,
        Command::new(&agent_bin)
            .args(["--node-name", "agent-3"])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--containerd-address")
            .arg(ctrd3_dir.join("containerd.sock"))
            .arg("--root-dir")
            .arg(dir.join("agent-3"))
            .args(["--node-lease-renew-interval", "2", "--port", "0"])
            .args(["--pod-network", "host-routes"]),
    );
    agent3.wait_stdout("skiff-agent agent-3 ready", Duration::from_secs(30));
    let ready3 = || -> Value {
        let n = c.json(&["get", "node", "agent-3"]);
        n["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Ready").cloned())
            .unwrap_or(Value::Null)
    };
    let down = eventually(
        "agent-3 NotReady without containerd",
        Duration::from_secs(30),
        || {
            let r = ready3();
            (r["status"] == "False").then_some(r)
        },
    );
    println!("agent-3 without containerd: {down}");
    assert!(
        down["message"]
            .as_str()
            .is_some_and(|m| m.contains("containerd is unreachable")),
        "{down}"
    );
    assert_eq!(down["reason"], "KubeletNotReady");
    let containerd3 = ContainerdProcess::start(&ctrd3_dir).expect("start containerd 3");
    let t = Instant::now();
    let up = eventually(
        "agent-3 Ready once containerd answers",
        Duration::from_secs(30),
        || {
            let r = ready3();
            (r["status"] == "True").then_some(r)
        },
    );
    println!(
        "agent-3 Ready {} ms after containerd started",
        t.elapsed().as_millis()
    );
    assert_eq!(up["reason"], "KubeletReady");
    drop(containerd3);
    let t = Instant::now();
    eventually(
        "agent-3 NotReady after containerd stopped",
        Duration::from_secs(30),
        || (ready3()["status"] == "False").then_some(()),
    );
    println!(
        "agent-3 NotReady {} ms after containerd stopped",
        t.elapsed().as_millis()
    );
    drop(agent3);

    drop(agents);
    drop(sched);
    drop(cm);
    drop(apiserver);
    drop(containerd);
    drop(registry);
    drop(auth_registry);
}
