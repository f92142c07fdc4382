//! One writer, many independent readers of a blob that is still being written.
//!
//! A stream is created with [`Writer::create`] over any [`Storage`]. Readers — from the writer
//! ([`Writer::reader`]) or from a [`Stream`] handle ([`Stream::reader`]), made before, during or
//! after writing — each see the whole stream from byte 0 and move independently: a reader that
//! reaches the written end blocks until more is written, the stream finishes, or it fails. A
//! stalled reader never slows the writer or another reader, because readers read storage without
//! holding any lock and only wait on a notification at the written end.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::sync::Arc;
//! use streamcache::{storage::MemoryStorage, Writer};
//!
//! let mut w = Writer::create(Arc::new(MemoryStorage::new()), "greeting")?;
//! let mut r = w.reader()?;
//! let writer = std::thread::spawn(move || -> std::io::Result<()> {
//!     w.write_all(b"Hello World!")?;
//!     w.flush()?; // readers see these bytes now
//!     w.write_all(b" Streaming updates...")?;
//!     Ok(w.finish()?)
//! });
//! let mut all = String::new();
//! r.read_to_string(&mut all)?; // blocks until the writer finishes
//! assert_eq!(all, "Hello World! Streaming updates...");
//! let mut four = [0; 4];
//! r.read_at(&mut four, 1)?; // positional read
//! assert_eq!(&four, b"ello");
//! writer.join().unwrap()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Wake-ups are batched: waiting readers are woken after every 1 MiB written, on
//! [`flush`](std::io::Write::flush) and on [`finish`](Writer::finish) /
//! [`abort`](Writer::abort) — a producer that writes slowly should flush when it wants its
//! readers to see what it has.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::error::{Cause, Error, Result};
use crate::storage::{BlobReader, Storage};

pub(crate) mod progress;
mod reader;
mod writer;

#[cfg_attr(not(feature = "tokio"), allow(unused_imports))]
pub(crate) use reader::Waiter;
pub use reader::{Reader, Size};
pub use writer::Writer;

use progress::{Progress, Status};

/// Writers publish (and wake waiting readers) after this many new bytes.
pub(crate) const PUBLISH_EVERY: u64 = 1 << 20;
/// No declared length.
const NO_LEN: u64 = u64::MAX;

/// Hooks a cache attaches to a stream (crate-private: the stream knows nothing of keys).
pub(crate) trait Observer: Send + Sync + fmt::Debug {
    /// The name of the stream's blob in storage (the stream keeps no copy of its own: see
    /// `Shared::name`).
    fn blob_name(&self) -> String;
    /// The metadata to commit with the blob, given the user metadata (the storage records
    /// the length itself).
    fn commit_meta(&self, user: &Bytes) -> Vec<u8>;
    /// The writer published `len` bytes in total (also called by `finish` with the final
    /// length, before the commit). An error refuses the bytes: the writer aborts the stream
    /// and returns that error (for example an entry larger than the cache's `max_bytes`).
    fn published(&self, len: u64) -> Result<()>;
    /// The stream finished at `len`; `committed` is false if it was doomed first.
    /// (Takes the `Arc` so the cache can file the entry without looking it up.)
    fn finished(self: Arc<Self>, len: u64, committed: bool);
    /// The stream was aborted.
    fn aborted(&self);
    /// The last reader or writer handle was released.
    fn released(&self);
    /// A read found stored data corrupt.
    fn corrupt(&self);
    /// A reader that delivered `bytes` bytes (more than 0) is being dropped.
    fn reader_closed(&self, bytes: u64);
    /// A storage operation of the writer failed with `error` (the stream is being aborted).
    /// The cache uses it to let go of idle file handles when the process runs out of them,
    /// so that the next request succeeds.
    fn storage_failed(&self, error: &std::io::Error) {
        let _ = error;
    }
    /// The writer set the entry's own time to live.
    fn set_time_to_live(&self, ttl: std::time::Duration) {
        let _ = ttl;
    }
    /// Once the stream finished: when (the owner's clock, milliseconds) and the time to live
    /// it counts from then (milliseconds; `None`: none). `None` before it finished.
    #[cfg(feature = "shared")]
    fn lifetime(&self) -> Option<(u64, Option<u64>)> {
        None
    }
    /// A [`Stream`] handle asked for the stream's removal. Returns `true` if the owner (a
    /// cache) takes charge: it forgets the entry and deletes the blob itself, so the removal
    /// goes through the same path (accounting, listener, retried deletion) as its own.
    fn remove_requested(&self) -> bool {
        false
    }
}

