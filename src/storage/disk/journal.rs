//! The change journal: every commit and removal, appended as it happens, so that the hint a
//! cache saved (`Storage::put_hint`) plus the changes journaled since describe the storage
//! after a crash as well as after a clean close, and the next open needs no listing.
//!
//! Files (in the storage directory):
//!
//! ```text
//! index-journal   header: magic b"SCJRNL01", generation (u64), start (u64: the journal
//!                 offset of its first record), then records, each: body length (u32),
//!                 body, the first 16 bytes of blake3(body). Body: kind (1 = committed,
//!                 2 = removed), name length (u16), name; for a commit also the data length
//!                 (u64), the metadata length (u32) and the metadata. Little endian.
//! index-hint      header: magic b"SCHINT02", the journal generation and the journal offset
//!                 (the mark) the hint was made at, then the owner's bytes.
//! ```
//!
//! Invariants:
//! * A commit is journaled before its rename and a removal after its unlink, so the journal
//!   from the hint's mark on names every blob committed since (and maybe a few that never
//!   were: a crash between the append and the rename), and every blob removed since.
//! * A hint is used only with the journal of its generation, and only if that journal
//!   still holds every record from the hint's mark on (`start <= mark`); records before the
//!   mark may remain (replaying them is harmless: names are never reused for other bytes).
//! * A journal that cannot be appended to (a full disk, EIO) is abandoned: the hint is
//!   deleted at once, so the next open lists the storage; journaling resumes with a new
//!   generation when the next hint is saved.
//! * Opening keeps a journal only if a hint of its generation is in place; a torn last
//!   record (a crash during an append) is cut off; any other damage discards the journal
//!   and the hint (the open then lists the storage).

use std::fs::{self, File};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::file::{open_regular, staged_file};
use crate::storage::{BlobInfo, Change};

pub(super) const JOURNAL_FILE: &str = "index-journal";
pub(super) const HINT_FILE: &str = "index-hint";
const JOURNAL_MAGIC: &[u8; 8] = b"SCJRNL01";
const HINT_MAGIC: &[u8; 8] = b"SCHINT02";
/// Magic, generation, start.
const JOURNAL_HEADER: u64 = 24;
/// Magic, generation, mark.
pub(super) const HINT_HEADER: u64 = 24;
const COMMITTED: u8 = 1;
const REMOVED: u8 = 2;
const TAG: usize = 16;
/// A journal file larger than this is not read (the open lists instead): a cache saves a new
/// hint once 16 MiB of changes accumulate, so only damage or a cache that could not save
/// hints for a long time leaves one this large.
const MAX_JOURNAL: u64 = 256 << 20;
/// The longest record body: a name, the lengths, and the most metadata a blob can have.
const MAX_BODY: usize =
    1 + 2 + crate::storage::MAX_NAME_LEN + 8 + 4 + super::DiskStorage::MAX_META_LEN;

/// The journal's state. Lock: the `Mutex` in `DiskInner` around it; appends, hint saves and
/// the backlog all take it.
#[derive(Debug)]
pub(super) struct Journal {
    dir: PathBuf,
    /// Where new journal files are staged (the storage's `tmp/`).
    tmp: PathBuf,
    /// `None` once abandoned (see the module invariants): nothing is appended.
    file: Option<File>,
    generation: u64,
    /// Journal offset of the file's first record.
    start: u64,
    /// Journal offset of the end of the last record: the mark `hint_epoch` hands out.
    end: u64,
    /// The mark of the hint in place, if one is (of this generation).
    hint_mark: Option<u64>,
    /// The records since the hint's mark, read at open (their lengths and the last one
    /// checked), until `take_loaded` checks and hands them over.
    loaded: Option<Vec<u8>>,
    /// Sync each append before the change it announces (`Durability::SyncOnCommit`).
    sync: bool,
}

fn random_generation() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn damaged(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("index journal: {what}"))
}

