//! Disk storage; the layout and guarantees are documented on [`DiskStorage`].

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BufMut;
use tempfile::TempPath;

use super::{BlobInfo, BlobReader, BlobWriter, Storage, not_found, validate_name};
use crate::codec::Cursor;
use crate::error::{Error, Result};

/// Size of an integrity block.
pub(crate) const BLOCK: u64 = 1 << 20;
const MAGIC: &[u8; 8] = b"SCMETA01";
const DATA_DIR: &str = "v1";
const TMP_DIR: &str = "tmp";
const META_EXT: &str = "meta";
/// How much older than the storage's opening a leftover must be for `list` to delete it.
const LEFTOVER_MARGIN: Duration = Duration::from_secs(2);
/// The largest record the format allows: its fixed fields, the hashes of a blob of
/// [`DiskStorage::MAX_BLOB_LEN`] and [`DiskStorage::MAX_META_LEN`] of metadata (48 MiB).
/// A bigger record file is damage, rejected before anything is allocated for it.
const MAX_RECORD_LEN: u64 =
    8 * 5 + 32 * (DiskStorage::MAX_BLOB_LEN / BLOCK + 2) + DiskStorage::MAX_META_LEN as u64;

/// Blobs stored as files in a directory, committed by atomic rename, checked block by block
/// with blake3.
///
/// All readers of a blob share one file handle and use positional reads, so opening another
/// reader costs no system call. The directory is locked against other processes until every
/// clone of this handle is dropped or [`unlock`](DiskStorage::unlock) is called: with an
/// exclusive OS lock (`flock`) on the directory itself, so the lock cannot be lost by
/// deleting a file in it.
///
/// A writer hashes the first 1 MiB block itself; from the second block on, a helper thread
/// hashes copies of the blocks while the writer goes on writing (a blob of one block never
/// starts one, and there are at most as many helpers as cores: other writers hash inline).
///
/// # Layout
///
/// ```text
/// <dir>/                     itself held with an exclusive OS file lock while a DiskStorage is open
///   LOCK                     also locked, for processes of earlier versions (which lock only
///                            this file); deleting it unlocks nothing
///   tmp/                     blobs being written and metadata being replaced (wiped at open)
///   v1/<ab>/<name>           committed data; <ab> is the first two characters of the name
///   v1/<ab>/<name>.meta      its metadata record (below)
/// ```
///
/// # Metadata record (`.meta`, little endian)
///
/// | field | size |
/// | --- | --- |
/// | magic `b"SCMETA01"` | 8 |
/// | data length | 8 |
/// | block size (1 MiB) | 8 |
/// | block count `n` | 8 |
/// | blake3 of each block | 32 × n |
/// | content digest: blake3 of the concatenated block hashes | 32 |
/// | length of the caller's metadata `m` | 8 |
/// | the caller's metadata | m |
/// | blake3 of everything above | 32 |
///
/// `n` is at most 2²⁰ (a blob of at most [`MAX_BLOB_LEN`](DiskStorage::MAX_BLOB_LEN), 1 TiB)
/// and `m` at most [`MAX_META_LEN`](DiskStorage::MAX_META_LEN) (16 MiB), so no record is
/// longer than 48 MiB (+ 104 bytes): a record file longer than that is damaged, known so
/// from its size without reading it. Writers refuse to go past either limit.
///
/// # Hostile files
///
/// Storage only creates regular files and opens nothing else: records and data files are
/// opened without following symbolic links and without waiting (`O_NOFOLLOW | O_NONBLOCK`),
/// and their type is checked on the open handle; listing looks at names with `lstat`. A
/// symbolic link, FIFO, socket or device where a record or data file belongs is damage: `open`
/// reports it as [`Error::Corrupt`], and listing discards the blob, removing that name itself
/// (a link, never its target). So opening a directory stays bounded in time and memory
/// whatever was put in it, and the other blobs are listed as usual.
///
/// # Commit and crash safety
///
/// Data is written to `tmp/`. [`commit`](BlobWriter::commit) (optionally fsyncs the
/// data), removes the record of a blob it replaces, renames the data into `v1/`, then writes
/// the record through `tmp/` (optionally fsynced) and renames it next to the data (optionally
/// fsyncing the directory; a failure here removes both, so a commit reported as failed is
/// never reloaded). The record is the commit point. At listing, a record that fails its
/// checksum or is too long, and a non-regular file (above), are discarded; data without a record (an interrupted commit) and a record whose
/// data length does not match are deleted if they predate the storage's opening, and only
/// left out of the listing otherwise, since a commit, replacement or removal in flight passes
/// through those states. Files that cannot be read at the moment (EMFILE, EACCES, EIO...)
/// are left out, never deleted; `open` and `info` report such errors as they are, and
/// `NotFound` or `InvalidData` only for a missing blob or one proven damaged.
/// Without the sync option a
/// power loss can lose recent commits (never expose half of one: the record's checksum and the
/// data length are checked, and each block's hash on read); with it, a committed blob survives.
///
/// # Integrity
///
/// Once a blob is committed, reads check the 1 MiB blocks they touch against their hashes: a
/// block is read whole and hashed the first time it is read, and then served straight from
/// the file for as long as the file's `fstat` stamp (size, inode, modification and change
/// times) stays what it was when the block was checked. A blob opened with
/// [`Storage::open`] (after a restart, say) starts with no block checked; a blob this handle
/// committed starts with every block checked, since the writer hashed exactly the bytes it
/// wrote (so reading back what was just written costs no second hash).
///
/// The stamp is compared again ([`BlobReader::revalidate`]) whenever a stream reader starts
/// reading and whenever one of its reads enters a 1 MiB block it has not just read —
/// sequentially, with `read_at`, or after a seek — and at the first read after the blob was
/// idle ([`BlobReader::idle`]); a read that stays within the block costs no `fstat`. If the
/// stamp changed, every checked block is forgotten (a check racing that is withdrawn), so
/// each block is hashed again before it is served. A file altered on disk, at rest or while
/// the blob is in use, is thus caught by the next read of each altered block that enters it
/// — by any reader, new or old — without reading the whole blob first; a block that fails is
/// an [`Error::Corrupt`] read error, never data.
///
/// Limits, by design: a reader that keeps reading *within* one block it already read is
/// served from the file without a new comparison, so a change made in the middle of that
/// block's reads may reach it (the next block it enters, or any other reader entering the
/// block, notices); and a change that leaves the stamp as it was is not noticed until a
/// process opens the file afresh (e.g. after a restart) — this covers damage that bypasses
/// the file system (a bad sector under the page cache), a write that restores the times, and,
/// on file systems or kernels that keep coarse timestamps (one per clock tick; Linux before
/// 6.13 on most file systems), a write landing in the same tick as the previous stamp.
///
/// Bytes read while the blob is still being written are not checked: they were just written
/// by this process.
#[derive(Debug, Clone)]
pub struct DiskStorage {
    inner: Arc<DiskInner>,
}

#[derive(Debug)]
struct DiskInner {
    dir: PathBuf,
    data: PathBuf,
    tmp: PathBuf,
    sync: bool,
    /// How many block-hashing helpers may run process-wide before this storage's writers hash
    /// inline: the number of cores.
    hash_helpers: usize,
    /// Lock: this mutex. The directory itself and `<dir>/LOCK`, each held with an exclusive
    /// OS lock until dropped or [`DiskStorage::unlock`]ed.
    lock: Mutex<Option<(File, File)>>,
    /// When this storage opened the directory: `list` deletes leftovers only if they are
    /// older (by `LEFTOVER_MARGIN`), so it never deletes a commit or removal in flight.
    opened: SystemTime,
    /// Lock: this mutex, held while a shard is created and its parent fsynced (sync mode
    /// only). Shard directories known to be durable; a commit into any other makes it so
    /// first, also when another writer created it a moment ago.
    durable_shards: Mutex<HashSet<PathBuf>>,
}

