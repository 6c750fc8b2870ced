//! Storage: the only place cluster state lives. The apiserver is its only client.
//!
//! One trait, two backends, one conformance suite (control/tests/storage_conformance.rs):
//! - `embedded` (default): a single redb file, a global revision counter and a bounded
//!   in-memory event history for watch.
//! - `etcd`: etcd v3, keys laid out as Kubernetes does (/registry/<resource>/<ns>/<name>),
//!   revision = etcd revision, watch through etcd watch.
//!
//! Values are opaque bytes (the apiserver stores JSON without resourceVersion; it fills
//! metadata.resourceVersion from `mod_revision` when it reads).

pub mod embedded;
pub mod etcd;
pub mod etcd_process;

use std::pin::Pin;

use futures::Stream;

/// A revision of the whole store; Kubernetes' resourceVersion. Strictly increasing,
/// starts at 1 for an empty store (etcd semantics).
pub type Revision = i64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key.
    pub create_revision: Revision,
    /// Revision of the last write to the key (the object's resourceVersion).
    pub mod_revision: Revision,
}

#[derive(Debug, Clone)]
pub struct ListResult {
    pub items: Vec<KeyValue>,
    /// Store revision the list was read at.
    pub revision: Revision,
    /// True when more keys after the last returned one match the prefix.
    pub more: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub key: String,
    /// New value; for `Deleted`, the last value before deletion. Shared (not copied) by
    /// every watcher's clone of the event.
    pub value: bytes::Bytes,
    /// Revision of this event (for `Deleted`, the deletion revision).
    pub revision: Revision,
    /// What a reader derives from this event once for all watchers that receive a clone
    /// of it (the apiserver keeps the decoded object and its JSON encoding here, so ten
    /// watchers of pods parse and serialise each pod write once, not ten times).
    pub memo: EventMemo,
}

/// See [`WatchEvent::memo`]; empty until the first reader fills it.
pub type EventMemo =
    std::sync::Arc<std::sync::OnceLock<std::sync::Arc<dyn std::any::Any + Send + Sync>>>;

impl WatchEvent {
    pub fn new(
        kind: EventKind,
        key: String,
        value: impl Into<bytes::Bytes>,
        revision: Revision,
    ) -> Self {
        Self {
            kind,
            key,
            value: value.into(),
            revision,
            memo: EventMemo::default(),
        }
    }
}

/// Events are equal when they say the same thing (the memo is a cache).
impl PartialEq for WatchEvent {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.key == other.key
            && self.value == other.value
            && self.revision == other.revision
    }
}

impl Eq for WatchEvent {}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StorageError {
    #[error("key not found: {0}")]
    NotFound(String),
    #[error("key already exists: {0}")]
    AlreadyExists(String),
    /// The expected mod_revision did not match (optimistic concurrency).
    #[error("conflict on {key}: expected revision {expected}, found {actual}")]
    Conflict {
        key: String,
        expected: Revision,
        actual: Revision,
    },
    /// A watch or list asked for a revision older than the retained history.
    #[error("revision {requested} has been compacted; oldest available is {oldest}")]
    Compacted {
        requested: Revision,
        oldest: Revision,
    },
    /// The backend cannot be reached (etcd down). Maps to 503.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent>> + Send>>;

#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Human name of the backend ("embedded", "etcd") for logs and benchmarks.
    fn name(&self) -> &'static str;

    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Keys starting with `prefix`, in key order, strictly after `start_after` when given,
    /// at most `limit` items when given (`more` tells if there are others).
    async fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListResult>;

    /// Number of keys under `prefix`.
    async fn count(&self, prefix: &str) -> Result<i64>;

    /// Creates `key`; fails with `AlreadyExists`. Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision>;

    /// Replaces the value of an existing key. With `expected` set, fails with `Conflict`
    /// unless the key's mod_revision equals it. `NotFound` if absent. Returns the new revision.
    async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Revision>,
    ) -> Result<Revision>;

    /// Deletes `key` (same `expected` rule as update). Returns the deletion revision and
    /// the value that was deleted.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;

    /// Current revision of the whole store.
    async fn current_revision(&self) -> Result<Revision>;

    /// Events for keys under `prefix` with revision > `after`, in revision order, then
    /// live events. `Compacted` if events after `after` are no longer retained.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;
}
