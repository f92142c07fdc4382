//! The loading phase after a reopen: `build()` returns before the index is complete
//! (`startup_wait(Duration::ZERO)` makes every load a background one), and the cache must
//! still serve every stored entry, never become a second producer of a stored key, never bring
//! back a key removed or replaced during the load, and enforce its limits once it completes.

mod support;

use std::collections::BTreeMap;
use std::io;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use streamcache::cache::ManualClock;
use streamcache::storage::{BlobInfo, BlobReader, BlobWriter, DiskStorage, Storage};
use streamcache::{Cache, CacheBuilder, Entry};
use support::*;

const N: usize = 2000;

fn content(i: usize) -> Vec<u8> {
    format!("entry {i} ").into_bytes().repeat(1 + i % 7)
}

/// A directory holding `n` finished entries `k0..k{n-1}`, closed cleanly (so it holds an
/// index hint).
fn fill(dir: &Path, n: usize) {
    let cache = Cache::builder().disk(dir).build().unwrap();
    for i in 0..n {
        put(&cache, &format!("k{i}"), &content(i));
    }
}

/// The two ways a load can go: from the hint of a clean close, or listing the directory
/// (after a crash: here the hint is deleted).
fn fill_both(n: usize) -> [(&'static str, tempfile::TempDir); 2] {
    let hinted = tempfile::tempdir().unwrap();
    fill(hinted.path(), n);
    let listed = tempfile::tempdir().unwrap();
    fill(listed.path(), n);
    std::fs::remove_file(listed.path().join(HINT)).unwrap();
    [("from the hint", hinted), ("listing", listed)]
}

fn reopen(dir: &Path) -> CacheBuilder {
    Cache::builder()
        .disk(dir)
        .startup_wait(Duration::ZERO)
        .maintenance_interval(Duration::from_secs(3600))
}

fn wait_loaded(cache: &Cache) {
    wait_until("index loaded", DEADLINE, || !cache.stats().loading);
}

/// Many threads ask for stored keys the moment `build()` returns: every request is a hit
/// with the right bytes (never a miss, which would make a second producer), and once the
/// load completes every entry is indexed exactly once.
#[test]
fn no_second_producer_while_loading() {
    for (how, dir) in fill_both(N) {
        no_second_producer(how, dir.path());
    }
}

fn no_second_producer(how: &'static str, dir: &Path) {
    let path = dir.to_path_buf();
    deadline(how, move || {
        let cache = Arc::new(reopen(&path).build().unwrap());
        assert_eq!(
            request_every_key(&cache),
            0,
            "a stored key was produced again"
        );
        wait_loaded(&cache);
        assert_eq!(cache.len(), N);
        assert_eq!(cache.stats().loaded_entries, N as u64);
        assert_eq!(stored_data_files(&path), N, "a key was stored twice");
        assert_eq!(cache.stats().misses, 0);
    });
}

/// Four threads ask for every stored key with `get_or_create` (each from a different place,
/// overlapping, so some keys are asked for by two threads at once); every request must hit
/// with the right bytes. Returns the misses.
fn request_every_key(cache: &Arc<Cache>) -> usize {
    let misses = Arc::new(AtomicUsize::new(0));
    let start = Arc::new(Barrier::new(4));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (cache, misses, start) = (cache.clone(), misses.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                for j in 0..N / 2 {
                    let i = (t * N / 4 + j * 7) % N;
                    match cache.get_or_create(&format!("k{i}")).unwrap() {
                        Entry::Hit(mut r) => assert_eq!(read_all(&mut r).unwrap(), content(i)),
                        Entry::Miss(w) => {
                            misses.fetch_add(1, Ordering::Relaxed);
                            drop(w);
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    misses.load(Ordering::Relaxed)
}

/// A disk storage whose listing for the index load waits until `release`: the load is
/// provably still running while a test acts.
#[derive(Debug)]
struct HeldListing {
    disk: DiskStorage,
    released: (Mutex<bool>, Condvar),
}

impl HeldListing {
    fn release(&self) {
        *self.released.0.lock().unwrap() = true;
        self.released.1.notify_all();
    }
}

impl Storage for HeldListing {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        self.disk.create(name)
    }
    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        self.disk.open(name)
    }
    fn info(&self, name: &str) -> io::Result<BlobInfo> {
        self.disk.info(name)
    }
    fn remove(&self, name: &str) -> io::Result<()> {
        self.disk.remove(name)
    }
    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        self.disk.list()
    }
    fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        self.disk.list_prefix(prefix)
    }
    fn list_batches(
        &self,
        each: &(dyn Fn(Vec<BlobInfo>) -> ControlFlow<()> + Sync),
    ) -> io::Result<()> {
        let (lock, cv) = &self.released;
        drop(cv.wait_while(lock.lock().unwrap(), |r| !*r).unwrap());
        self.disk.list_batches(each)
    }
    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        self.disk.set_meta(name, meta)
    }
}

