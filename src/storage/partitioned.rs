//! Blobs spread over several directories by rendezvous hashing; documented on
//! [`PartitionedStorage`].

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use super::disk::{TMP_DIR, open_regular, staged_file};
use super::{BlobInfo, BlobReader, BlobWriter, DiskStorage, Durability, Storage, validate_name};

/// The file in each directory that holds its partition identity.
const ID_FILE: &str = "partition-id";

/// A directory's identity: 128 random bits, stored in `<dir>/partition-id` as 32 hex digits.
type DirId = [u8; 16];

/// Blobs spread over several directories, one [`DiskStorage`] (and one directory lock) each.
///
/// # Placement
///
/// Each blob has a **home** directory, chosen by rendezvous (highest random weight) hashing:
/// the weight of directory `d` for a blob is `blake3(id(d) ‖ prefix)`, and the blob lives in
/// the directory of highest weight. `prefix` is the blob name up to its last `-` (the hash of
/// the cache key, so every version of a key has the same home) or the whole name if it has no
/// `-`. `id(d)` is 128 random bits created at the first open of the directory and stored in
/// `<dir>/partition-id` (written to a temporary file and linked into place, never
/// overwritten), so the placement does not depend on the order the directories are given in,
/// nor on their paths: a directory that is moved or mounted elsewhere keeps its blobs' homes.
///
/// Adding an `n`-th directory moves about `1/n` of the keys (those it now wins), and only to
/// the new directory; removing one moves only the keys it held. (Hashing `% n`, as Go's
/// `fscache` partition did, moves most keys whenever `n` changes.)
///
/// # After the set of directories changes
///
/// At open every directory is listed once; blobs found outside their home are *misplaced*
/// and remembered (name → directory) in a map that is empty in the steady state. `open`,
/// `info`, `set_meta` and `remove` consult it first, so every blob stays readable where it
/// is; it is served from there until it is removed or evicted (it is not migrated).
/// [`create`](Storage::create) of a new name goes to its home, so a new version of a
/// misplaced key is written at home, and the cache's reload ("newest version of a key wins")
/// sees both and deletes the older through [`remove`](Storage::remove), which finds it in its
/// directory. `create` of a name that is misplaced replaces it where it is, so committing it
/// replaces the blob as the contract requires.
///
/// The same name found in several directories (directories of separate caches put together)
/// is kept in the one of highest weight; the other copies are deleted at open, with a
/// warning, so that removing the name cannot bring an older copy back later.
///
/// A directory left out of the set takes its blobs with it: they are not listed and cannot
/// be opened (they are back if it is added again and were not replaced meanwhile).
///
/// # Listing
///
/// [`list`](Storage::list) concatenates the directories' listings. The first call after open
/// returns the listing taken at open (a cache lists exactly once, at open, so the records are
/// not read twice), unless a blob was created, removed or had its metadata replaced since.
pub(crate) struct PartitionedStorage {
    parts: Vec<Part>,
    /// Lock: this `RwLock`, held for one map operation, never across I/O. Blob name → index
    /// in `parts` of the directory that holds it, for blobs not in their home directory.
    misplaced: RwLock<HashMap<String, usize>>,
    /// Lock: this mutex. The listing taken at open, until the first `list` or any change.
    listing: Mutex<Option<Vec<BlobInfo>>>,
}

struct Part {
    disk: DiskStorage,
    id: DirId,
}

impl fmt::Debug for PartitionedStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dirs: Vec<_> = self.parts.iter().map(|p| p.disk.dir()).collect();
        f.debug_struct("PartitionedStorage")
            .field("dirs", &dirs)
            .field(
                "misplaced",
                &self
                    .misplaced
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .len(),
            )
            .finish()
    }
}