impl DiskStorage {
    /// The longest blob this storage stores: 1 TiB. A write past it fails
    /// ([`io::ErrorKind::FileTooLarge`]); it bounds the size of a record (see
    /// "Metadata record"), so that a record file larger than any record can be is known
    /// damaged without reading it.
    pub const MAX_BLOB_LEN: u64 = 1 << 40;

    /// The most metadata a blob can be committed with: 16 MiB. A commit or
    /// [`set_meta`](Storage::set_meta) with more fails ([`io::ErrorKind::InvalidInput`]).
    pub const MAX_META_LEN: usize = 16 << 20;

    /// Opens (creating if needed) a storage directory: takes its lock, wipes `tmp/`.
    ///
    /// # Errors
    /// [`Error::Locked`] if another live process (or another open `DiskStorage` in this one)
    /// holds the directory (after waiting up to 250 ms, in case the holder is a child process
    /// between its start and its `exec`); [`Error::Io`] if it cannot be created or read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir.as_ref(), false)
    }

    /// Like [`open`](Self::open); with `sync`, every commit fsyncs data, metadata and directory
    /// before returning, so committed blobs survive a power loss.
    ///
    /// # Errors
    /// As for [`open`](Self::open).
    pub fn open_with(dir: &Path, sync: bool) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        // The lock is on the directory itself, which no one deletes while we use it.
        // (Regression: it was on `<dir>/LOCK` alone, so deleting that file, as temp cleaners
        // do with old untouched files, let a second process in, which wiped `tmp/` under our
        // writers.) `LOCK` is still locked too, for processes of earlier versions.
        let dir_lock = File::open(dir).map_err(|e| Error::io("open", dir, e))?;
        try_lock(&dir_lock, dir, dir)?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open", &lock_path, e))?;
        try_lock(&lock, &lock_path, dir)?;
        let tmp = dir.join(TMP_DIR);
        match fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("wipe", &tmp, e)),
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io("create directory", &tmp, e))?;
        let data = dir.join(DATA_DIR);
        fs::create_dir_all(&data).map_err(|e| Error::io("create directory", &data, e))?;
        if sync {
            // The entries for `tmp/` and `v1/` themselves.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("fsync", dir, e))?;
        }
        Ok(DiskStorage {
            inner: Arc::new(DiskInner {
                dir: dir.to_path_buf(),
                data,
                tmp,
                sync,
                hash_helpers: std::thread::available_parallelism().map_or(1, |n| n.get()),
                lock: Mutex::new(Some((dir_lock, lock))),
                opened: SystemTime::now(),
                durable_shards: Mutex::default(),
            }),
        })
    }

    /// Tests: how many hashing helpers writers may use (0: always inline; `usize::MAX`: always
    /// a helper), on a storage no other handle shares yet.
    #[cfg(test)]
    fn with_hash_helpers(mut self, n: usize) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("not shared yet")
            .hash_helpers = n;
        self
    }

    /// Releases the directory lock now rather than when the last handle drops, so another
    /// `DiskStorage` (in this or another process) can open the directory while readers or
    /// writers of this one are still alive. A [`Cache`](crate::Cache) that opened the storage
    /// does this when it is dropped.
    ///
    /// Existing readers keep working. A writer still open here may then fail to commit (the
    /// next opener wipes `tmp/`): it gets an error and its stream is aborted, never half-served.
    pub fn unlock(&self) {
        drop(
            self.inner
                .lock
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take(),
        );
    }

    /// The directory this storage lives in.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The data file of a committed blob (for tools and tests).
    pub fn blob_path(&self, name: &str) -> PathBuf {
        self.inner.shard(name).join(name)
    }
}

/// How long `try_lock` waits out a lock that may be held only in passing.
const LOCK_GRACE: Duration = Duration::from_millis(250);

/// Takes the exclusive OS lock on `file` (at `path`), or [`Error::Locked`] naming `dir`.
///
/// A lock that is taken is waited out for up to `LOCK_GRACE` first: a child process that
/// this process is starting shares its open files, and so the lock of a directory it just
/// released, until the child's `exec` closes them. (Regression: dropping a cache and opening
/// the directory again failed now and then with `Locked` while another thread spawned a
/// process.)
fn try_lock(file: &File, path: &Path, dir: &Path) -> Result<()> {
    let until = std::time::Instant::now() + LOCK_GRACE;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < until => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(Error::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io("lock", path, e)),
        }
    }
}

impl DiskInner {
    fn shard(&self, name: &str) -> PathBuf {
        let cut = name.char_indices().nth(2).map_or(name.len(), |(i, _)| i);
        self.data.join(&name[..cut])
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.shard(name).join(format!("{name}.{META_EXT}"))
    }

    /// Creates `shard` if needed; in sync mode, also makes its entry in `v1/` durable before
    /// the first commit into it (regression: a writer used to fsync `v1/` only if it had
    /// created the shard itself, so a second writer racing in could report a commit durable
    /// whose directory was not yet).
    fn ensure_shard(&self, shard: &Path) -> io::Result<()> {
        if !self.sync {
            if !shard.exists() {
                fs::create_dir_all(shard)?;
            }
            return Ok(());
        }
        let mut durable = self
            .durable_shards
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if !durable.contains(shard) {
            fs::create_dir_all(shard)?;
            File::open(&self.data)?.sync_all()?;
            durable.insert(shard.to_path_buf());
        }
        Ok(())
    }

    /// Whether the file at `md` was last changed before this storage opened its directory
    /// (with a margin for coarse file times): then no commit or removal of ours is using it.
    fn predates_open(&self, md: &fs::Metadata) -> bool {
        md.modified()
            .is_ok_and(|t| t + LEFTOVER_MARGIN < self.opened)
    }

    fn fsync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.sync {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn write_meta(&self, name: &str, record: &[u8]) -> io::Result<()> {
        let (mut file, staged) = self.staged_file(name)?;
        file.write_all(record)?;
        if self.sync {
            file.sync_data()?;
        }
        drop(file);
        staged.persist(self.meta_path(name)).map_err(|e| e.error)?;
        Ok(())
    }

    /// A new file in `tmp/` (named after `prefix`, created exclusively, deleted when the
    /// returned path drops unless persisted). Errors are the operating system's own, with
    /// their codes: the cache tells EMFILE from damage by them. (`tempfile`'s builders wrap
    /// errors in a type whose `source` hides the code, so a writer that ran out of file
    /// descriptors could not be told apart.)
    fn staged_file(&self, prefix: &str) -> io::Result<(File, TempPath)> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = self
                .tmp
                .join(format!("{prefix}.{:x}.{n:x}", std::process::id()));
            match File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => {
                    return match TempPath::try_from_path(&path) {
                        Ok(staged) => Ok((file, staged)),
                        Err(e) => {
                            let _ = fs::remove_file(&path);
                            Err(e)
                        }
                    };
                }
                // Left by an earlier process with the same id (`tmp/` is wiped at open, so
                // only if that failed): take the next number.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// A parsed metadata record.
#[derive(Debug)]
struct Record {
    len: u64,
    hashes: Vec<[u8; 32]>,
    meta: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 5 + 32 * (self.hashes.len() + 2) + self.meta.len());
        out.put_slice(MAGIC);
        out.put_u64_le(self.len);
        out.put_u64_le(BLOCK);
        out.put_u64_le(self.hashes.len() as u64);
        let mut digest = blake3::Hasher::new();
        for h in &self.hashes {
            out.put_slice(h);
            digest.update(h);
        }
        out.put_slice(digest.finalize().as_bytes());
        out.put_u64_le(self.meta.len() as u64);
        out.put_slice(&self.meta);
        let check = blake3::hash(&out);
        out.put_slice(check.as_bytes());
        out
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Record, &'static str> {
        if bytes.len() < 32 {
            return Err("record too short");
        }
        if bytes.len() as u64 > MAX_RECORD_LEN {
            return Err("record longer than the format allows");
        }
        let (body, check) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != check {
            return Err("record checksum mismatch");
        }
        let mut cur = Cursor::new(body, "record truncated");
        if cur.take(8)? != MAGIC {
            return Err("bad magic");
        }
        let len = cur.u64_le()?;
        if len > DiskStorage::MAX_BLOB_LEN {
            return Err("blob longer than the format allows");
        }
        if cur.u64_le()? != BLOCK {
            return Err("unsupported block size");
        }
        let n = cur.u64_le()?;
        if n != len.div_ceil(BLOCK) {
            return Err("block count does not match length");
        }
        let mut hashes = Vec::with_capacity(n.min(1 << 20) as usize);
        let mut digest = blake3::Hasher::new();
        for _ in 0..n {
            let h: [u8; 32] = cur.array()?;
            digest.update(&h);
            hashes.push(h);
        }
        if cur.take(32)? != digest.finalize().as_bytes() {
            return Err("content digest mismatch");
        }
        let m = cur.u64_le()?;
        if m > DiskStorage::MAX_META_LEN as u64 {
            return Err("metadata longer than the format allows");
        }
        let meta = cur
            .take(usize::try_from(m).map_err(|_| "metadata too long")?)?
            .to_vec();
        cur.finish("trailing bytes")?;
        Ok(Record { len, hashes, meta })
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> io::Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
    .into()
}

/// Metadata longer than a record may hold is refused before anything is written.
fn check_meta_len(meta: &[u8]) -> io::Result<()> {
    if meta.len() > DiskStorage::MAX_META_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} bytes of metadata: disk storage allows {}",
                meta.len(),
                DiskStorage::MAX_META_LEN
            ),
        ));
    }
    Ok(())
}

