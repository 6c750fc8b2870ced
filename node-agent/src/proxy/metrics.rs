//! Prometheus text for the node's data path, read from the pinned maps (so it shows what
//! the kernel did, also across agent restarts): packets/bytes per pod-network path,
//! load-balancer events, how full the service maps are, and programming errors (a full
//! map: the old entries stay, the error is counted here and logged).

use std::{
    fmt::Write as _,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::{HashMap, Map, MapData};
use skiff_ebpf_common::{
    BACKENDS_MAP, Backend, MAX_BACKENDS, MAX_SERVICE_ENTRIES, SERVICES_MAP, ServiceEntry,
    ServiceKey,
};

/// Service changes the maps refused (e.g. full), since the agent started.
pub static PROGRAM_ERRORS: AtomicU64 = AtomicU64::new(0);

fn entries<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> Option<usize> {
    let data = MapData::from_pin(pin_dir.join(name)).ok()?;
    let map: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data)).ok()?;
    Some(map.keys().flatten().count())
}

/// The metrics of the node whose maps are pinned under `pin_dir`.
pub fn render(pin_dir: &Path) -> String {
    let mut out = String::new();
    if let Ok(stats) = crate::cni::datapath::read_pinned_stats(pin_dir) {
        out.push_str("# HELP skiff_datapath_packets_total Packets per pod-network path.\n# TYPE skiff_datapath_packets_total counter\n");
        for (s, c) in &stats {
            let _ = writeln!(
                out,
                "skiff_datapath_packets_total{{path=\"{}\"}} {}",
                s.name(),
                c.packets
            );
        }
        out.push_str("# HELP skiff_datapath_bytes_total Bytes per pod-network path.\n# TYPE skiff_datapath_bytes_total counter\n");
        for (s, c) in &stats {
            let _ = writeln!(
                out,
                "skiff_datapath_bytes_total{{path=\"{}\"}} {}",
                s.name(),
                c.bytes
            );
        }
    }
    if let Ok(stats) = super::read_pinned_lb_stats(pin_dir) {
        out.push_str("# HELP skiff_lb_events_total Load-balancer decisions (translated, no_backend, ...).\n# TYPE skiff_lb_events_total counter\n");
        for (s, c) in &stats {
            let _ = writeln!(
                out,
                "skiff_lb_events_total{{event=\"{}\"}} {}",
                s.name(),
                c.packets
            );
        }
    }
    out.push_str("# HELP skiff_lb_map_entries Entries in the service maps.\n# TYPE skiff_lb_map_entries gauge\n# HELP skiff_lb_map_capacity Capacity of the service maps.\n# TYPE skiff_lb_map_capacity gauge\n");
    for (name, used, cap) in [
        (
            "services",
            entries::<ServiceKey, ServiceEntry>(pin_dir, SERVICES_MAP),
            MAX_SERVICE_ENTRIES,
        ),
        (
            "backends",
            entries::<u32, Backend>(pin_dir, BACKENDS_MAP),
            MAX_BACKENDS,
        ),
    ] {
        if let Some(used) = used {
            let _ = writeln!(out, "skiff_lb_map_entries{{map=\"{name}\"}} {used}");
            let _ = writeln!(out, "skiff_lb_map_capacity{{map=\"{name}\"}} {cap}");
        }
    }
    out.push_str("# HELP skiff_lb_program_errors_total Service changes the maps refused (full maps).\n# TYPE skiff_lb_program_errors_total counter\n");
    let _ = writeln!(
        out,
        "skiff_lb_program_errors_total {}",
        PROGRAM_ERRORS.load(Ordering::Relaxed)
    );
    out
}