impl PartitionedStorage {
    /// Opens (creating if needed) every directory as a [`DiskStorage`], each with its own lock,
    /// gives each a partition id if it has none, and lists them all once to find misplaced
    /// blobs.
    ///
    /// # Errors
    /// [`io::ErrorKind::InvalidInput`] for no directory, or for one directory given twice (the
    /// same canonical path or file, or the same partition id: a copied directory);
    /// [`io::ErrorKind::InvalidData`] for a damaged `partition-id` file; otherwise as
    /// [`DiskStorage::open`] (a locked directory) and [`Storage::list`].
    pub(crate) fn open(
        dirs: impl IntoIterator<Item = impl AsRef<Path>>,
        durability: Durability,
    ) -> io::Result<Self> {
        let mut parts: Vec<Part> = Vec::new();
        let mut seen: Vec<(PathBuf, (u64, u64))> = Vec::new();
        for dir in dirs {
            let dir = dir.as_ref();
            fs::create_dir_all(dir)
                .map_err(|e| annotate(e, format!("create directory {}", dir.display())))?;
            let canon = fs::canonicalize(dir)
                .map_err(|e| annotate(e, format!("canonicalize {}", dir.display())))?;
            let md = fs::metadata(&canon)
                .map_err(|e| annotate(e, format!("stat {}", canon.display())))?;
            let file = (md.dev(), md.ino());
            if let Some((other, _)) = seen.iter().find(|(p, f)| *p == canon || *f == file) {
                return Err(invalid(format!(
                    "directory {} is given twice (it is {}, given before)",
                    dir.display(),
                    other.display()
                )));
            }
            seen.push((canon, file));
            let disk = DiskStorage::open_with(dir, durability).map_err(io::Error::from)?;
            let id = dir_id(dir)?;
            if let Some(other) = parts.iter().find(|p| p.id == id) {
                return Err(invalid(format!(
                    "directories {} and {} have the same partition id (one is a copy of the \
                     other?); delete the {ID_FILE} file of the copy",
                    other.disk.dir().display(),
                    dir.display()
                )));
            }
            parts.push(Part { disk, id });
        }
        if parts.is_empty() {
            return Err(invalid(
                "a partitioned storage needs at least one directory",
            ));
        }
        let storage = PartitionedStorage {
            parts,
            misplaced: RwLock::default(),
            listing: Mutex::default(),
        };
        storage.scan()?;
        Ok(storage)
    }

    /// Lists every directory once: remembers misplaced blobs, deletes duplicates and keeps
    /// the listing for the first `list`.
    fn scan(&self) -> io::Result<()> {
        let mut found: HashMap<String, (usize, BlobInfo)> = HashMap::new();
        for (i, part) in self.parts.iter().enumerate() {
            for blob in part.disk.list()? {
                let Some((j, _)) = found.get(&blob.name) else {
                    found.insert(blob.name.clone(), (i, blob));
                    continue;
                };
                let j = *j;
                let prefix = key_prefix(&blob.name);
                let (keep, drop) = if self.weight(i, prefix) > self.weight(j, prefix) {
                    (i, j)
                } else {
                    (j, i)
                };
                tracing::warn!(
                    blob = %blob.name,
                    kept = %self.parts[keep].disk.dir().display(),
                    deleted = %self.parts[drop].disk.dir().display(),
                    "blob found in two partition directories; deleting one copy"
                );
                match self.parts[drop].disk.remove(&blob.name) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                if keep == i {
                    found.insert(blob.name.clone(), (i, blob));
                }
            }
        }
        let mut misplaced = HashMap::new();
        let mut listing = Vec::with_capacity(found.len());
        for (name, (i, blob)) in found {
            if self.home(&name) != i {
                misplaced.insert(name, i);
            }
            listing.push(blob);
        }
        if !misplaced.is_empty() {
            tracing::info!(
                count = misplaced.len(),
                "blobs outside their home partition (the set of directories changed); they are \
                 served where they are"
            );
        }
        *self.misplaced.write().unwrap_or_else(|e| e.into_inner()) = misplaced;
        *self.listing.lock().unwrap_or_else(|e| e.into_inner()) = Some(listing);
        Ok(())
    }

    /// Releases every directory's lock now (see [`DiskStorage::unlock`]).
    pub(crate) fn unlock(&self) {
        for part in &self.parts {
            part.disk.unlock();
        }
    }

