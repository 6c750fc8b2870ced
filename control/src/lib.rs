//! skiff control plane.
pub mod apiserver;
pub mod controllers;
pub mod leader;
pub mod objects;
pub mod scheduler;
pub mod storage;
