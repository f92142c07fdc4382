//! The progress/wake core of a stream: how much is published, how the stream ended, who waits.
//!
//! This is the only place where threads wait on each other. It knows nothing about storage:
//! the writer publishes lengths, readers wait for lengths. It is small on purpose so that
//! `loom` can check it exhaustively (`RUSTFLAGS="--cfg streamcache_loom" cargo test --lib
//! loom`).
//!
//! Fast path: readers load `status` then `len` without locking. The writer changes both only
//! while holding `state` and stores `len` before `status`, so a reader that sees a final
//! status also sees the final length.

use std::task::{Context, Poll, Waker};

use crate::error::Cause;
use crate::sync::{AtomicU8, AtomicU64, AtomicUsize, Condvar, Mutex, MutexGuard, Ordering};

/// How a stream stands.
#[derive(Debug, Clone)]
pub(crate) enum Status {
    /// Being written.
    Open,
    /// Finished: `len` is final.
    Finished,
    /// The writer gave up; readers fail.
    Aborted(Option<Cause>),
    /// Forcibly closed; readers and writer fail.
    Cancelled(Option<Cause>),
}

/// `Progress::refs`: closed to new readers.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// Status codes of `Progress::peek`.
pub(crate) const OPEN: u8 = 0;
pub(crate) const FINISHED: u8 = 1;
pub(crate) const FAILED: u8 = 2;

impl Status {
    fn code(&self) -> u8 {
        match self {
            Status::Open => OPEN,
            Status::Finished => FINISHED,
            Status::Aborted(_) | Status::Cancelled(_) => FAILED,
        }
    }
}

/// What a waiter learns when it wakes.
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    #[cfg_attr(not(streamcache_loom), allow(dead_code))]
    pub(crate) len: u64,
    pub(crate) status: Status,
}

#[derive(Debug)]
struct State {
    /// Published length; mirrors `Progress::len`.
    len: u64,
    status: Status,
    /// `Some` once the stream is closed to new readers (shutdown, removal, cancel), with the
    /// reason given.
    closed: Option<Option<Cause>>,
    /// Whether the writer's own readers are refused too (shutdown, cancel, blocking removal);
    /// a non-blocking removal spares them while the stream is open.
    refuse_writer: bool,
    /// Threads blocked in `wait_*` (to skip `notify_all` when nobody waits).
    sleepers: usize,
    /// Async waiters to wake on the next change.
    wakers: Vec<Waker>,
}

/// Shared progress of one stream.
#[derive(Debug)]
pub(crate) struct Progress {
    /// Lock-free copy of `State::len`. Written only with `state` held; readers load it after
    /// `status` with `Acquire`.
    len: AtomicU64,
    /// Lock-free copy of `State::status`'s code (`OPEN`, `FINISHED`, `FAILED`); same rule.
    status: AtomicU8,
    /// Live readers plus the writer while it is open, with the `CLOSED` bit once the stream is
    /// closed to new readers. Lock-free: acquiring a reader is one compare-and-swap that fails
    /// once `CLOSED` is set; `CLOSED` is set (with `AcqRel`) only after `State::closed` holds
    /// the reason. A release that drops the count to zero while `CLOSED` is set takes the lock
    /// and signals `cond`, for `close_and_wait_unused`.
    refs: AtomicUsize,
    /// Lock: this mutex. Invariant: `len`/`status` above always equal the fields inside once
    /// the lock is released; `len` never decreases; `status` leaves `Open` at most once.
    state: Mutex<State>,
    /// Signalled (with `state`) whenever `len`, `status` or `handles` change in a way a sleeper
    /// may wait for (closing alone wakes nobody: no one waits for it).
    cond: Condvar,
}

impl Progress {
    /// A new open stream with one handle (its writer).
    pub(crate) fn new_open() -> Self {
        Self::with(Status::Open, 0, 1)
    }

    /// A stream that is already finished at `len` (a committed blob), with no handles.
    pub(crate) fn new_finished(len: u64) -> Self {
        Self::with(Status::Finished, len, 0)
    }

