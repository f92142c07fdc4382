//! Real faults on a disk cache's directory: files altered while an entry is in use, hostile
//! files where records or data belong (huge sparse files, FIFOs, symbolic links), a deleted
//! `LOCK` file, running out of file descriptors, and a full disk (a small `tmpfs`).
//!
//! Risky calls run on a thread under a deadline, or in a child process (this test binary
//! re-executed in "child mode", selected by an environment variable and an exact test-name
//! filter, as in `cache_crash.rs`), so that a hang or an abort is a failure, never a stuck run.

mod support;

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use streamcache::storage::{BlobWriter, DiskStorage, Storage};
use streamcache::{Cache, Error};
use support::*;

const MIB: usize = 1 << 20;

/// The data file of blob `name` in a disk storage's directory (`v1/<ab>/<name>`, see the
/// layout documented on `DiskStorage`).
fn blob_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("v1").join(&name[..2]).join(name)
}

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

/// `key=value` from a report line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Item: hostile record and data files at open.

const GOOD: [&str; 3] = ["good-1", "good-2", "good-3"];

fn good_bytes(key: &str) -> Vec<u8> {
    pattern(10_000 + key.len(), key.len() as u64)
}

/// Child body: opens the cache, checks every good entry is served and the victim is not,
/// and reports how long the open took and the peak memory.
#[test]
fn hostile_open_child() {
    let Some(dir) = child_dir() else {
        return;
    };
    let start = Instant::now();
    let cache = disk_cache(&dir);
    let open_ms = start.elapsed().as_millis();
    for key in GOOD {
        assert!(get_bytes(&cache, key) == good_bytes(key), "{key} damaged");
    }
    assert!(cache.get("victim").unwrap().is_none(), "victim served");
    report(&format!(
        "open_ms={open_ms} peak_kib={}",
        peak_rss_kib().unwrap_or(0)
    ));
}

/// A cache directory with the good entries and a 2 MiB "victim"; returns the victim's data
/// file.
fn cache_with_victim(dir: &Path) -> PathBuf {
    let cache = disk_cache(dir);
    for key in GOOD {
        put(&cache, key, &good_bytes(key));
    }
    put(&cache, "victim", &pattern(2 * MIB, 9));
    drop(cache);
    data_file_of(dir, "victim")
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success(), "mkfifo {}", path.display());
}

/// Runs `hostile_open_child` on `dir` and checks it opened in bounded time and memory.
fn open_in_child(dir: &Path, what: &str) {
    let child = ChildRun::spawn("hostile_open_child", dir);
    let line = child.line(REPORT);
    let status = child.wait();
    assert!(status.success(), "{what}: child failed: {status:?}");
    let open_ms = field(&line, "open_ms").unwrap();
    println!("{what}: open took {open_ms} ms; {line}");
    match field(&line, "peak_kib") {
        Some(kib) if kib > 0 => assert!(
            kib < 256 << 10,
            "{what}: opening the cache peaked at {kib} KiB of resident memory"
        ),
        _ => println!("{what}: SKIPPED the memory bound: no VmHWM in /proc/self/status"),
    }
}

/// Regression: a record file replaced by a 100 GB sparse file made `Cache::build` allocate
/// its size and abort the process ("memory allocation of 107374182400 bytes failed"). A
/// record larger than the format allows is now damage, found before any allocation.
#[test]
fn huge_sparse_record_is_damage_not_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let victim = cache_with_victim(dir.path());
    let record = victim.with_extension("meta");
    File::options()
        .write(true)
        .open(&record)
        .unwrap()
        .set_len(100 << 30)
        .unwrap();
    open_in_child(dir.path(), "100 GB sparse record");
    assert!(!record.exists(), "the oversized record is discarded");
}

