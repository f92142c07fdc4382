//! A keyed cache of byte **streams**: the first requester of a key writes it, everyone else
//! reads it *while it is being written*, from byte 0, each at their own pace.
//!
//! ```
//! use std::io::{Read, Write};
//! use streamcache::{Cache, Entry};
//!
//! let cache = Cache::builder().memory().build()?;
//! match cache.get_or_create("https://example.com/big.bin")? {
//!     Entry::Miss(mut w) => {
//!         // We are the one producer: stream bytes in; readers may already be reading.
//!         w.write_all(b"expensive bytes")?;
//!         w.finish()?;
//!     }
//!     Entry::Hit(mut r) => {
//!         let mut buf = Vec::new();
//!         r.read_to_end(&mut buf)?;
//!     }
//! }
//! let mut r = cache.get("https://example.com/big.bin")?.expect("present");
//! let mut s = String::new();
//! r.read_to_string(&mut s)?;
//! assert_eq!(s, "expensive bytes");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Layers
//!
//! * [`Cache`] ([`cache`]): keys → entries, `get_or_create`, removal, limits, reload, and a
//!   background reaper that does the blocking part of removal and eviction.
//! * [`Stream`] ([`stream`]): one blob's life — one [`Writer`], many [`Reader`]s, progress and
//!   wake-ups. Usable on its own, without a cache.
//! * [`Storage`](storage::Storage) ([`storage`]): where bytes live —
//!   [`MemoryStorage`](storage::MemoryStorage), [`DiskStorage`](storage::DiskStorage) (Unix),
//!   several directories ([`CacheBuilder::disks`]) with an optional memory front
//!   ([`CacheBuilder::memory_front`]), or your own implementation.
//!
//! # Features
//!
//! * `tokio`: async adapters (the `tokio` module).
//! * `shared`: a shared tier on object storage (the `shared` module, on `object_store`; brings
//!   tokio): one producer per key across a fleet, remote readers stream while it is produced.
//! * `s3`: `shared` with S3 support (`SharedTier::from_url("s3://bucket/prefix")`).
//! * `test-util`: test tools — a fault-injecting storage and `Cache::storage`. Not for
//!   production use.
//!
//! # Platforms
//!
//! Tested on Linux. The memory cache builds wherever `std` does; disk storage needs Unix
//! (`flock`, `O_NOFOLLOW`).
//!
//! # Behaviour
//!
//! * A reader at the written end of an unfinished stream blocks until more bytes are
//!   published, the stream finishes (end of file) or fails (an error). Writers publish every
//!   1 MiB, on `flush()` and on `finish()`.
//! * A writer dropped without [`finish`](Writer::finish) (or a failed write) **aborts** the
//!   entry: readers get [`Error::Aborted`], never a clean end of file; the next request misses.
//! * [`Cache::remove`] and eviction never cut an open reader and never block: the key is
//!   gone for new requests at once; the data is deleted in the background.
//! * On disk, finished entries survive restarts and crashes; unfinished ones are discarded;
//!   stored data is checked with blake3 as it is read back.
//!
//! # Concurrency model
//!
//! * **Linearizable:** `get_or_create`, `get`, `remove` and `contains_key` on one key. For a
//!   key, exactly one caller gets [`Entry::Miss`] until that entry is removed, expires or
//!   aborts; every later call sees the entry or its removal.
//! * **Linearizable, without side effects:** [`Cache::entry_info`] on one key sees what a
//!   `get` at the same instant would serve, without counting, refreshing or reading it.
//! * **Weakly consistent:** [`Cache::iter`] yields every entry present for the whole
//!   iteration once, may or may not yield entries inserted or removed meanwhile, and holds no
//!   lock between items; [`Cache::keys`] is a snapshot.
//! * **Eventual:** eviction (the reaper acts shortly after a limit is crossed or an entry
//!   expires, though an expired entry is never *served*), [`Cache::len`],
//!   [`Cache::total_bytes`], [`Cache::stats`], and recency order.
//! * **While the index loads after a reopen** (see [`CacheBuilder::startup_wait`]): requests
//!   stay linearizable per key (a stored key not indexed yet is looked up directly, and never
//!   gets a second producer); `len`, `keys`, `iter` and `total_bytes` miss entries not indexed
//!   yet, and size eviction waits until the load completes.
//! * **Never blocking a request:** the index is a sharded map whose locks are held only for
//!   one map operation (a hit also opens its reader and records itself under the shard's read
//!   lock), never across I/O; readers read storage without any lock and wait on a
//!   condition variable only at the written end; deletions run on the reaper thread (in
//!   memory, where they are no I/O, a finishing writer deletes what it evicts) and
//!   listener calls on a notifier thread, through bounded queues (see
//!   [`Cache::remove`] for the back-pressure when they fill).
//! * [`Cache`] is `Send + Sync`. [`Reader`] and [`Writer`] are `Send + 'static`: they own what
//!   they need and outlive the call (and the cache) that made them.

pub mod cache;
mod codec;
pub mod error;
#[cfg(feature = "shared")]
pub mod shared;
pub mod storage;
pub mod stream;
mod sync;
#[cfg(feature = "tokio")]
pub mod tokio;

pub use cache::{Cache, CacheBuilder, CacheStats, Entry, RemovalCause};
pub use error::{Error, Result};
pub use stream::{Reader, Size, Stream, Writer};

/// The README's examples, run as doctests (they include the async one, hence the feature).
#[cfg(all(doctest, feature = "tokio"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    /// The pinned thread-safety of the public types.
    #[test]
    fn public_types_are_thread_safe() {
        fn send_sync<T: Send + Sync + 'static>() {}
        fn send<T: Send + 'static>() {}
        send_sync::<crate::Cache>();
        send_sync::<crate::Reader>();
        send_sync::<crate::Stream>();
        send_sync::<crate::Error>();
        send::<crate::Writer>();
        send::<crate::Entry>();
    }
}
