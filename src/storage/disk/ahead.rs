//! Verify-ahead: a small process-wide pool of threads that check the blocks a sequential
//! reader is about to reach, so that the reader finds them checked and reads them straight
//! from the file, while the hashing runs on another core.
//!
//! Invariants: a block is marked checked only by [`Check::verify_ahead`], under the same rules
//! as a reader's own check (its hash matched under the current epoch); a block that fails, or
//! that a helper never got to, is left unchecked, so the reader checks it itself when it gets
//! there and a mismatch is its read error, never data. At most `cores - 1` helpers run
//! (at least one), started on demand and stopping after `IDLE` without work; at most `QUEUE`
//! blocks wait (beyond that the oldest request is dropped: its reader checks that block
//! itself). A job holds its blob's file and check weakly: it keeps no file open, and the
//! blocks of a blob whose readers are all gone are skipped.
//!
//! Helpers take the newest request first. A sequential reader asks for the block `AHEAD`
//! past its own at each block, so the helper checks the far blocks while the reader checks
//! the near ones itself, straight into its caller's buffer (cheaper than serving a block a
//! helper checked, which the reader reads a second time); oldest-first would have the helper
//! on the very block the reader comes to next, leaving it to check blocks it reads twice.

use std::collections::VecDeque;
use std::fs::File;
use std::sync::{Condvar, LazyLock, Mutex, Weak};
use std::time::Duration;

use super::reader::Check;

/// How many blocks ahead of a sequential read are handed to the helpers (4 MiB).
pub(super) const AHEAD: u64 = 4;
/// Blocks waiting for a helper, process-wide.
const QUEUE: usize = 64;
/// A helper without work for this long stops (another starts when work comes).
const IDLE: Duration = Duration::from_secs(2);
/// The piece of a block a helper reads and hashes at a time: small enough to stay in the
/// core's cache between the read and the hash.
pub(super) const PIECE: usize = 64 << 10;

/// One block to check.
pub(super) struct Job {
    pub(super) file: Weak<File>,
    pub(super) check: Weak<Check>,
    pub(super) block: u64,
}

struct Pool {
    state: Mutex<State>,
    work: Condvar,
    /// Most helpers at once: one per core but the reader's own.
    max: usize,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Helpers alive.
    threads: usize,
    /// Helpers waiting for a job.
    idle: usize,
}

static POOL: LazyLock<Pool> = LazyLock::new(|| Pool {
    state: Mutex::default(),
    work: Condvar::new(),
    max: std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
});

/// Queues `jobs` for the helpers (dropping the oldest waiting ones when the queue is full),
/// starting one if none is waiting and fewer than the most are running.
pub(super) fn submit(jobs: impl IntoIterator<Item = Job>) {
    let pool = &*POOL;
    let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
    let mut added = 0;
    for job in jobs {
        if st.jobs.len() >= QUEUE {
            st.jobs.pop_front();
        }
        st.jobs.push_back(job);
        added += 1;
    }
    if added == 0 {
        return;
    }
    if st.idle == 0 && st.threads < pool.max {
        st.threads += 1;
        let spawned = std::thread::Builder::new()
            .name("streamcache-verify".into())
            .spawn(helper);
        if spawned.is_err() {
            // No helper: the readers check their blocks themselves.
            st.threads -= 1;
        }
    }
    drop(st);
    for _ in 0..added {
        pool.work.notify_one();
    }
}

/// Gives a helper's place back when it stops, also by a panic.
struct Leaving;

impl Drop for Leaving {
    fn drop(&mut self) {
        let mut st = POOL.state.lock().unwrap_or_else(|e| e.into_inner());
        st.threads -= 1;
    }
}

fn helper() {
    let _leaving = Leaving;
    let mut buf = Vec::new();
    while let Some(job) = next_job() {
        if let (Some(check), Some(file)) = (job.check.upgrade(), job.file.upgrade()) {
            check.verify_ahead(&file, job.block, &mut buf);
        }
    }
}

/// The next job, or `None` once there was none for `IDLE`.
fn next_job() -> Option<Job> {
    let pool = &*POOL;
    let mut st = pool.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(job) = st.jobs.pop_back() {
            return Some(job);
        }
        st.idle += 1;
        let (guard, wait) = pool
            .work
            .wait_timeout(st, IDLE)
            .unwrap_or_else(|e| e.into_inner());
        st = guard;
        st.idle -= 1;
        if wait.timed_out() && st.jobs.is_empty() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Helpers stay within their bound however many jobs come in.
    #[test]
    fn helpers_stay_bounded() {
        let c = Arc::new(Check::new(0, Vec::new(), None));
        let file = Arc::new(tempfile::tempfile().unwrap());
        for _ in 0..10 {
            submit((0..2 * QUEUE as u64).map(|block| Job {
                file: Arc::downgrade(&file),
                check: Arc::downgrade(&c),
                block,
            }));
            let st = POOL.state.lock().unwrap();
            assert!(st.threads <= POOL.max, "{} helpers", st.threads);
            assert!(st.jobs.len() <= QUEUE);
        }
    }
}
