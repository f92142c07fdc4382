use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::clock::{Clock, SystemClock};
use super::index::Listener;
use super::{Cache, Policy, RemovalCause};
use crate::error::{Error, Result};
use crate::storage::{DiskStorage, Durability, MemoryStorage, Storage};

#[derive(Debug, Clone)]
enum Backend {
    Memory,
    Disk(PathBuf),
    Custom(Arc<dyn Storage>),
}

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
    sync: bool,
    pub(super) max_entries: Option<u64>,
    pub(super) max_bytes: Option<u64>,
    pub(super) ttl: Option<Duration>,
    pub(super) tti: Option<Duration>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) listener: Option<Listener>,
    pub(super) policy: Option<Arc<dyn Policy>>,
    pub(super) tick: Option<Duration>,
    pub(super) max_idle_open: usize,
}

impl fmt::Debug for CacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CacheBuilder")
            .field("backend", &self.backend)
            .field("sync", &self.sync)
            .field("max_entries", &self.max_entries)
            .field("max_bytes", &self.max_bytes)
            .field("time_to_live", &self.ttl)
            .field("time_to_idle", &self.tti)
            .field("listener", &self.listener.is_some())
            .field("policy", &self.policy)
            .finish()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        CacheBuilder {
            backend: Backend::Memory,
            sync: false,
            max_entries: None,
            max_bytes: None,
            ttl: None,
            tti: None,
            clock: Arc::new(SystemClock),
            listener: None,
            policy: None,
            tick: None,
            max_idle_open: 128,
        }
    }
}

impl CacheBuilder {
    /// Keep entries in memory (the default).
    pub fn memory(mut self) -> Self {
        self.backend = Backend::Memory;
        self
    }

    /// Keep entries in the directory `dir` (created if missing). Finished entries survive a
    /// restart; see [`storage::DiskStorage`](crate::storage::DiskStorage) for the layout.
    pub fn disk(mut self, dir: impl Into<PathBuf>) -> Self {
        self.backend = Backend::Disk(dir.into());
        self
    }

    /// Use any [`Storage`]. Committed blobs it lists are reloaded as entries, so a
    /// [`MemoryStorage`] shared between two caches behaves like a directory reopened.
    pub fn storage(mut self, storage: Arc<dyn Storage>) -> Self {
        self.backend = Backend::Custom(storage);
        self
    }

    /// With disk storage: make [`Writer::finish`](crate::Writer::finish) fsync the data, its
    /// record and the directory, so a finished entry survives a power loss (not only a crash
    /// of the process). Off by default.
    pub fn sync_on_finish(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    /// At most `n` entries; least recently used finished entries are evicted beyond that, by
    /// the reaper as soon as a write breaks the limit. If writers outrun the reaper and the
    /// count passes `n` by more than `max(n / 16, 64)`, each finishing writer also evicts up
    /// to two entries itself (no I/O: their data is still deleted by the reaper) — unless a
    /// [`Policy`](crate::cache::Policy) is set, whose calls stay on the reaper.
    pub fn max_entries(mut self, n: u64) -> Self {
        self.max_entries = Some(n);
        self
    }

    /// At most `n` bytes (entries being written count); least recently used finished entries
    /// are evicted beyond that.
    pub fn max_bytes(mut self, n: u64) -> Self {
        self.max_bytes = Some(n);
        self
    }

    /// Entries expire this long after they were finished.
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

    /// Opens the storage, reloads finished entries it holds, and starts the reaper.
    ///
    /// # Errors
    /// [`Error::Locked`] if another process uses the directory; [`Error::Io`] if it cannot be
    /// created or listed; [`Error::InvalidInput`] for a zero limit or duration.
    pub fn build(self) -> Result<Cache> {
        if self.max_entries == Some(0) || self.max_bytes == Some(0) {
            return Err(Error::invalid(
                "max_entries and max_bytes must be at least 1",
            ));
        }
        if [self.ttl, self.tti, self.tick].contains(&Some(Duration::ZERO)) {
            return Err(Error::invalid("durations must be greater than zero"));
        }
        let mut owned_disk = None;
        let storage: Arc<dyn Storage> = match &self.backend {
            Backend::Memory => {
                let pool = self
                    .max_bytes
                    .and_then(|max| usize::try_from(max).ok())
                    .map_or(MemoryStorage::DEFAULT_POOL_LIMIT, |max| {
                        max.min(MemoryStorage::DEFAULT_POOL_LIMIT)
                    });
                Arc::new(MemoryStorage::with_pool_limit(pool))
            }
            Backend::Disk(dir) => {
                let durability = if self.sync {
                    Durability::SyncOnCommit
                } else {
                    Durability::Buffered
                };
                let disk = DiskStorage::open_with(dir, durability)?;
                owned_disk = Some(disk.clone());
                Arc::new(disk)
            }
            Backend::Custom(s) => s.clone(),
        };
        Cache::start(storage, owned_disk, self)
    }
}
