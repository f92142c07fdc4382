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
    // Read by the unit tests and the loom models only.
    #[cfg_attr(not(test), allow(dead_code))]
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
    /// Async waiters, woken on the next change.
    wakers: Wakers,
}

/// An async waiter's place in [`Wakers`]: kept by the waiter (a future, an async reader) from
/// its first `Pending` until it deregisters with [`Progress::deregister`].
#[derive(Debug, Default)]
pub(crate) struct WaitKey(Option<usize>);

/// One slot of [`Wakers`].
#[derive(Debug)]
enum Slot {
    /// Not in use (on the free list).
    Free,
    /// Held by a waiter that is not waiting now (woken, or ready without waiting).
    Idle,
    /// Held by a waiter that waits: its waker, for the next change.
    Armed(Waker),
}

/// The async waiters of a stream: a slab with a free list. Registering, re-registering and
/// deregistering are O(1); its length never exceeds the most waiters registered at once since
/// it was last empty (it is emptied, and its memory returned, when the last one leaves). A
/// cancelled wait leaves at once, so cancelled reads never pile up or slow down a poll.
#[derive(Debug, Default)]
struct Wakers {
    slots: Vec<Slot>,
    /// Indices of `Free` slots.
    free: Vec<usize>,
    /// Slots that are `Armed`.
    armed: usize,
}

impl Wakers {
    /// Arms `key`'s slot (taking one first if it has none) with `waker`. Returns the waker it
    /// replaces, for the caller to drop after unlocking.
    fn arm(&mut self, key: &mut WaitKey, waker: &Waker) -> Option<Waker> {
        let i = match key.0 {
            Some(i) => i,
            None => {
                let i = match self.free.pop() {
                    Some(i) => i,
                    None => {
                        self.slots.push(Slot::Free);
                        self.slots.len() - 1
                    }
                };
                self.slots[i] = Slot::Idle;
                key.0 = Some(i);
                i
            }
        };
        match &mut self.slots[i] {
            Slot::Armed(w) if w.will_wake(waker) => None,
            Slot::Armed(w) => Some(std::mem::replace(w, waker.clone())),
            slot => {
                debug_assert!(matches!(slot, Slot::Idle), "armed a free slot");
                *slot = Slot::Armed(waker.clone());
                self.armed += 1;
                None
            }
        }
    }

    /// Gives `key`'s slot back. Returns its waker if it was armed, for the caller to drop
    /// after unlocking.
    fn remove(&mut self, key: &mut WaitKey) -> Option<Waker> {
        let i = key.0.take()?;
        let old = std::mem::replace(&mut self.slots[i], Slot::Free);
        debug_assert!(!matches!(old, Slot::Free), "deregistered a free slot");
        if self.held() == 1 {
            // Nobody left: return the memory (so a burst of waiters does not stay allocated).
            self.slots = Vec::new();
            self.free = Vec::new();
        } else {
            self.free.push(i);
        }
        match old {
            Slot::Armed(w) => {
                self.armed -= 1;
                Some(w)
            }
            _ => None,
        }
    }

    /// Slots held by waiters (not `Free`).
    fn held(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes every armed waker out (their slots stay with their waiters, idle).
    fn take_armed(&mut self) -> Vec<Waker> {
        if self.armed == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(self.armed);
        for slot in &mut self.slots {
            if let Slot::Armed(_) = slot
                && let Slot::Armed(w) = std::mem::replace(slot, Slot::Idle)
            {
                out.push(w);
            }
        }
        self.armed = 0;
        out
    }
}

/// Shared progress of one stream.
///
/// `repr(C)`, hot fields first: a hit touches `refs` and `status` right after the stream's
/// `Arc` count (see `Shared`), so they share its cache line.
#[derive(Debug)]
#[repr(C)]
pub(crate) struct Progress {
    /// Live readers plus the writer while it is open, with the `CLOSED` bit once the stream is
    /// closed to new readers. Lock-free: acquiring a reader is one compare-and-swap that fails
    /// once `CLOSED` is set; `CLOSED` is set (with `AcqRel`) only after `State::closed` holds
    /// the reason. A release that drops the count to zero while `CLOSED` is set takes the lock
    /// and signals `cond`, for `close_and_wait_unused`.
    refs: AtomicUsize,
    /// Lock-free copy of `State::status`'s code (`OPEN`, `FINISHED`, `FAILED`); same rule.
    status: AtomicU8,
    /// Lock-free copy of `State::len`. Written only with `state` held; readers load it after
    /// `status` with `Acquire`.
    len: AtomicU64,
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
                wakers: Wakers::default(),
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

