//! Eviction: expiry (time to live and to idle) and size eviction (least recently used first,
//! as the policy allows), by the reaper and, when it falls far behind, by finishing writers;
//! with the builder's memory storage and no policy, finishing writers evict first and the
//! reaper is the backstop (`Inner::writers_evict`).
//!
//! Invariants: an entry in use is never evicted for size or idleness (checked under the
//! shard's write lock by the unlink); entries taken out of `lru` but kept are filed back
//! unless they died meanwhile; a panicking policy keeps the entry and never stops the reaper.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::index::Inner;
use super::recency::Recency;
use super::remove::{Deletion, Unless};
use super::slot::Slot;
use super::{EntryInfo, Policy, RemovalCause};

/// How far over `max_entries` the count may go before writers help the reaper evict.
fn help_slack(max: u64) -> u64 {
    (max / 16).max(64)
}

/// The entry count past which writers help the reaper evict: `max` plus the slack,
/// saturating, so it is never below `max` (not even for `max_entries(u64::MAX)`).
pub(super) fn help_threshold(max: u64) -> u64 {
    max.saturating_add(help_slack(max))
}

/// Where `Inner::refile` puts entries back in the recency list.
#[derive(Debug, Clone, Copy)]
pub(super) enum Refile {
    /// First out (the reaper's spared entries: they go once released).
    LeastRecent,
    /// Last out (a helping writer's spared entries: see `help_evict`).
    MostRecent,
}

/// Asks `policy` about a size eviction. A panic counts as "keep" and is logged: it must not
/// take down the reaper, which would leave every later deletion and limit undone.
fn policy_allows(policy: &dyn Policy, entry: &EntryInfo) -> bool {
    let ask = std::panic::AssertUnwindSafe(|| policy.may_evict(entry, RemovalCause::Size));
    std::panic::catch_unwind(ask).unwrap_or_else(|_| {
        tracing::error!(key = %entry.key, "eviction policy panicked; keeping the entry");
        false
    })
}

/// How many in-use entries a helping writer steps over before it gives up: several, so that
/// a few entries in use at the least recently used end (slow readers, writers between filing
/// and closing their entry) cannot stop all help and let writers grow the cache far past
/// `max_entries`.
const HELP_SKIP: usize = 8;

impl Inner {
    /// After a miss indexed a new entry: wakes the reaper if that put the cache over
    /// `max_entries`, unless finishing writers evict (`Inner::writers_evict`) and the excess
    /// is within the helping slack: entries being written, whose `finish` evicts for them.
    pub(crate) fn entry_added(&self) {
        let Some(max) = self.limits.max_entries else {
            return;
        };
        if !self.over_limits()
            || (self.writers_evict
                && self.entries.load(Ordering::Relaxed) as u64 <= help_threshold(max))
        {
            return;
        }
        self.request_maintenance();
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
    pub(super) fn time_expiry(&self, slot: &Slot, now: u64) -> Option<RemovalCause> {
        let finished = slot.finished.load(Ordering::Relaxed);
        if finished == 0 {
            return None; // being written: never expires
        }
        if let Some(at) = self.expires_at(slot)
            && now >= at
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

    /// Time-based eviction: every finished entry past its time to live or idle (the policy is
    /// not consulted: such entries are never served again anyway).
    pub(crate) fn evict_expired(&self) -> usize {
        if self.limits.ttl_ms.is_none()
            && self.limits.tti_ms.is_none()
            && !self.books.own_ttls.load(Ordering::Relaxed)
        {
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

    /// Size eviction: least recently used first, skipping entries in use or that the policy
    /// keeps. Returns how many were evicted.
    pub(crate) fn evict_for_size(&self) -> usize {
        // The recency of loaded entries is not known until the load completes (which then
        // asks for a pass).
        if self.loading.active.load(Ordering::Acquire) {
            return 0;
        }
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
    /// the LRU lock: `finalize` clears `LIVE` before taking it. Without a size limit there is
    /// no list to file them in (see `Inner::lru`).
    pub(super) fn refile(&self, slots: Vec<Arc<Slot>>, end: Refile) {
        if !self.limits.by_size() {
            return;
        }
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

    /// A writer's share of size eviction: up to `n` least recently used entries that nobody
    /// is reading, while the cache is over a limit, their blobs deleted as `deletion` says
    /// (`QueueUnfiled`: by the reaper, no I/O here; `InlineUnfiled` only where deleting is no
    /// I/O, see `Inner::writers_evict`). Entries in use are skipped (up to `HELP_SKIP` of
    /// them).
    ///
    /// `first` is a victim the caller already took out of `lru` (with `first_victim`): it is
    /// evicted first, unless in use.
    pub(super) fn help_evict(&self, n: usize, deletion: Deletion, mut first: Option<Arc<Slot>>) {
        let mut kept = Vec::new();
        let mut evicted = 0;
        while evicted < n && kept.len() < HELP_SKIP {
            let slot = match first.take() {
                Some(slot) => slot,
                None => {
                    if !self.over_limits() {
                        break;
                    }
                    let mut lru = self.lru.lock().unwrap_or_else(|e| e.into_inner());
                    match self.first_victim(&mut lru) {
                        Some(slot) => slot,
                        None => break,
                    }
                }
            };
            if !slot.is_live() {
                continue;
            }
            if self.evict_unless_in_use(slot, deletion, &mut kept) {
                evicted += 1;
            }
        }
        // Back as the most recently used (they are in use): put back at the other end, a
        // run of `HELP_SKIP` entries in use would stop every later writer at the same place.
        if !kept.is_empty() {
            self.refile(kept, Refile::MostRecent);
        }
    }

    /// Under the LRU lock: the least recently used entry, taken out of `lru` (after applying
    /// the buffered hits), for a writer's eviction; none while the index loads (the recency of
    /// the stored entries is not known yet).
    pub(super) fn first_victim(&self, lru: &mut Recency) -> Option<Arc<Slot>> {
        if self.loading.active.load(Ordering::Acquire) {
            return None;
        }
        self.apply_hits(lru);
        lru.pop_lru().map(|(_, slot)| slot)
    }

    /// What the policy sees of `slot` (with `len`, the bytes it holds): as much as can be
    /// read now (an unreadable record gives no creation time and metadata).
    fn info(&self, slot: &Slot, len: u64) -> EntryInfo {
        self.describe(slot, len, self.read_meta(slot))
    }
}

#[cfg(test)]
mod tests {
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
}
