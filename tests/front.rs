//! The memory front over a disk cache (`CacheBuilder::memory_front`), seen from the cache with
//! real directories: disk hits served at once and promoted in the background, coherence with
//! remove / re-create / clear / expiry, churn under a small byte budget, and restarts.
//!
//! How a test sees that an entry is served from memory (the front is not visible from
//! outside): every test cache here keeps **no idle handle** (`max_idle_handles(0)`), so each
//! hit after the last reader of an entry was dropped opens the blob through the storage again.
//! Two readers of one entry held at the same time share that opened blob; their first
//! [`read_chunk`](streamcache::Reader::read_chunk) pieces point at the same bytes only if the
//! blob is the front's one shared buffer (zero-copy): a disk blob offers no zero-copy pieces,
//! so each reader copies into a fresh allocation, and both pieces being alive at once rules
//! out an allocator handing the same address out twice. Where it matters, a second and
//! independent check deletes the data file behind the cache's back: only memory can serve
//! the entry then (without a copy in front, the cache finds the data lost and drops it).

mod support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use streamcache::cache::ManualClock;
use streamcache::{Cache, CacheBuilder, Entry, Reader};
use support::*;

const KIB: usize = 1 << 10;
/// How long a background promotion may take before the test fails.
const PROMOTION: Duration = Duration::from_secs(10);

/// A disk cache in `dir` with a memory front of `front` bytes and no idle handles kept.
fn builder(dir: &Path, front: u64) -> CacheBuilder {
    Cache::builder()
        .disk(dir)
        .memory_front(front)
        .max_idle_handles(0)
}

/// Reads `r` to its end with `read_chunk`; returns the bytes and the first piece.
fn read_chunks(r: &mut Reader) -> (Vec<u8>, bytes::Bytes) {
    let first = r.read_chunk(1 << 20).unwrap();
    let mut all = first.to_vec();
    loop {
        let piece = r.read_chunk(1 << 20).unwrap();
        if piece.is_empty() {
            break;
        }
        all.extend_from_slice(&piece);
    }
    (all, first)
}

/// Whether a hit on `key` is served from the front (see the module docs), after checking
/// that both readers read exactly `want`.
#[track_caller]
fn from_memory(cache: &Cache, key: &str, want: &[u8]) -> bool {
    let mut a = cache.get(key).unwrap().expect("present");
    let mut b = cache.get(key).unwrap().expect("present");
    let (bytes_a, first_a) = read_chunks(&mut a);
    let (bytes_b, first_b) = read_chunks(&mut b);
    assert!(bytes_a == want && bytes_b == want, "{key}: wrong bytes");
    assert!(!first_a.is_empty());
    first_a.as_ptr() == first_b.as_ptr()
}

/// Hits `key` until it is served from memory (each hit that opens the blob from disk asks
/// for its promotion).
#[track_caller]
fn wait_promoted(cache: &Cache, key: &str, want: &[u8]) {
    wait_until(&format!("promotion of {key}"), PROMOTION, || {
        from_memory(cache, key, want)
    });
}

/// The data file of `key`'s blob (blob names start with 32 hex digits of the key's blake3).
fn data_file(dir: &Path, key: &str) -> PathBuf {
    let hash = blake3::hash(key.as_bytes()).to_hex();
    let prefix = &hash.as_str()[..32];
    let files: Vec<PathBuf> = data_files(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    assert_eq!(files.len(), 1, "{key}: data files {files:?}");
    files.into_iter().next().unwrap()
}

#[test]
fn a_disk_hit_is_served_at_once_then_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    // 1 MiB front: entries up to 128 KiB are promoted.
    let entries = [
        ("small", pattern(4 * KIB, 1)),
        ("mid", pattern(100 * KIB + 3, 2)),
        ("big", pattern(200 * KIB, 3)),
    ];
    {
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        for (k, v) in &entries {
            put(&cache, k, v);
        }
    }
    let cache = builder(dir.path(), 1 << 20).build().unwrap();
    for (k, v) in &entries {
        // The front starts empty: the first hit streams from disk at once.
        assert!(!from_memory(&cache, k, v), "{k}: served from memory first");
    }
    wait_promoted(&cache, "small", &entries[0].1);
    wait_promoted(&cache, "mid", &entries[1].1);
    // Too large for the front: still from disk (each of these hits was a chance to promote).
    for _ in 0..20 {
        assert!(!from_memory(&cache, "big", &entries[2].1));
    }
    // Delete every data file behind the cache's back: the promoted entries are served from
    // memory, right bytes; the one that is not loses its data (the control: deleting a file
    // does cut the disk path).
    for (k, _) in &entries {
        std::fs::remove_file(data_file(dir.path(), k)).unwrap();
    }
    for _ in 0..3 {
        assert_eq!(get_bytes(&cache, "small"), entries[0].1);
        assert_eq!(get_bytes(&cache, "mid"), entries[1].1);
    }
    assert!(
        cache.get("big").unwrap().is_none(),
        "big served without its file"
    );
}

