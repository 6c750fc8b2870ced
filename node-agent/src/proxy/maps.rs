//! The load balancer's maps and how desired state gets into them.
//!
//! [`ServiceMaps`] keeps what it wrote (per frontend: backend ids, flags) next to the
//! pinned maps, so applying a frontend costs map operations proportional to that
//! frontend's change, never a rewrite of everything. Order (no window where a lookup
//! finds a dangling id): backends first, then the frontend's slots, then its master entry
//! (count) last; shrinking writes the master first and deletes surplus slots and unused
//! backends after. A restarted agent reads the maps back ([`ServiceMaps::open`]) and keeps
//! every entry until the first full sync says which ones are gone.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap as StdHashMap},
    net::Ipv4Addr,
};

use aya::maps::{HashMap, MapData};
use skiff_ebpf_common::{
    BACKENDS_MAP, Backend, NODE_IPS_MAP, SCOPE_ALL, SCOPE_PODS, SERVICES_MAP, SVC_FLAG_AFFINITY,
    SVC_FLAG_LOCAL, ServiceEntry, ServiceKey, ipv4_key,
};

use super::model::{BackendAddr, DesiredFrontend, Frontend, FrontendKey, Scope};
use crate::ebpf::EbpfError;

fn map_err(name: &str) -> impl Fn(aya::maps::MapError) -> EbpfError + '_ {
    move |source| EbpfError::Map {
        name: name.into(),
        source,
    }
}

/// The map key of `f` (scope [`Scope::All`]) at `slot`.
pub fn frontend_key(f: &Frontend, slot: u16) -> ServiceKey {
    service_key(&FrontendKey::all(*f), slot)
}

/// The map key of `k` at `slot`.
pub fn service_key(k: &FrontendKey, slot: u16) -> ServiceKey {
    let f = &k.frontend;
    ServiceKey {
        addr: ipv4_key(f.addr.octets()),
        port: f.port.to_be(),
        proto: f.proto,
        scope: match k.scope {
            Scope::All => SCOPE_ALL,
            Scope::Pods => SCOPE_PODS,
        },
        slot,
        _pad1: 0,
    }
}

fn frontend_of(k: &ServiceKey) -> FrontendKey {
    FrontendKey {
        frontend: Frontend {
            addr: Ipv4Addr::from(k.addr.to_ne_bytes()),
            port: u16::from_be(k.port),
            proto: k.proto,
        },
        scope: if k.scope == SCOPE_ALL {
            Scope::All
        } else {
            Scope::Pods
        },
    }
}

fn backend_value(b: &BackendAddr) -> Backend {
    Backend {
        addr: ipv4_key(b.addr.octets()),
        port: b.port.to_be(),
        proto: b.proto,
        _pad: 0,
    }
}

fn backend_addr(b: &Backend) -> BackendAddr {
    BackendAddr {
        addr: Ipv4Addr::from(b.addr.to_ne_bytes()),
        port: u16::from_be(b.port),
        proto: b.proto,
    }
}

/// What is in the maps for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Applied {
    master: ServiceEntry,
    backend_ids: Vec<u32>,
}

/// The services and backends maps with the agent's record of their content.
pub struct ServiceMaps {
    services: HashMap<MapData, ServiceKey, ServiceEntry>,
    backends: HashMap<MapData, u32, Backend>,
    /// Every node's addresses (the socket programs' NodePort wildcard applies to them).
    node_ips: HashMap<MapData, u32, u32>,
    applied: BTreeMap<FrontendKey, Applied>,
    /// backend -> (id, number of slots using it)
    backend_ids: StdHashMap<BackendAddr, (u32, usize)>,
    /// id -> backend (the reverse of `backend_ids`)
    backend_addrs: StdHashMap<u32, BackendAddr>,
    next_backend_id: u32,
    next_rev_nat_id: u32,
    /// Map operations done so far (for benchmarks and logs).
    pub ops: u64,
}

