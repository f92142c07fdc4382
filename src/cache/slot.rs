//! One entry (`Slot`): what the index maps a key to, and the `Observer` of its stream, which
//! tells the cache what becomes of the entry (published bytes, finish, abort, release…).
//!
//! Invariants: `LIVE` is set before the slot enters the index and cleared once, by
//! `finalize`; `LIVE` and `COMMITTED` share one atomic, so exactly one of `finalize` and
//! `finished` deletes a blob committed after its entry was removed. `accounted` is the slot's
//! share of `Inner::bytes` until it becomes `GONE`, after which it never changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use super::books::Books;
use super::evict::help_threshold;
use super::handles::io_out_of_handles;
use super::index::Inner;
use super::meta::EntryMeta;
use super::remove::Deletion;
use super::{EntryInfo, RemovalCause};
use crate::error::{Error, Result};
use crate::stream::Observer;

/// How many entries a finishing writer evicts at most when it restores the limits itself
/// (`Inner::writers_evict`): enough for the entries that other writers added meanwhile,
/// few enough that one `finish` stays short (the reaper does the rest).
const WRITER_EVICTS: usize = 4;

/// `Slot::accounted` once the entry left the index: its bytes no longer count.
pub(super) const GONE: u64 = u64::MAX;

/// `Slot::flags`: in the index. Set before insertion, cleared once by `finalize`.
pub(super) const LIVE: u8 = 1;
/// `Slot::flags`: the blob is committed in storage.
pub(super) const COMMITTED: u8 = 2;
/// `Slot::flags`: read since committed or reloaded (its recency should be persisted).
pub(super) const TOUCHED: u8 = 4;
/// `Slot::flags`: queued in `Inner::idle_open`.
pub(super) const QUEUED_IDLE: u8 = 8;

/// One entry: what the index maps a key to, and the observer of the entry's stream.
///
/// The slot does not hold its stream (the index does, beside it), so the stream's observer
/// pointing back at the slot makes no reference cycle.
///
/// Kept small (one 104-byte allocation): the creation time and user metadata live in the
/// stored record, not here.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(crate) key: Arc<str>,
    pub(crate) id: u64,
    /// The first 128 bits of blake3(key), which name the entry's blob with `id`: kept so that
    /// deleting an evicted entry need not hash its key again (16 bytes per entry for about a
    /// tenth of an insert-and-evict's instructions).
    key_hash: [u8; 16],
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
    /// The entry's own time to live, counted from `finished`, in the compact form of
    /// `encode_ttl` (0 = none). Set by the writer or the `Expiry` before the commit (and at
    /// reload); read lock-free by expiry checks. Fits in the padding after `flags`.
    ttl: AtomicU32,
}

/// `encode_ttl` values with this bit hold whole seconds, the others milliseconds.
const TTL_SECONDS: u32 = 1 << 31;

/// A time to live (milliseconds, at least 1) in 32 bits: exact up to 24.8 days, whole seconds
/// (rounded down, so never served longer than asked) up to 68 years, then 68 years.
fn encode_ttl(ms: u64) -> u32 {
    match u32::try_from(ms) {
        Ok(ms) if ms < TTL_SECONDS => ms.max(1),
        _ => {
            TTL_SECONDS
                | u32::try_from(ms / 1000)
                    .unwrap_or(u32::MAX)
                    .min(!TTL_SECONDS)
        }
    }
}

fn decode_ttl(v: u32) -> Option<u64> {
    match v {
        0 => None,
        v if v & TTL_SECONDS != 0 => Some(u64::from(v & !TTL_SECONDS) * 1000),
        v => Some(u64::from(v)),
    }
}

impl Slot {
    pub(crate) fn new(
        inner: &Inner,
        key: Arc<str>,
        id: u64,
        finished: u64,
        since: u64,
        len: u64,
    ) -> Slot {
        Slot {
            key_hash: key_hash(&key),
            key,
            id,
            books: inner.books.clone(),
            finished: AtomicU64::new(finished),
            last_access: AtomicU64::new(since),
            idle_since: AtomicU64::new(since),
            accounted: AtomicU64::new(len),
            flags: AtomicU8::new(if finished != 0 { COMMITTED } else { 0 }),
            ttl: AtomicU32::new(0),
        }
    }

    /// The entry's own time to live in milliseconds, if it has one.
    pub(crate) fn ttl_ms(&self) -> Option<u64> {
        decode_ttl(self.ttl.load(Ordering::Relaxed))
    }

    /// Gives the entry its own time to live (milliseconds; 0 = none).
    pub(crate) fn set_ttl_ms(&self, ms: u64) {
        if ms == 0 {
            self.ttl.store(0, Ordering::Relaxed);
            return;
        }
        // Expiry checks read the clock on hits from now on.
        if !self.books.own_ttls.load(Ordering::Relaxed) {
            self.books.own_ttls.store(true, Ordering::Relaxed);
        }
        self.ttl.store(encode_ttl(ms), Ordering::Relaxed);
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
        self.name_buf().to_owned()
    }

    /// The blob name without allocating it (deleting an evicted entry's blob needs no owned
    /// copy).
    pub(crate) fn name_buf(&self) -> NameBuf {
        NameBuf::new(&self.key_hash, self.id)
    }
}

/// Length of a blob name: 32 hex digits of the key's hash, '-', 16 of the id.
const NAME_LEN: usize = 32 + 1 + 16;

/// A blob name formatted on the stack; derefs to the `str`.
pub(crate) struct NameBuf([u8; NAME_LEN]);

