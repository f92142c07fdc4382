//! The keyed cache: `get_or_create`, removal, limits, reload.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use lru::LruCache;

use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::stream::{Closing, Observer, Reader, Writer};

mod books;
mod builder;
mod clock;
mod evict;
mod handles;
mod index;
mod jobs;
mod meta;
mod reaper;
mod recency;
mod reload;
mod remove;
mod report;
mod slot;

pub use builder::CacheBuilder;
pub use clock::{Clock, ManualClock, SystemClock};
pub use report::{CacheStats, EntryInfo, Expiry, Iter, Policy, RemovalCause};

use books::{Books, Counters, Limits};
use index::{Indexed, Inner};
use reaper::{Deletions, Job, Note};
use slot::Slot;

/// What [`Cache::get_or_create`] hands out.
#[derive(Debug)]
pub enum Entry {
    /// The key was absent: you are its one producer. Write, then
    /// [`finish`](Writer::finish); dropping the writer unfinished aborts the entry.
    Miss(Writer),
    /// The key is present (finished or still being written): read it from byte 0.
    Hit(Reader),
}

/// A keyed cache of byte streams. See the [crate documentation](crate).
///
/// `Cache` is `Send + Sync`; share it with an `Arc`. Dropping it stops and joins its threads
/// (the reaper, and the listener's if any), records recency on disk and releases the
/// directory lock, so the directory can be reopened at once; readers it handed out keep
/// working (a writer still open may fail to commit once another cache has opened the
/// directory).
pub struct Cache {
    inner: Arc<Inner>,
    reaper: Option<JoinHandle<()>>,
    /// The thread that calls the eviction listener, if there is one.
    notifier: Option<JoinHandle<()>>,
    /// The thread loading the stored entries into the index (joined on drop).
    loader: Option<JoinHandle<()>>,
    /// Releases the directory locks of the storage this cache opened itself, on drop.
    unlock: Option<builder::Unlock>,
    /// The shared tier under this cache, if any (its runtime stops when the cache drops).
    #[cfg(feature = "shared")]
    shared: Option<Arc<crate::shared::tier::Tier>>,
}

impl fmt::Debug for Cache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl Cache {
    /// A builder; `Cache::builder().build()` is an unbounded memory cache.
    pub fn builder() -> CacheBuilder {
        CacheBuilder::default()
    }

