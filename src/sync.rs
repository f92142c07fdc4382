//! Synchronisation primitives of the progress core, swapped for `loom`'s under
//! `--cfg streamcache_loom` so the core can be model-checked.

#[cfg(streamcache_loom)]
pub(crate) use loom::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
#[cfg(streamcache_loom)]
pub(crate) use loom::sync::{Condvar, Mutex, MutexGuard};

#[cfg(not(streamcache_loom))]
pub(crate) use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(streamcache_loom))]
pub(crate) use std::sync::{Condvar, Mutex, MutexGuard};
