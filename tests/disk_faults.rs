//! Real faults on a disk cache's directory: files altered while an entry is in use, a deleted
//! `LOCK` file.
//!
//! Risky calls run on a thread under a deadline, or in a child process (this test binary
//! re-executed in "child mode", selected by an environment variable and an exact test-name
//! filter, as in `cache_crash.rs`), so that a hang or an abort is a failure, never a stuck run.

mod support;

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use streamcache::storage::{BlobWriter, DiskStorage, Storage};
use streamcache::{Cache, Error};
use support::*;

const MIB: usize = 1 << 20;

fn disk_cache(dir: &Path) -> Cache {
    Cache::builder().disk(dir).build().unwrap()
}

/// The data file of `key`'s entry (its blob name starts with 128 bits of blake3(key)).
fn data_file_of(dir: &Path, key: &str) -> PathBuf {
    let prefix: String = blake3::hash(key.as_bytes()).as_bytes()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut found: Vec<_> = data_files(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .collect();
    assert_eq!(found.len(), 1, "data files of {key:?}: {found:?}");
    found.pop().unwrap()
}

/// Overwrites 4 bytes at `at` through a handle of its own, as any program could, and sets the
/// modification time a second on, as a later write leaves it on any file system however
/// coarse its clock (the write itself changes the modification and change times).
fn alter(path: &Path, at: u64) {
    let f = File::options().read(true).write(true).open(path).unwrap();
    let mut old = [0u8; 4];
    f.read_exact_at(&mut old, at).unwrap();
    f.write_all_at(&old.map(|b| !b), at).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(1))
        .unwrap();
}

/// `res` is an `InvalidData` error carrying `Error::Corrupt`.
#[track_caller]
fn assert_corrupt<T: std::fmt::Debug>(res: io::Result<T>, what: &str) {
    match res {
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e:?}");
            assert!(
                matches!(inner_error(&e), Some(Error::Corrupt { .. })),
                "{what}: {e:?}"
            );
        }
        Ok(v) => panic!("{what}: altered bytes served as a clean read: {v:?}"),
    }
}

/// Reads to the end: the bytes that came before the error, and the error.
fn read_until_error(r: &mut impl Read) -> (Vec<u8>, io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0; 64 << 10];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Item: altered bytes served while an entry stays in use.

/// Regression: a finished disk entry kept in use by one open reader was never re-examined
/// (the record of checked blocks was revalidated only when the blob went idle), so after 4
/// bytes of its data file were changed, a new reader, a sequential read into the changed
/// block and a `read_at` into it all returned the altered bytes as a clean read.
#[test]
fn altered_file_is_caught_while_the_entry_stays_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let cache = disk_cache(dir.path());
    let data = pattern(5 * MIB, 21);
    let bad = 3 * MIB as u64 + 100;
    for key in ["new-reader", "sequential", "read-at", "seek"] {
        put(&cache, key, &data);
    }

    // A new reader opened while another keeps the entry in use.
    let keep = hit(&cache, "new-reader");
    assert!(read_all(&mut hit(&cache, "new-reader")).unwrap() == data);
    alter(&data_file_of(dir.path(), "new-reader"), bad);
    let mut fresh = cache.get("new-reader").unwrap().expect("still indexed");
    let (got, res) = read_until_error(&mut fresh);
    assert_corrupt(res, "new reader");
    assert!(
        got.len() <= 3 * MIB && data.starts_with(&got),
        "{} bytes read before the error, or wrong ones",
        got.len()
    );
    drop(keep);

    // The same reader, sequentially: it read block 2 before the change, then goes on into
    // the changed block 3.
    let mut r = hit(&cache, "sequential");
    let mut head = vec![0; 3 * MIB - 10];
    r.read_exact(&mut head).unwrap();
    assert!(head == data[..head.len()]);
    alter(&data_file_of(dir.path(), "sequential"), bad);
    let (got, res) = read_until_error(&mut r);
    assert_corrupt(res, "sequential read into the altered block");
    assert!(got.len() <= 10 && data[head.len()..].starts_with(&got));

    // `read_at` into the changed block, from a reader that has read everything before.
    let r = hit(&cache, "read-at");
    let mut all = vec![0; data.len()];
    assert_eq!(r.read_at(&mut all, 0).unwrap(), data.len());
    assert!(all == data);
    alter(&data_file_of(dir.path(), "read-at"), bad);
    let mut buf = vec![0; 16];
    assert_corrupt(
        r.read_at(&mut buf, bad - 4),
        "read_at into the altered block",
    );

    // A seek back into the changed block, from a reader that read everything (it last read
    // in block 4).
    let mut r = hit(&cache, "seek");
    assert!(read_all(&mut r).unwrap() == data);
    alter(&data_file_of(dir.path(), "seek"), bad);
    r.seek(SeekFrom::Start(bad)).unwrap();
    assert_corrupt(r.read(&mut buf), "read after a seek into the altered block");
}

/// The same after a reopen, once every block was checked by a first full read: a reader kept
/// open holds the entry in use, the file changes, and a new reader must not be served the
/// altered bytes. (Regression: the checked-blocks record stayed valid while the entry was in
/// use, so the new reader read the changed block unchecked.)
#[test]
fn altered_file_is_caught_after_reopen_with_every_block_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(5 * MIB, 22);
    put(&disk_cache(dir.path()), "k", &data);
    let cache = disk_cache(dir.path());
    let mut keep = hit(&cache, "k");
    assert!(
        read_all(&mut keep).unwrap() == data,
        "every block checked once"
    );
    alter(&data_file_of(dir.path(), "k"), 4 * MIB as u64 + 7);
    let mut fresh = hit(&cache, "k");
    let (got, res) = read_until_error(&mut fresh);
    assert_corrupt(res, "new reader after reopen");
    assert!(got.len() <= 4 * MIB && data.starts_with(&got));
}