/// A cache reopened on `dir` whose load is held before it indexes anything (the listing
/// path: a custom storage leaves no hint), until the returned storage is released.
fn held(dir: &Path) -> (Arc<HeldListing>, Cache) {
    let storage = Arc::new(HeldListing {
        disk: DiskStorage::open(dir).unwrap(),
        released: Default::default(),
    });
    let cache = Cache::builder()
        .storage(storage.clone())
        .startup_wait(Duration::ZERO)
        .maintenance_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    (storage, cache)
}

/// The same with the loader held before it indexed anything: every request settles its key
/// itself, racing the other threads for it, and the load that follows leaves them alone.
#[test]
fn no_second_producer_while_the_loader_is_held() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), N);
    let path = dir.path().to_path_buf();
    deadline("requests while the loader is held", move || {
        let (storage, cache) = held(&path);
        let cache = Arc::new(cache);
        assert_eq!(
            request_every_key(&cache),
            0,
            "a stored key was produced again"
        );
        assert!(cache.stats().loading, "the load ended while held");
        assert_eq!(cache.stats().loaded_entries, cache.len() as u64);
        storage.release();
        wait_loaded(&cache);
        assert_eq!(cache.len(), N);
        assert_eq!(stored_data_files(&path), N, "a key was stored twice");
        assert_eq!(cache.stats().misses, 0);
    });
}

/// `get`, `contains_key` and `entry_info` find stored keys before the loader reaches them;
/// absent keys stay absent; a key created during the load is a new entry that survives. Run
/// with the load held (so every look-up provably happens during it) and with a plain reopen
/// from the hint (which may finish before the look-ups).
#[test]
fn lookups_during_the_load() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), N);
    let (storage, cache) = held(dir.path());
    lookups(&cache, "new while held");
    assert!(cache.stats().loading, "the load ended while held");
    storage.release();
    drop(storage); // its directory lock goes with the cache
    after_lookups(dir.path(), cache, 1);

    let cache = reopen(dir.path()).build().unwrap();
    lookups(&cache, "new");
    after_lookups(dir.path(), cache, 2);
}

fn lookups(cache: &Cache, new: &str) {
    for i in (0..N).rev().step_by(97) {
        let key = format!("k{i}");
        assert!(cache.contains_key(&key), "{key}");
        assert_eq!(cache.entry_info(&key).unwrap().len, content(i).len() as u64);
        assert_eq!(get_bytes(cache, &key), content(i));
    }
    assert!(!cache.contains_key("absent"));
    assert!(cache.get("absent").unwrap().is_none());
    put(cache, new, b"made while loading");
}

/// After `lookups` on `cache`: the load completes with every stored entry and the `made` new
/// ones, which a full reopen finds too.
fn after_lookups(dir: &Path, cache: Cache, made: usize) {
    wait_loaded(&cache);
    assert_eq!(cache.len(), N + made);
    assert_eq!(get_bytes(&cache, "new while held"), b"made while loading");
    drop(cache);
    let cache = reopen(dir).startup_wait(Duration::MAX).build().unwrap();
    assert!(!cache.stats().loading);
    assert_eq!(cache.len(), N + made);
}

/// Keys removed or replaced while loading stay removed or replaced: the loader, which
/// listed them before, must not index them again.
#[test]
fn removed_and_replaced_keys_do_not_come_back() {
    for (how, dir) in fill_both(N) {
        let cache = reopen(dir.path()).build().unwrap();
        removed_and_replaced(how, dir.path(), cache, None);
    }
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), N);
    let (storage, cache) = held(dir.path());
    removed_and_replaced("held", dir.path(), cache, Some(storage));
}

