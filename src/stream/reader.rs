use std::fmt;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;

use super::Shared;
use super::progress::{FAILED, FINISHED, Progress, WaitKey};
use crate::error::Error;
use crate::storage::FileRange;

/// How much of a stream exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Size {
    /// Bytes readable now.
    pub len: u64,
    /// `true` once the stream is finished: `len` is its final length.
    pub finished: bool,
}

impl Size {
    pub(crate) fn of(shared: &Shared) -> Size {
        let (len, code) = shared.progress.peek();
        Size {
            len,
            finished: code == FINISHED,
        }
    }
}

/// An independent reader of a stream, from byte 0: [`Read`], [`Seek`] and
/// [`read_at`](Reader::read_at).
///
/// At the written end of a stream that is still open, reads block until more bytes are
/// published, the stream finishes (then end of file) or fails (then an error — an aborted
/// stream never looks like a clean end of file). A reader owns what it needs: it can move to
/// another thread and outlive the cache or writer it came from.
pub struct Reader {
    shared: Arc<Shared>,
    pos: u64,
    /// Zero-copy chunk from the storage, starting at `chunk_pos` (memory storage).
    chunk: Bytes,
    chunk_pos: u64,
    /// Bytes delivered by this reader (for cache statistics). Relaxed: only summed at drop.
    delivered: AtomicU64,
    /// The 1 MiB block (offset >> `REVALIDATE_SHIFT`) this reader's last storage read ended
    /// in; `u64::MAX` before the first. A read reaching outside it first asks the storage to
    /// revalidate (`BlobReader::revalidate`). Atomic because `read_at` takes `&self`.
    last_block: AtomicU64,
}

/// Readers ask the storage to revalidate when they enter a new block of `1 << 20` bytes.
const REVALIDATE_SHIFT: u32 = 20;

impl fmt::Debug for Reader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("key", &self.shared.key)
            .field("pos", &self.pos)
            .field("size", &self.size())
            .finish()
    }
}

impl Reader {
    #[inline]
    pub(crate) fn new(shared: Arc<Shared>) -> Reader {
        Reader {
            shared,
            pos: 0,
            chunk: Bytes::new(),
            chunk_pos: 0,
            delivered: AtomicU64::new(0),
            last_block: AtomicU64::new(u64::MAX),
        }
    }

    /// Whether the stream failed (aborted or cancelled). Lock-free.
    pub(crate) fn failed(&self) -> bool {
        self.shared.progress.failed()
    }

    fn progress(&self) -> &Progress {
        &self.shared.progress
    }

    /// The stream's key: a cache entry's key, or a standalone stream's name.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// The current position of [`Read`] and [`Seek`].
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Where a wait for the byte at the current position ends. Saturating: a reader at
    /// `u64::MAX` waits for the stream to end, like any read past the end.
    pub(crate) fn next_end(&self) -> u64 {
        self.pos.saturating_add(1)
    }

    /// The current length of the stream and whether it is final. Never blocks.
    pub fn size(&self) -> Size {
        Size::of(&self.shared)
    }

    /// The total length the writer declared, if any (for `Content-Length` before the end).
    pub fn expected_len(&self) -> Option<u64> {
        self.shared.expected_len()
    }

    /// The user metadata the writer attached (empty if none).
    pub fn metadata(&self) -> Bytes {
        self.shared.metadata()
    }

    fn failure(&self) -> io::Error {
        self.shared.failure().into()
    }

    /// Lock-free check: `Ok(Some(len))` if bytes up to `end` are published or the stream is
    /// finished, `Ok(None)` if the caller must wait, `Err` if the stream failed.
    #[inline]
    fn check(&self, end: u64) -> io::Result<Option<u64>> {
        let (len, code) = self.progress().peek();
        match code {
            FAILED => Err(self.failure()),
            FINISHED => Ok(Some(len)),
            _ if len >= end => Ok(Some(len)),
            _ => Ok(None),
        }
    }

