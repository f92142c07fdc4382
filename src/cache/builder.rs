use std::fmt;
#[cfg(unix)]
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::clock::{Clock, SystemClock};
use super::index::Listener;
use super::{Cache, Expiry, Policy, RemovalCause};
use crate::error::{Error, Result};
#[cfg(unix)]
use crate::storage::{DiskStorage, Durability, FrontStorage, PartitionedStorage};
use crate::storage::{MemoryStorage, Storage};

#[derive(Debug, Clone)]
enum Backend {
    Memory,
    #[cfg(unix)]
    Disk(PathBuf),
    #[cfg(unix)]
    Disks(Vec<PathBuf>),
    Custom(Arc<dyn Storage>),
}

/// Releases the directory locks of a storage the cache opened itself.
pub(super) type Unlock = Box<dyn FnOnce() + Send + Sync>;

/// Configures and builds a [`Cache`]. Start with [`Cache::builder`].
///
/// ```
/// use std::time::Duration;
/// use streamcache::Cache;
///
/// let dir = tempfile::tempdir()?;
/// let cache = Cache::builder()
///     .disk(dir.path())
///     .max_entries(10_000)
///     .max_bytes(10 << 30)
///     .time_to_live(Duration::from_secs(3600))
///     .time_to_idle(Duration::from_secs(600))
///     .build()?;
/// assert!(cache.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use]
pub struct CacheBuilder {
    backend: Backend,
    #[cfg(unix)]
    durability: Durability,
    /// Bytes of the memory front over disk storage, if any.
    front: Option<u64>,
    pub(super) max_entries: Option<u64>,
    pub(super) max_bytes: Option<u64>,
    pub(super) ttl: Option<Duration>,
    pub(super) tti: Option<Duration>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) listener: Option<Listener>,
    pub(super) policy: Option<Arc<dyn Policy>>,
    pub(super) expiry: Option<Arc<dyn Expiry>>,
    pub(super) tick: Option<Duration>,
    pub(super) max_idle_open: usize,
    pub(super) startup_wait: Duration,
    /// The shared tier under this cache, if any.
    #[cfg(feature = "shared")]
    pub(super) shared: Option<crate::shared::SharedTier>,
}

impl fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CacheBuilder");
        d.field("backend", &self.backend);
        #[cfg(unix)]
        d.field("durability", &self.durability);
        d.field("memory_front", &self.front)
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("time_to_live", &self.ttl)
            .field("time_to_idle", &self.tti)
            .field("listener", &self.listener.is_some())
            .field("policy", &self.policy)
            .field("expiry", &self.expiry);
        #[cfg(feature = "shared")]
        d.field("shared", &self.shared);
        d.finish()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        CacheBuilder {
            backend: Backend::Memory,
            #[cfg(unix)]
            durability: Durability::Buffered,
            front: None,
            max_entries: None,
            max_bytes: None,
            ttl: None,
            tti: None,
            clock: Arc::new(SystemClock),
            listener: None,
            policy: None,
            expiry: None,
            tick: None,
            max_idle_open: 128,
            startup_wait: Duration::from_millis(100),
            #[cfg(feature = "shared")]
            shared: None,
        }
    }
}

impl CacheBuilder {
    /// Puts a shared tier (a bucket that other machines' caches use too) under this cache:
    /// a local miss is served from the bucket when another node has produced or is producing
    /// the key, and exactly one node fleet-wide produces it otherwise. See the
    /// [`shared`](crate::shared) module for the protocol and its guarantees.
    ///
    /// [`build`](CacheBuilder::build) checks that the store supports the conditional writes
    /// the tier needs and refuses it otherwise ([`Error::InvalidInput`]); a store that does
    /// not answer at build time is not an error (the cache works locally until it does).
    #[cfg(feature = "shared")]
    pub fn shared(mut self, tier: crate::shared::SharedTier) -> Self {
        self.shared = Some(tier);
        self
    }

    /// Keep entries in memory (the default).
    pub fn memory(mut self) -> Self {
        self.backend = Backend::Memory;
        self
    }

    #[cfg(unix)]
    /// Keep entries in the directory `dir` (created if missing). Finished entries survive a
    /// restart; see [`storage::DiskStorage`](crate::storage::DiskStorage) for the layout.
    pub fn disk(mut self, dir: impl Into<PathBuf>) -> Self {
        self.backend = Backend::Disk(dir.into());
        self
    }

