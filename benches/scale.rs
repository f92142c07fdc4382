//! Scale benchmarks, each with a baseline measured in the same run:
//!
//! * `startup`: reopening a disk directory of N entries (64 B each) with the default
//!   `startup_wait`: time for `build()`, time to the first served request (a `get` of a random
//!   stored key, read to its end), time until `stats().loading` turns false, and the peak
//!   resident set during the load against the resident set after it; warm (metadata in the
//!   page cache) and, when `/proc/sys/vm/drop_caches` is writable (root), cold. Baselines: a
//!   raw `readdir` walk counting the files, and the raw system calls of a load (`readdir`,
//!   read each record, `lstat` each data file) on 2 threads. Three reopens: after a clean
//!   close (from the index hint), after a crash with the hint and a journal of changes in
//!   place (a child replaces `CHURN` entries, then aborts), and with no usable hint (the hint
//!   deleted: the directory is listed).
//! * `curve-memory` / `curve-disk`: for each N, index memory per entry (resident-set growth
//!   / N), hit latency p50/p99 (`get` + drop of random keys, each timed alone) and insert rate
//!   (`get_or_create` + write 64 B + `finish`, 2 threads), next to a
//!   `RwLock<HashMap<String, Arc<[u8]>>>` holding the same keys and values.
//!
//! Every measurement runs in a child process of this binary (the same executable, re-run
//! with `SCALE_CHILD` set), so its resident set and `VmHWM` are its own.
//!
//! `cargo bench --bench scale` prints a Markdown table; a filter argument such as
//! `-- startup` or `-- curve` runs only matching sections. `SCALE_SIZES=10000,100000`
//! overrides the entry counts (default: 100 000 and 1 000 000 for `startup`, 10 000,
//! 100 000 and 1 000 000 for the curves), `BENCH_RUNS=n` the repetitions (default 2),
//! `SCALE_COLD_MAX=n` the largest
//! N measured cold (default 100 000), `SCALE_SVG=path` writes the memory curve as an SVG chart. The disk directories for
//! `startup` are filled once and kept as `target/scale-fixture-N` (filling 1 M entries takes
//! minutes; a directory without its `.done` marker is filled again).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use streamcache::{Cache, Entry};

#[path = "support/mod.rs"]
mod support;

use support::{Table, median, runs};

const VALUE: [u8; 64] = [7u8; 64];
const THREADS: usize = 2;
/// Hit-latency samples per measurement.
const SAMPLES: usize = 100_000;

fn sizes(default: &[usize]) -> Vec<usize> {
    match std::env::var("SCALE_SIZES") {
        Ok(s) => s
            .split(',')
            .filter_map(|n| n.trim().replace('_', "").parse().ok())
            .collect(),
        Err(_) => default.to_vec(),
    }
}

fn label(n: usize) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1000 && n.is_multiple_of(1000) {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// Deterministic pseudo-random numbers (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as usize % n
    }
}

fn key(i: usize) -> String {
    format!("entry-{i:08}")
}

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn rss_and_peak() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

/// Runs `op(i)` for `i` in `0..n`, split over `THREADS` threads; returns operations per second.
fn parallel_rate(n: usize, op: impl Fn(usize) + Sync) -> f64 {
    let barrier = Barrier::new(THREADS);
    let next = AtomicUsize::new(0);
    let start = std::sync::Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            let (op, barrier, start, next) = (&op, &barrier, &start, &next);
            s.spawn(move || {
                if barrier.wait().is_leader() {
                    *start.lock().unwrap() = Some(Instant::now());
                }
                loop {
                    // Chunks of 256 keep the counter off the measured path.
                    let from = next.fetch_add(256, Ordering::Relaxed);
                    if from >= n {
                        break;
                    }
                    for i in from..(from + 256).min(n) {
                        op(i);
                    }
                }
            });
        }
    });
    let elapsed = start.lock().unwrap().expect("started").elapsed();
    n as f64 / elapsed.as_secs_f64()
}

