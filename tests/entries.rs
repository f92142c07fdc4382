//! Looking at entries without reading them (`entry_info`, `iter`), per-entry expiry
//! (`Writer::set_time_to_live`, `CacheBuilder::expiry`), and removal through a `Stream` handle.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::Duration;

use streamcache::cache::{Clock, EntryInfo, Expiry, ManualClock, RemovalCause};
use streamcache::{Cache, CacheBuilder};
use support::*;

const HOUR: Duration = Duration::from_secs(3600);

fn builders(dir: &Path, clock: &Arc<ManualClock>) -> Vec<(&'static str, CacheBuilder)> {
    let base = || {
        Cache::builder()
            .clock(clock.clone())
            .maintenance_interval(HOUR)
    };
    vec![("memory", base().memory()), ("disk", base().disk(dir))]
}

// ---------------------------------------------------------------------------------------------
// entry_info
// ---------------------------------------------------------------------------------------------

/// `entry_info` reports length, state, times and metadata, and changes nothing: no hit or
/// miss counted, no recency refreshed (the entry it looked at is still the LRU victim).
#[test]
fn entry_info_looks_without_touching() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    for (name, b) in builders(dir.path(), &clock) {
        let cache = b.max_entries(2).build().unwrap();
        let t0 = clock.now_millis();
        let mut w = miss(&cache, "old");
        w.set_metadata("text/plain");
        w.write_all(b"12345").unwrap();
        w.flush().unwrap();
        let info = cache.entry_info("old").expect(name);
        assert_eq!(info.key, "old");
        assert_eq!(info.len, 5, "{name}: bytes written so far");
        assert_eq!(info.finished, None, "{name}");
        assert_eq!(info.created, t0, "{name}");
        assert_eq!(info.expires, None, "{name}");
        assert_eq!(&info.metadata[..], b"text/plain", "{name}");
        clock.advance(Duration::from_millis(10));
        w.write_all(b"678").unwrap();
        w.finish().unwrap();
        let info = cache.entry_info("old").expect(name);
        assert_eq!(
            (info.len, info.finished, info.created),
            (8, Some(t0 + 10), t0),
            "{name}"
        );
        assert_eq!(info.last_access, t0 + 10, "{name}");

        clock.advance(Duration::from_millis(10));
        put(&cache, "new", b"n");
        let before = cache.stats();
        for _ in 0..10 {
            assert!(cache.entry_info("old").is_some());
        }
        assert!(cache.entry_info("absent").is_none());
        let after = cache.stats();
        assert_eq!(
            (after.hits, after.misses),
            (before.hits, before.misses),
            "{name}"
        );
        // "old" is still the least recently used: a third entry evicts it, not "new".
        put(&cache, "third", b"t");
        cache.run_pending_tasks();
        assert!(
            cache.entry_info("old").is_none(),
            "{name}: recency refreshed"
        );
        assert!(cache.entry_info("new").is_some(), "{name}");
    }
}

/// A finished entry nobody reads has no open stream: its info comes from the stored record,
/// also after a restart, with the same times and metadata.
#[test]
fn entry_info_of_an_idle_and_a_reloaded_entry() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let open = || {
        Cache::builder()
            .disk(dir.path())
            .clock(clock.clone())
            .max_idle_handles(0)
            .build()
            .unwrap()
    };
    let cache = open();
    let mut w = miss(&cache, "k");
    w.set_metadata("meta");
    w.write_all(b"body").unwrap();
    w.finish().unwrap();
    let want = cache.entry_info("k").unwrap();
    assert_eq!(&want.metadata[..], b"meta");
    drop(cache);
    let cache = open();
    assert_eq!(cache.entry_info("k"), Some(want));
}

