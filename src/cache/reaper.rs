//! The background thread that does the blocking part of removal and eviction.
//!
//! Requests never wait for it: `remove`, eviction decisions and aborted writers only queue
//! jobs. The reaper deletes blobs, calls the eviction listener, enforces size limits as soon
//! as a write breaks them (it is woken by `finish` and by writers crossing `max_bytes`), and
//! expires entries on a timer. (When writers outrun it by far, finishing writers also evict a
//! couple of entries each, queueing the deletions here: see `Slot::finished`.)

use std::sync::atomic::{Ordering, fence};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::RemovalCause;
use super::index::{Inner, Job, Listener};
use crate::storage::Storage;

pub(crate) fn spawn(
    inner: Weak<Inner>,
    storage: Arc<dyn Storage>,
    listener: Option<Listener>,
    jobs: Receiver<Job>,
    tick: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("streamcache-reaper".into())
        .spawn(move || run(&inner, &*storage, listener.as_ref(), &jobs, tick))
}

/// Jobs handled between two chances to run maintenance: a steady flood of deletions and
/// notifications must not postpone eviction, expiry or a `run_pending_tasks` reply for ever.
const BATCH: usize = 256;

/// What one round of jobs asked for.
#[derive(Default)]
struct Round {
    maintain: bool,
    syncs: Vec<Sender<()>>,
    stop: bool,
}

impl Round {
    /// Handles `job`; true if it asks for a reply (the round ends there).
    fn handle(&mut self, job: Job, storage: &dyn Storage, listener: Option<&Listener>) -> bool {
        let sync = matches!(job, Job::Sync(_));
        match job {
            Job::Delete(name) => delete(storage, &name),
            Job::Notify(key, cause) => {
                if let Some(listener) = listener {
                    notify(listener, &key, cause);
                }
            }
            Job::Maintain => self.maintain = true,
            Job::Sync(ack) => {
                self.maintain = true;
                self.syncs.push(ack);
            }
            Job::Shutdown => self.stop = true,
        }
        sync
    }
}

fn run(
    inner: &Weak<Inner>,
    storage: &dyn Storage,
    listener: Option<&Listener>,
    jobs: &Receiver<Job>,
    tick: Duration,
) {
    let mut last_pass = Instant::now();
    loop {
        let mut round = Round::default();
        let sync = match jobs.recv_timeout(tick.saturating_sub(last_pass.elapsed())) {
            Ok(job) => round.handle(job, storage, listener),
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // A bounded batch, so that maintenance below gets its turn however busy the queue; it
        // ends at a `Sync`, whose caller waits for nothing queued after it.
        if !sync {
            for job in jobs.try_iter().take(BATCH) {
                if round.handle(job, storage, listener) {
                    break;
                }
            }
        }
        if round.stop {
            // The cache is gone: finish what is queued (readers still open may queue more
            // deletions, which the next open completes), answer every caller and leave.
            for job in jobs.try_iter() {
                round.handle(job, storage, listener);
            }
            for ack in round.syncs {
                let _ = ack.send(());
            }
            return;
        }
        // The timer runs maintenance too (expiry), also while jobs keep arriving.
        if !round.maintain && last_pass.elapsed() < tick {
            continue;
        }
        last_pass = Instant::now();
        let Some(inner) = inner.upgrade() else {
            for ack in round.syncs {
                let _ = ack.send(());
            }
            continue;
        };
        // Requests from now on must queue a new job: what they changed may come after this
        // pass looked. The fence pairs with the one in `request_maintenance`: a request that
        // still saw the flag set made its change visible to this pass.
        inner.maintain_pending.store(false, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // The pass deletes and notifies inline: a caller of `run_pending_tasks` returns after
        // its effects, and never waits behind jobs queued after its call.
        inner.evict_expired();
        inner.evict_for_size();
        for ack in round.syncs {
            let _ = ack.send(());
        }
    }
}

/// Calls the eviction listener; a panic in it is logged, and the reaper carries on.
pub(crate) fn notify(listener: &Listener, key: &str, cause: RemovalCause) {
    let call = std::panic::AssertUnwindSafe(|| listener(key, cause));
    if std::panic::catch_unwind(call).is_err() {
        tracing::error!(%key, "eviction listener panicked");
    }
}

pub(crate) fn delete(storage: &dyn Storage, name: &str) {
    match storage.remove(name) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(blob = %name, error = %e, "could not delete blob"),
    }
}
