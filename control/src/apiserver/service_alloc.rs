//! Which ClusterIPs and NodePorts the stored Services hold, kept in memory.
//!
//! Allocation used to list and parse every Service on each Service write, which made
//! creating the 10 000th Service several times slower than the first. The table is
//! filled by one list and then follows a watch on the Services prefix; the registry's
//! own successful writes are recorded at once (under its allocation lock), so a second
//! Service created right after the first never sees the first one's address as free even
//! before the watch event arrives. Every entry carries the revision it was learned at, so
//! a late watch event never overwrites a newer recorded write.
//!
//! Scope, as before: allocation is serialised within one apiserver. Two apiservers
//! allocating at the same moment can still pick the same free address (Kubernetes closes
//! that with IPAddress objects or a CAS-updated bitmap; a later HA change should too).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::StreamExt;
use serde_json::Value;

use crate::storage::{EventKind, Revision, StorageError, Store};

/// What one Service holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Held {
    pub ip: Option<Ipv4Addr>,
    pub node_ports: Vec<i64>,
}

impl Held {
    /// Read from a stored (or about to be stored) Service object.
    pub fn of(svc: &Value) -> Held {
        Held {
            ip: svc["spec"]["clusterIP"]
                .as_str()
                .and_then(|s| s.parse::<Ipv4Addr>().ok()),
            node_ports: svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p["nodePort"].as_i64())
                .collect(),
        }
    }
}

/// Holders by storage key, with reference counts for O(1) "is it taken" answers.
#[derive(Default)]
pub struct Table {
    holders: HashMap<String, (Revision, Held)>,
    ips: HashMap<Ipv4Addr, u32>,
    ports: HashMap<i64, u32>,
}

impl Table {
    /// Sets what `key` holds as of `revision` (None: the Service is gone). Older
    /// information than what is recorded is ignored.
    pub fn set(&mut self, key: &str, revision: Revision, held: Option<Held>) {
        if let Some((known, _)) = self.holders.get(key)
            && *known >= revision
        {
            return;
        }
        if let Some((_, old)) = self.holders.remove(key) {
            self.count(&old, false);
        }
        match held {
            Some(h) => {
                self.count(&h, true);
                self.holders.insert(key.to_string(), (revision, h));
            }
            // Remember the deletion's revision so an older event cannot resurrect it.
            None => {
                self.holders
                    .insert(key.to_string(), (revision, Held::default()));
            }
        }
    }

    fn count(&mut self, h: &Held, add: bool) {
        fn bump<K: std::hash::Hash + Eq + Copy>(m: &mut HashMap<K, u32>, k: K, add: bool) {
            if add {
                *m.entry(k).or_default() += 1;
            } else if let Some(n) = m.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&k);
                }
            }
        }
        if let Some(ip) = h.ip {
            bump(&mut self.ips, ip, add);
        }
        for p in &h.node_ports {
            bump(&mut self.ports, *p, add);
        }
    }

    fn own(&self, key: &str) -> Option<&Held> {
        self.holders.get(key).map(|(_, h)| h)
    }

    /// Is `ip` held by a Service other than `key`?
    pub fn ip_taken(&self, ip: Ipv4Addr, key: &str) -> bool {
        let mine = u32::from(self.own(key).is_some_and(|h| h.ip == Some(ip)));
        self.ips.get(&ip).copied().unwrap_or(0) > mine
    }

    /// Is `port` held by a Service other than `key`?
    pub fn port_taken(&self, port: i64, key: &str) -> bool {
        let mine = self.own(key).map_or(0, |h| {
            h.node_ports.iter().filter(|p| **p == port).count() as u32
        });
        self.ports.get(&port).copied().unwrap_or(0) > mine
    }
}

/// The table plus the task that keeps it current.
pub struct ServiceAllocations {
    table: Arc<Mutex<Table>>,
}