/// Regression: a FIFO in place of a record made `Cache::build` hang for ever (the open
/// blocked waiting for a writer).
#[test]
fn fifo_record_does_not_hang_open() {
    let dir = tempfile::tempdir().unwrap();
    let victim = cache_with_victim(dir.path());
    let record = victim.with_extension("meta");
    fs::remove_file(&record).unwrap();
    mkfifo(&record);
    open_in_child(dir.path(), "FIFO record");
    assert!(
        fs::symlink_metadata(&record).is_err(),
        "the FIFO is discarded"
    );
}

/// Regression: a symbolic link to `/dev/zero` in place of a record was followed and read
/// (2 GB of memory and 2 s per open). Links are not followed; the link itself is removed,
/// never its target.
#[test]
fn symlink_record_to_dev_zero_is_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = cache_with_victim(dir.path());
    let record = victim.with_extension("meta");
    fs::remove_file(&record).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &record).unwrap();
    open_in_child(dir.path(), "symlink record to /dev/zero");
    assert!(
        fs::symlink_metadata(&record).is_err(),
        "the link is discarded"
    );
    assert!(
        Path::new("/dev/zero").exists(),
        "the link's target survives"
    );
}

/// Data files get the same care: `Storage::open` of a blob whose data is a FIFO returns at
/// once with `InvalidData` (regression: it blocked for ever), one whose data is a symbolic
/// link (here to a regular file with the right bytes) is not followed; listing discards both
/// names and leaves the link's target alone.
#[test]
fn hostile_data_files_are_damage_not_followed_or_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (fifo_data, link_data, target) = {
        let s = DiskStorage::open(dir.path()).unwrap();
        for (name, len) in [("fifo", 5000), ("link", 5000), ("fine", 100)] {
            let mut w = s.create(name).unwrap();
            w.write(&pattern(len, 1)).unwrap();
            w.commit(b"m".to_vec()).unwrap();
        }
        let target = outside.path().join("target");
        fs::rename(blob_file(dir.path(), "link"), &target).unwrap();
        std::os::unix::fs::symlink(&target, blob_file(dir.path(), "link")).unwrap();
        fs::remove_file(blob_file(dir.path(), "fifo")).unwrap();
        mkfifo(&blob_file(dir.path(), "fifo"));
        (
            blob_file(dir.path(), "fifo"),
            blob_file(dir.path(), "link"),
            target,
        )
    };
    let s = DiskStorage::open(dir.path()).unwrap();
    for name in ["fifo", "link"] {
        let res = deadline(&format!("open {name}"), {
            let s = s.clone();
            move || s.open(name).map(|(_, info)| info)
        });
        match res {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{name}: {e}"),
            Ok(info) => panic!("{name}: opened as a blob: {info:?}"),
        }
    }
    let listed = deadline("list", {
        let s = s.clone();
        move || s.list().unwrap()
    });
    let names: Vec<_> = listed.into_iter().map(|b| b.name).collect();
    assert_eq!(names, ["fine"]);
    assert!(fs::symlink_metadata(&fifo_data).is_err(), "FIFO kept");
    assert!(fs::symlink_metadata(&link_data).is_err(), "link kept");
    assert_eq!(
        fs::read(&target).unwrap(),
        pattern(5000, 1),
        "target harmed"
    );
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
    // (`open` waits out a lock a child process being started holds in passing.)
    let again = DiskStorage::open(dir.path()).unwrap();
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
    DiskStorage::open(dir.path()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Transient errors are not a verdict on a blob.

/// Child body: with every file descriptor in use, `open`, `info` and `list` fail with the
/// plain I/O error (EMFILE), never `NotFound` or `InvalidData`, and nothing is deleted.
#[test]
fn emfile_child() {
    let Some(dir) = child_dir() else {
        return;
    };
    let s = DiskStorage::open(&dir).unwrap();
    for name in ["a", "b"] {
        let mut w = s.create(name).unwrap();
        w.write(&pattern(3000, 4)).unwrap();
        w.commit(b"meta".to_vec()).unwrap();
    }
    let files_before = files_under(&dir.join("v1"));
    // Fill the descriptor table.
    let mut hog = Vec::new();
    loop {
        match File::open("/dev/null") {
            Ok(f) => hog.push(f),
            Err(e) if e.raw_os_error() == Some(24) => break, // EMFILE
            Err(e) => panic!("unexpected error filling the descriptor table: {e}"),
        }
        assert!(
            hog.len() < 1 << 20,
            "no EMFILE after a million files: limit not applied"
        );
    }
    let transient = |what: &str, e: &io::Error| {
        assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidData
            ),
            "{what}: EMFILE reported as a verdict on the blob: {e:?}"
        );
    };
    // No descriptor at all: the record cannot be opened.
    transient("open", &s.open("a").unwrap_err());
    transient("info", &s.info("a").unwrap_err());
    // One: the record opens, the data file cannot.
    drop(hog.pop());
    transient("open of the data", &s.open("a").unwrap_err());
    // A few: listing may fail or leave blobs out, but deletes nothing.
    for free in 0..4 {
        match s.list() {
            Ok(l) => assert!(l.len() <= 2),
            Err(e) => transient("list", &e),
        }
        assert_eq!(files_under(&dir.join("v1")), files_before, "{free} free");
        drop(hog.pop());
    }
    drop(hog);
    let (r, info) = s.open("a").unwrap();
    assert_eq!(info.len, 3000);
    let mut buf = vec![0; 3000];
    assert_eq!(r.read_at(&mut buf, 0).unwrap(), 3000);
    assert_eq!(s.list().unwrap().len(), 2);
    report("emfile=ok");
}

