//! Cache benchmarks, each against a baseline measured in the same run:
//!
//! * hit path: open and drop a reader of a small finished entry, vs a
//!   `RwLock<HashMap<String, Arc<Vec<u8>>>>` lookup (memory and disk caches without limits,
//!   and a memory cache with `max_entries`, whose hits also feed LRU eviction);
//! * disk write of a 256 MiB entry (with content hashing) vs raw `std::fs` writes;
//! * read-back of a finished 256 MiB disk entry through `io::Read`, vs raw page-cache reads:
//!   cold (first read after reopening: every block is verified), warm, and first read of an
//!   entry this process wrote (its blocks were hashed as they were written);
//! * time to first byte of a late joiner on an entry still being produced;
//! * memory front (`front`): a disk cache vs the same with `memory_front`, same run: hits on
//!   4 KiB entries among 1 000 keys with 16 and with 2 000 idle handles kept, and repeated
//!   reads of one hot 1 MiB entry through `read_chunk`.
//!
//! `cargo bench --bench cache` prints a Markdown table of medians (`BENCH_RUNS=n` to change
//! the number of runs, default 7). The hit path's ratios are medians of per-run ratios (each
//! run times the baseline and then each cache, one pass each).

use std::collections::HashMap;
use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use streamcache::{Cache, Entry, Reader};

#[path = "support/mod.rs"]
mod support;

use support::{Table, gbps, median, runs};

const BIG: usize = 256 << 20;
const CHUNK: usize = 64 << 10;
const READ_BUF: usize = 1 << 20;
/// Keys cycled by the hit-path loop (fits the default 128 open idle handles).
const KEYS: usize = 100;
const HITS: usize = 200_000;

fn key(i: usize) -> String {
    format!("https://example.com/objects/{i}")
}

/// Nanoseconds per operation of `op(i)` over one pass of `HITS` operations.
fn ns_per_op(mut op: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..HITS {
        op(i % KEYS);
    }
    t.elapsed().as_nanos() as f64 / HITS as f64
}

/// Writes `data` as the new entry `key` and finishes it.
fn put(cache: &Cache, key: &str, data: &[u8]) {
    let Entry::Miss(mut w) = cache.get_or_create(key).unwrap() else {
        panic!("{key} should be a new entry")
    };
    w.write_all(data).unwrap();
    w.finish().unwrap();
}

fn fill(cache: &Cache) {
    for i in 0..KEYS {
        if let Entry::Miss(mut w) = cache.get_or_create(&key(i)).unwrap() {
            w.write_all(&[i as u8; 64]).unwrap();
            w.finish().unwrap();
        }
    }
}

fn hit_path(rows: &mut Table) {
    let map: RwLock<HashMap<String, Arc<Vec<u8>>>> = RwLock::new(
        (0..KEYS)
            .map(|i| (key(i), Arc::new(vec![i as u8; 64])))
            .collect(),
    );
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let mem = Cache::builder().memory().build().unwrap();
    fill(&mem);
    // The same with a size limit (not reached): every hit is then also booked for LRU
    // eviction, which a cache without one skips.
    let bounded = Cache::builder()
        .memory()
        .max_entries(10_000)
        .build()
        .unwrap();
    fill(&bounded);
    let dir = tempfile::tempdir().unwrap();
    {
        let disk = Cache::builder().disk(dir.path()).build().unwrap();
        fill(&disk);
    }
    let disk = Cache::builder().disk(dir.path()).build().unwrap();
    let caches = [
        ("hit path: memory cache, open+drop reader", &mem),
        ("hit path: disk cache (reloaded), open+drop reader", &disk),
        (
            "hit path: memory cache, max_entries(10_000), open+drop reader",
            &bounded,
        ),
    ];
    // Each run times the baseline, then every cache, one pass each; a cache's ratio is the
    // median over runs of its pass over the baseline pass of the same run (the load of a
    // shared machine varies between runs far more than within one).
    let mut base = Vec::new();
    let mut ns = vec![Vec::new(); caches.len()];
    let mut ratios = vec![Vec::new(); caches.len()];
    for _ in 0..runs(7) {
        let b = ns_per_op(|i| {
            black_box(map.read().unwrap().get(&keys[i]).cloned());
        });
        base.push(b);
        for (c, (_, cache)) in caches.iter().enumerate() {
            let t = ns_per_op(|i| {
                black_box(cache.get(&keys[i]).unwrap().expect("present"));
            });
            ns[c].push(t);
            ratios[c].push(t / b);
        }
    }
    rows.row(
        "hit path: RwLock<HashMap> lookup (baseline)",
        median(base),
        "ns/op",
        None,
    );
    for ((label, _), (ns, ratios)) in caches.iter().zip(ns.into_iter().zip(ratios)) {
        rows.row(label, median(ns), "ns/op", Some(median(ratios)));
    }
}