/// Removes and replaces keys on `cache` (releasing `held` after that, once sure the load is
/// still in progress), then checks the outcome after the load and after another reopen.
fn removed_and_replaced(how: &str, dir: &Path, cache: Cache, held: Option<Arc<HeldListing>>) {
    let mut want: BTreeMap<String, Option<Vec<u8>>> = BTreeMap::new();
    for i in (0..N).step_by(13) {
        let key = format!("k{i}");
        if i % 2 == 0 {
            assert!(cache.remove(&key).unwrap(), "{key} was stored");
            want.insert(key, None);
        } else {
            assert!(cache.remove(&key).unwrap());
            put(&cache, &key, b"replaced");
            want.insert(key, Some(b"replaced".to_vec()));
        }
    }
    if let Some(held) = held {
        assert!(cache.stats().loading, "the load ended while held");
        held.release();
        // (Dropped here: its directory lock goes with the cache, for the reopen below.)
    }
    wait_loaded(&cache);
    cache.run_pending_tasks();
    let check = |cache: &Cache| {
        for (key, v) in &want {
            match v {
                None => assert!(cache.get(key).unwrap().is_none(), "{how}: {key} came back"),
                Some(v) => assert_eq!(&get_bytes(cache, key), v, "{how}: {key}"),
            }
        }
    };
    check(&cache);
    let removed = want.values().filter(|v| v.is_none()).count();
    assert_eq!(cache.len(), N - removed);
    drop(cache);
    // And after another reopen, from what is on disk.
    let cache = reopen(dir).startup_wait(Duration::MAX).build().unwrap();
    check(&cache);
    assert_eq!(cache.len(), N - removed);
    assert_eq!(stored_data_files(dir), N - removed);
}

/// `clear` during the load does not wait for it, and the entries the load had not indexed
/// yet do not come back; an entry made after the clear stays. Run from the hint, listing, and
/// with the listing held (the clear provably before the load indexed anything).
#[test]
fn clear_during_the_load() {
    for (how, dir) in fill_both(N) {
        let cache = reopen(dir.path()).build().unwrap();
        clear_and_check(how, dir.path(), cache, None);
    }
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), N);
    let (storage, cache) = held(dir.path());
    clear_and_check("held", dir.path(), cache, Some(&storage));
}

fn clear_and_check(how: &str, dir: &Path, cache: Cache, held: Option<&HeldListing>) {
    cache.clear();
    put(&cache, "after", b"made after the clear");
    if let Some(held) = held {
        assert!(cache.stats().loading, "the load ended while held");
        held.release();
    }
    wait_loaded(&cache);
    cache.run_pending_tasks();
    assert_eq!(cache.len(), 1, "{how}: entries came back after clear");
    assert_eq!(get_bytes(&cache, "after"), b"made after the clear");
    for i in (0..N).step_by(37) {
        assert!(
            cache.get(&format!("k{i}")).unwrap().is_none(),
            "{how}: k{i}"
        );
    }
    drop(cache);
    assert_eq!(stored_data_files(dir), 1, "{how}");
}

/// Size limits hold once the load completes, and eviction then follows the recency stored
/// before the restart: the entries read last survive.
#[test]
fn eviction_after_the_load_follows_stored_recency() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    {
        let cache = Cache::builder()
            .disk(dir.path())
            .clock(clock.clone())
            .build()
            .unwrap();
        for i in 0..N {
            put(&cache, &format!("k{i}"), &content(i));
        }
        clock.advance(Duration::from_secs(1));
        // The last 100 keys read are 0..100: they are the most recent after the restart.
        for i in 0..100 {
            clock.advance(Duration::from_millis(1));
            get_bytes(&cache, &format!("k{i}"));
        }
    }
    let cache = reopen(dir.path())
        .clock(clock.clone())
        .max_entries(500)
        .build()
        .unwrap();
    cache.run_pending_tasks(); // waits for the load, then evicts
    wait_until("evicted to the limit", DEADLINE, || {
        cache.run_pending_tasks();
        cache.len() <= 500
    });
    assert_eq!(cache.len(), 500);
    for i in 0..100 {
        assert!(
            cache.contains_key(&format!("k{i}")),
            "recently read k{i} evicted"
        );
    }
    cache.run_pending_tasks();
    assert_eq!(stored_data_files(dir.path()), 500);
}