    fn with(status: Status, len: u64, handles: usize) -> Self {
        Progress {
            len: AtomicU64::new(len),
            status: AtomicU8::new(status.code()),
            refs: AtomicUsize::new(handles),
            state: Mutex::new(State {
                len,
                status,
                closed: None,
                refuse_writer: false,
                sleepers: 0,
                wakers: Vec::new(),
            }),
            cond: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lock-free: the published length and whether the stream is still open, finished or failed.
    /// Returns `(len, code)`.
    #[inline]
    pub(crate) fn peek(&self) -> (u64, u8) {
        let status = self.status.load(Ordering::Acquire);
        (self.len.load(Ordering::Acquire), status)
    }

    /// Whether the stream has failed (aborted or cancelled), lock-free.
    #[inline]
    pub(crate) fn failed(&self) -> bool {
        self.status.load(Ordering::Acquire) == FAILED
    }

    /// A consistent snapshot (takes the lock).
    pub(crate) fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        Snapshot {
            len: st.len,
            status: st.status.clone(),
        }
    }

    fn wake(&self, st: &mut State) {
        if st.sleepers > 0 {
            self.cond.notify_all();
        }
        for w in st.wakers.drain(..) {
            w.wake();
        }
    }

    /// Writer: `len` bytes are now readable. Wakes every waiter.
    pub(crate) fn publish(&self, len: u64) {
        let mut st = self.lock();
        if !matches!(st.status, Status::Open) || len <= st.len {
            return;
        }
        st.len = len;
        self.len.store(len, Ordering::Release);
        self.wake(&mut st);
    }

    /// Ends the stream (once): `Finished` at `len`, or failed. A cancel may also end a
    /// finished stream. Returns `false` if it had already ended (then nothing changes).
    pub(crate) fn end(&self, len: u64, status: Status) -> bool {
        let mut st = self.lock();
        let may = matches!(
            (&st.status, &status),
            (Status::Open, _) | (Status::Finished, Status::Cancelled(_))
        );
        if !may {
            return false;
        }
        if matches!(status, Status::Finished) && len > st.len {
            st.len = len;
            self.len.store(len, Ordering::Release);
        }
        if let Status::Cancelled(cause) = &status {
            self.mark_closed(&mut st, cause.clone(), true);
        }
        self.status.store(status.code(), Ordering::Release);
        st.status = status;
        self.wake(&mut st);
        true
    }

    /// Records the closing reason (first one wins) and whether the writer's readers are
    /// refused too (once refused, always), then sets `CLOSED`.
    fn mark_closed(&self, st: &mut State, cause: Option<Cause>, refuse_writer: bool) {
        st.closed.get_or_insert(cause);
        st.refuse_writer |= refuse_writer;
        self.refs.fetch_or(CLOSED, Ordering::AcqRel);
    }

    /// Closes the stream to new readers with `cause` (first reason wins), the writer's own
    /// included. Existing readers go on.
    pub(crate) fn close(&self, cause: Option<Cause>) {
        let mut st = self.lock();
        self.mark_closed(&mut st, cause, true);
    }

    /// Closes the stream to new readers with `cause` (first reason wins), except those the
    /// writer opens while the stream is open ([`acquire_by_writer`](Self::acquire_by_writer)):
    /// a removed entry's writer may still finish, and its readers get every byte.
    pub(crate) fn close_except_writer(&self, cause: Option<Cause>) {
        let mut st = self.lock();
        self.mark_closed(&mut st, cause, false);
    }

    /// Registers a new reader. Fails with the closing reason if the stream is closed.
    pub(crate) fn acquire(&self) -> Result<(), Option<Cause>> {
        let mut cur = self.refs.load(Ordering::Acquire);
        loop {
            if cur & CLOSED != 0 {
                return Err(self.lock().closed.clone().flatten());
            }
            match self
                .refs
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(()),
                Err(now) => cur = now,
            }
        }
    }

