//! Embedded backend: one redb file.
//!
//! Where the data lives: table `kv` maps a key to `(value, create_revision, mod_revision)`;
//! table `meta` holds the global revision under `"revision"`. Writes commit durably
//! (`Durability::Immediate`), so an acknowledged write survives a crash or restart.
//!
//! Group commit: the fsync is the cost of a write, so concurrent writers share one. A
//! writer queues its operation and takes the writer lock; whoever holds the lock drains
//! the whole queue into one redb transaction (each operation checked and applied in
//! order, each with its own revision), commits once and hands every waiter its result.
//! A writer whose operation was already committed by an earlier holder just returns.
//! Under load (the previous commit ended < 2 ms ago) the holder first waits 0.6 ms so
//! more writers join: without that most commits carried a single write.
//!
//! Revisions follow etcd: an empty store is at revision 1 and the first write gets 2.
//! Every write (create, update, delete) bumps the revision by exactly one.
//!
//! Watch: a bounded in-memory history of the latest events (default 10 000) plus a tokio
//! broadcast channel for live events. Writers append to the history and broadcast while
//! holding the hub lock; a watcher snapshots the history and subscribes under the same lock,
//! so replay + live has neither gaps nor duplicates. The history is not persisted: after a
//! restart only watches from the current revision (or later) can be served, older ones get
//! `Compacted` and the client relists. A watcher that falls behind the broadcast buffer also
//! gets `Compacted` (never silently dropped events).

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::broadcast;

use super::{
    EventKind, KeyValue, ListResult, Result, Revision, StorageError, Store, WatchEvent, WatchStream,
};

const KV: TableDefinition<&str, (&[u8], i64, i64)> = TableDefinition::new("kv");
const META: TableDefinition<&str, i64> = TableDefinition::new("meta");
const REVISION_KEY: &str = "revision";

/// Revision of a store that was never written (etcd semantics).
const EMPTY_REVISION: Revision = 1;
/// Default number of events kept in memory for watch replay.
pub const DEFAULT_HISTORY: usize = 10_000;
/// Live events buffered per watcher before it is considered lagging.
const BROADCAST_CAPACITY: usize = 4096;

pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    /// Serialises committers from `begin_write` to the broadcast, so history order ==
    /// revision order. Watchers never take it (they must not wait for an fsync). Holds
    /// when the last commit ended (see [`LINGER`]).
    writer: Mutex<Option<std::time::Instant>>,
    /// Operations waiting for the next commit.
    pending: Mutex<Vec<Request>>,
    hub: Mutex<Hub>,
    /// Smallest `after` a watch can start from (shared with watch streams for errors).
    floor: Arc<AtomicI64>,
}

/// Event history and live fan-out. A writer takes this lock (inside `writer`) only to
/// publish a committed event; a watcher takes it to snapshot the history and subscribe.
struct Hub {
    history: VecDeque<WatchEvent>,
    capacity: usize,
    tx: broadcast::Sender<WatchEvent>,
}

enum Op {
    Create(Vec<u8>),
    Update(Vec<u8>, Option<Revision>),
    Delete(Option<Revision>),
}

type WriteResult = Result<(Revision, Option<KeyValue>)>;

/// A commit that starts within this long of the previous one's end is "under load".
const BUSY_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

/// How long a commit under load waits for more writes to share its fsync. Measured with
/// the scheduler bench (1000 pods on 100 hollow nodes, ~3 writes per pod): without it most
/// commits carried one write; 0.3-1 ms lingers gave 10-20% more bindings per second, as
/// the fsyncs (and the kernel's journal work behind them) were shared.
const LINGER: std::time::Duration = std::time::Duration::from_micros(600);

/// One queued write and where its result goes.
struct Request {
    key: String,
    op: Op,
    result: Arc<Mutex<Option<WriteResult>>>,
}

fn internal(e: impl std::fmt::Display) -> StorageError {
    StorageError::Internal(e.to_string())
}

