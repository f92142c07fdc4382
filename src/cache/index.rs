//! The key → entry index, recency, byte accounting and the removal path.
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
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::one::Ref;
use lru::LruCache;

use super::clock::Clock;
use super::meta::EntryMeta;
use super::reaper::{self, Deletions, Job, Note, Threads};
use super::{EntryInfo, Policy, RemovalCause};
use crate::error::{Error, Result};
use crate::storage::Storage;
use crate::stream::{Observer, Reader, Stream};

/// `Slot::accounted` once the entry left the index: its bytes no longer count.
const GONE: u64 = u64::MAX;

/// How far over `max_entries` the count may go before writers help the reaper evict.
fn help_slack(max: u64) -> u64 {
    (max / 16).max(64)
}

/// The entry count past which writers help the reaper evict: `max` plus the slack,
/// saturating. (Regression: `max + slack` overflowed for `max_entries(u64::MAX)`, a panic in
/// debug builds and, wrapped, a threshold far below the limit in release builds.)
fn help_threshold(max: u64) -> u64 {
    max.saturating_add(help_slack(max))
}

/// Whether `e` says the process (`EMFILE`) or the system (`ENFILE`) has no file descriptor
/// left: a passing shortage, never a verdict on an entry.
pub(crate) fn out_of_handles(e: &Error) -> bool {
    match e {
        Error::Io { source, .. } => io_out_of_handles(source),
        _ => false,
    }
}

/// `out_of_handles` for an `io::Error`, also when the OS error is wrapped (e.g. in a
/// `tempfile::PathError` naming the file).
pub(crate) fn io_out_of_handles(e: &std::io::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(23 | 24))
        {
            return true;
        }
        // An `io::Error` wrapping another error exposes it through `get_ref`, not `source`.
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// Whether an error opening an entry's blob proves the entry lost (its files missing or
/// damaged), rather than a passing failure (no descriptors, no memory, EIO, EACCES…) that
/// must fail only the request.
fn proves_loss(e: &Error) -> bool {
    matches!(e, Error::Corrupt { .. })
        || matches!(
            e.kind(),
            std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
        )
}

/// Size of `Inner::hit_ring`.
pub(crate) const HIT_RING: usize = 64;

/// `Slot::flags`: in the index. Set before insertion, cleared once by `finalize`.
const LIVE: u8 = 1;
/// `Slot::flags`: the blob is committed in storage.
const COMMITTED: u8 = 2;
/// `Slot::flags`: read since committed or reloaded (its recency should be persisted).
const TOUCHED: u8 = 4;
/// `Slot::flags`: queued in `Inner::idle_open`.
const QUEUED_IDLE: u8 = 8;

/// Where `Inner::refile` puts entries back in the recency list.
#[derive(Debug, Clone, Copy)]
enum Refile {
    /// First out (the reaper's spared entries: they go once released).
    LeastRecent,
    /// Last out (a helping writer's spared entries: see `help_evict`).
    MostRecent,
}

/// When `Inner::unlink_as` leaves the entry in place.
#[derive(Debug, Clone, Copy)]
enum Unless {
    Never,
    /// A reader or the writer has it open.
    InUse,
    /// In use, or no longer idle past its time to idle at this time (it was used since).
    InUseOrFresh(u64),
}

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

/// How `finalize` deletes a committed blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deletion {
    /// Queue a `Delete` job (any thread: requests never do I/O).
    Queue,
    /// Delete it at once (the reaper's own evictions: no job, no second copy of the name).
    Inline,
    /// As `Inline`, for a slot the caller already took out of `lru` (the reaper's size
    /// eviction): it cannot be filed again (only `finished`, once, files it), so `finalize`
    /// skips the LRU lock.
    InlineUnfiled,
    /// As `Queue`, for a slot the caller already took out of `lru` (a writer's size eviction).
    QueueUnfiled,
}

impl Deletion {
    /// Whether the slot may still be in `lru`.
    fn filed(self) -> bool {
        matches!(self, Deletion::Queue | Deletion::Inline)
    }
}

/// Limits and options fixed at build time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    pub(crate) max_entries: Option<u64>,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) ttl_ms: Option<u64>,
    pub(crate) tti_ms: Option<u64>,
}

/// Counters behind [`super::CacheStats`]. Relaxed atomics: statistics are eventually exact.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) misses: AtomicU64,
    pub(crate) aborts: AtomicU64,
    pub(crate) removals: AtomicU64,
    pub(crate) evictions: AtomicU64,
    pub(crate) bytes_written: AtomicU64,
    pub(crate) bytes_read: AtomicU64,
    /// Written by size eviction only: set (SeqCst) before a pass looks at any entry, and
    /// left set if entries in use kept the cache over its limit. SeqCst, unlike the others:
    /// the last release of an entry reads it to ask for another pass (`Slot::released`).
    pub(crate) over_limit: AtomicBool,
}