fn raw_write(path: &Path, data: &[u8]) -> Duration {
    let t = Instant::now();
    let mut f = File::create(path).unwrap();
    for c in data.chunks(CHUNK) {
        f.write_all(c).unwrap();
    }
    drop(f);
    t.elapsed()
}

/// Reads `r` to its end through `buf`; checks the length is `BIG`.
fn drain(r: impl Read, buf: &mut [u8]) {
    drain_len(r, buf, BIG);
}

fn raw_read(path: &Path, buf: &mut [u8]) -> Duration {
    let t = Instant::now();
    drain(File::open(path).unwrap(), buf);
    t.elapsed()
}

fn cache_read(cache: &Cache, k: &str, buf: &mut [u8]) -> Duration {
    let t = Instant::now();
    drain(cache.get(k).unwrap().expect("present"), buf);
    t.elapsed()
}

fn disk_throughput(rows: &mut Table) {
    let data: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("raw.bin");
    let cache_dir = dir.path().join("cache");
    let mut raw_w = Vec::new();
    let mut ours_w = Vec::new();
    for run in 0..runs(7) {
        let _ = std::fs::remove_file(&raw_path);
        raw_w.push(gbps(BIG, raw_write(&raw_path, &data)));
        let cache = Cache::builder().disk(&cache_dir).build().unwrap();
        let k = format!("big-{run}");
        let t = Instant::now();
        let Entry::Miss(mut w) = cache.get_or_create(&k).unwrap() else {
            panic!("fresh key")
        };
        for c in data.chunks(CHUNK) {
            w.write_all(c).unwrap();
        }
        w.finish().unwrap();
        ours_w.push(gbps(BIG, t.elapsed()));
        cache.clear();
        cache.run_pending_tasks();
    }
    let (base, ours) = (median(raw_w), median(ours_w));
    rows.row(
        "disk write 256 MiB: raw std::fs (baseline)",
        base,
        "GB/s",
        None,
    );
    rows.row(
        "disk write 256 MiB: cache entry with blake3 blocks",
        ours,
        "GB/s",
        Some(ours / base),
    );

    // Read-back. One finished entry; the raw file holds the same bytes; both page-cached.
    {
        let cache = Cache::builder().disk(&cache_dir).build().unwrap();
        put(&cache, "big", &data);
    }
    let mut buf = vec![0u8; READ_BUF];
    let (mut raw_r, mut cold, mut warm, mut fresh) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Each run's first read over the raw read just before it: the machine's load varies
    // between runs, less within one.
    let mut cold_ratio = Vec::new();
    for run in 0..runs(7) {
        let raw = gbps(BIG, raw_read(&raw_path, &mut buf));
        raw_r.push(raw);
        // A reopened cache verifies every block on first touch (blocks ahead of the reader on
        // the verify-ahead helpers).
        let cache = Cache::builder().disk(&cache_dir).build().unwrap();
        cold.push(gbps(BIG, cache_read(&cache, "big", &mut buf)));
        cold_ratio.push(cold[run] / raw);
        warm.push(gbps(BIG, cache_read(&cache, "big", &mut buf)));
        // An entry this process wrote: its blocks were hashed as they were written.
        let k = format!("fresh-{run}");
        put(&cache, &k, &data);
        fresh.push(gbps(BIG, cache_read(&cache, &k, &mut buf)));
        cache.remove(&k).unwrap();
        cache.run_pending_tasks();
    }
    let base = median(raw_r);
    rows.row(
        "disk read-back 256 MiB: raw page-cache read (baseline)",
        base,
        "GB/s",
        None,
    );
    let cold = median(cold);
    rows.row(
        "disk read-back: reloaded entry, first read (verifies)",
        cold,
        "GB/s",
        Some(cold / base),
    );
    rows.row(
        "disk read-back: reloaded entry, first read / raw read of the same run (median)",
        median(cold_ratio),
        "×",
        None,
    );
    let warm = median(warm);
    rows.row(
        "disk read-back: same entry, blocks already verified",
        warm,
        "GB/s",
        Some(warm / base),
    );
    let fresh = median(fresh);
    rows.row(
        "disk read-back: entry written by this process, first read after finish",
        fresh,
        "GB/s",
        Some(fresh / base),
    );
}

