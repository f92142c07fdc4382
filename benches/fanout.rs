//! Fan-out throughput: one writer, N concurrent readers, memory and disk storage.
//!
//! Cases (all over one 256 MiB stream written in 64 KiB chunks):
//!
//! * **live**: N reader threads (each reading through a 64 KiB buffer with `io::Read`) are
//!   started and parked on a `Barrier` before the writer; the clock runs from the barrier until
//!   the writer has finished and every reader has reached end of file.
//! * **replay**: N reader threads read a finished stream (opened once through
//!   `Stream::open`, i.e. the storage's committed-blob path, and read once before timing so
//!   the disk storage's per-block blake3 verification is done and the file is in the page
//!   cache).
//! * **replay zero-copy** (memory, N = 1): as replay, through `Reader::read_chunk`.
//! * **baselines**, measured in the same run: memory — a single-thread copy of the same
//!   256 MiB through a 64 KiB buffer; disk — a single-thread read of a page-cached 256 MiB
//!   file through a 64 KiB buffer.
//!
//! Throughput is the aggregate N × 256 MiB over wall time. Every reader checks the length it
//! read and samples bytes of every read (each 64 KiB chunk of the stream carries its index in
//! its first 8 bytes, the rest is a fixed pseudo-random pattern), so a broken stream fails the
//! benchmark instead of being measured.
//!
//! Two modes:
//!
//! * `cargo bench --bench fanout` — criterion (`Throughput::Bytes`, so it reports GiB/s).
//! * `FANOUT_TABLE=1 cargo bench --bench fanout` — no criterion: every case runs once to warm
//!   up, then 5 times; prints a Markdown table of the median aggregate GB/s (10⁹ bytes/s) and
//!   its ratio to the case's baseline, followed by the targets of the issue. Knobs for
//!   profiling: `FANOUT_FILTER=<substring>` keeps only the cases whose label contains it (plus
//!   the baselines), `FANOUT_RUNS=<n>` changes the number of timed runs.

use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput};
use streamcache::storage::{DiskStorage, MemoryStorage, Storage};
use streamcache::{Stream, Writer};
use tempfile::TempDir;

#[path = "support/mod.rs"]
mod support;

use support::{gbps, median};

/// Size of the stream.
const TOTAL: u64 = 256 << 20;
/// Writer chunk and reader buffer size.
const CHUNK: usize = 64 << 10;
/// Reader counts.
const READERS: [usize; 3] = [1, 8, 32];
/// Runs per case in table mode.
const TABLE_RUNS: usize = 5;

// ---------------------------------------------------------------------------------------------
// Content and verification
// ---------------------------------------------------------------------------------------------

/// The pattern byte at position `j` of a 64 KiB chunk (bytes 8.. of every chunk).
fn pattern(j: usize) -> u8 {
    ((j as u32).wrapping_mul(0x9E37_79B1) >> 24) as u8
}

/// The byte of the stream at offset `off`: the chunk index (little endian) in the first 8
/// bytes of each 64 KiB chunk, the pattern elsewhere.
fn expected(off: u64) -> u8 {
    let j = (off % CHUNK as u64) as usize;
    if j < 8 {
        (off / CHUNK as u64).to_le_bytes()[j]
    } else {
        pattern(j)
    }
}

/// A 64 KiB chunk holding the pattern (stamp it with [`stamp`] before writing).
fn pattern_chunk() -> Vec<u8> {
    (0..CHUNK).map(pattern).collect()
}

/// Writes chunk index `k` into the first 8 bytes of `chunk`.
fn stamp(chunk: &mut [u8], k: u64) {
    chunk[..8].copy_from_slice(&k.to_le_bytes());
}

/// The whole stream's content as one buffer (for the copy baseline and the disk file).
fn full_content() -> Vec<u8> {
    let mut chunk = pattern_chunk();
    let mut all = Vec::with_capacity(TOTAL as usize);
    for k in 0..TOTAL / CHUNK as u64 {
        stamp(&mut chunk, k);
        all.extend_from_slice(&chunk);
    }
    all
}

/// Cheap running check of what a reader receives: every chunk stamp inside a read, plus the
/// first, middle and last byte of every read, plus the total length at the end.
struct Verifier {
    pos: u64,
}

impl Verifier {
    fn new() -> Self {
        Verifier { pos: 0 }
    }

