//! Real faults against the cache: running out of file descriptors (`prlimit` on a child
//! process), a directory that refuses deletions (`chattr +i`), a storage and a listener that
//! misbehave, and arithmetic at the edges. Each test names the regression it pins.
//!
//! Tests that need a lowered descriptor limit re-execute this binary in "child mode"
//! (selected by an environment variable and an exact test-name filter) under
//! `prlimit --nofile=N:N` (see `support::child`), so the limit never touches the other
//! tests' process.

mod support;

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use streamcache::cache::{ManualClock, RemovalCause};
use streamcache::storage::{BlobInfo, BlobReader, BlobWriter, MemoryStorage, Storage};
use streamcache::{Cache, Entry, Error};
use support::*;

/// A disk cache on `dir` keeping at most `idle` unused entries' files open.
fn disk_cache(dir: &Path, idle: usize) -> Cache {
    Cache::builder()
        .disk(dir)
        .max_idle_handles(idle)
        .build()
        .unwrap()
}

/// Entry `i` of the descriptor tests: its key and value.
fn entry(i: usize) -> (String, String) {
    (format!("k{i}"), format!("value {i}"))
}

/// Writes entries `0..n`.
fn fill(cache: &Cache, n: usize) {
    for i in 0..n {
        let (key, value) = entry(i);
        put(cache, &key, value.as_bytes());
    }
}

/// Child (64 descriptors): 100 finished entries, a reader held on every one it can get.
/// Regression: from the ~59th on, `get` returned `Ok(None)` and dropped the entry ("cannot be
/// opened … os error 24"), and 42 of 100 entries were gone from disk for good. Now running
/// out of descriptors fails only the request, and every entry survives.
#[test]
fn child_emfile_readers() {
    let Some(dir) = child_dir() else { return };
    let cache = disk_cache(&dir, 8);
    fill(&cache, 100);
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..100 {
        match cache.get(&format!("k{i}")) {
            Ok(Some(r)) => held.push(r),
            Ok(None) => panic!("k{i} reported absent: a passing EMFILE was taken as a loss"),
            Err(e) => {
                assert!(
                    matches!(&e, Error::Io { source, .. } if source.raw_os_error() == Some(24)),
                    "{e:?}"
                );
                refused += 1;
            }
        }
    }
    assert!(refused > 0, "the descriptor limit was never reached");
    assert_eq!(cache.len(), 100, "entries dropped");
    for mut r in held.drain(..) {
        read_all(&mut r).unwrap();
    }
    drop(cache);
    let cache = Cache::builder().disk(&dir).build().unwrap();
    assert_eq!(cache.len(), 100, "entries lost on disk");
    for i in 0..100 {
        let (key, value) = entry(i);
        assert_eq!(get_bytes(&cache, &key), value.as_bytes());
    }
}

#[test]
fn running_out_of_descriptors_fails_requests_not_entries() {
    let dir = tempfile::tempdir().unwrap();
    run_child_with_nofile("child_emfile_readers", 64, dir.path());
}

/// Child (64 descriptors): a cache allowed to keep 10 000 idle handles reads 200 entries
/// stored by an earlier run, each once (an entry released after a read keeps its file open
/// while idle). Regression: the 60th read failed with EMFILE, and the entry was dropped, while
/// dozens of idle entries held their files open; now the cache lets go of idle handles before
/// it fails a request.
#[test]
fn child_emfile_idle_handles() {
    let Some(dir) = child_dir() else { return };
    let cache = disk_cache(&dir, 10_000);
    for i in 0..200 {
        let (key, value) = entry(i);
        assert_eq!(get_bytes(&cache, &key), value.as_bytes());
    }
    assert_eq!(cache.len(), 200);
}

#[test]
fn idle_handles_are_closed_before_a_request_fails() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        fill(&cache, 200);
    }
    run_child_with_nofile("child_emfile_idle_handles", 64, dir.path());
}