fn late_joiner(rows: &mut Table) {
    const TOTAL: usize = 64 << 20;
    const PIECE: usize = 1 << 20;
    let piece = vec![7u8; PIECE];
    let mut fractions = Vec::new();
    let mut ttfb = Vec::new();
    for run in 0..runs(7) {
        let cache = Arc::new(Cache::builder().memory().build().unwrap());
        let k = format!("late-{run}");
        let Entry::Miss(mut w) = cache.get_or_create(&k).unwrap() else {
            panic!()
        };
        let piece = piece.clone();
        let start = Instant::now();
        let producer = std::thread::spawn(move || {
            // 64 pieces over ~400 ms.
            for i in 0..TOTAL / PIECE {
                let due = Duration::from_micros(6_250 * i as u64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                w.write_all(&piece).unwrap();
                w.flush().unwrap();
            }
            w.finish().unwrap();
            start.elapsed()
        });
        std::thread::sleep(Duration::from_millis(20));
        let asked = Instant::now();
        let Entry::Hit(mut r) = cache.get_or_create(&k).unwrap() else {
            panic!()
        };
        let mut one = [0u8; 1];
        r.read_exact(&mut one).unwrap();
        let first = asked.elapsed();
        let production = producer.join().unwrap();
        ttfb.push(first.as_secs_f64() * 1e6);
        fractions.push(first.as_secs_f64() / production.as_secs_f64() * 100.0);
    }
    rows.row("late joiner: time to first byte", median(ttfb), "µs", None);
    rows.row(
        "late joiner: first byte / production time (%)",
        median(fractions),
        "%",
        None,
    );
}

/// Keys of the memory-front section, 4 KiB each, plus one hot entry of 1 MiB.
const FRONT_KEYS: usize = 1000;
const FRONT_SMALL: usize = 4 << 10;
const FRONT_HOT: usize = 1 << 20;
/// The memory front of the section: room for every entry (each up to 2 MiB is promoted).
const FRONT_BYTES: u64 = 16 << 20;

/// Reads `r` to its end through `read_chunk(64 KiB)` (zero-copy pieces when the blob offers
/// them); returns the length.
fn drain_chunks(r: &mut Reader) -> usize {
    let mut n = 0;
    loop {
        let piece = r.read_chunk(CHUNK).unwrap();
        if piece.is_empty() {
            return n;
        }
        n += black_box(piece).len();
    }
}

/// Reads `r` to its end through `buf`; checks the length is `len`.
fn drain_len(mut r: impl Read, buf: &mut [u8], len: usize) {
    let mut total = 0;
    loop {
        let n = r.read(buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    black_box(&buf[..8]);
    assert_eq!(total, len);
}

/// Whether a hit on `k` is served from the memory front: two readers held at once get the
/// same zero-copy piece only from the front's one buffer (a disk blob is copied per reader).
fn from_memory(cache: &Cache, k: &str) -> bool {
    let mut a = cache.get(k).unwrap().expect("present");
    let mut b = cache.get(k).unwrap().expect("present");
    a.read_chunk(CHUNK).unwrap().as_ptr() == b.read_chunk(CHUNK).unwrap().as_ptr()
}

/// Hits every key of the front section in order, again and again, until each is served from
/// memory in one pass (with few idle handles, each hit of a pass reopens the entry, so a
/// promoted one comes from memory).
fn warm_front(cache: &Cache) {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let mut all = from_memory(cache, "hot");
        for i in 0..FRONT_KEYS {
            all &= from_memory(cache, &key(i));
        }
        if all {
            return;
        }
        assert!(Instant::now() < until, "memory front not warm after 60 s");
    }
}

/// Median nanoseconds per call of `op(i)`, `n` calls per run, `disk` and `front` taking turns
/// within each run.
fn ns_per_op_pair(
    n: usize,
    mut disk: impl FnMut(usize),
    mut front: impl FnMut(usize),
) -> (f64, f64) {
    let (mut d, mut f) = (Vec::new(), Vec::new());
    for _ in 0..runs(5) {
        for (op, out) in [
            (&mut disk as &mut dyn FnMut(usize), &mut d),
            (&mut front, &mut f),
        ] {
            let t = Instant::now();
            for i in 0..n {
                op(i);
            }
            out.push(t.elapsed().as_nanos() as f64 / n as f64);
        }
    }
    (median(d), median(f))
}

/// Hits of 4 KiB entries among `FRONT_KEYS`, visited with a stride (so that with few idle
/// handles every hit reopens its entry): `get` + read to the end via `read_chunk`.
fn front_hits(rows: &mut Table, label: &str, disk: &Cache, front: &Cache) {
    let keys: Vec<String> = (0..FRONT_KEYS).map(key).collect();
    let hit = |cache: &Cache, i: usize| {
        let k = &keys[(i * 7) % FRONT_KEYS];
        let mut r = cache.get(k).unwrap().expect("present");
        assert_eq!(drain_chunks(&mut r), FRONT_SMALL);
    };
    let (d, f) = ns_per_op_pair(20_000, |i| hit(disk, i), |i| hit(front, i));
    rows.row(&format!("{label}: disk (baseline)"), d, "ns/op", None);
    rows.row(
        &format!("{label}: disk + memory_front"),
        f,
        "ns/op",
        Some(f / d),
    );
}

fn memory_front(rows: &mut Table) {
    let small: Vec<Vec<u8>> = (0..FRONT_KEYS)
        .map(|i| (0..FRONT_SMALL).map(|j| (i * 31 + j) as u8).collect())
        .collect();
    let hot: Vec<u8> = (0..FRONT_HOT).map(|j| (j % 251) as u8).collect();
    let (disk_dir, front_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&disk_dir, &front_dir] {
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        for (i, data) in small.iter().enumerate() {
            put(&cache, &key(i), data);
        }
        put(&cache, "hot", &hot);
    }
    let open = |dir: &tempfile::TempDir, front: bool, idle: usize| {
        let b = Cache::builder().disk(dir.path()).max_idle_handles(idle);
        let b = if front {
            b.memory_front(FRONT_BYTES)
        } else {
            b
        };
        b.build().unwrap()
    };

    // (a) 16 idle handles for 1 000 hot keys: most disk hits reopen a file.
    let disk = open(&disk_dir, false, 16);
    let front = open(&front_dir, true, 16);
    for i in 0..FRONT_KEYS {
        drop(disk.get(&key(i)).unwrap());
    }
    warm_front(&front);
    front_hits(
        rows,
        "front: hit 4 KiB of 1000 keys, 16 idle handles",
        &disk,
        &front,
    );

    // (c) One hot 1 MiB entry read again and again (its handle stays open between reads: in
    // the front's cache that handle was opened from memory by the warm-up).
    assert!(from_memory(&front, "hot"));
    let read_hot = |cache: &Cache| {
        let mut r = cache.get("hot").unwrap().expect("present");
        assert_eq!(drain_chunks(&mut r), FRONT_HOT);
    };
    let (d, f) = ns_per_op_pair(1_000, |_| read_hot(&disk), |_| read_hot(&front));
    let (d, f) = (FRONT_HOT as f64 / d, FRONT_HOT as f64 / f);
    rows.row(
        "front: hot 1 MiB entry, read_chunk(64 KiB): disk (baseline)",
        d,
        "GB/s",
        None,
    );
    rows.row(
        "front: hot 1 MiB entry, read_chunk(64 KiB): disk + memory_front",
        f,
        "GB/s",
        Some(f / d),
    );
    // The same, copying: `io::Read` into a 64 KiB buffer (touches every byte, unlike the
    // zero-copy pieces above, whose figure is not a throughput).
    let mut buf = vec![0u8; CHUNK];
    let mut copy_hot = |cache: &Cache| {
        let r = cache.get("hot").unwrap().expect("present");
        drain_len(r, &mut buf, FRONT_HOT);
    };
    let (mut d, mut f) = (Vec::new(), Vec::new());
    for _ in 0..runs(5) {
        for (cache, out) in [(&disk, &mut d), (&front, &mut f)] {
            let t = Instant::now();
            for _ in 0..1_000 {
                copy_hot(cache);
            }
            out.push(gbps(FRONT_HOT * 1_000, t.elapsed()));
        }
    }
    let (d, f) = (median(d), median(f));
    rows.row(
        "front: hot 1 MiB entry, io::Read 64 KiB buffer: disk (baseline)",
        d,
        "GB/s",
        None,
    );
    rows.row(
        "front: hot 1 MiB entry, io::Read 64 KiB buffer: disk + memory_front",
        f,
        "GB/s",
        Some(f / d),
    );
    drop((disk, front));

    // (b) 2 000 idle handles: every entry keeps its open file after its first hit, so the
    // cache serves hits from the open handle and never asks the storage (nor its front).
    let disk = open(&disk_dir, false, 2000);
    let front = open(&front_dir, true, 2000);
    for cache in [&disk, &front] {
        for _ in 0..2 {
            for i in 0..FRONT_KEYS {
                drop(cache.get(&key(i)).unwrap());
            }
        }
    }
    front_hits(
        rows,
        "front: hit 4 KiB of 1000 keys, 2000 idle handles",
        &disk,
        &front,
    );
}

fn main() {
    if !support::benchmarking() {
        return;
    }
    support::run_sections(&[
        ("hit", hit_path),
        ("disk", disk_throughput),
        ("late", late_joiner),
        ("front", memory_front),
    ]);
}