/// What happens to the stored blob when the last handle goes away.
enum OnUnused {
    /// Nothing: someone else (a cache) deletes it.
    Keep,
    /// Delete it from storage.
    Delete,
}

/// State shared by a stream's writer, readers and handles.
///
/// `repr(C)`, hot fields first: opening and dropping a reader touches the `Arc` count, the
/// observer, the blob and the first fields of `progress` (handle count, status), which this
/// order keeps within the first 64 bytes of the allocation (one or two cache lines instead
/// of three or four: a hit on a warm cache was bound by those misses).
#[repr(C)]
pub(crate) struct Shared {
    pub(crate) observer: Option<Arc<dyn Observer>>,
    pub(crate) blob: Arc<dyn BlobReader>,
    pub(crate) progress: Progress,
    /// The blob's name in storage, for a stream without an observer; an observed stream (a
    /// cache entry) asks its observer, which names the blob anyway (one allocation less per
    /// entry opened, for a name needed only by errors and a removal without the cache).
    own_name: Option<Box<str>>,
    /// What errors and `key()` report: the cache key, or the name for a bare stream.
    pub(crate) key: Arc<str>,
    storage: Arc<dyn Storage>,
    /// Declared total length or `NO_LEN`. Lock-free; written by the writer only.
    expected: AtomicU64,
    /// Lock: this mutex (held only to clone or replace). The writer's user metadata.
    metadata: Mutex<Bytes>,
    /// Set (once) when the blob was committed to storage.
    committed: AtomicBool,
    /// Lock: this mutex. `Some` once the stream is doomed: its blob is deleted (`Delete`) or
    /// left to the cache (`Keep`) when `Shared` drops, i.e. after the last handle of any kind.
    on_unused: Mutex<Option<OnUnused>>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stream")
            .field("key", &self.key)
            .field("progress", &self.progress.peek())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        name: &str,
        key: Option<Arc<str>>,
        progress: Progress,
        blob: Arc<dyn BlobReader>,
        storage: Arc<dyn Storage>,
        committed: bool,
        observer: Option<Arc<dyn Observer>>,
    ) -> Self {
        Shared {
            key: key.unwrap_or_else(|| Arc::from(name)),
            own_name: observer.is_none().then(|| name.into()),
            progress,
            blob,
            storage,
            expected: AtomicU64::new(NO_LEN),
            metadata: Mutex::default(),
            committed: AtomicBool::new(committed),
            on_unused: Mutex::default(),
            observer,
        }
    }

    pub(crate) fn expected_len(&self) -> Option<u64> {
        match self.expected.load(Ordering::Acquire) {
            NO_LEN => None,
            n => Some(n),
        }
    }

    pub(crate) fn set_expected(&self, len: u64) {
        self.expected.store(len, Ordering::Release);
    }

    pub(crate) fn metadata(&self) -> Bytes {
        self.metadata
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub(crate) fn set_metadata(&self, meta: Bytes) {
        *self.metadata.lock().unwrap_or_else(|e| e.into_inner()) = meta;
    }

    pub(crate) fn is_doomed(&self) -> bool {
        self.on_unused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn doom(&self, how: OnUnused) {
        // The writer may go on and finish; readers it opens get every byte.
        self.progress
            .close_except_writer(Some(Arc::new(Closing("removed"))));
        self.on_unused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(how);
    }

    /// Dooms the stream: no new readers, and a writer that has not finished yet will not
    /// commit. Deleting a blob that is already committed is the caller's business.
    pub(crate) fn doom_keep(&self) {
        self.doom(OnUnused::Keep);
    }

    pub(crate) fn set_committed(&self) {
        self.committed.store(true, Ordering::Release);
    }

    /// The error readers get from a failed stream.
    pub(crate) fn failure(&self) -> Error {
        let key = self.key.to_string();
        match self.progress.snapshot().status {
            Status::Aborted(cause) => Error::Aborted { key, cause },
            Status::Cancelled(cause) => Error::Closed { key, cause },
            Status::Open | Status::Finished => Error::Closed { key, cause: None },
        }
    }

    #[inline]
    pub(crate) fn new_reader(self: &Arc<Self>) -> Result<Reader> {
        self.reader_from(self.progress.acquire())
    }

    /// A reader for the stream's open writer: unlike [`new_reader`](Self::new_reader), a
    /// removal (a doom) does not refuse it; a shutdown or cancel does.
    pub(crate) fn new_writer_reader(self: &Arc<Self>) -> Result<Reader> {
        self.reader_from(self.progress.acquire_by_writer())
    }

    #[inline]
    fn reader_from(self: &Arc<Self>, acquired: Result<(), Option<Cause>>) -> Result<Reader> {
        acquired.map_err(|cause| Error::Closed {
            key: self.key.to_string(),
            cause,
        })?;
        Ok(Reader::new(self.clone()))
    }

    /// Ends the stream as failed (`Aborted`, or `Cancelled`, which may also end a finished
    /// one). If it was still open, the observer aborts its entry, as for any failed writer.
    /// (Should the writer finish between the check and the end, the cancelled entry is not
    /// reported: the cache drops it at the next request, every read of it failing anyway.)
    pub(crate) fn fail(&self, len: u64, status: Status) {
        let was_open = self.progress.peek().1 == progress::OPEN;
        if self.progress.end(len, status)
            && was_open
            && let Some(obs) = &self.observer
        {
            obs.aborted();
        }
    }

    /// The blob's name in storage.
    pub(crate) fn name(&self) -> std::borrow::Cow<'_, str> {
        match (&self.own_name, &self.observer) {
            (Some(name), _) => std::borrow::Cow::Borrowed(name),
            (None, Some(obs)) => std::borrow::Cow::Owned(obs.blob_name()),
            (None, None) => unreachable!("a stream without an observer keeps its name"),
        }
    }

    /// Deletes the blob from storage if it was committed (one already gone is no error).
    fn delete_committed(&self) -> std::io::Result<()> {
        if !self.committed.load(Ordering::Acquire) {
            return Ok(());
        }
        match self.storage.remove(&self.name()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Releases one reader/writer handle.
    #[inline]
    pub(crate) fn release(&self) {
        if self.progress.release() {
            self.blob.idle();
            if let Some(obs) = &self.observer {
                obs.released();
            }
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let how = self
            .on_unused
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(OnUnused::Delete) = how
            && let Err(e) = self.delete_committed()
        {
            tracing::warn!(blob = %self.name(), error = %e, "could not delete removed blob");
        }
    }
}

/// A plain-text reason used as a [`Cause`].
#[derive(Debug)]
pub(crate) struct Closing(pub(crate) &'static str);

impl fmt::Display for Closing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Closing {}

/// A handle on a stream, for making readers and controlling its life.
///
/// Cheap to clone. Holding one keeps the stream's data alive (see
/// [`remove_when_unused`](Stream::remove_when_unused)).
#[derive(Clone)]
pub struct Stream {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.shared.fmt(f)
    }
}

impl Stream {
    /// A finished stream over the committed blob `name` of `storage`.
    ///
    /// # Errors
    /// [`Error::Io`] (kind `NotFound` if there is no such committed blob) or
    /// [`Error::Corrupt`] from the storage.
    pub fn open(storage: Arc<dyn Storage>, name: &str) -> Result<Stream> {
        let (blob, info) = storage
            .open(name)
            .map_err(|e| Error::from_io("open", name, e))?;
        Ok(Stream::committed(
            storage,
            name,
            Arc::from(name),
            blob,
            info.len,
            Bytes::from(info.meta),
            None,
        ))
    }

    /// A finished stream over an already opened committed blob (used by the cache at reload).
    pub(crate) fn committed(
        storage: Arc<dyn Storage>,
        name: &str,
        key: Arc<str>,
        blob: Arc<dyn BlobReader>,
        len: u64,
        user: Bytes,
        observer: Option<Arc<dyn Observer>>,
    ) -> Stream {
        let shared = Shared::new(
            name,
            Some(key),
            Progress::new_finished(len),
            blob,
            storage,
            true,
            observer,
        );
        shared.set_metadata(user);
        Stream {
            shared: Arc::new(shared),
        }
    }

    /// Dooms the stream without deleting its blob (the cache deletes it).
    pub(crate) fn doom_keep(&self) {
        self.shared.doom_keep();
    }

    /// Whether the stream failed (aborted or cancelled).
    pub(crate) fn failed(&self) -> bool {
        self.shared.progress.failed()
    }

    /// The stream's key: a cache entry's key, or the name a standalone stream was created or
    /// opened with (as [`Reader::key`] and [`Writer::key`]).
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// Hands the removal to the stream's cache, if it has one that takes it.
    fn cache_removes(&self) -> bool {
        self.shared
            .observer
            .as_ref()
            .is_some_and(|obs| obs.remove_requested())
    }

    /// A new reader positioned at byte 0.
    ///
    /// # Errors
    /// [`Error::Closed`] if the stream was shut down, cancelled or removed.
    #[inline]
    pub fn reader(&self) -> Result<Reader> {
        self.shared.new_reader()
    }

    /// The current length and whether it is final.
    pub fn size(&self) -> Size {
        Size::of(&self.shared)
    }

    /// The total length the writer declared, if any.
    pub fn expected_len(&self) -> Option<u64> {
        self.shared.expected_len()
    }

    /// The user metadata the writer attached (empty if none).
    pub fn metadata(&self) -> Bytes {
        self.shared.metadata()
    }

    /// Number of live readers, plus one while the writer is open.
    pub fn handles(&self) -> usize {
        self.shared.progress.handles()
    }

    /// Stops new readers: [`reader`](Stream::reader) and [`Writer::reader`] fail with
    /// [`Error::Closed`] carrying `cause`. Existing readers and the writer carry on (Go's
    /// `ShutdownWithErr`).
    pub fn shutdown_with(&self, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) {
        self.shared.progress.close(Some(Cause::from(cause.into())));
    }

    /// Forcibly ends the stream: new readers are refused, and every read and write from now on
    /// fails with [`Error::Closed`] carrying `cause` — also after the stream finished.
    pub fn cancel_with(&self, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) {
        let cause = Some(Cause::from(cause.into()));
        let len = self.shared.progress.peek().0;
        // Ends the stream through `fail`, which tells the observer: a cache entry cancelled
        // unfinished leaves the index at once (it would never finish nor expire).
        self.shared.fail(len, Status::Cancelled(cause));
    }

    /// Stops new readers (the writer's too), blocks until every reader and the writer are gone,
    /// then deletes the blob from storage.
    ///
    /// The stream of a cache entry is removed through its cache, as by
    /// [`Cache::remove`](crate::Cache::remove): the key is forgotten at once, and the cache
    /// deletes the blob (in the background, retrying if the storage refuses) once this call
    /// has seen every handle go.
    ///
    /// # Errors
    /// [`Error::Io`] if the storage cannot delete it (a blob that was never committed is not an
    /// error). Never for a cache entry's stream, whose deletion the cache carries out.
    pub fn remove(&self) -> Result<()> {
        let by_cache = self.cache_removes();
        self.shared
            .progress
            .close_and_wait_unused(Some(Arc::new(Closing("removed"))));
        if by_cache {
            return Ok(());
        }
        self.shared
            .delete_committed()
            .map_err(|e| Error::from_io("remove", &*self.shared.name(), e))
    }

    /// Non-blocking removal: stops new readers and deletes the blob when the last handle of
    /// any kind (reader, writer, `Stream`) is dropped. Existing readers read to the end; a
    /// writer may still finish, and its readers get every byte, including readers it opens
    /// after the removal ([`Writer::reader`] is not refused while the stream is open).
    ///
    /// The stream of a cache entry is removed through its cache, as by
    /// [`Cache::remove`](crate::Cache::remove).
    pub fn remove_when_unused(&self) {
        if self.cache_removes() {
            self.shared.doom_keep();
        } else {
            self.shared.doom(OnUnused::Delete);
        }
    }
}