impl ServiceMaps {
    /// Takes the maps out of the loaded object and reads back what an earlier agent left.
    pub fn open(ebpf: &mut aya::Ebpf) -> Result<ServiceMaps, EbpfError> {
        let take = |ebpf: &mut aya::Ebpf, name: &str| {
            ebpf.take_map(name).ok_or_else(|| EbpfError::NotInObject {
                kind: "map",
                name: name.into(),
            })
        };
        let services: HashMap<MapData, ServiceKey, ServiceEntry> =
            HashMap::try_from(take(ebpf, SERVICES_MAP)?).map_err(map_err(SERVICES_MAP))?;
        let backends: HashMap<MapData, u32, Backend> =
            HashMap::try_from(take(ebpf, BACKENDS_MAP)?).map_err(map_err(BACKENDS_MAP))?;
        let node_ips: HashMap<MapData, u32, u32> =
            HashMap::try_from(take(ebpf, NODE_IPS_MAP)?).map_err(map_err(NODE_IPS_MAP))?;
        let mut me = ServiceMaps {
            services,
            backends,
            node_ips,
            applied: BTreeMap::new(),
            backend_ids: StdHashMap::new(),
            backend_addrs: StdHashMap::new(),
            next_backend_id: 1,
            next_rev_nat_id: 1,
            ops: 0,
        };
        me.read_back();
        Ok(me)
    }

    fn read_back(&mut self) {
        let by_id: StdHashMap<u32, BackendAddr> = self
            .backends
            .iter()
            .flatten()
            .map(|(id, b)| (id, backend_addr(&b)))
            .collect();
        let entries: Vec<(ServiceKey, ServiceEntry)> = self.services.iter().flatten().collect();
        let mut slots: BTreeMap<FrontendKey, BTreeMap<u16, u32>> = BTreeMap::new();
        for (k, v) in &entries {
            let f = frontend_of(k);
            if k.slot == 0 {
                self.applied.insert(
                    f,
                    Applied {
                        master: *v,
                        backend_ids: vec![],
                    },
                );
                self.next_rev_nat_id = self.next_rev_nat_id.max(v.rev_nat_id + 1);
            } else {
                slots.entry(f).or_default().insert(k.slot, v.backend_id);
            }
        }
        for (f, a) in self.applied.iter_mut() {
            let s = slots.remove(f).unwrap_or_default();
            a.backend_ids = (1..=a.master.count)
                .filter_map(|i| s.get(&i).copied())
                .collect();
        }
        for (id, addr) in &by_id {
            self.backend_ids.insert(*addr, (*id, 0));
            self.backend_addrs.insert(*id, *addr);
            self.next_backend_id = self.next_backend_id.max(id + 1);
        }
        for a in self.applied.values() {
            for id in &a.backend_ids {
                if let Some(addr) = by_id.get(id)
                    && let Some(e) = self.backend_ids.get_mut(addr)
                {
                    e.1 += 1;
                }
            }
        }
    }

    /// Frontends in the maps.
    pub fn frontends(&self) -> impl Iterator<Item = &FrontendKey> {
        self.applied.keys()
    }