/// Child (64 descriptors): a cache allowed to keep 10 000 idle handles writes and reads 200
/// entries. Regression: once the idle entries' open files used up the descriptors, every
/// commit failed with EMFILE (a commit opens the record file), retries included. A write
/// that runs out of descriptors still fails, but the cache lets go of its idle handles, so
/// the retry succeeds.
#[test]
fn child_emfile_commits() {
    let Some(dir) = child_dir() else { return };
    let cache = disk_cache(&dir, 10_000);
    let mut retried = 0;
    for i in 0..200 {
        let (key, value) = entry(i);
        let write = || -> streamcache::Result<()> {
            match cache.get_or_create(&key)? {
                Entry::Miss(mut w) => {
                    w.write_bytes(value.as_bytes())?;
                    w.finish()
                }
                Entry::Hit(_) => panic!("{key} present before it was written"),
            }
        };
        if let Err(e) = write() {
            assert!(format!("{e:?}").contains("code: 24"), "{e:?}");
            retried += 1;
            write().unwrap_or_else(|e| panic!("retry of {key} failed: {e}"));
        }
        // Read once: a released, finished entry keeps its file open while idle.
        assert_eq!(get_bytes(&cache, &key), value.as_bytes());
    }
    assert!(retried > 0, "the descriptor limit was never reached");
    assert_eq!(cache.len(), 200);
}

#[test]
fn writes_recover_from_running_out_of_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    run_child_with_nofile("child_emfile_commits", 64, dir.path());
}

/// Makes `path` immutable (`chattr +i`) until dropped; `None` (with a message) where the file
/// system or the privileges do not allow it.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Option<Immutable> {
        let ok = Command::new("chattr")
            .arg("+i")
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            skip(&format!(
                "`chattr +i {}` is not possible here (needs root and a file system with the \
                 immutable flag)",
                path.display()
            ));
            return None;
        }
        Some(Immutable(path.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A journal that refuses appends (made immutable while the cache runs, so every write to
/// it fails with EPERM): commits still succeed, the hint it would have completed is deleted
/// at once, and the next open lists the directory and finds every entry, the ones committed
/// after the failure included. It then saves a new hint and journals again.
#[test]
fn a_journal_that_cannot_be_written_falls_back_to_listing() {
    deadline("journal refused", || {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        put(&cache, "before", b"1");
        // The reaper saves the first hint (a new directory has none); the journal starts.
        cache.run_pending_tasks();
        let (hint, journal) = (
            dir.path().join("index-hint"),
            dir.path().join("index-journal"),
        );
        assert!(hint.exists() && journal.exists());
        let Some(lock) = Immutable::set(&journal) else {
            return;
        };
        put(&cache, "after", b"2");
        assert!(!hint.exists(), "the hint outlived its journal");
        put(&cache, "later", b"3");
        drop(lock);
        // What a crash here would leave: a copy of the directory while the cache runs (its
        // drop saves a new hint).
        let copy = tempfile::tempdir().unwrap();
        copy_tree(dir.path(), copy.path());
        drop(cache);
        assert!(!copy.path().join("index-hint").exists());
        let cache = Cache::builder()
            .disk(copy.path())
            .startup_wait(std::time::Duration::MAX)
            .build()
            .unwrap();
        for (k, v) in [("before", b"1"), ("after", b"2"), ("later", b"3")] {
            assert_eq!(get_bytes(&cache, k), v);
        }
        cache.run_pending_tasks();
        assert!(
            copy.path().join("index-hint").exists(),
            "no hint after the listing"
        );
    });
}

/// Regression: with the directory refusing deletions, `remove` returned `Ok(true)`, the reaper
/// only logged a warning and forgot the blob, and after a restart the key was served again.
/// Now the deletion is retried until it succeeds, counted in `stats()` meanwhile, and its
/// bytes count toward `max_bytes`.
#[test]
fn a_refused_deletion_is_retried_and_counted() {
    deadline("refused deletion", || {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        put(&cache, "k", &[7; 5000]);
        put(&cache, "other", b"stays");
        let blob = data_files(dir.path())
            .into_iter()
            .find(|p| fs::read(p).is_ok_and(|b| b == [7; 5000]))
            .expect("k's data file");
        let shard = blob.parent().unwrap().to_path_buf();
        let Some(lock) = Immutable::set(&shard) else {
            return;
        };
        assert!(cache.remove("k").unwrap());
        assert!(!cache.contains_key("k"));
        wait_until("the refusal is counted", DEADLINE, || {
            cache.stats().failed_deletions >= 1
        });
        let stats = cache.stats();
        assert_eq!(stats.pending_deletions, 1, "{stats:?}");
        assert_eq!(stats.pending_deletion_bytes, 5000, "{stats:?}");
        assert!(blob.exists());
        // The disk accepts deletions again: the retry goes through on its own.
        drop(lock);
        wait_until("the deletion is retried", DEADLINE, || {
            cache.stats().pending_deletions == 0
        });
        assert!(!blob.exists(), "blob still on disk");
        assert_eq!(cache.stats().pending_deletion_bytes, 0);
        drop(cache);
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        assert!(cache.get("k").unwrap().is_none(), "removed key came back");
        assert_eq!(get_bytes(&cache, "other"), b"stays");
    });
}

/// Bytes that could not be deleted still use the disk: they count toward `max_bytes`, so the
/// cache evicts other entries to stay within the limit meanwhile.
#[test]
fn bytes_awaiting_deletion_count_toward_max_bytes() {
    deadline("pending bytes", || {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::builder()
            .disk(dir.path())
            .max_bytes(10_000)
            .build()
            .unwrap();
        put(&cache, "k", &[7; 6000]);
        let shard = data_files(dir.path())[0].parent().unwrap().to_path_buf();
        let Some(lock) = Immutable::set(&shard) else {
            return;
        };
        cache.remove("k").unwrap();
        // 6000 bytes still on disk: a 5000-byte entry now overflows the limit.
        put(&cache, "a", &[1; 5000]);
        cache.run_pending_tasks();
        assert!(
            !cache.contains_key("a") || cache.stats().over_limit,
            "{:?}",
            cache.stats()
        );
        drop(lock);
        wait_until("the deletion is retried", DEADLINE, || {
            cache.stats().pending_deletions == 0
        });
    });
}

/// The real removal a hook of [`OnRemove`] gets to call (or not).
type Remove<'a> = &'a dyn Fn() -> io::Result<()>;

/// A memory storage whose `remove` runs a test's hook, given the blob's name and the real
/// removal to call (before, after or instead of whatever the hook does).
struct OnRemove<F> {
    inner: MemoryStorage,
    hook: F,
}

impl<F> std::fmt::Debug for OnRemove<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnRemove")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<F: Fn(&str, Remove<'_>) -> io::Result<()> + Send + Sync> OnRemove<F> {
    fn new(hook: F) -> Arc<Self> {
        Arc::new(OnRemove {
            inner: MemoryStorage::new(),
            hook,
        })
    }
}

impl<F: Fn(&str, Remove<'_>) -> io::Result<()> + Send + Sync> Storage for OnRemove<F> {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        self.inner.create(name)
    }
    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        self.inner.open(name)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        (self.hook)(name, &|| self.inner.remove(name))
    }
    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        self.inner.list()
    }
    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        self.inner.set_meta(name, meta)
    }
}

