//! Recency: the LRU list of finished, live entries and the lock-free ring that batches hits
//! into it.
//!
//! Invariants: a slot is in `lru` only while `LIVE` (checked under the LRU lock; `finalize`
//! clears `LIVE` before taking it). The ring may lose hits (a full, contended ring), which
//! only makes recency approximate; every eviction decision applies the ring first. Without a
//! size limit (`Limits::by_size`) neither the list nor the ring is kept: nothing would ever
//! be evicted from it.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use lru::LruCache;

use super::index::Inner;
use super::slot::{Slot, TOUCHED};

/// Size of `Inner::hit_ring`.
pub(crate) const HIT_RING: usize = 64;

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

impl Inner {
    /// Books a served hit: recency stamp and promotion, and the "touched" mark.
    #[inline]
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

    /// Notes a hit for recency without taking the LRU lock: the id goes into a ring buffer
    /// that is applied to the LRU list when it fills (if the lock is free) and before every
    /// eviction decision. A hit lost to a full, contended ring only makes recency approximate.
    #[inline]
    fn record_hit(&self, id: u64) {
        let i = self.hit_head.fetch_add(1, Ordering::Relaxed);
        if self.limits.by_size() {
            self.hit_ring[i % HIT_RING].store(id + 1, Ordering::Release);
        }
        if (i + 1).is_multiple_of(HIT_RING) {
            self.ring_full();
        }
    }

    /// Every `HIT_RING` hits (out of line: the hit path stays small).
    #[inline(never)]
    fn ring_full(&self) {
        // Keep the access clock close to the real one.
        self.books.now();
        if self.limits.by_size()
            && let Ok(mut lru) = self.lru.try_lock()
        {
            self.apply_hits(&mut lru);
        }
    }

    /// Applies the buffered hits to the LRU list, oldest first. No scan if no hit was
    /// recorded since the last call (every eviction decision calls it: a writer evicting as
    /// it finishes would otherwise read the 64 cells per insert). A hit whose cell was written
    /// after the last scan read it waits for the next hit to be applied, which only makes
    /// recency approximate, as a lost hit does.
    pub(super) fn apply_hits(&self, lru: &mut Recency) {
        let head = self.hit_head.load(Ordering::Acquire);
        if head == self.hits_applied.load(Ordering::Relaxed) {
            return;
        }
        self.hits_applied.store(head, Ordering::Relaxed);
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
}

#[cfg(test)]
mod tests {
    use std::hash::BuildHasher;
    use std::io::Write;

    use super::*;
    use crate::{Cache, Entry};

    fn put_and_hit(cache: &Cache, keys: usize) {
        for i in 0..keys {
            let Entry::Miss(mut w) = cache.get_or_create(&format!("k{i}")).unwrap() else {
                panic!("fresh key")
            };
            w.write_all(b"x").unwrap();
            w.finish().unwrap();
        }
        for _ in 0..3 * HIT_RING {
            for i in 0..keys {
                assert!(cache.get(&format!("k{i}")).unwrap().is_some());
            }
        }
    }

    /// Without a size limit nothing is ever evicted for size, so no recency list is kept
    /// (hits and finishes skip it), while hits are still counted and stamped; with one, every
    /// finished entry is filed.
    #[test]
    fn recency_is_kept_only_with_a_size_limit() {
        let free = Cache::builder().memory().build().unwrap();
        put_and_hit(&free, 5);
        assert_eq!(free.inner.lru.lock().unwrap().len(), 0);
        assert!(
            free.inner
                .hit_ring
                .iter()
                .all(|c| c.load(Ordering::Relaxed) == 0)
        );
        assert_eq!(free.stats().hits, 5 * 3 * HIT_RING as u64);
        let slot = free.inner.slot("k0").unwrap();
        assert!(slot.is_touched());
        assert!(slot.last_access.load(Ordering::Relaxed) > 0);

        for bounded in [
            Cache::builder().memory().max_entries(100).build().unwrap(),
            Cache::builder()
                .memory()
                .max_bytes(1 << 20)
                .build()
                .unwrap(),
        ] {
            put_and_hit(&bounded, 5);
            assert_eq!(bounded.inner.lru.lock().unwrap().len(), 5);
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