#[test]
fn removed_or_recreated_keys_are_never_served_from_the_front() {
    deadline("remove and re-create", || {
        let dir = tempfile::tempdir().unwrap();
        let cache = builder(dir.path(), 1 << 20).build().unwrap();
        let v1 = pattern(4 * KIB, 10);
        let v2 = pattern(4 * KIB + 1, 11);
        put(&cache, "k", &v1);
        wait_promoted(&cache, "k", &v1);

        assert!(cache.remove("k").unwrap());
        assert!(cache.get("k").unwrap().is_none(), "served after remove");
        assert!(!cache.contains_key("k"));
        // Also once the blob's deletion (through the front) has run.
        cache.run_pending_tasks();
        assert!(cache.get("k").unwrap().is_none(), "served after deletion");

        // Re-created with new bytes: new readers get them, before and after their promotion.
        put(&cache, "k", &v2);
        assert_eq!(get_bytes(&cache, "k"), v2);
        wait_promoted(&cache, "k", &v2);
        for _ in 0..10 {
            assert_eq!(get_bytes(&cache, "k"), v2);
        }

        // Replaced while a reader of the old version is open (from memory): the reader keeps
        // the old bytes, new readers get the new ones.
        let mut old = hit(&cache, "k");
        assert!(cache.remove("k").unwrap());
        let v3 = pattern(3 * KIB, 12);
        put(&cache, "k", &v3);
        assert_eq!(read_all(&mut old).unwrap(), v2);
        assert_eq!(get_bytes(&cache, "k"), v3);
        wait_promoted(&cache, "k", &v3);
    });
}

#[test]
fn clear_drops_what_the_front_holds() {
    deadline("clear", || {
        let dir = tempfile::tempdir().unwrap();
        let cache = builder(dir.path(), 1 << 20).build().unwrap();
        let keys: Vec<String> = (0..8).map(|i| format!("k{i}")).collect();
        for (i, k) in keys.iter().enumerate() {
            put(&cache, k, &pattern(2 * KIB + i, i as u64));
        }
        for (i, k) in keys.iter().enumerate() {
            wait_promoted(&cache, k, &pattern(2 * KIB + i, i as u64));
        }
        cache.clear();
        for k in &keys {
            assert!(cache.get(k).unwrap().is_none(), "{k} served after clear");
        }
        cache.run_pending_tasks();
        assert!(data_files(dir.path()).is_empty());
        for k in &keys {
            assert!(cache.get(k).unwrap().is_none(), "{k} served after deletion");
        }
        for (i, k) in keys.iter().enumerate() {
            put(&cache, k, &pattern(KIB + i, 100 + i as u64));
        }
        for (i, k) in keys.iter().enumerate() {
            let want = pattern(KIB + i, 100 + i as u64);
            assert_eq!(get_bytes(&cache, k), want);
            wait_promoted(&cache, k, &want);
        }
    });
}