    #[cfg(test)]
    /// The directories, in the order given to [`open`](Self::open).
    pub(crate) fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.parts.iter().map(|p| p.disk.dir())
    }

    #[cfg(test)]
    /// How many blobs live outside their home directory.
    pub(crate) fn misplaced_count(&self) -> usize {
        self.misplaced
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Weight of directory `i` for a blob whose key-hash prefix is `prefix`.
    fn weight(&self, i: usize, prefix: &str) -> (u64, DirId) {
        weight(&self.parts[i].id, prefix)
    }

    /// Index of the home directory of blob `name`.
    fn home(&self, name: &str) -> usize {
        home(self.parts.iter().map(|p| &p.id), key_prefix(name))
    }

    /// Index of the directory that holds (or would hold) blob `name`.
    fn locate(&self, name: &str) -> usize {
        let misplaced = self.misplaced.read().unwrap_or_else(|e| e.into_inner());
        match misplaced.get(name) {
            Some(&i) => i,
            None => {
                drop(misplaced);
                self.home(name)
            }
        }
    }

    /// Forgets the listing taken at open (something changed).
    fn changed(&self) {
        *self.listing.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl Storage for PartitionedStorage {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        validate_name(name)?;
        self.changed();
        self.parts[self.locate(name)].disk.create(name)
    }

    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        validate_name(name)?;
        self.parts[self.locate(name)].disk.open(name)
    }

    fn info(&self, name: &str) -> io::Result<BlobInfo> {
        validate_name(name)?;
        self.parts[self.locate(name)].disk.info(name)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        validate_name(name)?;
        self.changed();
        let i = self.locate(name);
        let result = self.parts[i].disk.remove(name);
        match &result {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {}
            _ => {
                // Gone from where it was: a later create of the name goes home.
                let mut misplaced = self.misplaced.write().unwrap_or_else(|e| e.into_inner());
                if misplaced.get(name) == Some(&i) {
                    misplaced.remove(name);
                }
            }
        }
        result
    }

    fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        // Every directory: a blob may be misplaced (found outside its home at open).
        let mut all = Vec::new();
        for part in &self.parts {
            all.extend(part.disk.list_prefix(prefix)?);
        }
        Ok(all)
    }

    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        if let Some(listing) = self
            .listing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            return Ok(listing);
        }
        let mut all = Vec::new();
        for part in &self.parts {
            all.extend(part.disk.list()?);
        }
        Ok(all)
    }

    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        validate_name(name)?;
        self.changed();
        self.parts[self.locate(name)].disk.set_meta(name, meta)
    }
}

/// The part of a blob name that all versions of a key share: up to the last `-`.
fn key_prefix(name: &str) -> &str {
    name.rsplit_once('-').map_or(name, |(prefix, _)| prefix)
}

/// Rendezvous weight of the directory with id `id` for `prefix`; ties (never seen in
/// practice) are broken by the id, so the order of the directories never matters.
fn weight(id: &DirId, prefix: &str) -> (u64, DirId) {
    let mut h = blake3::Hasher::new();
    h.update(id);
    h.update(prefix.as_bytes());
    let hash = h.finalize();
    let w = u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"));
    (w, *id)
}

/// Index (in `ids`) of the directory of highest weight for `prefix`.
fn home<'a>(ids: impl Iterator<Item = &'a DirId>, prefix: &str) -> usize {
    ids.enumerate()
        .max_by_key(|(_, id)| weight(id, prefix))
        .map_or(0, |(i, _)| i)
}

/// Reads `<dir>/partition-id`, creating it first if there is none.
fn dir_id(dir: &Path) -> io::Result<DirId> {
    let path = dir.join(ID_FILE);
    match read_id(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        other => return other,
    }
    let id = random_id(dir);
    // Staged in the storage's `tmp/` (wiped at open, so a crash leaves nothing behind).
    let (mut file, staged) = staged_file(&dir.join(TMP_DIR), ID_FILE)
        .map_err(|e| annotate(e, format!("create a temporary file in {}", dir.display())))?;
    let text = format!("{}\n", crate::codec::hex(&id));
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| annotate(e, format!("write {}", staged.display())))?;
    drop(file);
    // Linked into place, never over an existing file: if one appeared meanwhile, it wins.
    match staged.persist_noclobber(&path) {
        Ok(()) => {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| annotate(e, format!("fsync {}", dir.display())))?;
            Ok(id)
        }
        Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => read_id(&path),
        Err(e) => Err(annotate(e.error, format!("create {}", path.display()))),
    }
}