/// Regression: a panic in a custom `Storage::remove` killed the reaper thread; from then on
/// every removal, expiry and `run_pending_tasks` silently did nothing. Now the panic counts as
/// a failed deletion (retried), and the reaper goes on.
#[test]
fn a_panicking_storage_does_not_kill_the_reaper() {
    deadline("panicking storage", || {
        // `remove` panics the first two times.
        let panics_left = AtomicUsize::new(2);
        let storage = OnRemove::new(move |name: &str, remove: Remove<'_>| {
            if panics_left
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok()
            {
                panic!("storage bug in remove({name})");
            }
            remove()
        });
        let clock = Arc::new(ManualClock::new());
        let cache = Cache::builder()
            .storage(storage.clone())
            .clock(clock.clone())
            .time_to_live(Duration::from_secs(60))
            .build()
            .unwrap();
        put(&cache, "a", b"first");
        put(&cache, "b", b"second");
        cache.remove("a").unwrap();
        cache.remove("b").unwrap();
        wait_until("both panics seen and retried", DEADLINE, || {
            cache.stats().pending_deletions == 0
        });
        assert_eq!(cache.stats().failed_deletions, 2);
        assert!(storage.inner.list().unwrap().is_empty());
        // The reaper still works: expiry and run_pending_tasks.
        put(&cache, "c", b"third");
        clock.advance(Duration::from_secs(61));
        cache.run_pending_tasks();
        assert!(cache.is_empty());
        assert!(storage.inner.list().unwrap().is_empty());
    });
}

