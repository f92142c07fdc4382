//! Helpers shared by the integration tests.
#![allow(dead_code, unreachable_pub)]

use std::io::{self, Read};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use streamcache::Reader;
use streamcache::storage::{DiskStorage, MemoryStorage, Storage};
use tempfile::TempDir;

/// How long a blocking test body may run before it counts as a deadlock.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `f` on its own thread and returns its result; panics (failing the test) if it does not
/// return within [`DEADLINE`], and re-raises its panic if it panicked.
pub fn deadline<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    deadline_in(DEADLINE, what, f)
}

/// [`deadline`] with a chosen limit.
pub fn deadline_in<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = thread::Builder::new()
        .name(format!("deadline: {what}"))
        .spawn(move || {
            let out = f();
            let _ = tx.send(());
            out
        })
        .unwrap();
    match rx.recv_timeout(limit) {
        Ok(()) => handle.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(_) => unreachable!("sent before returning"),
            Err(panic) => std::panic::resume_unwind(panic),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not complete within {limit:?} (deadlock?)")
        }
    }
}

/// A computation running on another thread whose completion the test can observe.
pub struct Pending<T> {
    rx: mpsc::Receiver<thread::Result<T>>,
    what: String,
}

/// Starts `f` on a thread; use [`Pending::not_done`] / [`Pending::join`] on the result.
pub fn spawn<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Pending<T> {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name(what.to_owned())
        .spawn(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(out);
        })
        .unwrap();
    Pending {
        rx,
        what: what.to_owned(),
    }
}

impl<T> Pending<T> {
    /// Asserts the computation has not finished after giving it `grace` to (wrongly) do so.
    /// This is a negative check, never used as synchronisation: the test stays correct (only
    /// weaker) if the thread has not even started yet.
    pub fn assert_blocked(&self, grace: Duration) {
        match self.rx.recv_timeout(grace) {
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Ok(_)) => panic!("{}: completed but should still be blocked", self.what),
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{}: thread vanished", self.what),
        }
    }

    /// Waits (up to [`DEADLINE`]) for the result.
    pub fn join(self) -> T {
        match self.rx.recv_timeout(DEADLINE) {
            Ok(Ok(v)) => v,
            Ok(Err(p)) => std::panic::resume_unwind(p),
            Err(e) => panic!("{}: no result within {DEADLINE:?}: {e}", self.what),
        }
    }
}

/// Polls `cond` every millisecond until it holds; fails the test (naming `what`) if it does
/// not within `limit`. For conditions another thread brings about with no event to wait on.
#[track_caller]
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + limit;
    while !cond() {
        assert!(
            std::time::Instant::now() < until,
            "{what}: not within {limit:?}"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Grace period given to a thread that must stay blocked.
pub const BLOCKED_GRACE: Duration = Duration::from_millis(100);

/// The deterministic byte at position `i` of every test stream (not periodic at powers of two).
#[inline]
pub fn byte_at(i: u64) -> u8 {
    let x = (i ^ (i >> 17)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    ((x >> 56) as u8) ^ (i as u8)
}

/// `len` pattern bytes starting at `offset`.
pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| byte_at(offset + i)).collect()
}

/// Index of the first byte of `got` (placed at `offset`) that differs from the pattern.
pub fn first_mismatch(got: &[u8], offset: u64) -> Option<usize> {
    got.iter()
        .enumerate()
        .position(|(i, &b)| b != byte_at(offset + i as u64))
}

/// Asserts `got` equals the pattern at `offset`, reporting the first wrong byte.
#[track_caller]
pub fn assert_pattern(got: &[u8], offset: u64) {
    if let Some(i) = first_mismatch(got, offset) {
        panic!(
            "byte {} (offset {}) is {:#04x}, expected {:#04x}",
            i,
            offset + i as u64,
            got[i],
            byte_at(offset + i as u64)
        );
    }
}

/// The crate error inside an `io::Error` from a reader or writer.
#[track_caller]
pub fn stream_error(e: &io::Error) -> &streamcache::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<streamcache::Error>())
        .unwrap_or_else(|| panic!("io::Error {e:?} does not carry a streamcache::Error"))
}

/// Asserts `e` is (or wraps) `Error::Aborted`.
#[track_caller]
pub fn assert_aborted(e: &io::Error) {
    assert!(
        matches!(stream_error(e), streamcache::Error::Aborted { .. }),
        "expected Aborted, got {e:?}"
    );
    assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
}

/// Asserts `e` is (or wraps) `Error::Closed`.
#[track_caller]
pub fn assert_closed(e: &io::Error) {
    assert!(
        matches!(stream_error(e), streamcache::Error::Closed { .. }),
        "expected Closed, got {e:?}"
    );
}

/// A small deterministic PRNG (xorshift64*), so tests need no extra dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A storage under test, plus whatever must outlive it (its directory).
pub struct Backend {
    pub storage: Arc<dyn Storage>,
    pub _dir: Option<TempDir>,
}

/// A fresh memory storage.
pub fn memory() -> Backend {
    Backend {
        storage: Arc::new(MemoryStorage::new()),
        _dir: None,
    }
}

/// A fresh disk storage in a temporary directory.
pub fn disk() -> Backend {
    let dir = tempfile::tempdir().unwrap();
    Backend {
        storage: Arc::new(DiskStorage::open(dir.path()).unwrap()),
        _dir: Some(dir),
    }
}

/// Reads a reader to its end.
pub fn read_all(r: &mut Reader) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.read_to_end(&mut out)?;
    Ok(out)
}