#[test]
fn expiry_is_honoured_for_entries_in_the_front() {
    deadline("expiry", || {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new());
        let cache = builder(dir.path(), 1 << 20)
            .clock(clock.clone())
            .time_to_live(Duration::from_secs(60))
            .maintenance_interval(Duration::from_secs(3600))
            .build()
            .unwrap();
        let v1 = pattern(4 * KIB, 20);
        put(&cache, "k", &v1);
        wait_promoted(&cache, "k", &v1);
        clock.advance(Duration::from_secs(59));
        assert!(from_memory(&cache, "k", &v1));
        clock.advance(Duration::from_secs(2));
        assert!(cache.get("k").unwrap().is_none(), "expired entry served");
        assert!(!cache.contains_key("k"));
        // A miss now: the producer writes new bytes, which readers get.
        let v2 = pattern(4 * KIB, 21);
        put(&cache, "k", &v2);
        cache.run_pending_tasks();
        assert_eq!(get_bytes(&cache, "k"), v2);
        wait_promoted(&cache, "k", &v2);
        // The new version expires in turn.
        clock.advance(Duration::from_secs(61));
        assert!(cache.get("k").unwrap().is_none());
        cache.run_pending_tasks();
        assert!(cache.get("k").unwrap().is_none());
    });
}

/// Entry bytes that name their key and version: 16 header bytes, then a pattern of both.
fn version_bytes(key: u64, version: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 * KIB);
    v.extend_from_slice(&key.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    v.extend_from_slice(&pattern(4 * KIB - 16, (key << 32) | version));
    v
}

/// Checks that `got` is exactly a version of `key` written so far (`versions` handed out);
/// returns the version.
#[track_caller]
fn check_version(got: &[u8], key: u64, versions: &AtomicU64) -> u64 {
    assert_eq!(got.len(), 4 * KIB, "key {key}: torn length");
    let k = u64::from_le_bytes(got[..8].try_into().unwrap());
    let version = u64::from_le_bytes(got[8..16].try_into().unwrap());
    assert_eq!(k, key, "bytes of key {k} served for key {key}");
    assert!(
        version < versions.load(Ordering::SeqCst),
        "key {key}: version {version} never written"
    );
    assert!(got == version_bytes(key, version), "key {key}: mixed bytes");
    version
}

