//! The cache's books: the clock (exact and access stamps), the statistics counters, the limits
//! fixed at build time, and the byte accounting checked against them.
//!
//! Invariant: `Inner::bytes` is never less than the sum of the live slots' `accounted`
//! figures (at worst a brief overcount), so it never wraps below zero.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use super::clock::Clock;
use super::index::Inner;
use super::slot::{GONE, Slot};

/// Limits and options fixed at build time.
#[derive(Debug, Clone, Default)]
pub(crate) struct Limits {
    pub(crate) max_entries: Option<u64>,
    pub(crate) max_bytes: Option<u64>,
    pub(crate) ttl_ms: Option<u64>,
    pub(crate) tti_ms: Option<u64>,
}

impl Limits {
    /// Whether anything is ever evicted for size (`max_entries` or `max_bytes`). Without
    /// either, the cache keeps no recency list: no entry would ever be taken from it.
    #[inline]
    pub(crate) fn by_size(&self) -> bool {
        self.max_entries.is_some() || self.max_bytes.is_some()
    }

    /// When an entry finished at `finished` (milliseconds), with its own time to live `own`,
    /// stops being served for its age: the earlier of the cache-wide and its own limit.
    pub(crate) fn expires_at(&self, finished: u64, own: Option<u64>) -> Option<u64> {
        let ttl = match (self.ttl_ms, own) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        ttl.map(|ttl| finished.saturating_add(ttl))
    }
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
    /// Whether some entry may have a time to live of its own (set, never cleared, before
    /// the first such entry is finished; with an `Expiry`, from the start): hits then need
    /// the exact time, and the reaper scans for expired entries.
    pub(crate) own_ttls: AtomicBool,
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
    pub(super) fn access_stamp(&self) -> u64 {
        self.access.load(Ordering::Relaxed)
    }

    pub(crate) fn cache(&self) -> Option<Arc<Inner>> {
        self.cache.get().and_then(Weak::upgrade)
    }
}

impl Inner {
    /// Sets `slot`'s contribution to the byte total to `len` (unless it left the index).
    ///
    /// The total grows before the slot's figure (and is undone if that figure moved
    /// meanwhile), so it is never less than the sum of the slots' figures: a removal in
    /// between (`finalize` subtracts the figure) can cause a brief overcount, never a wrap
    /// below zero.
    pub(super) fn account(&self, slot: &Slot, len: u64) {
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
}
