//! One conformance suite for every storage backend.
//!
//! Each test in `suite` takes a fresh `Backend` (a store plus the hooks a test needs:
//! reopen/restart, compaction, outage). The `conformance!` macro instantiates the whole
//! suite once per backend: `embedded::*` (a redb file in a temp dir) and `etcd::*` (a real
//! etcd started through `EtcdProcess`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use skiff_control::storage::embedded::EmbeddedStore;
use skiff_control::storage::etcd::EtcdStore;
use skiff_control::storage::etcd_process::EtcdProcess;
use skiff_control::storage::{EventKind, Revision, StorageError, Store, WatchEvent, WatchStream};

/// History length of the embedded store in tests, small enough to test compaction.
const SMALL_HISTORY: usize = 8;

enum Kind {
    Embedded { dir: tempfile::TempDir },
    Etcd { etcd: EtcdProcess },
}

struct Backend {
    store: Arc<dyn Store>,
    kind: Kind,
}

impl Backend {
    async fn embedded() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open_with_history(&dir.path().join("skiff.redb"), SMALL_HISTORY)
            .unwrap();
        Self {
            store: Arc::new(store),
            kind: Kind::Embedded { dir },
        }
    }

    async fn etcd() -> Self {
        let etcd = tokio::task::spawn_blocking(EtcdProcess::start)
            .await
            .unwrap()
            .expect("start etcd");
        let store = EtcdStore::connect(&[etcd.endpoint()]).await.unwrap();
        Self {
            store: Arc::new(store),
            kind: Kind::Etcd { etcd },
        }
    }

    fn s(&self) -> &dyn Store {
        self.store.as_ref()
    }

    /// Embedded: drop and reopen the file. etcd: kill and restart the server (same client).
    async fn restart(&mut self) {
        match &mut self.kind {
            Kind::Embedded { dir } => {
                let path = dir.path().join("skiff.redb");
                // Drop the only handle first so redb releases the file.
                self.store = Arc::new(NoStore);
                let store = EmbeddedStore::open_with_history(&path, SMALL_HISTORY).unwrap();
                self.store = Arc::new(store);
            }
            Kind::Etcd { etcd } => {
                etcd.restart().expect("restart etcd");
            }
        }
    }

    /// Makes every event up to and including `through` unavailable to watches.
    async fn compact(&mut self, through: Revision) {
        match &self.kind {
            Kind::Embedded { .. } => {
                // The history holds SMALL_HISTORY events: push `through` out of it.
                for i in 0..=SMALL_HISTORY {
                    self.s()
                        .create(&format!("/registry/filler/{i}"), b"x".to_vec())
                        .await
                        .unwrap();
                }
            }
            Kind::Etcd { etcd } => {
                // etcd cannot compact the current revision's successor: write once more,
                // then compact at the current revision (everything before it is gone).
                self.s()
                    .create("/registry/filler/0", b"x".to_vec())
                    .await
                    .unwrap();
                let current = self.s().current_revision().await.unwrap();
                assert!(current > through);
                let store = EtcdStore::connect(&[etcd.endpoint()]).await.unwrap();
                store
                    .client()
                    .compact(
                        current,
                        Some(etcd_client::CompactionOptions::new().with_physical()),
                    )
                    .await
                    .unwrap();
            }
        }
    }
}

/// Placeholder used while reopening the embedded store.
struct NoStore;

#[async_trait::async_trait]
impl Store for NoStore {
    fn name(&self) -> &'static str {
        "none"
    }
    async fn get(
        &self,
        _: &str,
    ) -> skiff_control::storage::Result<Option<skiff_control::storage::KeyValue>> {
        unreachable!()
    }
    async fn list(
        &self,
        _: &str,
        _: Option<&str>,
        _: Option<usize>,
    ) -> skiff_control::storage::Result<skiff_control::storage::ListResult> {
        unreachable!()
    }
    async fn count(&self, _: &str) -> skiff_control::storage::Result<i64> {
        unreachable!()
    }
    async fn create(&self, _: &str, _: Vec<u8>) -> skiff_control::storage::Result<Revision> {
        unreachable!()
    }
    async fn update(
        &self,
        _: &str,
        _: Vec<u8>,
        _: Option<Revision>,
    ) -> skiff_control::storage::Result<Revision> {
        unreachable!()
    }
    async fn delete(
        &self,
        _: &str,
        _: Option<Revision>,
    ) -> skiff_control::storage::Result<(Revision, skiff_control::storage::KeyValue)> {
        unreachable!()
    }
    async fn current_revision(&self) -> skiff_control::storage::Result<Revision> {
        unreachable!()
    }
    async fn watch(&self, _: &str, _: Revision) -> skiff_control::storage::Result<WatchStream> {
        unreachable!()
    }
}