    fn start(
        storage: Arc<dyn Storage>,
        unlock: Option<builder::Unlock>,
        b: CacheBuilder,
    ) -> Result<Cache> {
        let (tx, rx) = mpsc::sync_channel(reaper::JOB_QUEUE);
        let limits = Limits {
            max_entries: b.max_entries,
            max_bytes: b.max_bytes,
            ttl_ms: b.ttl.map(millis),
            tti_ms: b.tti.map(millis),
        };
        let (notes, notifier) = match &b.listener {
            Some(listener) => {
                let (notes, rx) = mpsc::sync_channel(reaper::NOTE_QUEUE);
                let thread = reaper::spawn_notifier(listener.clone(), rx)
                    .map_err(|e| Error::io_without_path("spawn listener thread", e))?;
                (Some((notes, listener.clone())), Some(thread))
            }
            None => (None, None),
        };
        let shortest = [b.ttl, b.tti].into_iter().flatten().min();
        let tick = b.tick.unwrap_or_else(|| {
            shortest.map_or(Duration::from_secs(1), |d| {
                (d / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
            })
        });
        let writers_evict = b.deletes_in_memory() && b.policy.is_none();
        let inner = Arc::new(Inner {
            storage: storage.clone(),
            index: DashMap::default(),
            entries: AtomicUsize::new(0),
            maintain_pending: AtomicBool::new(false),
            lru: Mutex::new(LruCache::unbounded_with_hasher(Default::default())),
            hit_ring: (0..index::HIT_RING).map(|_| AtomicU64::new(0)).collect(),
            hit_head: AtomicUsize::new(0),
            hits_applied: AtomicUsize::new(0),
            bytes: AtomicU64::new(0),
            books: Arc::new(Books {
                clock: b.clock,
                stats: Counters::default(),
                track_idle: limits.tti_ms.is_some(),
                own_ttls: AtomicBool::new(b.expiry.is_some()),
                cache: OnceLock::new(),
                access: AtomicU64::new(0),
            }),
            limits,
            next_id: AtomicU64::new(0),
            jobs: tx,
            notifier: notes,
            deletions: Arc::new(Deletions::new(storage.clone())),
            threads: reaper::Threads::default(),
            note_overflow: Mutex::default(),
            policy: b.policy,
            expiry: b.expiry,
            loading: reload::Loading::default(),
            idle_open: Mutex::default(),
            max_idle_open: b.max_idle_open,
            saves_hints: unlock.is_some(),
            writers_evict,
        });
        let _ = inner.books.cache.set(Arc::downgrade(&inner));
        if let Some(n) = &notifier {
            let _ = inner.threads.notifier.set(n.thread().id());
        }
        // From here on, dropping `cache` stops the threads started so far.
        let mut cache = Cache {
            inner,
            reaper: None,
            notifier,
            loader: None,
            unlock,
            #[cfg(feature = "shared")]
            shared: None,
        };
        let inner = cache.inner.clone();
        inner.books.now();
        // A hint (with the changes journaled since) stands in for listing the storage.
        let hint = if cache.unlock.is_some() {
            inner.storage.take_hint().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "could not read the index hint; listing the storage");
                None
            })
        } else {
            None
        };
        #[cfg(feature = "shared")]
        if let Some(tier) = b.shared.clone() {
            cache.shared = Some(Arc::new(crate::shared::tier::Tier::start(
                tier,
                inner.books.clock.clone(),
                inner.limits.ttl_ms,
            )?));
        }
        cache.loader = Some(reload::start(&inner, b.startup_wait, hint)?);
        let reaper = reaper::spawn(Arc::downgrade(&inner), inner.deletions.clone(), rx, tick)
            .map_err(|e| Error::io_without_path("spawn reaper thread", e))?;
        cache.reaper = Some(reaper);
        if cache.inner.over_limits() {
            cache.inner.request_maintenance();
        }
        Ok(cache)
    }

    /// Gets a reader of `key`, or — if it is absent, expired or was aborted — makes the caller
    /// its one producer. However many threads race on one key, exactly one gets
    /// [`Entry::Miss`]; the others get [`Entry::Hit`] readers that stream the bytes as they are
    /// written. Never waits for the writer, for eviction or for I/O other than creating the
    /// new entry's blob.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use streamcache::{Cache, Entry};
    ///
    /// let cache = Cache::builder().memory().build()?;
    /// let Entry::Miss(mut w) = cache.get_or_create("key")? else { unreachable!() };
    /// let mut early = w.reader()?;
    /// w.write_all(b"hello")?;
    /// w.finish()?;
    /// let Entry::Hit(mut late) = cache.get_or_create("key")? else { unreachable!() };
    /// let (mut a, mut b) = (String::new(), String::new());
    /// early.read_to_string(&mut a)?;
    /// late.read_to_string(&mut b)?;
    /// assert_eq!((a.as_str(), b.as_str()), ("hello", "hello"));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// [`Error::Io`] if the storage cannot create the new entry's blob, or cannot open an
    /// existing entry's data right now (see [`get`](Cache::get)).
    ///
    /// With a shared tier (feature `shared`), a local miss first asks the bucket (one to four
    /// round trips, never longer than the tier's timeout): it becomes a hit when another node
    /// has produced or is producing the key, and a miss only for the one node fleet-wide that
    /// wins the key's lease (or when the bucket does not answer in time).
    pub fn get_or_create(&self, key: &str) -> Result<Entry> {
        let entry = self.create_local(key)?;
        #[cfg(feature = "shared")]
        if let Some(tier) = &self.shared {
            return Ok(match entry {
                Entry::Miss(w) => tier.resolve(w),
                hit => hit,
            });
        }
        Ok(entry)
    }

    /// The shared tier, if the cache has one.
    #[cfg(feature = "shared")]
    pub(crate) fn tier(&self) -> Option<&Arc<crate::shared::tier::Tier>> {
        self.shared.as_ref()
    }

    /// What the shared tier did since the cache was built; `None` without a shared tier.
    #[cfg(feature = "shared")]
    pub fn shared_stats(&self) -> Option<crate::shared::SharedStats> {
        let s = self.shared.as_ref()?.stats();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Some(crate::shared::SharedStats {
            gets: get(&s.gets),
            puts: get(&s.puts),
            produced: get(&s.produced),
            downloaded: get(&s.downloaded),
            tailed: get(&s.tailed),
            fallbacks: get(&s.fallbacks),
        })
    }

    /// `get_or_create` on this node only.
    pub(crate) fn create_local(&self, key: &str) -> Result<Entry> {
        let inner = &self.inner;
        loop {
            if let Some(reader) = self.lookup(key, inner.exact_now())? {
                return Ok(Entry::Hit(reader));
            }
            // Create the blob outside any index lock; if another thread inserts first, ours
            // is discarded and we read theirs.
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            let now = inner.books.now();
            let slot = Arc::new(Slot::new(inner, Arc::from(key), id, 0, now, 0));
            let writer = inner.retry_out_of_handles(|| {
                Writer::create_observed(
                    inner.storage.clone(),
                    &slot.name_buf(),
                    Some(slot.key.clone()),
                    Some(slot.clone() as Arc<dyn Observer>),
                )
            })?;
            slot.set_live();
            // Counted before it is visible, so that a `remove` in between never uncounts it
            // first: the count may include an entry about to appear, never wrap below zero.
            inner.entries.fetch_add(1, Ordering::Relaxed);
            let inserted = match inner.index.entry(Indexed(slot.clone())) {
                MapEntry::Occupied(_) => false,
                MapEntry::Vacant(v) => {
                    v.insert(Some(writer.stream()));
                    true
                }
            };
            if !inserted {
                // Lost the race: `writer` drops silently (the slot is not live, so its abort
                // touches nothing).
                inner.entries.fetch_sub(1, Ordering::Relaxed);
                slot.flags.store(0, Ordering::SeqCst);
                continue;
            }
            inner.books.stats.misses.fetch_add(1, Ordering::Relaxed);
            inner.entry_added();
            return Ok(Entry::Miss(writer));
        }
    }

    /// Serves `key` if it is present and servable; unlinks stale slots on the way.
    ///
    /// The common cases (a servable hit, a plain miss) are inlined into the callers and make
    /// the reader only once it is known to be returned, so it is built where it is returned
    /// instead of being copied out through each layer; everything else goes to
    /// `Inner::lookup_slow`.
    #[inline(always)]
    fn lookup(&self, key: &str, now: Option<u64>) -> Result<Option<Reader>> {
        let inner = &*self.inner;
        {
            // Under the shard's read guard: no lock of its own, no slot refcount traffic, no
            // I/O. (A stream that fails after the check fails this reader as it would have
            // failed one handed out just before.)
            let Some(entry) = inner.index.get(key) else {
                // While the index loads, a key not in it yet may be stored.
                if !inner.loading.active.load(Ordering::Acquire) {
                    return Ok(None);
                }
                return inner.lookup_slow(key, now);
            };
            let slot = &entry.key().0;
            if let Some(stream) = entry.value()
                && inner.fresh(slot, now)
                && !stream.failed()
            {
                // (Checked and returned as it comes: matching the reader out would copy it.)
                let found = stream.reader().map(Some);
                if found.is_ok() {
                    inner.note_hit(slot, now);
                    return found;
                }
            }
        }
        inner.lookup_slow(key, now)
    }

    /// A reader of `key` if it is present (finished or being written), without creating it.
    ///
    /// # Errors
    /// [`Error::Io`] if the entry's stored data cannot be opened right now (no file
    /// descriptor left even after closing idle ones, EIO, EACCES…): the entry stays cached,
    /// only this request fails. An entry whose data is proved lost (missing or failing its
    /// integrity check) is dropped instead and reported as absent.
    pub fn get(&self, key: &str) -> Result<Option<Reader>> {
        // (Returned as it comes: `?` would copy the reader into a new `Ok`.)
        let found = self.lookup(key, self.inner.exact_now());
        if let Ok(None) = found {
            self.inner
                .books
                .stats
                .misses
                .fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Gets a reader of `key`; on a miss, runs `producer` on a new thread to write the entry
    /// and returns a reader at once, so even the first caller streams while it is produced.
    ///
    /// If the producer returns an error or panics, the entry is aborted: every reader gets
    /// [`Error::Aborted`] (carrying the producer's error) and the next call retries.
    ///
    /// ```
    /// use std::io::{Read, Write};
    /// use streamcache::Cache;
    ///
    /// let cache = Cache::builder().build()?;
    /// let mut r = cache.get_or_produce("answer", |w| w.write_all(b"42"))?;
    /// let mut s = String::new();
    /// r.read_to_string(&mut s)?;
    /// assert_eq!(s, "42");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`get_or_create`](Cache::get_or_create), or [`Error::Io`] if the thread cannot be
    /// spawned (the entry is then aborted).
    pub fn get_or_produce<F>(&self, key: &str, producer: F) -> Result<Reader>
    where
        F: FnOnce(&mut Writer) -> io::Result<()> + Send + 'static,
    {
        match self.create_local(key)? {
            Entry::Hit(r) => Ok(r),
            Entry::Miss(w) => {
                let reader = w.reader()?;
                // The shared tier decides on the producer thread: this call never waits for
                // the network.
                #[cfg(feature = "shared")]
                let tier = self.shared.clone();
                std::thread::Builder::new()
                    .name("streamcache-producer".into())
                    .spawn(move || {
                        #[cfg(feature = "shared")]
                        let w = match tier {
                            Some(t) => match t.resolve(w) {
                                Entry::Miss(w) => w,
                                Entry::Hit(_) => return, // the bucket fills it
                            },
                            None => w,
                        };
                        run_producer(w, producer)
                    })
                    .map_err(|e| Error::io_without_path("spawn producer thread", e))?;
                Ok(reader)
            }
        }
    }

    /// Whether `key` is present and servable. Does not refresh recency. (While the index
    /// loads after opening, a key not indexed yet is looked up in storage; if that look-up
    /// fails, the key is reported absent and the failure logged.)
    pub fn contains_key(&self, key: &str) -> bool {
        self.settle_quietly(key);
        let now = self.inner.books.clock.now_millis();
        let slot = self.inner.slot(key);
        slot.is_some_and(|s| self.inner.expiry(&s, now).is_none() && !self.inner.failed(&s))
    }

    /// What is known of `key`'s entry, if it is present and servable (finished or being
    /// written; not expired, not failed), without reading it: opens no reader, counts no hit
    /// or miss, refreshes no recency, reads no content.
    ///
    /// Its creation time and metadata come from the entry's open stream or, for a finished
    /// entry nobody is reading, from its stored record (for disk storage: one small file read,
    /// no data file opened). If that record cannot be read right now (EMFILE, EIO…), those two
    /// fields are empty (`0` and no bytes) and the failure is logged; an entry whose record is
    /// gone is reported absent.
    ///
    /// ```
    /// use std::time::Duration;
    /// use streamcache::{Cache, Entry};
    ///
    /// let cache = Cache::builder().build()?;
    /// let Entry::Miss(mut w) = cache.get_or_create("page")? else { unreachable!() };
    /// w.set_metadata("text/html");
    /// w.set_time_to_live(Duration::from_secs(60));
    /// w.write_all(b"<p>hi</p>")?;
    /// let info = cache.entry_info("page").unwrap();
    /// assert!(!info.is_finished());
    /// w.finish()?;
    /// let info = cache.entry_info("page").unwrap();
    /// assert_eq!((info.len, &info.metadata[..]), (9, &b"text/html"[..]));
    /// assert_eq!(info.expires, Some(info.finished.unwrap() + 60_000));
    /// assert_eq!(cache.stats().hits, 0);
    /// assert!(cache.entry_info("other").is_none());
    /// # use std::io::Write;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn entry_info(&self, key: &str) -> Option<EntryInfo> {
        self.settle_quietly(key);
        let slot = self.inner.slot(key)?;
        self.inner
            .entry_info(&slot, self.inner.books.clock.now_millis())
    }

    /// While the index loads, makes `key` indexed if it is stored (for the calls that cannot
    /// report an error).
    fn settle_quietly(&self, key: &str) {
        if let Err(e) = reload::settle(&self.inner, key) {
            tracing::warn!(key, error = %e, "could not look a key up while loading");
        }
    }

    /// An iterator over the entries present (finished or being written, not expired), in no
    /// particular order, as [`entry_info`](Cache::entry_info) describes each: it opens no
    /// reader and changes no recency.
    ///
    /// Weakly consistent, like moka's: it holds no lock between items, so the cache stays
    /// fully usable (also from the loop's body), and it sees every entry that is present for
    /// the whole iteration exactly once, may or may not see entries inserted or removed
    /// meanwhile, and never yields one removed or expired before `next` reached it. It
    /// copies one pointer per entry up front (8 bytes each: 8 MB for a million entries),
    /// never the keys; each item's record is read when `next` reaches it.
    ///
    /// ```
    /// use streamcache::Cache;
    ///
    /// let cache = Cache::builder().build()?;
    /// for key in ["a", "b", "c"] {
    ///     cache.get_or_produce(key, |w| w.write_all(key.as_bytes()))?;
    /// }
    /// # cache.run_pending_tasks();
    /// # while cache.iter().any(|e| !e.is_finished()) { std::thread::yield_now() }
    /// let mut keys: Vec<String> = cache.iter().map(|e| e.key).collect();
    /// keys.sort();
    /// assert_eq!(keys, ["a", "b", "c"]);
    /// # use std::io::Write;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn iter(&self) -> Iter<'_> {
        Iter {
            cache: self,
            slots: self.slots().into_iter(),
        }
    }

    /// Removes `key` and returns whether it was present. Returns at once: new requests miss
    /// from now on, open readers read to the end, a writer may still finish (its readers get
    /// every byte); the stored data is deleted in the background. (Back-pressure aside: if
    /// the reaper is 4096 deletions behind, this call deletes the blob itself; if an eviction
    /// listener is 4096 calls behind, it waits for room.)
    ///
    /// If the storage refuses the deletion (a read-only or immutable directory), the key stays
    /// removed for this cache, the deletion is retried in the background with a growing delay
    /// (counted in [`CacheStats::pending_deletions`], logged at error level), and its bytes
    /// count toward `max_bytes`. If the process ends before a retry succeeds, the entry is
    /// still on disk and comes back at the next open.
    ///
    /// # Errors
    /// Never with the storages of this crate: the key leaves the index at once, and the
    /// stored data is deleted later, with failures retried and counted in
    /// [`CacheStats::failed_deletions`] rather than returned. The `Result` is for a tier
    /// whose removal must be confirmed to be honest: with a shared tier (a bucket that other
    /// machines read), `remove` deletes there too and reports when it cannot
    /// ([`Error::Shared`]; the key is removed locally all the same, and the returned flag
    /// says whether it was present locally).
    pub fn remove(&self, key: &str) -> Result<bool> {
        reload::settle(&self.inner, key)?;
        let present = match self.inner.index.remove(key) {
            Some((Indexed(slot), stream)) => {
                self.inner.finalize(&slot, stream, RemovalCause::Explicit);
                true
            }
            None => false,
        };
        #[cfg(feature = "shared")]
        if let Some(tier) = &self.shared {
            tier.remove(key)?;
        }
        Ok(present)
    }

    /// Removes every entry, as [`remove`](Cache::remove) does (safe while streams are open).
    pub fn clear(&self) {
        // Entries not indexed yet are deleted when the load finds them.
        reload::clear_stored(&self.inner);
        for slot in self.slots() {
            self.inner.unlink(&slot, RemovalCause::Explicit);
        }
    }

    /// Number of entries (finished or being written). Eventually consistent with concurrent
    /// updates; expired entries count until the reaper removes them.
    pub fn len(&self) -> usize {
        self.inner.entries.load(Ordering::Relaxed)
    }

    /// Whether [`len`](Cache::len) is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A snapshot of the slots (shard locks are held only while copying pointers).
    fn slots(&self) -> Vec<Arc<Slot>> {
        self.inner.index.iter().map(|e| e.key().0.clone()).collect()
    }

    /// Bytes held by entries, including bytes of entries still being written.
    pub fn total_bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// A snapshot of the keys present (in no particular order).
    pub fn keys(&self) -> Vec<String> {
        self.inner
            .index
            .iter()
            .map(|e| e.key().0.key.to_string())
            .collect()
    }

    /// The cache's counters.
    pub fn stats(&self) -> CacheStats {
        let s = &self.inner.books.stats;
        CacheStats {
            // Every served hit goes through the recency ring, whose cursor counts them.
            hits: self.inner.hit_head.load(Ordering::Relaxed) as u64,
            misses: s.misses.load(Ordering::Relaxed),
            aborts: s.aborts.load(Ordering::Relaxed),
            removals: s.removals.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            bytes_written: s.bytes_written.load(Ordering::Relaxed),
            bytes_read: s.bytes_read.load(Ordering::Relaxed),
            over_limit: s.over_limit.load(Ordering::Relaxed),
            pending_deletions: self.inner.deletions.pending.load(Ordering::Relaxed),
            pending_deletion_bytes: self.inner.deletions.pending_bytes.load(Ordering::Relaxed),
            failed_deletions: self.inner.deletions.failures.load(Ordering::Relaxed),
            loading: self.inner.loading.active.load(Ordering::Relaxed),
            loaded_entries: self.inner.loading.entries.load(Ordering::Relaxed),
        }
    }

    /// Runs pending maintenance now and waits for it: the deletions and listener calls queued
    /// before this call, then expiry and size eviction (with their deletions and listener
    /// calls). Jobs queued after the call are not waited for, so a busy cache cannot keep the
    /// caller waiting. Useful in tests and for deterministic shutdown points. Called from the
    /// eviction listener or a policy (which run on the cache's own threads), it returns at
    /// once.
    pub fn run_pending_tasks(&self) {
        if self.inner.threads.is_own() {
            return;
        }
        self.inner.loading.wait_ended();
        let (tx, rx) = mpsc::channel();
        if self.inner.jobs.send(Job::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// Test tool (feature `test-util`): the storage under this cache, to see what is stored.
    /// Changing it behind the cache's back (removing a blob, say) breaks the cache's books.
    #[cfg(feature = "test-util")]
    pub fn storage(&self) -> &Arc<dyn Storage> {
        &self.inner.storage
    }
}

/// A duration in whole milliseconds for the limits, at least 1; one too long for a `u64`
/// of milliseconds (half a billion years) means "never" (`u64::MAX`, which every comparison
/// treats with saturating arithmetic), never a wrapped, shorter one.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn run_producer<F>(mut w: Writer, producer: F)
where
    F: FnOnce(&mut Writer) -> io::Result<()>,
{
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| producer(&mut w)));
    match outcome {
        Ok(Ok(())) => {
            if let Err(e) = w.finish() {
                tracing::warn!(error = %e, "memoized entry could not be finished");
            }
        }
        Ok(Err(e)) => w.abort_with(e),
        Err(_) => w.abort_with(Box::new(Closing("producer panicked")) as Box<_>),
    }
}

