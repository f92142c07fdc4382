//! What the cache reports about its entries, and the user hooks that read those reports:
//! removal causes, entry information and its iterator, statistics, and the `Expiry` and
//! `Policy` traits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::Cache;
use super::index::Slot;

/// Why an entry left the cache (given to the [eviction listener](crate::CacheBuilder::eviction_listener)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RemovalCause {
    /// [`Cache::remove`] or [`Cache::clear`].
    Explicit,
    /// Its time to live passed.
    Expired,
    /// Its time to idle passed.
    Idle,
    /// Evicted to respect `max_entries` / `max_bytes`.
    Size,
    /// Its writer aborted (or was dropped unfinished, or its producer failed).
    Aborted,
    /// Its stored data was found corrupt or missing.
    Corrupt,
}

/// What [`Cache::entry_info`] and [`Cache::iter`] tell of an entry, and what a [`Policy`] and
/// an [`Expiry`] see of one. Times are milliseconds since the Unix epoch, from the cache's
/// [clock](crate::CacheBuilder::clock).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EntryInfo {
    /// The key.
    pub key: String,
    /// Its length in bytes; for an entry still being written, the bytes written so far.
    pub len: u64,
    /// When it was created (its writer started).
    pub created: u64,
    /// When its writer finished it; `None` while it is being written.
    pub finished: Option<u64>,
    /// When a reader was last opened on it (its finish time if none was).
    pub last_access: u64,
    /// When it stops being served for its age: its finish time plus the shorter of the
    /// cache's [time to live](crate::CacheBuilder::time_to_live) and its own
    /// ([`Writer::set_time_to_live`](crate::Writer::set_time_to_live), [`CacheBuilder::expiry`](crate::CacheBuilder::expiry)). `None` if neither applies or
    /// it is being written. (Time to idle comes on top, and depends on future use.)
    pub expires: Option<u64>,
    /// The user metadata its writer attached.
    pub metadata: Bytes,
}

impl EntryInfo {
    /// Whether its writer finished it.
    pub fn is_finished(&self) -> bool {
        self.finished.is_some()
    }
}

/// Computes an entry's own time to live when its writer finishes it, from what is known of
/// it then (its key, length and metadata: a proxy's `Cache-Control: max-age`, say). Like
/// moka's `Expiry`. Set with [`CacheBuilder::expiry`](crate::CacheBuilder::expiry).
///
/// **Contract:** called once per entry, on the writer's thread inside
/// [`Writer::finish`](crate::Writer::finish), before the entry is committed, unless the writer set a time to live
/// itself ([`Writer::set_time_to_live`](crate::Writer::set_time_to_live), which wins). It must not block for long and must
/// not call back into the cache. The result is stored with the entry (it survives a
/// restart) and counts from the entry's finish time; the entry then expires at the earlier
/// of that and the cache-wide [time to live](crate::CacheBuilder::time_to_live). `None` leaves only
/// the cache-wide limits. If it panics, the panic is logged and the entry gets no time to
/// live of its own.
///
/// ```
/// use std::time::Duration;
/// use streamcache::cache::{EntryInfo, Expiry};
///
/// /// Metadata `max-age=N` (seconds) sets the entry's time to live.
/// #[derive(Debug)]
/// struct MaxAge;
///
/// impl Expiry for MaxAge {
///     fn time_to_live(&self, entry: &EntryInfo) -> Option<Duration> {
///         let text = std::str::from_utf8(&entry.metadata).ok()?;
///         let secs = text.strip_prefix("max-age=")?.parse().ok()?;
///         Some(Duration::from_secs(secs))
///     }
/// }
/// ```
pub trait Expiry: Send + Sync + fmt::Debug {
    /// The time to live of `entry`, counted from its finish time; `None` for none of its own.
    fn time_to_live(&self, entry: &EntryInfo) -> Option<Duration>;
}

/// A custom eviction policy: vetoes size evictions the reaper would otherwise make.
///
/// **Contract:** called on the reaper thread, without any cache lock held, for each candidate
/// of a size eviction (`cause` is [`RemovalCause::Size`]; other causes are reserved for the
/// future). Return `false` to keep the entry: the size limit may then stay exceeded, which
/// [`CacheStats::over_limit`] reports. Expired and idle entries are never served again, so
/// their removal is not subject to the policy; nor are explicit removals and aborted writes.
/// It may read the entry's metadata (from storage, if the entry is not open); it must not
/// block for long and must not call back into the cache. If it panics, the entry is kept, the
/// panic is logged, and the reaper carries on.
///
/// ```
/// use streamcache::cache::{EntryInfo, Policy, RemovalCause};
///
/// /// Keeps entries whose metadata says "pinned".
/// #[derive(Debug)]
/// struct KeepPinned;
///
/// impl Policy for KeepPinned {
///     fn may_evict(&self, entry: &EntryInfo, _cause: RemovalCause) -> bool {
///         &entry.metadata[..] != b"pinned"
///     }
/// }
/// ```
pub trait Policy: Send + Sync + fmt::Debug {
    /// Whether `entry` may be evicted for `cause`.
    fn may_evict(&self, entry: &EntryInfo, cause: RemovalCause) -> bool;
}

/// A snapshot of the cache's counters (eventually consistent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Requests served from an existing entry.
    pub hits: u64,
    /// Requests that created an entry (or found nothing, for [`Cache::get`]).
    pub misses: u64,
    /// Entries whose writer aborted.
    pub aborts: u64,
    /// Entries removed explicitly or by an aborted writer.
    pub removals: u64,
    /// Entries evicted by time or size limits, or dropped as corrupt.
    pub evictions: u64,
    /// Bytes of finished entries written.
    pub bytes_written: u64,
    /// Bytes delivered by readers that have been dropped.
    pub bytes_read: u64,
    /// `true` if the last size eviction could not bring the cache under its limits because
    /// every remaining entry was in use, being written, or kept by the policy, or because
    /// removed entries' data could not be deleted yet (see `pending_deletion_bytes`).
    pub over_limit: bool,
    /// Removed or evicted entries whose stored data is not deleted yet: queued for the
    /// reaper, or refused by the storage (a read-only or immutable directory, say) and
    /// waiting for a retry.
    pub pending_deletions: u64,
    /// Their bytes. They count toward `max_bytes`, since they still use the space.
    pub pending_deletion_bytes: u64,
    /// `true` while the index of the entries found in storage at opening is still loading
    /// (see [`CacheBuilder::startup_wait`](crate::CacheBuilder::startup_wait)): a service may
    /// report readiness when it turns `false`.
    pub loading: bool,
    /// Stored entries indexed so far by the load (its progress).
    pub loaded_entries: u64,
    /// Deletions the storage refused so far (each retry that fails counts again). Each
    /// is also logged at error level.
    pub failed_deletions: u64,
}

/// The iterator of [`Cache::iter`].
pub struct Iter<'a> {
    pub(super) cache: &'a Cache,
    /// The slots indexed when the iteration began.
    pub(super) slots: std::vec::IntoIter<Arc<Slot>>,
}

impl fmt::Debug for Iter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Iter")
            .field("remaining", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Iterator for Iter<'_> {
    type Item = EntryInfo;

    fn next(&mut self) -> Option<EntryInfo> {
        let inner = &self.cache.inner;
        for slot in self.slots.by_ref() {
            // Skips slots removed, replaced or expired since the snapshot.
            if inner.indexed(&slot).is_none() {
                continue;
            }
            if let Some(info) = inner.entry_info(&slot, inner.books.clock.now_millis()) {
                return Some(info);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.slots.len()))
    }
}

impl std::iter::FusedIterator for Iter<'_> {}
