//! Disk storage: blobs as files in a directory. The layout, the record format and the
//! guarantees are documented on [`DiskStorage`]; this module holds the handle, its opening and
//! the [`Storage`] methods, and each concern has a file of its own:
//!
//! * `lock`: the directory lock (one live storage per directory);
//! * `file`: opening only regular files, staging new ones in `tmp/`;
//! * `record`: the metadata record (format, limits, reading it);
//! * `hashing`: the writer's block-hashing pipeline;
//! * `writer`: writing and committing a blob;
//! * `reader`: reading a blob, with the integrity checks of committed ones;
//! * `ahead`: the helpers that check the blocks ahead of sequential readers;
//! * `list`: listing, and deleting leftovers of interrupted commits;
//! * `journal`: the change journal that keeps a saved hint usable after a crash.
//!
//! Unix only: it relies on `flock`, `O_NOFOLLOW`/`O_NONBLOCK`, positional reads and the
//! `fstat` fields of Unix file systems.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::{BlobInfo, BlobReader, BlobWriter, Storage, not_found, validate_name};
use crate::error::{Error, Result};

mod ahead;
mod file;
mod hashing;
mod journal;
mod list;
mod lock;
mod reader;
mod record;
mod writer;

pub(in crate::storage) use file::{open_regular, staged_file};
use lock::DirLock;
use reader::{Check, DiskReader, Stamp};
use record::{Record, check_meta_len};

/// Size of an integrity block.
const BLOCK: u64 = super::HASH_BLOCK;
const DATA_DIR: &str = "v1";
pub(in crate::storage) const TMP_DIR: &str = "tmp";
const META_EXT: &str = "meta";
/// How much older than the storage's opening a leftover must be for `list` to delete it.
const LEFTOVER_MARGIN: Duration = Duration::from_secs(2);

/// How [`DiskStorage`] makes commits durable: what a committed blob survives.
///
/// Either way a commit is atomic and checked: after a crash of the process or of the machine,
/// a blob is absent or whole, never half of one (the record's checksum and the data length
/// are checked when the directory is opened, each block's hash when it is read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Durability {
    /// Commits leave the data to the operating system's page cache: a committed blob survives
    /// a crash of the process, but a power loss or a crash of the operating system may lose
    /// the blobs committed in the seconds before it. The default, and the fastest.
    #[default]
    Buffered,
    /// Every commit fsyncs the data file, then the record, then the directory entries it
    /// created (the blob's shard directory, and `v1/` when the shard is new) before it
    /// returns: a blob whose commit returned `Ok` survives a power loss. Opening fsyncs the
    /// storage directory too. Removals are not fsynced, so a power loss may bring a removed
    /// blob back; a [`set_meta`](Storage::set_meta) fsyncs the new record, but not the
    /// directory, so after a power loss the blob has its old or its new metadata.
    SyncOnCommit,
}