/// Expired and aborted entries are not reported (they are never served either).
#[test]
fn entry_info_hides_what_is_not_served() {
    let clock = Arc::new(ManualClock::new());
    let cache = Cache::builder()
        .clock(clock.clone())
        .time_to_live(Duration::from_secs(10))
        .maintenance_interval(HOUR)
        .build()
        .unwrap();
    put(&cache, "k", b"v");
    let info = cache.entry_info("k").unwrap();
    assert_eq!(info.expires, Some(info.finished.unwrap() + 10_000));
    clock.advance(Duration::from_secs(10));
    assert!(cache.entry_info("k").is_none(), "expired entry reported");
    let mut w = miss(&cache, "aborted");
    w.write_all(b"x").unwrap();
    w.stream().cancel_with("gone");
    assert!(
        cache.entry_info("aborted").is_none(),
        "failed entry reported"
    );
}

// ---------------------------------------------------------------------------------------------
// iter
// ---------------------------------------------------------------------------------------------

/// `iter` yields every entry once, finished or being written, with the same info as
/// `entry_info`.
#[test]
fn iter_yields_each_entry_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    for (name, b) in builders(dir.path(), &clock) {
        let cache = b.build().unwrap();
        for i in 0..100 {
            put(&cache, &format!("k{i}"), &pattern(i, i as u64));
        }
        let mut w = miss(&cache, "writing");
        w.write_all(b"abc").unwrap();
        w.flush().unwrap();
        let infos: Vec<EntryInfo> = cache.iter().collect();
        assert_eq!(infos.len(), 101, "{name}");
        let keys: BTreeSet<&str> = infos.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys.len(), 101, "{name}: a key was yielded twice");
        for info in &infos {
            assert_eq!(Some(info), cache.entry_info(&info.key).as_ref(), "{name}");
        }
        let writing = infos.iter().find(|i| i.key == "writing").unwrap();
        assert!(!writing.is_finished() && writing.len == 3, "{name}");
        w.finish().unwrap();
    }
}

/// The loop's body may use the cache freely (no lock is held between items): removing every
/// entry from inside the loop neither deadlocks nor yields an entry already removed.
#[test]
fn iter_holds_no_lock_between_items() {
    deadline("iter with removals", || {
        let cache = Cache::builder().build().unwrap();
        for i in 0..1000 {
            put(&cache, &format!("k{i}"), b"x");
        }
        let mut seen = 0;
        for (n, info) in cache.iter().enumerate() {
            assert!(cache.contains_key(&info.key), "yielded a removed entry");
            // Remove this one and the next one the map holds, inserting a new one too.
            assert!(cache.remove(&info.key).unwrap());
            if let Some(other) = cache.keys().into_iter().find(|k| k.starts_with('k')) {
                cache.remove(&other).unwrap();
            }
            put(&cache, &format!("new{n}"), b"y");
            seen += 1;
        }
        assert!((500..=1000).contains(&seen), "{seen}");
    });
}

/// Entries present for the whole iteration are all seen, however many threads insert and
/// remove other keys meanwhile.
#[test]
fn iter_sees_stable_entries_under_churn() {
    deadline("iter under churn", || {
        let cache = Arc::new(Cache::builder().build().unwrap());
        for i in 0..2000 {
            put(&cache, &format!("stable{i}"), b"s");
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let start = Arc::new(Barrier::new(3));
        let churn: Vec<_> = (0..2)
            .map(|t| {
                let (cache, stop, start) = (cache.clone(), stop.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let key = format!("churn{t}-{}", i % 64);
                        if cache.remove(&key).unwrap() {
                            continue;
                        }
                        let _ = cache.get_or_produce(&key, |w| w.write_all(b"c"));
                        i += 1;
                    }
                })
            })
            .collect();
        start.wait();
        for _ in 0..20 {
            let stable = cache.iter().filter(|i| i.key.starts_with("stable")).count();
            assert_eq!(stable, 2000);
        }
        stop.store(true, Ordering::Relaxed);
        for t in churn {
            t.join().unwrap();
        }
    });
}

// ---------------------------------------------------------------------------------------------
// per-entry expiry
// ---------------------------------------------------------------------------------------------