/// Opens `path` for reading if it is a regular file, with its metadata. A symbolic link is
/// not followed (`O_NOFOLLOW`), a FIFO or device is not waited on (`O_NONBLOCK`), and the
/// type is checked on the open handle: anything but a regular file is damage
/// ([`Error::Corrupt`], kind `InvalidData`), since storage creates nothing else. Other errors
/// are returned as they are (`NotFound` only if the file is missing); `EINTR` is retried.
fn open_regular(path: &Path) -> io::Result<(File, fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = loop {
        match File::options()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
        {
            Ok(file) => break file,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            // ELOOP: a symbolic link (with O_NOFOLLOW); ENXIO: a socket, or a device with no
            // driver. Damage only if the name is indeed not a regular file.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ELOOP | libc::ENXIO)) => {
                return Err(match fs::symlink_metadata(path) {
                    Ok(md) if !md.file_type().is_file() => not_regular(path, &md),
                    _ => e,
                });
            }
            Err(e) => return Err(e),
        }
    };
    let md = file.metadata()?;
    if !md.file_type().is_file() {
        return Err(not_regular(path, &md));
    }
    Ok((file, md))
}

fn not_regular(path: &Path, md: &fs::Metadata) -> io::Error {
    corrupt(
        path,
        format!("not a regular file but {}", file_kind(md.file_type())),
    )
}

fn file_kind(t: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown type"
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[derive(Debug)]
struct DiskWriter {
    storage: Arc<DiskInner>,
    name: String,
    file: Arc<File>,
    /// The reader every reader of this blob shares; it starts checking hashes at commit.
    reader: Arc<DiskReader>,
    /// The staged file; deleted when dropped unless committed.
    staged: TempPath,
    len: u64,
    /// Hash of the first block, as it is written.
    block: blake3::Hasher,
    /// Hashes of the blocks hashed so far on this thread or collected from the helper.
    hashes: Vec<[u8; 32]>,
    /// Once the blob grows past its first block: the rest, and who hashes it.
    tail: Option<Tail>,
    /// Wall-clock time (seconds, nanoseconds since the epoch) just after the last write: a
    /// file modified later has a later modification time.
    last_write: Option<(i64, i64)>,
}

/// `e`, or the storage's "no committed blob" error naming `name` if the file was missing.
fn named_not_found(e: io::Error, name: &str) -> io::Error {
    if e.kind() == io::ErrorKind::NotFound {
        not_found(name)
    } else {
        e
    }
}

/// Now, as file times are kept (seconds, nanoseconds since the epoch).
fn wall_clock() -> Option<(i64, i64)> {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some((
        i64::try_from(d.as_secs()).ok()?,
        i64::from(d.subsec_nanos()),
    ))
}

/// The blocks of a blob past its first: the writer copies them into `fill`, and once a whole
/// one is there a helper thread hashes them while the writer goes on writing, so that the
/// writer's `write(2)` and the hashing overlap (in series they capped a disk write near 0.65×
/// of a raw one). A blob that never fills its second block starts no thread; with no helper to
/// be had (see `HELPERS`), blocks are hashed here.
struct Tail {
    /// The block being filled.
    fill: Vec<u8>,
    helper: Option<Helper>,
    /// No helper could be had: every block is hashed on the writer's thread.
    inline: bool,
}

impl fmt::Debug for Tail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tail")
            .field("filled", &self.fill.len())
            .field("helper", &self.helper.is_some())
            .finish()
    }
}

/// A thread hashing whole blocks in the order they are sent; at most two wait for it (the
/// writer waits beyond that), and their buffers come back for reuse.
struct Helper {
    blocks: Option<mpsc::SyncSender<Vec<u8>>>,
    spare: mpsc::Receiver<Vec<u8>>,
    /// Returns the hashes of every block it was sent, in order.
    thread: Option<JoinHandle<Vec<[u8; 32]>>>,
}

/// Hashing helpers running, process-wide; `DiskStorage` allows one per core (more would only
/// compete for the same cores), and writers beyond that hash on their own threads.
static HELPERS: AtomicUsize = AtomicUsize::new(0);

/// One of the `HELPERS` places, given back when dropped.
struct HelperPlace;

impl HelperPlace {
    fn take(max: usize) -> Option<HelperPlace> {
        HELPERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| HelperPlace)
    }
}