/// An unaltered entry in use is served whole by every new reader, also when the file's stamp
/// changes without its content changing (blocks are hashed again, and pass).
#[test]
fn touched_but_unaltered_file_still_reads_whole() {
    let dir = tempfile::tempdir().unwrap();
    let cache = disk_cache(dir.path());
    let data = pattern(3 * MIB + 5, 23);
    put(&cache, "k", &data);
    let keep = hit(&cache, "k");
    File::options()
        .write(true)
        .open(data_file_of(dir.path(), "k"))
        .unwrap()
        .set_modified(SystemTime::now() + Duration::from_secs(1))
        .unwrap();
    assert!(read_all(&mut hit(&cache, "k")).unwrap() == data);
    let mut buf = vec![0; 10];
    keep.read_at(&mut buf, 2 * MIB as u64).unwrap();
    assert_eq!(buf, data[2 * MIB..2 * MIB + 10]);
}

// ---------------------------------------------------------------------------------------------
// Child processes.

const CHILD_ENV: &str = "STREAMCACHE_DISK_FAULTS_CHILD_DIR";
const READY: &str = "STREAMCACHE-CHILD-READY";

/// How long a child may take before it counts as hung.
const CHILD_DEADLINE: Duration = Duration::from_secs(20);

/// A child process running the test `name` of this binary in child mode (`CHILD_ENV` set to
/// `dir`), with its stdout lines collected. Killed when dropped.
struct ChildRun {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: String,
}

impl ChildRun {
    fn spawn(name: &str, dir: &Path) -> ChildRun {
        Self::spawn_with(name, dir, None)
    }

    /// `nofile`: the child's open-file limit, set with `prlimit` (util-linux); `None` if it
    /// is not installed.
    fn spawn_with(name: &str, dir: &Path, nofile: Option<u32>) -> ChildRun {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildRun {
            child,
            lines,
            name: name.to_owned(),
        }
    }

    /// Waits for a line containing `marker`; fails the test if the child does not print one
    /// within the deadline.
    fn line(&self, marker: &str) -> String {
        let until = Instant::now() + CHILD_DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "child {} printed no {marker} within {CHILD_DEADLINE:?} (hung, aborted or failed)",
                    self.name
                ),
            }
        }
    }
}

impl Drop for ChildRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn child_dir() -> Option<PathBuf> {
    std::env::var_os(CHILD_ENV).map(PathBuf::from)
}

// ---------------------------------------------------------------------------------------------
// Item: deleting `LOCK` let a second opener in.

/// Regression: the lock was an OS lock on `<dir>/LOCK` only, so deleting that file (as temp
/// cleaners do with old untouched files) let a second opener in, which wiped `tmp/` under
/// the first one's writers.
#[test]
fn deleting_lock_file_does_not_unlock_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    let first = DiskStorage::open(dir.path()).unwrap();
    let mut w = first.create("busy").unwrap();
    w.write(b"in flight").unwrap();
    fs::remove_file(dir.path().join("LOCK")).unwrap();
    match DiskStorage::open(dir.path()) {
        Err(Error::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Locked after LOCK was deleted, got {other:?}"),
    }
    match Cache::builder().disk(dir.path()).build() {
        Err(Error::Locked { .. }) => {}
        other => panic!("expected Locked for a cache, got {other:?}"),
    }
    // The first opener's writer was not disturbed.
    w.commit(Vec::new()).unwrap();
    drop(first);
    let again = reopen(dir.path());
    assert_eq!(
        again
            .list()
            .unwrap()
            .into_iter()
            .map(|b| b.name)
            .collect::<Vec<_>>(),
        ["busy"]
    );
}

/// Opens `dir` once the lock is free. Not at once: a child process that another test is
/// starting at that moment shares this process's open files until its `exec` closes them,
/// and with them the locks.
fn reopen(dir: &Path) -> DiskStorage {
    let until = Instant::now() + CHILD_DEADLINE;
    loop {
        match DiskStorage::open(dir) {
            Err(Error::Locked { .. }) if Instant::now() < until => {
                thread::sleep(Duration::from_millis(10));
            }
            other => return other.unwrap(),
        }
    }
}

/// Child body for the cross-process lock test: holds the cache, with an entry half written,
/// until killed.
#[test]
fn lock_holder_child() {
    let Some(dir) = child_dir() else {
        return;
    };
    let cache = disk_cache(&dir);
    let mut w = miss(&cache, "in-flight");
    w.write_all(&pattern(100_000, 3)).unwrap();
    w.flush().unwrap();
    let mut out = io::stdout().lock();
    writeln!(out, "{READY}").unwrap();
    out.flush().unwrap();
    drop(out);
    loop {
        thread::park();
    }
}

/// The same across processes: another process holds the directory, `LOCK` is deleted, and
/// an opener here is still refused, leaving the other process's staged writes alone.
#[test]
fn deleting_lock_file_does_not_let_another_process_in() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildRun::spawn("lock_holder_child", dir.path());
    child.line(READY);
    let staged = files_under(&dir.path().join("tmp"));
    assert_eq!(staged.len(), 1, "the child's entry is staged: {staged:?}");
    fs::remove_file(dir.path().join("LOCK")).unwrap();
    let refused = Cache::builder().disk(dir.path()).build();
    assert!(staged[0].exists(), "the holder's staged file was wiped");
    drop(child);
    match refused {
        Err(Error::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Error::Locked while the holder lives, got {other:?}"),
    }
    // Once the holder is gone, the directory opens again.
    reopen(dir.path());
}
