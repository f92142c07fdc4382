//! The background threads that do the blocking part of removal and eviction.
//!
//! Requests never wait for them: `remove`, eviction decisions and aborted writers only queue
//! work. The **reaper** deletes blobs, retries deletions the storage refused, enforces size
//! limits as soon as a write breaks them (it is woken by `finish` and by writers crossing
//! `max_bytes`), and expires entries on a timer. (When writers outrun it by far, finishing
//! writers also evict a couple of entries each, queueing the deletions here; with the
//! builder's memory storage and no policy they evict first, deleting inline, and the reaper
//! only does what they could not: see `Slot::finished`.) The eviction listener runs on a
//! thread of its own, the **notifier**, so that a slow listener never holds up a deletion.
//!
//! Both queues are bounded. When the reaper's is full, the thread that would queue a deletion
//! does it itself (back-pressure on whoever removes faster than the storage deletes); when
//! the notifier's is full, a request thread waits for room (back-pressure on whoever removes
//! faster than the listener keeps up), and the reaper, which must never wait for the
//! listener, parks its notes in order until there is room. Neither thread dies of a panic in
//! user code (a custom `Storage`, `Policy` or listener): the panic is logged and the work
//! goes on.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use super::RemovalCause;
use super::index::{Inner, Listener};
use crate::storage::Storage;

/// Capacity of the reaper's job queue.
pub(crate) const JOB_QUEUE: usize = 4096;
/// Capacity of the notifier's queue.
pub(crate) const NOTE_QUEUE: usize = 4096;
/// First wait before retrying a deletion the storage refused; doubled per failure.
const RETRY_FIRST: Duration = Duration::from_millis(100);
/// Longest wait between two retries of one deletion.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the reaper tries to hand over notes that found the notifier's queue full.
const NOTE_RETRY: Duration = Duration::from_millis(20);

/// Work for the reaper thread.
#[derive(Debug)]
pub(crate) enum Job {
    /// Delete a committed blob.
    Delete(Doomed),
    /// Limits may be exceeded: evict.
    Maintain,
    /// Finish every job queued before this one, run maintenance, then reply (after the
    /// listener calls queued so far, when there is a listener).
    Sync(Sender<()>),
    /// Stop.
    Shutdown,
}

/// Work for the notifier thread.
#[derive(Debug)]
pub(crate) enum Note {
    /// Tell the eviction listener.
    Removed(Arc<str>, RemovalCause),
    /// Reply once every note queued before this one is done.
    Sync(Sender<()>),
    /// Stop (after the notes queued before).
    Shutdown,
}

/// A committed blob to delete, with the bytes it holds (they count toward `max_bytes` until
/// it is gone).
#[derive(Debug)]
pub(crate) struct Doomed {
    pub(crate) name: String,
    pub(crate) bytes: u64,
}

/// A deletion that failed, waiting for its next try.
#[derive(Debug)]
struct Retry {
    doomed: Doomed,
    failures: u32,
    due: Instant,
}

/// Deletions not carried out yet: queued, running, or refused by the storage and waiting to
/// be retried. Shared by the cache and the reaper.
#[derive(Debug)]
pub(crate) struct Deletions {
    storage: Arc<dyn Storage>,
    /// Blobs not deleted yet (queued or waiting for a retry). Relaxed: statistics.
    pub(crate) pending: AtomicU64,
    /// Their bytes. Counted toward `max_bytes` (`Inner::over_limits`): a blob still stored
    /// uses the space whether or not its entry is gone. Added before the deletion is queued
    /// (an inline one: once it was refused, see `run_now`), subtracted once it succeeded, so
    /// it never wraps.
    pub(crate) pending_bytes: AtomicU64,
    /// Every refused attempt so far. Relaxed: statistics.
    pub(crate) failures: AtomicU64,
    /// Lock: this mutex (a leaf lock). Refused deletions, retried by the reaper with a
    /// growing delay; each is counted in `pending` until it succeeds.
    retry: Mutex<Vec<Retry>>,
}

impl Deletions {
    pub(crate) fn new(storage: Arc<dyn Storage>) -> Deletions {
        Deletions {
            storage,
            pending: AtomicU64::new(0),
            pending_bytes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            retry: Mutex::default(),
        }
    }

    /// Counts a deletion that is about to be queued or carried out.
    pub(crate) fn begin(&self, name: String, bytes: u64) -> Doomed {
        self.pending.fetch_add(1, Ordering::Relaxed);
        self.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
        Doomed { name, bytes }
    }

    /// Deletes now. On success (or if the blob is already gone) the deletion is done;
    /// otherwise it is logged at error level and filed for a retry by the reaper.
    pub(crate) fn run(&self, doomed: Doomed) {
        self.attempt(doomed, 0);
    }