#[test]
fn churn_under_a_small_front_serves_whole_versions_only() {
    const KEYS: u64 = 100;
    const READERS: usize = 3;
    const WRITERS: usize = 2;
    let run = Duration::from_secs(3);
    deadline("churn", move || {
        let dir = tempfile::tempdir().unwrap();
        // 64 KiB front for 100 entries of 4 KiB: about 14 fit, the rest churn through.
        let cache = Arc::new(
            Cache::builder()
                .disk(dir.path())
                .memory_front(64 * KIB as u64)
                .max_idle_handles(4)
                .build()
                .unwrap(),
        );
        // One counter per key: versions below it were (or are being) written.
        let versions: Arc<Vec<AtomicU64>> =
            Arc::new((0..KEYS).map(|_| AtomicU64::new(1)).collect());
        for k in 0..KEYS {
            put(&cache, &k.to_string(), &version_bytes(k, 0));
        }
        let barrier = Arc::new(Barrier::new(READERS + WRITERS));
        let stop = Arc::new(AtomicBool::new(false));
        let reads = Arc::new(AtomicU64::new(0));
        let shared = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for t in 0..READERS + WRITERS {
            let (cache, versions, barrier, stop, reads, shared) = (
                cache.clone(),
                versions.clone(),
                barrier.clone(),
                stop.clone(),
                reads.clone(),
                shared.clone(),
            );
            threads.push(thread::spawn(move || {
                let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ t as u64;
                let mut next = move || {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x
                };
                barrier.wait();
                while !stop.load(Ordering::Relaxed) {
                    // Readers favour a hot set of 10 keys (they should come from memory).
                    let key = if t < READERS && next() % 4 != 0 {
                        next() % 10
                    } else {
                        next() % KEYS
                    };
                    let name = key.to_string();
                    if t >= READERS && next() % 2 == 0 {
                        cache.remove(&name).unwrap();
                    }
                    match cache.get_or_create(&name).unwrap() {
                        Entry::Hit(mut r) if t < READERS && next() % 2 == 0 => {
                            // A second reader held with the first: the same piece of memory
                            // if both come from the front (see the module docs).
                            let (got, first) = read_chunks(&mut r);
                            let version = check_version(&got, key, &versions[key as usize]);
                            if let Some(mut r2) = cache.get(&name).unwrap() {
                                let (got2, first2) = read_chunks(&mut r2);
                                let v2 = check_version(&got2, key, &versions[key as usize]);
                                if v2 == version && first.as_ptr() == first2.as_ptr() {
                                    shared.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Entry::Hit(mut r) => {
                            let got = read_all(&mut r).unwrap();
                            check_version(&got, key, &versions[key as usize]);
                            reads.fetch_add(1, Ordering::Relaxed);
                        }
                        Entry::Miss(mut w) => {
                            let version = versions[key as usize].fetch_add(1, Ordering::SeqCst);
                            w.write_bytes(&version_bytes(key, version)).unwrap();
                            w.finish().unwrap();
                        }
                    }
                }
            }));
        }
        let start = Instant::now();
        while start.elapsed() < run {
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let (reads, shared) = (
            reads.load(Ordering::Relaxed),
            shared.load(Ordering::Relaxed),
        );
        eprintln!("churn: {reads} reads, {shared} paired reads served from memory");
        assert!(reads > 100, "too few reads");
        // Hot keys were served from the front now and then (promotions do happen under churn).
        assert!(shared > 0, "no read served from memory");
        // Quiet now: every key present reads one whole version, the same on every hit.
        cache.run_pending_tasks();
        for k in 0..KEYS {
            let name = k.to_string();
            let Some(mut r) = cache.get(&name).unwrap() else {
                continue;
            };
            let got = read_all(&mut r).unwrap();
            drop(r);
            let version = check_version(&got, k, &versions[k as usize]);
            for _ in 0..3 {
                let again = read_all(&mut cache.get(&name).unwrap().unwrap()).unwrap();
                assert_eq!(check_version(&again, k, &versions[k as usize]), version);
            }
        }
    });
}

#[test]
fn after_a_restart_the_front_is_empty_and_entries_come_from_disk() {
    deadline("restart", || {
        let dir = tempfile::tempdir().unwrap();
        let keys: Vec<(String, Vec<u8>)> = (0..5)
            .map(|i| (format!("k{i}"), pattern(4 * KIB + i, 30 + i as u64)))
            .collect();
        {
            let cache = builder(dir.path(), 1 << 20).build().unwrap();
            for (k, v) in &keys {
                put(&cache, k, v);
            }
            for (k, v) in &keys {
                wait_promoted(&cache, k, v);
            }
        }
        {
            let cache = builder(dir.path(), 1 << 20).build().unwrap();
            assert_eq!(cache.len(), keys.len());
            for (k, v) in &keys {
                assert!(!from_memory(&cache, k, v), "{k}: in memory after a restart");
            }
            for (k, v) in &keys {
                wait_promoted(&cache, k, v);
            }
            // Replace one, then restart again: the new bytes, from disk.
            assert!(cache.remove("k0").unwrap());
            put(&cache, "k0", b"new k0");
        }
        // Without a front, the same directory serves the same entries.
        {
            let cache = Cache::builder().disk(dir.path()).build().unwrap();
            assert_eq!(get_bytes(&cache, "k0"), b"new k0");
            for (k, v) in &keys[1..] {
                assert_eq!(&get_bytes(&cache, k), v);
            }
        }
        let cache = builder(dir.path(), 1 << 20).build().unwrap();
        assert!(!from_memory(&cache, "k0", b"new k0"));
        wait_promoted(&cache, "k0", b"new k0");
    });
}

#[test]
fn metadata_is_served_from_the_front_too() {
    deadline("metadata", || {
        let dir = tempfile::tempdir().unwrap();
        let want = pattern(4 * KIB, 40);
        {
            let cache = Cache::builder().disk(dir.path()).build().unwrap();
            let mut w = miss(&cache, "k");
            w.set_metadata("text/plain; v=1");
            w.write_bytes(&want).unwrap();
            w.finish().unwrap();
        }
        let cache = builder(dir.path(), 1 << 20).build().unwrap();
        wait_promoted(&cache, "k", &want);
        for _ in 0..3 {
            let r = hit(&cache, "k");
            assert_eq!(&r.metadata()[..], b"text/plain; v=1");
        }
        let info = cache.entry_info("k").unwrap();
        assert_eq!(&info.metadata[..], b"text/plain; v=1");
        assert_eq!(info.len, want.len() as u64);
    });
}