fn insert(cache: &Cache, key: &str) {
    if let Entry::Miss(mut w) = cache.get_or_create(key).unwrap() {
        w.write_all(&VALUE).unwrap();
        w.finish().unwrap();
    }
}

/// p50 and p99 in ns of `op` over `SAMPLES` random indices below `n`, each timed alone.
fn latency(n: usize, mut op: impl FnMut(usize)) -> (f64, f64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ n as u64);
    let picks: Vec<usize> = (0..SAMPLES).map(|_| rng.below(n)).collect();
    // Warm-up: the first touches fault pages in.
    for &i in picks.iter().take(1000) {
        op(i);
    }
    let mut ns: Vec<f64> = picks
        .iter()
        .map(|&i| {
            let t = Instant::now();
            op(i);
            t.elapsed().as_nanos() as f64
        })
        .collect();
    ns.sort_by(f64::total_cmp);
    (ns[ns.len() / 2], ns[ns.len() * 99 / 100])
}

// ---------------------------------------------------------------------------------------
// Child processes: each prints `name=value` lines.

fn child(spec: &str) {
    let mut parts = spec.split(':');
    let (kind, n) = (parts.next().unwrap(), parts.next().unwrap());
    let n: usize = n.parse().unwrap();
    match kind {
        "startup" => startup_child(n),
        "hinted" => hinted_child(n),
        "crash-prep" => crash_prep_child(n),
        "journaled" => journaled_child(n),
        "readdir" => readdir_child(n),
        "rawload" => rawload_child(n),
        "memory" | "memory-handles" | "disk" => cache_curve_child(kind, n),
        "hashmap" => hashmap_curve_child(n),
        other => panic!("unknown child {other}"),
    }
}

/// One timed reopen of the fixture of `n` entries, printed as `name=value` lines: `build()`,
/// the first request (a random stored key read to its end), the complete index, and the RSS
/// growth (peak and after the load). Closes the cache cleanly (which leaves a hint).
fn timed_reopen(n: usize, seed: u64) {
    let dir = fixture_dir(n);
    let probe = key(Rng(seed | 1).below(n));
    let (before, _) = rss_and_peak();
    let t0 = Instant::now();
    let cache = Cache::builder().disk(&dir).build().unwrap();
    let build = t0.elapsed();
    let loading_at_build = cache.stats().loading;
    let t1 = Instant::now();
    let mut reader = cache.get(&probe).unwrap().expect("stored key served");
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    drop(reader);
    assert_eq!(bytes, VALUE);
    let first = t0.elapsed();
    let get = t1.elapsed();
    let mut polls = 0u64;
    while cache.stats().loading {
        std::thread::sleep(Duration::from_millis(1));
        polls += 1;
    }
    let complete = t0.elapsed();
    let loaded = cache.stats().loaded_entries;
    let (after, peak) = rss_and_peak();
    assert_eq!(cache.len(), n, "fixture {} is not intact", dir.display());
    drop(cache);
    println!("build_ms={}", build.as_secs_f64() * 1e3);
    println!("loading_at_build={}", u8::from(loading_at_build));
    println!("first_ms={}", first.as_secs_f64() * 1e3);
    println!("get_ms={}", get.as_secs_f64() * 1e3);
    println!("complete_s={}", complete.as_secs_f64());
    println!("loaded={loaded}");
    println!("polls={polls}");
    println!("base_mib={}", mib(before as f64));
    println!("peak_mib={}", mib(peak.saturating_sub(before) as f64));
    println!("final_mib={}", mib(after.saturating_sub(before) as f64));
}

/// A reopen after a clean close: the index is read from the hint the last close left (made
/// first, untimed, if the fixture has none).
fn hinted_child(n: usize) {
    if !fixture_dir(n).join("index-hint").exists() {
        drop(open_intact(n));
    }
    timed_reopen(n, 7 ^ n as u64);
}