    /// Registers a reader for the writer, which holds its own handle (so the count cannot
    /// reach zero meanwhile): as [`acquire`](Self::acquire), but a stream closed with
    /// [`close_except_writer`](Self::close_except_writer) still admits it while it is open.
    /// Regression: a `Cache::remove` racing `get_or_produce` (between the miss and the
    /// writer's `reader()`) made the writer's reader fail with `Closed` although the writer
    /// went on to finish.
    pub(crate) fn acquire_by_writer(&self) -> Result<(), Option<Cause>> {
        let Err(cause) = self.acquire() else {
            return Ok(());
        };
        let st = self.lock();
        if st.refuse_writer || !matches!(st.status, Status::Open) {
            return Err(cause);
        }
        // A cancel, the only other way to refuse, needs the lock we hold.
        self.refs.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Drops a reader or the writer. Returns `true` if that was the last handle.
    pub(crate) fn release(&self) -> bool {
        // SeqCst, as is `handles`: a cache's size eviction checks the count after publishing
        // that it is over its limit, and the last release checks that flag after this (see
        // `Slot::released`), so one of the two sees the other.
        let prev = self.refs.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(prev & !CLOSED > 0, "released more handles than acquired");
        let last = prev & !CLOSED == 1;
        if last && prev & CLOSED != 0 {
            // Someone may be waiting in `close_and_wait_unused`: taking the lock orders this
            // signal after its check of the count.
            let mut st = self.lock();
            self.wake(&mut st);
        }
        last
    }

    /// Live readers plus the writer while open.
    pub(crate) fn handles(&self) -> usize {
        self.refs.load(Ordering::SeqCst) & !CLOSED
    }

    /// Blocks until at least `end` bytes are published or the stream has ended.
    pub(crate) fn wait_for(&self, end: u64) -> Snapshot {
        let mut st = self.lock();
        while st.len < end && matches!(st.status, Status::Open) {
            st.sleepers += 1;
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            st.sleepers -= 1;
        }
        Snapshot {
            len: st.len,
            status: st.status.clone(),
        }
    }

    /// Async form of [`wait_for`](Self::wait_for): ready once `end` bytes are published or the
    /// stream has ended; otherwise registers `cx`'s waker for the next change.
    pub(crate) fn poll_for(&self, end: u64, cx: &mut Context<'_>) -> Poll<Snapshot> {
        let mut st = self.lock();
        if st.len >= end || !matches!(st.status, Status::Open) {
            return Poll::Ready(Snapshot {
                len: st.len,
                status: st.status.clone(),
            });
        }
        if !st.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            st.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Closes the stream to new readers, then blocks until every handle is released.
    pub(crate) fn close_and_wait_unused(&self, cause: Option<Cause>) {
        let mut st = self.lock();
        self.mark_closed(&mut st, cause, true);
        while self.handles() > 0 {
            st.sleepers += 1;
            st = self.cond.wait(st).unwrap_or_else(|e| e.into_inner());
            st.sleepers -= 1;
        }
    }
}

#[cfg(all(test, streamcache_loom))]
mod loom_tests {
    //! Interleavings of the wake core: a writer (the model's main thread) and one or two
    //! readers, publishes, finish, abort, cancel, removal, and the async waker path. Each
    //! model is kept small enough to be explored exhaustively in seconds. Run with
    //! `RUSTFLAGS="--cfg streamcache_loom" cargo test --release --lib loom`.
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Wakes a parked loom thread (a minimal executor for one future).
    struct Unparker(thread::Thread);

    impl std::task::Wake for Unparker {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }

    /// Polls until ready, parking between polls: a lost wake-up is a deadlock loom reports.
    fn block_on<T>(mut poll: impl FnMut(&mut Context<'_>) -> Poll<T>) -> T {
        let waker = Waker::from(std::sync::Arc::new(Unparker(thread::current())));
        let mut cx = Context::from_waker(&waker);
        loop {
            if let Poll::Ready(v) = poll(&mut cx) {
                return v;
            }
            thread::park();
        }
    }

    /// Waits like a reader that wants everything: until the stream ends, checking that the
    /// length it observes never goes backwards. Returns the last snapshot.
    fn read_to_end(p: &Progress) -> Snapshot {
        let mut seen = 0;
        loop {
            let snap = p.wait_for(seen + 1);
            assert!(snap.len >= seen, "length went backwards");
            seen = snap.len;
            if !matches!(snap.status, Status::Open) {
                return snap;
            }
        }
    }

    /// A waiting reader never misses a publish or the final wake-up, and sees the final
    /// length with `Finished` (`end` may extend the length).
    #[test]
    fn reader_sees_every_publish_then_finish() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            p.acquire().unwrap();
            let p2 = p.clone();
            let reader = thread::spawn(move || {
                let snap = read_to_end(&p2);
                p2.release();
                (snap.len, matches!(snap.status, Status::Finished))
            });
            p.publish(1);
            p.publish(2);
            assert!(p.end(3, Status::Finished));
            p.release();
            assert_eq!(reader.join().unwrap(), (3, true));
            assert_eq!(p.handles(), 0);
        });
    }

