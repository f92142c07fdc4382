//! Where the bytes live.
//!
//! A [`Storage`] holds named **blobs**. A blob is created for appending ([`Storage::create`]),
//! can be read at any offset while it is being written ([`BlobWriter::reader`]), and becomes
//! durable and listable once committed ([`BlobWriter::commit`]). Storage knows bytes and names
//! only: nothing here knows about keys, readers' positions or eviction.
//!
//! Two implementations ship with the crate — [`MemoryStorage`] and [`DiskStorage`] (Unix
//! only). With the `test-util` feature there is also `FaultyStorage`, a wrapper that injects
//! I/O errors, for tests. Users can plug their own backend by implementing the three traits
//! below; the conformance tests in the repository's `tests/storage_conformance.rs` show what
//! is expected.
//!
//! # Contract
//!
//! **The caller guarantees:**
//! * names passed to [`Storage::create`] are valid (see [`validate_name`]) and not in use by
//!   another blob that is being written;
//! * it reads a blob only in the range that was written before the last
//!   [`BlobWriter::publish`] (or commit) returned, or, for blobs from [`Storage::open`], below
//!   the committed length;
//! * one thread at a time uses a [`BlobWriter`] (it is `&mut`).
//!
//! **The implementation must:**
//! * make every byte appended before `publish` returns readable, at the right offset, through
//!   every [`BlobReader`] of that blob, from any thread;
//! * never change bytes that were published (append only);
//! * keep readers working after the blob is committed, and after it is removed (readers that
//!   already exist keep their data until they are dropped);
//! * hide a blob from [`Storage::open`] and [`Storage::list`] until it is committed, and make
//!   commit atomic: after a crash a blob is either absent or whole, with its metadata;
//! * discard an uncommitted blob when its writer is dropped;
//! * return an error rather than wrong bytes (for example when a stored file fails its
//!   integrity check), also when the stored file was altered while the blob had readers:
//!   by the next read that follows a [`BlobReader::revalidate`] at the latest;
//! * report [`io::ErrorKind::NotFound`] only for a blob that really is not there, and
//!   [`io::ErrorKind::InvalidData`] only on proof of damage (a hash or checksum mismatch, a
//!   malformed or oversized record, a short file, a file of the wrong type): an error that
//!   says nothing about the blob (EMFILE, ENOMEM, EACCES, EIO) passes through as it is, so
//!   the caller fails that request and keeps the blob.

use std::fmt;
use std::io;
use std::ops::ControlFlow;
use std::sync::Arc;

use bytes::Bytes;

#[cfg(unix)]
mod disk;
#[cfg(feature = "test-util")]
mod faulty;
#[cfg(unix)]
mod front;
mod memory;
#[cfg(unix)]
mod partitioned;

#[cfg(unix)]
pub use disk::{DiskStorage, Durability};
#[cfg(feature = "test-util")]
pub use faulty::{FaultOp, FaultyStorage};
#[cfg(unix)]
pub(crate) use front::FrontStorage;
pub use memory::MemoryStorage;
#[cfg(unix)]
pub(crate) use partitioned::PartitionedStorage;

/// A store of named, append-only blobs. Object safe: use it as `Arc<dyn Storage>`.
///
/// See the [module documentation](self) for the contract.
pub trait Storage: Send + Sync + fmt::Debug {
    /// Starts a new, uncommitted blob called `name` and returns its writer.
    ///
    /// # Errors
    /// An invalid name ([`io::ErrorKind::InvalidInput`]) or any I/O error of the backend.
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>>;

