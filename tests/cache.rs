//! Cache scenarios inherited from Go's `fscache`, plus the contract lines of DESIGN.md that
//! the Go package got wrong (abort, removal, corruption, hostile keys, faults, locking).

mod support;

use std::collections::BTreeSet;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, mpsc};
use std::thread;

use streamcache::storage::{FaultOp, FaultyStorage, MemoryStorage, Storage};
use streamcache::{Cache, Entry, Error};
use support::*;

const MIB: usize = 1 << 20;

fn memory() -> Cache {
    Cache::builder().memory().build().unwrap()
}

fn disk(dir: &Path) -> Cache {
    Cache::builder().disk(dir).build().unwrap()
}

/// Both backends, for scenarios that must hold on each. The tempdir lives as long as the cache.
fn backends() -> Vec<(&'static str, Cache, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().unwrap();
    vec![
        ("memory", memory(), None),
        ("disk", disk(dir.path()), Some(dir)),
    ]
}

// ---------------------------------------------------------------------------------------------
// fscache: three requests, one writer
// ---------------------------------------------------------------------------------------------

/// First request misses and writes; two later requests hit and read the same bytes *while*
/// they are being written (each reader proves it saw the first part before the rest exists).
#[test]
fn three_requests_one_writer() {
    for (name, cache, _dir) in backends() {
        deadline(name, move || {
            let data = pattern(3 * MIB + 123, 1);
            let (first, rest) = data.split_at(1000);
            let mut w = miss(&cache, "k");
            w.write_all(first).unwrap();
            w.flush().unwrap();

            let (got_first_tx, got_first_rx) = mpsc::channel();
            let readers: Vec<_> = (0..2)
                .map(|_| {
                    let mut r = hit(&cache, "k");
                    let tx = got_first_tx.clone();
                    thread::spawn(move || {
                        let mut head = vec![0; 1000];
                        r.read_exact(&mut head).unwrap();
                        tx.send(()).unwrap();
                        let mut tail = Vec::new();
                        r.read_to_end(&mut tail).unwrap();
                        head.extend(tail);
                        head
                    })
                })
                .collect();
            // Both readers have read the first part while the rest is not written yet.
            for _ in 0..2 {
                got_first_rx.recv().unwrap();
            }
            assert!(!hit(&cache, "k").size().finished);
            for chunk in rest.chunks(64 * 1024) {
                w.write_all(chunk).unwrap();
            }
            w.finish().unwrap();
            for r in readers {
                assert!(
                    r.join().unwrap() == data,
                    "{name}: reader saw different bytes"
                );
            }
            assert_eq!(get_bytes(&cache, "k"), data);
            let s = cache.stats();
            assert_eq!((s.misses, s.hits), (1, 4), "{name}: {s:?}");
        });
    }
}

/// `get` (not only `get_or_create`) serves an entry that is still being written.
#[test]
fn concurrent_get_while_writing() {
    for (name, cache, _dir) in backends() {
        deadline(name, move || {
            let data = pattern(2 * MIB + 7, 2);
            let mut w = miss(&cache, "k");
            let mut r = cache
                .get("k")
                .unwrap()
                .expect("in-progress entry is served");
            assert!(cache.contains_key("k"));
            let reader = thread::spawn(move || read_all(&mut r).unwrap());
            for chunk in data.chunks(100_000) {
                w.write_all(chunk).unwrap();
                w.flush().unwrap();
            }
            // A `get` mid-stream also starts at byte 0.
            let mut mid = cache.get("k").unwrap().unwrap();
            w.finish().unwrap();
            assert!(reader.join().unwrap() == data);
            assert!(read_all(&mut mid).unwrap() == data);
        });
    }
}

/// `clear` forgets everything (safe while a reader is open); the next request misses again.
#[test]
fn reuse_after_clean() {
    for (name, cache, _dir) in backends() {
        put(&cache, "a", b"alpha");
        put(&cache, "b", b"beta");
        let mut open = hit(&cache, "a");
        cache.clear();
        assert!(cache.is_empty(), "{name}");
        assert!(cache.get("a").unwrap().is_none());
        assert_eq!(
            read_all(&mut open).unwrap(),
            b"alpha",
            "{name}: open reader cut"
        );
        drop(open);
        put(&cache, "a", b"again"); // `put` asserts the miss
        assert_eq!(get_bytes(&cache, "a"), b"again");
        cache.run_pending_tasks();
        assert_eq!(stored_blobs(&cache), 1, "{name}: cleared blobs not deleted");
    }
}

// ---------------------------------------------------------------------------------------------
// thundering herd
// ---------------------------------------------------------------------------------------------