const STEP: Duration = Duration::from_secs(10);

async fn next_event(w: &mut WatchStream) -> WatchEvent {
    tokio::time::timeout(STEP, w.next())
        .await
        .expect("watch event in time")
        .expect("stream not ended")
        .expect("event, not error")
}

async fn assert_quiet(w: &mut WatchStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("unexpected watch item: {item:?}");
    }
}

fn ev(kind: EventKind, key: &str, value: &[u8], revision: Revision) -> WatchEvent {
    WatchEvent::new(kind, key.to_owned(), value.to_vec(), revision)
}

mod suite {
    use super::*;

    pub async fn create_get(b: Backend) {
        let s = b.s();
        let r0 = s.current_revision().await.unwrap();
        assert!(r0 >= 1);
        assert_eq!(s.get("/registry/pods/a/x").await.unwrap(), None);
        let r1 = s
            .create("/registry/pods/a/x", b"v1".to_vec())
            .await
            .unwrap();
        assert!(r1 > r0);
        let kv = s.get("/registry/pods/a/x").await.unwrap().unwrap();
        assert_eq!(kv.key, "/registry/pods/a/x");
        assert_eq!(kv.value, b"v1");
        assert_eq!(kv.create_revision, r1);
        assert_eq!(kv.mod_revision, r1);
        let err = s
            .create("/registry/pods/a/x", b"v2".to_vec())
            .await
            .unwrap_err();
        assert_eq!(
            err,
            StorageError::AlreadyExists("/registry/pods/a/x".into())
        );
        // The failed create changed nothing.
        assert_eq!(s.current_revision().await.unwrap(), r1);
        assert_eq!(
            s.get("/registry/pods/a/x").await.unwrap().unwrap().value,
            b"v1"
        );
    }

    pub async fn empty_store_revision(b: Backend) {
        // etcd semantics: an empty store is at revision 1, the first write gets 2.
        let s = b.s();
        assert_eq!(s.current_revision().await.unwrap(), 1);
        assert_eq!(s.create("/registry/a", b"1".to_vec()).await.unwrap(), 2);
    }

    pub async fn update(b: Backend) {
        let s = b.s();
        let key = "/registry/configmaps/default/c";
        let err = s.update(key, b"x".to_vec(), None).await.unwrap_err();
        assert_eq!(err, StorageError::NotFound(key.into()));
        let err = s.update(key, b"x".to_vec(), Some(5)).await.unwrap_err();
        assert_eq!(err, StorageError::NotFound(key.into()));

        let r1 = s.create(key, b"1".to_vec()).await.unwrap();
        let r2 = s.update(key, b"2".to_vec(), None).await.unwrap();
        assert!(r2 > r1);
        let r3 = s.update(key, b"3".to_vec(), Some(r2)).await.unwrap();
        assert!(r3 > r2);
        let err = s.update(key, b"4".to_vec(), Some(r2)).await.unwrap_err();
        assert_eq!(
            err,
            StorageError::Conflict {
                key: key.into(),
                expected: r2,
                actual: r3
            }
        );
        let kv = s.get(key).await.unwrap().unwrap();
        assert_eq!(kv.value, b"3");
        assert_eq!(kv.create_revision, r1);
        assert_eq!(kv.mod_revision, r3);
        assert_eq!(s.current_revision().await.unwrap(), r3);
    }