impl ServiceAllocations {
    /// Lists the Services under `prefix` and starts following them.
    pub async fn start(store: Arc<dyn Store>, prefix: String) -> Result<Self, StorageError> {
        let table = Arc::new(Mutex::new(Table::default()));
        let revision = load(&*store, &prefix, &table).await?;
        tokio::spawn(follow(store, prefix, table.clone(), revision));
        Ok(Self { table })
    }

    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Reads every Service into the table; returns the revision of the list.
async fn load(
    store: &dyn Store,
    prefix: &str,
    table: &Mutex<Table>,
) -> Result<Revision, StorageError> {
    let listed = store.list(prefix, None, None).await?;
    let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
    for kv in &listed.items {
        let held = serde_json::from_slice::<Value>(&kv.value)
            .map(|v| Held::of(&v))
            .unwrap_or_default();
        t.set(&kv.key, kv.mod_revision, Some(held));
    }
    Ok(listed.revision)
}

/// Applies watch events for as long as the apiserver runs; a broken or compacted watch
/// is resumed from a fresh list (entries recorded meanwhile are newer and kept).
async fn follow(
    store: Arc<dyn Store>,
    prefix: String,
    table: Arc<Mutex<Table>>,
    mut revision: Revision,
) {
    loop {
        match store.watch(&prefix, revision).await {
            Ok(mut events) => {
                while let Some(ev) = events.next().await {
                    let Ok(ev) = ev else { break };
                    revision = ev.revision;
                    let held = match ev.kind {
                        EventKind::Deleted => None,
                        EventKind::Added | EventKind::Modified => Some(
                            serde_json::from_slice::<Value>(&ev.value)
                                .map(|v| Held::of(&v))
                                .unwrap_or_default(),
                        ),
                    };
                    table
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .set(&ev.key, ev.revision, held);
                }
            }
            Err(e) => tracing::warn!("service allocation watch: {e}; relisting"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // Deletions missed while the watch was down: rebuild from a list.
        let fresh = Arc::new(Mutex::new(Table::default()));
        match load(&*store, &prefix, &fresh).await {
            Ok(rev) => {
                let fresh = std::mem::take(&mut *fresh.lock().unwrap_or_else(|e| e.into_inner()));
                let mut t = table.lock().unwrap_or_else(|e| e.into_inner());
                let newer: Vec<(String, Revision, Held)> = t
                    .holders
                    .iter()
                    .filter(|(_, (r, _))| *r > rev)
                    .map(|(k, (r, h))| (k.clone(), *r, h.clone()))
                    .collect();
                *t = fresh;
                for (k, r, h) in newer {
                    t.set(&k, r, Some(h));
                }
                revision = rev;
            }
            Err(e) => tracing::warn!("service allocation relist: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(ip: &str, ports: &[i64]) -> Held {
        Held {
            ip: ip.parse().ok(),
            node_ports: ports.to_vec(),
        }
    }

    #[test]
    fn taken_excludes_the_asking_service() {
        let mut t = Table::default();
        t.set("/s/a", 5, Some(held("10.96.0.20", &[30001])));
        let ip = "10.96.0.20".parse().unwrap();
        assert!(t.ip_taken(ip, "/s/b"));
        assert!(!t.ip_taken(ip, "/s/a"));
        assert!(t.port_taken(30001, "/s/b"));
        assert!(!t.port_taken(30001, "/s/a"));
        assert!(!t.port_taken(30002, "/s/b"));
    }

    #[test]
    fn older_events_do_not_overwrite_and_deletion_releases() {
        let mut t = Table::default();
        let ip1: Ipv4Addr = "10.96.0.21".parse().unwrap();
        let ip2: Ipv4Addr = "10.96.0.22".parse().unwrap();
        t.set("/s/a", 10, Some(held("10.96.0.22", &[])));
        // A late event from before the recorded write changes nothing.
        t.set("/s/a", 9, Some(held("10.96.0.21", &[])));
        assert!(t.ip_taken(ip2, "/s/x"));
        assert!(!t.ip_taken(ip1, "/s/x"));
        t.set("/s/a", 11, None);
        assert!(!t.ip_taken(ip2, "/s/x"));
        // ...and a late Added event cannot bring the deleted Service back.
        t.set("/s/a", 10, Some(held("10.96.0.22", &[])));
        assert!(!t.ip_taken(ip2, "/s/x"));
    }

    #[test]
    fn shared_holders_are_counted() {
        // Two Services can transiently claim one port (e.g. a restore); freeing one keeps
        // it taken.
        let mut t = Table::default();
        t.set("/s/a", 1, Some(held("", &[30005])));
        t.set("/s/b", 2, Some(held("", &[30005])));
        t.set("/s/a", 3, None);
        assert!(t.port_taken(30005, "/s/x"));
        t.set("/s/b", 4, None);
        assert!(!t.port_taken(30005, "/s/x"));
    }
}
