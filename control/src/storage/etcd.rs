//! etcd backend. Filled in by the storage work.