/// Runs `emfile_child` with a low open-file limit (only in the child: the shared test
/// process keeps its own).
#[test]
fn emfile_during_open_is_not_a_verdict_on_the_blob() {
    if !has_prlimit("emfile_during_open_is_not_a_verdict_on_the_blob") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let child = ChildRun::spawn_with("emfile_child", dir.path(), Some(64));
    let line = child.line(REPORT);
    assert!(line.contains("emfile=ok"));
    let status = child.wait();
    assert!(status.success(), "{status:?}");
}

/// A small `tmpfs` mounted on a temporary directory, unmounted when dropped; `None` (a skip)
/// where mounting is not allowed.
struct SmallFs(tempfile::TempDir);

impl SmallFs {
    fn mount(size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip(&format!("mounting a {size} tmpfs needs root"));
            return None;
        }
        Some(SmallFs(dir))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A real full disk (ENOSPC on a 4 MiB `tmpfs`): the writer that runs out of space fails with
/// a storage-full error, its readers get `Aborted`, nothing of it is committed, entries
/// finished before stay whole, and the directory reopens with exactly those.
#[test]
fn disk_full_aborts_the_writer_and_keeps_what_was_committed() {
    let Some(fs) = SmallFs::mount("4m") else {
        return;
    };
    let dir = fs.0.path().join("cache");
    deadline("disk full", move || {
        let cache = disk_cache(&dir);
        let small = pattern(MIB, 1);
        put(&cache, "before", &small);
        let mut w = miss(&cache, "too-big");
        let mut early = w.reader().unwrap();
        let chunk = vec![7u8; 64 << 10];
        let failed = (0..200).find_map(|_| w.write_all(&chunk).and_then(|()| w.flush()).err());
        let err = failed.expect("writing 12 MiB to a 4 MiB file system never failed");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err}");
        assert!(
            w.finish().is_err(),
            "a writer that ran out of space committed"
        );
        let read = read_all(&mut early);
        assert!(read.as_ref().is_err_and(is_aborted), "reader got {read:?}");
        // (A reader keeps its blob's file, and so its space, until it is dropped.)
        drop(early);
        assert!(cache.get("too-big").unwrap().is_none());
        assert_eq!(get_bytes(&cache, "before"), small);
        drop(cache);
        let cache = disk_cache(&dir);
        assert_eq!(cache.len(), 1);
        assert_eq!(get_bytes(&cache, "before"), small);
        // Space is back once the failed entry is gone: a new entry fits.
        put(&cache, "after", &small);
        assert_eq!(get_bytes(&cache, "after"), small);
    });
}