impl Drop for HelperPlace {
    fn drop(&mut self) {
        HELPERS.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Helper {
    /// A helper, unless `max` are running already or no thread can be started.
    fn start(max: usize) -> Option<Helper> {
        let place = HelperPlace::take(max)?;
        let (blocks, todo) = mpsc::sync_channel::<Vec<u8>>(2);
        let (done, spare) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("streamcache-hash".into())
            .spawn(move || {
                let _place = place;
                let mut hashes = Vec::new();
                for block in todo {
                    hashes.push(*blake3::hash(&block).as_bytes());
                    let _ = done.send(block);
                }
                hashes
            })
            .ok()?;
        Some(Helper {
            blocks: Some(blocks),
            spare,
            thread: Some(thread),
        })
    }

    /// An empty block buffer: one the helper is done with, or a new one. Keeps no more than
    /// that one (a slow writer would otherwise hold every buffer it ever used).
    fn buffer(&mut self) -> Vec<u8> {
        let mut reuse = None;
        while let Ok(b) = self.spare.try_recv() {
            reuse.get_or_insert(b);
        }
        match reuse {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(BLOCK as usize),
        }
    }

    fn send(&mut self, block: Vec<u8>) -> io::Result<()> {
        if self
            .blocks
            .as_ref()
            .is_some_and(|tx| tx.send(block).is_ok())
        {
            return Ok(());
        }
        // The helper is gone: its join says why.
        self.join()?;
        Err(io::Error::other("the block hashing thread stopped"))
    }

    /// Waits for the helper to hash everything sent; its hashes, in order.
    fn join(&mut self) -> io::Result<Vec<[u8; 32]>> {
        drop(self.blocks.take());
        let thread = self
            .thread
            .take()
            .ok_or_else(|| io::Error::other("the block hashing thread stopped"))?;
        thread
            .join()
            .map_err(|_| io::Error::other("the block hashing thread panicked"))
    }
}

impl Tail {
    fn new() -> Tail {
        Tail {
            fill: Vec::with_capacity(BLOCK as usize),
            helper: None,
            inline: false,
        }
    }

    /// `fill` holds a whole block: hashes it (on the helper, started now if need be, or into
    /// `hashes` here) and starts the next.
    fn block_full(&mut self, hashes: &mut Vec<[u8; 32]>, max_helpers: usize) -> io::Result<()> {
        if self.helper.is_none() && !self.inline {
            self.helper = Helper::start(max_helpers);
            self.inline = self.helper.is_none();
        }
        match &mut self.helper {
            Some(h) => {
                let next = h.buffer();
                h.send(std::mem::replace(&mut self.fill, next))
            }
            None => {
                hashes.push(*blake3::hash(&self.fill).as_bytes());
                self.fill.clear();
                Ok(())
            }
        }
    }

    /// Appends the hashes of the blocks not in `hashes` yet, the partial last one included.
    fn finish(mut self, hashes: &mut Vec<[u8; 32]>) -> io::Result<()> {
        let last = std::mem::take(&mut self.fill);
        match &mut self.helper {
            Some(h) => {
                if !last.is_empty() {
                    h.send(last)?;
                }
                hashes.extend(h.join()?);
            }
            None if !last.is_empty() => hashes.push(*blake3::hash(&last).as_bytes()),
            None => {}
        }
        Ok(())
    }
}

impl BlobWriter for DiskWriter {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        if buf.len() as u64 > DiskStorage::MAX_BLOB_LEN - self.len {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                format!(
                    "blob {:?} would exceed the {} bytes disk storage allows",
                    self.name,
                    DiskStorage::MAX_BLOB_LEN
                ),
            ));
        }
        (&*self.file).write_all(buf)?;
        self.last_write = wall_clock();
        while !buf.is_empty() {
            let room = (BLOCK - self.len % BLOCK) as usize;
            let (piece, rest) = buf.split_at(room.min(buf.len()));
            buf = rest;
            if self.len < BLOCK {
                self.block.update(piece);
                self.len += piece.len() as u64;
                if self.len == BLOCK {
                    self.hashes.push(*self.block.finalize().as_bytes());
                }
            } else {
                let tail = self.tail.get_or_insert_with(Tail::new);
                tail.fill.extend_from_slice(piece);
                self.len += piece.len() as u64;
                if self.len.is_multiple_of(BLOCK) {
                    tail.block_full(&mut self.hashes, self.storage.hash_helpers)?;
                }
            }
        }
        Ok(())
    }

    fn publish(&mut self) -> io::Result<()> {
        // `write` returned only after the bytes reached the file, which readers share.
        Ok(())
    }

    fn reader(&self) -> Arc<dyn BlobReader> {
        self.reader.clone()
    }

    fn commit(mut self: Box<Self>, meta: Vec<u8>) -> io::Result<()> {
        check_meta_len(&meta)?;
        match self.tail.take() {
            Some(tail) => tail.finish(&mut self.hashes)?,
            // Shorter than one block (a blob of exactly one was hashed as it filled).
            None if self.len < BLOCK && self.len > 0 => {
                self.hashes.push(*self.block.finalize().as_bytes());
            }
            None => {}
        }
        let last_write = self.last_write;
        let st = self.storage.clone();
        if st.sync {
            self.file.sync_data()?;
        }
        let hashes = std::mem::take(&mut self.hashes);
        let (len, block_hashes) = (self.len, hashes.clone());
        let record = Record {
            len: self.len,
            hashes,
            meta,
        }
        .encode();
        let shard = st.shard(&self.name);
        st.ensure_shard(&shard)?;
        let DiskWriter {
            staged,
            name,
            reader,
            ..
        } = *self;
        // Replacing a committed blob: its record goes first, so that nothing pairs it with
        // the new data (`open` checks that the record it read is still in place after opening
        // the data), and a crash in between leaves the name absent, never mixed.
        let meta_path = st.meta_path(&name);
        match fs::remove_file(&meta_path) {
            Ok(()) => st.fsync_dir(&shard)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        staged.persist(shard.join(&name)).map_err(|e| e.error)?;
        // The hashes were computed from the very bytes written to the file: every block starts
        // out checked, under the stamp the file has after the rename (which changed its
        // ctime) — provided nothing else wrote to it after our last write (its modification
        // time would then be later; with coarse file times, see "Integrity", a write in the
        // same clock tick goes unnoticed) and its length is ours.
        let now = Stamp::of(&reader.file);
        let check = Check::new(len, block_hashes, now);
        if let (Some(last), Some(n)) = (last_write, now)
            && n.len == len
            && n.mtime <= last
        {
            check.vouch_all();
        }
        if let Err(e) = st
            .write_meta(&name, &record)
            .and_then(|()| st.fsync_dir(&shard))
        {
            // Not committed, so nothing of it may be reloaded later. (Regression: a failing
            // fsync of the directory, after both renames, left a blob the caller was told had
            // failed, which the next open served.)
            let _ = fs::remove_file(&meta_path);
            let _ = fs::remove_file(shard.join(&name));
            return Err(e);
        }
        // From now on the file is at rest: its readers check what they read.
        let _ = reader.check.set(check);
        Ok(())
    }
}

/// Reads one blob through a file handle shared by all its readers.
///
/// While the blob is being written, reads are plain positional reads. Once it is committed
/// (or when it was opened from storage), each block is checked against its blake3 hash the
/// first time it is read; [`BlobReader::revalidate`] (and the first read after
/// [`BlobReader::idle`]) keeps those checks only if the file's `fstat` stamp is unchanged.
#[derive(Debug)]
struct DiskReader {
    file: Arc<File>,
    /// The committed data file (for error messages).
    path: PathBuf,
    /// Set once: at commit, or at open.
    check: OnceLock<Check>,
    /// A block-sized scratch buffer for verification, reused to avoid page faults.
    scratch: Mutex<Vec<u8>>,
}

/// What `fstat` says about a file: if any of it changes, its content may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl Stamp {
    fn of(file: &File) -> Option<Stamp> {
        file.metadata().ok().map(|md| Stamp::from(&md))
    }
}

impl From<&fs::Metadata> for Stamp {
    fn from(md: &fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
        }
    }
}

#[derive(Debug)]
struct Check {
    len: u64,
    hashes: Vec<[u8; 32]>,
    /// Bit `b` set once block `b` matched its hash (and the file's stamp has not changed
    /// since). Lock-free; a race only verifies twice.
    verified: Box<[AtomicU64]>,
    /// Set by `idle`: the next read first compares the file's stamp with `stamp`.
    recheck: AtomicBool,
    /// Bumped each time `verified` is cleared, so that a block check that raced the clear
    /// (it read the file before the change, and set its bit after the clear) withdraws its
    /// bit instead of vouching for the changed file.
    epoch: AtomicU64,
    /// Lock: this mutex. The file's stamp when the bits in `verified` were earned.
    stamp: Mutex<Option<Stamp>>,
}

impl Check {
    fn new(len: u64, hashes: Vec<[u8; 32]>, stamp: Option<Stamp>) -> Check {
        let words = hashes.len().div_ceil(64);
        Check {
            len,
            hashes,
            verified: (0..words).map(|_| AtomicU64::new(0)).collect(),
            recheck: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            stamp: Mutex::new(stamp),
        }
    }