    /// Blocks until bytes up to `end` exist or the stream ended; returns the readable length.
    fn wait(&self, end: u64) -> io::Result<u64> {
        loop {
            if let Some(len) = self.check(end)? {
                return Ok(len);
            }
            // `check` above reports how the wait ended (bytes, end, or failure).
            self.progress().wait_for(end);
        }
    }

    /// A registration for [`poll_wait`](Self::poll_wait): one per concurrent async wait (a
    /// `read_at` future, an async reader's sequential reads); it leaves the stream's waker
    /// list when dropped.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn waiter(&self) -> Waiter {
        Waiter {
            shared: self.shared.clone(),
            key: WaitKey::default(),
        }
    }

    /// Async form of `wait`; `waiter` (from this reader's [`waiter`](Self::waiter)) holds the
    /// waker while it waits.
    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn poll_wait(
        &self,
        end: u64,
        cx: &mut Context<'_>,
        waiter: &mut Waiter,
    ) -> Poll<io::Result<u64>> {
        debug_assert!(
            Arc::ptr_eq(&self.shared, &waiter.shared),
            "another stream's waiter"
        );
        loop {
            match self.check(end) {
                Err(e) => return Poll::Ready(Err(e)),
                Ok(Some(len)) => return Poll::Ready(Ok(len)),
                Ok(None) => {}
            }
            if self
                .progress()
                .poll_for(end, cx, &mut waiter.key)
                .is_pending()
            {
                return Poll::Pending;
            }
        }
    }

    fn storage_error(&self, e: io::Error) -> io::Error {
        if e.kind() == io::ErrorKind::InvalidData
            && let Some(obs) = &self.shared.observer
        {
            obs.corrupt();
        }
        e
    }

    /// One `read_at` of published bytes from storage: a storage error is reported as such
    /// (and a corrupt block to the cache), and no data at all is a corrupt short read.
    fn blob_read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.entering(offset, buf.len());
        let n = self
            .shared
            .blob
            .read_at(buf, offset)
            .map_err(|e| self.storage_error(e))?;
        if n == 0 {
            return Err(self.short_read(offset));
        }
        Ok(n)
    }

    /// Before a storage read of `[offset, offset + len)`: if it reaches outside the block
    /// this reader last read in (or it is the first), the storage revalidates the blob (for
    /// disk, an `fstat`), so bytes altered since are re-checked. Within a block: two compares.
    #[inline]
    fn entering(&self, offset: u64, len: usize) {
        let first = offset >> REVALIDATE_SHIFT;
        let last = offset.saturating_add(len.saturating_sub(1) as u64) >> REVALIDATE_SHIFT;
        let prev = self.last_block.load(Ordering::Relaxed);
        if first != prev || last != prev {
            // Recorded only once revalidated: a `read_at` racing on another thread revalidates
            // too rather than skip ahead of this one.
            self.shared.blob.revalidate();
            self.last_block.store(last, Ordering::Relaxed);
        }
    }

    fn short_read(&self, offset: u64) -> io::Error {
        io::Error::from(Error::Corrupt {
            path: self.shared.key.to_string().into(),
            reason: format!("storage returned no data at published offset {offset}"),
        })
    }

    /// Makes `self.chunk` cover `self.pos` through the storage's zero-copy path, fetching at
    /// most `max` bytes. `Ok(false)` if the storage has no such path (use `read_at`).
    fn load_chunk(&mut self, max: usize) -> io::Result<bool> {
        let chunk_end = self.chunk_pos + self.chunk.len() as u64;
        if (self.chunk_pos..chunk_end).contains(&self.pos) {
            return Ok(true);
        }
        self.entering(self.pos, 1);
        match self.shared.blob.read_bytes(self.pos, max) {
            Some(Ok(chunk)) if !chunk.is_empty() => {
                self.chunk = chunk;
                self.chunk_pos = self.pos;
                Ok(true)
            }
            Some(Ok(_)) => Err(self.short_read(self.pos)),
            Some(Err(e)) => Err(self.storage_error(e)),
            None => Ok(false),
        }
    }

    /// Consumes up to `max` bytes of the loaded chunk: returns their range in `self.chunk`.
    fn take_from_chunk(&mut self, max: usize) -> std::ops::Range<usize> {
        let from = (self.pos - self.chunk_pos) as usize;
        let n = max.min(self.chunk.len() - from);
        self.pos += n as u64;
        self.count(n);
        from..from + n
    }

    /// Reads at `self.pos` given that `len` bytes are readable.
    pub(crate) fn read_ready(&mut self, buf: &mut [u8], len: u64) -> io::Result<usize> {
        if self.pos >= len || buf.is_empty() {
            return Ok(0);
        }
        let avail = usize::try_from(len - self.pos).unwrap_or(usize::MAX);
        if !self.load_chunk(avail)? {
            let want = buf.len().min(avail);
            let n = self.blob_read_at(&mut buf[..want], self.pos)?;
            self.pos += n as u64;
            self.count(n);
            return Ok(n);
        }
        let range = self.take_from_chunk(buf.len());
        let n = range.len();
        buf[..n].copy_from_slice(&self.chunk[range]);
        Ok(n)
    }

    /// Zero-copy read: up to `max` bytes at the current position as a shared [`Bytes`],
    /// blocking like [`Read::read`]. With memory storage no byte is copied; other storage
    /// copies once. An empty result means end of stream.
    ///
    /// # Errors
    /// As [`Read::read`].
    pub fn read_chunk(&mut self, max: usize) -> io::Result<Bytes> {
        if max == 0 {
            return Ok(Bytes::new());
        }
        let len = self.wait(self.next_end())?;
        if self.pos >= len {
            return Ok(Bytes::new());
        }
        let max = max.min(usize::try_from(len - self.pos).unwrap_or(usize::MAX));
        if !self.load_chunk(max)? {
            let mut buf = vec![0; max];
            let n = self.read_ready(&mut buf, len)?;
            buf.truncate(n);
            return Ok(Bytes::from(buf));
        }
        let range = self.take_from_chunk(max);
        Ok(self.chunk.slice(range))
    }

    /// Zero-copy sending: this reader's next `len` bytes as a [`FileRange`] to hand to the
    /// kernel (`sendfile`) instead of reading them, when the storage can vouch for them in
    /// place ([`BlobReader::file_range`](crate::storage::BlobReader::file_range): for
    /// [`DiskStorage`](crate::storage::DiskStorage), a committed entry whose blocks in that
    /// range have all passed their blake3 check under the file's current `fstat` stamp).
    /// On `Some` the position moves past the range, as if it had been read; on `None`
    /// nothing changes and the bytes are to be read as usual (reads check what is unchecked,
    /// so a later call may succeed).
    ///
    /// `None` also when the stream is not finished or fewer than `len` bytes follow the
    /// position. Never blocks.
    pub fn take_file_range(&mut self, len: u64) -> Option<FileRange> {
        let size = self.size();
        let end = self.pos.checked_add(len)?;
        if !size.finished || end > size.len {
            return None;
        }
        let range = self.shared.blob.file_range(self.pos, len)?;
        self.pos = end;
        self.delivered.fetch_add(len, Ordering::Relaxed);
        Some(range)
    }

    /// Whether [`read_chunk`](Reader::read_chunk) shares the stored bytes (memory storage)
    /// rather than copying them into a new buffer; a caller that reads a lot from a copying
    /// storage does better reading into a buffer it reuses.
    #[cfg(feature = "shared")]
    pub(crate) fn shares_bytes(&self) -> bool {
        self.shared.blob.read_bytes(self.pos, 0).is_some()
    }

    /// When the stream finished and the time to live its owner counts from then
    /// ([`Observer::lifetime`](super::Observer::lifetime)); `None` before it finished or
    /// for a stream without an owner.
    #[cfg(feature = "shared")]
    pub(crate) fn lifetime(&self) -> Option<(u64, Option<u64>)> {
        self.shared.observer.as_ref()?.lifetime()
    }

    /// The blake3 hash of `[offset, offset + len)` if the storage has it at hand
    /// ([`BlobReader::known_hash`](crate::storage::BlobReader::known_hash)).
    #[cfg(feature = "shared")]
    pub(crate) fn known_hash(&self, offset: u64, len: u64) -> Option<[u8; 32]> {
        self.shared.blob.known_hash(offset, len)
    }

    /// Reads exactly `buf.len()` bytes at `offset` — or fewer only if the stream finishes
    /// first — without moving this reader's position. Blocks until that whole range is
    /// written (or the stream ends). Returns 0 at or past the end of a finished stream.
    ///
    /// # Errors
    /// [`Error::Aborted`] / [`Error::Closed`] (inside the [`io::Error`]) if the stream failed,
    /// or a storage error.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = self.wait(offset.saturating_add(buf.len() as u64))?;
        self.read_at_ready(buf, offset, len)
    }

    pub(crate) fn read_at_ready(&self, buf: &mut [u8], offset: u64, len: u64) -> io::Result<usize> {
        if offset >= len {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(len - offset).unwrap_or(usize::MAX));
        let mut done = 0;
        while done < want {
            done += self.blob_read_at(&mut buf[done..want], offset + done as u64)?;
        }
        self.count(done);
        Ok(done)
    }

    #[inline]
    fn count(&self, n: usize) {
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Resolves a seek target. `SeekFrom::End` needs the final or declared length: if it is not
    /// known yet, `end` is called to wait for it.
    pub(crate) fn seek_target(
        &self,
        pos: SeekFrom,
        end: impl FnOnce() -> io::Result<u64>,
    ) -> io::Result<u64> {
        let (base, delta) = match pos {
            SeekFrom::Start(n) => return Ok(n),
            SeekFrom::Current(d) => (self.pos, d),
            SeekFrom::End(d) => {
                let base = match self.shared.expected_len() {
                    Some(n) => n,
                    None => end()?,
                };
                (base, d)
            }
        };
        base.checked_add_signed(delta).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek to a negative or overflowing position",
            )
        })
    }

    #[cfg_attr(not(feature = "tokio"), allow(dead_code))]
    pub(crate) fn set_position(&mut self, pos: u64) {
        self.pos = pos;
    }
}

impl Read for Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let len = self.wait(self.next_end())?;
        self.read_ready(buf, len)
    }
}

/// `SeekFrom::Start` and `SeekFrom::Current` never block. `SeekFrom::End` blocks until the
/// stream finishes, unless the writer declared its length. Seeking past the end is allowed;
/// reads there wait for the bytes or return end of file.
impl Seek for Reader {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let target = self.seek_target(pos, || self.wait(u64::MAX))?;
        self.pos = target;
        Ok(target)
    }

    fn stream_position(&mut self) -> io::Result<u64> {
        Ok(self.pos)
    }
}

/// An async waiter's slot in its stream's waker list (see [`Reader::waiter`]), given back on
/// drop, so that a cancelled wait leaves nothing behind.
#[derive(Debug)]
pub(crate) struct Waiter {
    shared: Arc<Shared>,
    key: WaitKey,
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.shared.progress.deregister(&mut self.key);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // (A reader that delivered nothing, such as a hit opened only to check, has nothing
        // to report: no call.)
        let delivered = *self.delivered.get_mut();
        if delivered > 0
            && let Some(obs) = &self.shared.observer
        {
            obs.reader_closed(delivered);
        }
        self.shared.release();
    }
}