    /// Opens a committed blob for reading, with its length and metadata.
    ///
    /// # Errors
    /// [`io::ErrorKind::NotFound`] if no committed blob has that name; an error of kind
    /// [`io::ErrorKind::InvalidData`] if the stored blob is inconsistent.
    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)>;

    /// A committed blob's length and metadata, without opening it for reading. The default
    /// uses [`open`](Storage::open); backends where opening costs more should override it.
    ///
    /// # Errors
    /// As [`open`](Storage::open).
    fn info(&self, name: &str) -> io::Result<BlobInfo> {
        self.open(name).map(|(_, info)| info)
    }

    /// Deletes a committed blob. Readers that are already open keep working.
    ///
    /// # Errors
    /// [`io::ErrorKind::NotFound`] if no committed blob has that name, or an I/O error.
    fn remove(&self, name: &str) -> io::Result<()>;

    /// Lists every committed blob with its length and metadata, without reading content.
    ///
    /// Implementations may delete leftovers they find on the way (an incomplete commit of an
    /// earlier run), but never a commit, replacement or removal in flight, nor a blob that
    /// merely cannot be read at the moment (it is left out of the listing instead). A cache
    /// lists once, when it opens the storage.
    ///
    /// # Errors
    /// An I/O error that prevents listing at all; individual bad blobs are skipped instead.
    fn list(&self) -> io::Result<Vec<BlobInfo>>;

    /// Lists the committed blobs whose names start with `prefix`, as [`list`](Storage::list)
    /// would. A cache calls it to look a key up directly (with the 33-character prefix its
    /// blob names share) while its index is still loading.
    ///
    /// The default filters [`list`](Storage::list); a backend that can find a prefix without
    /// listing everything should override it ([`DiskStorage`] reads one shard directory).
    ///
    /// # Errors
    /// As [`list`](Storage::list).
    fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        let mut all = self.list()?;
        all.retain(|b| b.name.starts_with(prefix));
        Ok(all)
    }

    /// Lists every committed blob, as [`list`](Storage::list) does, in batches handed to
    /// `each` as they are read, so that a listing of millions of blobs never holds them all:
    /// a cache loads its index this way, in the background. `each` may be called from several
    /// threads at once; when it returns [`ControlFlow::Break`], listing stops as soon as it
    /// can. **The implementation must** put blobs whose names have the same first two
    /// characters in the same batch (a cache relies on it to see every version of a key at
    /// once).
    ///
    /// The default hands the whole of [`list`](Storage::list) over as one batch.
    ///
    /// # Errors
    /// As [`list`](Storage::list). Batches already handed over stay handed over.
    fn list_batches(
        &self,
        each: &(dyn Fn(Vec<BlobInfo>) -> ControlFlow<()> + Sync),
    ) -> io::Result<()> {
        let _ = each(self.list()?);
        Ok(())
    }

    /// A mark of the storage's state, read before describing it for
    /// [`put_hint`](Storage::put_hint): every commit or removal after it is one the hint may
    /// not show. The default is always 0, with no hints.
    fn hint_epoch(&self) -> u64 {
        0
    }

    /// Saves `hint`, an opaque description of the committed blobs written by their owner (a
    /// cache), so that the next [`take_hint`](Storage::take_hint) can stand in for a full
    /// listing. `epoch` is the [`hint_epoch`](Storage::hint_epoch) read before the hint was
    /// made. Returns whether it was saved.
    ///
    /// **The caller guarantees** that the hint shows every blob committed, and no blob
    /// removed, before `epoch` was read (it may show some later changes, or a blob whose
    /// commit is under way and then fails).
    ///
    /// **The implementation must** never let a hint be taken without every change since its
    /// `epoch`: either it records those changes and hands them over with the hint
    /// ([`SavedHint::changes`]; [`DiskStorage`] journals them, so a hint stays usable after
    /// a crash), or it forgets the hint at the first change. It saves the hint atomically
    /// (whole or not at all). The default saves nothing.
    ///
    /// # Errors
    /// Any I/O error of saving it (nothing is saved then).
    fn put_hint(&self, hint: &[u8], epoch: u64) -> io::Result<bool> {
        let _ = (hint, epoch);
        Ok(false)
    }

    /// Takes the saved hint, if there is one (see [`put_hint`](Storage::put_hint)), with the
    /// changes made since it was made, oldest first. The default has none.
    ///
    /// # Errors
    /// Any I/O error of reading it.
    fn take_hint(&self) -> io::Result<Option<SavedHint>> {
        Ok(None)
    }

    /// How many bytes of changes the storage has recorded since the hint in place was made
    /// (see [`put_hint`](Storage::put_hint)): `Some(u64::MAX)` if no hint is in place, `None`
    /// (the default) if the storage keeps no hints. A cache saves a new hint when this grows
    /// large, so that what an open after a crash replays stays small.
    fn hint_backlog(&self) -> Option<u64> {
        None
    }

    /// Replaces the metadata of a committed blob, atomically.
    ///
    /// # Errors
    /// [`io::ErrorKind::NotFound`] if no committed blob has that name, or an I/O error.
    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()>;
}