/// What entries need from the cache on their hot paths (reader open/close), held strongly so
/// that no `Weak` upgrade is needed there.
#[derive(Debug)]
pub(crate) struct Books {
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) stats: Counters,
    /// Whether a time to idle is configured (otherwise releases need no timestamp).
    pub(crate) track_idle: bool,
    /// The cache, for the entries' less frequent callbacks (set once, right after the cache
    /// is built; weak, so entries never keep a dropped cache alive).
    pub(crate) cache: OnceLock<Weak<Inner>>,
    /// Access clock for recency stamps when no expiry needs the exact time: milliseconds,
    /// raised to one past the real clock on every exact reading (misses, finishes, and every
    /// `HIT_RING` hits), so a hit is stamped after the finish or miss that preceded it and at
    /// most a ring's worth of hits behind the clock. Saves a clock read per hit.
    pub(crate) access: AtomicU64,
}

impl Books {
    /// An exact reading of the clock, which also advances the access clock.
    pub(crate) fn now(&self) -> u64 {
        let now = self.clock.now_millis();
        // Hits stamped from here on order after anything stamped with `now`. (The stamp only
        // grows, so a load that shows it high enough is final; most readings within the same
        // millisecond skip the read-modify-write on this shared counter.)
        if self.access.load(Ordering::Relaxed) <= now {
            self.access.fetch_max(now + 1, Ordering::Relaxed);
        }
        now
    }

    /// A recency stamp without reading the clock.
    fn access_stamp(&self) -> u64 {
        self.access.load(Ordering::Relaxed)
    }

    pub(crate) fn cache(&self) -> Option<Arc<Inner>> {
        self.cache.get().and_then(Weak::upgrade)
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

/// Asks `policy` about a size eviction. A panic counts as "keep" and is logged: it must not
/// take down the reaper, which would leave every later deletion and limit undone.
fn policy_allows(policy: &dyn Policy, entry: &EntryInfo) -> bool {
    let ask = std::panic::AssertUnwindSafe(|| policy.may_evict(entry, RemovalCause::Size));
    std::panic::catch_unwind(ask).unwrap_or_else(|_| {
        tracing::error!(key = %entry.key, "eviction policy panicked; keeping the entry");
        false
    })
}

/// How many in-use entries a helping writer steps over before it gives up. Regression: a
/// writer used to stop at the first one, so a single entry in use at the least recently used
/// end (a slow reader, or a writer preempted between filing its entry and closing it) stopped
/// all help and let a storm of writers grow the cache far past `max_entries`.
const HELP_SKIP: usize = 8;

/// The recency list: finished, live entries by id, least recently used first out.
pub(crate) type Recency = LruCache<u64, Arc<Slot>, BuildHasherDefault<IdHasher>>;

/// Hashes the recency list's keys: entry ids, which come from a counter inside the cache (no
/// caller controls them, so no flooding defence is needed). One multiply instead of SipHash
/// makes the promotions that follow every batch of hits about twice as cheap.
#[derive(Debug, Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `u64` keys; kept correct for any other input.
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, id: u64) {
        // Fibonacci hashing: the high bits (hashbrown's tag) are well mixed, and the low bits
        // (its bucket index) of an odd multiple run through every value for sequential ids.
        self.0 = (self.0 ^ id).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Everything the cache shares with its entries' observers and its reaper.
pub(crate) struct Inner {
    pub(crate) storage: Arc<dyn Storage>,
    /// Lock: DashMap's shard locks, held only inside a single map call or while a hit opens a
    /// reader. Invariant: a key maps to the slot that new requests are served from, and to its
    /// open stream: `Some` while the entry is being written or in use; a finished, unused entry
    /// may drop it (`close_if_idle`, closing its file) and reopen it on demand (`stream_of`).
    /// A slot leaves the map exactly once (`unlink`), and `finalize` runs exactly once per slot
    /// that was in the map, with the stream that left with it.
    pub(crate) index: DashMap<Indexed, Option<Stream>>,
    /// Number of slots in `index` (the map's own `len` locks every shard). Incremented before
    /// an insertion (and back if it loses), decremented by `finalize`, so it never wraps: it
    /// may count an entry about to appear, never miss one that is gone.
    pub(crate) entries: AtomicUsize,
    /// A `Maintain` job is queued and the reaper has not started on it: further requests
    /// need not queue another. Cleared by the reaper before it evicts.
    pub(crate) maintain_pending: AtomicBool,
    /// Lock: this mutex (a leaf lock). Finished, live entries by recency (least recent
    /// first out). Inserted only while the slot is `LIVE`, checked under this lock; `finalize`
    /// clears `LIVE` then removes it under this lock, so no dead entry stays.
    pub(crate) lru: Mutex<Recency>,
    /// Recent hits (entry id + 1; 0 = empty) not yet applied to `lru`. Lock-free ring written
    /// at `hit_head`; see `record_hit`. `hit_head` also counts served hits (statistics).
    pub(crate) hit_ring: Box<[AtomicU64]>,
    pub(crate) hit_head: AtomicUsize,
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
    /// Lock: this mutex (a leaf lock). Finished entries (key, id) that were released with
    /// their stream open, oldest first; beyond `max_idle_open`, the oldest close their stream
    /// if unused.
    pub(crate) idle_open: Mutex<std::collections::VecDeque<(Arc<str>, u64)>>,
    pub(crate) max_idle_open: usize,
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

/// One entry: what the index maps a key to, and the observer of the entry's stream.
///
/// The slot does not hold its stream (the index does, beside it), so the stream's observer
/// pointing back at the slot makes no reference cycle.
///
/// Kept small (one 88-byte allocation): the creation time and user metadata live in the
/// stored record, not here.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) key: Arc<str>,
    pub(crate) id: u64,
    pub(crate) books: Arc<Books>,
    /// Milliseconds; 0 while being written. Set once.
    pub(crate) finished: AtomicU64,
    /// When a reader was last opened (recency, persisted).
    pub(crate) last_access: AtomicU64,
    /// Time-to-idle base: when the last handle was released. While the entry is being written
    /// (no release can happen), it holds the creation time.
    pub(crate) idle_since: AtomicU64,
    /// Bytes counted into `Inner::bytes`, or `GONE`.
    pub(crate) accounted: AtomicU64,
    /// `LIVE | COMMITTED | TOUCHED | QUEUED_IDLE`. `LIVE` and `COMMITTED` share the atomic so
    /// that exactly one of `finalize` (clearing `LIVE`) and `finished` (setting `COMMITTED`)
    /// sees the other's bit and deletes a blob committed after its entry was removed.
    pub(crate) flags: AtomicU8,
}

impl Slot {
    pub(crate) fn new(
        inner: &Arc<Inner>,
        key: Arc<str>,
        id: u64,
        finished: u64,
        since: u64,
        len: u64,
    ) -> Slot {
        Slot {
            key,
            id,
            books: inner.books.clone(),
            finished: AtomicU64::new(finished),
            last_access: AtomicU64::new(since),
            idle_since: AtomicU64::new(since),
            accounted: AtomicU64::new(len),
            flags: AtomicU8::new(if finished != 0 { COMMITTED } else { 0 }),
        }
    }

    fn has(&self, flag: u8) -> bool {
        self.flags.load(Ordering::SeqCst) & flag != 0
    }

    pub(crate) fn is_live(&self) -> bool {
        self.has(LIVE)
    }

    pub(crate) fn set_live(&self) {
        self.flags.fetch_or(LIVE, Ordering::SeqCst);
    }

    pub(crate) fn is_committed(&self) -> bool {
        self.has(COMMITTED)
    }

    pub(crate) fn is_touched(&self) -> bool {
        self.has(TOUCHED)
    }

    pub(crate) fn name(&self) -> String {
        blob_name(&self.key, self.id)
    }
}

/// The blob name of version `id` of `key`: 128 bits of blake3(key), then the id.
pub(crate) fn blob_name(key: &str, id: u64) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let hash = blake3::hash(key.as_bytes());
    // Written digit by digit into an exactly sized buffer (no formatting machinery).
    let mut name = String::with_capacity(32 + 1 + 16);
    for b in &hash.as_bytes()[..16] {
        name.push(HEX[usize::from(b >> 4)] as char);
        name.push(HEX[usize::from(b & 15)] as char);
    }
    name.push('-');
    for shift in (0..16).rev() {
        name.push(HEX[((id >> (shift * 4)) & 15) as usize] as char);
    }
    name
}

impl Observer for Slot {
    fn commit_meta(&self, user: &Bytes) -> Vec<u8> {
        let now = self.books.now();
        // Still being written: `idle_since` holds the creation time.
        let created = self.idle_since.load(Ordering::Relaxed);
        self.finished.store(now, Ordering::Relaxed);
        self.last_access.store(now, Ordering::Relaxed);
        EntryMeta::encode_parts(&self.key, created, now, now, user)
    }