/// A writer's own time to live is honoured exactly like the cache-wide one (never served
/// past it, evicted by the reaper with cause `Expired`), on both backends and after a
/// restart; the shorter of the two limits wins.
#[test]
fn writer_time_to_live() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    for (name, b) in builders(dir.path(), &clock) {
        let causes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = causes.clone();
        let cache = b
            .time_to_live(Duration::from_secs(100))
            .eviction_listener(move |k, cause| c.lock().unwrap().push((k.to_owned(), cause)))
            .build()
            .unwrap();
        let mut w = miss(&cache, "short");
        w.set_time_to_live(Duration::from_secs(5));
        w.write_all(b"s").unwrap();
        w.finish().unwrap();
        let mut w = miss(&cache, "long");
        w.set_time_to_live(Duration::from_secs(500));
        w.write_all(b"l").unwrap();
        w.finish().unwrap();
        put(&cache, "plain", b"p");
        let short = cache.entry_info("short").unwrap();
        assert_eq!(
            short.expires,
            Some(short.finished.unwrap() + 5_000),
            "{name}"
        );
        let long = cache.entry_info("long").unwrap();
        assert_eq!(
            long.expires,
            Some(long.finished.unwrap() + 100_000),
            "{name}"
        );

        clock.advance(Duration::from_millis(4_999));
        assert_eq!(get_bytes(&cache, "short"), b"s", "{name}");
        clock.advance(Duration::from_millis(1));
        assert!(
            cache.get("short").unwrap().is_none(),
            "{name}: served past its ttl"
        );
        assert!(!cache.contains_key("short"), "{name}");
        put(&cache, "short", b"again");
        clock.advance(Duration::from_secs(95));
        cache.run_pending_tasks();
        assert!(
            cache.get("long").unwrap().is_none(),
            "{name}: cache ttl is shorter"
        );
        assert!(cache.get("plain").unwrap().is_none(), "{name}");
        assert_eq!(get_bytes(&cache, "short"), b"again", "{name}");
        let causes = causes.lock().unwrap().clone();
        assert!(
            causes.contains(&("long".to_owned(), RemovalCause::Expired)),
            "{name}: {causes:?}"
        );
        drop(cache);
        let _ = std::fs::remove_dir_all(dir.path());
    }
}

/// The time to live is stored with the entry: a restart keeps it, and an entry that expired
/// while the cache was closed is not served after it reopens.
#[test]
fn writer_time_to_live_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    let open = || {
        Cache::builder()
            .disk(dir.path())
            .clock(clock.clone())
            .maintenance_interval(HOUR)
            .build()
            .unwrap()
    };
    let cache = open();
    for (key, secs) in [("a", 10), ("b", 30)] {
        let mut w = miss(&cache, key);
        w.set_time_to_live(Duration::from_secs(secs));
        w.write_all(key.as_bytes()).unwrap();
        w.finish().unwrap();
    }
    // A long time to live does not fit the slot's compact form exactly; it still holds.
    let mut w = miss(&cache, "year");
    w.set_time_to_live(Duration::from_secs(365 * 86_400));
    w.write_all(b"y").unwrap();
    w.finish().unwrap();
    let year = cache.entry_info("year").unwrap();
    drop(cache);
    clock.advance(Duration::from_secs(20));
    let cache = open();
    assert!(cache.get("a").unwrap().is_none(), "expired while closed");
    assert_eq!(get_bytes(&cache, "b"), b"b");
    assert_eq!(
        cache.entry_info("b").unwrap().expires,
        Some(cache.entry_info("b").unwrap().finished.unwrap() + 30_000)
    );
    assert_eq!(cache.entry_info("year").unwrap().expires, year.expires);
    clock.advance(Duration::from_secs(10));
    assert!(cache.get("b").unwrap().is_none());
    assert!(cache.get("year").unwrap().is_some());
    clock.advance(Duration::from_secs(365 * 86_400));
    assert!(cache.get("year").unwrap().is_none());
}

/// `max-age=N` metadata, read by an `Expiry`.
#[derive(Debug, Default)]
struct MaxAge {
    calls: AtomicUsize,
}

impl Expiry for MaxAge {
    fn time_to_live(&self, entry: &EntryInfo) -> Option<Duration> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if entry.key == "panics" {
            panic!("expiry policy panicked");
        }
        let secs = std::str::from_utf8(&entry.metadata)
            .ok()?
            .strip_prefix("max-age=")?
            .parse()
            .ok()?;
        Some(Duration::from_secs(secs))
    }
}