    /// Forgets every checked block if the file changed since they were checked (or if that
    /// cannot be told): with `force` (a reader entering a new block, `BlobReader::revalidate`)
    /// or at the first read of a new use (after `idle`); otherwise does nothing.
    fn revalidate(&self, file: &File, force: bool) {
        // Every checked read comes through here: a plain load first, so that reads of a blob
        // in use (the common case) cost no read-modify-write on this shared flag.
        let new_use =
            self.recheck.load(Ordering::Acquire) && self.recheck.swap(false, Ordering::AcqRel);
        if !(force || new_use) {
            return;
        }
        // The stamp is taken under the lock, so concurrent revalidations update it in order.
        let mut stamp = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        let now = Stamp::of(file);
        if now.is_none() || *stamp != now {
            self.forget();
            *stamp = now;
        }
    }

    /// Clears every checked block.
    fn forget(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for word in self.verified.iter() {
            word.store(0, Ordering::SeqCst);
        }
    }

    /// Marks `block` checked, unless `verified` was cleared since `epoch` (when the check
    /// started reading): then the bytes it checked may predate a change.
    fn mark(&self, block: u64, epoch: u64) {
        let (word, bit) = (&self.verified[(block / 64) as usize], 1 << (block % 64));
        word.fetch_or(bit, Ordering::SeqCst);
        if self.epoch.load(Ordering::SeqCst) != epoch {
            word.fetch_and(!bit, Ordering::SeqCst);
        }
    }

    /// Marks every block checked (the writer hashed exactly what it wrote).
    fn vouch_all(&self) {
        let blocks = self.hashes.len();
        for (i, word) in self.verified.iter().enumerate() {
            let bits = (blocks - i * 64).min(64);
            word.store(u64::MAX >> (64 - bits), Ordering::Release);
        }
    }

    fn is_verified(&self, block: u64) -> bool {
        self.verified[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }
}

impl DiskReader {
    fn new(file: Arc<File>, path: PathBuf, check: Option<Check>) -> DiskReader {
        let cell = OnceLock::new();
        if let Some(c) = check {
            let _ = cell.set(c);
        }
        DiskReader {
            file,
            path,
            check: cell,
            scratch: Mutex::new(Vec::new()),
        }
    }

    /// Reads block `block` whole, checks it, and copies `[from, from + out.len())` of it out.
    fn verify_block(&self, c: &Check, block: u64, from: usize, out: &mut [u8]) -> io::Result<()> {
        let start = block * BLOCK;
        let size = (c.len - start).min(BLOCK) as usize;
        let epoch = c.epoch.load(Ordering::SeqCst);
        let mut guard = self.scratch.try_lock().ok();
        let mut own = Vec::new();
        let scratch = match guard.as_deref_mut() {
            Some(s) => s,
            None => &mut own,
        };
        scratch.resize(size, 0);
        let got = read_full_at(&self.file, scratch, start)?;
        if got != size {
            return Err(corrupt(
                &self.path,
                format!("file shorter than its length {}", c.len),
            ));
        }
        if blake3::hash(scratch).as_bytes() != &c.hashes[block as usize] {
            return Err(corrupt(
                &self.path,
                format!("block {block} fails its blake3 check"),
            ));
        }
        c.mark(block, epoch);
        out.copy_from_slice(&scratch[from..from + out.len()]);
        Ok(())
    }

    fn read_checked(&self, c: &Check, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        c.revalidate(&self.file, false);
        if offset >= c.len {
            return Ok(0);
        }
        let total = buf.len().min((c.len - offset) as usize);
        let mut done = 0;
        while done < total {
            let pos = offset + done as u64;
            let block = pos / BLOCK;
            let from = (pos % BLOCK) as usize;
            let n = (total - done).min(BLOCK as usize - from);
            let out = &mut buf[done..done + n];
            if c.is_verified(block) {
                if read_full_at(&self.file, out, pos)? != n {
                    return Err(corrupt(&self.path, "file shorter than its length"));
                }
            } else {
                self.verify_block(c, block, from, out)?;
            }
            done += n;
        }
        Ok(done)
    }
}

impl BlobReader for DiskReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        match self.check.get() {
            Some(c) => self.read_checked(c, buf, offset),
            None => read_full_at(&self.file, buf, offset),
        }
    }

    fn idle(&self) {
        if let Some(c) = self.check.get() {
            c.recheck.store(true, Ordering::Release);
        }
    }

    /// Compares the file's `fstat` stamp with the one the checked blocks were earned under;
    /// if it changed, every block is hashed again before it is served.
    fn revalidate(&self) {
        if let Some(c) = self.check.get() {
            c.revalidate(&self.file, true);
        }
    }
}

impl DiskStorage {
    /// `Storage::create`, with the writer's concrete type (unit tests look into its reader).
    fn create_writer(&self, name: &str) -> io::Result<DiskWriter> {
        validate_name(name)?;
        let (file, staged) = self.inner.staged_file(name)?;
        let file = Arc::new(file);
        let reader = Arc::new(DiskReader::new(file.clone(), self.blob_path(name), None));
        Ok(DiskWriter {
            storage: self.inner.clone(),
            name: name.to_owned(),
            file,
            reader,
            staged,
            len: 0,
            block: blake3::Hasher::new(),
            hashes: Vec::new(),
            tail: None,
            last_write: None,
        })
    }