/// Regression: listener calls ran on the reaper thread, so deletions queued behind a slow
/// listener waited for it (and the disk filled, uncounted). The listener now has a thread of
/// its own: here it is stuck for good, and deletions go on.
///
/// Regression (of this test): it waited for the storage to be empty, then asserted
/// `pending_deletions == 0` at once, and failed about one run in six of the whole binary on
/// a loaded machine. The reaper counts a deletion done only once `Storage::remove` has
/// returned (see `a_deletion_counts_as_pending_until_the_storage_returns`), so the test could
/// read the counter in between. And the failed assertion then hung for 30 s: unwinding
/// dropped the cache, whose drop joins the notifier, still stuck in the listener, before the
/// sender that would have released it. The test now waits for both, and the sender is
/// dropped before the cache whatever happens.
#[test]
fn a_stuck_listener_does_not_hold_up_deletions() {
    deadline("stuck listener", || {
        let (release, stuck) = std::sync::mpsc::channel::<()>();
        let stuck = Mutex::new(stuck);
        let storage = Arc::new(MemoryStorage::new());
        let cache = Cache::builder()
            .storage(storage.clone())
            .eviction_listener(move |_, _| {
                let _ = stuck.lock().unwrap().recv();
            })
            .build()
            .unwrap();
        // Declared after the cache, so dropped before it, also when an assertion fails: the
        // cache's drop joins the listener's thread, which only this sender's drop releases.
        let release = release;
        for i in 0..20 {
            put(&cache, &i.to_string(), b"x");
            cache.remove(&i.to_string()).unwrap();
        }
        wait_until("deleted despite the listener", DEADLINE, || {
            storage.list().unwrap().is_empty() && cache.stats().pending_deletions == 0
        });
        assert_eq!(cache.stats().pending_deletion_bytes, 0);
        drop(release);
        cache.run_pending_tasks();
    });
}

/// What `a_stuck_listener_does_not_hold_up_deletions` tripped over, made deterministic: the
/// storage pauses after deleting a blob, before `remove` returns. In that moment the blob is
/// gone and its deletion still counted in `pending_deletions` (its bytes too, toward
/// `max_bytes`): a deletion is counted done only once the storage confirmed it, never before.
/// A test that sees the storage empty must still wait for the counter.
#[test]
fn a_deletion_counts_as_pending_until_the_storage_returns() {
    deadline("pending until confirmed", || {
        let (removed_tx, removed) = std::sync::mpsc::channel();
        let (resume, resume_rx) = std::sync::mpsc::channel::<()>();
        // `remove` deletes the blob, reports its name on `removed`, then returns only once
        // `resume` sends (or is gone).
        let resume_rx = Mutex::new(resume_rx);
        let storage = OnRemove::new(move |name: &str, remove: Remove<'_>| {
            let done = remove();
            let _ = removed_tx.send(name.to_owned());
            let _ = resume_rx.lock().unwrap().recv();
            done
        });
        let cache = Cache::builder().storage(storage.clone()).build().unwrap();
        // Dropped before the cache, also when an assertion fails: the cache's drop joins the
        // reaper, which may be paused in `remove`.
        let resume = resume;
        put(&cache, "k", b"abc");
        cache.remove("k").unwrap();
        // The reaper is in `remove`, the blob already gone (a hang here is the deadline's).
        removed.recv().unwrap();
        assert!(storage.inner.list().unwrap().is_empty());
        let stats = cache.stats();
        assert_eq!(
            (stats.pending_deletions, stats.pending_deletion_bytes),
            (1, 3),
            "{stats:?}"
        );
        resume.send(()).unwrap();
        wait_until("the deletion is counted done", DEADLINE, || {
            cache.stats().pending_deletions == 0
        });
        assert_eq!(cache.stats().pending_deletion_bytes, 0);
        assert_eq!(cache.stats().failed_deletions, 0);
    });
}