fn herd(cache: Cache, name: &'static str) {
    const N: usize = 64;
    deadline(name, move || {
        let cache = Arc::new(cache);
        let data = Arc::new(pattern(2 * MIB + 5, 3));
        let barrier = Arc::new(Barrier::new(N));
        let misses = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..N)
            .map(|_| {
                let (cache, data, barrier, misses) =
                    (cache.clone(), data.clone(), barrier.clone(), misses.clone());
                thread::spawn(move || {
                    barrier.wait();
                    match cache.get_or_create("herd").unwrap() {
                        Entry::Miss(mut w) => {
                            misses.fetch_add(1, Ordering::SeqCst);
                            let mut r = w.reader().unwrap();
                            for chunk in data.chunks(256 * 1024) {
                                w.write_all(chunk).unwrap();
                            }
                            w.finish().unwrap();
                            read_all(&mut r).unwrap()
                        }
                        Entry::Hit(mut r) => read_all(&mut r).unwrap(),
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(
                t.join().unwrap() == *data,
                "{name}: a reader saw different bytes"
            );
        }
        assert_eq!(misses.load(Ordering::SeqCst), 1, "{name}: exactly one Miss");
        let s = cache.stats();
        assert_eq!((s.misses, s.hits), (1, N as u64 - 1), "{name}: {s:?}");
        assert_eq!(cache.len(), 1);
    });
}

#[test]
fn herd_of_64_memory() {
    herd(memory(), "herd memory");
}

#[test]
fn herd_of_64_disk() {
    let dir = tempfile::tempdir().unwrap();
    herd(disk(dir.path()), "herd disk");
    // Only one version of the entry was ever stored.
    assert_eq!(data_files(dir.path()).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// reload
// ---------------------------------------------------------------------------------------------

#[test]
fn reload_restores_bytes_key_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let big = pattern(3 * MIB + 17, 4);
    {
        let cache = disk(dir.path());
        let mut w = miss(&cache, "big");
        w.set_metadata(&b"content-type: application/octet-stream"[..]);
        w.write_all(&big).unwrap();
        w.finish().unwrap();
        put(&cache, "empty", b"");
        // An unfinished entry at shutdown: its writer outlives the cache, then goes away.
        let mut half = miss(&cache, "half");
        half.write_all(b"half of it").unwrap();
        half.flush().unwrap();
        drop(cache);
        drop(half);
    }
    let cache = disk(dir.path());
    let mut keys = cache.keys();
    keys.sort();
    assert_eq!(keys, ["big", "empty"]);
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.total_bytes(), big.len() as u64);
    let mut r = cache.get("big").unwrap().unwrap();
    assert_eq!(r.metadata(), &b"content-type: application/octet-stream"[..]);
    assert_eq!(r.size().len, big.len() as u64);
    assert!(r.size().finished);
    assert!(read_all(&mut r).unwrap() == big);
    assert_eq!(get_bytes(&cache, "empty"), b"");
    assert!(
        cache.get("half").unwrap().is_none(),
        "unfinished entry came back"
    );
    drop(miss(&cache, "half")); // a miss, as asserted by `miss`
    assert!(files_under(&dir.path().join("tmp")).is_empty());
}

/// A reader of a reloaded (or any cached) entry reports the entry's key, not a storage name.
#[test]
fn reader_key_is_the_cache_key() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = disk(dir.path());
        let w = miss(&cache, "my/key");
        assert_eq!(w.key(), "my/key", "Writer::key");
        let r = w.reader().unwrap();
        assert_eq!(r.key(), "my/key", "Reader::key of a writer's reader");
        w.finish().unwrap();
        assert_eq!(
            hit(&cache, "my/key").key(),
            "my/key",
            "Reader::key of a hit"
        );
    }
    let cache = disk(dir.path());
    assert_eq!(
        cache.get("my/key").unwrap().unwrap().key(),
        "my/key",
        "after reload"
    );
}

/// The key carried by `Error::Aborted` is the cache key.
#[test]
fn aborted_error_names_the_key() {
    let cache = memory();
    let w = miss(&cache, "the-key");
    let mut r = w.reader().unwrap();
    w.abort();
    let e = read_all(&mut r).unwrap_err();
    match inner_error(&e) {
        Some(Error::Aborted { key, .. }) => assert_eq!(key, "the-key"),
        other => panic!("expected Aborted, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// abort
// ---------------------------------------------------------------------------------------------

/// A writer dropped unfinished (or aborted, explicitly) fails every reader — those parked at
/// the written end and those that arrive later — and the key misses again.
#[test]
fn abort_fails_readers_and_key_misses_again() {
    for (name, cache, _dir) in backends() {
        for explicit in [false, true] {
            let cache_ref = &cache;
            let key = format!("k{explicit}");
            let mut w = miss(cache_ref, &key);
            w.write_all(&pattern(5000, 5)).unwrap();
            w.flush().unwrap();
            let mut early = w.reader().unwrap();
            let mut hit_reader = hit(cache_ref, &key);
            // A reader parked at the written end: it has the first 5000 bytes and waits.
            let mut parked = hit(cache_ref, &key);
            let (ready_tx, ready_rx) = mpsc::channel();
            let parked = thread::spawn(move || {
                let mut head = vec![0; 5000];
                parked.read_exact(&mut head).unwrap();
                ready_tx.send(()).unwrap();
                read_all(&mut parked)
            });
            ready_rx
                .recv_timeout(DEADLINE)
                .expect("parked reader got its bytes");
            if explicit {
                w.abort();
            } else {
                drop(w);
            }
            let e = parked.join().unwrap().expect_err("clean EOF after abort");
            assert!(is_aborted(&e), "{name}: parked reader got {e:?}");
            for r in [&mut early, &mut hit_reader] {
                let e = read_all(r).expect_err("clean EOF after abort");
                assert!(is_aborted(&e), "{name}: {e:?}");
                assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
                let mut b = [0; 4];
                assert!(r.read_at(&mut b, 0).is_err(), "read_at after abort");
            }
            assert!(!cache.contains_key(&key), "{name}");
            assert!(cache.get(&key).unwrap().is_none(), "{name}");
            put(&cache, &key, b"second try");
            assert_eq!(get_bytes(&cache, &key), b"second try");
        }
        cache.run_pending_tasks();
        let s = cache.stats();
        assert_eq!(s.aborts, 2, "{name}: {s:?}");
        assert_eq!(stored_blobs(&cache), 2, "{name}: aborted blobs stored");
    }
}

/// A cache over a memory storage with fault injection, and the handle that arms the faults.
fn faulty_cache() -> (FaultyStorage, Cache) {
    let faulty = FaultyStorage::new(MemoryStorage::new());
    let cache = Cache::builder()
        .storage(Arc::new(faulty.clone()))
        .build()
        .unwrap();
    (faulty, cache)
}

/// A write error from storage aborts too, and nothing half-written is ever committed.
#[test]
fn storage_full_mid_write() {
    deadline("enospc", || {
        let (faulty, cache) = faulty_cache();
        let chunk = pattern(64 * 1024, 6);
        let mut w = miss(&cache, "k");
        let mut r = hit(&cache, "k");
        w.write_all(&chunk).unwrap();
        w.flush().unwrap();
        faulty.fail_nth(FaultOp::Write, 2, io::ErrorKind::StorageFull);
        w.write_all(&chunk).unwrap();
        let err = w.write_all(&chunk).expect_err("injected ENOSPC");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull, "{err:?}");
        // Further writes and finish fail as well.
        assert!(w.write_all(b"x").is_err());
        assert!(w.finish().is_err(), "finish after a storage error");
        let e = read_all(&mut r).expect_err("reader must not see a clean EOF");
        assert!(is_aborted(&e), "{e:?}");
        assert!(e.to_string().contains("injected"), "cause lost: {e}");
        assert!(!cache.contains_key("k"));
        assert!(cache.get("k").unwrap().is_none());
        assert!(
            cache.storage().list().unwrap().is_empty(),
            "half-written blob committed"
        );
        // The cache still works, for other keys and for the same key.
        put(&cache, "other", &chunk);
        put(&cache, "k", &chunk);
        assert!(get_bytes(&cache, "k") == chunk);
        assert!(get_bytes(&cache, "other") == chunk);
        assert_eq!(cache.stats().aborts, 1);
    });
}

/// A failing commit aborts the entry; a failing create is an error of `get_or_create` and
/// leaves no trace.
#[test]
fn commit_and_create_faults() {
    deadline("commit/create faults", || {
        let (faulty, cache) = faulty_cache();
        faulty.fail_nth(FaultOp::Commit, 1, io::ErrorKind::Other);
        let mut w = miss(&cache, "c");
        let mut r = w.reader().unwrap();
        w.write_all(b"bytes").unwrap();
        assert!(w.finish().is_err());
        assert!(is_aborted(&read_all(&mut r).unwrap_err()));
        assert!(cache.get("c").unwrap().is_none());
        put(&cache, "c", b"ok");

        faulty.fail_nth(FaultOp::Create, 1, io::ErrorKind::StorageFull);
        assert!(cache.get_or_create("d").is_err());
        assert!(!cache.contains_key("d"));
        assert_eq!(cache.len(), 1);
        put(&cache, "d", b"ok");
        assert_eq!(get_bytes(&cache, "d"), b"ok");
    });
}

// ---------------------------------------------------------------------------------------------
// removal
// ---------------------------------------------------------------------------------------------

/// Regression: cancelling a writer's stream (`Stream::cancel_with`) left the entry indexed
/// and counted, never finished and never expiring, until a request for its key noticed.
/// Now it is aborted like a failed writer.
#[test]
fn cancelled_writer_stream_aborts_the_entry() {
    for (name, cache, _dir) in backends() {
        let mut w = miss(&cache, "k");
        w.write_all(b"partial").unwrap();
        w.flush().unwrap();
        let mut r = w.reader().unwrap();
        w.stream().cancel_with("operator cancelled");
        assert_eq!(cache.len(), 0, "{name}");
        assert_eq!(cache.total_bytes(), 0, "{name}");
        assert_eq!(cache.stats().aborts, 1, "{name}");
        // Never a clean read: the cancel, with its cause.
        let err = read_all(&mut r).unwrap_err();
        assert_closed(&err);
        assert!(
            err.to_string().contains("operator cancelled"),
            "{name}: {err}"
        );
        assert!(w.write_all(b"more").is_err(), "{name}");
        drop(w);
        assert_eq!(cache.stats().aborts, 1, "{name}: counted once");
        put(&cache, "k", b"whole");
        assert_eq!(get_bytes(&cache, "k"), b"whole", "{name}");
    }
}

/// A clock that panics once when armed: a stand-in for any panic inside `Writer::finish`.
#[derive(Debug, Default)]
struct PanickyClock(std::sync::atomic::AtomicBool);

impl streamcache::cache::Clock for PanickyClock {
    fn now_millis(&self) -> u64 {
        if self.0.swap(false, Ordering::SeqCst) {
            panic!("clock bug");
        }
        1_000
    }
}

/// Regression: a panic inside `finish` after it had taken the blob (in a storage's `commit`,
/// or the clock stamping the entry) left the stream open, and its readers waited forever.
#[test]
fn panic_inside_finish_aborts_instead_of_hanging_readers() {
    deadline("panic inside finish", || {
        let clock = Arc::new(PanickyClock::default());
        let cache = Cache::builder().clock(clock.clone()).build().unwrap();
        let mut w = miss(&cache, "k");
        w.write_all(b"some bytes").unwrap();
        let mut r = w.reader().unwrap();
        clock.0.store(true, Ordering::SeqCst);
        let finished = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.finish()));
        assert!(finished.is_err(), "the clock panicked");
        let err = read_all(&mut r).unwrap_err();
        assert!(err.to_string().contains("finish did not complete"), "{err}");
        assert!(matches!(cache.get_or_create("k").unwrap(), Entry::Miss(_)));
    });
}

#[test]
fn remove_while_readers_open() {
    for (name, cache, _dir) in backends() {
        deadline(name, move || {
            let data = pattern(3 * MIB + 1, 7);
            put(&cache, "k", &data);
            let mut a = hit(&cache, "k");
            let b = hit(&cache, "k");
            let mut head = vec![0; 1000];
            a.read_exact(&mut head).unwrap();
            assert!(cache.remove("k").unwrap());
            assert!(!cache.remove("k").unwrap(), "second remove finds nothing");
            assert!(!cache.contains_key("k"));
            assert!(cache.get("k").unwrap().is_none());
            // The blocking part runs now; it must not cut the open readers.
            cache.run_pending_tasks();
            let mut tail = Vec::new();
            a.read_to_end(&mut tail).unwrap();
            head.extend(tail);
            assert!(head == data, "{name}: sequential reader cut by remove");
            let mut at = vec![0; data.len()];
            assert_eq!(b.read_at(&mut at, 0).unwrap(), data.len());
            assert!(at == data, "{name}: read_at reader cut by remove");
            drop((a, b));
            cache.run_pending_tasks();
            assert!(
                cache.storage().list().unwrap().is_empty(),
                "{name}: blob not deleted"
            );
            drop(miss(&cache, "k")); // new requests miss
        });
    }
}

/// A writer whose entry was removed may finish; its readers get every byte; the removed
/// entry is not stored and does not come back after a restart.
#[test]
fn writer_of_removed_entry_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(2 * MIB + 99, 8);
    {
        let cache = disk(dir.path());
        let d = data.clone();
        deadline("removed writer", move || {
            let mut w = miss(&cache, "k");
            let mut r = hit(&cache, "k");
            let (first, rest) = d.split_at(MIB);
            w.write_all(first).unwrap();
            w.flush().unwrap();
            assert!(cache.remove("k").unwrap());
            assert!(cache.get("k").unwrap().is_none());
            let reader = thread::spawn(move || read_all(&mut r).unwrap());
            w.write_all(rest).unwrap();
            w.finish().expect("a removed entry's writer may finish");
            assert!(reader.join().unwrap() == d, "reader of removed entry cut");
            assert!(
                cache.get("k").unwrap().is_none(),
                "finish resurrected the key"
            );
            cache.run_pending_tasks();
            assert!(cache.storage().list().unwrap().is_empty());
        });
    }
    let cache = disk(dir.path());
    assert!(
        cache.get("k").unwrap().is_none(),
        "removed entry came back after reopen"
    );
    assert!(data_files(dir.path()).is_empty());
}

