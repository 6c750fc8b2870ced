//! A local multi-node cluster on the topology of `cargo xtask up`, for network_e2e and
//! the pod-network bench: a bridge with one network namespace per node
//! (skiff-testbed), a registry and the control plane on the bridge's host address, one
//! containerd, and one skiff-agent per node running inside its namespace with
//! `--pod-network ebpf` and its maps pinned under /sys/fs/bpf/skiff/<node>.
//! Everything is removed on drop (processes by pid, pod networks, pins, namespaces).

use std::{
    collections::BTreeMap,
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use skiff_agent::cni::{
    datapath::{DatapathStat, read_pinned_routes, read_pinned_stats},
    network::{Ipv4Net, netns_name},
};
use skiff_agent::kubelet::{
    containerd_process::ContainerdProcess,
    test_images::{LocalRegistry, busybox_builder},
};
use skiff_testbed::{Topology, TopologyConfig};

use super::{Cleanup, Cluster, Proc, binary, eventually};

/// Removes the bridge and node namespaces on drop (after the agents stopped).
pub struct TopologyGuard(pub Topology);

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.destroy() {
            eprintln!("topology cleanup: {e:#}");
        }
    }
}

/// Removes bpffs pin directories on drop.
pub struct PinsGuard(pub Vec<PathBuf>);

impl Drop for PinsGuard {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// The bpffs directory of `node`'s pinned maps.
pub fn pin_dir(node: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf/skiff").join(node)
}

/// /run/netns/skiff-<uid prefix>: a pod's network namespace.
pub fn pod_netns(uid: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(netns_name(uid))
}

/// Runs `f` on a thread inside the network namespace at `path`.
pub fn in_netns<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> thread::JoinHandle<T> {
    let file = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into a network namespace");
        f()
    })
}

/// Packets counted by `node`'s data path in slot `s` (all CPUs).
pub fn stat(node: &str, s: DatapathStat) -> u64 {
    read_pinned_stats(&pin_dir(node))
        .expect("read the pinned datapath stats")
        .into_iter()
        .find(|(k, _)| *k == s)
        .map(|(_, c)| c.packets)
        .unwrap_or(0)
}

/// A pod pinned to `node` running `script` in the busybox image.
pub fn pod_manifest(name: &str, label: &str, node: &str, image: &str, script: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: default
  labels: {{app: {label}}}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    command: ["sh", "-c", {script:?}]
"#
    )
}

/// Fields drop in order: agents, control plane, containerd, registry, then the network,
/// pins and files.
pub struct NetCluster {
    pub agents: BTreeMap<String, Proc>,
    pub scheduler: Proc,
    pub cm: Proc,
    pub apiserver: Proc,
    pub containerd: ContainerdProcess,
    pub registry: LocalRegistry,
    pub topo: TopologyGuard,
    _pins: PinsGuard,
    _cleanup: Cleanup,
    pub c: Cluster,
    pub dir: PathBuf,
    pub nodes: Vec<String>,
    pub node_ips: BTreeMap<String, Ipv4Addr>,
    pub cidrs: BTreeMap<String, Ipv4Net>,
    /// The busybox image in the cluster's registry.
    pub image: String,
    pub host_ip: Ipv4Addr,
    /// Extra flags for every agent (e.g. `--proxy-mode iptables`).
    pub agent_args: Vec<String>,
}

impl NetCluster {
    /// Starts `node_count` nodes `<name>-1..` on bridge `sk<name>` with subnet
    /// 10.<octet>.0.0/24 and waits until every node is Ready with a podCIDR and every
    /// node's routes map lists all the others.
    pub fn start(name: &str, octet: u8, node_count: u32) -> NetCluster {
        Self::start_with(name, octet, node_count, &[])
    }

