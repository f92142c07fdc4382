//! The directory lock: one live [`DiskStorage`](super::DiskStorage) per directory, across
//! processes.
//!
//! Invariants: the lock is an exclusive OS lock (`flock`) on the directory itself, which no
//! one deletes while the storage uses it, so deleting a file in it (as temp cleaners do with
//! old untouched files) never lets a second opener in, which would wipe `tmp/` under live
//! writers. `<dir>/LOCK` is locked too, for processes of earlier versions that lock only that
//! file; deleting it unlocks nothing. The lock is held until the [`DirLock`] is dropped.

use std::fs::{self, File};
use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};

/// The exclusive OS locks on a storage directory and on its `LOCK` file, released when
/// dropped.
#[derive(Debug)]
pub(super) struct DirLock {
    _dir: File,
    _file: File,
}

impl DirLock {
    /// Locks `dir` (which must exist) and `<dir>/LOCK` (created if missing).
    ///
    /// # Errors
    /// [`Error::Locked`] if another live process (or another open storage in this one) holds
    /// either, after `LOCK_GRACE`; [`Error::Io`] if they cannot be opened or locked.
    pub(super) fn acquire(dir: &Path) -> Result<DirLock> {
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
        Ok(DirLock {
            _dir: dir_lock,
            _file: lock,
        })
    }
}

/// How long `try_lock` waits out a lock that may be held only in passing.
const LOCK_GRACE: Duration = Duration::from_millis(250);

/// Takes the exclusive OS lock on `file` (at `path`), or [`Error::Locked`] naming `dir`.
///
/// A lock that is taken is waited out for up to `LOCK_GRACE` first: a child process that
/// this process is starting shares its open files, and so the lock of a directory it just
/// released, until the child's `exec` closes them. So a directory released by this process
/// can be opened again at once, also while another thread spawns a process.
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

#[cfg(test)]
mod tests {
    use super::super::DiskStorage;
    use super::super::test_support::commit_bytes;
    use crate::error::Error;
    use crate::storage::Storage;

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
}