/// A saved hint and the changes since, as [`Storage::take_hint`] hands them over.
pub struct SavedHint {
    /// The owner's description, as it was saved.
    pub hint: Box<dyn HintReader>,
    /// Every commit and removal since the hint's epoch, oldest first (and perhaps some older
    /// ones, and commits that never completed: a crash between recording a commit and
    /// making it). Applying them in order to what the hint describes gives the storage's
    /// blobs.
    pub changes: Vec<Change>,
}

impl fmt::Debug for SavedHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SavedHint")
            .field("changes", &self.changes.len())
            .finish_non_exhaustive()
    }
}

/// A change to the set of committed blobs, as [`SavedHint::changes`] lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A blob was committed (or its metadata replaced).
    Committed(BlobInfo),
    /// The blob of this name was removed.
    Removed(String),
}

/// A saved hint as [`Storage::take_hint`] hands it over: read twice (once to check it, once
/// to use it), hence `Seek`. Implemented for every `Read + Seek + Send` type (a `File`, a
/// `Cursor<Vec<u8>>`).
pub trait HintReader: io::Read + io::Seek + Send {}

impl<T: io::Read + io::Seek + Send> HintReader for T {}

/// Appends to one uncommitted blob. Dropping it without [`commit`](BlobWriter::commit) discards
/// the blob.
pub trait BlobWriter: Send + fmt::Debug {
    /// Appends all of `buf`.
    ///
    /// # Errors
    /// Any I/O error; after one the blob must not be committed.
    fn write(&mut self, buf: &[u8]) -> io::Result<()>;

    /// Makes every byte appended so far readable through this blob's readers.
    ///
    /// # Errors
    /// Any I/O error.
    fn publish(&mut self) -> io::Result<()>;

    /// A reader of this blob. It stays valid after commit and after the writer is dropped.
    fn reader(&self) -> Arc<dyn BlobReader>;

    /// Publishes, then commits the blob with `meta` as its metadata: it becomes visible to
    /// [`Storage::open`] and [`Storage::list`] and, for persistent storage, survives a restart.
    /// The metadata is handed over, so a backend that keeps it (like [`MemoryStorage`]) needs
    /// no copy.
    ///
    /// Committing a name that is already committed replaces that blob (existing readers of
    /// the old one keep their bytes). While the replacement is under way, an `open` of the
    /// name finds the old blob, the new one, or none; never a mix. If the commit fails or
    /// crashes part-way, the name may be left with neither.
    ///
    /// # Errors
    /// Any I/O error; the blob is then discarded.
    fn commit(self: Box<Self>, meta: Vec<u8>) -> io::Result<()>;
}

/// The blocks blobs are hashed in, in blob offsets: [`DiskStorage`]'s integrity blocks, whose
/// hashes [`BlobReader::known_hash`] hands out, and the pieces the shared tier hashes its
/// chunks in so that it can take those hashes.
#[cfg_attr(not(any(unix, feature = "shared")), allow(dead_code))]
pub(crate) const HASH_BLOCK: u64 = 1 << 20;

