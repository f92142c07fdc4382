use std::fmt;
use std::io;
use std::sync::Arc;

use bytes::Bytes;

use super::progress::{self, Progress, Status};
use super::{Closing, Observer, PUBLISH_EVERY, Reader, Shared, Stream};
use crate::error::{Cause, Error, Result};
use crate::storage::{BlobWriter, Storage};

/// The one producer of a stream: [`io::Write`] plus [`finish`](Writer::finish).
///
/// Dropping a writer without finishing it **aborts** the stream: its readers get
/// [`Error::Aborted`], never a clean end of file, and a cache forgets the key. A storage error
/// while writing aborts too.
pub struct Writer {
    pub(crate) shared: Arc<Shared>,
    /// `None` once finished or aborted.
    blob: Option<Box<dyn BlobWriter>>,
    written: u64,
    published: u64,
}

impl fmt::Debug for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Writer")
            .field("key", &self.shared.key)
            .field("written", &self.written)
            .field("open", &self.blob.is_some())
            .finish()
    }
}

impl Writer {
    /// Starts a new stream named `name` (a valid blob name, see
    /// [`validate_name`](crate::storage::validate_name)) on `storage`.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for a bad name, or the storage's error as [`Error::Io`].
    pub fn create(storage: Arc<dyn Storage>, name: &str) -> Result<Writer> {
        Self::create_observed(storage, name, None, None)
    }