/// The fixture of `n` entries, opened untimed with its whole index loaded, checked intact.
fn open_intact(n: usize) -> Cache {
    let dir = fixture_dir(n);
    let cache = Cache::builder()
        .disk(&dir)
        .startup_wait(Duration::MAX)
        .build()
        .unwrap();
    assert_eq!(cache.len(), n, "fixture {} is not intact", dir.display());
    cache
}

/// Entries replaced (removed, then written again) before the crash of `crash_prep_child`: their
/// removals and commits are what the next open replays from the journal.
const CHURN: usize = 10_000;

/// Untimed preparation of a crash with a journal: opens the fixture (from its hint), replaces
/// `CHURN` entries (each a removal and a commit the hint does not show, 2 × `CHURN` journal
/// records), waits for their deletions, and aborts: no clean close, no new hint.
fn crash_prep_child(n: usize) {
    let dir = fixture_dir(n);
    let cache = open_intact(n);
    for i in 0..CHURN.min(n) {
        cache.remove(&key(i)).unwrap();
        match cache.get_or_create(&key(i)).unwrap() {
            Entry::Miss(mut w) => {
                w.write_all(&VALUE).unwrap();
                w.finish().unwrap();
            }
            Entry::Hit(_) => panic!("{} was removed", key(i)),
        }
    }
    cache.run_pending_tasks();
    let journal = std::fs::metadata(dir.join("index-journal")).map_or(0, |m| m.len());
    println!("journal_mib={}", mib(journal as f64));
    std::process::abort();
}

/// A reopen after a crash with the hint and journal in place (see `crash_prep_child`).
fn journaled_child(n: usize) {
    timed_reopen(n, 11 ^ n as u64);
}

/// A reopen after a crash: no hint, so the directory is listed (the hint a clean close left
/// is deleted first).
fn startup_child(n: usize) {
    let dir = fixture_dir(n);
    let _ = std::fs::remove_file(dir.join("index-hint"));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    timed_reopen(n, seed);
    // Phases of build() once the metadata is cached: opening the storage alone, and build()
    // with no wait for the index (the loader is stopped by the drop; it takes the hint the
    // reopen above left).
    let t = Instant::now();
    drop(streamcache::storage::DiskStorage::open(&dir).unwrap());
    let storage_open = t.elapsed();
    let t = Instant::now();
    let cache = Cache::builder()
        .disk(&dir)
        .startup_wait(Duration::ZERO)
        .build()
        .unwrap();
    let zero_wait = t.elapsed();
    drop(cache);
    println!("storage_open_ms={}", storage_open.as_secs_f64() * 1e3);
    println!("zero_wait_build_ms={}", zero_wait.as_secs_f64() * 1e3);
}

/// Raw baseline: a `readdir` walk of the data directory counting files.
fn readdir_child(n: usize) {
    let data = fixture_dir(n).join("v1");
    let t = Instant::now();
    let mut files = 0usize;
    for shard in std::fs::read_dir(&data).unwrap() {
        let shard = shard.unwrap();
        if shard.file_type().unwrap().is_dir() {
            files += std::fs::read_dir(shard.path()).unwrap().count();
        }
    }
    let took = t.elapsed();
    assert_eq!(files, 2 * n, "two files per entry");
    println!("readdir_s={}", took.as_secs_f64());
}

