//! skiff control plane.
pub mod apiserver;
pub mod component;
pub mod controllers;
pub mod events;
pub mod hollow;
pub mod leader;
pub mod objects;
pub mod scheduler;
pub mod storage;