    #[cfg(unix)]
    /// Keep entries in several directories, one per disk, each key in one of them (created if
    /// missing; each is locked like [`disk`](CacheBuilder::disk)'s). The limits hold for the
    /// whole cache.
    ///
    /// Keys are placed by rendezvous hashing against an identity stored in each directory
    /// (`partition-id`), so the placement does not depend on the order or the paths given,
    /// and adding an `n`-th directory moves only about `1/n` of the keys (Go's `fscache`
    /// used `hash % n`, which moves most of them). Reopening with a directory added still
    /// serves every entry where it is; a new version of a key is written to its new home and
    /// the old one deleted, and no two versions of a key are ever served. A directory left
    /// out takes its entries with it.
    ///
    /// ```
    /// use streamcache::Cache;
    ///
    /// let (a, b) = (tempfile::tempdir()?, tempfile::tempdir()?);
    /// let cache = Cache::builder().disks([a.path(), b.path()]).build()?;
    /// for i in 0..100 {
    ///     cache.get_or_produce(&format!("k{i}"), |w| w.write_all(b"x"))?;
    /// }
    /// # use std::io::Write;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn disks<P: Into<PathBuf>>(mut self, dirs: impl IntoIterator<Item = P>) -> Self {
        self.backend = Backend::Disks(dirs.into_iter().map(Into::into).collect());
        self
    }

    #[cfg(unix)]
    /// With disk storage ([`disk`](CacheBuilder::disk) or [`disks`](CacheBuilder::disks)):
    /// keep up to `max_bytes` of recently read small entries in memory too (entries up to an
    /// eighth of it). A hit on disk is served from disk at once and copied to memory in the
    /// background; later hits read memory, with zero-copy
    /// [`read_chunk`](crate::Reader::read_chunk), and need no file opened. The memory is on
    /// top of `max_bytes` (which counts what is on disk).
    ///
    /// It pays off when hot entries outnumber the file handles the cache keeps open
    /// ([`max_idle_handles`](CacheBuilder::max_idle_handles)), and after a restart: measured
    /// through the cache on the development machine, a 4 KiB hit that must reopen its file
    /// takes 0.04–0.05× the time from memory, and a hot 1 MiB entry reads 2.2–3× faster
    /// through `io::Read` (zero-copy through `read_chunk`). An entry whose handle stays open
    /// is read from its file as before (no gain, no loss), though its memory copy is made.
    /// See `docs/benchmarks.md`.
    pub fn memory_front(mut self, max_bytes: u64) -> Self {
        self.front = Some(max_bytes);
        self
    }

    /// Use any [`Storage`]. Committed blobs it lists are reloaded as entries, so a
    /// [`MemoryStorage`] shared between two caches behaves like a directory reopened.
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.backend = Backend::Custom(storage);
        self
    }

    #[cfg(unix)]
    /// With disk storage (one directory or several): what a finished entry survives (see
    /// [`Durability`]). The default, [`Durability::Buffered`], survives a crash of the
    /// process; [`Durability::SyncOnCommit`] makes [`Writer::finish`](crate::Writer::finish)
    /// fsync the data, its record and the directory, so it also survives a power loss.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// At most `n` entries; least recently used finished entries are evicted beyond that, by
    /// the reaper as soon as a write breaks the limit. If writers outrun the reaper and the
    /// count passes `n` by more than `max(n / 16, 64)`, each finishing writer also evicts up
    /// to two entries itself (no I/O: their data is still deleted by the reaper) — unless a
    /// [`Policy`](crate::cache::Policy) is set, whose calls stay on the reaper. In
    /// [`memory`](CacheBuilder::memory) without a policy, each finishing writer evicts first
    /// (up to four entries, deleting them itself: no I/O there), and the reaper is woken only
    /// for what it could not evict, or when writers in flight pass that slack.
    ///
    /// A count of entries, so a `usize` like [`Cache::len`](crate::Cache::len); byte limits
    /// are `u64`.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = Some(u64::try_from(n).unwrap_or(u64::MAX));
        self
    }

    /// At most `n` bytes (entries being written count); least recently used finished entries
    /// are evicted beyond that.
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = Some(n);
        self
    }

    /// Entries expire this long after they were finished (or earlier, if they have a time to
    /// live of their own: see [`expiry`](CacheBuilder::expiry)).
    pub fn time_to_live(mut self, d: Duration) -> Self {
        self.ttl = Some(d);
        self
    }

    /// Entries expire after being unused (no reader or writer open) for this long.
    pub fn time_to_idle(mut self, d: Duration) -> Self {
        self.tti = Some(d);
        self
    }

    /// The time source for expiry and recency (default: the system clock).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Called on a thread of its own (`streamcache-listener`), once per entry that leaves the
    /// cache, with its key and why, in the order the removals happened.
    ///
    /// A slow listener never delays deletions, expiry or size eviction. Its queue holds
    /// 4096 calls: past that, a thread that removes or evicts waits for room (back-pressure),
    /// except the cache's own threads. A panic in it is logged and the next call goes on. It
    /// may call back into the cache; [`Cache::run_pending_tasks`](crate::Cache::run_pending_tasks)
    /// then returns at once, and its own removals call it again inline.
    pub fn eviction_listener(
        mut self,
        f: impl Fn(&str, RemovalCause) + Send + Sync + 'static,
    ) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    /// A policy that can veto evictions (see [`Policy`]).
    pub fn policy(mut self, policy: impl Policy + 'static) -> Self {
        self.policy = Some(Arc::new(policy));
        self
    }

    /// Computes each entry's own time to live when it is finished (see [`Expiry`]); a
    /// writer's [`set_time_to_live`](crate::Writer::set_time_to_live) takes precedence. An
    /// entry expires at the earlier of its own time to live and the cache-wide one.
    pub fn expiry(mut self, expiry: impl Expiry + 'static) -> Self {
        self.expiry = Some(Arc::new(expiry));
        self
    }

    /// How often the reaper looks for expired entries (default: a quarter of the shorter of
    /// time to live and time to idle, between 10 ms and 1 s). Size limits do not wait for it.
    pub fn maintenance_interval(mut self, every: Duration) -> Self {
        self.tick = Some(every);
        self
    }

    /// How many finished entries that nobody is reading keep their storage handle open (an
    /// open file, for disk storage), most recently released first; default 128. Entries being
    /// written or read always keep theirs. A hit on an entry whose handle was closed reopens it
    /// (for disk: a few system calls, and blocks are verified again as they are read).
    pub fn max_idle_handles(mut self, n: usize) -> Self {
        self.max_idle_open = n;
        self
    }

    /// How long [`build`](CacheBuilder::build) waits for the index of the entries already
    /// stored (a directory reopened) before it returns and lets the rest load in the
    /// background; default 100 ms. The load reads the index hint the cache saved last and the
    /// storage's journal of changes since, one pass each (after a clean close or a crash
    /// alike); without a usable hint it lists the directory (one record file per entry).
    /// `docs/benchmarks.md` has the figures. `Duration::ZERO` always loads in the background; `Duration::MAX`
    /// always waits for the whole index.
    ///
    /// While the index loads, the cache serves every request correctly: a key that is stored
    /// but not indexed yet is looked up directly (one directory read) and never gets a second
    /// producer. What is eventual until it completes: [`len`](crate::Cache::len),
    /// [`total_bytes`](crate::Cache::total_bytes), [`keys`](crate::Cache::keys),
    /// [`iter`](crate::Cache::iter) (entries not indexed yet are missing), and size eviction
    /// (it waits for the load, since the recency of the stored entries is not known before).
    /// [`CacheStats::loading`](crate::CacheStats::loading) tells when it is complete;
    /// [`run_pending_tasks`](crate::Cache::run_pending_tasks) waits for it.
    /// [`clear`](crate::Cache::clear) does not: the entries not indexed yet are deleted as
    /// the load finds them.
    pub fn startup_wait(mut self, wait: Duration) -> Self {
        self.startup_wait = wait;
        self
    }

    /// Whether the cache's storage is the memory storage `build` makes, whose deletions are
    /// map removals (no I/O).
    pub(super) fn deletes_in_memory(&self) -> bool {
        matches!(self.backend, Backend::Memory)
    }

    /// Opens the storage, loads the index of the finished entries it holds (see
    /// [`startup_wait`](CacheBuilder::startup_wait)), and starts the reaper.
    ///
    /// # Errors
    /// [`Error::Locked`] if another process uses the directory (or one of them);
    /// [`Error::Io`] if it cannot be created or listed; [`Error::InvalidInput`] for a zero
    /// limit or duration, a directory given twice to [`disks`](CacheBuilder::disks) (or no
    /// directory), or a [`memory_front`](CacheBuilder::memory_front) without disk storage.
    pub fn build(self) -> Result<Cache> {
        if self.max_entries == Some(0) || self.max_bytes == Some(0) {
            return Err(Error::invalid(
                "max_entries and max_bytes must be at least 1",
            ));
        }
        if [self.ttl, self.tti, self.tick].contains(&Some(Duration::ZERO)) {
            return Err(Error::invalid("durations must be greater than zero"));
        }
        let (storage, unlock): (Arc<dyn Storage>, Option<Unlock>) = match &self.backend {
            Backend::Memory => {
                let pool = self
                    .max_bytes
                    .and_then(|max| usize::try_from(max).ok())
                    .map_or(MemoryStorage::DEFAULT_POOL_LIMIT, |max| {
                        max.min(MemoryStorage::DEFAULT_POOL_LIMIT)
                    });
                (Arc::new(MemoryStorage::with_pool_limit(pool)), None)
            }
            #[cfg(unix)]
            Backend::Disk(dir) => {
                let disk = DiskStorage::open_with(dir, self.durability)?;
                let owned = disk.clone();
                (Arc::new(disk), Some(Box::new(move || owned.unlock())))
            }
            #[cfg(unix)]
            Backend::Disks(dirs) => {
                let parts = Arc::new(
                    PartitionedStorage::open(dirs, self.durability)
                        .map_err(|e| Error::from_io_without_path("open directories", e))?,
                );
                let owned = parts.clone();
                (parts, Some(Box::new(move || owned.unlock())))
            }
            Backend::Custom(s) => (s.clone(), None),
        };
        let storage = match (self.front, &self.backend) {
            (None, _) => storage,
            (Some(0), _) => return Err(Error::invalid("memory_front must be at least 1 byte")),
            #[cfg(unix)]
            (Some(bytes), Backend::Disk(_) | Backend::Disks(_)) => {
                let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
                Arc::new(
                    FrontStorage::new(storage, bytes)
                        .map_err(|e| Error::io_without_path("spawn memory front thread", e))?,
                )
            }
            (Some(_), _) => {
                return Err(Error::invalid(
                    "memory_front needs disk storage (disk or disks)",
                ));
            }
        };
        Cache::start(storage, unlock, self)
    }
}