    /// The backends a frontend currently has in the maps.
    pub fn backends_of(&self, f: &FrontendKey) -> Vec<BackendAddr> {
        self.applied
            .get(f)
            .map(|a| {
                a.backend_ids
                    .iter()
                    .filter_map(|id| self.backend_addrs.get(id).copied())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn acquire_backend(&mut self, b: &BackendAddr) -> Result<u32, EbpfError> {
        if let Some((id, refs)) = self.backend_ids.get_mut(b) {
            *refs += 1;
            return Ok(*id);
        }
        let id = self.next_backend_id;
        self.backends
            .insert(id, backend_value(b), 0)
            .map_err(map_err(BACKENDS_MAP))?;
        self.ops += 1;
        self.next_backend_id += 1;
        self.backend_ids.insert(*b, (id, 1));
        self.backend_addrs.insert(id, *b);
        Ok(id)
    }

    fn release_backend(&mut self, id: u32) {
        let Some(addr) = self.backend_addrs.get(&id).copied() else {
            return;
        };
        let Some(e) = self.backend_ids.get_mut(&addr) else {
            return;
        };
        e.1 = e.1.saturating_sub(1);
        if e.1 == 0 {
            self.backend_ids.remove(&addr);
            self.backend_addrs.remove(&id);
            let _ = self.backends.remove(&id);
            self.ops += 1;
        }
    }

    /// Makes `f`'s entries equal to `want`.
    pub fn apply(&mut self, f: &FrontendKey, want: &DesiredFrontend) -> Result<(), EbpfError> {
        let old = self.applied.get(f).cloned();
        // Ids for the wanted backends (new backends are written now).
        let mut ids = Vec::with_capacity(want.backends.len());
        for b in &want.backends {
            match self.acquire_backend(b) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.release_backend(id);
                    }
                    return Err(e);
                }
            }
        }
        let count = u16::try_from(ids.len()).unwrap_or(u16::MAX);
        ids.truncate(count as usize);
        let rev_nat_id = match &old {
            Some(o) => o.master.rev_nat_id,
            None => {
                self.next_rev_nat_id += 1;
                self.next_rev_nat_id - 1
            }
        };
        let master = ServiceEntry {
            backend_id: 0,
            count,
            flags: if want.affinity_timeout.is_some() {
                SVC_FLAG_AFFINITY
            } else {
                0
            } | if want.local_only { SVC_FLAG_LOCAL } else { 0 },
            _pad: 0,
            affinity_timeout: want.affinity_timeout.unwrap_or(0),
            rev_nat_id,
        };
        let old_ids = old
            .as_ref()
            .map(|o| o.backend_ids.clone())
            .unwrap_or_default();
        let write = (|| -> Result<(), EbpfError> {
            // Slots that change, then the master entry.
            for (i, id) in ids.iter().enumerate() {
                if old_ids.get(i) != Some(id) {
                    let entry = ServiceEntry {
                        backend_id: *id,
                        ..Default::default()
                    };
                    self.services
                        .insert(service_key(f, i as u16 + 1), entry, 0)
                        .map_err(map_err(SERVICES_MAP))?;
                    self.ops += 1;
                }
            }
            if old.as_ref().map(|o| o.master) != Some(master) {
                self.services
                    .insert(service_key(f, 0), master, 0)
                    .map_err(map_err(SERVICES_MAP))?;
                self.ops += 1;
            }
            Ok(())
        })();
        if let Err(e) = write {
            // The master entry still describes the old slots: keep the old record and
            // give back the references taken for the new backends.
            for id in ids {
                self.release_backend(id);
            }
            return Err(e);
        }
        for slot in ids.len()..old_ids.len() {
            let _ = self.services.remove(&service_key(f, slot as u16 + 1));
            self.ops += 1;
        }
        for id in old_ids {
            self.release_backend(id);
        }
        self.applied.insert(
            *f,
            Applied {
                master,
                backend_ids: ids,
            },
        );
        Ok(())
    }

    /// Removes `f`: master entry first (clients stop choosing it), then slots and
    /// backends nobody uses any more.
    pub fn remove(&mut self, f: &FrontendKey) {
        let Some(old) = self.applied.remove(f) else {
            return;
        };
        let _ = self.services.remove(&service_key(f, 0));
        self.ops += 1;
        for slot in 1..=old.backend_ids.len() {
            let _ = self.services.remove(&service_key(f, slot as u16));
            self.ops += 1;
        }
        for id in old.backend_ids {
            self.release_backend(id);
        }
    }

    /// Makes the node address map hold exactly `ips`; returns the number of changes.
    pub fn set_node_ips(&mut self, ips: &BTreeSet<Ipv4Addr>) -> Result<usize, EbpfError> {
        let want: BTreeSet<u32> = ips.iter().map(|ip| ipv4_key(ip.octets())).collect();
        let have: BTreeSet<u32> = self.node_ips.keys().flatten().collect();
        let mut ops = 0;
        for k in want.difference(&have) {
            self.node_ips
                .insert(k, 1, 0)
                .map_err(map_err(NODE_IPS_MAP))?;
            ops += 1;
        }
        for k in have.difference(&want) {
            let _ = self.node_ips.remove(k);
            ops += 1;
        }
        self.ops += ops as u64;
        Ok(ops)
    }
}
