//! Writing a blob: [`DiskWriter`] appends to a staged file in `tmp/`, hashes it block by
//! block as it goes (see `hashing`), and commits it (see "Commit and crash safety" on
//! [`DiskStorage`]).
//!
//! Invariants: the record is the commit point: it is renamed into place after the data, and
//! the record of a blob being replaced is removed before the new data moves in, so no one
//! pairs an old record with new data and a crash leaves the name absent or whole; a commit
//! that returns an error leaves nothing that a later open or listing would serve; with
//! [`Durability::SyncOnCommit`](super::Durability::SyncOnCommit), data, record and the
//! directories they were renamed into are fsynced before the commit returns. A committed
//! blob's blocks start out checked only if the file is still as the writer's last write
//! left it (same length, no later modification time).

use std::fs::{self, File};
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tempfile::TempPath;

use super::file::staged_file;
use super::hashing::{BlockHashes, Tail};
use super::reader::{Check, DiskReader, Stamp};
use super::record::{Record, check_meta_len};
use super::{BLOCK, DiskInner, DiskStorage};
use crate::storage::{BlobReader, BlobWriter, validate_name};

#[derive(Debug)]
pub(super) struct DiskWriter {
    storage: Arc<DiskInner>,
    name: String,
    file: Arc<File>,
    /// The reader every reader of this blob shares; it starts checking hashes at commit.
    pub(super) reader: Arc<DiskReader>,
    /// The staged file; deleted when dropped unless committed.
    pub(super) staged: TempPath,
    pub(super) len: u64,
    /// Hash of the first block, as it is written.
    block: blake3::Hasher,
    /// Hashes of the blocks hashed so far, here or by the helper; shared with `reader`.
    hashes: Arc<BlockHashes>,
    /// Once the blob grows past its first block: the rest, and who hashes it.
    tail: Option<Tail>,
    /// Wall-clock time (seconds, nanoseconds since the epoch) just after the last write: a
    /// file modified later has a later modification time.
    last_write: Option<(i64, i64)>,
}

/// Now, as file times are kept (seconds, nanoseconds since the epoch).
fn wall_clock() -> Option<(i64, i64)> {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some((
        i64::try_from(d.as_secs()).ok()?,
        i64::from(d.subsec_nanos()),
    ))
}

impl DiskStorage {
    /// `Storage::create`, with the writer's concrete type (unit tests look into its reader).
    pub(super) fn create_writer(&self, name: &str) -> io::Result<DiskWriter> {
        validate_name(name)?;
        let (file, staged) = staged_file(&self.inner.tmp, name)?;
        let file = Arc::new(file);
        let hashes = Arc::new(BlockHashes::default());
        let mut reader = DiskReader::new(file.clone(), self.blob_path(name), None);
        reader.written = Some(hashes.clone());
        let reader = Arc::new(reader);
        Ok(DiskWriter {
            storage: self.inner.clone(),
            name: name.to_owned(),
            file,
            reader,
            staged,
            len: 0,
            block: blake3::Hasher::new(),
            hashes,
            tail: None,
            last_write: None,
        })
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
                    tail.block_full(&self.hashes, self.storage.hash_helpers)?;
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
            Some(tail) => tail.finish(&self.hashes)?,
            // Shorter than one block (a blob of exactly one was hashed as it filled).
            None if self.len < BLOCK && self.len > 0 => {
                self.hashes.push(*self.block.finalize().as_bytes());
            }
            None => {}
        }
        let last_write = self.last_write;
        let st = self.storage.clone();
        if st.syncs() {
            self.file.sync_data()?;
        }
        let rec = Record {
            len: self.len,
            hashes: self.hashes.to_vec(),
            meta,
        };
        let record = rec.encode();
        // Journaled before the rename: the journal names every committed blob (and, after a
        // crash right here, one that never was).
        st.journal().committed(&self.name, rec.len, &rec.meta);
        // The hashes go on to the blob's check (one copy of them, not two).
        let Record {
            len,
            hashes: block_hashes,
            ..
        } = rec;
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
            // Not committed, so nothing of it may be reloaded later, also when only the final
            // fsync of the directory failed, after both renames.
            let _ = fs::remove_file(&meta_path);
            let _ = fs::remove_file(shard.join(&name));
            return Err(e);
        }
        // From now on the file is at rest: its readers check what they read.
        let _ = reader.check.set(Arc::new(check));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::io;
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, SystemTime};

    use super::super::reader::tests::checked;
    use super::super::test_support::tamper;
    use super::*;
    use crate::storage::Storage;

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
}
