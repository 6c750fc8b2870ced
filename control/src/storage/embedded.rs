//! Embedded backend (redb). Filled in by the storage work.
