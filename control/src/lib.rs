//! skiff control plane.
pub mod storage;
