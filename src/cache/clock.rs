//! Time, injectable so expiry tests do not sleep.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time for expiry (time to live, time to idle) and recency.
///
/// Times are persisted with disk entries, so a clock reports milliseconds since the Unix
/// epoch. The default is [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> u64;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A clock that moves only when told to: for tests of expiry without sleeping.
///
/// ```
/// use std::{sync::Arc, time::Duration};
/// use streamcache::cache::{Clock, ManualClock};
///
/// let clock = Arc::new(ManualClock::new());
/// let t0 = clock.now_millis();
/// clock.advance(Duration::from_secs(5));
/// assert_eq!(clock.now_millis(), t0 + 5_000);
/// ```
#[derive(Debug)]
pub struct ManualClock {
    now: AtomicU64,
}

impl ManualClock {
    /// A clock set to the current system time.
    pub fn new() -> Self {
        ManualClock {
            now: AtomicU64::new(SystemClock.now_millis()),
        }
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.now.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> u64 {
        self.now.load(Ordering::SeqCst)
    }
}

impl<C: Clock + ?Sized> Clock for Arc<C> {
    fn now_millis(&self) -> u64 {
        (**self).now_millis()
    }
}