fn remove_if_there(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

impl Journal {
    /// Opens the journal of `dir`: keeps it (with the changes since the hint's mark) if the
    /// hint in place belongs to it, else deletes both and starts a new generation.
    pub(super) fn open(dir: &Path, tmp: &Path, sync: bool) -> io::Result<Journal> {
        match Self::resume(dir, tmp, sync) {
            Ok(Some(j)) => return Ok(j),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "the index journal or hint is unusable; the storage will be listed");
            }
        }
        // Stale files that cannot be deleted do no harm: a hint is used only with the journal
        // of its generation, and the next journal gets a new one.
        for stale in [HINT_FILE, JOURNAL_FILE] {
            if let Err(e) = remove_if_there(&dir.join(stale)) {
                tracing::warn!(error = %e, file = stale, "could not delete a stale index file");
            }
        }
        // Nothing is journaled until an owner takes a mark (`mark`): a storage whose owner
        // keeps no hints never grows a journal.
        Ok(Journal {
            dir: dir.to_path_buf(),
            tmp: tmp.to_path_buf(),
            file: None,
            generation: 0,
            start: 0,
            end: 0,
            hint_mark: None,
            loaded: None,
            sync,
        })
    }

    /// The journal of the hint in place, if both are there and belong together.
    fn resume(dir: &Path, tmp: &Path, sync: bool) -> io::Result<Option<Journal>> {
        let hint = match open_regular(&dir.join(HINT_FILE)) {
            Ok((f, _)) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut head = [0u8; HINT_HEADER as usize];
        (&hint)
            .read_exact(&mut head)
            .map_err(|_| damaged("hint header"))?;
        if &head[..8] != HINT_MAGIC {
            // A hint of an earlier version, without a journal: it describes nothing now.
            return Ok(None);
        }
        let generation = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        let mark = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        let mut file = match open_journal(&dir.join(JOURNAL_FILE)) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() > MAX_JOURNAL {
            return Err(damaged("larger than any journal a cache leaves"));
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (journal_generation, start, whole) = scan(&bytes)?;
        let end = start + (whole - JOURNAL_HEADER as usize) as u64;
        if journal_generation != generation || start > mark || mark > end {
            return Ok(None);
        }
        // Cut a torn last record off, so that appends continue after the last whole one.
        file.set_len(whole as u64)?;
        file.seek(SeekFrom::End(0))?;
        // The records from the mark on, checked and decoded when they are taken (on the
        // cache's loader thread, not in `open`).
        bytes.truncate(whole);
        let from = JOURNAL_HEADER as usize + (mark - start) as usize;
        Ok(Some(Journal {
            dir: dir.to_path_buf(),
            tmp: tmp.to_path_buf(),
            file: Some(file),
            generation,
            start,
            end,
            hint_mark: Some(mark),
            loaded: Some(bytes.split_off(from)),
            sync,
        }))
    }

    /// Starts a new generation: an empty journal at offset `end` (kept, so marks only grow).
    fn restart(&mut self) -> io::Result<()> {
        self.file = None;
        self.hint_mark = None;
        self.generation = random_generation();
        self.start = self.end;
        let (mut f, staged) = staged_file(&self.tmp, "journal")?;
        f.write_all(&self.header())?;
        if self.sync {
            f.sync_data()?;
        }
        staged
            .persist(self.dir.join(JOURNAL_FILE))
            .map_err(|e| e.error)?;
        f.seek(SeekFrom::End(0))?;
        self.file = Some(f);
        Ok(())
    }

    fn header(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(JOURNAL_HEADER as usize);
        h.extend_from_slice(JOURNAL_MAGIC);
        h.extend_from_slice(&self.generation.to_le_bytes());
        h.extend_from_slice(&self.start.to_le_bytes());
        h
    }

    /// Journals a commit of `name` (before its rename).
    pub(super) fn committed(&mut self, name: &str, len: u64, meta: &[u8]) {
        if self.file.is_none() {
            return;
        }
        let mut rec = record(COMMITTED, name, 12 + meta.len());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        rec.extend_from_slice(meta);
        self.append(rec);
    }

    /// Journals a removal of `name` (after its unlink).
    pub(super) fn removed(&mut self, name: &str) {
        if self.file.is_none() {
            return;
        }
        self.append(record(REMOVED, name, 0));
    }

    /// Appends `rec` (from `record`, its body complete): fills in its length, adds its tag.
    fn append(&mut self, mut rec: Vec<u8>) {
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let body_len = (rec.len() - 4) as u32;
        rec[..4].copy_from_slice(&body_len.to_le_bytes());
        let tag = blake3::hash(&rec[4..]);
        rec.extend_from_slice(&tag.as_bytes()[..TAG]);
        let written = file
            .write_all(&rec)
            .and_then(|()| if self.sync { file.sync_data() } else { Ok(()) });
        match written {
            Ok(()) => self.end += rec.len() as u64,
            Err(e) => self.abandon(&e),
        }
    }

    /// Stops journaling after a failed append, deleting the hint it would have completed (or,
    /// if the hint cannot be deleted, the journal: a hint without its journal is not used).
    /// A mark taken before cannot go with a later journal: that one has a new generation.
    fn abandon(&mut self, e: &io::Error) {
        tracing::error!(error = %e, "could not append to the index journal; the next open will list the storage");
        self.file = None;
        self.hint_mark = None;
        if let Err(e) = remove_if_there(&self.dir.join(HINT_FILE)) {
            tracing::error!(error = %e, "could not delete the index hint; deleting its journal instead");
            if let Err(e) = remove_if_there(&self.dir.join(JOURNAL_FILE)) {
                tracing::error!(error = %e, "could not delete the index journal either: the next open may miss the latest changes");
            }
        }
    }

    /// The mark a hint made from now on is taken at: the end of the journal. A journal that
    /// was abandoned starts a new generation here (the hint made next describes every change
    /// before it).
    pub(super) fn mark(&mut self) -> io::Result<u64> {
        if self.file.is_none() {
            self.restart()?;
        }
        Ok(self.end)
    }

    /// How far the journal runs past the hint in place (`u64::MAX` without one).
    pub(super) fn backlog(&self) -> u64 {
        // (A hint is in place only while journaling: `abandon` and `restart` clear it.)
        self.hint_mark.map_or(u64::MAX, |mark| self.end - mark)
    }

    /// Saves the hint staged at `staged` (its header names `generation` and `mark`; written
    /// by the caller without this lock): moves it into place and cuts the journal down to
    /// the records from `mark` on. Refused (`false`) if the journal was abandoned or
    /// restarted since `mark` was taken.
    pub(super) fn install_hint(
        &mut self,
        staged: tempfile::TempPath,
        generation: u64,
        mark: u64,
    ) -> io::Result<bool> {
        if self.file.is_none() || generation != self.generation || mark < self.start {
            return Ok(false);
        }
        staged
            .persist(self.dir.join(HINT_FILE))
            .map_err(|e| e.error)?;
        self.hint_mark = Some(mark);
        // The records from `mark` on move to a new journal file; until it replaces the old
        // one, the old one (a superset) goes with the new hint.
        if let Err(e) = self.cut(mark) {
            tracing::warn!(error = %e, "could not shorten the index journal; it keeps its older records");
        }
        Ok(true)
    }

    fn cut(&mut self, mark: u64) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.dir.join(JOURNAL_FILE);
        let old = self.file.as_ref().ok_or_else(|| damaged("abandoned"))?;
        let mut rest = vec![0; (self.end - mark) as usize];
        old.read_exact_at(&mut rest, JOURNAL_HEADER + (mark - self.start))?;
        let (mut f, staged) = staged_file(&self.tmp, "journal")?;
        let start = self.start;
        self.start = mark;
        let header = self.header();
        self.start = start;
        f.write_all(&header)?;
        f.write_all(&rest)?;
        if self.sync {
            f.sync_data()?;
        }
        staged.persist(&path).map_err(|e| e.error)?;
        f.seek(SeekFrom::End(0))?;
        self.start = mark;
        self.file = Some(f);
        Ok(())
    }

    /// The current generation (a hint records it).
    pub(super) fn generation(&self) -> u64 {
        self.generation
    }

    /// The changes since the hint's mark, once (`None` if there is no hint to go with them).
    /// A record that fails its check (damage before the last record) abandons the journal,
    /// deleting the hint: `None`, and the owner lists the storage.
    pub(super) fn take_loaded(&mut self) -> Option<Vec<Change>> {
        self.hint_mark?;
        let bytes = self.loaded.take()?;
        match decode_all(&bytes) {
            Ok(changes) => Some(changes),
            Err(e) => {
                self.abandon(&e);
                None
            }
        }
    }
}

