//! Opening and creating the storage's files.
//!
//! Invariants: storage opens nothing but regular files, never follows a symbolic link and
//! never waits on a FIFO or device ([`open_regular`]); a name that is not a regular file is
//! damage ([`Error::Corrupt`](crate::Error::Corrupt)), other errors keep their OS codes. Staged files are created
//! exclusively in `tmp/` and deleted unless persisted ([`staged_file`]).

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use tempfile::TempPath;

use super::corrupt;

/// Opens `path` for reading if it is a regular file, with its metadata. A symbolic link is
/// not followed (`O_NOFOLLOW`), a FIFO or device is not waited on (`O_NONBLOCK`), and the
/// type is checked on the open handle: anything but a regular file is damage
/// ([`Error::Corrupt`](crate::Error::Corrupt), kind `InvalidData`), since storage creates nothing else. Other errors
/// are returned as they are (`NotFound` only if the file is missing); `EINTR` is retried.
pub(in crate::storage) fn open_regular(path: &Path) -> io::Result<(File, fs::Metadata)> {
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

pub(super) fn file_kind(t: fs::FileType) -> &'static str {
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
pub(super) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
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

/// A new file in `tmp` (the storage's `tmp/`; named after `prefix`, created exclusively, deleted when the
/// returned path drops unless persisted). Errors are the operating system's own, with
/// their codes: the cache tells EMFILE from damage by them. (`tempfile`'s builders wrap
/// errors in a type whose `source` hides the code, so a writer that ran out of file
/// descriptors could not be told apart.)
pub(in crate::storage) fn staged_file(tmp: &Path, prefix: &str) -> io::Result<(File, TempPath)> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = tmp.join(format!("{prefix}.{:x}.{n:x}", std::process::id()));
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

/// A reader of `inner` from byte `skip` on, as if it began there (seeks included): a hint
/// handed over without the storage's header.
pub(super) struct Skipped<R> {
    inner: R,
    skip: u64,
}

impl<R: io::Read + io::Seek> Skipped<R> {
    pub(super) fn new(mut inner: R, skip: u64) -> io::Result<Self> {
        inner.seek(io::SeekFrom::Start(skip))?;
        Ok(Skipped { inner, skip })
    }
}

impl<R: io::Read> io::Read for Skipped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl<R: io::Seek> io::Seek for Skipped<R> {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        let pos = match pos {
            io::SeekFrom::Start(n) => io::SeekFrom::Start(n.saturating_add(self.skip)),
            other => other,
        };
        let at = self.inner.seek(pos)?;
        at.checked_sub(self.skip)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek before the start"))
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::super::{DiskStorage, TMP_DIR};
    use crate::storage::Storage;

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
}
