//! The removal path: taking a slot out of the index (`unlink`) and everything that follows
//! (`finalize`: recency, byte count, blob deletion, statistics, the listener).
//!
//! Invariants: a slot leaves the map exactly once, and `finalize` runs exactly once per slot
//! that was in the map, with the open stream that left with it, and without any lock held.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::RemovalCause;
use super::index::{Indexed, Inner};
use super::slot::{COMMITTED, GONE, LIVE, Slot};
use crate::stream::Stream;

/// When `Inner::unlink_as` leaves the entry in place.
#[derive(Debug, Clone, Copy)]
pub(super) enum Unless {
    Never,
    /// A reader or the writer has it open.
    InUse,
    /// In use, or no longer idle past its time to idle at this time (it was used since).
    InUseOrFresh(u64),
}

/// How `finalize` deletes a committed blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Deletion {
    /// Queue a `Delete` job (any thread: requests never do I/O).
    Queue,
    /// Delete it at once (the reaper's own evictions: no job, no second copy of the name).
    Inline,
    /// As `Inline`, for a slot the caller already took out of `lru` (the reaper's size
    /// eviction, and a writer's where deleting is no I/O: `Inner::writers_evict`): it cannot
    /// be filed again (only `finished`, once, files it), so `finalize` skips the LRU lock.
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

impl Inner {
    /// Removes `slot` from the index if it is still there, then finalizes it.
    pub(crate) fn unlink(&self, slot: &Arc<Slot>, cause: RemovalCause) -> bool {
        self.unlink_as(slot, cause, Deletion::Queue, Unless::Never)
    }

    /// `unlink`, deleting the blob as `deletion` says, unless `unless` holds (checked under
    /// the shard's write lock, so no reader can appear between the check and the removal).
    pub(super) fn unlink_as(
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
        // While the index loads, a later look-up of the key must not find this entry's blob
        // (its deletion is queued) and index it again.
        super::reload::settled(self, &slot.key);
        self.entries.fetch_sub(1, Ordering::Relaxed);
        // Without a size limit the recency list is never filled (see `Limits::by_size`).
        if deletion.filed() && self.limits.by_size() {
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
            // (The slot keeps its key's hash: the name costs no hashing.)
            let inline = matches!(deletion, Deletion::Inline | Deletion::InlineUnfiled);
            self.delete_blob(&slot.name_buf(), counted, inline);
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
}