    /// Two readers asleep at the same time are both woken (notify_all, sleeper count).
    #[test]
    fn finish_wakes_every_sleeper() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let p = p.clone();
                    thread::spawn(move || read_to_end(&p).len)
                })
                .collect();
            p.publish(1);
            assert!(p.end(1, Status::Finished));
            for r in readers {
                assert_eq!(r.join().unwrap(), 1);
            }
        });
    }

    /// An abort racing with waiting readers always wakes them with the failure, and the
    /// lock-free peek agrees with the locked state.
    #[test]
    fn abort_wakes_waiters() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let p = p.clone();
                    thread::spawn(move || {
                        let snap = p.wait_for(10);
                        assert!(matches!(snap.status, Status::Aborted(_)));
                        assert!(p.failed());
                        snap.len
                    })
                })
                .collect();
            p.publish(2);
            p.end(2, Status::Aborted(None));
            for r in readers {
                assert_eq!(r.join().unwrap(), 2);
            }
        });
    }

    /// A cancel racing a finish: whichever comes first, the stream ends cancelled (a cancel
    /// also ends a finished stream), a finish after a cancel is refused, and a waiting reader
    /// is woken either way.
    #[test]
    fn cancel_races_finish() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let reader = thread::spawn(move || read_to_end(&p2));
            let p3 = p.clone();
            let canceller = thread::spawn(move || p3.end(0, Status::Cancelled(None)));
            let finished = p.end(4, Status::Finished);
            assert!(canceller.join().unwrap(), "cancel is never refused");
            let last = reader.join().unwrap();
            assert!(!matches!(last.status, Status::Open));
            assert!(p.failed());
            assert!(matches!(p.snapshot().status, Status::Cancelled(_)));
            assert!(p.acquire().is_err(), "cancel closes to new readers");
            // If the finish won, its length stands.
            assert_eq!(p.peek().0, if finished { 4 } else { 0 });
        });
    }

    /// Finish racing with the lock-free fast path: a reader that sees `FINISHED` sees the
    /// final length.
    #[test]
    fn peek_sees_final_len_with_finished() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let t = thread::spawn(move || {
                let (len, status) = p2.peek();
                if status == FINISHED {
                    assert_eq!(len, 2);
                }
            });
            p.publish(1);
            p.end(2, Status::Finished);
            t.join().unwrap();
        });
    }

    /// The async path: a task polling `poll_for` registers its waker under the lock, so a
    /// publish or finish racing with the registration is never lost.
    #[test]
    fn async_waiter_is_woken() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let task = thread::spawn(move || block_on(|cx| p2.poll_for(2, cx)).len);
            p.publish(1);
            p.end(2, Status::Finished);
            assert_eq!(task.join().unwrap(), 2);
        });
    }

    /// Blocking removal waits for the last reader's drop, and a reader that races the close
    /// either registers before it (and is waited for) or is refused.
    #[test]
    fn removal_waits_for_last_handle() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let released = Arc::new(loom::sync::atomic::AtomicBool::new(false));
            let (p2, r2) = (p.clone(), released.clone());
            let reader = thread::spawn(move || {
                let acquired = p2.acquire().is_ok();
                if acquired {
                    r2.store(true, Ordering::SeqCst);
                    p2.release();
                }
                acquired
            });
            let p3 = p.clone();
            let writer = thread::spawn(move || {
                p3.end(0, Status::Finished);
                p3.release();
            });
            p.close_and_wait_unused(None);
            // A reader that got in was waited for: its work before `release` is visible now.
            let seen = released.load(Ordering::SeqCst);
            assert_eq!(p.handles(), 0);
            assert!(p.acquire().is_err());
            assert_eq!(reader.join().unwrap(), seen);
            writer.join().unwrap();
        });
    }

    /// The writer's reader racing a removal and a cancel: without a cancel a removal never
    /// refuses it; whatever the order, the count has exactly the handles that were granted.
    #[test]
    fn writer_reader_races_removal_and_cancel() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let remover = thread::spawn(move || p2.close_except_writer(None));
            let p3 = p.clone();
            let canceller = thread::spawn(move || p3.end(0, Status::Cancelled(None)));
            let got = p.acquire_by_writer().is_ok();
            remover.join().unwrap();
            assert!(canceller.join().unwrap());
            assert_eq!(p.handles(), 1 + usize::from(got));
            assert!(p.acquire().is_err());
            assert!(p.acquire_by_writer().is_err(), "cancelled: refused");
        });
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let remover = thread::spawn(move || p2.close_except_writer(None));
            assert!(p.acquire_by_writer().is_ok());
            remover.join().unwrap();
            assert!(p.acquire().is_err());
            assert_eq!(p.handles(), 2);
        });
    }
}