/// A builder-level `Expiry` computes each entry's time to live from its metadata when it is
/// finished; a writer's own setting wins over it; a panicking policy leaves the entry with
/// none of its own.
#[test]
fn expiry_policy_from_metadata() {
    let clock = Arc::new(ManualClock::new());
    let policy = Arc::new(MaxAge::default());
    #[derive(Debug)]
    struct Shared(Arc<MaxAge>);
    impl Expiry for Shared {
        fn time_to_live(&self, entry: &EntryInfo) -> Option<Duration> {
            self.0.time_to_live(entry)
        }
    }
    let cache = Cache::builder()
        .clock(clock.clone())
        .expiry(Shared(policy.clone()))
        .maintenance_interval(HOUR)
        .build()
        .unwrap();
    let write = |key: &str, meta: &str, own: Option<u64>| {
        let mut w = miss(&cache, key);
        w.set_metadata(meta.to_owned());
        if let Some(secs) = own {
            w.set_time_to_live(Duration::from_secs(secs));
        }
        w.write_all(b"x").unwrap();
        w.finish().unwrap();
    };
    write("two", "max-age=2", None);
    write("none", "no header", None);
    write("own", "max-age=2", Some(50));
    write("panics", "max-age=1", None);
    assert_eq!(
        policy.calls.load(Ordering::Relaxed),
        3,
        "writer's own ttl wins"
    );
    clock.advance(Duration::from_secs(2));
    assert!(cache.get("two").unwrap().is_none());
    for key in ["none", "own", "panics"] {
        assert!(cache.get(key).unwrap().is_some(), "{key}");
    }
    clock.advance(Duration::from_secs(48));
    assert!(cache.get("own").unwrap().is_none());
    cache.run_pending_tasks();
    assert_eq!(cache.len(), 2);
}

// ---------------------------------------------------------------------------------------------
// removal through a Stream handle
// ---------------------------------------------------------------------------------------------

/// `Stream::remove` on a cache entry's stream goes through the cache: the key is forgotten,
/// the removal is counted and reported to the listener, and the cache deletes the blob (it
/// used to delete the blob behind the index's back, leaving a key that failed every read).
#[test]
fn stream_remove_goes_through_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new());
    for (name, b) in builders(dir.path(), &clock) {
        let removed = Arc::new(AtomicUsize::new(0));
        let r2 = removed.clone();
        let cache = b
            .eviction_listener(move |_, cause| {
                assert_eq!(cause, RemovalCause::Explicit);
                r2.fetch_add(1, Ordering::Relaxed);
            })
            .build()
            .unwrap();
        let mut w = miss(&cache, "k");
        let stream = w.stream();
        w.write_all(b"data").unwrap();
        w.finish().unwrap();
        stream.remove().unwrap();
        assert!(!cache.contains_key("k"), "{name}");
        assert!(cache.get("k").unwrap().is_none(), "{name}");
        assert!(cache.is_empty(), "{name}");
        cache.run_pending_tasks();
        assert_eq!(removed.load(Ordering::Relaxed), 1, "{name}");
        assert_eq!(stored_blobs(&cache), 0, "{name}");
        put(&cache, "k", b"fresh");
        assert_eq!(get_bytes(&cache, "k"), b"fresh", "{name}");

        // Non-blocking removal, with a reader open: the key goes at once, the reader reads
        // to the end, and the blob goes after it.
        let mut w = miss(&cache, "j");
        let stream = w.stream();
        w.write_all(b"jj").unwrap();
        w.finish().unwrap();
        let mut r = cache.get("j").unwrap().unwrap();
        stream.remove_when_unused();
        assert!(!cache.contains_key("j"), "{name}");
        assert_eq!(read_all(&mut r).unwrap(), b"jj", "{name}");
        drop(r);
        cache.run_pending_tasks();
        assert_eq!(stored_blobs(&cache), 1, "{name}: only k's blob is left");
        assert_eq!(removed.load(Ordering::Relaxed), 2, "{name}");
        drop(cache);
        let _ = std::fs::remove_dir_all(dir.path());
    }
}