impl EmbeddedStore {
    /// Opens (or creates) the store file at `path` with the default watch history.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with_history(path, DEFAULT_HISTORY)
    }

    /// Like `open` with `history_len` events retained for watch replay (tests use small ones).
    pub fn open_with_history(path: &Path, history_len: usize) -> Result<Self> {
        let db = Database::create(path).map_err(internal)?;
        // Make sure both tables and the revision exist, so readers never see them missing.
        let txn = db.begin_write().map_err(internal)?;
        let revision = {
            txn.open_table(KV).map_err(internal)?;
            let mut meta = txn.open_table(META).map_err(internal)?;
            let current = meta.get(REVISION_KEY).map_err(internal)?.map(|v| v.value());
            match current {
                Some(r) => r,
                None => {
                    meta.insert(REVISION_KEY, EMPTY_REVISION)
                        .map_err(internal)?;
                    EMPTY_REVISION
                }
            }
        };
        txn.commit().map_err(internal)?;
        // A fresh store has no missing history; a reopened one lost its in-memory events.
        let floor = if revision == EMPTY_REVISION {
            0
        } else {
            revision
        };
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                writer: Mutex::new(None),
                pending: Mutex::new(Vec::new()),
                hub: Mutex::new(Hub {
                    history: VecDeque::with_capacity(history_len.min(DEFAULT_HISTORY)),
                    capacity: history_len.max(1),
                    tx,
                }),
                floor: Arc::new(AtomicI64::new(floor)),
            }),
        })
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(internal)?
    }

    async fn write(&self, key: &str, op: Op) -> Result<(Revision, Option<KeyValue>)> {
        let key = key.to_owned();
        self.blocking(move |inner| inner.write(&key, op)).await
    }
}

impl Inner {
    fn hub(&self) -> MutexGuard<'_, Hub> {
        self.hub.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies one write (in a group commit). Returns the new revision and the previous
    /// value (if any).
    fn write(&self, key: &str, op: Op) -> WriteResult {
        let result = Arc::new(Mutex::new(None));
        lock(&self.pending).push(Request {
            key: key.to_owned(),
            op,
            result: result.clone(),
        });
        let mut last_commit = lock(&self.writer);
        // An earlier lock holder may have committed ours along with its own.
        if let Some(r) = lock(&result).take() {
            return r;
        }
        // A busy store (the last commit ended moments ago) waits a little for more
        // writers to join this commit: one fsync then serves several writes. An idle
        // store commits at once.
        if last_commit.is_some_and(|t| t.elapsed() < BUSY_WINDOW) {
            std::thread::sleep(LINGER);
        }
        let batch = std::mem::take(&mut *lock(&self.pending));
        self.commit_batch(batch);
        *last_commit = Some(std::time::Instant::now());
        lock(&result)
            .take()
            .unwrap_or_else(|| Err(internal("write was not committed")))
    }