/// Expired entries are neither served nor indexed by the load.
#[test]
fn expired_entries_are_not_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    {
        let cache = Cache::builder()
            .disk(dir.path())
            .clock(clock.clone())
            .build()
            .unwrap();
        for i in 0..200 {
            let mut w = miss(&cache, &format!("k{i}"));
            if i % 2 == 0 {
                w.set_time_to_live(Duration::from_secs(10));
            }
            w.write_all(&content(i)).unwrap();
            w.finish().unwrap();
        }
    }
    clock.advance(Duration::from_secs(10));
    let cache = reopen(dir.path()).clock(clock.clone()).build().unwrap();
    assert!(cache.get("k0").unwrap().is_none());
    assert_eq!(get_bytes(&cache, "k1"), content(1));
    wait_loaded(&cache);
    assert_eq!(cache.len(), 100);
}

/// Dropping the cache in the middle of a load stops the loader and frees the directory.
#[test]
fn drop_during_the_load() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), N);
    let path = dir.path().to_path_buf();
    deadline("drop while loading", move || {
        for _ in 0..5 {
            let cache = reopen(&path).build().unwrap();
            assert_eq!(get_bytes(&cache, "k7"), content(7));
            drop(cache);
        }
        let cache = reopen(&path).startup_wait(Duration::MAX).build().unwrap();
        assert_eq!(cache.len(), N);
    });
}

/// Data files (one per stored entry) under the cache directory.
fn stored_data_files(dir: &Path) -> usize {
    data_files(dir).len()
}

// ---------------------------------------------------------------------------------------------
// the index hint left at a clean close
// ---------------------------------------------------------------------------------------------

const HINT: &str = "index-hint";

/// A clean close leaves a hint; the next open indexes every entry from it, and leaves it in
/// place (with the storage's journal of changes it stays usable after a crash).
#[test]
fn a_clean_close_leaves_a_hint_the_next_open_takes() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), N);
    assert!(
        dir.path().join(HINT).exists(),
        "no hint after a clean close"
    );
    let cache = reopen(dir.path()).build().unwrap();
    wait_loaded(&cache);
    assert!(dir.path().join(HINT).exists(), "hint dropped at open");
    assert_eq!(cache.len(), N);
    assert_eq!(cache.stats().loaded_entries, N as u64);
    for i in (0..N).step_by(101) {
        assert_eq!(get_bytes(&cache, &format!("k{i}")), content(i));
    }
    drop(cache);
    assert!(dir.path().join(HINT).exists());
}

/// A writer that outlives its cache and commits after the hint was saved: the storage
/// journals the commit, the hint stays, and the next open finds the entry from the two.
#[test]
fn a_commit_after_the_close_is_journaled() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 100);
    let cache = reopen(dir.path())
        .startup_wait(Duration::MAX)
        .build()
        .unwrap();
    let mut late = miss(&cache, "late");
    late.write_all(b"committed after the cache closed").unwrap();
    drop(cache);
    late.finish().unwrap();
    assert!(dir.path().join(HINT).exists(), "hint dropped");
    let cache = reopen(dir.path())
        .startup_wait(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(cache.len(), 101);
    assert_eq!(
        get_bytes(&cache, "late"),
        b"committed after the cache closed"
    );
}

/// A damaged hint is not trusted: the load lists the directory instead and loses nothing.
#[test]
fn a_damaged_hint_falls_back_to_listing() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 300);
    let path = dir.path().join(HINT);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    bytes.truncate(bytes.len() - 7);
    std::fs::write(&path, bytes).unwrap();
    let cache = reopen(dir.path())
        .startup_wait(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(cache.len(), 300);
    for i in 0..300 {
        assert_eq!(get_bytes(&cache, &format!("k{i}")), content(i));
    }
}

/// Files deleted behind the cache's back while it was closed: the hint still names them, and
/// a request for one finds it lost (a miss, never an error or wrong bytes).
#[test]
fn a_hinted_entry_whose_files_are_gone_is_a_miss() {
    let dir = tempfile::tempdir().unwrap();
    fill(dir.path(), 50);
    for f in data_files(dir.path()).into_iter().take(10) {
        std::fs::remove_file(f).unwrap();
    }
    let cache = reopen(dir.path())
        .startup_wait(Duration::MAX)
        .build()
        .unwrap();
    let mut present = 0;
    for i in 0..50 {
        if let Some(mut r) = cache.get(&format!("k{i}")).unwrap() {
            assert_eq!(read_all(&mut r).unwrap(), content(i));
            present += 1;
        }
    }
    assert_eq!(present, 40);
    assert_eq!(cache.len(), 40, "lost entries are dropped when found");
}
