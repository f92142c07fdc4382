//! Eviction benchmarks, each with a figure measured in the same run:
//!
//! * insert-and-finish of 64-byte entries with `max_entries(10_000)` from 2 threads, against
//!   moka's `insert` with `max_capacity(10_000)` (the ratio: median of per-run ratios);
//! * index memory per entry at 1 million tiny entries (memory storage), from the process's
//!   resident set size;
//! * reload time of 100 000 entries from disk.
//!
//! `cargo bench --bench eviction` prints a Markdown table (`BENCH_RUNS=n`, default 5;
//! a filter argument such as `-- reload` runs only matching sections).

use std::hint::black_box;
use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::Instant;

use streamcache::{Cache, Entry};

#[path = "support/mod.rs"]
mod support;

use support::{Table, median, runs};

const OPS_PER_THREAD: usize = 200_000;
const THREADS: usize = 2;

/// Runs `op(thread, i)` on `THREADS` threads and returns operations per second.
fn ops_per_sec(op: impl Fn(usize, usize) + Sync) -> f64 {
    let barrier = Barrier::new(THREADS);
    let start = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let (op, barrier, start) = (&op, &barrier, &start);
            s.spawn(move || {
                if barrier.wait().is_leader() {
                    *start.lock().unwrap() = Some(Instant::now());
                }
                for i in 0..OPS_PER_THREAD {
                    op(t, i);
                }
            });
        }
    });
    let elapsed = start.lock().unwrap().expect("started").elapsed();
    (THREADS * OPS_PER_THREAD) as f64 / elapsed.as_secs_f64()
}

fn insert_throughput(rows: &mut Table) {
    let value = [7u8; 64];
    let mut moka_runs = Vec::new();
    let mut ours_runs = Vec::new();
    for _ in 0..runs(5) {
        let moka: moka::sync::Cache<String, Arc<[u8]>> = moka::sync::Cache::new(10_000);
        moka_runs.push(ops_per_sec(|t, i| {
            moka.insert(format!("key-{t}-{i}"), Arc::from(&value[..]));
        }));
        black_box(moka.entry_count());

        let cache = Cache::builder()
            .memory()
            .max_entries(10_000)
            .build()
            .unwrap();
        ours_runs.push(ops_per_sec(|t, i| {
            if let Entry::Miss(mut w) = cache.get_or_create(&format!("key-{t}-{i}")).unwrap() {
                w.write_all(&value).unwrap();
                w.finish().unwrap();
            }
        }));
        cache.run_pending_tasks();
        assert!(cache.len() <= 10_000, "limit restored: {}", cache.len());
    }
    // The ratio is the median of each run's ratio (moka and the cache timed in turn within a
    // run: the load of a shared machine varies between runs far more than within one).
    let ratio = median(
        ours_runs
            .iter()
            .zip(&moka_runs)
            .map(|(ours, moka)| ours / moka)
            .collect(),
    );
    let (base, ours) = (median(moka_runs), median(ours_runs));
    rows.row(
        "insert 64 B, 2 threads, 10k cap: moka sync insert (baseline)",
        base / 1e6,
        "M ops/s",
        None,
    );
    rows.row(
        "insert 64 B, 2 threads, 10k entries: get_or_create+write+finish",
        ours / 1e6,
        "M ops/s",
        Some(ratio),
    );
}