    fn check(&mut self, data: &[u8]) {
        let n = data.len() as u64;
        let end = self.pos + n;
        assert!(end <= TOTAL, "read past the end: {end} > {TOTAL}");
        for i in [0, n / 2, n - 1] {
            let off = self.pos + i;
            assert_eq!(
                data[i as usize],
                expected(off),
                "wrong byte at offset {off}"
            );
        }
        let mut chunk_start = self.pos.next_multiple_of(CHUNK as u64);
        while chunk_start + 8 <= end {
            let at = (chunk_start - self.pos) as usize;
            let k = chunk_start / CHUNK as u64;
            assert_eq!(
                data[at..at + 8],
                k.to_le_bytes(),
                "wrong chunk stamp at offset {chunk_start}"
            );
            chunk_start += CHUNK as u64;
        }
        self.pos = end;
    }

    fn finish(self) {
        assert_eq!(self.pos, TOTAL, "stream ended early");
    }
}

/// Reads `r` to the end through `buf`, verifying as it goes.
fn drain(mut r: impl Read, buf: &mut [u8]) {
    let mut v = Verifier::new();
    loop {
        let n = r.read(buf).expect("read");
        if n == 0 {
            break;
        }
        v.check(black_box(&buf[..n]));
    }
    v.finish();
}

/// Reads a stream to the end through `read_chunk` (no copy), verifying as it goes.
fn drain_chunks(mut r: streamcache::Reader) {
    let mut v = Verifier::new();
    loop {
        let chunk = r.read_chunk(CHUNK).expect("read_chunk");
        if chunk.is_empty() {
            break;
        }
        v.check(black_box(&chunk));
    }
    v.finish();
}

// ---------------------------------------------------------------------------------------------
// Cases
// ---------------------------------------------------------------------------------------------

/// How reader threads read.
#[derive(Clone, Copy)]
enum Mode {
    /// `io::Read` into a 64 KiB buffer.
    Copy,
    /// `Reader::read_chunk` (zero-copy with memory storage).
    ZeroCopy,
}

/// Spawns one thread per reader, each parked on `barrier` (which needs one more party: the
/// caller) before reading its reader to the end. Each thread returns when it left the barrier
/// and when it reached the end.
fn spawn_readers(
    readers: Vec<streamcache::Reader>,
    barrier: &Arc<Barrier>,
    mode: Mode,
) -> Vec<thread::JoinHandle<(Instant, Instant)>> {
    readers
        .into_iter()
        .map(|r| {
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                barrier.wait();
                let start = Instant::now();
                match mode {
                    Mode::Copy => drain(r, &mut buf),
                    Mode::ZeroCopy => drain_chunks(r),
                }
                (start, Instant::now())
            })
        })
        .collect()
}

