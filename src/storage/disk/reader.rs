//! Reading a blob: [`DiskReader`], shared by every reader of one blob, and the integrity
//! checks of committed blobs (see "Integrity" on [`DiskStorage`](super::DiskStorage)).
//!
//! Invariants: a committed blob's block is served only once it matched its blake3 hash under
//! the file's current `fstat` [`Stamp`] (or was vouched for by the writer that wrote exactly
//! those bytes); when the stamp changes, every check is forgotten, and a check that raced the
//! change is withdrawn (`Check::epoch`); a block that fails is an [`Error::Corrupt`](crate::Error::Corrupt) read
//! error, never data. Bytes of a blob still being written are served unchecked.
//!
//! Blocks ahead of a sequential read are checked by the helpers of `ahead` meanwhile; a
//! block is checked by one thread at a time (`Check::claimed`): a reader that reaches a
//! block being checked elsewhere checks a block further ahead itself, or waits, and never
//! serves a byte of the block before its mark is set. A random-access reader (no read
//! starting where an earlier one ended) hands nothing ahead and checks only what it reads.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use super::ahead::{self, AHEAD, Job, PIECE};
use super::file::read_full_at;
use super::hashing::BlockHashes;
use super::{BLOCK, corrupt};
use crate::storage::{BlobReader, FileRange};

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
    /// Set once: at commit, or at open. Shared with the verify-ahead jobs (weakly).
    pub(super) check: OnceLock<Arc<Check>>,
    /// While the blob is written in this process: its block hashes as the writer computes
    /// them (set at creation, before the reader is shared).
    pub(super) written: Option<Arc<BlockHashes>>,
    /// A block-sized scratch buffer for verification, reused to avoid page faults.
    scratch: Mutex<Vec<u8>>,
    /// Where the last reads ended (`STREAMS` of them, replaced in turn): a read starting at
    /// one of them, or at 0, continues a sequential read and hands blocks ahead to the
    /// helpers. Shared by all readers of the blob, so that a few sequential readers at once
    /// are each recognised.
    ends: [AtomicU64; STREAMS],
    next_end: AtomicUsize,
}

/// How many sequential readers of one blob at once are recognised as such.
const STREAMS: usize = 4;

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
    pub(super) len: u64,
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
    /// Bit `b` set while a thread checks block `b` (see `Claim`): others wait for it, or
    /// check another block meanwhile, instead of hashing it twice.
    claimed: Box<[AtomicU64]>,
    /// Lock: this mutex, taken by a claim's release before it notifies `released`, and by a
    /// waiter while it looks at the claim bit before waiting (so no release goes unnoticed).
    released_lock: Mutex<()>,
    released: Condvar,
    /// Blocks below this were handed to the helpers (or found checked) by a sequential read;
    /// reset with `verified`.
    ahead: AtomicU64,
}