impl NameBuf {
    fn new(key_hash: &[u8; 16], id: u64) -> NameBuf {
        let mut name = [0u8; NAME_LEN];
        let (hash, rest) = name.split_at_mut(32);
        crate::codec::hex_into(key_hash, hash);
        rest[0] = b'-';
        crate::codec::hex_into(&id.to_be_bytes(), &mut rest[1..]);
        NameBuf(name)
    }
}

impl std::ops::Deref for NameBuf {
    type Target = str;

    fn deref(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits and '-' are ASCII")
    }
}

/// The blob name of version `id` of `key`: 128 bits of blake3(key), then the id.
pub(crate) fn blob_name(key: &str, id: u64) -> String {
    NameBuf::new(&key_hash(key), id).to_owned()
}

/// The first 128 bits of blake3(key).
fn key_hash(key: &str) -> [u8; 16] {
    let mut h = [0u8; 16];
    h.copy_from_slice(&blake3::hash(key.as_bytes()).as_bytes()[..16]);
    h
}

impl Observer for Slot {
    fn blob_name(&self) -> String {
        self.name()
    }

    fn commit_meta(&self, user: &Bytes) -> Vec<u8> {
        let now = self.books.now();
        // Still being written: `idle_since` holds the creation time.
        let created = self.idle_since.load(Ordering::Relaxed);
        if self.ttl_ms().is_none()
            && let Some(cache) = self.books.cache()
            && let Some(expiry) = &cache.expiry
        {
            let info = EntryInfo {
                key: self.key.to_string(),
                len: match self.accounted.load(Ordering::Relaxed) {
                    GONE => 0,
                    len => len,
                },
                created,
                finished: Some(now),
                last_access: now,
                expires: None,
                metadata: user.clone(),
            };
            let asked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                expiry.time_to_live(&info)
            }));
            match asked {
                Ok(Some(ttl)) => self.set_ttl_ms(super::millis(ttl)),
                Ok(None) => {}
                Err(_) => {
                    tracing::error!(key = %self.key, "expiry policy panicked; the entry gets no time to live of its own")
                }
            }
        }
        self.finished.store(now, Ordering::Relaxed);
        self.last_access.store(now, Ordering::Relaxed);
        let ttl = self.ttl_ms().unwrap_or(0);
        EntryMeta::encode_parts(&self.key, [created, now, now, ttl], user)
    }

    fn set_time_to_live(&self, ttl: Duration) {
        self.set_ttl_ms(super::millis(ttl));
    }

    /// This entry's own figures, whatever holds its key by now: its finish time and the
    /// earlier of the cache-wide and its own time to live.
    #[cfg(feature = "shared")]
    fn lifetime(&self) -> Option<(u64, Option<u64>)> {
        let finished = self.finished.load(Ordering::Relaxed);
        if finished == 0 {
            return None;
        }
        let ttl = match self.books.cache() {
            Some(cache) => cache.expires_at(self).map(|at| at.saturating_sub(finished)),
            None => self.ttl_ms(),
        };
        Some((finished, ttl))
    }

    fn remove_requested(&self) -> bool {
        match self.books.cache() {
            Some(cache) => {
                cache.unlink_id(&self.key, self.id, RemovalCause::Explicit);
                true
            }
            None => false,
        }
    }

    fn published(&self, len: u64) -> Result<()> {
        let Some(cache) = self.books.cache() else {
            return Ok(());
        };
        // An entry that alone exceeds `max_bytes` could never be kept: refused as soon as it
        // crosses the limit, so its bytes never pile up in memory or on disk.
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
            cache.delete_blob(&self.name_buf(), len, false);
        }
        // (Its bytes were accounted by `published`, which `finish` calls with the final
        // length before committing.)
        let mut victim = None;
        if cache.limits.by_size() {
            let mut lru = cache.lru.lock().unwrap_or_else(|e| e.into_inner());
            // A writer that evicts takes its first victim under the lock it takes to file its
            // entry: one lock for both, which the two threads of a steady stream of inserts
            // otherwise took in turn, twice each per insert (and the victim's list node, freed
            // here, is the one the entry's node is allocated from).
            if cache.writers_evict && cache.over_limits() {
                victim = cache.first_victim(&mut lru);
            }
            // Checked under the LRU lock: `finalize` clears `LIVE` before taking it.
            if self.is_live() {
                lru.put(self.id, self.clone());
            }
        }
        if victim.is_some() || cache.over_limits() {
            if cache.writers_evict {
                // Deleting is no I/O here: this writer restores the limits itself, and the
                // reaper is woken only for what it could not do (entries in use, a load under
                // way, a large excess).
                cache.help_evict(WRITER_EVICTS, Deletion::InlineUnfiled, victim);
                if cache.over_limits() {
                    cache.request_maintenance();
                }
            } else {
                cache.request_maintenance();
                // The reaper has fallen far behind (a storm of writers, or a slow listener):
                // this writer evicts its share, so the count stays near the limit. Not with a
                // policy, whose calls stay on the reaper.
                if let Some(max) = cache.limits.max_entries
                    && cache.policy.is_none()
                    && cache.entries.load(Ordering::Relaxed) as u64 > help_threshold(max)
                {
                    cache.help_evict(2, Deletion::QueueUnfiled, None);
                }
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
        // An entry that was spared by size eviction because it was in use may go now. Size
        // eviction sets `over_limit` before it looks at any entry; with this load and the
        // handle release both SeqCst, either the pass saw the entry unused or this sees the
        // flag, so a cache left over its limit by entries in use never waits for the next write.
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
