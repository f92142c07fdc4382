//! The key → entry index: `Inner`, which every part of the cache shares, how a slot is found
//! in the map, and the hit path (expiry check, reader, reopening a blob whose file was closed).
//!
//! `Inner`'s other concerns each live in an `impl Inner` of their own: `slot` (one entry and
//! its stream's callbacks), `books` (clock, statistics, bytes against the limits), `recency`
//! (hit ring and LRU list), `evict` (expiry and size eviction), `handles` (idle open files,
//! running out of descriptors), `remove` (unlink and finalize), `jobs` (requests to the reaper
//! and the notifier).
//!
//! Lock order: a DashMap shard lock is never held while taking another lock of the index or
//! `idle_open` (`lru` only by `try_lock`) or doing I/O, nor while dropping a reader (whose last
//! release calls back into the index). Under a shard guard a hit may take a stream's progress
//! lock (to refuse a reader of a closed stream) and reads the clock; neither leads back to the
//! index. `lru` and `idle_open` are leaf locks. A hit opens its reader under the shard's read
//! guard: the map holds each entry's open stream next to its slot, so that needs no lock of
//! its own.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::one::Ref;

use super::books::{Books, Limits};
use super::handles::proves_loss;
use super::meta::EntryMeta;
use super::reaper::{Deletions, Job, Note, Threads};
// (Re-exported: the cache sizes `Inner::hit_ring` with it.)
pub(crate) use super::recency::HIT_RING;
use super::recency::Recency;
// (Re-exported: the cache's tests measure it.)
use super::slot::GONE;
pub(crate) use super::slot::Slot;
use super::{EntryInfo, Expiry, Policy, RemovalCause};
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::stream::{Observer, Reader, Stream};

/// What `Inner::open_reader` found.
enum Opened {
    /// A reader of the entry's stream.
    Reader(Reader),
    /// The stream refuses new readers (it was closed).
    Refused,
    /// The slot is no longer the one indexed under its key.
    Gone,
}

impl From<Result<Reader>> for Opened {
    fn from(r: Result<Reader>) -> Opened {
        r.map_or(Opened::Refused, Opened::Reader)
    }
}

/// How the index holds a slot: hashed and compared by its key, so the map needs no second
/// copy of the key.
#[derive(Debug, Clone)]
pub(crate) struct Indexed(pub(crate) Arc<Slot>);

impl Borrow<str> for Indexed {
    fn borrow(&self) -> &str {
        &self.0.key
    }
}

impl Hash for Indexed {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Must agree with `str`'s `Hash`, since look-ups borrow the key as `&str`.
        (*self.0.key).hash(h);
    }
}

impl PartialEq for Indexed {
    fn eq(&self, other: &Self) -> bool {
        self.0.key == other.0.key
    }
}

impl Eq for Indexed {}

pub(crate) type Listener = Arc<dyn Fn(&str, RemovalCause) + Send + Sync>;

/// How the index hashes keys: foldhash (hashbrown's default hasher, as `lru` exports it),
/// seeded at random per map like `std`'s `RandomState`. About a tenth of SipHash-1-3's
/// instructions on a 32-byte key, which every hit and insert hashes once. Keys may come from
/// untrusted clients (a proxy's URLs): the per-map random seed is what keeps collisions from
/// being chosen ahead of time, as for every `hashbrown` map with its default hasher.
pub(crate) type KeyHasher = lru::DefaultHasher;