/// Opens the journal for reading and appending, refusing anything but a regular file (see
/// "Hostile files" on `DiskStorage`).
fn open_journal(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = File::options()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(damaged("not a regular file"));
    }
    Ok(file)
}

/// A record's start (room for its length, its kind and name), with room for `rest` more
/// body bytes and the tag: one allocation per record.
fn record(kind: u8, name: &str, rest: usize) -> Vec<u8> {
    let mut rec = Vec::with_capacity(4 + 1 + 2 + name.len() + rest + TAG);
    rec.extend_from_slice(&[0; 4]);
    rec.push(kind);
    rec.extend_from_slice(&(name.len() as u16).to_le_bytes());
    rec.extend_from_slice(name.as_bytes());
    rec
}

/// A hint file's header for `generation` and `mark`.
pub(super) fn hint_header(generation: u64, mark: u64) -> [u8; HINT_HEADER as usize] {
    let mut h = [0u8; HINT_HEADER as usize];
    h[..8].copy_from_slice(HINT_MAGIC);
    h[8..16].copy_from_slice(&generation.to_le_bytes());
    h[16..].copy_from_slice(&mark.to_le_bytes());
    h
}

/// Reads a journal file's header and walks its records by their lengths: the generation,
/// the start, and the length of the file up to the end of its last whole record (a torn
/// last one, cut short or failing its hash, is left out). Only the last record's hash is
/// checked here (`decode_all` checks the others).
fn scan(bytes: &[u8]) -> io::Result<(u64, u64, usize)> {
    if bytes.len() < JOURNAL_HEADER as usize || &bytes[..8] != JOURNAL_MAGIC {
        return Err(damaged("header"));
    }
    let generation = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    let start = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let mut at = JOURNAL_HEADER as usize;
    let mut last = None;
    while at < bytes.len() {
        let Some(len) = bytes.get(at..at + 4) else {
            break;
        };
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
        if len > MAX_BODY {
            return Err(damaged("record length"));
        }
        let Some(rec) = bytes.get(at..at + 4 + len + TAG) else {
            break; // Torn: the file ends inside this record.
        };
        last = Some((at, rec));
        at += rec.len();
    }
    if let Some((last_at, rec)) = last
        && !intact(rec)
    {
        // The last whole-length record, partly written.
        at = last_at;
    }
    Ok((generation, start, at))
}

