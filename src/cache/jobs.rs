//! The index's side of the protocol with the background threads: asking the reaper for a
//! maintenance pass or a blob deletion, and the notifier to tell the eviction listener.
//!
//! Invariants: requests never wait for the reaper (a full queue means the caller deletes
//! itself, or a later request asks again); the reaper never waits for the listener (its notes
//! park in `note_overflow`, in order); the notifier calls the listener inline. Only request
//! threads wait, for room in the notifier's queue (back-pressure on a slow listener).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;

use super::RemovalCause;
use super::index::Inner;
use super::reaper::{self, Job, Note};

impl Inner {
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
    /// (back-pressure). Until a queued deletion succeeds its bytes count toward `max_bytes`,
    /// as do those of a refused one, which the reaper retries (`Deletions::run_now`).
    pub(crate) fn delete_blob(&self, name: &str, bytes: u64, inline: bool) {
        if inline || self.threads.is_own() {
            self.deletions.run_now(name, bytes);
            return;
        }
        let doomed = self.deletions.begin(name.to_owned(), bytes);
        if let Err(Job::Delete(doomed)) = reaper::try_queue(&self.jobs, Job::Delete(doomed)) {
            self.deletions.run(doomed);
        }
    }

    /// Tells the eviction listener, on the notifier thread. Waits if the notifier is far
    /// behind (back-pressure), except on the cache's own threads: the notifier calls it
    /// inline, the reaper never waits for the listener.
    pub(super) fn notify(&self, key: &Arc<str>, cause: RemovalCause) {
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
}
