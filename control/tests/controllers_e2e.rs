//! End-to-end: a real skiff-apiserver, real skiff-controller-manager processes and the
//! real kubectl. ReplicaSets (create, scale, adopt, Events), the garbage collector's
//! three deletion modes, the namespace deletion cascade, the `default` ServiceAccount,
//! and leader election (one leader out of two; the standby takes over after a kill and
//! does not duplicate what the old leader did).
//!
//! Pods are never bound to a node here, so deleting one is immediate.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{ApiServer, Backend, Component, LEASE, RENEW, RETRY, assert_success, eventually};

const WAIT: Duration = Duration::from_secs(30);

#[track_caller]
fn ok(s: &ApiServer, args: &[&str]) -> String {
    assert_success(&s.kubectl(args), &format!("kubectl {}", args.join(" ")))
}

#[track_caller]
fn json(s: &ApiServer, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let out = ok(s, &a);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {a:?}: bad JSON ({e}):\n{out}"))
}

fn apply(s: &ApiServer, name: &str, manifest: &str) {
    let f = s.write_file(name, manifest);
    ok(s, &["apply", "-f", f.to_str().unwrap()]);
}

fn replicaset(name: &str, ns: &str, replicas: u32) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: {name}
  namespace: {ns}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
    spec:
      containers:
      - name: c
        image: registry.local/pause:1
"#
    )
}