// ---------------------------------------------------------------------------------------------
// corruption
// ---------------------------------------------------------------------------------------------

fn flip_byte(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, offset).unwrap();
}

/// A byte flipped in a stored data file is detected by every kind of read and the entry is
/// dropped; the bytes before the bad block may be served, wrong bytes never.
#[test]
fn corrupted_data_file_is_detected() {
    let data = pattern(3 * MIB + 500, 9);
    let bad = 2 * MIB + 10; // in the third 1 MiB block
    type Probe = fn(&mut streamcache::Reader, &[u8], usize) -> io::Result<()>;
    let probes: [(&str, Probe); 3] = [
        ("sequential", |r, data, _bad| {
            let mut got = Vec::new();
            let res = r.read_to_end(&mut got).map(|_| ());
            assert!(
                got.len() < data.len(),
                "wrong bytes delivered as a clean read"
            );
            assert!(data.starts_with(&got), "wrong bytes delivered");
            res
        }),
        ("read_at", |r, _data, bad| {
            let mut b = [0; 16];
            r.read_at(&mut b, bad as u64 - 4).map(|_| ())
        }),
        ("seek", |r, _data, bad| {
            r.seek(SeekFrom::Start(bad as u64)).unwrap();
            let mut b = [0; 1];
            r.read_exact(&mut b)
        }),
    ];
    for (what, probe) in probes {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = disk(dir.path());
            put(&cache, "k", &data);
            put(&cache, "fine", b"untouched");
        }
        let files = data_files(dir.path());
        assert_eq!(files.len(), 2);
        let target = files
            .iter()
            .find(|p| std::fs::metadata(p).unwrap().len() == data.len() as u64)
            .expect("data file of k");
        flip_byte(target, bad as u64);
        let cache = disk(dir.path());
        let mut r = cache
            .get("k")
            .unwrap()
            .expect("reopen does not read content");
        let e = probe(&mut r, &data, bad).expect_err(what);
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e:?}");
        assert!(
            matches!(inner_error(&e), Some(Error::Corrupt { .. })),
            "{what}: {e:?}"
        );
        // A first block that is intact reads fine through read_at.
        let mut b = vec![0; 100];
        r.read_at(&mut b, 0).unwrap();
        assert_eq!(b, data[..100]);
        assert!(
            cache.get("k").unwrap().is_none(),
            "{what}: corrupt entry still served"
        );
        assert_eq!(get_bytes(&cache, "fine"), b"untouched");
        drop(r);
        cache.run_pending_tasks();
        assert_eq!(
            data_files(dir.path()).len(),
            1,
            "{what}: corrupt blob not deleted"
        );
    }
}

