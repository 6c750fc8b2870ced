//! Loads skiff_count into the kernel and watches it count real packets.
//!
//! Topology, all created here and removed by a Drop guard (also on failure):
//!   netns skiff-t<pid>-a [veth sa<pid> 10.199.x.1/30] <-> [veth sb<pid> 10.199.x.2/30] netns skiff-t<pid>-b
//! skiff_count is attached (clsact, netlink) to the ingress of the B side; A pings B.
//! Traffic never leaves the two namespaces. Maps are pinned in a private bpffs instance
//! mounted at /tmp/skiff-test-<pid>-bpffs (so the test neither needs nor touches
//! /sys/fs/bpf). Needs root: CI runs as root, so this test
//! fails (not skips) without it.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use skiff_agent::ebpf::{self, Direction, ObjectSource, PacketCounterProgram};

const PINGS: u64 = 5;

fn sh(args: &[&str]) -> Result<String, String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("cannot run {args:?}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{args:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(args: &[&str]) -> String {
    sh(args).unwrap_or_else(|e| panic!("{e}"))
}

/// Everything the test created; removed on drop, whatever happened.
struct Topology {
    ns_a: String,
    ns_b: String,
    veth_a: String,
    veth_b: String,
    ip_b: String,
    bpffs: PathBuf,
    pin_dir: PathBuf,
}