    /// Applies `batch` in one transaction; every request gets its result. An operation
    /// that fails its check (conflict, missing, exists) changes nothing and does not
    /// affect the others; a storage error fails the whole batch.
    fn commit_batch(&self, batch: Vec<Request>) {
        let started = std::time::Instant::now();
        let batch_len = batch.len();
        let mut outcomes: Vec<(Arc<Mutex<Option<WriteResult>>>, WriteResult)> = Vec::new();
        let mut events: Vec<WatchEvent> = Vec::new();
        let committed = (|| -> Result<()> {
            let mut txn = self.db.begin_write().map_err(internal)?;
            txn.set_durability(Durability::Immediate)
                .map_err(internal)?;
            {
                let mut kv = txn.open_table(KV).map_err(internal)?;
                let mut meta = txn.open_table(META).map_err(internal)?;
                let mut revision = meta
                    .get(REVISION_KEY)
                    .map_err(internal)?
                    .map(|v| v.value())
                    .unwrap_or(EMPTY_REVISION);
                for req in batch {
                    let r = apply(&mut kv, &req.key, req.op, revision + 1);
                    let r = match r {
                        Ok((event, prev)) => {
                            revision = event.revision;
                            events.push(event);
                            Ok((revision, prev))
                        }
                        Err(e @ StorageError::Internal(_)) => return Err(e),
                        Err(e) => Err(e),
                    };
                    outcomes.push((req.result, r));
                }
                meta.insert(REVISION_KEY, revision).map_err(internal)?;
            }
            txn.commit().map_err(internal)
        })();
        if let Err(e) = committed {
            // Nothing was written: every queued request (including ones not yet
            // reached) learns why.
            let msg = e.to_string();
            for (slot, _) in outcomes {
                *lock(&slot) = Some(Err(StorageError::Internal(msg.clone())));
            }
            return;
        }
        tracing::debug!(
            target: "store_commits",
            "committed {batch_len} writes in {:.1} ms",
            started.elapsed().as_secs_f64() * 1000.0
        );
        // Committed: publish (still holding `writer`, so events go out in revision order).
        {
            let mut hub = self.hub();
            for event in events {
                if hub.history.len() == hub.capacity
                    && let Some(evicted) = hub.history.pop_front()
                {
                    self.floor.store(evicted.revision, Ordering::SeqCst);
                }
                // The history keeps its own memo: what live watchers decode is freed when
                // they are done with it, not kept for the history's length.
                hub.history.push_back(WatchEvent {
                    memo: Default::default(),
                    ..event.clone()
                });
                // No receivers is fine.
                let _ = hub.tx.send(event);
            }
        }
        for (slot, r) in outcomes {
            *lock(&slot) = Some(r);
        }
    }

    fn revision(txn: &redb::ReadTransaction) -> Result<Revision> {
        let meta = txn.open_table(META).map_err(internal)?;
        Ok(meta
            .get(REVISION_KEY)
            .map_err(internal)?
            .map(|v| v.value())
            .unwrap_or(EMPTY_REVISION))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A row of table `kv` as a KeyValue.
fn key_value(key: &str, (value, create_revision, mod_revision): (&[u8], i64, i64)) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: value.to_vec(),
        create_revision,
        mod_revision,
    }
}

/// Checks and applies one operation at `revision` inside a write transaction.
fn apply(
    kv: &mut redb::Table<&str, (&[u8], i64, i64)>,
    key: &str,
    op: Op,
    revision: Revision,
) -> Result<(WatchEvent, Option<KeyValue>)> {
    let prev = kv
        .get(key)
        .map_err(internal)?
        .map(|v| key_value(key, v.value()));
    let check = |expected: Option<Revision>| -> Result<&KeyValue> {
        let Some(prev) = prev.as_ref() else {
            return Err(StorageError::NotFound(key.to_owned()));
        };
        match expected {
            Some(expected) if expected != prev.mod_revision => Err(StorageError::Conflict {
                key: key.to_owned(),
                expected,
                actual: prev.mod_revision,
            }),
            _ => Ok(prev),
        }
    };
    let event = match op {
        Op::Create(value) => {
            if prev.is_some() {
                return Err(StorageError::AlreadyExists(key.to_owned()));
            }
            kv.insert(key, (value.as_slice(), revision, revision))
                .map_err(internal)?;
            WatchEvent::new(EventKind::Added, key.to_owned(), value, revision)
        }
        Op::Update(value, expected) => {
            let create_revision = check(expected)?.create_revision;
            kv.insert(key, (value.as_slice(), create_revision, revision))
                .map_err(internal)?;
            WatchEvent::new(EventKind::Modified, key.to_owned(), value, revision)
        }
        Op::Delete(expected) => {
            let last = check(expected)?.value.clone();
            kv.remove(key).map_err(internal)?;
            WatchEvent::new(EventKind::Deleted, key.to_owned(), last, revision)
        }
    };
    Ok((event, prev))
}

fn prefix_range<'a>(
    prefix: &'a str,
    start_after: Option<&'a str>,
) -> (Bound<&'a str>, Bound<&'a str>) {
    match start_after {
        Some(after) if after >= prefix => (Bound::Excluded(after), Bound::Unbounded),
        _ => (Bound::Included(prefix), Bound::Unbounded),
    }
}