/// Everything the cache shares with its entries' observers and its reaper.
pub(crate) struct Inner {
    pub(crate) storage: Arc<dyn Storage>,
    /// Lock: DashMap's shard locks, held only inside a single map call or while a hit opens a
    /// reader. Invariant: a key maps to the slot that new requests are served from, and to its
    /// open stream: `Some` while the entry is being written or in use; a finished, unused entry
    /// may drop it (`close_if_idle`, closing its file) and reopen it on demand (`stream_of`).
    /// A slot leaves the map exactly once (`unlink`), and `finalize` runs exactly once per slot
    /// that was in the map, with the stream that left with it.
    pub(crate) index: DashMap<Indexed, Option<Stream>, KeyHasher>,
    /// Number of slots in `index` (the map's own `len` locks every shard). Incremented before
    /// an insertion (and back if it loses), decremented by `finalize`, so it never wraps: it
    /// may count an entry about to appear, never miss one that is gone.
    pub(crate) entries: AtomicUsize,
    /// A `Maintain` job is queued and the reaper has not started on it: further requests
    /// need not queue another. Cleared by the reaper before it evicts.
    pub(crate) maintain_pending: AtomicBool,
    /// Lock: this mutex (a leaf lock). Finished, live entries by recency (least recent
    /// first out). Inserted only while the slot is `LIVE`, checked under this lock; `finalize`
    /// clears `LIVE` then removes it under this lock, so no dead entry stays. Kept only when
    /// the cache has a size limit (`Limits::by_size`): otherwise it stays empty, and hits
    /// and finishes skip it (their `last_access` stamps are still kept).
    pub(crate) lru: Mutex<Recency>,
    /// Recent hits (entry id + 1; 0 = empty) not yet applied to `lru`. Lock-free ring written
    /// at `hit_head` (only when `lru` is kept); see `record_hit`. `hit_head` also counts
    /// served hits (statistics), always.
    pub(crate) hit_ring: Box<[AtomicU64]>,
    pub(crate) hit_head: AtomicUsize,
    /// Lock: `lru` (written only under it; an atomic so that the struct needs no second
    /// mutex). `hit_head` as the last `apply_hits` read it: while the head has not moved
    /// since, no hit was recorded and the ring need not be scanned.
    pub(crate) hits_applied: AtomicUsize,
    /// Bytes of live entries, including those still being written. Lock-free; each entry
    /// contributes its `accounted` field.
    pub(crate) bytes: AtomicU64,
    pub(crate) limits: Limits,
    pub(crate) books: Arc<Books>,
    /// Next entry id (part of blob names, so a new version never reuses an old name).
    pub(crate) next_id: AtomicU64,
    /// The reaper's queue (bounded: see `reaper`).
    pub(crate) jobs: SyncSender<Job>,
    /// When there is an eviction listener: the notifier's queue (bounded: see `reaper`), and
    /// the listener itself, for the notifier's own removals (called inline: it must never
    /// wait for its own queue).
    pub(crate) notifier: Option<(SyncSender<Note>, Listener)>,
    /// Deletions not carried out yet (shared with the reaper).
    pub(crate) deletions: Arc<Deletions>,
    /// The reaper's and notifier's thread ids.
    pub(crate) threads: Threads,
    /// Lock: this mutex (a leaf lock). Notes of the reaper's own removals that found the
    /// notifier's queue full, oldest first; the reaper hands them over as room appears, so
    /// a slow listener never blocks it. Grows only while the listener is behind.
    pub(crate) note_overflow: Mutex<std::collections::VecDeque<Note>>,
    pub(crate) policy: Option<Arc<dyn Policy>>,
    /// Computes finished entries' own time to live (see `Slot::commit_meta`).
    pub(crate) expiry: Option<Arc<dyn Expiry>>,
    /// The background load of the stored entries (see `reload`).
    pub(crate) loading: super::reload::Loading,
    /// Lock: this mutex (a leaf lock). Finished entries (key, id) that were released with
    /// their stream open, oldest first; beyond `max_idle_open`, the oldest close their stream
    /// if unused.
    pub(crate) idle_open: Mutex<std::collections::VecDeque<(Arc<str>, u64)>>,
    pub(crate) max_idle_open: usize,
    /// Set once at build, for a storage the cache opened itself: it saves index hints
    /// (`reload::checkpoint_if_due`, and at drop).
    pub(crate) saves_hints: bool,
    /// Set once at build: finishing writers restore the size limits themselves, deleting
    /// their victims' blobs inline, and the reaper is only the backstop (`Slot::finished`).
    /// Only for the memory storage the builder made (deleting a blob is a map removal, no
    /// I/O: requests never do I/O) and without a policy (whose calls stay on the reaper).
    /// Saves the reaper's wake-up, and the third thread's share of two busy cores, per
    /// few inserts.
    pub(crate) writers_evict: bool,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cache")
            .field("storage", &self.storage)
            .field("entries", &self.entries.load(Ordering::Relaxed))
            .field("bytes", &self.bytes.load(Ordering::Relaxed))
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// The exact time if an expiry limit needs it to judge a hit, else `None`.
    pub(crate) fn exact_now(&self) -> Option<u64> {
        (self.limits.ttl_ms.is_some()
            || self.limits.tti_ms.is_some()
            || self.books.own_ttls.load(Ordering::Relaxed))
        .then(|| self.books.now())
    }