    pub async fn delete(b: Backend) {
        let s = b.s();
        let key = "/registry/secrets/ns/s";
        let err = s.delete(key, None).await.unwrap_err();
        assert_eq!(err, StorageError::NotFound(key.into()));
        let r1 = s.create(key, b"1".to_vec()).await.unwrap();
        let r2 = s.update(key, b"2".to_vec(), Some(r1)).await.unwrap();
        let err = s.delete(key, Some(r1)).await.unwrap_err();
        assert_eq!(
            err,
            StorageError::Conflict {
                key: key.into(),
                expected: r1,
                actual: r2
            }
        );
        let (r3, prev) = s.delete(key, Some(r2)).await.unwrap();
        assert!(r3 > r2);
        assert_eq!(prev.key, key);
        assert_eq!(prev.value, b"2");
        assert_eq!(prev.create_revision, r1);
        assert_eq!(prev.mod_revision, r2);
        assert_eq!(s.get(key).await.unwrap(), None);
        assert_eq!(s.current_revision().await.unwrap(), r3);
        let err = s.delete(key, Some(r2)).await.unwrap_err();
        assert_eq!(err, StorageError::NotFound(key.into()));
        // Delete without expectation, and re-create gets a fresh create_revision.
        let r4 = s.create(key, b"again".to_vec()).await.unwrap();
        let (r5, prev) = s.delete(key, None).await.unwrap();
        assert!(r5 > r4);
        assert_eq!(prev.create_revision, r4);
    }

    pub async fn list(b: Backend) {
        let s = b.s();
        for k in [
            "/registry/pods/ab/z",
            "/registry/pods/a/c",
            "/registry/pods/a/a",
            "/registry/pods/a/b",
            "/registry/pods/b/a",
            "/registry/podsx/a",
            "/registry/services/a/a",
        ] {
            s.create(k, k.as_bytes().to_vec()).await.unwrap();
        }
        let rev = s.current_revision().await.unwrap();
        let keys = |l: &skiff_control::storage::ListResult| {
            l.items.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>()
        };

        let l = s.list("/registry/pods/a/", None, None).await.unwrap();
        assert_eq!(
            keys(&l),
            [
                "/registry/pods/a/a",
                "/registry/pods/a/b",
                "/registry/pods/a/c"
            ]
        );
        assert!(!l.more);
        assert_eq!(l.revision, rev);
        assert!(l.items.iter().all(|kv| kv.value == kv.key.as_bytes()));

        let l = s.list("/registry/pods/", None, None).await.unwrap();
        assert_eq!(
            keys(&l),
            [
                "/registry/pods/a/a",
                "/registry/pods/a/b",
                "/registry/pods/a/c",
                "/registry/pods/ab/z",
                "/registry/pods/b/a"
            ]
        );

        // Pagination.
        let p1 = s.list("/registry/pods/", None, Some(2)).await.unwrap();
        assert_eq!(keys(&p1), ["/registry/pods/a/a", "/registry/pods/a/b"]);
        assert!(p1.more);
        let p2 = s
            .list("/registry/pods/", Some("/registry/pods/a/b"), Some(2))
            .await
            .unwrap();
        assert_eq!(keys(&p2), ["/registry/pods/a/c", "/registry/pods/ab/z"]);
        assert!(p2.more);
        let p3 = s
            .list("/registry/pods/", Some("/registry/pods/ab/z"), Some(2))
            .await
            .unwrap();
        assert_eq!(keys(&p3), ["/registry/pods/b/a"]);
        assert!(!p3.more);
        // Exactly `limit` left: no more.
        let p = s
            .list("/registry/pods/", Some("/registry/pods/a/c"), Some(2))
            .await
            .unwrap();
        assert_eq!(keys(&p), ["/registry/pods/ab/z", "/registry/pods/b/a"]);
        assert!(!p.more);
        // start_after before the prefix starts at the prefix; after it, nothing.
        let p = s
            .list("/registry/pods/a/", Some("/registry/a"), None)
            .await
            .unwrap();
        assert_eq!(keys(&p).len(), 3);
        let p = s
            .list("/registry/pods/a/", Some("/registry/z"), None)
            .await
            .unwrap();
        assert!(p.items.is_empty());
        // Empty result still carries the store revision.
        let e = s.list("/registry/nothing/", None, Some(10)).await.unwrap();
        assert!(e.items.is_empty() && !e.more);
        assert_eq!(e.revision, rev);
    }