    fn published(&self, len: u64) -> Result<()> {
        let Some(cache) = self.books.cache() else {
            return Ok(());
        };
        // An entry that alone exceeds `max_bytes` could never be kept: refused as soon as it
        // crosses the limit, so its bytes never pile up in memory or on disk. (Regression: a
        // 64 MiB memory cache took a 512 MiB entry whole, and evicted it only after finish.)
        if let Some(max) = cache.limits.max_bytes
            && len > max
        {
            return Err(Error::TooLarge {
                key: self.key.to_string(),
                len,
                max_bytes: max,
            });
        }
        cache.account(self, len);
        Ok(())
    }

    fn finished(self: Arc<Self>, len: u64, committed: bool) {
        let Some(cache) = self.books.cache() else {
            return;
        };
        // A committed entry was stamped by `commit_meta` a moment ago; a doomed one was not.
        let now = match self.finished.load(Ordering::Relaxed) {
            0 => {
                let now = cache.books.now();
                self.finished.store(now, Ordering::Relaxed);
                self.last_access.store(now, Ordering::Relaxed);
                now
            }
            stamped => stamped,
        };
        self.idle_since.store(now, Ordering::Relaxed);
        cache
            .books
            .stats
            .bytes_written
            .fetch_add(len, Ordering::Relaxed);
        if committed && self.flags.fetch_or(COMMITTED, Ordering::SeqCst) & LIVE == 0 {
            // Removed while it was being written: nobody else will delete it.
            cache.delete_blob(self.name(), len, false);
        }
        // (Its bytes were accounted by `published`, which `finish` calls with the final
        // length before committing.)
        {
            let mut lru = cache.lru.lock().unwrap_or_else(|e| e.into_inner());
            // Checked under the LRU lock: `finalize` clears `LIVE` before taking it.
            if self.is_live() {
                lru.put(self.id, self.clone());
            }
        }
        if cache.over_limits() {
            cache.request_maintenance();
            // The reaper has fallen far behind (a storm of writers, or a slow listener): this
            // writer evicts its share, so the count stays near the limit. Not with a policy,
            // whose calls stay on the reaper.
            if let Some(max) = cache.limits.max_entries
                && cache.policy.is_none()
                && cache.entries.load(Ordering::Relaxed) as u64 > help_threshold(max)
            {
                cache.help_evict(2);
            }
        }
    }

