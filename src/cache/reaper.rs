//! The background thread that does the blocking part of removal and eviction.
//!
//! Requests never wait for it: `remove`, eviction decisions and aborted writers only queue
//! jobs. The reaper deletes blobs, calls the eviction listener, enforces size limits as soon
//! as a write breaks them (it is woken by `finish` and by writers crossing `max_bytes`), and
//! expires entries on a timer. (When writers outrun it by far, finishing writers also evict a
//! couple of entries each, queueing the deletions here: see `Slot::finished`.)

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

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

fn run(
    inner: &Weak<Inner>,
    storage: &dyn Storage,
    listener: Option<&Listener>,
    jobs: &Receiver<Job>,
    tick: Duration,
) {
    loop {
        let first = match jobs.recv_timeout(tick) {
            Ok(job) => Some(job),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut maintain = first.is_none();
        let mut acks = Vec::new();
        let mut stop = false;
        let mut next = first;
        loop {
            // Process everything queued; maintenance may queue more, which is drained too.
            while let Some(job) = next.take().or_else(|| jobs.try_recv().ok()) {
                match job {
                    Job::Delete(name) => delete(storage, &name),
                    Job::Notify(key, cause) => {
                        if let Some(listener) = listener {
                            let call = std::panic::AssertUnwindSafe(|| listener(&key, cause));
                            if std::panic::catch_unwind(call).is_err() {
                                tracing::error!(%key, "eviction listener panicked");
                            }
                        }
                    }
                    Job::Maintain => maintain = true,
                    Job::Sync(ack) => {
                        maintain = true;
                        acks.push(ack);
                    }
                    Job::Shutdown => stop = true,
                }
            }
            if !std::mem::take(&mut maintain) {
                break;
            }
            if let Some(inner) = inner.upgrade() {
                // Requests from now on must queue a new job: what they changed may come after
                // this pass looked. The fence pairs with the one in `request_maintenance`: a
                // request that still saw the flag set made its change visible to this pass.
                inner
                    .maintain_pending
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
                inner.evict_expired();
                inner.evict_for_size();
            }
        }
        for ack in acks {
            let _ = ack.send(());
        }
        if stop {
            return;
        }
    }
}

pub(crate) fn delete(storage: &dyn Storage, name: &str) {
    match storage.remove(name) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(blob = %name, error = %e, "could not delete blob"),
    }
}
