//! End to end for [2]: a real apiserver, controller-manager and scheduler, hollow nodes
//! (skiff_control::hollow) as kubelets, and the real kubectl. Deployments roll, undo,
//! scale and cascade; the scheduler honours taints, resources and reports why a pod
//! does not fit; a dead node is tainted and its pods replaced elsewhere; namespaces
//! empty out; Endpoints/EndpointSlices follow readiness; nodes get podCIDRs; DaemonSets
//! cover nodes; LoadBalancer Services get an address; a second scheduler takes over
//! without binding anything twice.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use kube::runtime::watcher;
use serde_json::Value;
use skiff_control::hollow::{HollowNode, READY_ANNOTATION};
use support::cluster::{Cluster, ClusterOpts, FAST_NODE_LIFECYCLE, node_of, pod_is_ready_and_live};
use support::{Component, assert_failure, eventually};

const WAIT: Duration = Duration::from_secs(60);

fn deployment(ns: &str, name: &str, replicas: u32, image: &str, extra_spec: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  namespace: {ns}
spec:
  replicas: {replicas}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxUnavailable: 1, maxSurge: 1}}
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
{extra_spec}      containers:
      - name: c
        image: {image}
        ports: [{{name: http, containerPort: 8080}}]
        resources: {{requests: {{cpu: 100m, memory: 64Mi}}}}
"#
    )
}

fn service(ns: &str, name: &str, type_: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
  namespace: {ns}
spec:
  type: {type_}
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"#
    )
}

/// Watches pods app=<app> and records, after every event, (ready-and-live, live) counts.
fn observe_pods(c: &Cluster, ns: &str, app: &str) -> Arc<Mutex<Vec<(usize, usize)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let api: Api<Pod> = Api::namespaced(c.client(), ns);
    let cfg = watcher::Config::default().labels(&format!("app={app}"));
    let out = seen.clone();
    c.rt.spawn(async move {
        let mut pods: HashMap<String, (bool, bool)> = HashMap::new();
        let mut events = watcher(api, cfg).boxed();
        // Counts are recorded from the end of the initial list on, not while it fills.
        let mut listed = false;
        while let Some(Ok(ev)) = events.next().await {
            let mut touched = vec![];
            match ev {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => touched.push((p, true)),
                watcher::Event::Delete(p) => touched.push((p, false)),
                watcher::Event::InitDone => listed = true,
                watcher::Event::Init => {}
            }
            for (p, present) in touched {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                if present {
                    let v = serde_json::to_value(&p).unwrap_or_default();
                    let live = p.metadata.deletion_timestamp.is_none();
                    pods.insert(uid, (pod_is_ready_and_live(&v), live));
                } else {
                    pods.remove(&uid);
                }
            }
            if !listed {
                continue;
            }
            let ready = pods.values().filter(|(r, _)| *r).count();
            let live = pods.values().filter(|(_, l)| *l).count();
            out.lock().unwrap().push((ready, live));
        }
    });
    seen
}