/// Blobs stored as files in a directory, committed by atomic rename, checked block by block
/// with blake3.
///
/// All readers of a blob share one file handle and use positional reads, so opening another
/// reader costs no system call. The directory is locked against other processes until every
/// clone of this handle is dropped (a [`Cache`](crate::Cache) that opened the storage
/// releases the lock when it is dropped): with an exclusive OS lock (`flock`) on the
/// directory itself, so the lock cannot be lost by deleting a file in it.
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
///   index-hint               the description of the blobs its owner (a cache) saved last
///                            (see `Storage::put_hint`), with a header naming the journal
///   index-journal            every commit and removal since that hint was made, so that
///                            the hint stays usable after a crash (format: `journal` module)
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
/// checksum or is too long, and a non-regular file (above), are discarded; data without a
/// record (an interrupted commit) and a record whose data length does not match are deleted if they predate the storage's opening, and only
/// left out of the listing otherwise, since a commit, replacement or removal in flight passes
/// through those states. Files that cannot be read at the moment (EMFILE, EACCES, EIO...)
/// are left out, never deleted; `open` and `info` report such errors as they are, and
/// `NotFound` or `InvalidData` only for a missing blob or one proven damaged.
/// The fsyncs ("optionally" above) are chosen with [`Durability`]: with
/// [`Buffered`](Durability::Buffered) a power loss can lose recent commits (never expose half
/// of one: the record's checksum and the data length are checked, and each block's hash on
/// read); with [`SyncOnCommit`](Durability::SyncOnCommit), a committed blob survives.
///
/// # Platforms
///
/// Unix only (Linux is tested): the lock, the refusal of links and FIFOs and the integrity
/// stamp use Unix file system calls.
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
/// A sequential read (one that starts where an earlier read of the blob ended, or at 0) has
/// the next 4 blocks checked ahead of it, on a small process-wide pool of helper threads (one
/// per core but one, at least one; started on demand, stopping when idle): the reader then
/// finds them checked and reads them straight from the file while the hashing runs on
/// another core. A block is checked by one thread at a time: a reader that reaches a block a
/// helper is checking checks one further ahead meanwhile, or waits; it never serves a byte of
/// a block before its hash matched. A block checked ahead is checked under the same rules as
/// any other (a check racing a change of stamp is withdrawn), and one that fails is left
/// unchecked, so that the reader's own check of it is the error. Reads at scattered offsets
/// hand nothing ahead: they hash only the blocks they read.
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
    durability: Durability,
    /// How many block-hashing helpers may run process-wide before this storage's writers hash
    /// inline: the number of cores.
    hash_helpers: usize,
    /// Lock: this mutex. The directory's lock, held until dropped or
    /// [`DiskStorage::unlock`]ed.
    lock: Mutex<Option<DirLock>>,
    /// When this storage opened the directory: `list` deletes leftovers only if they are
    /// older (by `LEFTOVER_MARGIN`), so it never deletes a commit or removal in flight.
    opened: SystemTime,
    /// Lock: this mutex, held while a shard is created and its parent fsynced (sync mode
    /// only). Shard directories known to be durable; a commit into any other makes it so
    /// first, also when another writer created it a moment ago.
    durable_shards: Mutex<HashSet<PathBuf>>,
    /// Lock: this mutex (a leaf lock: held for one append, or to install a hint). The change
    /// journal: every commit and removal since the owner first took a mark
    /// (`Storage::hint_epoch`), appended before the commit's rename and after the removal's
    /// unlink (see `journal`).
    journal: Mutex<journal::Journal>,
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
        Self::open_with(dir, Durability::Buffered)
    }

    /// Like [`open`](Self::open), with the given [`Durability`] of commits
    /// ([`open`](Self::open) is [`Durability::Buffered`]).
    ///
    /// # Errors
    /// As for [`open`](Self::open).
    pub fn open_with(dir: impl AsRef<Path>, durability: Durability) -> Result<Self> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|e| Error::io("create directory", dir, e))?;
        let lock = DirLock::acquire(dir)?;
        let tmp = dir.join(TMP_DIR);
        match fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("wipe", &tmp, e)),
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io("create directory", &tmp, e))?;
        let data = dir.join(DATA_DIR);
        fs::create_dir_all(&data).map_err(|e| Error::io("create directory", &data, e))?;
        if durability == Durability::SyncOnCommit {
            // The entries for `tmp/` and `v1/` themselves.
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("fsync", dir, e))?;
        }
        let journal = journal::Journal::open(dir, &tmp, durability == Durability::SyncOnCommit)
            .map_err(|e| Error::io("open index journal", dir.join(journal::JOURNAL_FILE), e))?;
        Ok(DiskStorage {
            inner: Arc::new(DiskInner {
                dir: dir.to_path_buf(),
                data,
                tmp,
                durability,
                hash_helpers: std::thread::available_parallelism().map_or(1, |n| n.get()),
                lock: Mutex::new(Some(lock)),
                opened: SystemTime::now(),
                durable_shards: Mutex::default(),
                journal: Mutex::new(journal),
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
    /// does this when it is dropped. Crate-private: it frees the directory under a live
    /// handle, which only the owner of every handle may decide.
    ///
    /// Existing readers keep working. A writer still open here may then fail to commit (the
    /// next opener wipes `tmp/`): it gets an error and its stream is aborted, never half-served.
    pub(crate) fn unlock(&self) {
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

    /// The data file of a committed blob: `v1/<ab>/<name>` (see "Layout").
    pub(crate) fn blob_path(&self, name: &str) -> PathBuf {
        self.inner.shard(name).join(name)
    }
}

impl DiskInner {
    fn journal(&self) -> std::sync::MutexGuard<'_, journal::Journal> {
        self.journal.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn shard(&self, name: &str) -> PathBuf {
        let cut = name.char_indices().nth(2).map_or(name.len(), |(i, _)| i);
        self.data.join(&name[..cut])
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.shard(name).join(format!("{name}.{META_EXT}"))
    }

    /// Whether commits fsync ([`Durability::SyncOnCommit`]).
    fn syncs(&self) -> bool {
        self.durability == Durability::SyncOnCommit
    }

    /// Creates `shard` if needed; in sync mode, also makes its entry in `v1/` durable before
    /// the first commit into it, whichever writer created it: a writer racing in right after
    /// another created the shard must not report a commit durable whose directory is not yet.
    fn ensure_shard(&self, shard: &Path) -> io::Result<()> {
        if !self.syncs() {
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
        if self.syncs() {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    fn write_meta(&self, name: &str, record: &[u8]) -> io::Result<()> {
        self.write_file(name, &self.meta_path(name), record)
    }

    /// Writes `bytes` to `dest` atomically: staged in `tmp/` (under a name starting with
    /// `stage`), synced in sync mode, renamed into place.
    fn write_file(&self, stage: &str, dest: &Path, bytes: &[u8]) -> io::Result<()> {
        let (mut file, staged) = staged_file(&self.tmp, stage)?;
        io::Write::write_all(&mut file, bytes)?;
        if self.syncs() {
            file.sync_data()?;
        }
        drop(file);
        staged.persist(dest).map_err(|e| e.error)?;
        Ok(())
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> io::Error {
    Error::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
    .into()
}

/// `e`, or the storage's "no committed blob" error naming `name` if the file was missing.
fn named_not_found(e: io::Error, name: &str) -> io::Error {
    if e.kind() == io::ErrorKind::NotFound {
        not_found(name)
    } else {
        e
    }
}

impl DiskStorage {
    /// Reads `name`'s record and opens its data, making sure they belong together: a commit
    /// replacing the blob removes the record before it moves new data in, so if the record
    /// read is still in place once the data is open, that data is the record's: an open racing
    /// a replacement never pairs the old record with the new data.
    fn open_pair(&self, name: &str, path: &Path) -> io::Result<(Record, File, fs::Metadata)> {
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
    /// `Storage::open`, with the reader's concrete type (unit tests look into its checks).
    fn open_reader(&self, name: &str) -> io::Result<(Arc<DiskReader>, BlobInfo)> {
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
}

impl Storage for DiskStorage {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        Ok(Box::new(self.create_writer(name)?))
    }

    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        let (reader, info) = self.open_reader(name)?;
        Ok((reader, info))
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
        // Without its record the blob is gone (a data file left behind is a leftover).
        self.inner.journal().removed(name);
        match fs::remove_file(self.blob_path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        self.list_all()
    }

    /// The end of the change journal (started here, if the owner never took a mark before).
    fn hint_epoch(&self) -> u64 {
        let st = &self.inner;
        st.journal().mark().unwrap_or_else(|e| {
            tracing::error!(error = %e, "could not start the index journal; no hint will be saved");
            u64::MAX
        })
    }

    /// Saves the hint with a header naming the journal generation and `epoch`; the journal
    /// then keeps only the changes from `epoch` on.
    fn put_hint(&self, hint: &[u8], epoch: u64) -> io::Result<bool> {
        let st = &self.inner;
        let generation = st.journal().generation();
        // Written and synced without the journal's lock: commits go on meanwhile.
        let (mut file, staged) = staged_file(&st.tmp, journal::HINT_FILE)?;
        io::Write::write_all(&mut file, &journal::hint_header(generation, epoch))?;
        io::Write::write_all(&mut file, hint)?;
        if st.syncs() {
            file.sync_data()?;
        }
        drop(file);
        let saved = st.journal().install_hint(staged, generation, epoch)?;
        if saved {
            st.fsync_dir(&st.dir)?;
        }
        Ok(saved)
    }

    /// The hint in place with the journaled changes since it was made. It stays in place:
    /// with the journal, it describes the storage until the next hint replaces it.
    fn take_hint(&self) -> io::Result<Option<super::SavedHint>> {
        let st = &self.inner;
        let Some(changes) = st.journal().take_loaded() else {
            return Ok(None);
        };
        let file = match open_regular(&st.dir.join(journal::HINT_FILE)) {
            Ok((file, _)) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let hint = file::Skipped::new(
            io::BufReader::with_capacity(1 << 20, file),
            journal::HINT_HEADER,
        )?;
        Ok(Some(super::SavedHint {
            hint: Box::new(hint),
            changes,
        }))
    }

    fn hint_backlog(&self) -> Option<u64> {
        Some(self.inner.journal().backlog())
    }

    fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        self.list_with_prefix(prefix)
    }

    fn list_batches(
        &self,
        each: &(dyn Fn(Vec<BlobInfo>) -> std::ops::ControlFlow<()> + Sync),
    ) -> io::Result<()> {
        self.list_each_shard(each)
    }

    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        validate_name(name)?;
        check_meta_len(meta)?;
        let mut record = self.read_record(name)?;
        record.meta = meta.to_vec();
        self.inner.write_meta(name, &record.encode())?;
        self.inner.journal().committed(name, record.len, meta);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::commit_bytes;
    use super::*;

    /// Sync mode creates and fsyncs shard directories: commits into a new shard, then again
    /// into the same one, succeed and are listed.
    #[test]
    fn sync_mode_commits_into_new_and_known_shards() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open_with(dir.path(), Durability::SyncOnCommit).unwrap();
        for name in ["aa-1", "aa-2", "bb-1"] {
            commit_bytes(&s, name, name.as_bytes());
        }
        drop(s);
        let s = DiskStorage::open_with(dir.path(), Durability::SyncOnCommit).unwrap();
        let mut names: Vec<_> = s.list().unwrap().into_iter().map(|b| b.name).collect();
        names.sort();
        assert_eq!(names, ["aa-1", "aa-2", "bb-1"]);
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
}

/// Helpers shared by the unit tests of the disk modules.
#[cfg(test)]
mod test_support {
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::{BLOCK, DiskReader, DiskStorage};
    use crate::storage::{BlobWriter, Storage};

    /// A storage in a fresh directory whose writers hash every block inline, and one whose
    /// writers hand blocks past the first to a helper thread.
    pub(super) fn inline_and_helped() -> [(tempfile::TempDir, DiskStorage); 2] {
        [0, usize::MAX].map(|helpers| {
            let dir = tempfile::tempdir().unwrap();
            let s = DiskStorage::open(dir.path())
                .unwrap()
                .with_hash_helpers(helpers);
            (dir, s)
        })
    }

    pub(super) fn commit_bytes(s: &DiskStorage, name: &str, bytes: &[u8]) {
        let mut w = s.create(name).unwrap();
        w.write(bytes).unwrap();
        w.commit(Vec::new()).unwrap();
    }

    /// One byte flipped through a handle of its own, and the modification time moved to
    /// `mtime`: a change to the file the storage did not make.
    pub(super) fn tamper(path: &Path, at: u64, mtime: SystemTime) {
        let f = File::options().read(true).write(true).open(path).unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[!b[0]], at).unwrap();
        f.set_modified(mtime).unwrap();
    }

    /// A committed blob of `blocks` full blocks and 5 bytes, with its writer's shared reader.
    pub(super) fn committed(s: &DiskStorage, name: &str, blocks: u64) -> Arc<DiskReader> {
        let mut w = s.create_writer(name).unwrap();
        let r = w.reader.clone();
        w.write(&vec![7u8; (blocks * BLOCK + 5) as usize]).unwrap();
        Box::new(w).commit(Vec::new()).unwrap();
        r
    }
}