impl Topology {
    fn create() -> Self {
        let pid = std::process::id();
        // 10.199.<pid-derived>.0/30: unique per concurrently running test process.
        let octet = pid % 250 + 1;
        let topo = Topology {
            ns_a: format!("skiff-t{pid}-a"),
            ns_b: format!("skiff-t{pid}-b"),
            veth_a: format!("sa{pid}"),
            veth_b: format!("sb{pid}"),
            ip_b: format!("10.199.{octet}.2"),
            bpffs: std::env::temp_dir().join(format!("skiff-test-{pid}-bpffs")),
            pin_dir: std::env::temp_dir().join(format!("skiff-test-{pid}-bpffs/skiff")),
        };
        // The guard exists before the first resource, so a failure below cleans up too.
        let ip_a = format!("10.199.{octet}.1/30");
        let ip_b = format!("{}/30", topo.ip_b);
        std::fs::create_dir_all(&topo.bpffs).expect("create bpffs mount point");
        must(&["mount", "-t", "bpf", "bpf", topo.bpffs.to_str().unwrap()]);
        must(&["ip", "netns", "add", &topo.ns_a]);
        must(&["ip", "netns", "add", &topo.ns_b]);
        must(&[
            "ip",
            "-n",
            &topo.ns_a,
            "link",
            "add",
            &topo.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &topo.veth_b,
            "netns",
            &topo.ns_b,
        ]);
        must(&[
            "ip",
            "-n",
            &topo.ns_a,
            "addr",
            "add",
            &ip_a,
            "dev",
            &topo.veth_a,
        ]);
        must(&[
            "ip",
            "-n",
            &topo.ns_b,
            "addr",
            "add",
            &ip_b,
            "dev",
            &topo.veth_b,
        ]);
        for (ns, dev) in [(&topo.ns_a, &topo.veth_a), (&topo.ns_b, &topo.veth_b)] {
            must(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            must(&["ip", "-n", ns, "link", "set", dev, "up"]);
        }
        topo
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Deleting the namespaces deletes the veth pair, its clsact qdisc and tc filters.
        for ns in [&self.ns_a, &self.ns_b] {
            if let Err(e) = sh(&["ip", "netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        if self.pin_dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&self.pin_dir)
        {
            eprintln!("cleanup: removing {}: {e}", self.pin_dir.display());
        }
        if let Err(e) = sh(&["umount", self.bpffs.to_str().unwrap()]) {
            eprintln!("cleanup: {e}");
        }
        if let Err(e) = std::fs::remove_dir(&self.bpffs) {
            eprintln!("cleanup: removing {}: {e}", self.bpffs.display());
        }
    }
}

fn require_root() {
    if let Err(e) = ebpf::require_root() {
        panic!("this test loads eBPF programs and creates network namespaces: {e}");
    }
}

#[test]
fn skiff_count_counts_pings_between_namespaces() {
    require_root();
    let topo = Topology::create();
    let ns_b_path = ebpf::netns::named(&topo.ns_b);

    let mut program = PacketCounterProgram::load(&ObjectSource::Embedded, &topo.pin_dir)
        .unwrap_or_else(|e| panic!("load: {e}"));
    program
        .attach(&topo.veth_b, Direction::Ingress, Some(&ns_b_path))
        .unwrap_or_else(|e| panic!("attach: {e}"));

    // The filter is really there, in B's namespace, as a netlink (clsact) filter.
    let filters = must(&[
        "ip",
        "netns",
        "exec",
        &topo.ns_b,
        "tc",
        "filter",
        "show",
        "dev",
        &topo.veth_b,
        "ingress",
    ]);
    assert!(
        filters.contains("skiff_count"),
        "tc filter show shows no skiff_count: {filters}"
    );
    // The map is pinned by name.
    let pinned = topo.pin_dir.join(ebpf::COUNTER_MAP);
    assert!(pinned.exists(), "{} not pinned", pinned.display());

    let before = program.counters().expect("read counters");
    let count = PINGS.to_string();
    let ping = must(&[
        "ip", "netns", "exec", &topo.ns_a, "ping", "-n", "-q", "-c", &count, "-i", "0.2", "-W",
        "1", &topo.ip_b,
    ]);
    assert!(
        ping.contains(&format!("{PINGS} received")),
        "TC_ACT_OK must let every ping through: {ping}"
    );

    let per_cpu = program.per_cpu_counters().expect("read per-cpu counters");
    let after = program.counters().expect("read counters");
    let packets = after.packets - before.packets;
    let bytes = after.bytes - before.bytes;
    eprintln!("per-cpu: {per_cpu:?}; counted {packets} packets, {bytes} bytes");
    assert!(
        packets >= PINGS,
        "counted {packets} packets, expected >= {PINGS}"
    );
    // An ICMP echo request is 84 bytes of IP plus the 14-byte Ethernet header (skb->len).
    assert!(
        bytes >= PINGS * 98,
        "counted {bytes} bytes for {packets} packets"
    );

    // The pinned map shows the same counts without the program object.
    let from_pin = ebpf::read_pinned_counters(&topo.pin_dir).expect("read pinned map");
    assert_eq!(from_pin, after);

    // Detach removes the filter; traffic after that is not counted.
    program.detach().expect("detach");
    let filters = must(&[
        "ip",
        "netns",
        "exec",
        &topo.ns_b,
        "tc",
        "filter",
        "show",
        "dev",
        &topo.veth_b,
        "ingress",
    ]);
    assert!(
        !filters.contains("skiff_count"),
        "still attached: {filters}"
    );
    must(&[
        "ip", "netns", "exec", &topo.ns_a, "ping", "-n", "-q", "-c", "1", "-W", "1", &topo.ip_b,
    ]);
    assert_eq!(program.counters().expect("read counters"), after);
    drop(program);
    drop(topo);
}

#[test]
fn pin_dir_outside_bpffs_says_how_to_mount() {
    require_root();
    let dir = std::env::temp_dir().join(format!("skiff-not-bpffs-{}", std::process::id()));
    let err = match PacketCounterProgram::load(&ObjectSource::Embedded, &dir) {
        Ok(_) => panic!("loading with a pin dir on {} must fail", dir.display()),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("mount -t bpf bpf /sys/fs/bpf"), "{err}");
    assert!(!Path::new(&dir).exists());
}

#[test]
fn missing_object_says_how_to_build_it() {
    require_root();
    // The object is checked before the pin directory, so no bpffs is needed here.
    let dir = std::env::temp_dir().join(format!("skiff-missing-{}", std::process::id()));
    let missing = ObjectSource::File("/nonexistent/skiff-ebpf".into());
    let err = match PacketCounterProgram::load(&missing, &dir) {
        Ok(_) => panic!("loading a missing object must fail"),
        Err(e) => e.to_string(),
    };
    assert!(!dir.exists());
    assert!(err.contains("cargo xtask build-ebpf"), "{err}");
}