fn images(c: &Cluster, ns: &str, app: &str) -> BTreeSet<String> {
    c.pods(ns, app)
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .map(|p| {
            p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

fn rollout_status(c: &Cluster, ns: &str, name: &str) -> String {
    c.ok(&[
        "rollout",
        "status",
        "-n",
        ns,
        &format!("deployment/{name}"),
        "--timeout=60s",
    ])
}

#[test]
fn deployment_rolls_out_undoes_scales_and_cascades() {
    let c = Cluster::start(ClusterOpts::default());
    c.ok(&["create", "namespace", "roll"]);
    c.apply(
        "web.yaml",
        &format!(
            "{}---\n{}",
            deployment("roll", "web", 5, "registry.local/web:1", ""),
            service("roll", "web", "ClusterIP")
        ),
    );
    let out = rollout_status(&c, "roll", "web");
    assert!(out.contains("successfully rolled out"), "{out}");
    let pods = c.wait_ready_pods("roll", "web", 5, WAIT);
    let nodes: BTreeSet<String> = pods.iter().map(node_of).collect();
    assert_eq!(nodes.len(), 3, "5 pods spread over all 3 nodes: {nodes:?}");

    let get = c.ok(&["get", "deploy", "web", "-n", "roll"]);
    let row: Vec<&str> = get
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(&row[..4], &["web", "5/5", "5", "5"], "{get}");
    let describe = c.ok(&["describe", "deploy", "web", "-n", "roll"]);
    assert!(describe.contains("ScalingReplicaSet"), "{describe}");
    let pod_name = pods[0]["metadata"]["name"].as_str().unwrap();
    let scheduled = c.events("roll", pod_name, "Scheduled");
    assert!(
        scheduled
            .iter()
            .any(|m| m.starts_with("Successfully assigned roll/")),
        "{scheduled:?}"
    );

    // Endpoints and EndpointSlices list the five ready pods on the named port.
    let pod_ips: BTreeSet<String> = pods
        .iter()
        .map(|p| p["status"]["podIP"].as_str().unwrap().to_string())
        .collect();
    eventually("Endpoints of web", WAIT, || {
        let ep = c.json(&["get", "endpoints", "web", "-n", "roll"]);
        let ips: BTreeSet<String> = ep["subsets"][0]["addresses"]
            .as_array()?
            .iter()
            .map(|a| a["ip"].as_str().unwrap_or("").to_string())
            .collect();
        (ips == pod_ips && ep["subsets"][0]["ports"][0]["port"] == 8080).then_some(())
    });
    eventually("EndpointSlice of web", WAIT, || {
        let slices = c.items(&[
            "get",
            "endpointslices",
            "-n",
            "roll",
            "-l",
            "kubernetes.io/service-name=web",
        ]);
        let ready: BTreeSet<String> = slices
            .iter()
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter(|e| e["conditions"]["ready"] == true)
            .map(|e| e["addresses"][0].as_str().unwrap_or("").to_string())
            .collect();
        (ready == pod_ips).then_some(())
    });

    // A readiness failure moves the pod to notReadyAddresses and ready=false.
    c.ok(&[
        "annotate",
        "pod",
        "-n",
        "roll",
        pod_name,
        &format!("{READY_ANNOTATION}=false"),
    ]);
    let not_ready_ip = pods[0]["status"]["podIP"].as_str().unwrap().to_string();
    eventually("not-ready pod leaves Endpoints addresses", WAIT, || {
        let ep = c.json(&["get", "endpoints", "web", "-n", "roll"]);
        let nr = ep["subsets"][0]["notReadyAddresses"].as_array()?;
        nr.iter()
            .any(|a| a["ip"] == not_ready_ip.as_str())
            .then_some(())
    });
    c.ok(&[
        "annotate",
        "pod",
        "-n",
        "roll",
        pod_name,
        &format!("{READY_ANNOTATION}-"),
    ]);
    c.ok(&[
        "annotate",
        "pod",
        "-n",
        "roll",
        pod_name,
        &format!("{READY_ANNOTATION}=true"),
    ]);
    c.wait_ready_pods("roll", "web", 5, WAIT);

    // Image change: never fewer than 5-1 ready pods, never more than 5+1 live ones.
    let seen = observe_pods(&c, "roll", "web");
    eventually("pod observer started", WAIT, || {
        (!seen.lock().unwrap().is_empty()).then_some(())
    });
    c.ok(&[
        "set",
        "image",
        "-n",
        "roll",
        "deployment/web",
        "c=registry.local/web:2",
    ]);
    rollout_status(&c, "roll", "web");
    c.wait_ready_pods("roll", "web", 5, WAIT);
    assert_eq!(
        images(&c, "roll", "web"),
        BTreeSet::from(["registry.local/web:2".to_string()])
    );
    {
        let seen = seen.lock().unwrap();
        let min_ready = seen.iter().map(|(r, _)| *r).min().unwrap();
        let max_live = seen.iter().map(|(_, l)| *l).max().unwrap();
        assert!(min_ready >= 4, "maxUnavailable=1 violated: {seen:?}");
        assert!(max_live <= 6, "maxSurge=1 violated: {seen:?}");
        assert!(
            seen.len() > 5,
            "the rollout was observed step by step: {seen:?}"
        );
    }
    let rs = c.items(&["get", "rs", "-n", "roll", "-l", "app=web"]);
    assert_eq!(rs.len(), 2, "old and new ReplicaSet");
    let history = c.ok(&["rollout", "history", "-n", "roll", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");

    // Undo goes back to image 1 (kubectl reads the revision annotations).
    c.ok(&["rollout", "undo", "-n", "roll", "deployment/web"]);
    rollout_status(&c, "roll", "web");
    c.wait_ready_pods("roll", "web", 5, WAIT);
    assert_eq!(
        images(&c, "roll", "web"),
        BTreeSet::from(["registry.local/web:1".to_string()])
    );
    let d = c.json(&["get", "deploy", "web", "-n", "roll"]);
    assert_eq!(
        d["metadata"]["annotations"]["deployment.kubernetes.io/revision"],
        "3"
    );

    // Scale to 0 and back.
    c.ok(&["scale", "-n", "roll", "deployment/web", "--replicas=0"]);
    eventually("no pods", WAIT, || {
        c.pods("roll", "web").is_empty().then_some(())
    });
    eventually("deploy reports 0", WAIT, || {
        let d = c.json(&["get", "deploy", "web", "-n", "roll"]);
        (d["status"]["replicas"].as_i64().unwrap_or(0) == 0
            && d["status"]["observedGeneration"] == d["metadata"]["generation"])
            .then_some(())
    });
    c.ok(&["scale", "-n", "roll", "deployment/web", "--replicas=5"]);
    rollout_status(&c, "roll", "web");
    c.wait_ready_pods("roll", "web", 5, WAIT);

    // --cascade=orphan: ReplicaSets and pods stay, without their owner.
    c.ok(&["delete", "deploy", "web", "-n", "roll", "--cascade=orphan"]);
    std::thread::sleep(Duration::from_secs(2));
    let rs = c.items(&["get", "rs", "-n", "roll", "-l", "app=web"]);
    assert_eq!(rs.len(), 2, "orphaned ReplicaSets remain");
    assert!(rs.iter().all(|r| {
        r["metadata"]["ownerReferences"]
            .as_array()
            .is_none_or(|o| o.is_empty())
    }));
    assert_eq!(c.pods("roll", "web").len(), 5);
    c.ok(&["delete", "rs", "-n", "roll", "-l", "app=web"]);
    eventually("background cascade removes the pods", WAIT, || {
        c.pods("roll", "web").is_empty().then_some(())
    });

    // --cascade=foreground: the Deployment is gone only after its pods.
    c.apply(
        "api.yaml",
        &deployment("roll", "api", 3, "registry.local/api:1", ""),
    );
    c.wait_ready_pods("roll", "api", 3, WAIT);
    c.ok(&[
        "delete",
        "deploy",
        "api",
        "-n",
        "roll",
        "--cascade=foreground",
        "--timeout=60s",
    ]);
    assert!(
        c.pods("roll", "api").is_empty(),
        "foreground delete returns after the pods are gone"
    );
    assert!(
        c.items(&["get", "rs", "-n", "roll", "-l", "app=api"])
            .is_empty()
    );
}

#[test]
fn scheduler_honours_taints_and_resources_and_says_why() {
    let c = Cluster::start(ClusterOpts {
        nodes: vec![
            HollowNode::named("node-1"),
            HollowNode::named("node-2"),
            HollowNode::named("gpu-1").taint("dedicated", "gpu", "NoSchedule"),
        ],
        ..ClusterOpts::default()
    });
    c.ok(&["create", "namespace", "sched"]);
    c.apply(
        "plain.yaml",
        &deployment("sched", "plain", 6, "registry.local/a:1", ""),
    );
    let tolerating = "      tolerations:\n      - {key: dedicated, operator: Equal, value: gpu, effect: NoSchedule}\n      nodeSelector: {kubernetes.io/hostname: gpu-1}\n";
    c.apply(
        "gpu.yaml",
        &deployment("sched", "gpu", 2, "registry.local/b:1", tolerating),
    );
    let plain = c.wait_ready_pods("sched", "plain", 6, WAIT);
    assert!(
        plain.iter().all(|p| node_of(p) != "gpu-1"),
        "untolerating pods avoid the tainted node"
    );
    let gpu = c.wait_ready_pods("sched", "gpu", 2, WAIT);
    assert!(gpu.iter().all(|p| node_of(p) == "gpu-1"));

    // More cpu than any node has: Unschedulable, with a per-node reason.
    c.apply(
        "big.yaml",
        r#"apiVersion: v1
kind: Pod
metadata: {name: big, namespace: sched}
spec:
  containers:
  - name: c
    image: registry.local/big:1
    resources: {requests: {cpu: "6"}}
"#,
    );
    let msg = eventually("FailedScheduling event", WAIT, || {
        c.events("sched", "big", "FailedScheduling")
            .into_iter()
            .next()
    });
    assert_eq!(
        msg,
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, 2 Insufficient cpu.",
    );
    let pod = c.json(&["get", "pod", "big", "-n", "sched"]);
    let cond = pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodScheduled")
        .cloned()
        .unwrap();
    assert_eq!(
        (cond["status"].as_str(), cond["reason"].as_str()),
        (Some("False"), Some("Unschedulable"))
    );
    let describe = c.ok(&["describe", "pod", "big", "-n", "sched"]);
    assert!(describe.contains("FailedScheduling"), "{describe}");

    // A node that fits appears: the pending pod is retried and placed there.
    c.add_node(HollowNode::named("big-1").cpu("8"));
    let placed = eventually("big pod scheduled", WAIT, || {
        let p = c.json(&["get", "pod", "big", "-n", "sched"]);
        p["spec"]["nodeName"].as_str().map(str::to_string)
    });
    assert_eq!(placed, "big-1");
}

#[test]
fn dead_node_is_tainted_and_its_pods_are_replaced() {
    let c = Cluster::start(ClusterOpts {
        controller_manager_args: FAST_NODE_LIFECYCLE,
        ..ClusterOpts::default()
    });
    c.ok(&["create", "namespace", "evict"]);
    c.apply(
        "web.yaml",
        &format!(
            "{}---\n{}",
            deployment("evict", "web", 6, "registry.local/web:1", ""),
            service("evict", "web", "ClusterIP")
        ),
    );
    let pods = c.wait_ready_pods("evict", "web", 6, WAIT);
    let victims: BTreeSet<String> = pods
        .iter()
        .filter(|p| node_of(p) == "node-1")
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!victims.is_empty(), "node-1 runs some pods");

    c.hollow.stop("node-1");
    let node = eventually(
        "node-1 NotReady (Unknown) and tainted unreachable",
        WAIT,
        || {
            let n = c.json(&["get", "node", "node-1"]);
            let ready = n["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")?
                .clone();
            let tainted = n["spec"]["taints"].as_array()?.iter().any(|t| {
                t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute"
            });
            (ready["status"] == "Unknown" && tainted).then_some(n)
        },
    );
    assert_eq!(
        node["status"]["conditions"][0]["reason"], "NodeStatusUnknown",
        "{node}"
    );
    let get = c.ok(&["get", "nodes"]);
    assert!(
        get.lines()
            .any(|l| l.starts_with("node-1") && l.contains("NotReady")),
        "{get}"
    );

    // After the (2 s) toleration the pods are evicted and replaced on live nodes.
    let replaced = eventually("6 ready pods on live nodes", WAIT, || {
        let p: Vec<Value> = c
            .pods("evict", "web")
            .into_iter()
            .filter(pod_is_ready_and_live)
            .collect();
        (p.len() == 6 && p.iter().all(|p| node_of(p) != "node-1")).then_some(p)
    });
    assert!(
        replaced
            .iter()
            .all(|p| !victims.contains(p["metadata"]["name"].as_str().unwrap()))
    );
    let victim = victims.iter().next().unwrap();
    let evicted = c.events("evict", victim, "TaintManagerEviction");
    assert!(!evicted.is_empty(), "an eviction event for {victim}");
    eventually("Endpoints lists only live pods", WAIT, || {
        let ep = c.json(&["get", "endpoints", "web", "-n", "evict"]);
        let addrs = ep["subsets"][0]["addresses"].as_array()?;
        (addrs.len() == 6 && addrs.iter().all(|a| a["nodeName"] != "node-1")).then_some(())
    });
}

#[test]
fn namespace_deletion_removes_bound_pods_and_everything_else() {
    let c = Cluster::start(ClusterOpts::default());
    c.ok(&["create", "namespace", "gone"]);
    c.apply(
        "web.yaml",
        &format!(
            "{}---\n{}",
            deployment("gone", "web", 4, "registry.local/web:1", ""),
            service("gone", "web", "ClusterIP")
        ),
    );
    c.wait_ready_pods("gone", "web", 4, WAIT);
    c.ok(&["delete", "namespace", "gone", "--timeout=90s"]);
    let out = c.api.kubectl(&["get", "namespace", "gone"]);
    assert_failure(&out, "namespace is gone");
    for kind in ["pods", "deploy", "rs", "endpoints", "endpointslices", "svc"] {
        assert!(
            c.items(&["get", kind, "-n", "gone"]).is_empty(),
            "{kind} left in a deleted namespace"
        );
    }
}

#[test]
fn nodes_get_pod_cidrs_daemonsets_cover_nodes_and_load_balancers_get_addresses() {
    let c = Cluster::start(ClusterOpts {
        nodes: vec![
            HollowNode::named("node-1"),
            HollowNode::named("node-2"),
            HollowNode::named("tainted-1").taint("dedicated", "infra", "NoSchedule"),
        ],
        controller_manager_args: &["--load-balancer-pool", "172.31.255.200/30"],
        ..ClusterOpts::default()
    });
    let cidrs: BTreeMap<String, String> = eventually("every node has a podCIDR", WAIT, || {
        let nodes = c.items(&["get", "nodes"]);
        let m: BTreeMap<String, String> = nodes
            .iter()
            .filter_map(|n| {
                Some((
                    n["metadata"]["name"].as_str()?.to_string(),
                    n["spec"]["podCIDR"].as_str()?.to_string(),
                ))
            })
            .collect();
        (m.len() == 3).then_some(m)
    });
    let distinct: BTreeSet<&String> = cidrs.values().collect();
    assert_eq!(distinct.len(), 3, "{cidrs:?}");
    assert!(
        cidrs
            .values()
            .all(|c| c.starts_with("10.244.") && c.ends_with(".0/24")),
        "{cidrs:?}"
    );

    c.ok(&["create", "namespace", "infra"]);
    c.apply(
        "ds.yaml",
        r#"apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: infra}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      containers: [{name: c, image: registry.local/agent:1}]
"#,
    );
    let pods = c.wait_ready_pods("infra", "agent", 2, WAIT);
    let nodes: BTreeSet<String> = pods.iter().map(node_of).collect();
    assert_eq!(
        nodes,
        BTreeSet::from(["node-1".to_string(), "node-2".to_string()])
    );
    eventually("DaemonSet status", WAIT, || {
        let ds = c.json(&["get", "ds", "agent", "-n", "infra"]);
        (ds["status"]["desiredNumberScheduled"] == 2 && ds["status"]["numberReady"] == 2)
            .then_some(())
    });
    // Tolerating the taint extends it to the third node.
    c.ok(&[
        "patch", "ds", "agent", "-n", "infra", "--type=merge", "-p",
        r#"{"spec":{"template":{"spec":{"tolerations":[{"key":"dedicated","operator":"Exists"}]}}}}"#,
    ]);
    // The rolling update replaces the old pods one node at a time; wait for its end.
    let pods = eventually("3 updated daemon pods, one per node", WAIT, || {
        let p: Vec<Value> = c
            .pods("infra", "agent")
            .into_iter()
            .filter(pod_is_ready_and_live)
            .collect();
        let updated = p.iter().all(|p| {
            p["spec"]["tolerations"]
                .as_array()
                .is_some_and(|t| t.iter().any(|t| t["key"] == "dedicated"))
        });
        (p.len() == 3 && updated).then_some(p)
    });
    assert_eq!(pods.iter().map(node_of).collect::<BTreeSet<_>>().len(), 3);

    // LoadBalancer Services get addresses from the pool, distinct ones.
    c.apply("lb1.yaml", &service("infra", "lb-a", "LoadBalancer"));
    c.apply("lb2.yaml", &service("infra", "lb-b", "LoadBalancer"));
    let ip = |name: &str| {
        eventually(&format!("{name} gets an ingress IP"), WAIT, || {
            let s = c.json(&["get", "svc", name, "-n", "infra"]);
            s["status"]["loadBalancer"]["ingress"][0]["ip"]
                .as_str()
                .map(str::to_string)
        })
    };
    let (a, b) = (ip("lb-a"), ip("lb-b"));
    assert_ne!(a, b);
    for x in [&a, &b] {
        assert!(
            x.starts_with("172.31.255.20"),
            "{x} is from 172.31.255.200/30"
        );
    }
    let get = c.ok(&["get", "svc", "lb-a", "-n", "infra"]);
    assert!(get.contains(&a), "EXTERNAL-IP column: {get}");
}

#[test]
fn scheduler_failover_binds_each_pod_once() {
    let mut c = Cluster::start(ClusterOpts::default());
    let standby = Component::scheduler(&c.api, "scheduler-1");
    c.ok(&["create", "namespace", "ha"]);
    c.apply(
        "a.yaml",
        &deployment("ha", "a", 8, "registry.local/a:1", ""),
    );
    c.wait_ready_pods("ha", "a", 8, WAIT);
    assert!(!standby.is_leader(), "only one scheduler leads");
    // Warm standby, as kube-scheduler: its caches are filled before it leads.
    let synced_by = std::time::Instant::now() + Duration::from_secs(20);
    while !standby.logged("scheduler caches synced") {
        assert!(
            std::time::Instant::now() < synced_by,
            "the standby scheduler did not fill its caches\n{}",
            standby.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!standby.is_leader(), "only one scheduler leads");

    // The leader dies without releasing its Lease; the standby takes over once it
    // expires and places the next pods.
    c.scheduler.kill();
    c.apply(
        "b.yaml",
        &deployment("ha", "b", 8, "registry.local/b:1", ""),
    );
    c.wait_ready_pods("ha", "b", 8, WAIT);
    assert!(standby.is_leader(), "{}", standby.logs());

    let mut scheduled_per_pod: HashMap<String, usize> = HashMap::new();
    for e in c.items(&["get", "events", "-n", "ha"]) {
        if e["reason"] == "Scheduled" {
            *scheduled_per_pod
                .entry(
                    e["involvedObject"]["name"]
                        .as_str()
                        .unwrap_or("")
                        .to_string(),
                )
                .or_default() += 1;
        }
    }
    assert_eq!(scheduled_per_pod.len(), 16, "{scheduled_per_pod:?}");
    assert!(
        scheduled_per_pod.values().all(|n| *n == 1),
        "a pod bound twice: {scheduled_per_pod:?}"
    );
}

#[test]
fn bad_workloads_get_clear_errors_and_do_not_block_others() {
    let c = Cluster::start(ClusterOpts::default());
    c.ok(&["create", "namespace", "bad"]);
    // Selector that does not match the template: 422 naming the field.
    let bad_selector = deployment("bad", "mismatch", 1, "registry.local/a:1", "")
        .replace("matchLabels: {app: mismatch}", "matchLabels: {app: other}");
    let f = c.api.write_file("bad-selector.yaml", &bad_selector);
    let out = c.api.kubectl(&["apply", "-f", f.to_str().unwrap()]);
    let err = assert_failure(&out, "selector mismatch is rejected");
    assert!(
        err.contains("spec.template.metadata.labels") && err.contains("selector"),
        "{err}"
    );
    // A toleration with an unknown operator.
    let bad_toleration = deployment(
        "bad",
        "tol",
        1,
        "registry.local/a:1",
        "      tolerations: [{key: k, operator: Sometimes, value: v}]\n",
    );
    let f = c.api.write_file("bad-tol.yaml", &bad_toleration);
    let err = assert_failure(
        &c.api.kubectl(&["apply", "-f", f.to_str().unwrap()]),
        "bad operator",
    );
    assert!(err.contains("tolerations[0].operator"), "{err}");

    // A Deployment whose ReplicaSet can never be created (its name plus the template
    // hash is longer than a name may be) keeps failing with Events while another
    // Deployment is served normally.
    let long = "x".repeat(250);
    let doomed = deployment("bad", "long", 1, "registry.local/a:1", "")
        .replace("name: long", &format!("name: {long}"));
    c.apply("long.yaml", &doomed);
    c.apply(
        "fine.yaml",
        &deployment("bad", "fine", 2, "registry.local/a:1", ""),
    );
    c.wait_ready_pods("bad", "fine", 2, WAIT);
    let failed = eventually("ReplicaSetCreateError event", WAIT, || {
        c.events("bad", &long, "ReplicaSetCreateError")
            .into_iter()
            .next()
    });
    assert!(
        failed.contains("Failed to create new replica set"),
        "{failed}"
    );
    assert!(c.pods("bad", "long").is_empty());

    // A pod asking for more memory than any node has gets a FailedScheduling event and
    // does not hold up the next pod.
    c.apply(
        "huge.yaml",
        r#"apiVersion: v1
kind: Pod
metadata: {name: huge, namespace: bad}
spec:
  containers: [{name: c, image: registry.local/a:1, resources: {requests: {memory: 1Ti}}}]
"#,
    );
    c.apply(
        "after.yaml",
        &deployment("bad", "after", 2, "registry.local/a:1", ""),
    );
    c.wait_ready_pods("bad", "after", 2, WAIT);
    let msg = eventually("FailedScheduling for huge", WAIT, || {
        c.events("bad", "huge", "FailedScheduling")
            .into_iter()
            .next()
    });
    assert_eq!(msg, "0/3 nodes are available: 3 Insufficient memory.");
}