/// A single-threaded insert loop for instruction counts (`docs/benchmarks.md`, "Cache
/// insert, third pass"): `EVICTION_INSERT_DRIVER=<ours|moka>:<n>` inserts `n` keys into a
/// cache of 10 000 entries, under `valgrind --tool=callgrind`.
fn insert_driver(spec: &str) {
    let (which, n) = spec.split_once(':').expect("<ours|moka>:<n>");
    let n: usize = n.parse().expect("a number of inserts");
    let value = [7u8; 64];
    if which == "moka" {
        let moka: moka::sync::Cache<String, Arc<[u8]>> = moka::sync::Cache::new(10_000);
        for i in 0..n {
            moka.insert(format!("key-0-{i}"), Arc::from(&value[..]));
        }
        moka.run_pending_tasks();
    } else {
        let cache = Cache::builder()
            .memory()
            .max_entries(10_000)
            .build()
            .unwrap();
        for i in 0..n {
            if let Entry::Miss(mut w) = cache.get_or_create(&format!("key-0-{i}")).unwrap() {
                w.write_all(&value).unwrap();
                w.finish().unwrap();
            }
        }
        cache.run_pending_tasks();
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

const MEM_ENTRIES: usize = 1_000_000;

/// Child-process body: fills either a bare `MemoryStorage` or a cache with 1M tiny entries and
/// prints the resident-set growth per entry. (Separate processes, because freed memory is not
/// returned to the OS and would flatter whichever ran second.)
fn memory_child(mode: &str) {
    use streamcache::storage::{MemoryStorage, Storage};
    const VALUE: usize = 8;
    let keys: Vec<String> = (0..MEM_ENTRIES).map(|i| format!("k{i:07}")).collect();
    let before = rss_bytes();
    let keep: Box<dyn std::any::Any> = if mode == "storage" {
        // The same blobs, name lengths and record sizes stored without the cache.
        let storage = MemoryStorage::new();
        let meta = vec![0u8; 60]; // the cache's entry record for these keys
        for i in 0..MEM_ENTRIES {
            let mut w = storage.create(&format!("{i:032x}-{i:016x}")).unwrap();
            w.write(&[1; VALUE]).unwrap();
            w.commit(meta.clone()).unwrap();
        }
        Box::new(storage)
    } else {
        let cache = Cache::builder().memory().build().unwrap();
        for k in &keys {
            if let Entry::Miss(mut w) = cache.get_or_create(k).unwrap() {
                w.write_all(&[1; VALUE]).unwrap();
                w.finish().unwrap();
            }
        }
        cache.run_pending_tasks();
        assert_eq!(cache.len(), MEM_ENTRIES);
        Box::new(cache)
    };
    let per_entry = rss_bytes().saturating_sub(before) as f64 / MEM_ENTRIES as f64;
    println!("{per_entry}");
    drop(keep);
}

fn memory_per_entry(rows: &mut Table) {
    let measure = |mode: &str| -> f64 {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .arg("--bench")
            .env("EVICTION_MEMORY_CHILD", mode)
            .output()
            .unwrap();
        assert!(out.status.success(), "child failed: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    let storage_only = measure("storage");
    let with_cache = measure("cache");
    rows.row(
        "memory per entry at 1M tiny entries: storage alone (RSS)",
        storage_only,
        "bytes",
        None,
    );
    rows.row(
        "memory per entry at 1M tiny entries: cache total (RSS)",
        with_cache,
        "bytes",
        None,
    );
    rows.row(
        "… index overhead per entry (cache minus storage)",
        with_cache - storage_only,
        "bytes",
        None,
    );
}

fn reload(rows: &mut Table) {
    const N: usize = 100_000;
    let dir = tempfile::tempdir().unwrap();
    {
        let cache = Cache::builder().disk(dir.path()).build().unwrap();
        for i in 0..N {
            if let Entry::Miss(mut w) = cache.get_or_create(&format!("entry-{i}")).unwrap() {
                w.write_all(&(i as u64).to_le_bytes()).unwrap();
                w.finish().unwrap();
            }
        }
    }
    let times: Vec<f64> = (0..runs(5).min(3))
        .map(|_| {
            let t = Instant::now();
            let cache = Cache::builder().disk(dir.path()).build().unwrap();
            let took = t.elapsed().as_secs_f64();
            assert_eq!(cache.len(), N);
            took
        })
        .collect();
    rows.row(
        "reload 100k entries from disk (page-cached metadata)",
        median(times),
        "s",
        None,
    );
}

fn main() {
    if !support::benchmarking() {
        return;
    }
    if let Ok(mode) = std::env::var("EVICTION_MEMORY_CHILD") {
        memory_child(&mode);
        return;
    }
    if let Ok(n) = std::env::var("EVICTION_INSERT_DRIVER") {
        insert_driver(&n);
        return;
    }
    support::run_sections(&[
        ("insert", insert_throughput),
        ("memory", memory_per_entry),
        ("reload", reload),
    ]);
}