/// Raw baseline of the system calls of a load, on `THREADS` threads: `readdir` each shard,
/// read each `.meta` record whole, `lstat` each data file. Phases are timed apart.
fn rawload_child(n: usize) {
    let data = fixture_dir(n).join("v1");
    let t = Instant::now();
    let shards: Vec<PathBuf> = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let next = AtomicUsize::new(0);
    let counted = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..THREADS {
            s.spawn(|| {
                while let Some(shard) = shards.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let names: Vec<_> = std::fs::read_dir(shard)
                        .unwrap()
                        .map(|e| e.unwrap().file_name())
                        .collect();
                    for name in names {
                        let name = name.to_str().unwrap();
                        if let Some(data) = name.strip_suffix(".meta") {
                            let record = std::fs::read(shard.join(name)).unwrap();
                            std::hint::black_box(record);
                            let md = std::fs::symlink_metadata(shard.join(data)).unwrap();
                            std::hint::black_box(md.len());
                            counted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        }
    });
    let took = t.elapsed();
    assert_eq!(counted.into_inner(), n);
    println!("rawload_s={}", took.as_secs_f64());
}

fn cache_curve_child(kind: &str, n: usize) {
    let keys: Vec<String> = (0..n).map(key).collect();
    let dir = tempfile::tempdir_in(target_dir()).unwrap();
    let (before, _) = rss_and_peak();
    let builder = Cache::builder();
    let cache = match kind {
        "disk" => builder.disk(dir.path()),
        // Every entry keeps its open stream: hits never reopen the blob.
        "memory-handles" => builder.memory().max_idle_handles(n),
        _ => builder.memory(),
    }
    .build()
    .unwrap();
    let rate = parallel_rate(n, |i| insert(&cache, &keys[i]));
    cache.run_pending_tasks();
    assert_eq!(cache.len(), n);
    let (after, _) = rss_and_peak();
    let (p50, p99) = latency(n, |i| {
        std::hint::black_box(cache.get(&keys[i]).unwrap().expect("hit"));
    });
    print_curve_point(n, after.saturating_sub(before), rate, p50, p99);
    drop(cache);
}

/// The figures of one curve child: memory per entry, insert rate, hit latencies.
fn print_curve_point(n: usize, grown: u64, rate: f64, p50: f64, p99: f64) {
    println!("bytes_per_entry={}", grown as f64 / n as f64);
    println!("insert_per_s={rate}");
    println!("p50_ns={p50}");
    println!("p99_ns={p99}");
}

fn hashmap_curve_child(n: usize) {
    let keys: Vec<String> = (0..n).map(key).collect();
    let (before, _) = rss_and_peak();
    let map: RwLock<HashMap<String, Arc<[u8]>>> = RwLock::new(HashMap::new());
    let rate = parallel_rate(n, |i| {
        map.write()
            .unwrap()
            .insert(keys[i].clone(), Arc::from(&VALUE[..]));
    });
    assert_eq!(map.read().unwrap().len(), n);
    let (after, _) = rss_and_peak();
    let (p50, p99) = latency(n, |i| {
        std::hint::black_box(map.read().unwrap().get(&keys[i]).cloned().expect("hit"));
    });
    // The cost of the timer itself, for reading the latencies.
    let (timer, _) = latency(n, |i| {
        std::hint::black_box(i);
    });
    print_curve_point(n, after.saturating_sub(before), rate, p50, p99);
    println!("timer_ns={timer}");
}

// ---------------------------------------------------------------------------------------
// Parent: spawns the children, gathers their figures.

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

fn fixture_dir(n: usize) -> PathBuf {
    target_dir().join(format!("scale-fixture-{n}"))
}

fn marker(n: usize) -> PathBuf {
    target_dir().join(format!("scale-fixture-{n}.done"))
}

/// The disk directory of `n` entries for `startup`, filled on 2 threads unless an intact one
/// (with its marker) is there. Returns how it was filled (`fill_s`, `disk_mib`).
fn fixture(n: usize) -> HashMap<String, f64> {
    if let Ok(done) = std::fs::read_to_string(marker(n)) {
        return parse(&done);
    }
    let dir = fixture_dir(n);
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("filling {} with {n} entries…", dir.display());
    let t = Instant::now();
    {
        let cache = Cache::builder().disk(&dir).build().unwrap();
        parallel_rate(n, |i| insert(&cache, &key(i)));
        assert_eq!(cache.len(), n);
    }
    let fill_s = t.elapsed().as_secs_f64();
    let du = Command::new("du").arg("-sk").arg(&dir).output().unwrap();
    let kib: f64 = String::from_utf8_lossy(&du.stdout)
        .split_whitespace()
        .next()
        .and_then(|k| k.parse().ok())
        .unwrap_or(0.0);
    let done = format!("fill_s={fill_s}\ndisk_mib={}\n", kib / 1024.0);
    std::fs::write(marker(n), &done).unwrap();
    eprintln!("filled in {fill_s:.1} s, {:.0} MiB on disk", kib / 1024.0);
    parse(&done)
}

fn parse(out: &str) -> HashMap<String, f64> {
    out.lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
        .collect()
}

/// Runs the crash preparation (`crash_prep_child`, which aborts); returns the journal size.
fn crash_prep(n: usize) -> f64 {
    let out = Command::new(std::env::current_exe().unwrap())
        .arg("--bench")
        .env("SCALE_CHILD", format!("crash-prep:{n}"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "the preparation was to abort");
    parse(&String::from_utf8_lossy(&out.stdout))
        .get("journal_mib")
        .copied()
        .expect("journal size printed before the abort")
}

fn run_child(spec: &str) -> HashMap<String, f64> {
    // `/proc/self/exe` still runs this binary if a rebuild replaced the file meanwhile.
    let exe = Path::new("/proc/self/exe");
    let exe = if exe.exists() {
        exe.to_path_buf()
    } else {
        std::env::current_exe().unwrap()
    };
    let out = Command::new(exe)
        .arg("--bench")
        .env("SCALE_CHILD", spec)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "child {spec} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Drops the page cache (dentries, inodes, pages): needs root. Whether it worked.
fn drop_page_cache() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Medians over `runs` children of `spec`, for every figure they print.
fn medians(spec: &str, runs: usize, cold: bool) -> HashMap<String, f64> {
    let mut all: HashMap<String, Vec<f64>> = HashMap::new();
    for _ in 0..runs {
        if cold {
            drop_page_cache();
        }
        for (k, v) in run_child(spec) {
            all.entry(k).or_default().push(v);
        }
    }
    all.into_iter().map(|(k, v)| (k, median(v))).collect()
}

fn startup(rows: &mut Table) {
    let cold_possible = drop_page_cache();
    if !cold_possible {
        eprintln!("cannot write /proc/sys/vm/drop_caches (not root?): warm figures only");
    }
    for n in sizes(&[100_000, 1_000_000]) {
        let fill = fixture(n);
        let l = label(n);
        rows.row(
            &format!("{l}: fixture (filled once, 2 threads), on disk"),
            fill["disk_mib"],
            "MiB",
            None,
        );
        // Cold loads of 1 M entries take minutes here: only up to `SCALE_COLD_MAX` entries.
        let cold_max: usize = std::env::var("SCALE_COLD_MAX")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100_000);
        let modes: &[bool] = if cold_possible && n <= cold_max {
            &[false, true]
        } else {
            &[false]
        };
        for &cold in modes {
            let temp = if cold {
                "cold (page cache dropped)"
            } else {
                "warm (page-cached metadata)"
            };
            let r = runs(2);
            // Warm: one untimed pass of the raw load brings the directories, inodes and
            // records into the page cache (a `readdir` walk alone reads no inode).
            if !cold {
                run_child(&format!("rawload:{n}"));
            }
            let readdir = medians(&format!("readdir:{n}"), r, cold)["readdir_s"];
            let raw = medians(&format!("rawload:{n}"), r, cold)["rawload_s"];
            let m = medians(&format!("startup:{n}"), r, cold);
            rows.row(
                &format!("{l} {temp}: raw readdir walk, count files (baseline)"),
                readdir,
                "s",
                None,
            );
            rows.row(
                &format!(
                    "{l} {temp}: raw load syscalls (readdir + read record + lstat, 2 threads)"
                ),
                raw,
                "s",
                Some(raw / readdir),
            );
            // After a clean close: from the hint (warm only: the hint is one file).
            if !cold {
                let h = medians(&format!("hinted:{n}"), r, false);
                let after = "after a clean close (index hint)";
                rows.row(&format!("{l} {after}: build()"), h["build_ms"], "ms", None);
                rows.row(
                    &format!("{l} {after}: first request served"),
                    h["first_ms"],
                    "ms",
                    None,
                );
                rows.row(
                    &format!("{l} {after}: index complete"),
                    h["complete_s"],
                    "s",
                    Some(h["complete_s"] / readdir),
                );
                rows.row(
                    &format!("{l} {after}: peak RSS growth during the load (VmHWM)"),
                    h["peak_mib"],
                    "MiB",
                    None,
                );
                rows.row(
                    &format!("{l} {after}: RSS growth after the load (index)"),
                    h["final_mib"],
                    "MiB",
                    Some(h["peak_mib"] / h["final_mib"]),
                );
            }
            // After a crash with the hint and a journal of changes in place (warm only).
            if !cold {
                let mut all: Samples = HashMap::new();
                let mut journal = Vec::new();
                for _ in 0..r {
                    journal.push(crash_prep(n));
                    for (k, v) in run_child(&format!("journaled:{n}")) {
                        all.entry(k).or_default().push(v);
                    }
                }
                let j: HashMap<String, f64> =
                    all.into_iter().map(|(k, v)| (k, median(v))).collect();
                let after = format!(
                    "after a crash ({CHURN} entries replaced since the hint: hint + journal)"
                );
                rows.row(
                    &format!("{l} {after}: journal replayed"),
                    median(journal),
                    "MiB",
                    None,
                );
                rows.row(&format!("{l} {after}: build()"), j["build_ms"], "ms", None);
                rows.row(
                    &format!("{l} {after}: first request served"),
                    j["first_ms"],
                    "ms",
                    None,
                );
                rows.row(
                    &format!("{l} {after}: index complete"),
                    j["complete_s"],
                    "s",
                    Some(j["complete_s"] / readdir),
                );
                rows.row(
                    &format!("{l} {after}: peak RSS growth during the load (VmHWM)"),
                    j["peak_mib"],
                    "MiB",
                    None,
                );
            }
            let temp = format!("{temp}, after a crash (no usable hint: listing)");
            rows.row(&format!("{l} {temp}: build()"), m["build_ms"], "ms", None);
            rows.row(
                &format!("{l} {temp}: … DiskStorage::open alone (after the load)"),
                m["storage_open_ms"],
                "ms",
                None,
            );
            rows.row(
                &format!("{l} {temp}: … build() with startup_wait(ZERO) (after the load)"),
                m["zero_wait_build_ms"],
                "ms",
                None,
            );
            rows.row(
                &format!("{l} {temp}: first request served (from build() start)"),
                m["first_ms"],
                "ms",
                None,
            );
            rows.row(
                &format!("{l} {temp}: … of which the get + read"),
                m["get_ms"],
                "ms",
                None,
            );
            rows.row(
                &format!("{l} {temp}: index complete (stats().loading false)"),
                m["complete_s"],
                "s",
                Some(m["complete_s"] / readdir),
            );
            rows.row(
                &format!("{l} {temp}: entries loaded"),
                m["loaded"],
                "entries",
                None,
            );
            rows.row(
                &format!("{l} {temp}: peak RSS growth during the load (VmHWM)"),
                m["peak_mib"],
                "MiB",
                None,
            );
            rows.row(
                &format!("{l} {temp}: RSS growth after the load (index)"),
                m["final_mib"],
                "MiB",
                Some(m["peak_mib"] / m["final_mib"]),
            );
        }
    }
}

/// Every figure of one kind of child, over the runs.
type Samples = HashMap<String, Vec<f64>>;

/// One row of the curve: N and the cache's and the baseline's figures.
struct Point {
    n: usize,
    ours: HashMap<String, f64>,
    base: HashMap<String, f64>,
}

fn curve(rows: &mut Table, kind: &str) -> Vec<Point> {
    let mut points = Vec::new();
    for n in sizes(&[10_000, 100_000, 1_000_000]) {
        let l = label(n);
        let r = runs(2);
        // The two take turns, so that both see the same load.
        let (mut ours, mut base, mut handles): (Samples, Samples, Samples) = Default::default();
        for _ in 0..r {
            for (k, v) in run_child(&format!("hashmap:{n}")) {
                base.entry(k).or_default().push(v);
            }
            for (k, v) in run_child(&format!("{kind}:{n}")) {
                ours.entry(k).or_default().push(v);
            }
            if kind == "memory" {
                for (k, v) in run_child(&format!("memory-handles:{n}")) {
                    handles.entry(k).or_default().push(v);
                }
            }
        }
        let med = |m: Samples| -> HashMap<String, f64> {
            m.into_iter().map(|(k, v)| (k, median(v))).collect()
        };
        let (ours, base, handles) = (med(ours), med(base), med(handles));
        let rows_of = [
            (
                "memory per entry (RSS growth / N)",
                "bytes_per_entry",
                "bytes",
            ),
            ("hit get+drop p50", "p50_ns", "ns"),
            ("hit get+drop p99", "p99_ns", "ns"),
        ];
        for (what, field, unit) in rows_of {
            rows.row(
                &format!("{l} {kind}: {what}: RwLock<HashMap> (baseline)"),
                base[field],
                unit,
                None,
            );
            rows.row(
                &format!("{l} {kind}: {what}: cache"),
                ours[field],
                unit,
                Some(ours[field] / base[field]),
            );
            if let Some(h) = handles.get(field) {
                rows.row(
                    &format!("{l} {kind}: {what}: cache, max_idle_handles(N)"),
                    *h,
                    unit,
                    Some(h / base[field]),
                );
            }
        }
        rows.row(
            &format!("{l} {kind}: insert 64 B, 2 threads: RwLock<HashMap> (baseline)"),
            base["insert_per_s"] / 1e6,
            "M ops/s",
            None,
        );
        rows.row(
            &format!("{l} {kind}: insert 64 B, 2 threads: get_or_create+write+finish"),
            ours["insert_per_s"] / 1e6,
            "M ops/s",
            Some(ours["insert_per_s"] / base["insert_per_s"]),
        );
        rows.row(
            &format!("{l}: timer overhead (Instant::now + elapsed, no work)"),
            base["timer_ns"],
            "ns",
            None,
        );
        points.push(Point { n, ours, base });
    }
    points
}

fn curve_memory(rows: &mut Table) {
    let points = curve(rows, "memory");
    if let Some(path) = std::env::var_os("SCALE_SVG") {
        std::fs::write(&path, svg(&points)).unwrap();
        eprintln!("wrote {}", Path::new(&path).display());
    }
}

fn curve_disk(rows: &mut Table) {
    curve(rows, "disk");
}

/// A chart panel: title, (field, series name) pairs, scale of the values.
type Panel<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Three small panels (memory per entry, hit p50/p99, insert rate), log-x over N, cache
/// against the baseline.
fn svg(points: &[Point]) -> String {
    const W: f64 = 300.0;
    const H: f64 = 220.0;
    const PAD_L: f64 = 58.0;
    const PAD_B: f64 = 36.0;
    const PAD_T: f64 = 30.0;
    let panels: [Panel<'_>; 3] = [
        ("memory per entry (bytes)", &[("bytes_per_entry", "")], 1.0),
        (
            "hit get+drop (ns)",
            &[("p50_ns", "p50"), ("p99_ns", "p99")],
            1.0,
        ),
        ("insert, 2 threads (M ops/s)", &[("insert_per_s", "")], 1e-6),
    ];
    let mut out = String::new();
    let total_w = W * 3.0 + 20.0;
    out += &format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{total_w}\" height=\"{}\" viewBox=\"0 0 {total_w} {}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>\n",
        H + 24.0,
        H + 24.0
    );
    let (lo, hi) = (
        (points.first().map_or(1, |p| p.n) as f64).log10(),
        (points.last().map_or(10, |p| p.n) as f64).log10(),
    );
    for (pi, (title, series, scale)) in panels.iter().enumerate() {
        let x0 = 10.0 + pi as f64 * W;
        let (pw, ph) = (W - PAD_L - 12.0, H - PAD_T - PAD_B);
        let mut ymax: f64 = 0.0;
        for p in points {
            for (field, _) in series.iter() {
                ymax = ymax.max(p.ours[*field] * scale).max(p.base[*field] * scale);
            }
        }
        let ymax = nice_ceiling(ymax * 1.1);
        let px = |n: usize| {
            let span = (hi - lo).max(1e-9);
            x0 + PAD_L + ((n as f64).log10() - lo) / span * pw
        };
        let py = |v: f64| PAD_T + ph - v / ymax * ph;
        out += &format!(
            "<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"13\">{title}</text>\n",
            x0 + PAD_L + pw / 2.0
        );
        for k in 0..=4 {
            let v = ymax * f64::from(k) / 4.0;
            let y = py(v);
            out += &format!(
                "<line x1=\"{}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#000\" stroke-opacity=\"0.1\"/>\n<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
                x0 + PAD_L,
                x0 + PAD_L + pw,
                x0 + PAD_L - 4.0,
                y + 4.0,
                fmt_tick(v)
            );
        }
        for p in points {
            let x = px(p.n);
            out += &format!(
                "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"#000\" stroke-opacity=\"0.1\"/>\n<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
                PAD_T,
                PAD_T + ph,
                PAD_T + ph + 14.0,
                label(p.n)
            );
        }
        out += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">entries (log scale)</text>\n",
            x0 + PAD_L + pw / 2.0,
            PAD_T + ph + 30.0
        );
        for (si, (field, name)) in series.iter().enumerate() {
            let dash = if si == 0 {
                ""
            } else {
                " stroke-dasharray=\"5,3\""
            };
            for (who, color, data) in [("cache", "#1f77b4", true), ("HashMap", "#ff7f0e", false)] {
                let pts: Vec<String> = points
                    .iter()
                    .map(|p| {
                        let v = if data { p.ours[*field] } else { p.base[*field] } * scale;
                        format!("{:.1},{:.1}", px(p.n), py(v))
                    })
                    .collect();
                out += &format!(
                    "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"{dash}/>\n",
                    pts.join(" ")
                );
                for pt in &pts {
                    let (x, y) = pt.split_once(',').unwrap();
                    out += &format!("<circle cx=\"{x}\" cy=\"{y}\" r=\"3\" fill=\"{color}\"/>\n");
                }
                if pi == 0 || !name.is_empty() {
                    let last = pts.last().unwrap();
                    let (x, y) = last.split_once(',').unwrap();
                    let y: f64 = y.parse().unwrap();
                    let text = if name.is_empty() {
                        who.to_owned()
                    } else {
                        format!("{who} {name}")
                    };
                    out += &format!(
                        "<text x=\"{x}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"{color}\">{text}</text>\n",
                        y - 6.0
                    );
                }
            }
        }
    }
    out += "</svg>\n";
    out
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if step * mag >= v {
            return step * mag;
        }
    }
    10.0 * mag
}

fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn main() {
    if !support::benchmarking() {
        return;
    }
    if let Ok(spec) = std::env::var("SCALE_CHILD") {
        child(&spec);
        return;
    }
    support::run_sections(&[
        ("startup", startup),
        ("curve-memory", curve_memory),
        ("curve-disk", curve_disk),
    ]);
}