#[async_trait::async_trait]
impl Store for EmbeddedStore {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        // One key from a read transaction (MVCC: never waits for a writer) takes
        // microseconds; a trip through the blocking pool would cost two thread
        // hand-offs, more than the read itself.
        let txn = self.inner.db.begin_read().map_err(internal)?;
        let kv = txn.open_table(KV).map_err(internal)?;
        Ok(kv
            .get(key)
            .map_err(internal)?
            .map(|v| key_value(key, v.value())))
    }

    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListResult> {
        let prefix = prefix.to_owned();
        let start_after = start_after.map(str::to_owned);
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(internal)?;
            let revision = Inner::revision(&txn)?;
            let kv = txn.open_table(KV).map_err(internal)?;
            let mut items = Vec::new();
            let mut more = false;
            for entry in kv
                .range::<&str>(prefix_range(&prefix, start_after.as_deref()))
                .map_err(internal)?
            {
                let (k, v) = entry.map_err(internal)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                if limit.is_some_and(|l| items.len() >= l) {
                    more = true;
                    break;
                }
                items.push(key_value(key, v.value()));
            }
            Ok(ListResult {
                items,
                revision,
                more,
            })
        })
        .await
    }

    async fn count(&self, prefix: &str) -> Result<i64> {
        let prefix = prefix.to_owned();
        self.blocking(move |inner| {
            let txn = inner.db.begin_read().map_err(internal)?;
            let kv = txn.open_table(KV).map_err(internal)?;
            let mut n = 0;
            for entry in kv.range(prefix.as_str()..).map_err(internal)? {
                let (k, _) = entry.map_err(internal)?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                n += 1;
            }
            Ok(n)
        })
        .await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        Ok(self.write(key, Op::Create(value)).await?.0)
    }

    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Revision>,
    ) -> Result<Revision> {
        Ok(self.write(key, Op::Update(value, expected)).await?.0)
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let (revision, prev) = self.write(key, Op::Delete(expected)).await?;
        let prev = prev.ok_or_else(|| internal("delete without previous value"))?;
        Ok((revision, prev))
    }

    async fn current_revision(&self) -> Result<Revision> {
        self.blocking(|inner| {
            let txn = inner.db.begin_read().map_err(internal)?;
            Inner::revision(&txn)
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        let inner = &self.inner;
        let (replay, rx) = {
            let hub = inner.hub();
            let floor = inner.floor.load(Ordering::SeqCst);
            if after < floor {
                return Err(StorageError::Compacted {
                    requested: after,
                    oldest: floor,
                });
            }
            let replay: Vec<WatchEvent> = hub
                .history
                .iter()
                .filter(|e| e.revision > after && e.key.starts_with(prefix))
                .cloned()
                .collect();
            (replay, hub.tx.subscribe())
        };
        let state = WatchState {
            replay: replay.into_iter(),
            rx,
            prefix: prefix.to_owned(),
            last: after,
            floor: inner.floor.clone(),
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(state, WatchState::next)))
    }
}

struct WatchState {
    replay: std::vec::IntoIter<WatchEvent>,
    rx: broadcast::Receiver<WatchEvent>,
    prefix: String,
    /// Revision of the last event delivered (or the watch's `after`).
    last: Revision,
    floor: Arc<AtomicI64>,
    done: bool,
}

impl WatchState {
    async fn next(mut self) -> Option<(Result<WatchEvent>, Self)> {
        if self.done {
            return None;
        }
        if let Some(event) = self.replay.next() {
            self.last = event.revision;
            return Some((Ok(event), self));
        }
        loop {
            match self.rx.recv().await {
                Ok(event) => {
                    if event.revision <= self.last || !event.key.starts_with(&self.prefix) {
                        continue;
                    }
                    self.last = event.revision;
                    return Some((Ok(event), self));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    // Events were dropped for this watcher: it must relist.
                    self.done = true;
                    let err = StorageError::Compacted {
                        requested: self.last,
                        oldest: self.floor.load(Ordering::SeqCst).max(self.last + 1),
                    };
                    return Some((Err(err), self));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}