    fn aborted(&self) {
        // A request may already have unlinked the failed entry; `finalize` counts it once.
        if let Some(cache) = self.books.cache() {
            cache.unlink_id(&self.key, self.id, RemovalCause::Aborted);
        }
    }

    fn released(&self) {
        if self.books.track_idle {
            self.idle_since
                .store(self.books.clock.now_millis(), Ordering::Relaxed);
        }
        // An entry that was spared by size eviction because it was in use may go now.
        // Regression: the reaper published "over the limit" only after its pass, so a release
        // between its in-use check and that store asked for nothing, and the cache stayed over
        // its limit until the next write or tick. The pass now publishes it before looking at
        // any entry; with this load and the handle release both SeqCst, either the pass saw
        // the entry unused or this sees the flag.
        if self.books.stats.over_limit.load(Ordering::SeqCst)
            && let Some(cache) = self.books.cache()
        {
            cache.request_maintenance();
        }
        // A finished entry nobody uses keeps its open stream only while it is among the most
        // recently released ones (bounding open files).
        if self.finished.load(Ordering::Relaxed) != 0
            && !self.has(QUEUED_IDLE)
            && self.flags.fetch_or(QUEUED_IDLE, Ordering::AcqRel) & QUEUED_IDLE == 0
            && let Some(cache) = self.books.cache()
        {
            cache.queue_idle(self.key.clone(), self.id);
        }
    }

    fn corrupt(&self) {
        if let Some(cache) = self.books.cache() {
            tracing::warn!(key = %self.key, "dropping entry whose stored data is corrupt");
            cache.unlink_id(&self.key, self.id, RemovalCause::Corrupt);
        }
    }

    fn storage_failed(&self, error: &std::io::Error) {
        // Out of file descriptors while writing or committing (a commit opens the record
        // file): this entry aborts, but the next request must not meet the same shortage.
        if io_out_of_handles(error)
            && let Some(cache) = self.books.cache()
        {
            cache.close_idle_handles();
        }
    }