/// The right to check one block, given back (and waiters woken) when dropped.
struct Claim<'a> {
    check: &'a Check,
    block: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let c = self.check;
        let (word, bit) = (
            &c.claimed[(self.block / 64) as usize],
            1 << (self.block % 64),
        );
        word.fetch_and(!bit, Ordering::SeqCst);
        let _lock = c.released_lock.lock().unwrap_or_else(|e| e.into_inner());
        c.released.notify_all();
    }
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
            claimed: (0..words).map(|_| AtomicU64::new(0)).collect(),
            released_lock: Mutex::new(()),
            released: Condvar::new(),
            ahead: AtomicU64::new(0),
        }
    }

    fn blocks(&self) -> u64 {
        self.hashes.len() as u64
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
        // Sequential reads hand the blocks ahead to the helpers again.
        self.ahead.store(0, Ordering::SeqCst);
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

    fn is_claimed(&self, block: u64) -> bool {
        self.claimed[(block / 64) as usize].load(Ordering::SeqCst) & (1 << (block % 64)) != 0
    }

    /// The right to check `block`, unless another thread is checking it.
    fn claim(&self, block: u64) -> Option<Claim<'_>> {
        let (word, bit) = (&self.claimed[(block / 64) as usize], 1 << (block % 64));
        // `then`, not `then_some`: a `Claim` built and dropped on failure would release the
        // claim of the thread that holds it.
        (word.fetch_or(bit, Ordering::SeqCst) & bit == 0).then(|| Claim { check: self, block })
    }

    /// Waits until no thread is checking `block` (rechecking now and then regardless).
    fn wait_released(&self, block: u64) {
        let mut lock = self.released_lock.lock().unwrap_or_else(|e| e.into_inner());
        while self.is_claimed(block) {
            lock = self
                .released
                .wait_timeout(lock, Duration::from_millis(50))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Checks `block` if no thread has or is checking it: reads and hashes it into `buf`
    /// (`read_and_hash`), and marks it if it matches; a block that fails (or cannot be read)
    /// is left unmarked, for its reader to find. Serves nothing.
    pub(super) fn verify_ahead(&self, file: &File, block: u64, buf: &mut Vec<u8>) {
        if block >= self.blocks() || self.is_verified(block) {
            return;
        }
        let Some(_claim) = self.claim(block) else {
            return;
        };
        // Checked by another thread between the look above and the claim.
        if self.is_verified(block) {
            return;
        }
        buf.resize(self.block_size(block), 0);
        if let Ok(Some(epoch)) = self.read_and_hash(file, block, buf) {
            self.mark(block, epoch);
        }
    }

    /// The length of `block` (`BLOCK` but for a short last block).
    fn block_size(&self, block: u64) -> usize {
        (self.len - block * BLOCK).min(BLOCK) as usize
    }

    /// Reads all of `block` into `buf` (exactly [`block_size`](Check::block_size) long),
    /// hashing each `PIECE` right after reading it, while it is still in the core's cache.
    /// `Some(epoch)` if the block matches its hash (the epoch read before the read, for
    /// `mark`), `None` if it does not; an [`io::ErrorKind::UnexpectedEof`] error if the file
    /// ends before the block does. The one block check, shared by readers and the
    /// verify-ahead helpers.
    fn read_and_hash(&self, file: &File, block: u64, buf: &mut [u8]) -> io::Result<Option<u64>> {
        debug_assert_eq!(buf.len(), self.block_size(block));
        let epoch = self.epoch.load(Ordering::SeqCst);
        let start = block * BLOCK;
        let mut hasher = blake3::Hasher::new();
        for (i, piece) in buf.chunks_mut(PIECE).enumerate() {
            let n = read_full_at(file, piece, start + (i * PIECE) as u64)?;
            if n != piece.len() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            hasher.update(piece);
        }
        Ok((hasher.finalize().as_bytes() == &self.hashes[block as usize]).then_some(epoch))
    }
}

impl DiskReader {
    pub(super) fn new(file: Arc<File>, path: PathBuf, check: Option<Check>) -> DiskReader {
        let cell = OnceLock::new();
        if let Some(c) = check {
            let _ = cell.set(Arc::new(c));
        }
        DiskReader {
            file,
            path,
            check: cell,
            written: None,
            scratch: Mutex::new(Vec::new()),
            ends: Default::default(),
            next_end: AtomicUsize::new(0),
        }
    }

    /// Whether a read of `[offset, end)` continues a sequential read (or starts at 0); notes
    /// where it ends either way.
    fn sequential(&self, offset: u64, end: u64) -> bool {
        for e in &self.ends {
            if e.load(Ordering::Relaxed) == offset {
                e.store(end, Ordering::Relaxed);
                return true;
            }
        }
        let i = self.next_end.fetch_add(1, Ordering::Relaxed) % STREAMS;
        self.ends[i].store(end, Ordering::Relaxed);
        false
    }

    /// A sequential read ends in block `last`: hands the blocks up to `AHEAD` past it that are
    /// not handed yet, nor checked, to the helpers.
    fn request_ahead(&self, c: &Arc<Check>, last: u64) {
        let want = (last + 1 + AHEAD).min(c.blocks());
        if c.ahead.load(Ordering::Relaxed) >= want {
            return;
        }
        let from = c.ahead.fetch_max(want, Ordering::Relaxed).max(last + 1);
        let todo = (from..want).filter(|&b| !c.is_verified(b) && !c.is_claimed(b));
        ahead::submit(todo.map(|block| Job {
            file: Arc::downgrade(&self.file),
            check: Arc::downgrade(c),
            block,
        }));
    }

    /// Copies `out.len()` bytes at `pos` of a checked block straight from the file.
    fn serve(&self, out: &mut [u8], pos: u64) -> io::Result<()> {
        if read_full_at(&self.file, out, pos)? != out.len() {
            return Err(corrupt(&self.path, "file shorter than its length"));
        }
        Ok(())
    }

    /// Serves `[from, from + out.len())` of `block`, which was not checked when the read came
    /// to it: checks it here, or, if another thread is checking it, waits for that (checking
    /// a block handed ahead meanwhile if `help`), and checks it here if that failed.
    fn unchecked_block(
        &self,
        c: &Check,
        block: u64,
        from: usize,
        out: &mut [u8],
        help: bool,
    ) -> io::Result<()> {
        let pos = block * BLOCK + from as u64;
        // Blocks ahead up to here were tried already (each at most once: one that fails its
        // hash stays unchecked, and is not hashed again and again while this one waits).
        let mut tried = block;
        let mut buf = Vec::new();
        loop {
            if let Some(_claim) = c.claim(block) {
                if c.is_verified(block) {
                    return self.serve(out, pos);
                }
                return self.verify_block(c, block, from, out);
            }
            if c.is_verified(block) {
                return self.serve(out, pos);
            }
            // Another thread is checking this block: rather than wait idle, check one handed
            // ahead that no one has taken yet.
            let spare = (tried + 1..c.ahead.load(Ordering::Relaxed).min(block + 1 + AHEAD))
                .find(|&b| !c.is_verified(b) && !c.is_claimed(b));
            match spare {
                Some(b) if help => {
                    tried = b;
                    self.with_scratch(&mut buf, |s| c.verify_ahead(&self.file, b, s));
                }
                _ => c.wait_released(block),
            }
        }
    }

    /// Reads block `block` whole, checks it, and copies `[from, from + out.len())` of it out.
    ///
    /// A read of the whole block is read and hashed in `out` itself, which saves copying it
    /// from the scratch buffer; if the block fails (or cannot be read), `out` is zeroed
    /// before the error returns, so that no unchecked byte stays with the caller.
    fn verify_block(&self, c: &Check, block: u64, from: usize, out: &mut [u8]) -> io::Result<()> {
        let size = c.block_size(block);
        if from == 0 && out.len() == size {
            let checked = self.check_block(c, block, out);
            if checked.is_err() {
                out.fill(0);
            }
            return checked;
        }
        self.with_scratch(&mut Vec::new(), |scratch| {
            scratch.resize(size, 0);
            self.check_block(c, block, scratch)?;
            out.copy_from_slice(&scratch[from..from + out.len()]);
            Ok(())
        })
    }

    /// Runs `f` on the shared scratch buffer, or on `own` while another thread uses it.
    fn with_scratch<R>(&self, own: &mut Vec<u8>, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        match self.scratch.try_lock() {
            Ok(mut scratch) => f(&mut scratch),
            Err(_) => f(own),
        }
    }

    /// Reads `block` into `buf` (its exact size) and checks it: marks it if it matches, or
    /// returns the error its reader gets.
    fn check_block(&self, c: &Check, block: u64, buf: &mut [u8]) -> io::Result<()> {
        match c.read_and_hash(&self.file, block, buf) {
            Ok(Some(epoch)) => {
                c.mark(block, epoch);
                Ok(())
            }
            Ok(None) => Err(corrupt(
                &self.path,
                format!("block {block} fails its blake3 check"),
            )),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(corrupt(
                &self.path,
                format!("file shorter than its length {}", c.len),
            )),
            Err(e) => Err(e),
        }
    }

    fn read_checked(&self, c: &Arc<Check>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        c.revalidate(&self.file, false);
        if offset >= c.len {
            return Ok(0);
        }
        let total = buf.len().min((c.len - offset) as usize);
        let end = offset + total as u64;
        let sequential = self.sequential(offset, end);
        if sequential {
            self.request_ahead(c, (end - 1) / BLOCK);
        }
        let mut done = 0;
        while done < total {
            let pos = offset + done as u64;
            let block = pos / BLOCK;
            let from = (pos % BLOCK) as usize;
            let n = (total - done).min(BLOCK as usize - from);
            let out = &mut buf[done..done + n];
            if c.is_verified(block) {
                self.serve(out, pos)?;
            } else {
                self.unchecked_block(c, block, from, out, sequential)?;
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

    /// A block's hash, whole blocks only (and the partial last one of a committed blob): the
    /// record's, or the writer's as it computes them.
    fn known_hash(&self, offset: u64, len: u64) -> Option<[u8; 32]> {
        if !offset.is_multiple_of(BLOCK) || len == 0 {
            return None;
        }
        let block = offset / BLOCK;
        match self.check.get() {
            Some(c) if len == BLOCK.min(c.len.saturating_sub(offset)) => {
                c.hashes.get(usize::try_from(block).ok()?).copied()
            }
            Some(_) => None,
            None if len == BLOCK => self.written.as_ref()?.get(block),
            None => None,
        }
    }

    /// Compares the file's `fstat` stamp with the one the checked blocks were earned under;
    /// if it changed, every block is hashed again before it is served.
    fn revalidate(&self) {
        if let Some(c) = self.check.get() {
            c.revalidate(&self.file, true);
        }
    }

    /// Committed blobs only, and only when every block the range touches is checked under
    /// the file's current stamp (taken now). The data file holds the blob's bytes at their
    /// own offsets.
    fn file_range(&self, offset: u64, len: u64) -> Option<FileRange> {
        let c = self.check.get()?;
        let end = offset.checked_add(len)?;
        if end > c.len {
            return None;
        }
        c.revalidate(&self.file, true);
        if len > 0 && !(offset / BLOCK..=(end - 1) / BLOCK).all(|b| c.is_verified(b)) {
            return None;
        }
        Some(FileRange::new(self.file.clone(), offset, len))
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

    /// A file cut short under an open reader: the block that reaches past the new end is a
    /// corrupt-entry error (`InvalidData`), the same whether the read covers the whole block
    /// (checked in the caller's buffer) or part of it (checked in the scratch buffer), and
    /// never a plain end-of-file error a caller might take for the end of the entry.
    #[test]
    fn a_file_cut_short_is_corrupt_not_an_early_end() {
        let dir = tempfile::tempdir().unwrap();
        let (s, r, _) = reloaded(dir.path(), 3, &[]);
        let file = fs::OpenOptions::new()
            .write(true)
            .open(s.blob_path("blob"))
            .unwrap();
        file.set_len(BLOCK + BLOCK / 2).unwrap();
        let mut whole = vec![0xAA; BLOCK as usize];
        let err = r.read_at(&mut whole, BLOCK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(whole.iter().all(|&b| b == 0), "unchecked bytes stayed");
        let mut part = vec![0; 10];
        let err = r.read_at(&mut part, 2 * BLOCK + 1).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    }

    /// A read of exactly one whole block is checked in the caller's buffer: the bytes when
    /// the block matches (the short last block too), and when it does not, an error with the
    /// buffer zeroed, so the unchecked bytes read into it do not stay with the caller.
    #[test]
    fn whole_block_reads_are_checked_in_the_callers_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, r, data) = reloaded(dir.path(), 3, &[BLOCK + 17]);
        let c = r.check.get().unwrap();
        let block = BLOCK as usize;
        let mut buf = vec![0xAA; block];
        // Block 0 read whole (never handed ahead: this read checks it): its bytes, and it is
        // marked checked. Blocks 1 to 3 go to the helpers meanwhile; block 1 fails there
        // too, and stays unchecked for its reader.
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), block);
        assert!(buf == data[..block], "block 0's bytes");
        assert!(c.is_verified(0));
        // Block 1 fails: an error, and nothing of it is left in the buffer.
        buf.fill(0xAA);
        let err = r.read_at(&mut buf, BLOCK).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            buf.iter().all(|&b| b == 0),
            "the failed block's bytes stayed"
        );
        assert!(!c.is_verified(1));
        // The short last block (5 bytes), read whole into a buffer of its size.
        let mut last = vec![0xAA; 5];
        assert_eq!(r.read_at(&mut last, 3 * BLOCK).unwrap(), 5);
        assert_eq!(last, data[3 * block..]);
        assert!(c.is_verified(3));
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
        // (Not at 0, nor where an earlier read ended: a sequential read would have the blocks
        // ahead checked too.)
        r.read_at(&mut buf, 100).unwrap();
        assert_eq!(checked(&r), [true, false, false, false]);
    }

    /// Zero-copy ranges are handed out only for committed bytes whose every block is checked
    /// under the file's current stamp: not while written, not for blocks a reopened blob has
    /// not checked yet, not past the end, and no longer once the file changed.
    #[test]
    fn file_ranges_only_of_checked_blocks_under_the_current_stamp() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let len = 2 * BLOCK + 5;
        let mut w = s.create_writer("blob").unwrap();
        let r = w.reader.clone();
        w.write(&vec![7u8; len as usize]).unwrap();
        assert!(r.file_range(0, 10).is_none(), "not committed");
        Box::new(w).commit(Vec::new()).unwrap();
        // Vouched for at commit: every range inside the blob, none reaching past it.
        let range = r
            .file_range(BLOCK - 2, BLOCK + 7)
            .expect("checked at commit");
        assert_eq!((range.offset(), range.len()), (BLOCK - 2, BLOCK + 7));
        let mut buf = [0u8; 3];
        range.file().read_exact_at(&mut buf, len - 3).unwrap();
        assert_eq!(
            buf, [7; 3],
            "the data file holds the blob at its own offsets"
        );
        assert!(r.file_range(0, len).is_some());
        assert!(r.file_range(len, 0).is_some(), "an empty range at the end");
        assert!(r.file_range(0, len + 1).is_none(), "past the end");
        assert!(r.file_range(len + 1, 0).is_none(), "starts past the end");
        assert!(r.file_range(u64::MAX, 2).is_none(), "overflowing range");

        // Reopened: nothing is checked until it is read.
        let (r2, _) = s.open("blob").unwrap();
        assert!(r2.file_range(0, 1).is_none(), "unchecked block 0");
        assert!(
            r2.file_range(5, 0).is_some(),
            "an empty range needs no check"
        );
        assert!(r2.file_range(0, 0).is_some(), "nor at the start");
        let mut block = vec![0u8; BLOCK as usize];
        r2.read_at(&mut block, BLOCK).unwrap();
        assert!(
            r2.file_range(BLOCK, BLOCK).is_some(),
            "block 1 checked by the read"
        );
        assert!(
            r2.file_range(BLOCK - 1, 2).is_none(),
            "touches unchecked block 0"
        );
        assert!(
            r2.file_range(BLOCK, BLOCK + 1).is_none(),
            "touches unchecked block 2"
        );

        // A change of the file (seen by its stamp) withdraws every range, without a read.
        tamper(
            &s.blob_path("blob"),
            BLOCK + 3,
            SystemTime::now() + Duration::from_secs(1),
        );
        assert!(
            r.file_range(0, 10).is_none(),
            "file changed since the commit"
        );
        assert!(r.file_range(BLOCK, 1).is_none(), "the changed block");
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

    /// A blob of `blocks` blocks (and 5 bytes) written and committed by an earlier handle,
    /// opened afresh (no block checked), with one byte flipped at each of `flips` first.
    fn reloaded(
        dir: &std::path::Path,
        blocks: u64,
        flips: &[u64],
    ) -> (DiskStorage, Arc<DiskReader>, Vec<u8>) {
        let data: Vec<u8> = (0..blocks * BLOCK + 5).map(|i| (i % 253) as u8).collect();
        {
            let s = DiskStorage::open(dir).unwrap();
            let mut w = s.create("blob").unwrap();
            w.write(&data).unwrap();
            w.commit(Vec::new()).unwrap();
            for &at in flips {
                tamper(&s.blob_path("blob"), at, SystemTime::now());
            }
        }
        let s = DiskStorage::open(dir).unwrap();
        let (r, _) = s.open_reader("blob").unwrap();
        (s, r, data)
    }

    /// Waits (up to 20 s) until `done` holds of the reader's check.
    fn wait_for(r: &DiskReader, what: &str, done: impl Fn(&Check) -> bool) {
        let c = r.check.get().unwrap();
        let t = std::time::Instant::now();
        while !done(c) {
            assert!(t.elapsed() < Duration::from_secs(20), "timed out: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Reads `[offset, offset + len)` whole.
    fn read(r: &dyn BlobReader, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        let n = r.read_at(&mut buf, offset)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// A sequential read hands the blocks ahead to the helpers, which check them; one of them
    /// with a flipped byte stays unchecked and is an error when the reader gets there (and
    /// again after), never data, while the blocks around it read right.
    #[test]
    fn a_flipped_byte_ahead_is_an_error_when_reached() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, r, data) = reloaded(dir.path(), 6, &[3 * BLOCK + 17]);
        let d = &*r;
        let b = BLOCK as usize;
        assert_eq!(read(&*r, 0, b).unwrap(), &data[..b]);
        wait_for(d, "blocks 1, 2 and 4 checked ahead", |c| {
            c.is_verified(1) && c.is_verified(2) && c.is_verified(4)
        });
        wait_for(d, "block 3 tried", |c| !c.is_claimed(3));
        assert!(!d.check.get().unwrap().is_verified(3));
        assert_eq!(read(&*r, BLOCK, 2 * b).unwrap(), &data[b..3 * b]);
        for _ in 0..2 {
            let err = read(&*r, 3 * BLOCK, b).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        }
        let err = read(&*r, 3 * BLOCK - 10, 20).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(read(&*r, 4 * BLOCK, b).unwrap(), &data[4 * b..5 * b]);
        // Block 5 was handed ahead by the sequential reads since.
        wait_for(d, "block 5 checked ahead", |c| c.is_verified(5));
        assert_eq!(checked(d)[..6], [true, true, true, false, true, true]);
    }

    /// A block checked ahead and then altered on disk (a new stamp) is checked again when the
    /// reader reaches it after a revalidation (the stream reader revalidates at every block it
    /// enters): an error, not the bytes the helper vouched for.
    #[test]
    fn a_block_checked_ahead_then_altered_fails_when_reached() {
        let dir = tempfile::tempdir().unwrap();
        let (s, r, data) = reloaded(dir.path(), 4, &[]);
        let d = &*r;
        assert_eq!(read(&*r, 0, 4096).unwrap(), &data[..4096]);
        wait_for(d, "blocks 1 and 2 checked ahead", |c| {
            c.is_verified(1) && c.is_verified(2)
        });
        tamper(
            &s.blob_path("blob"),
            2 * BLOCK + 9,
            SystemTime::now() + Duration::from_secs(1),
        );
        r.revalidate();
        let b = BLOCK as usize;
        assert_eq!(read(&*r, 4096, b - 4096).unwrap(), &data[4096..b]);
        assert_eq!(read(&*r, BLOCK, b).unwrap(), &data[b..2 * b]);
        let err = read(&*r, 2 * BLOCK, b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    /// Reads at scattered offsets (none starting where another ended) hand nothing ahead:
    /// only the blocks they read get checked.
    #[test]
    fn random_reads_check_only_what_they_read() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, r, data) = reloaded(dir.path(), 12, &[]);
        let d = &*r;
        for at in [
            9 * BLOCK + 100,
            3 * BLOCK + 5,
            6 * BLOCK + 77,
            3 * BLOCK + 9000,
        ] {
            let got = read(&*r, at, 1000).unwrap();
            assert_eq!(got, &data[at as usize..at as usize + 1000]);
        }
        // `ahead` is raised before any block is handed to the helpers, so 0 proves none was:
        // nothing can be checked behind our back, and no wait is needed before looking.
        assert_eq!(d.check.get().unwrap().ahead.load(Ordering::Relaxed), 0);
        let want: Vec<bool> = (0..13).map(|b| [3, 6, 9].contains(&b)).collect();
        assert_eq!(checked(d), want);
    }

    /// A reader that reaches a block another thread is checking waits for that check, and
    /// serves nothing of the block until it is done (here the other thread gives up, so the
    /// reader checks the block itself).
    #[test]
    fn a_reader_waits_for_a_check_in_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (_s, r, data) = reloaded(dir.path(), 2, &[]);
        let c = r.check.get().unwrap().clone();
        let claim = c.claim(1).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = r.clone();
        let t = std::thread::spawn(move || {
            let _ = tx.send(read(&*reader, BLOCK + 3, 4000));
        });
        if let Ok(got) = rx.recv_timeout(Duration::from_millis(100)) {
            panic!("served a block being checked: {:?}", got.map(|v| v.len()));
        }
        drop(claim);
        let got = rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
        assert_eq!(got, &data[BLOCK as usize + 3..BLOCK as usize + 4003]);
        t.join().unwrap();
        assert!(c.is_verified(1));
    }

    /// Several readers of one blob at once, sequential with different read sizes, one of them
    /// at scattered offsets: all read the right bytes, and all get an error (never data) at
    /// the block with a flipped byte, whoever checked which block.
    #[test]
    fn several_readers_of_one_blob() {
        for flips in [vec![], vec![5 * BLOCK + 1]] {
            let dir = tempfile::tempdir().unwrap();
            let (_s, r, data) = reloaded(dir.path(), 10, &flips);
            let bad = flips.first().map(|&f| f / BLOCK);
            std::thread::scope(|scope| {
                for piece in [64 << 10, 1 << 20, 300_001, (1 << 20) + 7] {
                    let (r, data) = (&r, &data);
                    scope.spawn(move || {
                        let mut at = 0;
                        while at < data.len() {
                            let len = piece.min(data.len() - at);
                            let (first, last) = (at as u64 / BLOCK, (at + len - 1) as u64 / BLOCK);
                            match read(&**r, at as u64, len) {
                                Ok(got) => {
                                    assert!(bad.is_none_or(|b| b < first || b > last));
                                    assert_eq!(got, &data[at..at + len], "at {at}");
                                    at += len;
                                }
                                Err(e) => {
                                    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                                    let b = bad.expect("an error reading an intact blob");
                                    assert!(first <= b && b <= last);
                                    // Go on past the bad block.
                                    at = ((b + 1) * BLOCK) as usize;
                                }
                            }
                        }
                    });
                }
                let (r, data) = (&r, &data);
                scope.spawn(move || {
                    for i in 0..40u64 {
                        let at = (i * 7_919_993) % (data.len() as u64 - 5000);
                        let b = at / BLOCK;
                        match read(&**r, at, 5000) {
                            Ok(got) => {
                                assert!(bad.is_none_or(|x| x != b && x != (at + 4999) / BLOCK));
                                assert_eq!(got, &data[at as usize..at as usize + 5000]);
                            }
                            Err(e) => {
                                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                                assert!(bad.is_some());
                            }
                        }
                    }
                });
            });
        }
    }

    /// `known_hash` hands out a block's hash as soon as the writer has it (whole blocks only
    /// while writing, helper thread or not), the partial last one once committed, the same
    /// after reopening, and never a hash of anything but a whole block.
    #[test]
    fn known_hashes_are_the_blocks_hashes() {
        for (_dir, s) in super::super::test_support::inline_and_helped() {
            let helpers = s.inner.hash_helpers;
            let b = BLOCK as usize;
            let data: Vec<u8> = (0..3 * b + 10).map(|i| (i * 7 % 251) as u8).collect();
            let want = |i: usize| {
                let block = &data[i * b..((i + 1) * b).min(data.len())];
                Some(*blake3::hash(block).as_bytes())
            };
            let mut w = s.create("blob").unwrap();
            let r = w.reader();
            assert_eq!(r.known_hash(0, BLOCK), None, "nothing written yet");
            w.write(&data[..2 * b + 1]).unwrap();
            assert_eq!(r.known_hash(0, BLOCK), want(0), "helpers {helpers}");
            // The second block may still be with the helper; once there, it is right.
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while r.known_hash(BLOCK, BLOCK).is_none() {
                assert!(std::time::Instant::now() < deadline, "block 1 never hashed");
                std::thread::yield_now();
            }
            assert_eq!(r.known_hash(BLOCK, BLOCK), want(1));
            assert_eq!(
                r.known_hash(2 * BLOCK, 1),
                None,
                "a partial block while writing"
            );
            assert_eq!(r.known_hash(1, BLOCK), None, "not a block's start");
            assert_eq!(r.known_hash(0, 2 * BLOCK), None, "not one block");
            assert_eq!(r.known_hash(0, 0), None);
            w.write(&data[2 * b + 1..]).unwrap();
            w.commit(Vec::new()).unwrap();
            let (reopened, _) = s.open("blob").unwrap();
            for r in [&r, &reopened] {
                for i in 0..3 {
                    assert_eq!(r.known_hash((i * b) as u64, BLOCK), want(i));
                }
                assert_eq!(
                    r.known_hash(3 * BLOCK, 10),
                    want(3),
                    "the last, partial block"
                );
                assert_eq!(r.known_hash(3 * BLOCK, 9), None);
                assert_eq!(r.known_hash(4 * BLOCK, BLOCK), None, "past the end");
            }
        }
    }
}