/// With a listener that removes entries itself (it runs on the notifier thread), removals
/// and `run_pending_tasks` called from inside it return at once instead of waiting for the
/// notifier's own queue.
#[test]
fn the_listener_may_call_back_into_the_cache() {
    deadline("re-entrant listener", || {
        let cache: Arc<Mutex<Option<Arc<Cache>>>> = Arc::default();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let built = Arc::new(
            Cache::builder()
                .eviction_listener({
                    let (cache, seen) = (cache.clone(), seen.clone());
                    move |key, cause| {
                        seen.lock().unwrap().push((key.to_owned(), cause));
                        let c = cache.lock().unwrap().clone();
                        if let Some(c) = c {
                            let _ = c.remove(&format!("{key}-child"));
                            c.run_pending_tasks();
                        }
                    }
                })
                .build()
                .unwrap(),
        );
        *cache.lock().unwrap() = Some(built.clone());
        put(&built, "a", b"1");
        put(&built, "a-child", b"2");
        built.remove("a").unwrap();
        built.run_pending_tasks();
        wait_until("both notified", DEADLINE, || {
            seen.lock().unwrap().len() == 2
        });
        assert!(!built.contains_key("a-child"));
        assert_eq!(
            seen.lock().unwrap()[0],
            ("a".to_owned(), RemovalCause::Explicit)
        );
        // Break the cycle (the listener holds the cache).
        cache.lock().unwrap().take();
    });
}

/// Regression: `Duration::as_millis() as u64` wrapped, so a time to live of
/// 18 446 744 073 709 552 s became 384 ms and entries expired at once. Huge durations mean
/// "never".
#[test]
fn huge_durations_mean_never() {
    let clock = Arc::new(ManualClock::new());
    let huge = Duration::from_secs(18_446_744_073_709_552);
    let cache = Cache::builder()
        .clock(clock.clone())
        .time_to_live(huge)
        .time_to_idle(Duration::MAX)
        .build()
        .unwrap();
    put(&cache, "k", b"v");
    clock.advance(Duration::from_secs(3600 * 24 * 365));
    cache.run_pending_tasks();
    assert_eq!(get_bytes(&cache, "k"), b"v");
}

/// Regression: a blob named with the largest id (`…-ffffffffffffffff`, which no cache makes)
/// overflowed `id + 1` at reload (a panic in debug builds) and was served. It is not a cache
/// entry: it is discarded, and the key can be written anew.
#[test]
fn a_crafted_blob_id_is_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        put(&cache, "k", b"planted");
    }
    for file in files_under(&dir.path().join("v1")) {
        let name = file.file_name().unwrap().to_str().unwrap().to_owned();
        let crafted = name.replace("-0000000000000000", "-ffffffffffffffff");
        fs::rename(&file, file.with_file_name(crafted)).unwrap();
    }
    let cache = Cache::builder().disk(dir.path()).build().unwrap();
    assert!(cache.get("k").unwrap().is_none(), "crafted blob served");
    let Entry::Miss(mut w) = cache.get_or_create("k").unwrap() else {
        panic!("expected a miss")
    };
    w.write_all(b"fresh").unwrap();
    w.finish().unwrap();
    drop(cache);
    let cache = Cache::builder().disk(dir.path()).build().unwrap();
    assert_eq!(get_bytes(&cache, "k"), b"fresh");
}

/// Child: a 64 MiB memory cache is asked to take a 512 MiB entry (the scenario);
/// the process's peak memory must stay within twice the limit. Regression: it took the whole
/// entry (517 MiB peak) and evicted it only after `finish`.
#[test]
fn child_oversized_memory_entry() {
    if child_dir().is_none() {
        return;
    }
    const MAX: u64 = 64 << 20;
    let cache = Cache::builder().memory().max_bytes(MAX).build().unwrap();
    let mut w = miss(&cache, "big");
    let chunk = vec![7u8; 1 << 20];
    let mut refused = None;
    for _ in 0..512 {
        if let Err(e) = w.write_bytes(&chunk) {
            refused = Some(e);
            break;
        }
    }
    assert!(
        matches!(refused, Some(Error::TooLarge { max_bytes: MAX, .. })),
        "{refused:?}"
    );
    drop(w);
    let peak = peak_rss_kib().expect("VmHWM in /proc/self/status");
    report(&format!("peak_kib={peak} max_kib={}", MAX >> 10));
    assert!(peak <= 2 * (MAX >> 10), "peak RSS {peak} KiB");
}

#[test]
fn an_oversized_entry_keeps_memory_near_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let child = ChildRun::spawn("child_oversized_memory_entry", dir.path());
    println!("{}", child.line(REPORT));
    let status = child.wait();
    assert!(status.success(), "{status:?}");
}