    fn reader_closed(&self, bytes: u64) {
        if bytes > 0 {
            self.books
                .stats
                .bytes_read
                .fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

impl Inner {
    /// The exact time if an expiry limit needs it to judge a hit, else `None`.
    pub(crate) fn exact_now(&self) -> Option<u64> {
        (self.limits.ttl_ms.is_some() || self.limits.tti_ms.is_some()).then(|| self.books.now())
    }

    /// Asks the reaper to enforce limits soon (coalesced: one queued request at a time).
    pub(crate) fn request_maintenance(&self) {
        // A load first: while a request is pending (the common case when every write breaks
        // a limit), asking again costs no read-modify-write on this shared flag. The fence
        // pairs with the one after the reaper clears the flag (store-buffering pattern):
        // either this load sees the flag cleared and queues a job, or that pass's reads see
        // the change our caller made before calling.
        std::sync::atomic::fence(Ordering::SeqCst);
        if !self.maintain_pending.load(Ordering::Relaxed)
            && !self.maintain_pending.swap(true, Ordering::AcqRel)
            && reaper::try_queue(&self.jobs, Job::Maintain).is_err()
        {
            // The queue is full (the reaper is busy and runs a pass after its batch anyway)
            // or the reaper is gone: let a later request ask again.
            self.maintain_pending.store(false, Ordering::Relaxed);
        }
    }

    /// Deletes a committed blob of `bytes` bytes: at once with `inline` (or on the reaper
    /// thread), else through the reaper's queue — or here, if that queue is full
    /// (back-pressure). Until the deletion succeeds its bytes count toward `max_bytes`; a
    /// refused deletion is retried by the reaper.
    pub(crate) fn delete_blob(&self, name: String, bytes: u64, inline: bool) {
        let doomed = self.deletions.begin(name, bytes);
        if inline || self.threads.is_own() {
            self.deletions.run(doomed);
            return;
        }
        if let Err(Job::Delete(doomed)) = reaper::try_queue(&self.jobs, Job::Delete(doomed)) {
            self.deletions.run(doomed);
        }
    }

    /// Tells the eviction listener, on the notifier thread. Waits if the notifier is far
    /// behind (back-pressure), except on the cache's own threads: the notifier calls it
    /// inline, the reaper never waits for the listener.
    fn notify(&self, key: &Arc<str>, cause: RemovalCause) {
        let Some((notes, listener)) = &self.notifier else {
            return;
        };
        if self.threads.is_notifier() {
            reaper::notify(listener, key, cause);
            return;
        }
        let note = Note::Removed(key.clone(), cause);
        if self.threads.is_own() {
            self.reaper_note(note);
            return;
        }
        let _ = notes.send(note);
    }

    /// Reaper: queues `note` for the notifier without ever waiting for a slow listener.
    /// Past a full queue, notes wait in `note_overflow`, in order, for `flush_notes`.
    pub(crate) fn reaper_note(&self, note: Note) {
        let Some((notes, _)) = &self.notifier else {
            if let Note::Sync(ack) = note {
                let _ = ack.send(());
            }
            return;
        };
        let mut overflow = self.note_overflow.lock().unwrap_or_else(|e| e.into_inner());
        if !overflow.is_empty() {
            overflow.push_back(note);
        } else if let Err(std::sync::mpsc::TrySendError::Full(note)) = notes.try_send(note) {
            overflow.push_back(note);
        }
    }

    /// Reaper: hands notes that found the notifier's queue full over, in order: as far as
    /// there is room, or all of them with `wait` (at shutdown). Returns whether some are
    /// still waiting.
    pub(crate) fn flush_notes(&self, wait: bool) -> bool {
        let Some((notes, _)) = &self.notifier else {
            return false;
        };
        let mut overflow = self.note_overflow.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(note) = overflow.pop_front() {
            let sent = if wait {
                notes
                    .send(note)
                    .map_err(|e| TrySendError::Disconnected(e.0))
            } else {
                notes.try_send(note)
            };
            match sent {
                Ok(()) => {}
                Err(TrySendError::Full(note)) => {
                    overflow.push_front(note);
                    return true;
                }
                Err(TrySendError::Disconnected(_)) => {
                    overflow.clear();
                    return false;
                }
            }
        }
        false
    }

    /// The entry's record as stored (user metadata included), from its open stream or from
    /// storage.
    pub(crate) fn current_meta(&self, slot: &Slot) -> EntryMeta {
        let stored = self
            .storage
            .info(&slot.name())
            .ok()
            .and_then(|info| EntryMeta::decode(&info.meta).ok());
        let open_user = self.open_stream(slot).map(|s| s.metadata());
        let (created, stored_user) = stored.map_or((0, Bytes::new()), |m| (m.created, m.user));
        EntryMeta {
            key: slot.key.to_string(),
            created,
            finished: slot.finished.load(Ordering::Relaxed),
            last_access: slot.last_access.load(Ordering::Relaxed),
            user: open_user.unwrap_or(stored_user),
        }
    }

    /// The slot indexed under `key`, if any.
    pub(crate) fn slot(&self, key: &str) -> Option<Arc<Slot>> {
        self.index.get(key).map(|e| e.key().0.clone())
    }

    /// `slot`'s index entry (a shard read guard), if `slot` is still the one indexed.
    fn indexed(&self, slot: &Slot) -> Option<Ref<'_, Indexed, Option<Stream>>> {
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

    /// Drops the stream of the finished entry (`key`, `id`) if nobody uses it, closing its
    /// storage handle.
    fn close_if_idle(&self, key: &str, id: u64) {
        let stream = {
            let Some(mut e) = self.index.get_mut(key) else {
                return;
            };
            let slot = &e.key().0;
            if slot.id != id {
                return;
            }
            slot.flags.fetch_and(!QUEUED_IDLE, Ordering::AcqRel);
            let idle = e.value().as_ref().is_some_and(|s| s.handles() == 0);
            if !idle || slot.finished.load(Ordering::Relaxed) == 0 {
                return;
            }
            e.value_mut().take()
        };
        // Closed after the shard guard is gone.
        drop(stream);
    }

    fn info(&self, slot: &Slot, len: u64) -> EntryInfo {
        let meta = self.current_meta(slot);
        EntryInfo {
            key: meta.key,
            len,
            created: meta.created,
            last_access: meta.last_access,
            metadata: meta.user,
        }
    }

    /// Runs `op`; if it fails for want of file descriptors, closes the idle entries' handles
    /// and runs it once more.
    pub(crate) fn retry_out_of_handles<T>(&self, op: impl Fn() -> Result<T>) -> Result<T> {
        match op() {
            Err(e) if out_of_handles(&e) => {
                self.close_idle_handles();
                op()
            }
            other => other,
        }
    }

    /// Closes the storage handles of every finished entry nobody uses (they reopen on
    /// demand). Called when the process runs out of file descriptors.
    pub(crate) fn close_idle_handles(&self) {
        let idle = std::mem::take(&mut *self.idle_open.lock().unwrap_or_else(|e| e.into_inner()));
        tracing::warn!(
            handles = idle.len(),
            "out of file descriptors: closing the idle entries' handles"
        );
        for (key, id) in idle {
            self.close_if_idle(&key, id);
        }
    }

    fn queue_idle(&self, key: Arc<str>, id: u64) {
        let evicted = {
            let mut q = self.idle_open.lock().unwrap_or_else(|e| e.into_inner());
            q.push_back((key, id));
            if q.len() > self.max_idle_open {
                q.pop_front()
            } else {
                None
            }
        };
        if let Some((key, id)) = evicted {
            self.close_if_idle(&key, id);
        }
    }

    /// Sets `slot`'s contribution to the byte total to `len` (unless it left the index).
    ///
    /// Regression: the slot's figure used to grow first and the total after, so a removal in
    /// between (`finalize` subtracts the slot's figure) took the total below zero: a debug
    /// build panicked on overflow, a release build briefly saw ~2^64 bytes and evicted every
    /// idle entry. The total now grows first (undone if the slot's figure moved meanwhile),
    /// so it is never less than the sum of the slots' figures: at worst a brief overcount.
    fn account(&self, slot: &Slot, len: u64) {
        let mut cur = slot.accounted.load(Ordering::Acquire);
        loop {
            if cur == GONE || cur >= len {
                return;
            }
            let total = self.bytes.fetch_add(len - cur, Ordering::AcqRel) + (len - cur);
            match slot
                .accounted
                .compare_exchange(cur, len, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if self.limits.max_bytes.is_some_and(|max| total > max) {
                        self.request_maintenance();
                    }
                    return;
                }
                Err(now) => {
                    self.bytes.fetch_sub(len - cur, Ordering::AcqRel);
                    cur = now;
                }
            }
        }
    }

    /// Whether the cache is over a size limit. Bytes of removed entries whose blobs are not
    /// deleted yet count: they still use the space.
    pub(crate) fn over_limits(&self) -> bool {
        let entries = self
            .limits
            .max_entries
            .is_some_and(|max| self.entries.load(Ordering::Relaxed) as u64 > max);
        entries
            || self.limits.max_bytes.is_some_and(|max| {
                self.bytes
                    .load(Ordering::Relaxed)
                    .saturating_add(self.deletions.pending_bytes.load(Ordering::Relaxed))
                    > max
            })
    }

    /// Why `slot` must not be served at `now`, if it must not.
    pub(crate) fn expiry(&self, slot: &Slot, now: u64) -> Option<RemovalCause> {
        match self.time_expiry(slot, now) {
            Some(RemovalCause::Idle) if self.in_use(slot) => None,
            other => other,
        }
    }

    /// Like `expiry`, from timestamps alone (no lock taken): `Idle` still needs the caller to
    /// check that the entry is not in use.
    fn time_expiry(&self, slot: &Slot, now: u64) -> Option<RemovalCause> {
        let finished = slot.finished.load(Ordering::Relaxed);
        if finished == 0 {
            return None; // being written: never expires
        }
        if let Some(ttl) = self.limits.ttl_ms
            && now >= finished.saturating_add(ttl)
        {
            return Some(RemovalCause::Expired);
        }
        if let Some(tti) = self.limits.tti_ms
            && now >= slot.idle_since.load(Ordering::Relaxed).saturating_add(tti)
        {
            return Some(RemovalCause::Idle);
        }
        None
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
            // Only proof that the data is lost drops the entry. Regression: any error did, so
            // running out of file descriptors (EMFILE) destroyed finished entries for good.
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

    /// The fast path of a hit, for a caller that holds the index's shard guard on `slot` and
    /// its open `stream`: a reader if the entry is not (possibly) expired. Takes no lock of
    /// the index and does no I/O; `None` sends the caller to `try_hit`. The caller must not
    /// drop a returned reader while it holds the guard (see `Cache::lookup`).
    pub(crate) fn hit_open(
        &self,
        slot: &Slot,
        stream: Option<&Stream>,
        now: Option<u64>,
    ) -> Option<Reader> {
        if let Some(now) = now
            && self.time_expiry(slot, now).is_some()
        {
            return None;
        }
        stream?.reader().ok()
    }

    /// Books a served hit: recency stamp and promotion, and the "touched" mark.
    pub(crate) fn note_hit(&self, slot: &Slot, now: Option<u64>) {
        let stamp = now.unwrap_or_else(|| self.books.access_stamp());
        slot.last_access.store(stamp, Ordering::Relaxed);
        if !slot.is_touched() {
            slot.flags.fetch_or(TOUCHED, Ordering::Relaxed);
        }
        // Recorded for entries still being written too (their promotion is a no-op): the
        // ring's cursor is the hit counter.
        self.record_hit(slot.id);
    }

    /// Removes `slot` from the index if it is still there, then finalizes it.
    pub(crate) fn unlink(&self, slot: &Arc<Slot>, cause: RemovalCause) -> bool {
        self.unlink_as(slot, cause, Deletion::Queue, Unless::Never)
    }

    /// `unlink`, deleting the blob as `deletion` says, unless `unless` holds (checked under
    /// the shard's write lock, so no reader can appear between the check and the removal).
    fn unlink_as(
        &self,
        slot: &Arc<Slot>,
        cause: RemovalCause,
        deletion: Deletion,
        unless: Unless,
    ) -> bool {
        let removed = self.index.remove_if(&*slot.key, |k, stream| {
            let in_use = || stream.as_ref().is_some_and(|s| s.handles() > 0);
            Arc::ptr_eq(&k.0, slot)
                && match unless {
                    Unless::Never => true,
                    Unless::InUse => !in_use(),
                    Unless::InUseOrFresh(now) => {
                        !in_use() && self.time_expiry(slot, now) == Some(RemovalCause::Idle)
                    }
                }
        });
        match removed {
            Some((_, stream)) => {
                self.finalize_as(slot, stream, cause, deletion);
                true
            }
            None => false,
        }
    }

    /// Removes the entry with id `id` under `key`, if that is what the index holds.
    pub(crate) fn unlink_id(&self, key: &str, id: u64, cause: RemovalCause) {
        if let Some((Indexed(slot), stream)) = self.index.remove_if(key, |k, _| k.0.id == id) {
            self.finalize(&slot, stream, cause);
        }
    }

    /// Everything that follows a slot's removal from the index, given the open stream that
    /// left the index with it. Runs once per slot; does no I/O itself (deletion is the
    /// reaper's job).
    pub(crate) fn finalize(&self, slot: &Slot, stream: Option<Stream>, cause: RemovalCause) {
        self.finalize_as(slot, stream, cause, Deletion::Queue);
    }

    /// `finalize`; with `Deletion::Inline` (reaper thread only) the blob is deleted right here
    /// instead of through a `Delete` job. Called without any lock held.
    fn finalize_as(
        &self,
        slot: &Slot,
        stream: Option<Stream>,
        cause: RemovalCause,
        deletion: Deletion,
    ) {
        let was = slot.flags.fetch_and(!LIVE, Ordering::SeqCst);
        self.entries.fetch_sub(1, Ordering::Relaxed);
        if deletion.filed() {
            self.lru
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop(&slot.id);
        }
        let counted = match slot.accounted.swap(GONE, Ordering::AcqRel) {
            GONE => 0,
            counted => {
                self.bytes.fetch_sub(counted, Ordering::AcqRel);
                counted
            }
        };
        if let Some(stream) = &stream {
            stream.doom_keep();
        }
        if was & COMMITTED != 0 {
            // The open stream knows the blob's name: no need to derive it again.
            let name = stream
                .as_ref()
                .map_or_else(|| slot.name(), |s| s.name().to_owned());
            let inline = matches!(deletion, Deletion::Inline | Deletion::InlineUnfiled);
            self.delete_blob(name, counted, inline);
        }
        drop(stream);
        let stats = &self.books.stats;
        match cause {
            RemovalCause::Explicit => &stats.removals,
            RemovalCause::Aborted => {
                stats.aborts.fetch_add(1, Ordering::Relaxed);
                &stats.removals
            }
            _ => &stats.evictions,
        }
        .fetch_add(1, Ordering::Relaxed);
        self.notify(&slot.key, cause);
    }

    /// Notes a hit for recency without taking the LRU lock: the id goes into a ring buffer
    /// that is applied to the LRU list when it fills (if the lock is free) and before every
    /// eviction decision. A hit lost to a full, contended ring only makes recency approximate.
    fn record_hit(&self, id: u64) {
        let i = self.hit_head.fetch_add(1, Ordering::Relaxed);
        self.hit_ring[i % HIT_RING].store(id + 1, Ordering::Release);
        if (i + 1).is_multiple_of(HIT_RING) {
            // Keep the access clock close to the real one.
            self.books.now();
            if let Ok(mut lru) = self.lru.try_lock() {
                self.apply_hits(&mut lru);
            }
        }
    }

    /// Applies the buffered hits to the LRU list, oldest first.
    fn apply_hits(&self, lru: &mut Recency) {
        let head = self.hit_head.load(Ordering::Acquire);
        for k in 0..HIT_RING {
            let cell = &self.hit_ring[(head + k) % HIT_RING];
            // A load and a store, not a swap: a hit recorded into this cell between the two
            // (the ring wrapped around during the drain) is lost, which only makes recency
            // approximate, and the drain costs no read-modify-write per cell.
            let id = cell.load(Ordering::Acquire);
            if id != 0 {
                cell.store(0, Ordering::Relaxed);
                lru.promote(&(id - 1));
            }
        }
    }

    /// Size eviction: least recently used first, skipping entries in use or that the policy
    /// keeps. Returns how many were evicted.
    pub(crate) fn evict_for_size(&self) -> usize {
        if self.over_limits() {
            // Before any in-use check: see `Slot::released`.
            self.books.stats.over_limit.store(true, Ordering::SeqCst);
        }
        let mut held = {
            let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
            self.apply_hits(&mut lru);
            Some(lru)
        };
        let mut evicted = 0;
        let mut kept = Vec::new();
        while self.over_limits() {
            // The first victim comes under the lock taken to apply the hits; the guard is
            // dropped before the victim is looked at.
            let victim = match held.take() {
                Some(mut lru) => lru.pop_lru(),
                None => self.lru.lock().unwrap_or_else(|e| e.into_inner()).pop_lru(),
            };
            let Some((_, slot)) = victim else { break };
            if !slot.is_live() {
                continue;
            }
            // (The unlink re-checks "in use"; checking first only spares the policy a look
            // at entries that could not go anyway.)
            let refused = self.policy.as_ref().is_some_and(|p| {
                let len = slot.accounted.load(Ordering::Relaxed);
                self.in_use(&slot) || !policy_allows(&**p, &self.info(&slot, len))
            });
            if refused {
                kept.push(slot);
            } else if self.evict_unless_in_use(slot, Deletion::InlineUnfiled, &mut kept) {
                evicted += 1;
            }
        }
        drop(held);
        let over = self.over_limits();
        self.books.stats.over_limit.store(over, Ordering::SeqCst);
        if kept.is_empty() {
            return evicted;
        }
        self.refile(kept, Refile::LeastRecent);
        evicted
    }

    /// Evicts `slot` (taken out of `lru`) for size unless it is in use, which the unlink
    /// checks under the shard's write lock; an entry in use that is still live goes to `kept`.
    fn evict_unless_in_use(
        &self,
        slot: Arc<Slot>,
        deletion: Deletion,
        kept: &mut Vec<Arc<Slot>>,
    ) -> bool {
        if self.unlink_as(&slot, RemovalCause::Size, deletion, Unless::InUse) {
            return true;
        }
        if slot.is_live() {
            kept.push(slot);
        }
        false
    }

    /// Puts slots taken out of `lru` but not evicted back, at the end `end` says, in their old
    /// order (the first is the least recent); those no longer live are dropped. Checked under
    /// the LRU lock: `finalize` clears `LIVE` before taking it.
    fn refile(&self, slots: Vec<Arc<Slot>>, end: Refile) {
        let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
        match end {
            Refile::LeastRecent => {
                for slot in slots.into_iter().rev() {
                    if slot.is_live() {
                        lru.push(slot.id, slot.clone());
                        lru.demote(&slot.id);
                    }
                }
            }
            Refile::MostRecent => {
                for slot in slots {
                    if slot.is_live() {
                        lru.push(slot.id, slot);
                    }
                }
            }
        }
    }

    /// A writer's share of size eviction once the reaper has fallen far behind: up to `n`
    /// least recently used entries that nobody is reading, their blobs queued for the reaper
    /// to delete (no I/O here). Entries in use are skipped (up to `HELP_SKIP` of them).
    fn help_evict(&self, n: usize) {
        let mut kept = Vec::new();
        let mut evicted = 0;
        while evicted < n && kept.len() < HELP_SKIP {
            let victim = {
                let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
                self.apply_hits(&mut lru);
                lru.pop_lru()
            };
            let Some((_, slot)) = victim else { break };
            if !slot.is_live() {
                continue;
            }
            if self.evict_unless_in_use(slot, Deletion::QueueUnfiled, &mut kept) {
                evicted += 1;
            }
        }
        // Back as the most recently used (they are in use): put back at the other end, a
        // run of `HELP_SKIP` entries in use would stop every later writer at the same place.
        if !kept.is_empty() {
            self.refile(kept, Refile::MostRecent);
        }
    }

    /// Time-based eviction: every finished entry past its time to live or idle (the policy is
    /// not consulted: such entries are never served again anyway).
    pub(crate) fn evict_expired(&self) -> usize {
        if self.limits.ttl_ms.is_none() && self.limits.tti_ms.is_none() {
            return 0;
        }
        let now = self.books.clock.now_millis();
        // Shard locks are held only while reading timestamps; the in-use check comes after.
        let stale: Vec<(Arc<Slot>, RemovalCause)> = self
            .index
            .iter()
            .filter_map(|e| {
                self.time_expiry(&e.key().0, now)
                    .map(|c| (e.key().0.clone(), c))
            })
            .collect();
        let mut evicted = 0;
        for (slot, cause) in stale {
            // An entry in use never idles out, nor one used since the scan.
            let unless = match cause {
                RemovalCause::Idle => Unless::InUseOrFresh(now),
                _ => Unless::Never,
            };
            if self.unlink_as(&slot, cause, Deletion::Inline, unless) {
                evicted += 1;
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;

    use super::*;

    /// Writers help evict only past the limit, for any limit (the largest included).
    #[test]
    fn help_threshold_is_past_the_limit() {
        assert_eq!(help_threshold(10), 10 + 64);
        assert_eq!(help_threshold(16_000), 17_000);
        for max in [u64::MAX, u64::MAX - 1, u64::MAX / 2 + 1] {
            assert!(help_threshold(max) >= max, "{max}");
        }
    }

    /// Sequential ids (how the cache makes them) must spread over both the low bits, which pick
    /// hashbrown's bucket, and the top 7 bits, its tag; a weak mix here turns promotions into
    /// long probe sequences.
    #[test]
    fn id_hash_spreads_sequential_ids() {
        let build = BuildHasherDefault::<IdHasher>::default();
        let (mut low, mut top) = ([0u32; 256], [0u32; 128]);
        for id in 0..256 * 64u64 {
            let h = build.hash_one(id);
            low[(h & 255) as usize] += 1;
            top[(h >> 57) as usize] += 1;
        }
        assert!(low.iter().all(|&n| (32..=96).contains(&n)), "{low:?}");
        assert!(top.iter().all(|&n| (64..=192).contains(&n)), "{top:?}");
    }
}