/// A stored file altered while the cache is running (not only across a restart) is detected
/// by a later reader too: it must not be served from an unverified handle.
#[test]
fn data_file_altered_while_running_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let cache = disk(dir.path());
    let data = pattern(3 * MIB, 14);
    put(&cache, "k", &data);
    assert!(get_bytes(&cache, "k") == data);
    let files = data_files(dir.path());
    assert_eq!(files.len(), 1);
    flip_byte(&files[0], 2 * MIB as u64 + 5);
    let mut r = cache.get("k").unwrap().expect("still indexed");
    let mut got = Vec::new();
    let res = r.read_to_end(&mut got);
    assert!(
        got.len() < data.len() || got == data,
        "altered bytes served as a clean read"
    );
    assert!(data.starts_with(&got[..got.len().min(2 * MIB)]));
    let e = res.expect_err("altered file read cleanly");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e:?}");
}

/// A damaged record (`.meta`) or a truncated data file drops the entry at reopen.
#[test]
fn corrupted_record_or_truncated_file_drops_entry() {
    for damage in ["meta", "truncate"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let cache = disk(dir.path());
            put(&cache, "k", &pattern(10_000, 10));
            put(&cache, "fine", b"untouched");
        }
        let data_file = data_files(dir.path())
            .into_iter()
            .find(|p| std::fs::metadata(p).unwrap().len() == 10_000)
            .unwrap();
        let target = match damage {
            "meta" => data_file.with_extension("meta"),
            _ => data_file,
        };
        assert!(target.exists(), "{target:?}");
        match damage {
            "meta" => flip_byte(&target, 20),
            _ => std::fs::OpenOptions::new()
                .write(true)
                .open(&target)
                .unwrap()
                .set_len(5000)
                .unwrap(),
        }
        let cache = disk(dir.path());
        if let Some(mut r) = cache.get("k").unwrap() {
            let e = read_all(&mut r).expect_err("damaged entry read cleanly");
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{damage}: {e:?}");
            assert!(cache.get("k").unwrap().is_none(), "{damage}: still served");
        }
        assert_eq!(get_bytes(&cache, "fine"), b"untouched");
        drop(miss(&cache, "k"));
    }
}