    pub async fn count(b: Backend) {
        let s = b.s();
        assert_eq!(s.count("/registry/pods/").await.unwrap(), 0);
        for k in [
            "/registry/pods/a/1",
            "/registry/pods/a/2",
            "/registry/pods/ab/1",
            "/registry/x",
        ] {
            s.create(k, b"v".to_vec()).await.unwrap();
        }
        assert_eq!(s.count("/registry/pods/").await.unwrap(), 3);
        assert_eq!(s.count("/registry/pods/a/").await.unwrap(), 2);
        assert_eq!(s.count("/registry/").await.unwrap(), 4);
        s.delete("/registry/pods/a/1", None).await.unwrap();
        assert_eq!(s.count("/registry/pods/a/").await.unwrap(), 1);
    }

    pub async fn revisions_increase(b: Backend) {
        let s = b.s();
        let mut last = s.current_revision().await.unwrap();
        for i in 0..5 {
            let key = format!("/registry/r/{i}");
            let r = s.create(&key, b"a".to_vec()).await.unwrap();
            assert!(r > last);
            assert_eq!(s.current_revision().await.unwrap(), r);
            last = r;
            let r = s.update(&key, b"b".to_vec(), Some(r)).await.unwrap();
            assert!(r > last);
            assert_eq!(s.current_revision().await.unwrap(), r);
            last = r;
        }
        let (r, _) = s.delete("/registry/r/0", None).await.unwrap();
        assert!(r > last);
        assert_eq!(s.current_revision().await.unwrap(), r);
        assert_eq!(
            s.list("/registry/r/", None, None).await.unwrap().revision,
            r
        );
    }

    pub async fn watch_replay_then_live(b: Backend) {
        let s = b.s();
        let start = s.current_revision().await.unwrap();
        let k = "/registry/pods/ns/p";
        let r1 = s.create(k, b"1".to_vec()).await.unwrap();
        let r2 = s.update(k, b"2".to_vec(), Some(r1)).await.unwrap();
        let (r3, _) = s.delete(k, Some(r2)).await.unwrap();

        // From the start: everything.
        let mut w = s.watch("/registry/pods/", start).await.unwrap();
        assert_eq!(next_event(&mut w).await, ev(EventKind::Added, k, b"1", r1));
        assert_eq!(
            next_event(&mut w).await,
            ev(EventKind::Modified, k, b"2", r2)
        );
        assert_eq!(
            next_event(&mut w).await,
            ev(EventKind::Deleted, k, b"2", r3)
        );
        // From r1: only the missed ones.
        let mut w2 = s.watch("/registry/pods/", r1).await.unwrap();
        assert_eq!(
            next_event(&mut w2).await,
            ev(EventKind::Modified, k, b"2", r2)
        );
        assert_eq!(
            next_event(&mut w2).await,
            ev(EventKind::Deleted, k, b"2", r3)
        );
        // From now: nothing until a new write.
        let mut w3 = s.watch("/registry/pods/", r3).await.unwrap();
        assert_quiet(&mut w3).await;

        let r4 = s.create(k, b"new".to_vec()).await.unwrap();
        for w in [&mut w, &mut w2, &mut w3] {
            assert_eq!(next_event(w).await, ev(EventKind::Added, k, b"new", r4));
        }
        for w in [&mut w, &mut w2, &mut w3] {
            assert_quiet(w).await;
        }
    }