    /// Deletes `name`, of `bytes` bytes, now, without counting it first: it is counted (and
    /// filed for a retry, as `run` does) only if the storage refuses. A deletion done at once
    /// thus needs no owned name and touches none of the shared counters (two threads
    /// deleting in turn used to pass their cache line back and forth four times each).
    /// The caller has already taken the bytes off `Inner::bytes`: while the deletion runs
    /// they count nowhere, as if it had already succeeded.
    pub(crate) fn run_now(&self, name: &str, bytes: u64) {
        if let Err(error) = remove(&*self.storage, name) {
            let doomed = self.begin(name.to_owned(), bytes);
            self.refused(doomed, 0, &error);
        }
    }

    fn attempt(&self, doomed: Doomed, failures: u32) {
        let Err(error) = remove(&*self.storage, &doomed.name) else {
            self.pending.fetch_sub(1, Ordering::Relaxed);
            self.pending_bytes.fetch_sub(doomed.bytes, Ordering::AcqRel);
            return;
        };
        self.refused(doomed, failures, &error);
    }

    /// Logs a refused deletion (counted in `pending`, after `failures` earlier refusals) and
    /// files it for a retry.
    fn refused(&self, doomed: Doomed, failures: u32, error: &str) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let failures = failures.saturating_add(1);
        let wait = RETRY_FIRST
            .saturating_mul(1 << (failures - 1).min(16))
            .min(RETRY_MAX);
        tracing::error!(
            blob = %doomed.name,
            %error,
            attempt = failures,
            retry_in = ?wait,
            "could not delete a removed blob: it stays stored, counts toward max_bytes, and \
             is retried (if the process ends first, the entry comes back at the next open)"
        );
        self.retry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Retry {
                doomed,
                failures,
                due: Instant::now() + wait,
            });
    }

    /// When the next retry is due, if any.
    fn next_due(&self) -> Option<Instant> {
        let retry = self.retry.lock().unwrap_or_else(|e| e.into_inner());
        retry.iter().map(|r| r.due).min()
    }

    /// Retries the deletions that are due (all of them with `all`).
    fn retry_due(&self, all: bool) {
        let now = Instant::now();
        let due: Vec<Retry> = {
            let mut retry = self.retry.lock().unwrap_or_else(|e| e.into_inner());
            let (due, wait) = std::mem::take(&mut *retry)
                .into_iter()
                .partition(|r| all || r.due <= now);
            *retry = wait;
            due
        };
        for r in due {
            self.attempt(r.doomed, r.failures);
        }
    }
}

/// The thread ids of the reaper and the notifier.
#[derive(Debug, Default)]
pub(crate) struct Threads {
    /// Set by the reaper itself before its first job (see `run`).
    pub(crate) reaper: OnceLock<ThreadId>,
    /// Set by `Cache::start` right after spawning it, before any note can be queued.
    pub(crate) notifier: OnceLock<ThreadId>,
}

impl Threads {
    /// Whether the caller is one of the cache's own threads (which must never wait for
    /// their own queues).
    pub(crate) fn is_own(&self) -> bool {
        let me = std::thread::current().id();
        self.reaper.get() == Some(&me) || self.notifier.get() == Some(&me)
    }

    pub(crate) fn is_notifier(&self) -> bool {
        self.notifier.get() == Some(&std::thread::current().id())
    }
}

pub(crate) fn spawn(
    inner: Weak<Inner>,
    deletions: Arc<Deletions>,
    jobs: Receiver<Job>,
    tick: Duration,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("streamcache-reaper".into())
        .spawn(move || run(&inner, &deletions, &jobs, tick))
}

/// Starts the thread that calls the eviction listener.
pub(crate) fn spawn_notifier(
    listener: Listener,
    notes: Receiver<Note>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("streamcache-listener".into())
        .spawn(move || {
            for note in notes {
                match note {
                    Note::Removed(key, cause) => notify(&listener, &key, cause),
                    Note::Sync(ack) => {
                        let _ = ack.send(());
                    }
                    Note::Shutdown => return,
                }
            }
        })
}

/// Queues `job` for the reaper; `Err` gives it back if the queue is full or the reaper gone.
pub(crate) fn try_queue(jobs: &SyncSender<Job>, job: Job) -> Result<(), Job> {
    jobs.try_send(job).map_err(|e| match e {
        TrySendError::Full(job) | TrySendError::Disconnected(job) => job,
    })
}