impl Drop for Cache {
    fn drop(&mut self) {
        if let Some(loader) = self.loader.take() {
            reload::stop(&self.inner, loader);
        }
        if let Some(reaper) = self.reaper.take() {
            let _ = self.inner.jobs.send(Job::Shutdown);
            let _ = reaper.join();
        }
        if let Some(notifier) = self.notifier.take() {
            if let Some((notes, _)) = &self.inner.notifier {
                let _ = notes.send(Note::Shutdown);
            }
            let _ = notifier.join();
        }
        // Persist recency of entries read since they were committed or reloaded, so that LRU
        // order survives a restart (best effort).
        for slot in self.slots() {
            if slot.is_committed() && slot.is_touched() {
                // Never rewrites a record it could not read (its metadata would be lost).
                if let Ok(meta) = self.inner.read_meta(&slot) {
                    let _ = self.inner.storage.set_meta(&slot.name(), &meta.encode());
                }
            }
        }
        // For a storage it opened itself, the cache leaves a description of its entries, so
        // that the next open need not list them one by one (a writer that outlives the cache
        // and commits later is in the storage's journal).
        if self.unlock.is_some() {
            reload::save_hint(&self.inner);
        }
        // Readers and writers may outlive the cache, but the directory is free for a new one.
        if let Some(unlock) = self.unlock.take() {
            unlock();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    /// The per-entry budget (issue: at most 256 bytes of index overhead per entry at 1M
    /// entries; `benches/eviction.rs` measures the whole). The slot must stay one 104-byte
    /// allocation (88 bytes of fields, 16 of them the key's hash that names its blob, plus the
    /// `Arc` header), and an index entry two pointers.
    #[test]
    fn slot_stays_small() {
        assert!(
            std::mem::size_of::<index::Slot>() <= 88,
            "{}",
            std::mem::size_of::<index::Slot>()
        );
        assert_eq!(
            std::mem::size_of::<(index::Indexed, Option<crate::stream::Stream>)>(),
            16
        );
    }

    /// Blob names are persistent: they must keep the format `<32 hex of blake3(key)>-<16 hex id>`,
    /// derived from the key or from the slot's kept hash alike.
    #[test]
    fn blob_names_keep_their_format() {
        use super::slot::blob_name;
        let cache = Cache::builder().memory().build().unwrap();
        for (key, id) in [
            ("", 0),
            ("key", 1),
            ("ключ/x y", u64::MAX),
            ("k", 0x0123_4567_89ab_cdef),
        ] {
            let hash = blake3::hash(key.as_bytes());
            let want = format!("{}-{id:016x}", &hash.to_hex()[..32]);
            assert_eq!(blob_name(key, id), want);
            assert_eq!(blob_name(key, id).capacity(), 49);
            let slot = Slot::new(&cache.inner, Arc::from(key), id, 0, 0, 0);
            assert_eq!(slot.name(), want);
        }
    }

    fn open_fds() -> usize {
        std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
    }

    /// Regression: every finished disk entry used to keep its file open for as long as it was
    /// cached, so a cache of a few thousand entries hit "Too many open files".
    #[test]
    fn idle_entries_do_not_keep_files_open() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::builder()
            .disk(dir.path())
            .max_idle_handles(8)
            .build()
            .unwrap();
        let before = open_fds();
        for i in 0..600 {
            let Entry::Miss(mut w) = cache.get_or_create(&format!("k{i}")).unwrap() else {
                panic!("fresh key")
            };
            w.write_all(b"x").unwrap();
            w.finish().unwrap();
            let mut s = String::new();
            cache
                .get(&format!("k{i}"))
                .unwrap()
                .unwrap()
                .read_to_string(&mut s)
                .unwrap();
            assert_eq!(s, "x");
        }
        // Other tests run in parallel threads, so allow slack; 600 leaked handles would show.
        assert!(
            open_fds() < before + 200,
            "{} open, {} before",
            open_fds(),
            before
        );
        // Entries whose handle was closed reopen on demand.
        let mut s = String::new();
        cache
            .get("k0")
            .unwrap()
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "x");
    }
}