/// Pods with label app=<app> in `ns` (including terminating ones).
fn pods(s: &ApiServer, ns: &str, app: &str) -> Vec<Value> {
    let l = format!("app={app}");
    json(s, &["get", "pods", "-n", ns, "-l", &l])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn exists(s: &ApiServer, args: &[&str]) -> bool {
    s.kubectl(&[args, &["-o", "name"]].concat())
        .status
        .success()
}

fn wait_pod_count(s: &ApiServer, ns: &str, app: &str, n: usize) -> Vec<Value> {
    eventually(&format!("{n} pods app={app} in {ns}"), WAIT, || {
        let p = pods(s, ns, app);
        (p.len() == n).then_some(p)
    })
}

fn uid(s: &ApiServer, args: &[&str]) -> String {
    json(s, args)["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn replicaset_scaling_adoption_and_deletion_modes() {
    let s = ApiServer::start(Backend::Embedded);
    let cm = Component::controller_manager(&s, "cm-0");
    cm.wait_leader(WAIT);

    // 3 replicas -> 3 pods controlled by the ReplicaSet.
    apply(&s, "web.yaml", &replicaset("web", "default", 3));
    let rs_uid = uid(&s, &["get", "rs", "web"]);
    let p = wait_pod_count(&s, "default", "web", 3);
    for pod in &p {
        let name = pod["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("web-"), "generateName: {name}");
        let refs = pod["metadata"]["ownerReferences"]
            .as_array()
            .expect("ownerReferences");
        assert_eq!(refs.len(), 1, "{name}: {refs:?}");
        assert_eq!(refs[0]["kind"], "ReplicaSet");
        assert_eq!(refs[0]["name"], "web");
        assert_eq!(refs[0]["uid"], rs_uid.as_str());
        assert_eq!(refs[0]["controller"], true);
        assert_eq!(refs[0]["blockOwnerDeletion"], true);
    }
    eventually("status.replicas=3", WAIT, || {
        let rs = json(&s, &["get", "rs", "web"]);
        (rs["status"]["replicas"] == 3
            && rs["status"]["observedGeneration"] == rs["metadata"]["generation"])
            .then_some(())
    });
    let describe = ok(&s, &["describe", "rs", "web"]);
    assert!(
        describe.contains("SuccessfulCreate") && describe.contains("Created pod: web-"),
        "kubectl describe shows no SuccessfulCreate event:\n{describe}"
    );

    // Scale down to 1 (through the scale subresource).
    ok(&s, &["scale", "rs", "web", "--replicas=1"]);
    wait_pod_count(&s, "default", "web", 1);
    eventually("status.replicas=1", WAIT, || {
        (json(&s, &["get", "rs", "web"])["status"]["replicas"] == 1).then_some(())
    });
    eventually("SuccessfulDelete event", WAIT, || {
        ok(&s, &["describe", "rs", "web"])
            .contains("SuccessfulDelete")
            .then_some(())
    });
    // A pod deleted by hand is replaced.
    let victim = pods(&s, "default", "web")[0]["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    ok(&s, &["delete", "pod", &victim]);
    eventually("a replacement pod", WAIT, || {
        let p = pods(&s, "default", "web");
        (p.len() == 1 && p[0]["metadata"]["name"] != victim.as_str()).then_some(())
    });

    // Background (the default): the ReplicaSet goes at once, its pods follow.
    ok(&s, &["delete", "rs", "web"]);
    wait_pod_count(&s, "default", "web", 0);

    // Orphan: the ReplicaSet goes, the pods stay without an ownerReference.
    apply(&s, "orph.yaml", &replicaset("orph", "default", 2));
    wait_pod_count(&s, "default", "orph", 2);
    ok(
        &s,
        &["delete", "rs", "orph", "--cascade=orphan", "--timeout=60s"],
    );
    assert!(!exists(&s, &["get", "rs", "orph"]));
    std::thread::sleep(Duration::from_secs(3));
    let orphans = wait_pod_count(&s, "default", "orph", 2);
    for pod in &orphans {
        assert!(
            pod["metadata"]["ownerReferences"]
                .as_array()
                .is_none_or(Vec::is_empty),
            "orphaned pod still has owners: {}",
            pod["metadata"]
        );
    }
    // A new ReplicaSet with the same selector adopts them instead of creating more.
    apply(&s, "orph2.yaml", &replicaset("orph", "default", 2));
    let new_uid = uid(&s, &["get", "rs", "orph"]);
    eventually("the orphans adopted", WAIT, || {
        let p = pods(&s, "default", "orph");
        (p.len() == 2
            && p.iter()
                .all(|p| p["metadata"]["ownerReferences"][0]["uid"] == new_uid.as_str()))
        .then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        pods(&s, "default", "orph").len(),
        2,
        "adoption must not create extra pods"
    );

    // Foreground: while a dependent is still there (held by a finalizer) the ReplicaSet
    // stays, marked for deletion; once it is gone, the ReplicaSet goes.
    apply(&s, "fg.yaml", &replicaset("fg", "default", 2));
    let p = wait_pod_count(&s, "default", "fg", 2);
    let held = p[0]["metadata"]["name"].as_str().unwrap().to_string();
    ok(
        &s,
        &[
            "patch",
            "pod",
            &held,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["e2e.skiff.dev/hold"]}}"#,
        ],
    );
    ok(
        &s,
        &["delete", "rs", "fg", "--cascade=foreground", "--wait=false"],
    );
    eventually("the unheld pod deleted", WAIT, || {
        let p = pods(&s, "default", "fg");
        (p.len() == 1 && !p[0]["metadata"]["deletionTimestamp"].is_null()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let rs = json(&s, &["get", "rs", "fg"]);
    assert!(
        !rs["metadata"]["deletionTimestamp"].is_null(),
        "{}",
        rs["metadata"]
    );
    assert!(
        rs["metadata"]["finalizers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "foregroundDeletion"),
        "{}",
        rs["metadata"]
    );
    ok(
        &s,
        &[
            "patch",
            "pod",
            &held,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
    );
    eventually("the foreground-deleted ReplicaSet gone", WAIT, || {
        (!exists(&s, &["get", "rs", "fg"])).then_some(())
    });
    assert!(pods(&s, "default", "fg").is_empty());

    // Two levels, Deployment -> ReplicaSet -> Pods (made by the Deployment controller).
    // Foreground deletion of the Deployment deletes the ReplicaSet in the foreground
    // too, so when kubectl sees the Deployment gone, the pods are already gone.
    apply(&s, "d.yaml", DEPLOYMENT);
    wait_pod_count(&s, "default", "d", 2);
    let rs_of_d = || {
        json(&s, &["get", "rs", "-l", "app=d"])["items"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0)
    };
    assert_eq!(rs_of_d(), 1);
    ok(
        &s,
        &[
            "delete",
            "deployment",
            "d",
            "--cascade=foreground",
            "--timeout=60s",
        ],
    );
    assert!(!exists(&s, &["get", "deployment", "d"]));
    assert_eq!(rs_of_d(), 0, "ReplicaSet outlived its Deployment");
    assert!(
        pods(&s, "default", "d").is_empty(),
        "pods outlived their Deployment"
    );
    drop(cm);
}

const DEPLOYMENT: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: d
  namespace: default
spec:
  replicas: 2
  selector:
    matchLabels:
      app: d
  template:
    metadata:
      labels:
        app: d
    spec:
      containers:
      - name: c
        image: registry.local/pause:1
"#;

const NS_X: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n";
const CONTENT_X: &str = r#"apiVersion: v1
kind: ConfigMap
metadata:
  name: cfg
  namespace: x
data:
  a: b
---
apiVersion: v1
kind: Secret
metadata:
  name: sec
  namespace: x
stringData:
  a: b
"#;

#[test]
fn namespace_deletion_and_default_serviceaccount() {
    let s = ApiServer::start(Backend::Embedded);
    let cm = Component::controller_manager(&s, "cm-0");
    cm.wait_leader(WAIT);

    // (apply, not `kubectl create`: that one sends protobuf, which the apiserver does
    // not accept yet.)
    apply(&s, "ns.yaml", NS_X);
    eventually("serviceaccount default in x", WAIT, || {
        exists(&s, &["get", "serviceaccount", "default", "-n", "x"]).then_some(())
    });
    // A deleted default ServiceAccount comes back.
    ok(&s, &["delete", "serviceaccount", "default", "-n", "x"]);
    eventually("serviceaccount default recreated", WAIT, || {
        exists(&s, &["get", "serviceaccount", "default", "-n", "x"]).then_some(())
    });

    apply(&s, "rs.yaml", &replicaset("app", "x", 2));
    apply(&s, "content.yaml", CONTENT_X);
    wait_pod_count(&s, "x", "app", 2);

    let started = Instant::now();
    ok(&s, &["delete", "namespace", "x", "--timeout=60s"]);
    eprintln!("namespace deletion took {:?}", started.elapsed());
    assert!(!exists(&s, &["get", "namespace", "x"]));
    let left = ok(
        &s,
        &[
            "get",
            "pods,rs,configmaps,secrets,serviceaccounts",
            "-n",
            "x",
            "-o",
            "name",
        ],
    );
    assert!(left.trim().is_empty(), "left in namespace x: {left}");

    // A namespace stays Terminating while content remains (here: held by a finalizer)
    // and says why in its conditions.
    apply(&s, "ns-y.yaml", &NS_X.replace("name: x", "name: held"));
    apply(
        &s,
        "held.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: held\n  namespace: held\n  finalizers: [e2e.skiff.dev/hold]\n",
    );
    ok(&s, &["delete", "namespace", "held", "--wait=false"]);
    let cond = eventually("NamespaceContentRemaining=True on held", WAIT, || {
        let ns = json(&s, &["get", "namespace", "held"]);
        let c = ns["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "NamespaceContentRemaining" && c["status"] == "True")?;
        (ns["status"]["phase"] == "Terminating").then(|| c.clone())
    });
    assert!(
        cond["message"]
            .as_str()
            .unwrap_or("")
            .contains("configmaps has 1 resource instances"),
        "{cond}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        exists(&s, &["get", "namespace", "held"]),
        "namespace went before its content"
    );
    ok(
        &s,
        &[
            "patch",
            "configmap",
            "held",
            "-n",
            "held",
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
    );
    eventually("namespace held gone", WAIT, || {
        (!exists(&s, &["get", "namespace", "held"])).then_some(())
    });

    // The namespace can be made again, and gets its ServiceAccount again.
    apply(&s, "ns.yaml", NS_X);
    eventually("serviceaccount default in the new x", WAIT, || {
        exists(&s, &["get", "serviceaccount", "default", "-n", "x"]).then_some(())
    });
    drop(cm);
}

#[test]
fn leader_election_failover_without_double_action() {
    let mut s = ApiServer::start(Backend::Embedded);
    let mut a = Component::controller_manager(&s, "cm-a");
    let mut b = Component::controller_manager(&s, "cm-b");
    let lease = |s: &ApiServer| {
        json(
            s,
            &[
                "get",
                "lease",
                "-n",
                "kube-system",
                "skiff-controller-manager",
            ],
        )
    };

    // Exactly one of them leads, and the Lease says which.
    eventually("a leader", WAIT, || {
        (a.is_leader() || b.is_leader()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2 * RETRY + 1));
    assert!(
        a.is_leader() != b.is_leader(),
        "two leaders\n{}\n{}",
        a.logs(),
        b.logs()
    );
    let (leader, standby) = if a.is_leader() {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let l = lease(&s);
    assert_eq!(l["spec"]["holderIdentity"], leader.identity.as_str(), "{l}");
    assert_eq!(l["spec"]["leaseDurationSeconds"], LEASE);
    assert!(
        !l["spec"]["renewTime"].is_null() && !l["spec"]["acquireTime"].is_null(),
        "{l}"
    );
    let transitions = l["spec"]["leaseTransitions"].as_i64().unwrap_or(0);

    apply(&s, "before.yaml", &replicaset("before", "default", 2));
    wait_pod_count(&s, "default", "before", 2);

    // Kill the leader; the standby takes over once the Lease has expired.
    leader.kill();
    let killed = Instant::now();
    let bound = Duration::from_secs(LEASE + 2 * RETRY + 2);
    standby.wait_leader(bound);
    eprintln!(
        "takeover {:?} after the kill (lease {LEASE}s)",
        killed.elapsed()
    );
    let l = lease(&s);
    assert_eq!(
        l["spec"]["holderIdentity"],
        standby.identity.as_str(),
        "{l}"
    );
    assert_eq!(
        l["spec"]["leaseTransitions"].as_i64().unwrap_or(0),
        transitions + 1,
        "{l}"
    );

    // The new leader creates exactly the replicas asked for, and nothing more for the
    // ReplicaSet the old leader already satisfied.
    apply(&s, "after.yaml", &replicaset("after", "default", 3));
    wait_pod_count(&s, "default", "after", 3);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        pods(&s, "default", "after").len(),
        3,
        "duplicate pods\n{}",
        standby.logs()
    );
    assert_eq!(
        pods(&s, "default", "before").len(),
        2,
        "duplicate pods\n{}",
        standby.logs()
    );
    let creates = ok(
        &s,
        &[
            "get",
            "events",
            "--field-selector",
            "reason=SuccessfulCreate",
            "-o",
            "name",
        ],
    );
    assert_eq!(
        creates.lines().count(),
        5,
        "one SuccessfulCreate per pod:\n{creates}"
    );

    // Without an apiserver the leader cannot renew: it stops (exits non-zero) once the
    // renew deadline has passed, before its Lease could expire for anyone else.
    s.kill();
    let status = standby.wait_exit(Duration::from_secs(RENEW + 2 * RETRY + 5));
    assert!(!status.success(), "{status}");
}

#[test]
fn graceful_shutdown_hands_the_lease_over_at_once() {
    let s = ApiServer::start(Backend::Embedded);
    let mut a = Component::controller_manager(&s, "cm-a");
    a.wait_leader(WAIT);
    let b = Component::controller_manager(&s, "cm-b");
    std::thread::sleep(Duration::from_secs(2 * RETRY));
    assert!(!b.is_leader());
    // SIGTERM: the leader releases the Lease, so the standby need not wait for expiry.
    let sent = Instant::now();
    let pid = a.child.as_ref().expect("running").id() as libc::pid_t;
    // SAFETY: plain kill(2) on a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = a.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", a.logs());
    b.wait_leader(Duration::from_secs(LEASE - 1));
    eprintln!("handover {:?} after SIGTERM", sent.elapsed());
}