/// Positional reads of one blob, shared by every reader of it.
pub trait BlobReader: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; returns how many were read (0 only at the end
    /// of what is stored).
    ///
    /// # Errors
    /// Any I/O error, or [`io::ErrorKind::InvalidData`] if the bytes fail an integrity check.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Zero-copy fast path: up to `max` bytes at `offset` as a shared [`Bytes`], when the
    /// backend can hand out its own buffers without copying. `None` means "use
    /// [`read_at`](BlobReader::read_at)"; the default returns `None`.
    fn read_bytes(&self, offset: u64, max: usize) -> Option<io::Result<Bytes>> {
        let _ = (offset, max);
        None
    }

    /// The blake3 hash of the bytes `[offset, offset + len)`, if the implementation already
    /// has it at hand; `None` otherwise, and the caller hashes the bytes itself. It must never
    /// compute a hash for the call (callers ask to save that work) and must only answer with
    /// the hash of exactly the bytes its reads return for that range. [`DiskStorage`] knows
    /// the hash of each whole 1 MiB block (`offset` a multiple of 1 MiB) as soon as its
    /// writer has hashed it, and of the last, partial one once the blob is committed. The
    /// default returns `None`.
    fn known_hash(&self, offset: u64, len: u64) -> Option<[u8; 32]> {
        let _ = (offset, len);
        None
    }

    /// Called when the last reader of the blob has gone away (it may get new ones later).
    /// Implementations may drop caches; [`DiskStorage`] re-examines the file at the next use
    /// and forgets which blocks it has checked if the file changed. The default does nothing.
    fn idle(&self) {}

    /// Asks the backend to make sure that what it is about to serve is still what was
    /// committed, before the next read. Callers (the stream readers) call it when a reader
    /// starts reading and whenever a read enters a 1 MiB block that reader has not just
    /// read: sequentially, with `read_at` or after a seek. It must be cheap (it runs about
    /// once per MiB read) and must not fail; a problem it finds is reported by the reads that
    /// follow. [`DiskStorage`] compares the file's `fstat` stamp with the one under which it
    /// checked blocks and, if it changed, forgets those checks so every block is hashed again
    /// before it is served. The default does nothing.
    fn revalidate(&self) {}

    /// Zero-copy sending: where the bytes `[offset, offset + len)` lie in one regular file,
    /// **if** every one of them has already passed the backend's integrity checks under the
    /// file's current state, so that the caller may hand them to the kernel (`sendfile`,
    /// `copy_file_range`) instead of reading them. `None` otherwise: the range is not (yet)
    /// checked, not in one file, not committed, or the backend has no files; the caller then
    /// reads, and those reads check. It must not hash anything for the call (it is asked on
    /// every response) and must first do what [`revalidate`](BlobReader::revalidate) does,
    /// so a file changed since its blocks were checked is refused. The default returns
    /// `None`.
    ///
    /// The bytes are read from the file by whoever sends them, later: a change made to the
    /// file between this call and that read is not detected, as for a read that races such
    /// a change.
    fn file_range(&self, offset: u64, len: u64) -> Option<FileRange> {
        let _ = (offset, len);
        None
    }
}

/// A range of a blob's bytes as it lies in a file, every byte of it checked: what
/// [`BlobReader::file_range`] hands out for zero-copy sending (and
/// [`Reader::take_file_range`](crate::Reader::take_file_range) for a reader's next bytes).
///
/// Holding one keeps the file open (also after its entry is removed or replaced), not the
/// entry in use: hold the reader too while the bytes are sent, so eviction leaves the entry
/// alone meanwhile.
#[derive(Debug, Clone)]
pub struct FileRange {
    file: Arc<std::fs::File>,
    offset: u64,
    len: u64,
}

impl FileRange {
    /// `len` bytes of `file` starting at `offset`.
    pub fn new(file: Arc<std::fs::File>, offset: u64, len: u64) -> FileRange {
        FileRange { file, offset, len }
    }

    /// The open file (read it at [`offset`](FileRange::offset), e.g. with `pread` or
    /// `sendfile`; its own cursor means nothing).
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }

    /// Where the range starts in the file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// How many bytes it spans.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it spans no byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// Forwarding impls, so boxed and shared storages (and their writers and readers) can be used
// wherever a `Storage` is expected, e.g. `FaultyStorage::new(boxed)`. Every method is forwarded,
// including the provided `read_bytes`, so wrapping never loses the zero-copy path.

