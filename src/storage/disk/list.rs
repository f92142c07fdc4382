//! Listing: [`Storage::list`](crate::storage::Storage::list) for disk, one shard directory at
//! a time, spread over a few threads.
//!
//! Invariants: only definite damage is deleted (a record that fails its checks, a name that
//! is not a regular file, removing the name and never a link's target) and leftovers that
//! predate this storage's opening; a commit, replacement or removal in flight, and a blob that
//! cannot be read now (EMFILE, EACCES, EIO), are left out of the listing but kept. Nothing
//! here follows a symbolic link.

use std::fs;
use std::io;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::file::file_kind;
use super::{DiskStorage, META_EXT};
use crate::storage::{BlobInfo, validate_name};

impl DiskStorage {
    /// Every committed blob, reading the shards on up to 8 threads.
    pub(super) fn list_all(&self) -> io::Result<Vec<BlobInfo>> {
        let all = std::sync::Mutex::new(Vec::new());
        self.list_each_shard(&|batch| {
            all.lock().unwrap_or_else(|e| e.into_inner()).extend(batch);
            ControlFlow::Continue(())
        })?;
        Ok(all.into_inner().unwrap_or_else(|e| e.into_inner()))
    }

    /// Every committed blob, one shard directory (the blobs whose names share their first
    /// two characters) per call of `each`, reading the shards on up to 8 threads.
    pub(super) fn list_each_shard(
        &self,
        each: &(dyn Fn(Vec<BlobInfo>) -> ControlFlow<()> + Sync),
    ) -> io::Result<()> {
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
        let next = AtomicUsize::new(0);
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| -> io::Result<()> {
                        while !stop.load(Ordering::Relaxed) {
                            let Some(shard) = shards.get(next.fetch_add(1, Ordering::Relaxed))
                            else {
                                break;
                            };
                            let mut batch = Vec::new();
                            self.list_shard(shard, "", &mut batch)?;
                            if each(batch).is_break() {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            for h in handles {
                h.join()
                    .map_err(|_| io::Error::other("listing thread panicked"))??;
            }
            Ok(())
        })
    }

    /// The committed blobs whose names start with `prefix`: one shard directory read, and
    /// only the matching records (the whole listing, filtered, for a prefix shorter than a
    /// shard's two characters).
    pub(super) fn list_with_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        let Some(shard) = prefix.get(..2) else {
            let mut all = self.list_all()?;
            all.retain(|b| b.name.starts_with(prefix));
            return Ok(all);
        };
        let mut out = Vec::new();
        if validate_name(shard).is_err() {
            return Ok(out);
        }
        match self.list_shard(&self.inner.data.join(shard), prefix, &mut out) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(out),
            other => other.map(|()| out),
        }
    }

    /// Lists the blobs of one shard directory whose names start with `prefix`, deleting
    /// leftovers of interrupted commits among them.
    fn list_shard(&self, shard: &Path, prefix: &str, out: &mut Vec<BlobInfo>) -> io::Result<()> {
        let mut metas = Vec::new();
        let mut datas = std::collections::HashSet::new();
        for entry in fs::read_dir(shard)? {
            let file_name = entry?.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if !file_name.starts_with(prefix) {
                continue;
            }
            let record = file_name
                .strip_suffix(META_EXT)
                .and_then(|name| name.strip_suffix('.'));
            match record {
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

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::time::{Duration, SystemTime};

    use super::super::test_support::commit_bytes;
    use super::*;
    use crate::storage::Storage;

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