/// Parses a `partition-id` file: 32 lower-case hex digits and an optional newline.
fn read_id(path: &Path) -> io::Result<DirId> {
    let mut text = String::new();
    // A regular file only: a FIFO or a symbolic link planted there is damage, never waited on
    // or followed.
    open_regular(path)?
        .0
        .take(64)
        .read_to_string(&mut text)
        .map_err(|e| annotate(e, format!("read {}", path.display())))?;
    let digits = text.strip_suffix('\n').unwrap_or(&text);
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is damaged: expected 32 hex digits, found {digits:?}",
                path.display()
            ),
        )
    };
    crate::codec::unhex(digits)
        .and_then(|v| DirId::try_from(v).ok())
        .ok_or_else(bad)
}

/// 128 bits that no other directory has.
fn random_id(dir: &Path) -> DirId {
    crate::codec::random_id(dir.as_os_str().as_encoded_bytes())
}

/// A refused set of directories: an `io::Error` of kind `InvalidInput` that carries
/// [`Error::InvalidInput`](crate::Error::InvalidInput), which the cache's builder returns.
fn invalid(msg: impl Into<String>) -> io::Error {
    crate::Error::invalid(msg).into()
}

/// `e` with `what` in front of its message, same kind.
fn annotate(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// A FIFO planted as `partition-id` is damage: the open fails at once instead of waiting
    /// for a writer (it used `File::open`, which blocks on a FIFO), and a symbolic link there
    /// is not followed.
    #[test]
    fn hostile_partition_id_files_are_damage() {
        let root = tempfile::tempdir().unwrap();
        let fifo = root.path().join("fifo");
        fs::create_dir(&fifo).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(fifo.join(ID_FILE))
            .status()
            .unwrap();
        assert!(made.success());
        let link = root.path().join("link");
        fs::create_dir(&link).unwrap();
        std::os::unix::fs::symlink("/dev/zero", link.join(ID_FILE)).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for dir in [fifo, link] {
                let e = PartitionedStorage::open([&dir], Durability::Buffered).unwrap_err();
                tx.send(e.kind()).unwrap();
            }
        });
        for what in ["fifo", "symlink"] {
            let kind = rx
                .recv_timeout(std::time::Duration::from_secs(30))
                .unwrap_or_else(|_| panic!("opening over a {what} partition-id hangs"));
            assert_eq!(kind, io::ErrorKind::InvalidData, "{what}");
        }
    }
    use crate::{Cache, Entry};

    /// A name like the cache's: 32 hex digits of a key hash, `-`, 16 hex digits of an id.
    fn name(key: u64, id: u64) -> String {
        let hash = blake3::hash(&key.to_le_bytes());
        format!("{}-{id:016x}", &hash.to_hex()[..32])
    }

    fn ids(n: u8) -> Vec<DirId> {
        (0..n)
            .map(|i| random_id(Path::new(&format!("/d{i}"))))
            .collect()
    }

    #[test]
    fn prefix_is_up_to_the_last_dash() {
        assert_eq!(key_prefix("abc-0001"), "abc");
        assert_eq!(key_prefix("a-b-c"), "a-b");
        assert_eq!(key_prefix("plain"), "plain");
        // Every version of a key has the same home.
        let d = ids(5);
        for k in 0..200 {
            let h = home(d.iter(), key_prefix(&name(k, 0)));
            for v in 1..4 {
                assert_eq!(home(d.iter(), key_prefix(&name(k, v))), h);
            }
        }
    }

    #[test]
    fn rendezvous_is_stable_and_independent_of_order() {
        let d = ids(4);
        let mut rev = d.clone();
        rev.reverse();
        let mut rot = d.clone();
        rot.rotate_left(1);
        for k in 0..2000 {
            let n = name(k, 7);
            let p = key_prefix(&n);
            let h = d[home(d.iter(), p)];
            assert_eq!(d[home(d.iter(), p)], h, "same input, same home");
            assert_eq!(rev[home(rev.iter(), p)], h, "reversed order");
            assert_eq!(rot[home(rot.iter(), p)], h, "rotated order");
        }
    }

    #[test]
    fn adding_a_fourth_directory_moves_about_a_quarter_and_only_to_it() {
        let three = ids(3);
        let mut four = three.clone();
        four.push(random_id(Path::new("/new")));
        let total = 10_000;
        let mut moved = 0;
        let mut per_old = [0usize; 3];
        for k in 0..total {
            let n = name(k, 0);
            let p = key_prefix(&n);
            let before = home(three.iter(), p);
            let after = home(four.iter(), p);
            per_old[before] += 1;
            if after != before {
                assert_eq!(after, 3, "a name moved between two old directories");
                moved += 1;
            }
        }
        let share = moved as f64 / total as f64;
        assert!((0.20..=0.30).contains(&share), "moved {share}");
        // And the three old directories were about evenly loaded.
        for n in per_old {
            assert!((2_900..=3_800).contains(&n), "{per_old:?}");
        }
    }

    fn commit(s: &dyn Storage, name: &str, data: &[u8], meta: &[u8]) {
        let mut w = s.create(name).unwrap();
        w.write(data).unwrap();
        w.commit(meta.to_vec()).unwrap();
    }

    fn read_all(s: &dyn Storage, name: &str) -> (Vec<u8>, Vec<u8>) {
        let (r, info) = s.open(name).unwrap();
        let mut buf = vec![0; info.len as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = r.read_at(&mut buf[done..], done as u64).unwrap();
            assert!(n > 0, "short blob");
            done += n;
        }
        (buf, info.meta)
    }

    fn sorted_names(s: &dyn Storage) -> Vec<String> {
        let mut v: Vec<_> = s.list().unwrap().into_iter().map(|b| b.name).collect();
        v.sort();
        v
    }

    /// Which directory holds `name` on disk (by looking at the files).
    fn holder(dirs: &[PathBuf], name: &str) -> Vec<usize> {
        (0..dirs.len())
            .filter(|&i| dirs[i].join("v1").join(&name[..2]).join(name).exists())
            .collect()
    }

    #[test]
    fn blobs_spread_persist_and_survive_an_added_directory() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..4).map(|i| root.path().join(format!("d{i}"))).collect();
        let names: Vec<String> = (0..60).map(|k| name(k, 1)).collect();
        {
            let s = PartitionedStorage::open(&dirs[..3], Durability::Buffered).unwrap();
            for (i, n) in names.iter().enumerate() {
                commit(&s, n, format!("data {i}").as_bytes(), &[i as u8]);
            }
            // Spread over all three, each blob in exactly one directory, at its home.
            let mut used = [false; 3];
            for n in &names {
                let h = holder(&dirs, n);
                assert_eq!(h.len(), 1, "{n}: {h:?}");
                assert_eq!(h[0], s.home(n));
                used[h[0]] = true;
            }
            assert_eq!(used, [true; 3]);
            // Every directory is locked by this storage.
            for d in &dirs[..3] {
                let e = DiskStorage::open(d).unwrap_err();
                assert!(matches!(e, crate::Error::Locked { .. }), "{e}");
            }
            s.remove(&names[0]).unwrap();
            assert_eq!(
                s.remove(&names[0]).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
            s.set_meta(&names[1], b"new meta").unwrap();
            assert_eq!(s.info(&names[1]).unwrap().meta, b"new meta");
        }
        let live = &names[1..];
        let mut want: Vec<String> = live.to_vec();
        want.sort();
        // Same set, another order: everything found where it was.
        {
            let s = PartitionedStorage::open([&dirs[2], &dirs[0], &dirs[1]], Durability::Buffered)
                .unwrap();
            assert_eq!(s.misplaced_count(), 0);
            assert_eq!(sorted_names(&s), want);
            assert_eq!(
                sorted_names(&s),
                want,
                "a second listing reads the directories"
            );
            for (i, n) in names.iter().enumerate().skip(1) {
                let (data, meta) = read_all(&s, n);
                assert_eq!(data, format!("data {i}").as_bytes());
                if i > 1 {
                    assert_eq!(meta, [i as u8]);
                }
            }
        }
        // A fourth directory: about a quarter of the keys now have it as home, but their
        // blobs stay where they are and are still served.
        let s = PartitionedStorage::open(&dirs, Durability::Buffered).unwrap();
        let misplaced: Vec<&String> = live.iter().filter(|n| s.home(n) == 3).collect();
        assert!(!misplaced.is_empty() && misplaced.len() < live.len() / 2);
        assert_eq!(s.misplaced_count(), misplaced.len());
        assert_eq!(sorted_names(&s), want);
        for (i, n) in names.iter().enumerate().skip(1) {
            assert_eq!(read_all(&s, n).0, format!("data {i}").as_bytes());
            assert!(s.info(n).is_ok());
        }
        // A new version of a misplaced key goes home; the old one is removed where it is.
        let old = misplaced[0];
        let new = format!("{}-{:016x}", key_prefix(old), 99);
        commit(&s, &new, b"newer", b"");
        assert_eq!(holder(&dirs, &new), [3]);
        let was = holder(&dirs, old);
        assert_eq!(was.len(), 1);
        assert_ne!(was[0], 3);
        s.set_meta(old, b"touched").unwrap();
        assert_eq!(s.info(old).unwrap().meta, b"touched");
        s.remove(old).unwrap();
        assert!(holder(&dirs, old).is_empty());
        assert_eq!(s.open(old).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(s.misplaced_count(), misplaced.len() - 1);
        // Replacing a misplaced name replaces it where it is (no second copy at home).
        let other = misplaced.get(1).copied();
        if let Some(other) = other {
            let at = holder(&dirs, other);
            commit(&s, other, b"replaced", b"m");
            assert_eq!(holder(&dirs, other), at);
            assert_eq!(read_all(&s, other).0, b"replaced");
        }
        drop(s);
        // Without the fourth directory again, its blobs are simply gone.
        let s = PartitionedStorage::open(&dirs[..3], Durability::Buffered).unwrap();
        assert!(!sorted_names(&s).contains(&new));
        assert_eq!(s.open(&new).unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn bad_directory_sets_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        let b = root.path().join("b");
        let none: [&Path; 0] = [];
        let e = PartitionedStorage::open(none, Durability::Buffered).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("at least one"), "{e}");
        // The same directory twice, also spelled differently.
        let e = PartitionedStorage::open(
            [a.clone(), b.clone(), a.join("..").join("a")],
            Durability::Buffered,
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("given twice"), "{e}");
        // A copy of a directory (same partition id).
        drop(PartitionedStorage::open([&a], Durability::Buffered).unwrap());
        fs::create_dir_all(&b).unwrap();
        fs::copy(a.join(ID_FILE), b.join(ID_FILE)).unwrap();
        let e = PartitionedStorage::open([&a, &b], Durability::Buffered).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("same partition id"), "{e}");
        // A damaged id is an error, never silently replaced.
        fs::write(b.join(ID_FILE), "not hex\n").unwrap();
        let e = PartitionedStorage::open([&b], Durability::Buffered).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert_eq!(fs::read_to_string(b.join(ID_FILE)).unwrap(), "not hex\n");
        // A directory in use by another storage.
        fs::remove_file(b.join(ID_FILE)).unwrap();
        let held = DiskStorage::open(&b).unwrap();
        let e = PartitionedStorage::open([&a, &b], Durability::Buffered).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
        held.unlock();
        let s = PartitionedStorage::open([&a, &b], Durability::Buffered).unwrap();
        // Ids persist and differ.
        let id_a = fs::read_to_string(a.join(ID_FILE)).unwrap();
        assert_eq!(id_a.len(), 33);
        assert_ne!(id_a, fs::read_to_string(b.join(ID_FILE)).unwrap());
        assert_eq!(s.dirs().count(), 2);
        s.unlock();
        drop(PartitionedStorage::open([&b, &a], Durability::Buffered).unwrap());
        assert_eq!(fs::read_to_string(a.join(ID_FILE)).unwrap(), id_a);
    }

    #[test]
    fn the_same_name_in_two_directories_is_kept_once() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..2).map(|i| root.path().join(format!("d{i}"))).collect();
        let n = name(5, 0);
        // Two separate storages, each with the name.
        for (i, d) in dirs.iter().enumerate() {
            let s = PartitionedStorage::open([d], Durability::Buffered).unwrap();
            commit(&s, &n, format!("copy {i}").as_bytes(), b"");
        }
        let s = PartitionedStorage::open(&dirs, Durability::Buffered).unwrap();
        let home = s.home(&n);
        assert_eq!(sorted_names(&s), vec![n.clone()]);
        assert_eq!(holder(&dirs, &n), [home]);
        assert_eq!(read_all(&s, &n).0, format!("copy {home}").as_bytes());
        s.remove(&n).unwrap();
        drop(s);
        let s = PartitionedStorage::open(&dirs, Durability::Buffered).unwrap();
        assert!(sorted_names(&s).is_empty(), "a removed name came back");
    }

    fn put(cache: &Cache, key: &str, data: &[u8]) {
        let Entry::Miss(mut w) = cache.get_or_create(key).unwrap() else {
            panic!("{key} present")
        };
        w.write_all(data).unwrap();
        w.finish().unwrap();
    }

    fn get(cache: &Cache, key: &str) -> Option<Vec<u8>> {
        let mut r = cache.get(key).unwrap()?;
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).unwrap();
        Some(buf)
    }

    /// The key-hash part of the cache's blob names for `key` (pinned by the cache's tests).
    fn key_hash(key: &str) -> String {
        blake3::hash(key.as_bytes()).to_hex()[..32].to_owned()
    }

    fn cache_on(s: &Arc<PartitionedStorage>) -> Cache {
        Cache::builder()
            .storage(s.clone() as Arc<dyn Storage>)
            .build()
            .unwrap()
    }

    /// The cache's reload over a changed set of directories: old versions in their old
    /// directory, new ones at home; reload keeps the newest and deletes the other where it is.
    #[test]
    fn cache_reload_with_two_versions_in_different_directories() {
        let root = tempfile::tempdir().unwrap();
        let dirs: Vec<PathBuf> = (0..4).map(|i| root.path().join(format!("d{i}"))).collect();
        let keys: Vec<String> = (0..40).map(|i| format!("key {i}")).collect();
        {
            let s = Arc::new(PartitionedStorage::open(&dirs[..3], Durability::Buffered).unwrap());
            let cache = cache_on(&s);
            for k in &keys {
                put(&cache, k, format!("old {k}").as_bytes());
            }
            drop(cache);
            s.unlock();
        }
        let s = Arc::new(PartitionedStorage::open(&dirs, Durability::Buffered).unwrap());
        // The blob of each key, by its key-hash prefix (ids come from the cache's counter).
        let blob_of: HashMap<String, String> = s
            .list()
            .unwrap()
            .into_iter()
            .map(|b| (key_prefix(&b.name).to_owned(), b.name))
            .collect();
        let blob_of = |k: &str| blob_of[&key_hash(k)].clone();
        let moved: Vec<&String> = keys.iter().filter(|k| s.home(&blob_of(k)) == 3).collect();
        assert!(!moved.is_empty());
        let cache = cache_on(&s);
        for k in &keys {
            assert_eq!(get(&cache, k).unwrap(), format!("old {k}").as_bytes());
        }
        drop(cache);
        // New versions of the moved keys, committed at home, and a crash before the old
        // versions were deleted: written here straight through the storage, with the old
        // versions' metadata (same key and times) and a higher id, so they are the newest.
        for k in &moved {
            let old = blob_of(k);
            let meta = s.info(&old).unwrap().meta;
            let new = format!("{}-{:016x}", key_prefix(&old), 1000);
            commit(&*s, &new, format!("new {k}").as_bytes(), &meta);
            assert_eq!(holder(&dirs, &new), [3]);
            assert_ne!(holder(&dirs, &old), [3]);
        }
        s.unlock();
        // Both versions of each moved key are on disk, in different directories.
        let both = PartitionedStorage::open(&dirs, Durability::Buffered).unwrap();
        let mut per_key: HashMap<String, usize> = HashMap::new();
        for b in both.list().unwrap() {
            *per_key.entry(key_prefix(&b.name).to_owned()).or_default() += 1;
        }
        assert_eq!(per_key.values().filter(|&&n| n == 2).count(), moved.len());
        drop(both);

        let s = Arc::new(PartitionedStorage::open(&dirs, Durability::Buffered).unwrap());
        let cache = cache_on(&s);
        for k in &keys {
            let want = if moved.contains(&k) { "new" } else { "old" };
            assert_eq!(get(&cache, k).unwrap(), format!("{want} {k}").as_bytes());
        }
        drop(cache);
        s.unlock();
        // The reload deleted the old versions from their directories.
        let after = PartitionedStorage::open(&dirs, Durability::Buffered).unwrap();
        assert_eq!(after.list().unwrap().len(), keys.len());
        for b in after.list().unwrap() {
            assert_eq!(holder(&dirs, &b.name).len(), 1);
        }
    }
}