/// A stored file deleted behind the cache's back: the entry is dropped, the key misses.
#[test]
fn data_file_deleted_externally() {
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = disk(dir.path());
        put(&cache, "k", b"value");
        put(&cache, "fine", b"untouched");
    }
    let victim = data_files(dir.path())
        .into_iter()
        .find(|p| std::fs::metadata(p).unwrap().len() == 5)
        .unwrap();
    std::fs::remove_file(&victim).unwrap();
    let _ = std::fs::remove_file(victim.with_extension("meta"));
    let cache = disk(dir.path());
    assert!(cache.get("k").unwrap().is_none());
    drop(miss(&cache, "k"));
    assert_eq!(get_bytes(&cache, "fine"), b"untouched");
}

// ---------------------------------------------------------------------------------------------
// hostile keys
// ---------------------------------------------------------------------------------------------

fn hostile_keys() -> Vec<String> {
    vec![
        String::new(),
        "../x".into(),
        "../../../../../../tmp/streamcache-escape".into(),
        "/etc/passwd".into(),
        "a\0b".into(),
        "k".repeat(64 * 1024),
        "ключ/значение".into(),
        "日本語のキー".into(),
        "🦀🔥 emoji 👩‍👩‍👧".into(),
        "tmp".into(),
        "v1".into(),
        "LOCK".into(),
        "x.meta".into(),
        ".".into(),
        "..".into(),
        "C:\\Windows\\system32".into(),
        "line\nbreak\r\t".into(),
    ]
}