    pub(crate) fn create_observed(
        storage: Arc<dyn Storage>,
        name: &str,
        key: Option<Arc<str>>,
        observer: Option<Arc<dyn Observer>>,
    ) -> Result<Writer> {
        let blob = storage.create(name).map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidInput {
                Error::invalid(e.to_string())
            } else {
                Error::from_io("create", name, e)
            }
        })?;
        let shared = Shared::new(
            name,
            key,
            Progress::new_open(),
            blob.reader(),
            storage,
            false,
            observer,
        );
        Ok(Writer {
            shared: Arc::new(shared),
            blob: Some(blob),
            written: 0,
            published: 0,
        })
    }

    /// A new reader of this stream, positioned at byte 0. A removed stream (a cache entry
    /// removed or evicted while it is written, [`Stream::remove_when_unused`]) still gives its
    /// writer readers, which get every byte it goes on to write.
    ///
    /// # Errors
    /// [`Error::Closed`] if the stream was shut down, cancelled, removed with the blocking
    /// [`Stream::remove`], or removed after it failed.
    pub fn reader(&self) -> Result<Reader> {
        self.shared.new_writer_reader()
    }

    /// A handle on this stream (for readers after the writer is gone, shutdown, removal). For
    /// a cache entry, its [`remove`](Stream::remove) goes through the cache.
    pub fn stream(&self) -> Stream {
        Stream {
            shared: self.shared.clone(),
        }
    }

    /// The stream's key: a cache entry's key, or a standalone stream's name.
    pub fn key(&self) -> &str {
        &self.shared.key
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Declares the total length up front (for example an HTTP `Content-Length`). Readers see
    /// it through [`Reader::expected_len`] and can `SeekFrom::End` without waiting. Writing
    /// more, or finishing with fewer bytes, is then an error that aborts the stream.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if more than `len` bytes were already written.
    pub fn set_expected_len(&mut self, len: u64) -> Result<()> {
        if self.written > len {
            return Err(Error::invalid(format!(
                "declared length {len} but {} bytes are already written",
                self.written
            )));
        }
        self.shared.set_expected(len);
        Ok(())
    }

    /// Attaches small user metadata (a content type, HTTP headers…) that readers see through
    /// [`Reader::metadata`] and that a disk cache persists with the entry. Set it before the
    /// first write if readers need it before the body.
    pub fn set_metadata(&mut self, meta: impl Into<Bytes>) {
        self.shared.set_metadata(meta.into());
    }

    /// Sets this cache entry's own time to live, counted from when it is finished (a proxy's
    /// `Cache-Control: max-age`, say): from then on it is served for at most `ttl`, or the
    /// cache-wide [time to live](crate::CacheBuilder::time_to_live) if that is shorter, and
    /// never after. It is stored with the entry, so it holds after a restart; it takes
    /// precedence over the cache's [`Expiry`](crate::cache::Expiry). The last call before
    /// [`finish`](Writer::finish) wins. A standalone stream (not made by a cache) has no
    /// expiry: the call does nothing.
    pub fn set_time_to_live(&mut self, ttl: std::time::Duration) {
        if let Some(obs) = &self.shared.observer {
            obs.set_time_to_live(ttl);
        }
    }

    fn live(&mut self) -> Result<&mut Box<dyn BlobWriter>> {
        if self.shared.progress.failed() || self.blob.is_none() {
            return Err(self.shared.failure());
        }
        Ok(self.blob.as_mut().expect("checked"))
    }

    fn publish(&mut self) -> Result<()> {
        let written = self.written;
        let blob = self.live()?;
        if let Err(e) = blob.publish() {
            return Err(self.fail("publish", e));
        }
        self.observe(written)?;
        self.shared.progress.publish(written);
        self.published = written;
        Ok(())
    }

    /// Tells the observer that `len` bytes are written; if it refuses them, aborts the stream
    /// (readers see the refusal as the abort's cause) and returns its error.
    fn observe(&mut self, len: u64) -> Result<()> {
        let refused = match &self.shared.observer {
            Some(obs) => obs.published(len).err(),
            None => None,
        };
        match refused {
            None => Ok(()),
            Some(e) => {
                let cause: Cause = Arc::new(io::Error::new(e.kind(), e.to_string()));
                self.end_failed(Some(cause));
                Err(e)
            }
        }
    }

    /// Aborts after a storage error and returns the error for the writer.
    fn fail(&mut self, op: &'static str, e: io::Error) -> Error {
        if let Some(obs) = &self.shared.observer {
            obs.storage_failed(&e);
        }
        let cause: Cause = Arc::new(io::Error::new(e.kind(), format!("{op} failed: {e}")));
        self.end_failed(Some(cause));
        Error::from_io(op, &*self.shared.key, e)
    }

    fn end_failed(&mut self, cause: Option<Cause>) {
        drop(self.blob.take());
        self.shared.fail(self.written, Status::Aborted(cause));
    }

    /// Writes all of `buf` (the typed form of [`io::Write::write_all`]).
    ///
    /// # Errors
    /// [`Error::Io`] from storage (the stream is then aborted), [`Error::InvalidInput`] past a
    /// declared length (aborted too), [`Error::Aborted`] / [`Error::Closed`] if the stream had
    /// already ended.
    pub fn write_bytes(&mut self, buf: &[u8]) -> Result<()> {
        let end = self.written + buf.len() as u64;
        if let Some(expected) = self.shared.expected_len()
            && end > expected
        {
            let reason = format!("write past the declared length {expected}");
            self.end_failed(Some(Arc::new(Closing("write past the declared length"))));
            return Err(Error::invalid(reason));
        }
        let blob = self.live()?;
        if let Err(e) = blob.write(buf) {
            return Err(self.fail("write", e));
        }
        self.written = end;
        if self.written - self.published >= PUBLISH_EVERY {
            self.publish()?;
        }
        Ok(())
    }

    /// Commits the stream: readers see end of file after the last byte; a cache entry becomes
    /// a hit for everyone and, on disk, durable and reloadable.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] if fewer bytes than a declared length were written, or a storage
    /// error while committing: the stream is then aborted. [`Error::Aborted`] /
    /// [`Error::Closed`] if it had already failed or been cancelled.
    pub fn finish(mut self) -> Result<()> {
        if let Some(expected) = self.shared.expected_len()
            && self.written != expected
        {
            let reason = format!(
                "finished after {} bytes but {expected} were declared",
                self.written
            );
            self.end_failed(Some(Arc::new(Closing(
                "finished short of the declared length",
            ))));
            return Err(Error::invalid(reason));
        }
        self.live()?;
        let len = self.written;
        self.observe(len)?;
        let mut blob = self.blob.take().expect("live");
        let commit = !self.shared.is_doomed();
        if commit {
            let user = self.shared.metadata();
            let meta = match &self.shared.observer {
                Some(obs) => obs.commit_meta(&user),
                None => user.to_vec(),
            };
            // `commit` publishes what is left first (so a small last segment can be handed
            // over whole).
            if let Err(e) = blob.commit(meta) {
                return Err(self.fail("commit", e));
            }
            self.shared.set_committed();
        } else if let Err(e) = blob.publish() {
            self.blob = Some(blob);
            return Err(self.fail("publish", e));
        }
        // Tell the cache first, so that once readers see the end, its books are up to date.
        if let Some(obs) = &self.shared.observer {
            obs.clone().finished(len, commit);
        }
        if !self.shared.progress.end(len, Status::Finished) {
            return Err(self.shared.failure());
        }
        Ok(())
    }

    /// Aborts the stream: readers get [`Error::Aborted`]; nothing is committed.
    pub fn abort(mut self) {
        self.end_failed(None);
    }

    /// Aborts the stream with a cause that readers see in their [`Error::Aborted`].
    pub fn abort_with(mut self, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) {
        self.end_failed(Some(Cause::from(cause.into())));
    }
}

impl io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_bytes(buf)?;
        Ok(buf.len())
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        Ok(self.write_bytes(buf)?)
    }

    /// Publishes every byte written so far to readers and wakes them.
    fn flush(&mut self) -> io::Result<()> {
        Ok(self.publish()?)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Whatever has not ended the stream aborts it (ending is refused once it has ended),
        // also a writer whose `finish` panicked after it took the blob (in a storage's
        // `commit`, say): readers must never wait forever.
        if self.shared.progress.peek().1 == progress::OPEN {
            let why = if self.blob.is_some() {
                "writer dropped before finish"
            } else {
                "finish did not complete"
            };
            self.end_failed(Some(Arc::new(Closing(why))));
        }
        self.shared.release();
    }
}
