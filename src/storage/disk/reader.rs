//! Reading a blob: [`DiskReader`], shared by every reader of one blob, and the integrity
//! checks of committed blobs (see "Integrity" on [`DiskStorage`](super::DiskStorage)).
//!
//! Invariants: a committed blob's block is served only once it matched its blake3 hash under
//! the file's current `fstat` [`Stamp`] (or was vouched for by the writer that wrote exactly
//! those bytes); when the stamp changes, every check is forgotten, and a check that raced the
//! change is withdrawn (`Check::epoch`); a block that fails is an [`Error::Corrupt`](crate::Error::Corrupt) read
//! error, never data. Bytes of a blob still being written are served unchecked.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::file::read_full_at;
use super::{BLOCK, corrupt};
use crate::storage::BlobReader;

/// Reads one blob through a file handle shared by all its readers.
///
/// While the blob is being written, reads are plain positional reads. Once it is committed
/// (or when it was opened from storage), each block is checked against its blake3 hash the
/// first time it is read; [`BlobReader::revalidate`] (and the first read after
/// [`BlobReader::idle`]) keeps those checks only if the file's `fstat` stamp is unchanged.
#[derive(Debug)]
pub(super) struct DiskReader {
    pub(super) file: Arc<File>,
    /// The committed data file (for error messages).
    path: PathBuf,
    /// Set once: at commit, or at open.
    pub(super) check: OnceLock<Check>,
    /// A block-sized scratch buffer for verification, reused to avoid page faults.
    scratch: Mutex<Vec<u8>>,
}

/// What `fstat` says about a file: if any of it changes, its content may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Stamp {
    pub(super) len: u64,
    pub(super) mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
}

impl Stamp {
    pub(super) fn of(file: &File) -> Option<Stamp> {
        file.metadata().ok().map(|md| Stamp::from(&md))
    }
}

impl From<&fs::Metadata> for Stamp {
    fn from(md: &fs::Metadata) -> Stamp {
        Stamp {
            len: md.len(),
            mtime: (md.mtime(), md.mtime_nsec()),
            ctime: (md.ctime(), md.ctime_nsec()),
            ino: md.ino(),
        }
    }
}

#[derive(Debug)]
pub(super) struct Check {
    len: u64,
    pub(super) hashes: Vec<[u8; 32]>,
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
    pub(super) fn new(len: u64, hashes: Vec<[u8; 32]>, stamp: Option<Stamp>) -> Check {
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
    pub(super) fn vouch_all(&self) {
        let blocks = self.hashes.len();
        for (i, word) in self.verified.iter().enumerate() {
            let bits = (blocks - i * 64).min(64);
            word.store(u64::MAX >> (64 - bits), Ordering::Release);
        }
    }

    pub(super) fn is_verified(&self, block: u64) -> bool {
        self.verified[(block / 64) as usize].load(Ordering::Acquire) & (1 << (block % 64)) != 0
    }
}

impl DiskReader {
    pub(super) fn new(file: Arc<File>, path: PathBuf, check: Option<Check>) -> DiskReader {
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

#[cfg(test)]
pub(super) mod tests {
    use std::fs::{self, File};
    use std::io;
    use std::time::{Duration, SystemTime};

    use super::super::DiskStorage;
    use super::super::test_support::{committed, tamper};
    use super::*;
    use crate::storage::{BlobWriter, Storage};

    /// Which blocks `r` counts as checked.
    pub(in super::super) fn checked(r: &DiskReader) -> Vec<bool> {
        let c = r.check.get().expect("committed");
        (0..c.hashes.len() as u64)
            .map(|b| c.is_verified(b))
            .collect()
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
}