/// Whether a whole record (length, body, tag) matches its tag.
fn intact(rec: &[u8]) -> bool {
    let body = &rec[4..rec.len() - TAG];
    blake3::hash(body).as_bytes()[..TAG] == rec[rec.len() - TAG..]
}

/// Checks and decodes whole records (as `scan` left them): any that fails is damage.
fn decode_all(mut bytes: &[u8]) -> io::Result<Vec<Change>> {
    let mut changes = Vec::new();
    while !bytes.is_empty() {
        let len = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
            .ok_or_else(|| damaged("record length"))?;
        let rec = bytes
            .get(..4 + len + TAG)
            .ok_or_else(|| damaged("record length"))?;
        if !intact(rec) {
            return Err(damaged("record hash"));
        }
        changes.push(decode(&rec[4..4 + len]).ok_or_else(|| damaged("record body"))?);
        bytes = &bytes[rec.len()..];
    }
    Ok(changes)
}

fn decode(body: &[u8]) -> Option<Change> {
    let (&kind, rest) = body.split_first()?;
    let name_len = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let name = std::str::from_utf8(rest.get(2..2 + name_len)?).ok()?;
    crate::storage::validate_name(name).ok()?;
    let rest = &rest[2 + name_len..];
    match kind {
        REMOVED if rest.is_empty() => Some(Change::Removed(name.to_owned())),
        COMMITTED => {
            let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
            let meta_len = u32::from_le_bytes(rest.get(8..12)?.try_into().ok()?) as usize;
            let meta = rest.get(12..)?;
            (meta.len() == meta_len).then(|| {
                Change::Committed(BlobInfo {
                    name: name.to_owned(),
                    len,
                    meta: meta.to_vec(),
                })
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(dir: &Path) -> Journal {
        fs::create_dir_all(dir.join("tmp")).unwrap();
        Journal::open(dir, &dir.join("tmp"), false).unwrap()
    }

    fn save_hint(j: &mut Journal, dir: &Path, body: &[u8]) -> bool {
        let mark = j.mark().unwrap();
        let (mut f, staged) = staged_file(&dir.join("tmp"), "hint").unwrap();
        f.write_all(&hint_header(j.generation(), mark)).unwrap();
        f.write_all(body).unwrap();
        j.install_hint(staged, j.generation(), mark).unwrap()
    }

    /// Reopens `dir` and checks that the journal was not used and its hint is gone (the
    /// owner lists the storage).
    fn reopen_lists(dir: &Path) {
        let mut j = journal(dir);
        assert_eq!(j.take_loaded(), None);
        assert!(!dir.join(HINT_FILE).exists());
    }

    /// A directory with a hint and a journal of two commits after it (`aa`, then `bb`);
    /// the journal's path.
    fn hint_then_two_records() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"hint"));
        j.committed("aa", 1, b"x");
        j.committed("bb", 2, b"y");
        let path = dir.path().join(JOURNAL_FILE);
        (dir, path)
    }

    fn names(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Committed(b) => format!("+{}:{}:{:?}", b.name, b.len, b.meta),
                Change::Removed(n) => format!("-{n}"),
            })
            .collect()
    }

    /// The changes after the hint's mark come back at the next open, in order; those before
    /// it do not.
    #[test]
    fn changes_since_the_hint_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        // Before the first mark nothing is journaled (the hint shows it).
        j.committed("aa", 1, b"x");
        assert!(!dir.path().join(JOURNAL_FILE).exists());
        assert!(save_hint(&mut j, dir.path(), b"hint"));
        j.committed("bb", 2, b"yy");
        j.removed("aa");
        drop(j);
        let mut j = journal(dir.path());
        assert_eq!(
            names(&j.take_loaded().unwrap()),
            ["+bb:2:[121, 121]", "-aa"]
        );
        assert_eq!(j.take_loaded(), None, "handed over once");
        // Appends continue after the reopen.
        j.committed("cc", 3, b"");
        drop(j);
        let mut j = journal(dir.path());
        assert_eq!(names(&j.take_loaded().unwrap()).len(), 3);
    }

    /// Without a hint there is nothing to go with the journal: it starts over.
    #[test]
    fn no_hint_no_changes() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        j.mark().unwrap();
        j.committed("aa", 1, b"x");
        assert!(dir.path().join(JOURNAL_FILE).exists());
        drop(j);
        let mut j = journal(dir.path());
        assert_eq!(j.take_loaded(), None);
        assert_eq!(j.backlog(), u64::MAX);
        assert!(
            !dir.path().join(JOURNAL_FILE).exists(),
            "a stale journal is deleted"
        );
    }

    /// A torn last record (a crash during the append) is dropped and cut off; appends
    /// continue after the last whole one.
    #[test]
    fn a_torn_tail_is_cut_off() {
        let (dir, path) = hint_then_two_records();
        let len = fs::metadata(&path).unwrap().len();
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 5).unwrap();
        let mut j = journal(dir.path());
        assert_eq!(names(&j.take_loaded().unwrap()), ["+aa:1:[120]"]);
        j.removed("aa");
        drop(j);
        let mut j = journal(dir.path());
        assert_eq!(names(&j.take_loaded().unwrap()), ["+aa:1:[120]", "-aa"]);
    }

    /// A last record of whole length whose bytes did not all reach the file (its hash fails)
    /// is cut off too; a journal larger than any a cache leaves is not read at all.
    #[test]
    fn a_half_written_last_record_is_cut_off_and_a_huge_journal_ignored() {
        let (dir, path) = hint_then_two_records();
        let mut bytes = fs::read(&path).unwrap();
        let n = bytes.len();
        bytes[n - TAG - 1] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let mut j = journal(dir.path());
        assert_eq!(names(&j.take_loaded().unwrap()), ["+aa:1:[120]"]);
        drop(j);
        let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(MAX_JOURNAL + 1).unwrap(); // sparse
        reopen_lists(dir.path());
    }

    /// A hint saved while the journal still holds records from before its mark (a crash
    /// between moving the hint into place and cutting the journal) takes only the records
    /// from its mark on; a hint whose mark lies past the journal's end is not used.
    #[test]
    fn the_mark_picks_the_records_and_must_lie_within_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(JOURNAL_FILE);
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"h0"));
        j.committed("aa", 1, b"x");
        let uncut = fs::read(&path).unwrap();
        assert!(save_hint(&mut j, dir.path(), b"h1"));
        j.committed("cc", 3, b"z");
        drop(j);
        // The journal as if the cut never happened: the old records, then the new one.
        let now = fs::read(&path).unwrap();
        let mut joined = uncut.clone();
        joined.extend_from_slice(&now[JOURNAL_HEADER as usize..]);
        fs::write(&path, &joined).unwrap();
        let mut j = journal(dir.path());
        assert_eq!(names(&j.take_loaded().unwrap()), ["+cc:3:[122]"]);
        j.committed("dd", 4, b"");
        drop(j);
        let mut j = journal(dir.path());
        assert_eq!(
            names(&j.take_loaded().unwrap()),
            ["+cc:3:[122]", "+dd:4:[]"]
        );
        drop(j);
        // A journal that ends before the hint's mark (an older copy of it): not used.
        fs::write(&path, &uncut[..JOURNAL_HEADER as usize]).unwrap();
        reopen_lists(dir.path());
    }

    /// Record lengths are bounded by the largest record a commit can make: a record with the
    /// most metadata is read back, a length past the bound is damage, not a torn tail.
    #[test]
    fn record_lengths_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"hint"));
        let name = "n".repeat(crate::storage::MAX_NAME_LEN);
        let meta = vec![9u8; super::super::DiskStorage::MAX_META_LEN];
        j.committed(&name, 5, &meta);
        drop(j);
        let mut j = journal(dir.path());
        match &j.take_loaded().unwrap()[..] {
            [Change::Committed(b)] => assert!(b.name == name && b.meta == meta),
            other => panic!("{} changes", other.len()),
        }
        drop(j);
        let mut bytes = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
        bytes.truncate(JOURNAL_HEADER as usize);
        bytes.extend_from_slice(&(MAX_BODY as u32).to_le_bytes());
        assert!(scan(&bytes).is_ok(), "the largest record, torn");
        bytes.truncate(JOURNAL_HEADER as usize);
        bytes.extend_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
        assert!(scan(&bytes).is_err(), "a length no record can have");
    }

    /// Damage before the last record discards the journal and the hint: the open lists.
    #[test]
    fn damage_inside_discards_journal_and_hint() {
        let (dir, path) = hint_then_two_records();
        let mut bytes = fs::read(&path).unwrap();
        bytes[JOURNAL_HEADER as usize + 6] ^= 1;
        fs::write(&path, &bytes).unwrap();
        reopen_lists(dir.path());
    }

    /// A hint goes only with the journal of its generation.
    #[test]
    fn a_hint_of_another_generation_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"hint"));
        drop(j);
        let hint = fs::read(dir.path().join(HINT_FILE)).unwrap();
        // Another journal (a new generation) with the old hint put back.
        fs::remove_file(dir.path().join(HINT_FILE)).unwrap();
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"other"));
        drop(j);
        fs::write(dir.path().join(HINT_FILE), hint).unwrap();
        reopen_lists(dir.path());
    }

    /// Saving a hint cuts the journal down to the records from its mark on; a mark taken
    /// before the journal was abandoned and restarted is refused.
    #[test]
    fn saving_a_hint_shortens_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"hint0"));
        for i in 0..100 {
            j.committed(&format!("n{i}"), i, b"meta");
        }
        let before = fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len();
        assert!(save_hint(&mut j, dir.path(), b"hint"));
        assert_eq!(j.backlog(), 0);
        let after = fs::metadata(dir.path().join(JOURNAL_FILE)).unwrap().len();
        assert!(after < before / 10, "{before} -> {after}");
        j.removed("n1");
        assert!(j.backlog() > 0);
        let stale = j.mark().unwrap();
        let generation = j.generation();
        j.abandon(&io::Error::other("test"));
        assert!(!dir.path().join(HINT_FILE).exists());
        let (_, staged) = staged_file(&dir.path().join("tmp"), "hint").unwrap();
        assert!(!j.install_hint(staged, generation, stale).unwrap());
        // Nor once journaling resumed (a new generation, starting at that very offset).
        assert_eq!(j.mark().unwrap(), stale);
        let (_, staged) = staged_file(&dir.path().join("tmp"), "hint").unwrap();
        assert!(!j.install_hint(staged, generation, stale).unwrap());
        assert!(save_hint(&mut j, dir.path(), b"hint2"));
    }

    /// Changes journaled while a hint is being written (after its mark) are kept by the cut
    /// that installs it, at any offset.
    #[test]
    fn changes_after_the_mark_survive_the_cut() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        let mut j = journal(dir.path());
        for round in 0..3 {
            j.committed(&format!("before{round}"), 1, b"b");
            let mark = j.mark().unwrap();
            j.committed(&format!("during{round}"), 2, b"d");
            let (mut f, staged) = staged_file(&tmp, "hint").unwrap();
            f.write_all(&hint_header(j.generation(), mark)).unwrap();
            assert!(j.install_hint(staged, j.generation(), mark).unwrap());
            // Cut down to the header and the one record after the mark.
            let left = fs::read(dir.path().join(JOURNAL_FILE)).unwrap();
            assert_eq!(
                left.len() as u64,
                JOURNAL_HEADER + j.backlog(),
                "round {round}"
            );
        }
        drop(j);
        let mut j = journal(dir.path());
        assert_eq!(names(&j.take_loaded().unwrap()), ["+during2:2:[100]"]);
    }

    /// A journal of a header alone is an empty journal; a short or foreign header is damage.
    #[test]
    fn headers() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"hint"));
        drop(j);
        let path = dir.path().join(JOURNAL_FILE);
        let header = fs::read(&path).unwrap();
        assert_eq!(header.len(), JOURNAL_HEADER as usize);
        let mut j = journal(dir.path());
        assert_eq!(j.take_loaded(), Some(Vec::new()));
        drop(j);
        let hint = fs::read(dir.path().join(HINT_FILE)).unwrap();
        let mut foreign = header.clone();
        foreign[0] ^= 1;
        for bad in [&header[..10], &foreign[..]] {
            fs::write(&path, bad).unwrap();
            fs::write(dir.path().join(HINT_FILE), &hint).unwrap();
            reopen_lists(dir.path());
        }
    }

    /// A journal that is a symbolic link (even to a good journal) is not followed.
    #[test]
    fn a_symlinked_journal_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = journal(dir.path());
        assert!(save_hint(&mut j, dir.path(), b"hint"));
        j.committed("aa", 1, b"x");
        drop(j);
        let path = dir.path().join(JOURNAL_FILE);
        let elsewhere = dir.path().join("elsewhere");
        fs::rename(&path, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        reopen_lists(dir.path());
    }
}