    /// Wakes every waiter after a change made under `st`, which it releases first: sleepers
    /// recheck under the lock, and wakers (foreign code) never run, nor are dropped, while it
    /// is held.
    fn wake(&self, mut st: MutexGuard<'_, State>) {
        let notify = st.sleepers > 0;
        let wakers = st.wakers.take_armed();
        drop(st);
        if notify {
            self.cond.notify_all();
        }
        for w in wakers {
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
        self.wake(st);
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
        self.wake(st);
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
    #[inline]
    pub(crate) fn acquire(&self) -> Result<(), Option<Cause>> {
        let mut cur = self.refs.load(Ordering::Acquire);
        loop {
            if cur & CLOSED != 0 {
                return Err(self.closing_reason());
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

    /// Why the stream was closed to new readers (off the hot path of `acquire`).
    #[cold]
    #[inline(never)]
    fn closing_reason(&self) -> Option<Cause> {
        self.lock().closed.clone().flatten()
    }

    /// Registers a reader for the writer, which holds its own handle (so the count cannot
    /// reach zero meanwhile): as [`acquire`](Self::acquire), but a stream closed with
    /// [`close_except_writer`](Self::close_except_writer) still admits it while it is open.
    /// A removal racing the writer (between a miss and the writer's `reader()`) therefore
    /// never refuses the writer's reader while the writer can still finish.
    pub(crate) fn acquire_by_writer(&self) -> Result<(), Option<Cause>> {
        let Err(cause) = self.acquire() else {
            return Ok(());
        };
        let st = self.lock();
        if st.refuse_writer || !matches!(st.status, Status::Open) {
            return Err(cause);
        }
        // Whatever would refuse it now (a shutdown, a blocking removal, a cancel or any other
        // end) needs the lock we hold. The count is not zero (the writer's handle), so no
        // `close_and_wait_unused` can have returned.
        self.refs.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Drops a reader or the writer. Returns `true` if that was the last handle.
    #[inline]
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
            self.wake(self.lock());
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
    /// stream has ended; otherwise arms `key`'s slot (taking one if it has none) with `cx`'s
    /// waker for the next change. The waiter must [`deregister`](Self::deregister) `key` when
    /// it goes away (a dropped future, a dropped reader).
    pub(crate) fn poll_for(
        &self,
        end: u64,
        cx: &mut Context<'_>,
        key: &mut WaitKey,
    ) -> Poll<Snapshot> {
        let mut st = self.lock();
        if st.len >= end || !matches!(st.status, Status::Open) {
            return Poll::Ready(Snapshot {
                len: st.len,
                status: st.status.clone(),
            });
        }
        let replaced = st.wakers.arm(key, cx.waker());
        drop(st);
        drop(replaced);
        Poll::Pending
    }

    /// Gives back the slot `key` took in [`poll_for`](Self::poll_for), if any (O(1); no lock
    /// if it never waited).
    pub(crate) fn deregister(&self, key: &mut WaitKey) {
        if key.0.is_none() {
            return;
        }
        let old = self.lock().wakers.remove(key);
        drop(old);
    }

    /// Slots of the async waiter list in use (waiters registered and not yet deregistered).
    #[cfg(test)]
    pub(crate) fn waiters(&self) -> usize {
        self.lock().wakers.held()
    }

    /// Armed slots of the async waiter list (waiters whose waker the next change runs),
    /// checked against the slots themselves.
    #[cfg(test)]
    pub(crate) fn armed_waiters(&self) -> usize {
        let st = self.lock();
        let w = &st.wakers;
        let armed = w
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Armed(_)))
            .count();
        let free = w.slots.iter().filter(|s| matches!(s, Slot::Free)).count();
        assert_eq!(armed, w.armed, "armed count");
        assert_eq!(free, w.free.len(), "free list");
        w.armed
    }

    /// Length of the async waiter list, free slots included (its memory).
    #[cfg(test)]
    pub(crate) fn waiter_slots(&self) -> usize {
        self.lock().wakers.slots.len()
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

#[cfg(all(test, not(streamcache_loom)))]
mod tests {
    //! Each condition of the core, pinned without threads where possible (blocking cases run
    //! under a deadline, so a lost wake-up fails instead of hanging).
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize as StdAtomicUsize;
    use std::sync::mpsc;
    use std::task::Wake;
    use std::time::Duration;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(StdAtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    impl Count {
        fn get(&self) -> usize {
            self.0.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    fn counter() -> (Arc<Count>, Waker) {
        let c = Arc::new(Count::default());
        (c.clone(), Waker::from(c))
    }

    /// Polls once with `waker`.
    fn poll(p: &Progress, end: u64, waker: &Waker, key: &mut WaitKey) -> Poll<Snapshot> {
        p.poll_for(end, &mut Context::from_waker(waker), key)
    }

    /// Runs `f` on a thread; fails if it does not return within 20 s (a deadlock).
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        let h = std::thread::spawn(move || {
            let out = f();
            let _ = tx.send(());
            out
        });
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => h.join().unwrap(),
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlock: no return within 20 s"),
        }
    }

    /// Waits until a thread sleeps in `wait_*` (so a later change must wake it).
    fn until_asleep(p: &Progress) {
        for _ in 0..20_000 {
            if p.lock().sleepers > 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("nobody went to sleep");
    }

    #[test]
    fn peek_snapshot_and_failed_follow_the_status() {
        let p = Progress::new_open();
        assert_eq!(p.peek(), (0, OPEN));
        assert!(!p.failed());
        p.publish(3);
        assert_eq!(p.peek(), (3, OPEN));
        assert!(p.end(4, Status::Finished));
        assert_eq!(p.peek(), (4, FINISHED));
        assert!(matches!(p.snapshot().status, Status::Finished));
        assert_eq!(p.snapshot().len, 4);
        assert!(!p.failed());
        let p = Progress::new_finished(9);
        assert_eq!(p.peek(), (9, FINISHED));
        assert_eq!(p.handles(), 0);
        let p = Progress::new_open();
        assert!(p.end(0, Status::Aborted(None)));
        assert_eq!(p.peek().1, FAILED);
        assert!(p.failed());
    }

    #[test]
    fn publish_only_grows_an_open_stream_and_wakes_only_on_growth() {
        let p = Progress::new_open();
        p.publish(5);
        let (count, waker) = counter();
        let mut key = WaitKey::default();
        assert!(poll(&p, 10, &waker, &mut key).is_pending());
        p.publish(5); // no growth: nobody woken
        p.publish(2); // never backwards
        assert_eq!(p.peek().0, 5);
        assert_eq!(count.get(), 0);
        p.publish(6);
        assert_eq!(count.get(), 1);
        assert_eq!(p.peek().0, 6);
        assert!(p.end(7, Status::Finished));
        p.publish(8); // after the end: nothing changes
        assert_eq!(p.peek().0, 7);
        assert_eq!(p.snapshot().len, 7);
        p.deregister(&mut key);
    }

    #[test]
    fn end_happens_once_except_a_cancel_after_a_finish() {
        let cancelled = || Status::Cancelled(None);
        let p = Progress::new_open();
        p.publish(5);
        // An abort keeps the published length; a finish may extend it but never shrinks it.
        assert!(p.end(7, Status::Aborted(None)));
        assert_eq!(p.peek().0, 5);
        assert!(!p.end(9, Status::Finished));
        assert!(
            !p.end(9, cancelled()),
            "a cancel does not end an aborted stream"
        );
        assert!(p.acquire().is_ok(), "an abort does not close");
        assert_eq!(p.peek(), (5, FAILED));

        let p = Progress::new_open();
        p.publish(5);
        assert!(p.end(3, Status::Finished));
        assert_eq!(p.peek(), (5, FINISHED));
        assert!(!p.end(6, Status::Finished));
        assert!(!p.end(6, Status::Aborted(None)));
        assert_eq!(p.peek(), (5, FINISHED));
        assert!(p.acquire().is_ok());
        assert!(p.end(6, cancelled()));
        assert_eq!(p.peek(), (5, FAILED));
        assert!(matches!(p.snapshot().status, Status::Cancelled(_)));
        assert!(p.acquire().is_err(), "a cancel closes");
        assert!(!p.end(6, cancelled()));

        let p = Progress::new_open();
        assert!(p.end(0, cancelled()));
        assert!(!p.end(0, Status::Finished));
    }

    #[test]
    fn end_wakes_async_and_blocked_waiters() {
        let p = Arc::new(Progress::new_open());
        let (count, waker) = counter();
        let mut key = WaitKey::default();
        assert!(poll(&p, 1, &waker, &mut key).is_pending());
        let p2 = p.clone();
        within(move || {
            let t = std::thread::spawn({
                let p = p2.clone();
                move || p.wait_for(1).status
            });
            until_asleep(&p2);
            assert!(p2.end(0, Status::Aborted(None)));
            assert!(matches!(t.join().unwrap(), Status::Aborted(_)));
        });
        assert_eq!(count.get(), 1);
        assert_eq!(p.lock().sleepers, 0);
        p.deregister(&mut key);
    }

    #[test]
    fn acquire_release_and_handles_count() {
        let p = Progress::new_open();
        assert_eq!(p.handles(), 1);
        assert!(p.acquire().is_ok());
        assert!(p.acquire().is_ok());
        assert_eq!(p.handles(), 3);
        assert!(!p.release());
        p.close(Some(Arc::new(crate::stream::Closing("shut"))));
        assert_eq!(p.handles(), 2, "CLOSED is not a handle");
        let cause = p.acquire().unwrap_err().expect("a cause");
        assert_eq!(cause.to_string(), "shut");
        assert_eq!(p.handles(), 2, "a refused reader is not counted");
        assert!(!p.release());
        assert!(p.release(), "the last handle");
        assert_eq!(p.handles(), 0);
        // First reason wins.
        p.close(Some(Arc::new(crate::stream::Closing("again"))));
        assert_eq!(p.acquire().unwrap_err().unwrap().to_string(), "shut");
    }

    /// A release wakes nobody, except the last one of a closed stream (for a blocking
    /// removal): no spurious wake-ups of async waiters on every reader's drop.
    #[test]
    fn only_the_last_release_of_a_closed_stream_wakes() {
        let (count, waker) = counter();
        let mut key = WaitKey::default();
        // Not closed: even the last release wakes nobody.
        let p = Progress::new_open();
        assert!(poll(&p, 1, &waker, &mut key).is_pending());
        assert!(p.release());
        assert_eq!(count.get(), 0);
        p.deregister(&mut key);
        // Closed: only the last release does.
        let p = Progress::new_open();
        p.acquire().unwrap();
        assert!(poll(&p, 1, &waker, &mut key).is_pending());
        p.close(None);
        assert!(!p.release());
        assert_eq!(count.get(), 0);
        assert!(p.release());
        assert_eq!(count.get(), 1);
        p.deregister(&mut key);
    }

    #[test]
    fn last_release_wakes_a_blocking_removal() {
        let p = Arc::new(Progress::new_finished(1));
        p.acquire().unwrap();
        let p2 = p.clone();
        within(move || {
            let t = std::thread::spawn({
                let p = p2.clone();
                move || p.close_and_wait_unused(None)
            });
            until_asleep(&p2);
            assert!(p2.release());
            t.join().unwrap();
            assert_eq!(p2.lock().sleepers, 0);
        });
        assert!(p.acquire().is_err());
        assert!(
            p.acquire_by_writer().is_err(),
            "a blocking removal refuses the writer"
        );
        // Unused already: returns at once.
        within(|| Progress::new_finished(0).close_and_wait_unused(None));
    }

    #[test]
    fn writer_readers_pass_a_removal_only() {
        // A removal spares the writer's readers while the stream is open.
        let p = Progress::new_open();
        p.close_except_writer(None);
        assert!(p.acquire().is_err());
        assert!(p.acquire_by_writer().is_ok());
        assert_eq!(p.handles(), 2);
        // ... not once it has failed.
        assert!(p.end(0, Status::Aborted(None)));
        assert!(p.acquire_by_writer().is_err());
        assert_eq!(p.handles(), 2);
        // A shutdown refuses them, before or after a removal.
        for removed_first in [false, true] {
            let p = Progress::new_open();
            if removed_first {
                p.close_except_writer(None);
            }
            p.close(Some(Arc::new(crate::stream::Closing("shut"))));
            p.close_except_writer(None);
            assert!(p.acquire_by_writer().is_err());
            assert_eq!(p.handles(), 1);
        }
        // So does a cancel.
        let p = Progress::new_open();
        p.close_except_writer(None);
        assert!(p.end(0, Status::Cancelled(None)));
        assert!(p.acquire_by_writer().is_err());
        // Not closed at all: a plain acquire.
        let p = Progress::new_open();
        assert!(p.acquire_by_writer().is_ok());
        assert_eq!(p.handles(), 2);
    }

    #[test]
    fn wait_for_returns_at_once_when_there_is_enough_or_it_ended() {
        within(|| {
            let p = Progress::new_open();
            p.publish(5);
            assert_eq!(p.wait_for(5).len, 5);
            assert_eq!(p.wait_for(0).len, 5);
            assert!(p.end(5, Status::Finished));
            assert_eq!(p.wait_for(100).len, 5, "finished short of the wish");
            let p = Progress::new_open();
            p.end(0, Status::Aborted(None));
            assert!(matches!(p.wait_for(100).status, Status::Aborted(_)));
        });
    }

    #[test]
    fn publish_wakes_a_blocked_waiter() {
        let p = Arc::new(Progress::new_open());
        within(move || {
            let t = std::thread::spawn({
                let p = p.clone();
                move || p.wait_for(2).len
            });
            until_asleep(&p);
            p.publish(1);
            p.publish(3);
            assert_eq!(t.join().unwrap(), 3);
            assert_eq!(p.lock().sleepers, 0);
        });
    }

    #[test]
    fn poll_for_is_ready_with_enough_bytes_or_an_end() {
        let p = Progress::new_open();
        let (count, waker) = counter();
        let mut key = WaitKey::default();
        p.publish(5);
        assert!(matches!(poll(&p, 5, &waker, &mut key), Poll::Ready(s) if s.len == 5));
        assert_eq!(p.waiters(), 0, "ready without taking a slot");
        assert!(poll(&p, 6, &waker, &mut key).is_pending());
        assert_eq!((p.waiters(), p.armed_waiters()), (1, 1));
        p.publish(6);
        assert_eq!(count.get(), 1);
        assert_eq!(
            (p.waiters(), p.armed_waiters()),
            (1, 0),
            "woken: idle, still held"
        );
        assert!(poll(&p, 6, &waker, &mut key).is_ready());
        assert!(poll(&p, 100, &waker, &mut key).is_pending());
        assert!(p.end(6, Status::Finished));
        assert_eq!(count.get(), 2);
        let ready = poll(&p, 100, &waker, &mut key);
        assert!(
            matches!(ready, Poll::Ready(s) if s.len == 6 && matches!(s.status, Status::Finished))
        );
        p.deregister(&mut key);
        assert_eq!((p.waiters(), p.waiter_slots()), (0, 0));
        p.deregister(&mut key); // twice is harmless
    }

    #[test]
    fn repoll_replaces_the_waker_in_its_own_slot() {
        let p = Progress::new_open();
        let (old, old_waker) = counter();
        let (new, new_waker) = counter();
        let mut key = WaitKey::default();
        assert!(poll(&p, 1, &old_waker, &mut key).is_pending());
        assert!(poll(&p, 1, &old_waker, &mut key).is_pending());
        assert!(poll(&p, 1, &new_waker, &mut key).is_pending());
        assert_eq!((p.waiters(), p.armed_waiters()), (1, 1));
        p.publish(1);
        assert_eq!((old.get(), new.get()), (0, 1));
        p.deregister(&mut key);
    }

    #[test]
    fn slots_are_reused_and_freed() {
        let p = Progress::new_open();
        let (count, waker) = counter();
        let mut keys: Vec<WaitKey> = (0..3).map(|_| WaitKey::default()).collect();
        for k in &mut keys {
            assert!(poll(&p, 1, &waker, k).is_pending());
        }
        assert_eq!(
            (p.waiters(), p.armed_waiters(), p.waiter_slots()),
            (3, 3, 3)
        );
        // A waiter that leaves gives its slot to the next one.
        p.deregister(&mut keys[1]);
        assert_eq!(
            (p.waiters(), p.armed_waiters(), p.waiter_slots()),
            (2, 2, 3)
        );
        let mut late = WaitKey::default();
        assert!(poll(&p, 1, &waker, &mut late).is_pending());
        assert_eq!(late.0, Some(1));
        assert_eq!((p.waiters(), p.waiter_slots()), (3, 3));
        // The others still get their wake-up.
        p.publish(1);
        assert_eq!(count.get(), 3);
        assert_eq!(p.armed_waiters(), 0);
        p.deregister(&mut keys[0]);
        p.deregister(&mut late);
        assert_eq!(p.waiter_slots(), 3, "one left: the memory stays");
        p.deregister(&mut keys[2]);
        assert_eq!((p.waiters(), p.waiter_slots()), (0, 0));
    }

    /// Regression: cancelled waits stayed in the list until the next change.
    #[test]
    fn cancelled_waits_leave_nothing_behind() {
        let p = Progress::new_open();
        let (live, live_waker) = counter();
        let mut live_key = WaitKey::default();
        assert!(poll(&p, 1, &live_waker, &mut live_key).is_pending());
        for _ in 0..10_000 {
            let (_, waker) = counter(); // a new task every time: no `will_wake` match
            let mut key = WaitKey::default();
            assert!(poll(&p, 1, &waker, &mut key).is_pending());
            p.deregister(&mut key);
        }
        assert_eq!((p.waiters(), p.armed_waiters()), (1, 1));
        assert!(p.waiter_slots() <= 2);
        p.publish(1);
        assert_eq!(live.get(), 1);
        p.deregister(&mut live_key);
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
    /// publish or finish racing with the registration is never lost; re-polls after a wake
    /// reuse the task's slot, and deregistering empties the list.
    #[test]
    fn async_waiter_is_woken() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let task = thread::spawn(move || {
                let mut key = WaitKey::default();
                let len = block_on(|cx| p2.poll_for(2, cx, &mut key)).len;
                assert!(p2.waiters() <= 1);
                p2.deregister(&mut key);
                len
            });
            p.publish(1);
            p.end(2, Status::Finished);
            assert_eq!(task.join().unwrap(), 2);
            assert_eq!(p.waiters(), 0);
            assert_eq!(p.armed_waiters(), 0);
        });
    }

    /// A waiter that gives up (its future dropped) while a publish wakes: the other waiter is
    /// still woken (its slot is neither lost nor taken by the leaver), and the list ends empty.
    #[test]
    fn waiter_dropped_while_publish_wakes() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let quitter = thread::spawn(move || {
                let mut key = WaitKey::default();
                let waker = Waker::noop();
                let _ = p2.poll_for(1, &mut Context::from_waker(waker), &mut key);
                p2.deregister(&mut key);
            });
            let p3 = p.clone();
            let stayer = thread::spawn(move || {
                let mut key = WaitKey::default();
                let len = block_on(|cx| p3.poll_for(1, cx, &mut key)).len;
                p3.deregister(&mut key);
                len
            });
            p.publish(1);
            quitter.join().unwrap();
            assert_eq!(stayer.join().unwrap(), 1);
            assert_eq!(p.waiters(), 0);
            assert_eq!(p.armed_waiters(), 0);
            assert_eq!(p.waiter_slots(), 0, "emptied: memory returned");
        });
    }

    /// A waiter re-polled with another waker (a task moved, a `select!`): the new waker
    /// replaces the old one in its slot, so the wake-up reaches the task that waits now.
    #[test]
    fn repoll_with_new_waker_is_woken() {
        loom::model(|| {
            let p = Arc::new(Progress::new_open());
            let p2 = p.clone();
            let task = thread::spawn(move || {
                let mut key = WaitKey::default();
                let first = p2.poll_for(2, &mut Context::from_waker(Waker::noop()), &mut key);
                let len = match first {
                    Poll::Ready(snap) => snap.len,
                    Poll::Pending => block_on(|cx| p2.poll_for(2, cx, &mut key)).len,
                };
                p2.deregister(&mut key);
                len
            });
            p.publish(2);
            assert_eq!(task.join().unwrap(), 2);
            assert_eq!(p.waiters(), 0);
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
}