/// Forwards `Storage` and `BlobReader` through a smart pointer.
macro_rules! forward_through {
    ($ptr:ident) => {
        impl<S: Storage + ?Sized> Storage for $ptr<S> {
            fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
                (**self).create(name)
            }
            fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
                (**self).open(name)
            }
            fn info(&self, name: &str) -> io::Result<BlobInfo> {
                (**self).info(name)
            }
            fn remove(&self, name: &str) -> io::Result<()> {
                (**self).remove(name)
            }
            fn list(&self) -> io::Result<Vec<BlobInfo>> {
                (**self).list()
            }
            fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
                (**self).list_prefix(prefix)
            }
            fn list_batches(
                &self,
                each: &(dyn Fn(Vec<BlobInfo>) -> ControlFlow<()> + Sync),
            ) -> io::Result<()> {
                (**self).list_batches(each)
            }
            fn hint_epoch(&self) -> u64 {
                (**self).hint_epoch()
            }
            fn put_hint(&self, hint: &[u8], epoch: u64) -> io::Result<bool> {
                (**self).put_hint(hint, epoch)
            }
            fn take_hint(&self) -> io::Result<Option<SavedHint>> {
                (**self).take_hint()
            }
            fn hint_backlog(&self) -> Option<u64> {
                (**self).hint_backlog()
            }
            fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
                (**self).set_meta(name, meta)
            }
        }

        impl<R: BlobReader + ?Sized> BlobReader for $ptr<R> {
            fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
                (**self).read_at(buf, offset)
            }
            fn read_bytes(&self, offset: u64, max: usize) -> Option<io::Result<Bytes>> {
                (**self).read_bytes(offset, max)
            }
            fn known_hash(&self, offset: u64, len: u64) -> Option<[u8; 32]> {
                (**self).known_hash(offset, len)
            }
            fn idle(&self) {
                (**self).idle()
            }
            fn revalidate(&self) {
                (**self).revalidate()
            }
            fn file_range(&self, offset: u64, len: u64) -> Option<FileRange> {
                (**self).file_range(offset, len)
            }
        }
    };
}

forward_through!(Box);
forward_through!(Arc);

impl<W: BlobWriter + ?Sized> BlobWriter for Box<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        (**self).write(buf)
    }
    fn publish(&mut self) -> io::Result<()> {
        (**self).publish()
    }
    fn reader(&self) -> Arc<dyn BlobReader> {
        (**self).reader()
    }
    fn commit(self: Box<Self>, meta: Vec<u8>) -> io::Result<()> {
        (*self).commit(meta)
    }
}

/// A committed blob as [`Storage::list`] and [`Storage::open`] report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// The blob's name.
    pub name: String,
    /// Its length in bytes.
    pub len: u64,
    /// The metadata it was committed with (opaque to storage).
    pub meta: Vec<u8>,
}

/// Longest accepted blob name.
pub const MAX_NAME_LEN: usize = 128;

/// Checks that `name` is a valid blob name: 1 to [`MAX_NAME_LEN`] lower-case ASCII letters,
/// digits, `-` or `_`. Such names are safe as file names on every platform, also where file
/// names ignore case (there `Ab` and `ab` would share one file, hence no upper case).
///
/// # Errors
/// [`io::ErrorKind::InvalidInput`] naming the problem.
pub fn validate_name(name: &str) -> io::Result<()> {
    // Every byte is checked, without an early exit, so the loop vectorizes (it runs for every
    // new blob; the byte-at-a-time version was a measurable part of a tiny entry's insert).
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().fold(true, |ok, b| ok & name_byte_ok(b));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "invalid blob name {name:?}: use 1 to {MAX_NAME_LEN} lower-case ASCII letters, digits, '-' or '_'"
            ),
        ))
    }
}

/// `[a-z0-9_-]`, branch-free.
fn name_byte_ok(b: u8) -> bool {
    (b.wrapping_sub(b'a') < 26) | (b.wrapping_sub(b'0') < 10) | (b == b'-') | (b == b'_')
}

pub(crate) fn not_found(name: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("no committed blob {name:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("abc-def_09").is_ok());
        assert!(validate_name("abc-DEF_09").is_err());
        // Every byte value against the obvious definition.
        for b in 0..=255u8 {
            let want = b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_';
            assert_eq!(name_byte_ok(b), want, "{b:#x}");
        }
        for bad in ["", "../x", "a/b", "a.meta", "x\0", &"a".repeat(129), "é"] {
            assert_eq!(
                validate_name(bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn storage_is_object_safe() {
        let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        assert!(s.list().unwrap().is_empty());
    }
}