    pub async fn watch_concurrent_writes_no_gaps(b: Backend) {
        // Writers racing with watch creation: every watcher sees a gap-free, duplicate-free
        // sequence after its start revision.
        let store = b.store.clone();
        let writer = tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..40 {
                revs.push(
                    store
                        .create(&format!("/registry/w/{i:03}"), vec![i as u8])
                        .await
                        .unwrap(),
                );
            }
            revs
        });
        let mut watchers = Vec::new();
        for _ in 0..5 {
            let after = b.s().current_revision().await.unwrap();
            watchers.push((after, b.s().watch("/registry/w/", after).await.unwrap()));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let revs = writer.await.unwrap();
        for (after, mut w) in watchers {
            for &r in revs.iter().filter(|&&r| r > after) {
                assert_eq!(next_event(&mut w).await.revision, r);
            }
            assert_quiet(&mut w).await;
        }
    }

    pub async fn watch_prefix_filter(b: Backend) {
        let s = b.s();
        let after = s.current_revision().await.unwrap();
        let mut w = s.watch("/registry/pods/a/", after).await.unwrap();
        s.create("/registry/pods/ab/x", b"no".to_vec())
            .await
            .unwrap();
        s.create("/registry/pods/b/x", b"no".to_vec())
            .await
            .unwrap();
        let r = s
            .create("/registry/pods/a/x", b"yes".to_vec())
            .await
            .unwrap();
        s.create("/registry/services/a/x", b"no".to_vec())
            .await
            .unwrap();
        let e = next_event(&mut w).await;
        assert_eq!(e, ev(EventKind::Added, "/registry/pods/a/x", b"yes", r));
        assert_quiet(&mut w).await;
        // Replay is filtered the same way.
        let mut w = s.watch("/registry/pods/a/", after).await.unwrap();
        assert_eq!(next_event(&mut w).await.revision, r);
        assert_quiet(&mut w).await;
    }

    pub async fn watch_compacted(mut b: Backend) {
        let s = b.store.clone();
        let start = s.current_revision().await.unwrap();
        let r1 = s.create("/registry/c/1", b"1".to_vec()).await.unwrap();
        let r2 = s.create("/registry/c/2", b"2".to_vec()).await.unwrap();
        b.compact(r2).await;
        let s = b.store.clone();
        let current = s.current_revision().await.unwrap();
        for after in [start, r1] {
            match s.watch("/registry/c/", after).await {
                Err(StorageError::Compacted { requested, .. }) => assert_eq!(requested, after),
                Err(e) => panic!("watch from {after}: expected Compacted, got {e}"),
                Ok(_) => panic!("watch from {after}: expected Compacted, got a stream"),
            }
        }
        // The current revision can always be watched.
        let mut w = s.watch("/registry/c/", current).await.unwrap();
        let r = s.create("/registry/c/3", b"3".to_vec()).await.unwrap();
        assert_eq!(next_event(&mut w).await.revision, r);
    }

    pub async fn concurrent_updates(b: Backend) {
        let key = "/registry/counter";
        b.s().create(key, b"0".to_vec()).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..20 {
            let store = b.store.clone();
            tasks.push(tokio::spawn(async move {
                let mut ok = 0u64;
                for _ in 0..5 {
                    let kv = store.get(key).await.unwrap().unwrap();
                    let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                    match store
                        .update(key, (n + 1).to_string().into_bytes(), Some(kv.mod_revision))
                        .await
                    {
                        Ok(_) => ok += 1,
                        Err(StorageError::Conflict { .. }) => {}
                        Err(e) => panic!("update: {e}"),
                    }
                }
                ok
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert!(total > 0);
        let kv = b.s().get(key).await.unwrap().unwrap();
        let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
        assert_eq!(
            n, total,
            "counter must equal the number of successful updates"
        );
    }

    pub async fn persistence(mut b: Backend) {
        let s = b.store.clone();
        let r1 = s.create("/registry/p/a", b"a".to_vec()).await.unwrap();
        let r2 = s.create("/registry/p/b", b"b".to_vec()).await.unwrap();
        let r3 = s
            .update("/registry/p/a", b"a2".to_vec(), Some(r1))
            .await
            .unwrap();
        let (r4, _) = s.delete("/registry/p/b", Some(r2)).await.unwrap();
        drop(s);
        b.restart().await;
        let s = b.store.clone();
        // etcd may need a moment to accept requests again after a restart.
        let deadline = Instant::now() + Duration::from_secs(15);
        let rev = loop {
            match s.current_revision().await {
                Ok(r) => break r,
                Err(StorageError::Unavailable(_)) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("after restart: {e}"),
            }
        };
        assert_eq!(rev, r4);
        let a = s.get("/registry/p/a").await.unwrap().unwrap();
        assert_eq!(
            (a.value.as_slice(), a.create_revision, a.mod_revision),
            (&b"a2"[..], r1, r3)
        );
        assert_eq!(s.get("/registry/p/b").await.unwrap(), None);
        // Writes continue from the persisted revision.
        let r5 = s.create("/registry/p/c", b"c".to_vec()).await.unwrap();
        assert_eq!(r5, r4 + 1);
        // Watching from the current revision works after a restart.
        let mut w = s.watch("/registry/p/", r5).await.unwrap();
        let r6 = s
            .update("/registry/p/c", b"c2".to_vec(), Some(r5))
            .await
            .unwrap();
        assert_eq!(
            next_event(&mut w).await,
            ev(EventKind::Modified, "/registry/p/c", b"c2", r6)
        );
    }
}

macro_rules! conformance {
    ($backend:ident, $($test:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::suite::$test(super::Backend::$backend().await).await;
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($test:ident),* $(,)?) => {
        conformance!(embedded, $($test),*);
        conformance!(etcd, $($test),*);
    };
}

all_backends!(
    create_get,
    empty_store_revision,
    update,
    delete,
    list,
    count,
    revisions_increase,
    watch_replay_then_live,
    watch_concurrent_writes_no_gaps,
    watch_prefix_filter,
    watch_compacted,
    concurrent_updates,
    persistence,
);

// ---- Backend-specific behaviour -------------------------------------------------------

/// Embedded: after a restart the in-memory history is gone: older revisions are Compacted.
#[tokio::test]
async fn embedded_restart_loses_history() {
    let mut b = Backend::embedded().await;
    let start = b.s().current_revision().await.unwrap();
    let r1 = b.s().create("/registry/h/1", b"1".to_vec()).await.unwrap();
    let _replay = b.s().watch("/registry/h/", start).await.unwrap();
    b.restart().await;
    assert!(matches!(
        b.s().watch("/registry/h/", start).await,
        Err(StorageError::Compacted { .. })
    ));
    assert!(b.s().watch("/registry/h/", r1).await.is_ok());
}

/// Embedded: a watcher that falls behind the live buffer ends with Compacted, not a gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_lagging_watcher_gets_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let s = EmbeddedStore::open(&dir.path().join("db")).unwrap();
    let after = s.current_revision().await.unwrap();
    let mut w = s.watch("/registry/", after).await.unwrap();
    // Never poll `w` while writing far more than the broadcast buffer holds.
    for i in 0..5000 {
        s.create(&format!("/registry/l/{i}"), b"x".to_vec())
            .await
            .unwrap();
    }
    let mut last = after;
    loop {
        match tokio::time::timeout(STEP, w.next()).await.unwrap() {
            Some(Ok(e)) => {
                assert_eq!(e.revision, last + 1, "no gaps before the error");
                last = e.revision;
            }
            Some(Err(StorageError::Compacted { .. })) => break,
            other => panic!("expected Compacted, got {other:?}"),
        }
    }
    assert!(w.next().await.is_none(), "stream ends after Compacted");
}

/// etcd down: requests fail with Unavailable quickly, and work again after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_unavailable_and_recovers() {
    let mut b = Backend::etcd().await;
    b.s().create("/registry/u/1", b"1".to_vec()).await.unwrap();
    let Kind::Etcd { etcd } = &mut b.kind else {
        unreachable!()
    };
    etcd.stop();

    let t = Instant::now();
    let err = b.s().get("/registry/u/1").await.unwrap_err();
    let took = t.elapsed();
    assert!(matches!(err, StorageError::Unavailable(_)), "got {err:?}");
    assert!(took < Duration::from_secs(7), "took {took:?}");
    eprintln!("etcd down: {err} after {took:?}");
    let err = b
        .s()
        .create("/registry/u/2", b"2".to_vec())
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::Unavailable(_)), "got {err:?}");
    assert!(matches!(
        b.s().watch("/registry/u/", 1).await,
        Err(StorageError::Unavailable(_))
    ));

    // A client created while etcd is down does not hang either.
    let t = Instant::now();
    let Kind::Etcd { etcd } = &mut b.kind else {
        unreachable!()
    };
    let fresh = EtcdStore::connect(&[etcd.endpoint()]).await;
    assert!(t.elapsed() < Duration::from_secs(7));
    if let Ok(fresh) = &fresh {
        assert!(matches!(
            fresh.get("/x").await,
            Err(StorageError::Unavailable(_))
        ));
    }

    tokio::task::spawn_blocking({
        let Kind::Etcd { etcd } = std::mem::replace(
            &mut b.kind,
            Kind::Embedded {
                dir: tempfile::tempdir().unwrap(),
            },
        ) else {
            unreachable!()
        };
        move || {
            let mut etcd = etcd;
            etcd.restart().expect("restart etcd");
            etcd
        }
    })
    .await
    .map(|etcd| b.kind = Kind::Etcd { etcd })
    .unwrap();

    let t = Instant::now();
    let deadline = t + Duration::from_secs(15);
    loop {
        match b.s().get("/registry/u/1").await {
            Ok(kv) => {
                assert_eq!(kv.unwrap().value, b"1");
                break;
            }
            Err(StorageError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("still unavailable: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("etcd did not recover: {e}"),
        }
    }
    eprintln!("recovered after {:?}", t.elapsed());
    b.s().create("/registry/u/2", b"2".to_vec()).await.unwrap();
    if let Ok(fresh) = fresh {
        assert!(fresh.get("/registry/u/2").await.unwrap().is_some());
    }
}

/// etcd hung (SIGSTOP): requests time out with Unavailable instead of hanging; the same
/// client works again once etcd resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_hung_times_out() {
    let b = Backend::etcd().await;
    let r1 = b.s().create("/registry/h/1", b"1".to_vec()).await.unwrap();
    let Kind::Etcd { etcd } = &b.kind else {
        unreachable!()
    };
    etcd.pause();
    let t = Instant::now();
    let (get, watch) = tokio::join!(b.s().get("/registry/h/1"), b.s().watch("/registry/h/", r1));
    let took = t.elapsed();
    etcd.resume();
    assert!(matches!(get, Err(StorageError::Unavailable(_))), "{get:?}");
    assert!(matches!(watch, Err(StorageError::Unavailable(_))));
    assert!(took < Duration::from_secs(8), "took {took:?}");
    eprintln!("hung etcd: {:?} after {took:?}", get.unwrap_err());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match b.s().get("/registry/h/1").await {
            Ok(kv) => break assert_eq!(kv.unwrap().mod_revision, r1),
            Err(StorageError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("did not recover: {e}"),
        }
    }
}

/// etcd killed under an open watch: the stream ends with an error (never silently), and a
/// new watch from the last seen revision after the restart misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_survives_restart_by_rewatch() {
    let mut b = Backend::etcd().await;
    let after = b.s().current_revision().await.unwrap();
    let mut w = b.s().watch("/registry/w/", after).await.unwrap();
    let r1 = b.s().create("/registry/w/1", b"1".to_vec()).await.unwrap();
    assert_eq!(next_event(&mut w).await.revision, r1);
    let Kind::Etcd { etcd } = &mut b.kind else {
        unreachable!()
    };
    etcd.stop();
    match tokio::time::timeout(STEP, w.next())
        .await
        .expect("watch notices")
    {
        Some(Err(StorageError::Unavailable(e))) => eprintln!("watch ended: {e}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(w.next().await.is_none());
    b.restart().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut w = loop {
        match b.s().watch("/registry/w/", r1).await {
            Ok(w) => break w,
            Err(StorageError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("re-watch: {e}"),
        }
    };
    let r2 = b
        .s()
        .update("/registry/w/1", b"2".to_vec(), Some(r1))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut w).await,
        ev(EventKind::Modified, "/registry/w/1", b"2", r2)
    );
}