/// Joins the readers and returns the wall time from the first thread (the caller, which left
/// the barrier at `start`, or a reader) leaving the barrier to the last reader reaching the end.
///
/// Timing from the earliest departure rather than from the caller's own: with more threads
/// than cores the caller may be descheduled right after the barrier while readers run.
fn join_all(handles: Vec<thread::JoinHandle<(Instant, Instant)>>, start: Instant) -> Duration {
    let mut first = start;
    let mut last = start;
    for h in handles {
        match h.join() {
            Ok((s, e)) => {
                first = first.min(s);
                last = last.max(e);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    last - first
}

/// Writes the whole stream to `w` in 64 KiB chunks and finishes it.
fn write_stream(mut w: Writer, chunk: &mut [u8]) {
    for k in 0..TOTAL / CHUNK as u64 {
        stamp(chunk, k);
        w.write_all(chunk).expect("write");
    }
    w.finish().expect("finish");
}

/// One live run: `n` readers read while one writer writes; the stream is removed afterwards
/// (outside the timing).
fn run_live(storage: &Arc<dyn Storage>, n: usize) -> Duration {
    const NAME: &str = "live";
    let w = Writer::create(storage.clone(), NAME).expect("create");
    let readers = (0..n).map(|_| w.reader().expect("reader")).collect();
    let barrier = Arc::new(Barrier::new(n + 1));
    let handles = spawn_readers(readers, &barrier, Mode::Copy);
    let mut chunk = pattern_chunk();
    barrier.wait();
    let start = Instant::now();
    write_stream(w, &mut chunk);
    let elapsed = join_all(handles, start);
    storage.remove(NAME).expect("remove live stream");
    elapsed
}

/// One replay run: `n` readers read the finished `stream`.
fn run_replay(stream: &Stream, n: usize, mode: Mode) -> Duration {
    let readers = (0..n).map(|_| stream.reader().expect("reader")).collect();
    let barrier = Arc::new(Barrier::new(n + 1));
    let handles = spawn_readers(readers, &barrier, mode);
    barrier.wait();
    let start = Instant::now();
    join_all(handles, start)
}

/// Writes the finished stream `name` to `storage`, opens it as a cache hit would, and reads it
/// once (verifying disk blocks and warming the page cache).
fn prepare_replay(storage: &Arc<dyn Storage>, name: &str) -> Stream {
    let w = Writer::create(storage.clone(), name).expect("create");
    write_stream(w, &mut pattern_chunk());
    let stream = Stream::open(storage.clone(), name).expect("open finished stream");
    drain(stream.reader().expect("reader"), &mut vec![0u8; CHUNK]);
    stream
}

/// Memory baseline: single-thread copy of the 256 MiB through a 64 KiB buffer.
fn run_copy(content: &[u8]) -> Duration {
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    drain(content, &mut buf);
    start.elapsed()
}

/// Disk baseline: single-thread read of the page-cached file through a 64 KiB buffer.
fn run_file_read(path: &Path) -> Duration {
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    drain(File::open(path).expect("open baseline file"), &mut buf);
    start.elapsed()
}

/// Everything the cases need, built once.
struct Fixture {
    content: Vec<u8>,
    memory: Arc<dyn Storage>,
    memory_replay: Stream,
    disk: Arc<dyn Storage>,
    disk_replay: Stream,
    baseline_file: std::path::PathBuf,
    _dir: TempDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("streamcache-fanout-")
            .tempdir_in("/tmp")
            .expect("tempdir in /tmp");
        let content = full_content();
        let baseline_file = dir.path().join("baseline.bin");
        std::fs::write(&baseline_file, &content).expect("write baseline file");
        drain(
            File::open(&baseline_file).expect("open"),
            &mut vec![0u8; CHUNK],
        );
        let memory: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let memory_replay = prepare_replay(&memory, "replay");
        let disk: Arc<dyn Storage> =
            Arc::new(DiskStorage::open(dir.path().join("store")).expect("disk storage"));
        let disk_replay = prepare_replay(&disk, "replay");
        Fixture {
            content,
            memory,
            memory_replay,
            disk,
            disk_replay,
            baseline_file,
            _dir: dir,
        }
    }
}

/// Which baseline a case is compared with.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Memory,
    Disk,
}

/// One benchmark case.
struct Case {
    kind: Kind,
    /// Criterion id inside the group named after `kind`.
    id: String,
    /// Row label in table mode.
    label: String,
    readers: usize,
    baseline: bool,
    run: Box<dyn Fn(&Fixture) -> Duration>,
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for kind in [Kind::Memory, Kind::Disk] {
        let (group, base_id, base_label) = match kind {
            Kind::Memory => (
                "memory",
                "copy_baseline",
                "memory baseline: copy 64 KiB buffer",
            ),
            Kind::Disk => (
                "disk",
                "page_cache_read_baseline",
                "disk baseline: page-cache file read, 64 KiB buffer",
            ),
        };
        cases.push(Case {
            kind,
            id: base_id.into(),
            label: base_label.into(),
            readers: 1,
            baseline: true,
            run: Box::new(move |f: &Fixture| match kind {
                Kind::Memory => run_copy(&f.content),
                Kind::Disk => run_file_read(&f.baseline_file),
            }),
        });
        for (what, replay) in [("live", false), ("replay", true)] {
            for n in READERS {
                cases.push(Case {
                    kind,
                    id: format!("{what}/{n}"),
                    label: format!("{group} {what} N={n}"),
                    readers: n,
                    baseline: false,
                    run: Box::new(move |f: &Fixture| match (kind, replay) {
                        (Kind::Memory, false) => run_live(&f.memory, n),
                        (Kind::Disk, false) => run_live(&f.disk, n),
                        (Kind::Memory, true) => run_replay(&f.memory_replay, n, Mode::Copy),
                        (Kind::Disk, true) => run_replay(&f.disk_replay, n, Mode::Copy),
                    }),
                });
            }
        }
        if kind == Kind::Memory {
            cases.push(Case {
                kind,
                id: "replay_zero_copy/1".into(),
                label: "memory replay N=1, zero-copy read_chunk".into(),
                readers: 1,
                baseline: false,
                run: Box::new(|f: &Fixture| run_replay(&f.memory_replay, 1, Mode::ZeroCopy)),
            });
        }
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// Criterion mode
// ---------------------------------------------------------------------------------------------

fn criterion_mode() {
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let fixture = Fixture::new();
    for kind in [Kind::Memory, Kind::Disk] {
        let name = match kind {
            Kind::Memory => "memory",
            Kind::Disk => "disk",
        };
        let mut group = c.benchmark_group(name);
        // Iterations take 10 ms to 1 s: flat sampling (same iteration count in every sample).
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .sampling_mode(SamplingMode::Flat);
        for case in cases().into_iter().filter(|c| c.kind == kind) {
            // Time for ten samples of the longest cases (about 30 ms per reader per run).
            group.measurement_time(Duration::from_millis(2000 + 300 * case.readers as u64));
            group.throughput(Throughput::Bytes(case.readers as u64 * TOTAL));
            group.bench_function(&case.id, |b| {
                b.iter_custom(|iters| (0..iters).map(|_| (case.run)(&fixture)).sum());
            });
        }
        group.finish();
    }
    c.final_summary();
}

// ---------------------------------------------------------------------------------------------
// Table mode
// ---------------------------------------------------------------------------------------------

/// The 1-minute load average (other work on the machine skews multi-reader figures).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

fn table_mode() {
    let load_before = load_average();
    eprintln!("fanout: preparing fixtures (256 MiB in memory, on disk under /tmp)…");
    let fixture = Fixture::new();
    // FANOUT_FILTER=<substring>: only the cases whose label contains it (and the baselines).
    let filter = std::env::var("FANOUT_FILTER").unwrap_or_default();
    // FANOUT_RUNS=<n>: timed runs per case (default 5), e.g. for profiling.
    let runs = std::env::var("FANOUT_RUNS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(TABLE_RUNS);
    let mut rows: Vec<(Case, f64)> = Vec::new();
    for case in cases()
        .into_iter()
        .filter(|c| c.baseline || c.label.contains(&filter))
    {
        (case.run)(&fixture); // warm-up, untimed
        let rates: Vec<f64> = (0..runs)
            .map(|_| {
                let t = (case.run)(&fixture);
                gbps(case.readers * TOTAL as usize, t)
            })
            .collect();
        eprintln!(
            "fanout: {:<52} runs GB/s: {}",
            case.label,
            rates
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let m = median(rates);
        rows.push((case, m));
    }
    let baseline = |kind: Kind| {
        rows.iter()
            .find(|(c, _)| c.kind == kind && c.baseline)
            .map(|(_, m)| *m)
            .expect("baseline row")
    };
    let (mem_base, disk_base) = (baseline(Kind::Memory), baseline(Kind::Disk));
    let ratio = |kind: Kind, gbs: f64| match kind {
        Kind::Memory => gbs / mem_base,
        Kind::Disk => gbs / disk_base,
    };
    println!();
    println!(
        "Stream of 256 MiB written in 64 KiB chunks; readers use 64 KiB buffers; \
         median of {runs} runs; {} CPUs; load average before {load_before}, after {}.",
        thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    println!();
    println!("| case | aggregate GB/s (median) | ratio to its baseline |");
    println!("| --- | ---: | ---: |");
    for (case, m) in &rows {
        let r = if case.baseline {
            "1.00 (baseline)".to_string()
        } else {
            format!("{:.2}", ratio(case.kind, *m))
        };
        println!("| {} | {m:.2} | {r} |", case.label);
    }
    let find = |label: &str| {
        rows.iter()
            .find(|(c, _)| c.label == label)
            .map(|(c, m)| ratio(c.kind, *m))
    };
    println!();
    println!("Targets:");
    for (label, target) in [
        ("memory live N=8", 1.5),
        ("disk live N=8", 1.2),
        ("memory replay N=1", 0.8),
    ] {
        if let Some(got) = find(label) {
            let verdict = if got >= target { "met" } else { "MISSED" };
            println!("- {label}: {got:.2}× baseline (target ≥ {target}×): {verdict}");
        }
    }
    if let (Some(zc), Some(rd)) = (
        find("memory replay N=1, zero-copy read_chunk"),
        find("memory replay N=1"),
    ) {
        let verdict = if zc > rd { "met" } else { "MISSED" };
        println!(
            "- memory replay N=1 zero-copy: {zc:.2}× baseline \
             (should beat io::Read's {rd:.2}×): {verdict}"
        );
    }
}

fn main() {
    if std::env::var_os("FANOUT_TABLE").is_some_and(|v| v == "1") {
        table_mode();
    } else {
        criterion_mode();
    }
}