    /// What the entry's record says now: times and time to live from the slot, creation time
    /// and user metadata from the entry being written, or from the stored record (the open
    /// stream's metadata, if any, is the same and costs no I/O).
    ///
    /// # Errors
    /// Those of reading the stored record; `InvalidData` if it does not decode.
    pub(crate) fn read_meta(&self, slot: &Slot) -> std::io::Result<EntryMeta> {
        let finished = slot.finished.load(Ordering::Relaxed);
        let open_user = self.open_stream(slot).map(|s| s.metadata());
        let (created, user) = if finished == 0 {
            // Being written: `idle_since` holds the creation time.
            (
                slot.idle_since.load(Ordering::Relaxed),
                open_user.unwrap_or_default(),
            )
        } else {
            match self.storage.info(&slot.name()) {
                Ok(info) => {
                    let stored = EntryMeta::decode(&info.meta)
                        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
                    (stored.created, open_user.unwrap_or(stored.user))
                }
                // Stamped finished by `commit_meta`, and its commit still under way: no
                // record yet, and `idle_since` still holds the creation time. (`iter` skipped
                // such an entry as lost, now and then, in its doctest.)
                Err(e) if e.kind() == std::io::ErrorKind::NotFound && !slot.is_committed() => (
                    slot.idle_since.load(Ordering::Relaxed),
                    open_user.unwrap_or_default(),
                ),
                Err(e) => return Err(e),
            }
        };
        Ok(EntryMeta {
            key: slot.key.to_string(),
            created,
            finished,
            last_access: slot.last_access.load(Ordering::Relaxed),
            ttl_ms: slot.ttl_ms().unwrap_or(0),
            user,
        })
    }

    /// When `slot` stops being served for its age, if a time to live applies.
    pub(crate) fn expires_at(&self, slot: &Slot) -> Option<u64> {
        let finished = slot.finished.load(Ordering::Relaxed);
        if finished == 0 {
            return None;
        }
        self.limits.expires_at(finished, slot.ttl_ms())
    }