#[test]
fn hostile_keys_round_trip_after_reload() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("cache");
    let keys = hostile_keys();
    let value = |i: usize, k: &str| [format!("{i}:").as_bytes(), k.as_bytes()].concat();
    {
        let cache = disk(&dir);
        for (i, k) in keys.iter().enumerate() {
            let mut w = miss(&cache, k);
            w.set_metadata(k.clone().into_bytes());
            w.write_all(&value(i, k)).unwrap();
            w.finish().unwrap();
        }
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(get_bytes(&cache, k), value(i, k));
        }
    }
    let cache = disk(&dir);
    let want: BTreeSet<String> = keys.iter().cloned().collect();
    let got: BTreeSet<String> = cache.keys().into_iter().collect();
    assert!(got == want, "keys changed across reload");
    for (i, k) in keys.iter().enumerate() {
        let mut r = cache.get(k).unwrap().unwrap();
        assert_eq!(r.metadata(), k.as_bytes());
        assert_eq!(read_all(&mut r).unwrap(), value(i, k));
    }
    // Nothing outside the cache directory; inside, only hashed names.
    let outside: Vec<_> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(outside, ["cache"]);
    assert!(!Path::new("/tmp/streamcache-escape").exists());
    for f in files_under(&dir) {
        let rel = f.strip_prefix(&dir).unwrap();
        let name = f.file_name().unwrap().to_str().unwrap();
        let ok = name == "LOCK"
            || name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        assert!(ok, "unexpected file name {rel:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// directory lock
// ---------------------------------------------------------------------------------------------

#[test]
fn second_open_of_a_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let first = disk(dir.path());
    put(&first, "k", b"v");
    match Cache::builder().disk(dir.path()).build() {
        Err(Error::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Error::Locked, got {other:?}"),
    }
    let msg = Cache::builder()
        .disk(dir.path())
        .build()
        .unwrap_err()
        .to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    // The refused open did not disturb the first cache.
    assert_eq!(get_bytes(&first, "k"), b"v");
    drop(first);
    let again = disk(dir.path());
    assert_eq!(get_bytes(&again, "k"), b"v");
}

/// Readers handed out by a cache keep working after the cache is dropped, and they keep the
/// directory's data alive.
#[test]
fn readers_outlive_the_cache() {
    for (name, cache, _dir) in backends() {
        let data = pattern(MIB + 3, 11);
        put(&cache, "k", &data);
        let mut r = hit(&cache, "k");
        drop(cache);
        assert!(read_all(&mut r).unwrap() == data, "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// get_or_produce
// ---------------------------------------------------------------------------------------------

#[test]
fn get_or_produce_runs_producer_once() {
    deadline("get_or_produce", || {
        const N: usize = 16;
        let cache = Arc::new(memory());
        let runs = Arc::new(AtomicUsize::new(0));
        let data = Arc::new(pattern(2 * MIB, 12));
        let barrier = Arc::new(Barrier::new(N));
        let threads: Vec<_> = (0..N)
            .map(|_| {
                let (cache, runs, data, barrier) =
                    (cache.clone(), runs.clone(), data.clone(), barrier.clone());
                thread::spawn(move || {
                    barrier.wait();
                    let d = data.clone();
                    let mut r = cache
                        .get_or_produce("memo", move |w| {
                            runs.fetch_add(1, Ordering::SeqCst);
                            for c in d.chunks(100_000) {
                                w.write_all(c)?;
                            }
                            Ok(())
                        })
                        .unwrap();
                    read_all(&mut r).unwrap()
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().unwrap() == *data);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

#[test]
fn get_or_produce_failure_aborts_and_retries() {
    deadline("get_or_produce failure", || {
        let cache = memory();
        let runs = Arc::new(AtomicUsize::new(0));
        let counted = |runs: &Arc<AtomicUsize>| {
            let runs = runs.clone();
            move || runs.fetch_add(1, Ordering::SeqCst)
        };

        let count = counted(&runs);
        let mut r = cache
            .get_or_produce("k", move |w| {
                count();
                w.write_all(b"partial")?;
                Err(io::Error::other("upstream broke"))
            })
            .unwrap();
        let e = read_all(&mut r).expect_err("producer error must not look like EOF");
        assert!(is_aborted(&e), "{e:?}");
        assert!(e.to_string().contains("upstream broke"), "cause lost: {e}");

        let count = counted(&runs);
        let mut r = cache
            .get_or_produce("k", move |w| {
                count();
                w.write_all(b"partial")?;
                panic!("producer panics (expected by this test)");
            })
            .unwrap();
        let e = read_all(&mut r).expect_err("producer panic must not look like EOF");
        assert!(is_aborted(&e), "{e:?}");

        let count = counted(&runs);
        let mut r = cache
            .get_or_produce("k", move |w| {
                count();
                w.write_all(b"third time lucky")
            })
            .unwrap();
        assert_eq!(read_all(&mut r).unwrap(), b"third time lucky");
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "each failure must be retried"
        );
        assert_eq!(get_bytes(&cache, "k"), b"third time lucky");
    });
}

/// Every aborted producer counts in `stats().aborts`, also when the next request notices the
/// failed stream (and unlinks it) before the producer thread's abort hook runs.
#[test]
fn aborts_counted_when_a_request_sees_the_abort_first() {
    deadline("aborts count", || {
        const ROUNDS: u64 = 500;
        let cache = memory();
        // Busy threads make preemption between the abort and its hook likely.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinners: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        for _ in 0..ROUNDS {
            let mut r = cache
                .get_or_produce("k", |_w| Err(io::Error::other("fails")))
                .unwrap();
            assert!(is_aborted(&read_all(&mut r).unwrap_err()));
            // Immediately ask again: this request may find the failed entry first.
            drop(cache.get("k").unwrap());
        }
        stop.store(true, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        cache.run_pending_tasks();
        assert_eq!(cache.stats().aborts, ROUNDS, "{:?}", cache.stats());
    });
}

// ---------------------------------------------------------------------------------------------
// declared length, seeking
// ---------------------------------------------------------------------------------------------

#[test]
fn expected_len_visible_and_seek_end_before_finish() {
    for (name, cache, _dir) in backends() {
        deadline(name, move || {
            let data = pattern(100_000, 13);
            let mut w = miss(&cache, "k");
            w.set_expected_len(data.len() as u64).unwrap();
            w.set_metadata(&b"meta"[..]);
            w.write_all(&data[..40_000]).unwrap();
            w.flush().unwrap();
            let mut r = hit(&cache, "k");
            assert_eq!(r.expected_len(), Some(data.len() as u64));
            assert_eq!(r.metadata(), &b"meta"[..]);
            assert_eq!(r.size().len, 40_000);
            assert!(!r.size().finished);
            // Seeking from the end uses the declared length: does not wait for finish.
            let at = r.seek(SeekFrom::End(-10)).unwrap();
            assert_eq!(at, data.len() as u64 - 10);
            // Start/Current never block either.
            assert_eq!(r.seek(SeekFrom::Current(-5)).unwrap(), at - 5);
            assert_eq!(r.seek(SeekFrom::Start(at)).unwrap(), at);
            // Reading there waits for the bytes.
            let (tx, rx) = mpsc::channel();
            let tail = thread::spawn(move || {
                tx.send(()).unwrap();
                let mut b = [0; 10];
                r.read_exact(&mut b).unwrap();
                let mut rest = Vec::new();
                r.read_to_end(&mut rest).unwrap();
                (b, rest)
            });
            rx.recv().unwrap();
            w.write_all(&data[40_000..]).unwrap();
            w.finish().unwrap();
            let (b, rest) = tail.join().unwrap();
            assert_eq!(&b[..], &data[data.len() - 10..]);
            assert!(rest.is_empty());
        });
    }
}

/// Without a declared length, `SeekFrom::End` waits for finish (it must not guess).
#[test]
fn seek_end_waits_for_finish_without_declared_len() {
    deadline("seek end", || {
        let cache = memory();
        let mut w = miss(&cache, "k");
        w.write_all(b"12345").unwrap();
        w.flush().unwrap();
        let mut r = hit(&cache, "k");
        let (tx, rx) = mpsc::channel();
        let seeker = thread::spawn(move || {
            let at = r.seek(SeekFrom::End(-2)).unwrap();
            tx.send(at).unwrap();
        });
        // Not finished: the seek cannot have completed with a length of 5 bytes.
        w.write_all(b"6789").unwrap();
        w.finish().unwrap();
        assert_eq!(rx.recv().unwrap(), 7);
        seeker.join().unwrap();
    });
}

/// Finishing short of (or writing past) the declared length aborts the entry.
#[test]
fn declared_length_mismatch_aborts() {
    let cache = memory();
    let mut w = miss(&cache, "short");
    w.set_expected_len(10).unwrap();
    let mut r = w.reader().unwrap();
    w.write_all(b"12345").unwrap();
    assert!(w.finish().is_err());
    assert!(is_aborted(&read_all(&mut r).unwrap_err()));
    assert!(cache.get("short").unwrap().is_none());

    let mut w = miss(&cache, "long");
    w.set_expected_len(3).unwrap();
    let mut r = w.reader().unwrap();
    assert!(w.write_all(b"12345").is_err());
    assert!(read_all(&mut r).is_err());
    assert!(cache.get("long").unwrap().is_none());
}

// ---------------------------------------------------------------------------------------------
// bookkeeping
// ---------------------------------------------------------------------------------------------

#[test]
fn stats_counters() {
    let cache = memory();
    put(&cache, "a", &[1; 100]); // miss
    drop(hit(&cache, "a")); // hit
    drop(cache.get("a").unwrap().unwrap()); // hit
    assert!(cache.get("absent").unwrap().is_none()); // miss
    let w = miss(&cache, "b"); // miss
    w.abort(); // abort (+ removal)
    assert!(cache.remove("a").unwrap()); // removal
    assert!(!cache.remove("a").unwrap()); // nothing
    put(&cache, "c", &[2; 50]); // miss
    let mut r = hit(&cache, "c"); // hit
    read_all(&mut r).unwrap();
    drop(r);
    cache.run_pending_tasks();
    let s = cache.stats();
    assert_eq!(s.hits, 3, "{s:?}");
    assert_eq!(s.misses, 4, "{s:?}");
    assert_eq!(s.aborts, 1, "{s:?}");
    assert_eq!(s.removals, 2, "{s:?}");
    assert_eq!(s.evictions, 0, "{s:?}");
    assert_eq!(s.bytes_written, 150, "{s:?}");
    assert_eq!(s.bytes_read, 50, "{s:?}");
    assert!(!s.over_limit);
}

#[test]
fn keys_len_total_bytes() {
    for (name, cache, _dir) in backends() {
        assert!(cache.is_empty());
        assert_eq!(cache.total_bytes(), 0);
        put(&cache, "a", &[0; 1000]);
        put(&cache, "b", &[0; 2000]);
        let mut w = miss(&cache, "c");
        w.write_all(&[0; 300]).unwrap();
        w.flush().unwrap();
        let mut keys = cache.keys();
        keys.sort();
        assert_eq!(keys, ["a", "b", "c"], "{name}");
        assert_eq!(cache.len(), 3);
        assert!(!cache.is_empty());
        assert_eq!(cache.total_bytes(), 3300, "{name}: in-progress bytes count");
        w.write_all(&[0; 700]).unwrap();
        w.finish().unwrap();
        assert_eq!(cache.total_bytes(), 4000, "{name}");
        cache.remove("b").unwrap();
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.total_bytes(), 2000, "{name}");
        let w = miss(&cache, "d");
        drop(w);
        assert_eq!(cache.len(), 2, "{name}: aborted entry counted");
        assert_eq!(cache.total_bytes(), 2000, "{name}");
        cache.clear();
        assert_eq!((cache.len(), cache.total_bytes()), (0, 0), "{name}");
        assert!(cache.keys().is_empty());
    }
}

/// A reader opened through the storage handle of the cache sees committed blobs by name only:
/// the cache's storage is the one it was built with.
#[test]
fn storage_accessor_is_the_builders_storage() {
    let storage = Arc::new(MemoryStorage::new());
    let cache = Cache::builder().storage(storage.clone()).build().unwrap();
    put(&cache, "k", b"v");
    assert_eq!(storage.list().unwrap().len(), 1);
    assert_eq!(cache.storage().list().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Zero-copy sending
// ---------------------------------------------------------------------------------------------

/// `take_file_range` hands out a finished disk entry's next bytes in place (and moves past
/// them) only once they are checked: not while the entry is written, not from memory, not
/// for bytes a reopened cache has not read yet; reading them earns it.
#[test]
fn file_ranges_of_finished_checked_disk_entries_only() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let len = 3 * MIB + 17;
    let data = pattern(len, 7);
    {
        let cache = disk(dir.path());
        let Entry::Miss(mut w) = cache.get_or_create("k").unwrap() else {
            panic!("fresh cache")
        };
        let mut r = w.reader().unwrap();
        w.write_all(&data).unwrap();
        assert!(r.take_file_range(10).is_none(), "not finished");
        w.finish().unwrap();
        let range = r.take_file_range(10).expect("checked by its writer");
        assert_eq!((range.offset(), range.len(), r.position()), (0, 10, 10));
        let range = r.take_file_range(len as u64 - 10).expect("the rest");
        let mut got = vec![0; range.len() as usize];
        range
            .file()
            .read_exact_at(&mut got, range.offset())
            .unwrap();
        assert!(got == data[10..], "the range holds the entry's bytes");
        assert!(r.take_file_range(1).is_none(), "past the end");
        assert_eq!(r.position(), len as u64);
    }
    let cache = disk(dir.path());
    let mut r = cache.get("k").unwrap().expect("reloaded");
    assert!(
        r.take_file_range(MIB as u64).is_none(),
        "not checked since the reopen"
    );
    assert_eq!(r.position(), 0, "a refusal does not move the reader");
    let mut buf = vec![0; len];
    r.read_exact(&mut buf).unwrap();
    assert!(buf == data);
    r.seek(SeekFrom::Start(5)).unwrap();
    let range = r
        .take_file_range(len as u64 - 5)
        .expect("checked by the read");
    assert_eq!(range.offset(), 5);

    let mem = memory();
    let Entry::Miss(mut w) = mem.get_or_create("k").unwrap() else {
        panic!("fresh cache")
    };
    w.write_all(b"abc").unwrap();
    w.finish().unwrap();
    assert!(
        mem.get("k").unwrap().unwrap().take_file_range(3).is_none(),
        "no file"
    );
}