    /// [`NetCluster::start`] with extra agent flags.
    pub fn start_with(name: &str, octet: u8, node_count: u32, agent_args: &[&str]) -> NetCluster {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "this needs root (CI runs as root)"
        );
        let dir = PathBuf::from(format!("/tmp/skiff-{name}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let nodes: Vec<String> = (1..=node_count).map(|i| format!("{name}-{i}")).collect();
        let cleanup = Cleanup {
            dir: dir.clone(),
            nodes: nodes.clone(),
        };
        let pins = PinsGuard(nodes.iter().map(|n| pin_dir(n)).collect());
        let host_ip = Ipv4Addr::new(10, octet, 0, 1);
        let topo = Topology::new(TopologyConfig {
            bridge: format!("sk{name}"),
            host_addr: host_ip,
            prefix_len: 24,
            netns_prefix: format!("sk{name}-"),
        })
        .expect("topology config");
        topo.ensure().expect("create the test bridge");
        let topo = TopologyGuard(topo);
        let node_ips: BTreeMap<String, Ipv4Addr> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), Ipv4Addr::new(10, octet, 0, 11 + i as u8)))
            .collect();
        for (n, ip) in &node_ips {
            topo.0.add_node(n, *ip).expect("create a node namespace");
        }
        // LoadBalancer IPs (the controller-manager's pool) are reached through node 1,
        // as a router in front of the cluster would send them.
        topo.0
            .add_host_route(&format!("10.{octet}.1.0/28"), node_ips[&nodes[0]])
            .expect("route the LoadBalancer pool");

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let registry =
            LocalRegistry::start_on(dir.join("registry"), host_ip).expect("start docker-registry");
        let image = super::push_busybox(&rt, &registry);
        let containerd = ContainerdProcess::start(dir.join("ctrd")).expect("start containerd");

        let (apiserver, kubeconfig) =
            super::start_apiserver(&dir, &host_ip.to_string(), binary("skiff-apiserver"));
        let c = Cluster::new(&dir, &kubeconfig);
        let mut cm = Proc::spawn(
            "controller-manager",
            &dir,
            Command::new(binary("skiff-controller-manager"))
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["--load-balancer-pool", &format!("10.{octet}.1.0/28")]),
        );
        cm.wait_stdout("is the leader", Duration::from_secs(30));
        let mut scheduler = Proc::spawn(
            "scheduler",
            &dir,
            Command::new(binary("skiff-scheduler"))
                .arg("--kubeconfig")
                .arg(&kubeconfig),
        );
        scheduler.wait_stdout("is the leader", Duration::from_secs(30));
        let mut me = NetCluster {
            agents: BTreeMap::new(),
            scheduler,
            cm,
            apiserver,
            containerd,
            registry,
            topo,
            _pins: pins,
            _cleanup: cleanup,
            c,
            dir,
            nodes: nodes.clone(),
            node_ips,
            cidrs: BTreeMap::new(),
            image,
            host_ip,
            agent_args: agent_args.iter().map(|a| a.to_string()).collect(),
        };
        for n in &nodes {
            me.start_agent(n);
        }
        me.cidrs = eventually("nodes Ready with podCIDRs", Duration::from_secs(60), || {
            let mut m = BTreeMap::new();
            for n in me.c.items(&["get", "nodes"]) {
                let ready = n["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
                if let (true, Some(cidr)) = (
                    ready,
                    n["spec"]["podCIDR"].as_str().and_then(Ipv4Net::parse),
                ) {
                    m.insert(n["metadata"]["name"].as_str()?.to_string(), cidr);
                }
            }
            (m.len() == nodes.len()).then_some(m)
        });
        for n in &nodes {
            eventually(
                &format!("{n}'s routes map lists the other nodes"),
                Duration::from_secs(30),
                || {
                    let routes = read_pinned_routes(&pin_dir(n)).ok()?;
                    let ok = nodes.iter().filter(|o| *o != n).all(|o| {
                        let ip = me.node_ips[o];
                        routes.get(&me.cidrs[o]) == Some(&ip)
                            && routes.get(&Ipv4Net {
                                addr: ip,
                                prefix: 32,
                            }) == Some(&ip)
                    }) && !routes.contains_key(&me.cidrs[n]);
                    ok.then_some(())
                },
            );
        }
        me
    }

    /// skiff-agent for `node` inside `netns_node`'s namespace (usually the same), without
    /// `--bpffs-dir`.
    pub fn agent_command(&self, node: &str, netns_node: &str, node_ip: Ipv4Addr) -> Command {
        let mut cmd = self.topo.0.node_command(netns_node, binary("skiff-agent"));
        cmd.args(["--node-name", node])
            .arg("--kubeconfig")
            .arg(&self.c.kubeconfig)
            .arg("--containerd-address")
            .arg(self.containerd.socket())
            .arg("--root-dir")
            .arg(self.dir.join(node))
            .args(["--insecure-registry", &self.registry.host()])
            .args(["--node-ip", &node_ip.to_string()])
            .args(["--node-lease-renew-interval", "2", "--sync-frequency", "2"])
            .args(["--port", "10250", "--pod-network", "ebpf"])
            .args(&self.agent_args);
        cmd
    }

    /// Starts (or restarts) `node`'s agent and waits until it is ready.
    pub fn start_agent(&mut self, node: &str) {
        self.stop_agent(node);
        let mut cmd = self.agent_command(node, node, self.node_ips[node]);
        cmd.arg("--bpffs-dir").arg(pin_dir(node));
        let restarts = self
            .dir
            .read_dir()
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .starts_with(&format!("agent-{node}"))
                    })
                    .count()
            })
            .unwrap_or(0);
        let mut a = Proc::spawn(&format!("agent-{node}.{restarts}"), &self.dir, &mut cmd);
        a.wait_stdout(
            &format!("skiff-agent {node} ready"),
            Duration::from_secs(60),
        );
        self.agents.insert(node.to_string(), a);
    }

    /// Stops `node`'s agent (by pid); its programs and maps stay.
    pub fn stop_agent(&mut self, node: &str) {
        if let Some(mut a) = self.agents.remove(node) {
            a.stop();
        }
    }

    /// The agents' logs.
    pub fn logs(&self) -> String {
        self.agents
            .values()
            .map(Proc::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Applies `manifests` and waits until the pods labelled `app=<label>` (`count` of
    /// them) run; name -> (pod IP, uid).
    pub fn run_pods(
        &self,
        label: &str,
        count: usize,
        manifests: &str,
    ) -> BTreeMap<String, (Ipv4Addr, String)> {
        self.c.apply(manifests);
        let selector = format!("app={label}");
        eventually("the pods Running with IPs", Duration::from_secs(90), || {
            let mut m = BTreeMap::new();
            for p in self.c.items(&["get", "pods", "-l", &selector]) {
                if p["status"]["phase"] != "Running" {
                    return None;
                }
                let ip: Ipv4Addr = p["status"]["podIP"].as_str()?.parse().ok()?;
                m.insert(
                    p["metadata"]["name"].as_str()?.to_string(),
                    (ip, p["metadata"]["uid"].as_str()?.to_string()),
                );
            }
            (m.len() == count).then_some(m)
        })
    }
}

const MUSL: &str = "x86_64-unknown-linux-musl";

/// Builds skiff-echo (images/echo) as a static musl binary and pushes an image with
/// busybox plus `/echo` (entrypoint: the echo server; `/echo udp|tcp ...` as a client) to
/// the cluster's registry; returns its reference.
pub fn push_echo_image(net: &NetCluster) -> String {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = bin_root();
    let out = super::run_bounded(
        {
            let mut cmd = Command::new(cargo);
            cmd.current_dir(&root).args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "skiff-echo",
                "--target",
                MUSL,
            ]);
            cmd
        },
        None,
        Duration::from_secs(600),
    );
    assert!(
        out.status.success(),
        "building skiff-echo for {MUSL} (run `cargo xtask setup` for the target): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = root.join(format!("target/{MUSL}/release/skiff-echo"));
    let image = busybox_builder()
        .expect("busybox")
        .file_from_host("echo", &bin, 0o755)
        .expect("echo binary")
        .entrypoint(&["/echo"])
        .build()
        .expect("echo image");
    let reference = net.registry.image_ref("skiff/echo:1.0");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(image.push(&reference))
        .expect("push the echo image");
    reference
}

/// The workspace root (target/<profile>/ is under it).
fn bin_root() -> PathBuf {
    super::bin_dir()
        .ancestors()
        .find(|p| p.join("Cargo.lock").exists())
        .expect("the workspace root above the target directory")
        .to_path_buf()
}