    /// `Cache::entry_info` of `slot` at `now`: `None` unless it is servable.
    pub(crate) fn entry_info(&self, slot: &Slot, now: u64) -> Option<EntryInfo> {
        if self.expiry(slot, now).is_some() || self.failed(slot) {
            return None;
        }
        let meta = self.read_meta(slot);
        if let Err(e) = &meta {
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
            ) {
                return None;
            }
            tracing::warn!(key = %slot.key, error = %e, "entry record unreadable now; reporting its info without creation time and metadata");
        }
        let len = match slot.accounted.load(Ordering::Relaxed) {
            GONE => return None,
            len => len,
        };
        Some(self.describe(slot, len, meta))
    }

    /// `slot`'s info with `len` bytes, from its record as `read_meta` read it (one that could
    /// not be read gives no creation time and metadata).
    pub(crate) fn describe(
        &self,
        slot: &Slot,
        len: u64,
        meta: std::io::Result<EntryMeta>,
    ) -> EntryInfo {
        let (created, metadata) = meta.map_or((0, Bytes::new()), |m| (m.created, m.user));
        let finished = slot.finished.load(Ordering::Relaxed);
        EntryInfo {
            key: slot.key.to_string(),
            len,
            created,
            finished: (finished != 0).then_some(finished),
            last_access: slot.last_access.load(Ordering::Relaxed),
            expires: self.expires_at(slot),
            metadata,
        }
    }

    /// The slot indexed under `key`, if any.
    pub(crate) fn slot(&self, key: &str) -> Option<Arc<Slot>> {
        self.index.get(key).map(|e| e.key().0.clone())
    }

    /// `slot`'s index entry (a shard read guard), if `slot` is still the one indexed.
    pub(crate) fn indexed(&self, slot: &Slot) -> Option<Ref<'_, Indexed, Option<Stream>>> {
        self.index
            .get(&*slot.key)
            .filter(|e| std::ptr::eq(&*e.key().0, slot))
    }

    /// `slot`'s open stream, if it is indexed and has one.
    fn open_stream(&self, slot: &Slot) -> Option<Stream> {
        self.indexed(slot).and_then(|e| e.value().clone())
    }

    /// Whether `slot` has a live reader or writer.
    pub(crate) fn in_use(&self, slot: &Slot) -> bool {
        self.indexed(slot)
            .is_some_and(|e| e.value().as_ref().is_some_and(|s| s.handles() > 0))
    }

    /// Whether `slot`'s open stream failed (aborted or cancelled).
    pub(crate) fn failed(&self, slot: &Slot) -> bool {
        self.indexed(slot)
            .is_some_and(|e| e.value().as_ref().is_some_and(Stream::failed))
    }

    /// A reader of the slot's stream, (re)opening a committed blob if its stream was closed
    /// or never opened. The blob is opened without any lock held (two requests may both open
    /// it; the stream installed first wins), but the reader is made under the shard guard, so
    /// the stream cannot be closed as idle between the look-up and the reader.
    fn open_reader(&self, slot: &Arc<Slot>) -> Result<Opened> {
        match self.indexed(slot) {
            None => return Ok(Opened::Gone),
            Some(e) => {
                if let Some(s) = e.value() {
                    return Ok(Opened::from(s.reader()));
                }
            }
        }
        let name = slot.name();
        let (blob, info) = self.retry_out_of_handles(|| {
            self.storage
                .open(&name)
                .map_err(|e| Error::from_io("open", &name, e))
        })?;
        let user = EntryMeta::decode(&info.meta)
            .map(|m| m.user)
            .unwrap_or_default();
        let observer: Arc<dyn Observer> = slot.clone();
        let ours = Stream::committed(
            self.storage.clone(),
            &name,
            slot.key.clone(),
            blob,
            info.len,
            user,
            Some(observer),
        );
        let Some(mut e) = self.index.get_mut(&*slot.key) else {
            return Ok(Opened::Gone);
        };
        if !Arc::ptr_eq(&e.key().0, slot) {
            return Ok(Opened::Gone);
        }
        let opened = Opened::from(e.value_mut().get_or_insert_with(|| ours.clone()).reader());
        // The guard goes first: a losing stream is dropped (its file closed) without it.
        drop(e);
        drop(ours);
        Ok(opened)
    }

    /// Tries to serve `slot`. `Ok(None)` means the slot was stale (expired, removed, failed):
    /// it has been unlinked and the caller should look again.
    /// `now` is the exact time when expiry needs it (see `Inner::exact_now`), else `None`.
    pub(crate) fn try_hit(&self, slot: &Arc<Slot>, now: Option<u64>) -> Result<Option<Reader>> {
        if let Some(now) = now
            && let Some(cause) = self.expiry(slot, now)
        {
            self.unlink(slot, cause);
            return Ok(None);
        }
        let reader = match self.open_reader(slot) {
            Ok(Opened::Reader(r)) => r,
            Ok(Opened::Gone) => return Ok(None),
            Ok(Opened::Refused) => {
                self.unlink(slot, RemovalCause::Explicit);
                return Ok(None);
            }
            // Only proof that the data is lost drops the entry: a passing failure (EMFILE, EIO…)
            // must fail this request, never destroy a finished entry.
            Err(e) if proves_loss(&e) => {
                tracing::warn!(key = %slot.key, error = %e, "dropping entry whose stored data is lost");
                self.unlink(slot, RemovalCause::Corrupt);
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(key = %slot.key, error = %e, "entry cannot be opened now; failing this request only");
                return Err(e);
            }
        };
        if reader.failed() {
            drop(reader);
            self.unlink(slot, RemovalCause::Aborted);
            return Ok(None);
        }
        self.note_hit(slot, now);
        Ok(Some(reader))
    }

    /// `Cache::lookup` past its fast path: serves `key` if it is present and servable,
    /// unlinking stale slots on the way and, while the index loads, settling a key that is
    /// not indexed yet (once) before looking again.
    #[inline(never)]
    pub(crate) fn lookup_slow(&self, key: &str, now: Option<u64>) -> Result<Option<Reader>> {
        let mut settled = false;
        loop {
            let (slot, refused) = {
                let Some(entry) = self.index.get(key) else {
                    if settled || !self.loading.active.load(Ordering::Acquire) {
                        return Ok(None);
                    }
                    super::reload::settle(self, key)?;
                    settled = true;
                    continue;
                };
                let slot = &entry.key().0;
                match self.hit_open(slot, entry.value().as_ref(), now) {
                    Some(reader) if !reader.failed() => {
                        self.note_hit(slot, now);
                        return Ok(Some(reader));
                    }
                    // A failed stream's reader is dropped below, after the guard: dropping the
                    // last handle calls back into the index.
                    refused => (slot.clone(), refused),
                }
            };
            drop(refused);
            if let Some(reader) = self.try_hit(&slot, now)? {
                return Ok(Some(reader));
            }
        }
    }

    /// The fast path of a hit, for a caller that holds the index's shard guard on `slot` and
    /// its open `stream`: a reader if the entry is not (possibly) expired. Takes no lock of
    /// the index and does no I/O; `None` sends the caller to `try_hit`. The caller must not
    /// drop a returned reader while it holds the guard (see `Inner::lookup_slow`).
    pub(crate) fn hit_open(
        &self,
        slot: &Slot,
        stream: Option<&Stream>,
        now: Option<u64>,
    ) -> Option<Reader> {
        if !self.fresh(slot, now) {
            return None;
        }
        stream?.reader().ok()
    }

    /// Whether `slot` may be served at `now` as far as its timestamps tell (`now` is `None`
    /// when no expiry applies: see `exact_now`). Takes no lock.
    #[inline(always)]
    pub(crate) fn fresh(&self, slot: &Slot, now: Option<u64>) -> bool {
        now.is_none_or(|now| self.time_expiry(slot, now).is_none())
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Barrier;

    use crate::{Cache, Entry};

    /// The hit's fast path checks the stream for failure before it makes the reader: a hit
    /// racing an abort may hand out a reader of the aborted stream, which must then fail its
    /// reads (never a clean end of file), and once the abort has returned the key misses.
    #[test]
    fn hits_racing_aborts_never_read_a_clean_end() {
        const THREADS: usize = 3;
        const ROUNDS: usize = 300;
        let cache = Cache::builder().memory().build().unwrap();
        let barrier = Barrier::new(THREADS);
        std::thread::scope(|s| {
            for _ in 0..THREADS {
                s.spawn(|| {
                    barrier.wait();
                    for _ in 0..ROUNDS {
                        match cache.get_or_create("k").unwrap() {
                            // Every producer aborts: no entry ever finishes.
                            Entry::Miss(mut w) => {
                                w.write_all(b"partial").unwrap();
                                w.flush().unwrap();
                                std::thread::yield_now();
                                drop(w);
                            }
                            Entry::Hit(mut r) => {
                                let mut out = Vec::new();
                                assert!(
                                    r.read_to_end(&mut out).is_err(),
                                    "a reader of an aborted entry read a clean end: {out:?}"
                                );
                            }
                        }
                    }
                });
            }
        });
        assert!(cache.get("k").unwrap().is_none());
        assert!(matches!(cache.get_or_create("k").unwrap(), Entry::Miss(_)));
    }
}