/// Jobs handled between two chances to run maintenance: a steady flood of deletions must not
/// postpone eviction, expiry or a `run_pending_tasks` reply for ever.
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
    fn handle(&mut self, job: Job, deletions: &Deletions) -> bool {
        let sync = matches!(job, Job::Sync(_));
        match job {
            Job::Delete(doomed) => deletions.run(doomed),
            Job::Maintain => self.maintain = true,
            Job::Sync(ack) => {
                self.maintain = true;
                self.syncs.push(ack);
            }
            Job::Shutdown => self.stop = true,
        }
        sync
    }

    /// Answers the callers of `run_pending_tasks`: through the notifier when there is one,
    /// so that they return after the listener calls queued before their answer.
    fn answer(self, inner: Option<&Inner>) {
        for ack in self.syncs {
            match inner {
                Some(inner) => inner.reaper_note(Note::Sync(ack)),
                None => {
                    let _ = ack.send(());
                }
            }
        }
    }
}

fn run(inner: &Weak<Inner>, deletions: &Deletions, jobs: &Receiver<Job>, tick: Duration) {
    // The reaper names itself before its first job, so that every job runs as one of the
    // cache's own threads (which never wait for a slow listener). `Cache::start` used to
    // record the id once `spawn` returned, and a job queued before that (by the index
    // loader, say) ran as if on a request thread.
    if let Some(inner) = inner.upgrade() {
        let _ = inner.threads.reaper.set(std::thread::current().id());
    }
    let mut last_pass = Instant::now();
    let mut notes_waiting = false;
    loop {
        let mut round = Round::default();
        let mut wait = tick.saturating_sub(last_pass.elapsed());
        if let Some(due) = deletions.next_due() {
            wait = wait.min(due.saturating_duration_since(Instant::now()));
        }
        if notes_waiting {
            wait = wait.min(NOTE_RETRY);
        }
        let sync = match jobs.recv_timeout(wait) {
            Ok(job) => round.handle(job, deletions),
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        // A bounded batch, so that maintenance below gets its turn however busy the queue; it
        // ends at a `Sync`, whose caller waits for nothing queued after it.
        if !sync {
            for job in jobs.try_iter().take(BATCH) {
                if round.handle(job, deletions) {
                    break;
                }
            }
        }
        deletions.retry_due(round.stop);
        let strong = inner.upgrade();
        notes_waiting = strong
            .as_ref()
            .is_some_and(|inner| inner.flush_notes(false));
        if round.stop {
            // The cache is gone: finish what is queued (readers still open may queue more
            // deletions, which the next open completes), answer every caller and leave.
            for job in jobs.try_iter() {
                round.handle(job, deletions);
            }
            round.answer(strong.as_deref());
            if let Some(inner) = &strong {
                inner.flush_notes(true);
            }
            return;
        }
        // The timer runs maintenance too (expiry), also while jobs keep arriving.
        if !round.maintain && last_pass.elapsed() < tick {
            continue;
        }
        last_pass = Instant::now();
        let Some(inner) = strong else {
            round.answer(None);
            continue;
        };
        // Requests from now on must queue a new job: what they changed may come after this
        // pass looked. The fence pairs with the one in `request_maintenance`: a request that
        // still saw the flag set made its change visible to this pass.
        inner.maintain_pending.store(false, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        // The pass deletes inline: a caller of `run_pending_tasks` returns after its effects,
        // and never waits behind jobs queued after its call. A panic in it (a custom storage
        // or policy) is logged; the reaper lives on, and the next pass tries again.
        let pass = AssertUnwindSafe(|| {
            inner.evict_expired();
            inner.evict_for_size();
            super::reload::checkpoint_if_due(&inner);
        });
        if catch_unwind(pass).is_err() {
            tracing::error!("eviction pass panicked; the reaper carries on");
        }
        round.answer(Some(&inner));
        notes_waiting = inner.flush_notes(false);
    }
}

/// Calls the eviction listener; a panic in it is logged, and the notifier carries on.
pub(crate) fn notify(listener: &Listener, key: &str, cause: RemovalCause) {
    let call = AssertUnwindSafe(|| listener(key, cause));
    if catch_unwind(call).is_err() {
        tracing::error!(%key, "eviction listener panicked");
    }
}

/// Deletes a blob found at open that is not to be loaded (a superseded version, an expired
/// entry, a stray blob); a failure is logged, and the next open tries again.
pub(crate) fn delete_at_open(storage: &dyn Storage, name: &str) {
    if let Err(error) = remove(storage, name) {
        tracing::error!(blob = %name, %error, "could not delete blob");
    }
}

/// Deletes blob `name`; one already gone is no error, and a panic of the storage is one.
fn remove(storage: &dyn Storage, name: &str) -> Result<(), String> {
    match catch_unwind(AssertUnwindSafe(|| storage.remove(name))) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the storage panicked".to_owned()),
    }
}