    /// Reads `name`'s record and opens its data, making sure they belong together: a commit
    /// replacing the blob removes the record before it moves new data in, so if the record
    /// read is still in place once the data is open, that data is the record's. (Regression:
    /// an open racing a replacement could pair the old record with the new data.)
    fn open_pair(&self, name: &str, path: &Path) -> io::Result<(Record, File, fs::Metadata)> {
        use std::os::unix::fs::MetadataExt;
        let meta_path = self.inner.meta_path(name);
        for _ in 0..3 {
            // The record file stays open until the comparison: a file system reuses the inode
            // number of a deleted file only once nothing holds it open, so an equal number
            // then means the same file, not a new record that got the old one's number.
            let (record, _held, id) = self.read_record_with_id(name)?;
            let (file, md) = open_regular(path).map_err(|e| named_not_found(e, name))?;
            match fs::symlink_metadata(&meta_path) {
                Ok(now) if now.ino() == id => return Ok((record, file, md)),
                // Replaced meanwhile: read the new one.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        // Replaced again and again: as if it were not there yet.
        Err(not_found(name))
    }

    fn read_record(&self, name: &str) -> io::Result<Record> {
        self.read_record_with_id(name).map(|(record, ..)| record)
    }

    /// `name`'s record, the file it was read from (still open) and that file's inode. (The
    /// same system calls as `fs::read`, which also takes the metadata to size its buffer.)
    /// Only a regular file is read (see `open_regular`), and only if it is no longer than a
    /// record can be: a bigger one (a sparse 100 GB file, say) is damage, found before any
    /// allocation; reading stops past that size too, should the file grow meanwhile.
    fn read_record_with_id(&self, name: &str) -> io::Result<(Record, File, u64)> {
        use std::os::unix::fs::MetadataExt;
        let path = self.inner.meta_path(name);
        let (file, md) = open_regular(&path).map_err(|e| named_not_found(e, name))?;
        let too_long = |len: u64| {
            corrupt(
                &path,
                format!("record of {len} bytes, longer than the format allows ({MAX_RECORD_LEN})"),
            )
        };
        if md.len() > MAX_RECORD_LEN {
            return Err(too_long(md.len()));
        }
        let mut bytes = Vec::with_capacity(md.len() as usize);
        io::Read::read_to_end(&mut io::Read::take(&file, MAX_RECORD_LEN + 1), &mut bytes)?;
        if bytes.len() as u64 > MAX_RECORD_LEN {
            return Err(too_long(bytes.len() as u64));
        }
        let record = Record::decode(&bytes).map_err(|reason| corrupt(&path, reason))?;
        Ok((record, file, md.ino()))
    }

    /// Lists one shard directory, deleting leftovers of interrupted commits.
    fn list_shard(&self, shard: &Path, out: &mut Vec<BlobInfo>) -> io::Result<()> {
        let mut metas = Vec::new();
        let mut datas = std::collections::HashSet::new();
        for entry in fs::read_dir(shard)? {
            let file_name = entry?.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            match file_name.strip_suffix(".meta") {
                Some(name) => metas.push(name.to_owned()),
                None => {
                    datas.insert(file_name.to_owned());
                }
            }
        }
        // Only definite damage is deleted: a record that fails its checksum or is too long
        // (records are written whole and renamed into place, so that is never a write in
        // flight), a name that is not a regular file (a symbolic link, FIFO, socket or device:
        // storage never creates one; the name itself is removed, never what a link points
        // to), or files that predate this storage's opening (`predates_open`), since a commit
        // or removal in flight briefly leaves data without a record, or a record whose data is
        // being replaced. Anything else that cannot be read now (EMFILE, EACCES, EIO) is left
        // out of the listing but kept. Nothing here follows a symbolic link.
        for name in metas {
            let data_path = shard.join(&name);
            let has_data = validate_name(&name).is_ok() && datas.remove(&name);
            if !has_data {
                let meta_path = shard.join(format!("{name}.{META_EXT}"));
                if fs::symlink_metadata(&meta_path).is_ok_and(|md| self.is_leftover(&md)) {
                    tracing::warn!(blob = %name, "discarding a record without data");
                    self.discard(shard, &name);
                }
                continue;
            }
            let rec = match self.read_record(&name) {
                Ok(rec) => rec,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    tracing::warn!(blob = %name, error = %e, "discarding blob with a damaged record");
                    self.discard(shard, &name);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(blob = %name, error = %e, "skipping blob whose record cannot be read now");
                    continue;
                }
            };
            match fs::symlink_metadata(&data_path) {
                Ok(md) if !md.file_type().is_file() => {
                    tracing::warn!(blob = %name, "discarding blob whose data is {}", file_kind(md.file_type()));
                    self.discard(shard, &name);
                }
                Ok(md) if md.len() == rec.len => out.push(BlobInfo {
                    name,
                    len: rec.len,
                    meta: rec.meta,
                }),
                Ok(md) if self.inner.predates_open(&md) => {
                    tracing::warn!(blob = %name, "discarding blob whose data length does not match its record");
                    self.discard(shard, &name);
                }
                Ok(_) => {
                    tracing::warn!(blob = %name, "skipping blob whose data is being replaced");
                }
                Err(e) => {
                    tracing::warn!(blob = %name, error = %e, "skipping blob whose data cannot be read now");
                }
            }
        }
        for orphan in datas {
            let path = shard.join(&orphan);
            if fs::symlink_metadata(&path).is_ok_and(|md| self.is_leftover(&md)) {
                tracing::warn!(blob = %orphan, "deleting data of an interrupted commit");
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }

    /// Whether a file without its partner (data without a record, or the reverse) is a
    /// leftover to delete: it predates this storage's opening, or it is not a regular file
    /// (never one of ours, whatever its age; a directory is left alone).
    fn is_leftover(&self, md: &fs::Metadata) -> bool {
        let t = md.file_type();
        (!t.is_file() && !t.is_dir()) || self.inner.predates_open(md)
    }

    fn discard(&self, shard: &Path, name: &str) {
        let _ = fs::remove_file(shard.join(format!("{name}.{META_EXT}")));
        let _ = fs::remove_file(shard.join(name));
    }
}

impl Storage for DiskStorage {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        Ok(Box::new(self.create_writer(name)?))
    }

    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        validate_name(name)?;
        let path = self.blob_path(name);
        let (record, file, md) = self.open_pair(name, &path)?;
        if md.len() != record.len {
            return Err(corrupt(&path, "data length does not match its record"));
        }
        let info = BlobInfo {
            name: name.to_owned(),
            len: record.len,
            meta: record.meta,
        };
        let check = Check::new(record.len, record.hashes, Some(Stamp::from(&md)));
        let reader = DiskReader::new(Arc::new(file), path, Some(check));
        Ok((Arc::new(reader), info))
    }

    /// Reads the record only: the data file is not opened.
    fn info(&self, name: &str) -> io::Result<BlobInfo> {
        validate_name(name)?;
        let record = self.read_record(name)?;
        Ok(BlobInfo {
            name: name.to_owned(),
            len: record.len,
            meta: record.meta,
        })
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        validate_name(name)?;
        match fs::remove_file(self.inner.meta_path(name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found(name)),
            Err(e) => return Err(e),
        }
        match fs::remove_file(self.blob_path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        let mut shards = Vec::new();
        for shard in fs::read_dir(&self.inner.data)? {
            let shard = shard?;
            if shard.file_type()?.is_dir() {
                shards.push(shard.path());
            }
        }
        // Reading records is system-call bound: spread the shards over the available cores.
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8)
            .min(shards.len().max(1));
        let per = shards.len().div_ceil(workers).max(1);
        std::thread::scope(|scope| {
            let handles: Vec<_> = shards
                .chunks(per)
                .map(|part| {
                    scope.spawn(move || -> io::Result<Vec<BlobInfo>> {
                        let mut out = Vec::new();
                        for shard in part {
                            self.list_shard(shard, &mut out)?;
                        }
                        Ok(out)
                    })
                })
                .collect();
            let mut all = Vec::new();
            for h in handles {
                let part = h
                    .join()
                    .map_err(|_| io::Error::other("listing thread panicked"))??;
                all.extend(part);
            }
            Ok(all)
        })
    }

    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        validate_name(name)?;
        check_meta_len(meta)?;
        let mut record = self.read_record(name)?;
        record.meta = meta.to_vec();
        self.inner.write_meta(name, &record.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_tamper() {
        let rec = Record {
            len: BLOCK + 5,
            hashes: vec![[1; 32], [2; 32]],
            meta: b"hello".to_vec(),
        };
        let bytes = rec.encode();
        let back = Record::decode(&bytes).unwrap();
        assert_eq!(back.len, rec.len);
        assert_eq!(back.hashes, rec.hashes);
        assert_eq!(back.meta, rec.meta);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Record::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(Record::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    /// Records shorter than their checksum are damage, never a panic (a mutant that let
    /// them through to `split_at` survived every other test).
    #[test]
    fn records_shorter_than_a_checksum_are_damage() {
        for n in 0..=32 {
            assert!(Record::decode(&vec![0; n]).is_err(), "{n} bytes accepted");
        }
        // A body that is empty but correctly checksummed is still no record.
        assert!(Record::decode(blake3::hash(b"").as_bytes()).is_err());
    }

    /// `unlock` frees the directory while this handle (and its readers) live on.
    #[test]
    fn unlock_frees_the_directory_for_another_opener() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskStorage::open(dir.path()).unwrap();
        commit_bytes(&a, "kept", b"abc");
        let (r, _) = a.open("kept").unwrap();
        a.unlock();
        let b = DiskStorage::open(dir.path()).expect("unlocked");
        let mut buf = [0; 3];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 3);
        assert_eq!(&buf, b"abc");
        assert_eq!(b.list().unwrap().len(), 1);
    }

    /// Sync mode creates and fsyncs shard directories: commits into a new shard, then again
    /// into the same one, succeed and are listed.
    #[test]
    fn sync_mode_commits_into_new_and_known_shards() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open_with(dir.path(), true).unwrap();
        for name in ["aa-1", "aa-2", "bb-1"] {
            commit_bytes(&s, name, name.as_bytes());
        }
        drop(s);
        let s = DiskStorage::open_with(dir.path(), true).unwrap();
        let mut names: Vec<_> = s.list().unwrap().into_iter().map(|b| b.name).collect();
        names.sort();
        assert_eq!(names, ["aa-1", "aa-2", "bb-1"]);
    }

    /// An error staging a file is returned, not retried: only a name clash is (a staging loop
    /// that retried every error would spin for ever on EMFILE or a vanished `tmp/`).
    #[test]
    fn staging_errors_surface_instead_of_retrying() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        fs::remove_dir_all(dir.path().join(TMP_DIR)).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(s.create("blob").map(|_| ()));
        });
        let err = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("create kept retrying")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    /// A `tmp/` that cannot be wiped at open fails the open (its leftovers would otherwise
    /// mix with new staged files). Needs `chattr +i`; skipped with a message without it.
    #[test]
    fn a_tmp_that_cannot_be_wiped_fails_the_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(DiskStorage::open(dir.path()).unwrap());
        let stuck = dir.path().join(TMP_DIR).join("leftover");
        fs::write(&stuck, b"x").unwrap();
        let immutable = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&stuck)
            .status()
            .is_ok_and(|s| s.success());
        if !immutable {
            eprintln!(
                "SKIPPED: `chattr +i` is not possible here (needs root and a file system with the flag)"
            );
            return;
        }
        let opened = DiskStorage::open(dir.path());
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&stuck)
            .status();
        match opened {
            Err(Error::Io { op: "wipe", .. }) => {}
            other => panic!("expected a wipe error, got {other:?}"),
        }
    }

    #[test]
    fn second_open_is_locked_until_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = DiskStorage::open(dir.path()).unwrap();
        match DiskStorage::open(dir.path()) {
            Err(Error::Locked { dir: d }) => assert_eq!(d, dir.path()),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(a);
        DiskStorage::open(dir.path()).unwrap();
    }

    #[test]
    fn flipped_byte_is_an_error_not_data() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let data: Vec<u8> = (0..3 * BLOCK as usize + 7)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut w = s.create("blob").unwrap();
        w.write(&data).unwrap();
        w.commit(b"m".to_vec()).unwrap();
        let path = s.blob_path("blob");
        let mut bytes = fs::read(&path).unwrap();
        bytes[2 * BLOCK as usize + 3] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let (r, info) = s.open("blob").unwrap();
        assert_eq!(info.len, data.len() as u64);
        let mut buf = vec![0; 10];
        // Blocks 0 and 1 are intact; block 2 is not, wherever the read lands in it.
        assert_eq!(r.read_at(&mut buf, 5).unwrap(), 10);
        assert_eq!(&buf[..], &data[5..15]);
        let err = r.read_at(&mut buf, 2 * BLOCK + 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err = r.read_at(&mut buf, 2 * BLOCK - 5).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// Regression: the blocks a writer hashed are trusted at commit only if the file is still
    /// as its last write left it: a change made to the staged file before the commit (here
    /// through another handle) must be caught by the first read, not served as vouched-for
    /// bytes. (A change between two uses after the commit is
    /// `disk_written_blocks_are_trusted_only_while_the_file_is_unchanged`, in the conformance
    /// tests.)
    #[test]
    fn file_altered_before_commit_is_not_vouched_for() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let data = vec![5u8; BLOCK as usize + 10];
        let mut w = s.create("blob").unwrap();
        let r = w.reader();
        w.write(&data).unwrap();
        let staged = fs::read_dir(&s.inner.tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| fs::read(p).is_ok_and(|b| b.len() == data.len()))
            .expect("staged file");
        // One byte, through a handle of its own; the modification time is set a second on,
        // as a later write would leave it on any file system (however coarse its times).
        let other = File::options().write(true).open(&staged).unwrap();
        other.write_all_at(&[6], BLOCK + 2).unwrap();
        other
            .set_modified(SystemTime::now() + Duration::from_secs(1))
            .unwrap();
        w.commit(b"".to_vec()).unwrap();
        let mut buf = vec![0; 10];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 10);
        let err = r.read_at(&mut buf, BLOCK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// One byte flipped through a handle of its own, and the modification time moved to
    /// `mtime`: a change to the file the storage did not make.
    fn tamper(path: &Path, at: u64, mtime: SystemTime) {
        let f = File::options().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[!b[0]], at).unwrap();
        f.set_modified(mtime).unwrap();
    }

    /// Which blocks `r` counts as checked.
    fn checked(r: &DiskReader) -> Vec<bool> {
        let c = r.check.get().expect("committed");
        (0..c.hashes.len() as u64)
            .map(|b| c.is_verified(b))
            .collect()
    }

    /// A committed blob of `blocks` full blocks and 5 bytes, with its writer's shared reader.
    fn committed(s: &DiskStorage, name: &str, blocks: u64) -> Arc<DiskReader> {
        let mut w = s.create_writer(name).unwrap();
        let r = w.reader.clone();
        w.write(&vec![7u8; (blocks * BLOCK + 5) as usize]).unwrap();
        Box::new(w).commit(Vec::new()).unwrap();
        r
    }

    /// `vouch_all` marks exactly the blob's blocks, in every word, whatever the count.
    #[test]
    fn vouch_all_marks_exactly_the_blocks() {
        for n in [1u64, 2, 63, 64, 65, 127, 128, 129, 200] {
            let c = Check::new(n * BLOCK, vec![[0; 32]; n as usize], None);
            c.vouch_all();
            let words = c.verified.len() as u64;
            assert_eq!(words, n.div_ceil(64));
            for b in 0..words * 64 {
                assert_eq!(c.is_verified(b), b < n, "block {b} of {n}");
            }
        }
    }

    /// The life of the checked-blocks record of a blob this handle committed: all vouched for
    /// at commit; kept by a revalidation that finds the same stamp; forgotten when the stamp
    /// changes (here only the time: content unchanged); earned again block by block; and kept
    /// again by the next revalidation under the new stamp.
    #[test]
    fn revalidation_keeps_checks_only_under_the_same_stamp() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let r = committed(&s, "blob", 3);
        assert_eq!(checked(&r), [true; 4], "vouched for at commit");
        r.revalidate();
        assert_eq!(checked(&r), [true; 4], "same stamp: checks kept");
        File::options()
            .write(true)
            .open(s.blob_path("blob"))
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(1))
            .unwrap();
        // Without `revalidate` or a new use, reads go on under the old checks.
        let mut buf = [0u8; 4];
        r.read_at(&mut buf, 0).unwrap();
        assert_eq!(checked(&r), [true; 4], "no fstat within a use");
        r.revalidate();
        assert_eq!(checked(&r), [false; 4], "new stamp: checks forgotten");
        r.read_at(&mut buf, BLOCK + 1).unwrap();
        assert_eq!(buf, [7; 4]);
        assert_eq!(checked(&r), [false, true, false, false]);
        r.revalidate();
        assert_eq!(
            checked(&r),
            [false, true, false, false],
            "the new stamp was recorded: checks earned under it are kept"
        );
        // A new use (after `idle`) compares too, at its first read.
        r.idle();
        File::options()
            .write(true)
            .open(s.blob_path("blob"))
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(2))
            .unwrap();
        r.read_at(&mut buf, 0).unwrap();
        assert_eq!(checked(&r), [true, false, false, false]);
    }

    /// A revalidation after the bytes changed makes the next read of the changed block fail,
    /// also for a reader that read it clean before.
    #[test]
    fn revalidate_catches_a_change_during_a_use() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let r = committed(&s, "blob", 2);
        let mut buf = [0u8; 8];
        r.read_at(&mut buf, BLOCK).unwrap();
        tamper(
            &s.blob_path("blob"),
            BLOCK + 3,
            SystemTime::now() + Duration::from_secs(1),
        );
        r.revalidate();
        let err = r.read_at(&mut buf, BLOCK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        r.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf, [7; 8]);
    }

    /// Regression guard for the commit-time vouching: a staged file that was extended and
    /// changed behind the writer's back, with its modification time then set *back* (so the
    /// time alone looks unchanged), is not vouched for: its length differs from what was
    /// written.
    #[test]
    fn commit_does_not_vouch_for_a_file_of_another_length() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let mut w = s.create_writer("blob").unwrap();
        let r = w.reader.clone();
        w.write(&vec![7u8; BLOCK as usize + 5]).unwrap();
        let staged = w.staged.to_path_buf();
        let long_ago = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        tamper(&staged, BLOCK + 1, long_ago);
        let f = File::options().append(true).open(&staged).unwrap();
        (&f).write_all(b"more").unwrap();
        f.set_modified(long_ago).unwrap();
        Box::new(w).commit(Vec::new()).unwrap();
        assert_eq!(checked(&r), [false, false]);
        let mut buf = [0u8; 4];
        let err = r.read_at(&mut buf, BLOCK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// A block check that read the file before a revalidation forgot the checks, and marks
    /// its block after, withdraws the mark: the bytes it checked may predate the change.
    #[test]
    fn a_check_racing_a_revalidation_is_withdrawn() {
        let c = Check::new(2 * BLOCK, vec![[0; 32]; 2], None);
        let before = c.epoch.load(Ordering::SeqCst);
        c.forget();
        c.mark(1, before);
        assert!(!c.is_verified(1), "a mark from before the clear survived");
        c.mark(1, c.epoch.load(Ordering::SeqCst));
        assert!(c.is_verified(1));
        assert!(!c.is_verified(0));
    }

    /// The format's limits: metadata up to `MAX_META_LEN` round-trips, one byte more is
    /// refused by the writer and by the decoder; a blob longer than `MAX_BLOB_LEN` is refused
    /// by both too; a record file longer than any record can be is damage, unread.
    #[test]
    fn record_limits() {
        let max = DiskStorage::MAX_META_LEN;
        let at_max = Record {
            len: 1,
            hashes: vec![[3; 32]],
            meta: vec![1; max],
        };
        assert_eq!(Record::decode(&at_max.encode()).unwrap().meta.len(), max);
        let over = Record {
            meta: vec![1; max + 1],
            ..at_max
        };
        assert!(Record::decode(&over.encode()).is_err());
        // A claimed length past the limit, in a record otherwise well formed.
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        let len = DiskStorage::MAX_BLOB_LEN + 1;
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&BLOCK.to_le_bytes());
        body.extend_from_slice(&len.div_ceil(BLOCK).to_le_bytes());
        let check = blake3::hash(&body);
        body.extend_from_slice(check.as_bytes());
        assert_eq!(
            Record::decode(&body).unwrap_err(),
            "blob longer than the format allows"
        );

        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let w = s.create("big-meta").unwrap();
        let err = w.commit(vec![0; max + 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        commit_bytes(&s, "blob", b"abc");
        let err = s.set_meta("blob", &vec![0; max + 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        s.set_meta("blob", &vec![0; max]).unwrap();
        assert_eq!(s.info("blob").unwrap().meta.len(), max);

        let mut w = s.create_writer("huge").unwrap();
        w.len = DiskStorage::MAX_BLOB_LEN - 3;
        let err = w.write(b"four").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        w.write(b"3by").unwrap();

        // The longest record the format allows (the longest blob, the most metadata) is read;
        // one byte more is damage, found from its size.
        let longest = Record {
            len: DiskStorage::MAX_BLOB_LEN,
            hashes: vec![[5; 32]; (DiskStorage::MAX_BLOB_LEN / BLOCK) as usize],
            meta: vec![2; max],
        }
        .encode();
        assert_eq!(longest.len() as u64, MAX_RECORD_LEN);
        fs::write(s.inner.meta_path("blob"), &longest).unwrap();
        drop(longest);
        let info = s.info("blob").unwrap();
        assert_eq!(
            (info.len, info.meta.len()),
            (DiskStorage::MAX_BLOB_LEN, max)
        );
        File::options()
            .write(true)
            .open(s.inner.meta_path("blob"))
            .unwrap()
            .set_len(MAX_RECORD_LEN + 1)
            .unwrap();
        let err = s.info("blob").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(
            err.to_string().contains("longer than the format allows"),
            "{err}"
        );
    }

    /// Blocks hashed inline or on a helper thread (everything past the first block, once a
    /// second one fills) land in the record in order, whatever the write sizes and wherever
    /// the blob ends relative to a block.
    #[test]
    fn block_hashes_are_right_on_both_threads() {
        for helpers in [0, usize::MAX] {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStorage::open(dir.path())
                .unwrap()
                .with_hash_helpers(helpers);
            check_block_hashes(&s);
        }
    }

    fn check_block_hashes(s: &DiskStorage) {
        let b = BLOCK as usize;
        for (i, len) in [
            0,
            1,
            b - 1,
            b,
            b + 1,
            2 * b - 1,
            2 * b,
            2 * b + 1,
            3 * b + 5,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            write_and_check(s, &format!("blob{i}"), &data, 65_537 + i);
        }
    }

    /// Writes `data` as blob `name` in `piece`-byte writes, commits, and checks the record's
    /// block hashes.
    fn write_and_check(s: &DiskStorage, name: &str, data: &[u8], piece: usize) {
        let mut w = s.create(name).unwrap();
        for p in data.chunks(piece) {
            w.write(p).unwrap();
        }
        w.commit(Vec::new()).unwrap();
        let want: Vec<[u8; 32]> = data
            .chunks(BLOCK as usize)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        assert_eq!(
            s.read_record(name).unwrap().hashes,
            want,
            "len {}",
            data.len()
        );
    }

    /// More large writers than cores: some get a hashing helper, the others hash inline, and
    /// every record is right.
    #[test]
    fn concurrent_large_writers_all_hash_right() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let b = BLOCK as usize;
        let writers = 3 * std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|scope| {
            for t in 0..writers {
                let s = &s;
                scope.spawn(move || {
                    let data: Vec<u8> = (0..3 * b + t).map(|j| (j * 31 + t) as u8).collect();
                    write_and_check(s, &format!("w{t}"), &data, 64 << 10);
                });
            }
        });
    }

    fn commit_bytes(s: &DiskStorage, name: &str, bytes: &[u8]) {
        let mut w = s.create(name).unwrap();
        w.write(bytes).unwrap();
        w.commit(Vec::new()).unwrap();
    }

    #[test]
    fn interrupted_commit_is_discarded_at_listing() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        commit_bytes(&s, "kept", b"abc");
        commit_bytes(&s, "lost", b"xyz");
        // Simulate a crash between the data rename and the record rename, in an earlier run.
        fs::remove_file(s.inner.meta_path("lost")).unwrap();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        File::options()
            .write(true)
            .open(s.blob_path("lost"))
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
        let names: Vec<_> = s.list().unwrap().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["kept"]);
        assert!(!s.blob_path("lost").exists());
    }

    /// Data without a record that is newer than the storage may be a commit in flight (its
    /// record comes next): listing leaves it out but must not delete it. Regression: `list`
    /// deleted it, so calling it while writers committed could destroy a commit.
    #[test]
    fn listing_never_deletes_a_commit_in_flight() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        commit_bytes(&s, "busy", b"xyz");
        let record = fs::read(s.inner.meta_path("busy")).unwrap();
        // The moment between the data rename and the record rename.
        fs::remove_file(s.inner.meta_path("busy")).unwrap();
        assert!(s.list().unwrap().is_empty());
        assert!(
            s.blob_path("busy").exists(),
            "data of a commit in flight deleted"
        );
        fs::write(s.inner.meta_path("busy"), record).unwrap();
        let names: Vec<_> = s.list().unwrap().into_iter().map(|b| b.name).collect();
        assert_eq!(names, ["busy"]);
    }
}
