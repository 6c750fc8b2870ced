//! skiff control plane.
pub mod apiserver;
pub mod storage;
