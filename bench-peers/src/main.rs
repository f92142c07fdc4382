//! streamcache against moka, foyer and cacache: the same workloads, the same bytes and chunk
//! sizes, one machine, one run.
//!
//! `cargo run --release -p bench-peers` measures every workload (medians over a few runs),
//! rewrites the generated part of `docs/benchmarks.md` (between the `BEGIN GENERATED` and
//! `END GENERATED` markers; the hand-written analysis around it is kept) and writes the chart
//! `docs/benchmarks.svg`. `BENCH_RUNS=<n>` changes the number of timed runs (default 5; the
//! 256 MiB disk write and fan-out use at most 3). `BENCH_OUT=<dir>` writes the two files elsewhere;
//! `BENCH_ONLY=<late|herd|hit|disk|fanout>` runs one workload and writes no file.

use std::fmt::Write as _;
use std::fs::File;
use std::hint::black_box;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

// The crate's own benchmark helpers: run count, median, GB/s.
#[path = "../../benches/support/mod.rs"]
mod support;

use foyer::{BlockEngineConfig, DeviceBuilder, FsDeviceBuilder, HybridCache, HybridCacheBuilder};
use streamcache::{Cache, Entry};
use support::{gbps, median};

mod chart;

const MIB: usize = 1 << 20;
/// Write chunk and read buffer of the 256 MiB workloads (disk write, fan-out).
const CHUNK: usize = 64 << 10;
/// Read buffer of the read-back and late-joiner workloads.
const READ_BUF: usize = MIB;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn runs() -> usize {
    support::runs(5)
}

/// Runs of the workloads that move 256 MiB or more per run.
fn heavy_runs() -> usize {
    runs().min(3)
}

/// The byte at offset `i` of every payload (the same bytes for every system).
fn byte_at(i: usize) -> u8 {
    (i % 251) as u8
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(byte_at).collect()
}

/// Reads `r` to the end through `buf`, checking the first byte of every read and the length.
fn drain(mut r: impl Read, buf: &mut [u8], expect: usize) -> Result<()> {
    let mut pos = 0;
    loop {
        let n = r.read(buf)?;
        if n == 0 {
            break;
        }
        anyhow::ensure!(buf[0] == byte_at(pos), "wrong byte at {pos}");
        black_box(&buf[..n]);
        pos += n;
    }
    anyhow::ensure!(pos == expect, "read {pos} bytes, expected {expect}");
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into())
}

fn command_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn tokio_runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// A foyer hybrid cache with its disk tier in `dir` (block size large enough for 256 MiB).
fn foyer_cache(rt: &tokio::runtime::Runtime, dir: &Path) -> Result<HybridCache<String, Vec<u8>>> {
    rt.block_on(async {
        let device = FsDeviceBuilder::new(dir)
            .with_capacity(1 << 30)
            .build()
            .context("foyer device")?;
        HybridCacheBuilder::new()
            .with_name("bench")
            .with_flush_on_close(false)
            .memory(64)
            .storage()
            .with_engine_config(BlockEngineConfig::new(device).with_block_size(512 * MIB))
            .build()
            .await
            .context("foyer build")
    })
}

fn sc_memory() -> Result<Cache> {
    Ok(Cache::builder().memory().build()?)
}

fn sc_disk(dir: &Path) -> Result<Cache> {
    Ok(Cache::builder().disk(dir).build()?)
}

/// One measured figure.
#[derive(Debug, Clone)]
struct Row {
    workload: &'static str,
    system: String,
    value: f64,
    unit: &'static str,
    /// Ratio to the workload's baseline, and which baseline.
    ratio: Option<f64>,
    note: String,
}

fn row(workload: &'static str, system: &str, value: f64, unit: &'static str) -> Row {
    let r = Row {
        workload,
        system: system.to_owned(),
        value,
        unit,
        ratio: None,
        note: String::new(),
    };
    eprintln!("  {workload} | {system}: {value:.3} {unit}");
    r
}

// ---------------------------------------------------------------------------------------------
// Late joiner: 64 MiB produced over ~400 ms in 1 MiB pieces; a second requester at 20 ms
// ---------------------------------------------------------------------------------------------

const LATE_TOTAL: usize = 64 * MIB;
const LATE_PIECE: usize = MIB;
const LATE_STEP: Duration = Duration::from_micros(6_250);
const LATE_JOIN: Duration = Duration::from_millis(20);

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        thread::sleep(d);
    }
}

/// Produces the 64 MiB in 1 MiB pieces, piece `i` due at `start + i × 6.25 ms`.
/// `data` is made before `start`, so that making it is not part of the production schedule.
fn produce_paced(
    data: &[u8],
    start: Instant,
    mut put: impl FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    for (i, piece) in data.chunks(LATE_PIECE).enumerate() {
        sleep_until(start + LATE_STEP * i as u32);
        put(piece)?;
    }
    Ok(())
}

/// What the late joiner saw, from its request: first byte, last byte; and production time.
#[derive(Default)]
struct Late {
    first: Vec<f64>,
    last: Vec<f64>,
    production: Vec<f64>,
}

impl Late {
    fn push(&mut self, asked: Instant, first: Instant, last: Instant, production: Duration) {
        self.first.push((first - asked).as_secs_f64() * 1e3);
        self.last.push((last - asked).as_secs_f64() * 1e3);
        self.production.push(production.as_secs_f64() * 1e3);
    }

    fn rows(self, system: &str, out: &mut Vec<Row>) {
        let production = median(self.production);
        let first = median(self.first);
        let mut r = row("late joiner: time to first byte", system, first, "ms");
        r.ratio = Some(first / production);
        r.note = format!("production took {production:.0} ms");
        out.push(r);
        out.push(row(
            "late joiner: time to last byte",
            system,
            median(self.last),
            "ms",
        ));
    }
}

/// The joiner's side for systems that expose a `Read`: first byte, then the rest.
fn join_read(mut r: impl Read) -> Result<(Instant, Instant)> {
    let mut buf = vec![0u8; READ_BUF];
    let n = r.read(&mut buf[..1])?;
    anyhow::ensure!(n == 1 && buf[0] == byte_at(0), "bad first byte");
    let first = Instant::now();
    let mut pos = 1;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        anyhow::ensure!(buf[0] == byte_at(pos), "wrong byte at {pos}");
        pos += n;
    }
    anyhow::ensure!(pos == LATE_TOTAL, "late joiner read {pos} bytes");
    Ok((first, Instant::now()))
}

/// The joiner's side for whole-value caches: the value arrives whole; copy it out through the
/// same 1 MiB buffer.
fn join_value(v: &[u8]) -> Result<(Instant, Instant)> {
    anyhow::ensure!(v.first() == Some(&byte_at(0)), "bad first byte");
    let first = Instant::now();
    drain(v, &mut vec![0u8; READ_BUF], LATE_TOTAL)?;
    Ok((first, Instant::now()))
}

fn late_streamcache(cache: &Cache, run: usize) -> Result<(Instant, Instant, Instant, Duration)> {
    let key = format!("late-{run}");
    let Entry::Miss(mut w) = cache.get_or_create(&key)? else {
        anyhow::bail!("fresh key was a hit")
    };
    let data = payload(LATE_TOTAL);
    let start = Instant::now();
    let producer = thread::spawn(move || -> Result<Duration> {
        produce_paced(&data, start, |p| {
            w.write_all(p)?;
            w.flush()?;
            Ok(())
        })?;
        w.finish()?;
        Ok(start.elapsed())
    });
    sleep_until(start + LATE_JOIN);
    let asked = Instant::now();
    let Entry::Hit(r) = cache.get_or_create(&key)? else {
        anyhow::bail!("late joiner was a miss")
    };
    let (first, last) = join_read(r)?;
    let production = producer.join().expect("producer panicked")?;
    cache.remove(&key)?;
    Ok((asked, first, last, production))
}

fn late_joiner(rt: &tokio::runtime::Runtime, dir: &Path, out: &mut Vec<Row>) -> Result<()> {
    eprintln!("late joiner…");
    // streamcache, memory and disk.
    for (system, disk) in [("streamcache memory", false), ("streamcache disk", true)] {
        let cache = if disk {
            sc_disk(&dir.join("late-sc"))?
        } else {
            sc_memory()?
        };
        let mut late = Late::default();
        for run in 0..runs() {
            let (a, f, l, p) = late_streamcache(&cache, run)?;
            late.push(a, f, l, p);
            cache.run_pending_tasks();
        }
        late.rows(system, out);
    }

    // moka: `get_with` on both sides; the value is handed out when the init closure returns.
    {
        let cache: moka::sync::Cache<String, Arc<Vec<u8>>> = moka::sync::Cache::new(16);
        let mut late = Late::default();
        for run in 0..runs() {
            let key = format!("late-{run}");
            let data = payload(LATE_TOTAL);
            let start = Instant::now();
            let (c, k) = (cache.clone(), key.clone());
            let producer = thread::spawn(move || -> Result<Duration> {
                c.get_with(k, || {
                    let mut v = Vec::with_capacity(LATE_TOTAL);
                    produce_paced(&data, start, |p| {
                        v.extend_from_slice(p);
                        Ok(())
                    })
                    .expect("produce");
                    Arc::new(v)
                });
                Ok(start.elapsed())
            });
            sleep_until(start + LATE_JOIN);
            let asked = Instant::now();
            let v = cache.get_with(key.clone(), || panic!("the joiner must not produce"));
            let (first, last) = join_value(&v)?;
            let production = producer.join().expect("producer panicked")?;
            late.push(asked, first, last, production);
            cache.invalidate(&key);
        }
        late.rows("moka", out);
    }

    // foyer: `get_or_fetch` on both sides.
    {
        let cache = foyer_cache(rt, &dir.join("late-foyer"))?;
        let mut late = Late::default();
        for run in 0..runs() {
            let key = format!("late-{run}");
            let data = payload(LATE_TOTAL);
            let start = Instant::now();
            let (c, k, h) = (cache.clone(), key.clone(), rt.handle().clone());
            let producer = thread::spawn(move || -> Result<Duration> {
                h.block_on(c.get_or_fetch(&k, move || async move {
                    let mut v = Vec::with_capacity(LATE_TOTAL);
                    for (i, piece) in data.chunks(LATE_PIECE).enumerate() {
                        tokio::time::sleep_until((start + LATE_STEP * i as u32).into()).await;
                        v.extend_from_slice(piece);
                    }
                    Ok::<_, anyhow::Error>(v)
                }))
                .map_err(|e| anyhow::anyhow!("foyer: {e}"))?;
                Ok(start.elapsed())
            });
            sleep_until(start + LATE_JOIN);
            let asked = Instant::now();
            let e = rt
                .block_on(cache.get_or_fetch(&key, || async {
                    Err::<Vec<u8>, _>(anyhow::anyhow!("the joiner must not produce"))
                }))
                .map_err(|e| anyhow::anyhow!("foyer: {e}"))?;
            let (first, last) = join_value(e.value())?;
            drop(e);
            let production = producer.join().expect("producer panicked")?;
            late.push(asked, first, last, production);
            cache.remove(&key);
        }
        rt.block_on(cache.close())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        late.rows("foyer (hybrid)", out);
    }

    // cacache: SyncWriter, commit; the joiner polls the index every 1 ms, then SyncReader.
    {
        let cdir = dir.join("late-cacache");
        let mut late = Late::default();
        for run in 0..runs() {
            let key = format!("late-{run}");
            let data = payload(LATE_TOTAL);
            let start = Instant::now();
            let (d, k) = (cdir.clone(), key.clone());
            let producer = thread::spawn(move || -> Result<Duration> {
                let mut w = cacache::SyncWriter::create(&d, &k)?;
                produce_paced(&data, start, |p| Ok(w.write_all(p)?))?;
                w.commit()?;
                Ok(start.elapsed())
            });
            sleep_until(start + LATE_JOIN);
            let asked = Instant::now();
            while cacache::metadata_sync(&cdir, &key)?.is_none() {
                thread::sleep(Duration::from_millis(1));
            }
            let mut r = cacache::SyncReader::open(&cdir, &key)?;
            let (first, last) = join_read(&mut r)?;
            r.check()?;
            let production = producer.join().expect("producer panicked")?;
            late.push(asked, first, last, production);
            cacache::clear_sync(&cdir)?;
        }
        late.rows("cacache", out);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Herd: 16 threads request one key whose production takes 100 ms
// ---------------------------------------------------------------------------------------------

const HERD: usize = 16;
const HERD_PRODUCTION: Duration = Duration::from_millis(100);
const HERD_LEN: usize = MIB;

/// One herd thread's request; its argument counts producer runs.
type HerdOp = Arc<dyn Fn(&Arc<AtomicUsize>) -> Result<()> + Send + Sync>;

/// Runs `HERD` threads released by one barrier; each calls `op(run)` (which reads the whole
/// value) and returns its completion time. Returns (producer runs, completion times in ms).
fn herd_run(op: HerdOp) -> Result<(usize, Vec<f64>)> {
    let produced = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(HERD));
    let handles: Vec<_> = (0..HERD)
        .map(|_| {
            let (op, produced, barrier) = (op.clone(), produced.clone(), barrier.clone());
            thread::spawn(move || -> Result<(Instant, Instant)> {
                barrier.wait();
                let start = Instant::now();
                op(&produced)?;
                Ok((start, Instant::now()))
            })
        })
        .collect();
    let mut times = Vec::new();
    for h in handles {
        times.push(h.join().expect("herd thread panicked")?);
    }
    let t0 = times.iter().map(|t| t.0).min().expect("threads");
    let done = times
        .iter()
        .map(|t| (t.1 - t0).as_secs_f64() * 1e3)
        .collect();
    Ok((produced.load(Ordering::SeqCst), done))
}

fn herd_produce(produced: &AtomicUsize) -> Vec<u8> {
    produced.fetch_add(1, Ordering::SeqCst);
    thread::sleep(HERD_PRODUCTION);
    payload(HERD_LEN)
}

fn herd_rows(system: &str, results: Vec<(usize, Vec<f64>)>, out: &mut Vec<Row>) {
    let producers: Vec<usize> = results.iter().map(|r| r.0).collect();
    let max_runs = *producers.iter().max().expect("runs");
    let mut r = row(
        "herd: producer runs (16 requesters)",
        system,
        median(producers.iter().map(|&p| p as f64).collect()),
        "runs",
    );
    r.note = format!("max over runs {max_runs}");
    r.ratio = Some(r.value / 1.0);
    out.push(r);
    let first = median(
        results
            .iter()
            .map(|r| r.1.iter().copied().fold(f64::INFINITY, f64::min))
            .collect(),
    );
    let last = median(
        results
            .iter()
            .map(|r| r.1.iter().copied().fold(0.0, f64::max))
            .collect(),
    );
    let mut r = row(
        "herd: completion spread (last − first)",
        system,
        last - first,
        "ms",
    );
    r.note = format!("first done {first:.1} ms, last done {last:.1} ms after the release");
    out.push(r);
}

fn herd(rt: &tokio::runtime::Runtime, dir: &Path, out: &mut Vec<Row>) -> Result<()> {
    eprintln!("herd…");
    for (system, disk) in [("streamcache memory", false), ("streamcache disk", true)] {
        let cache = Arc::new(if disk {
            sc_disk(&dir.join("herd-sc"))?
        } else {
            sc_memory()?
        });
        let mut results = Vec::new();
        for run in 0..runs() {
            let (c, key) = (cache.clone(), format!("herd-{run}"));
            results.push(herd_run(Arc::new(move |produced| {
                match c.get_or_create(&key)? {
                    Entry::Miss(mut w) => {
                        let v = herd_produce(produced);
                        w.write_all(&v)?;
                        w.finish()?;
                    }
                    Entry::Hit(r) => drain(r, &mut vec![0u8; READ_BUF], HERD_LEN)?,
                }
                Ok(())
            }))?);
        }
        herd_rows(system, results, out);
    }

    {
        let cache: moka::sync::Cache<String, Arc<Vec<u8>>> = moka::sync::Cache::new(16);
        let mut results = Vec::new();
        for run in 0..runs() {
            let (c, key) = (cache.clone(), format!("herd-{run}"));
            results.push(herd_run(Arc::new(move |produced| {
                let v = c.get_with(key.clone(), || Arc::new(herd_produce(produced)));
                drain(&v[..], &mut vec![0u8; READ_BUF], HERD_LEN)
            }))?);
        }
        herd_rows("moka", results, out);
    }

    {
        let cache = foyer_cache(rt, &dir.join("herd-foyer"))?;
        let mut results = Vec::new();
        for run in 0..runs() {
            let (c, key, h) = (cache.clone(), format!("herd-{run}"), rt.handle().clone());
            results.push(herd_run(Arc::new(move |produced| {
                let e = h
                    .block_on(c.get_or_fetch(&key, || {
                        // Counted when the fetch future runs: foyer calls the closure on
                        // every miss but drops the futures of requests it coalesces.
                        let produced = produced.clone();
                        async move {
                            produced.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(HERD_PRODUCTION).await;
                            Ok::<_, anyhow::Error>(payload(HERD_LEN))
                        }
                    }))
                    .map_err(|e| anyhow::anyhow!("foyer: {e}"))?;
                drain(&e.value()[..], &mut vec![0u8; READ_BUF], HERD_LEN)
            }))?);
        }
        rt.block_on(cache.close())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        herd_rows("foyer (hybrid)", results, out);
    }

    {
        let cdir = Arc::new(dir.join("herd-cacache"));
        let mut results = Vec::new();
        for run in 0..runs() {
            let (d, key) = (cdir.clone(), format!("herd-{run}"));
            // cacache has no request coalescing: a miss produces and writes.
            results.push(herd_run(Arc::new(move |produced| {
                match cacache::SyncReader::open(&*d, &key) {
                    Ok(mut r) => {
                        drain(&mut r, &mut vec![0u8; READ_BUF], HERD_LEN)?;
                        r.check()?;
                    }
                    Err(cacache::Error::EntryNotFound(..)) => {
                        let v = herd_produce(produced);
                        cacache::write_sync(&*d, &key, &v)?;
                    }
                    Err(e) => return Err(e.into()),
                }
                Ok(())
            }))?);
        }
        herd_rows("cacache", results, out);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Disk write and read-back of one 256 MiB entry
// ---------------------------------------------------------------------------------------------

const BIG: usize = 256 * MIB;

fn disk(dir: &Path, out: &mut Vec<Row>) -> Result<()> {
    eprintln!("disk write and read-back (256 MiB)…");
    let data = payload(BIG);
    let raw_path = dir.join("raw.bin");
    let sc_dir = dir.join("disk-sc");
    let ca_dir = dir.join("disk-cacache");
    let (mut raw, mut sc, mut ca) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..heavy_runs() {
        // Raw std::fs: create, write in 64 KiB chunks, close.
        let _ = std::fs::remove_file(&raw_path);
        let t = Instant::now();
        let mut f = File::create(&raw_path)?;
        for c in data.chunks(CHUNK) {
            f.write_all(c)?;
        }
        drop(f);
        raw.push(gbps(BIG, t.elapsed()));

        // streamcache: get_or_create, write in 64 KiB chunks, finish (blake3 per 1 MiB block).
        let cache = sc_disk(&sc_dir)?;
        let key = format!("big-{run}");
        let t = Instant::now();
        let Entry::Miss(mut w) = cache.get_or_create(&key)? else {
            anyhow::bail!("fresh key was a hit")
        };
        for c in data.chunks(CHUNK) {
            w.write_all(c)?;
        }
        w.finish()?;
        sc.push(gbps(BIG, t.elapsed()));
        cache.clear();
        cache.run_pending_tasks();
        drop(cache);

        // cacache: SyncWriter (default algorithm, SHA-256), write in 64 KiB chunks, commit.
        let t = Instant::now();
        let mut w = cacache::SyncWriter::create(&ca_dir, &key)?;
        for c in data.chunks(CHUNK) {
            w.write_all(c)?;
        }
        w.commit()?;
        ca.push(gbps(BIG, t.elapsed()));
        cacache::clear_sync(&ca_dir)?;
    }
    let base = median(raw);
    let mut r = row("disk write 256 MiB", "raw std::fs (baseline)", base, "GB/s");
    r.ratio = Some(1.0);
    out.push(r);
    for (system, v) in [("streamcache disk", sc), ("cacache (SHA-256)", ca)] {
        let m = median(v);
        let mut r = row("disk write 256 MiB", system, m, "GB/s");
        r.ratio = Some(m / base);
        out.push(r);
    }

    // Read-back: one finished entry per system and the raw file, all page-cached.
    std::fs::write(&raw_path, &data)?;
    {
        let cache = sc_disk(&sc_dir)?;
        let Entry::Miss(mut w) = cache.get_or_create("big")? else {
            anyhow::bail!("fresh key was a hit")
        };
        w.write_all(&data)?;
        w.finish()?;
    }
    cacache::write_sync(&ca_dir, "big", &data)?;
    let mut buf = vec![0u8; READ_BUF];
    let (mut raw, mut cold, mut warm, mut fresh, mut ca, mut hash) = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    // One untimed pass of each, so every file is in the page cache.
    drain(File::open(&raw_path)?, &mut buf, BIG)?;
    // Read-back runs are short (tens of ms each): use the full run count, interleaved.
    for run in 0..=runs() {
        let t = Instant::now();
        drain(File::open(&raw_path)?, &mut buf, BIG)?;
        let raw_t = t.elapsed();

        // A reopened cache verifies each block on first touch; the record of verified blocks
        // is kept while the file's fstat stamp is unchanged, so the warm read (a second
        // reader) serves them straight from the page cache.
        let cache = sc_disk(&sc_dir)?;
        let t = Instant::now();
        let mut first = cache.get("big")?.context("present")?;
        drain(&mut first, &mut buf, BIG)?;
        let cold_t = t.elapsed();
        let t = Instant::now();
        drain(cache.get("big")?.context("present")?, &mut buf, BIG)?;
        let warm_t = t.elapsed();
        drop(first);
        // An entry this process just wrote (untimed): its writer hashed every block, so its
        // first read needs no second hash.
        let key = format!("fresh-{run}");
        let Entry::Miss(mut w) = cache.get_or_create(&key)? else {
            anyhow::bail!("fresh key was a hit")
        };
        w.write_all(&data)?;
        w.finish()?;
        let t = Instant::now();
        drain(cache.get(&key)?.context("present")?, &mut buf, BIG)?;
        let fresh_t = t.elapsed();
        cache.remove(&key)?;
        cache.run_pending_tasks();
        drop(cache);

        // Reference (not a system): blake3 of the same 256 MiB, one thread, 1 MiB at a time.
        let t = Instant::now();
        for c in data.chunks(MIB) {
            black_box(blake3::hash(c));
        }
        let hash_t = t.elapsed();

        let t = Instant::now();
        let mut r = cacache::SyncReader::open(&ca_dir, "big")?;
        drain(&mut r, &mut buf, BIG)?;
        r.check()?;
        let ca_t = t.elapsed();
        if run > 0 {
            raw.push(gbps(BIG, raw_t));
            cold.push(gbps(BIG, cold_t));
            warm.push(gbps(BIG, warm_t));
            fresh.push(gbps(BIG, fresh_t));
            ca.push(gbps(BIG, ca_t));
            hash.push(gbps(BIG, hash_t));
        }
    }
    let base = median(raw);
    let mut r = row(
        "disk read-back 256 MiB",
        "raw page-cache read (baseline)",
        base,
        "GB/s",
    );
    r.ratio = Some(1.0);
    out.push(r);
    for (system, v, note) in [
        (
            "streamcache disk, first read after reopen",
            cold,
            "verifies every 1 MiB block (blake3)",
        ),
        (
            "streamcache disk, warm",
            warm,
            "second reader: blocks already verified",
        ),
        (
            "streamcache disk, first read after finish",
            fresh,
            "entry written by this process: its writer hashed every block",
        ),
        (
            "cacache SyncReader + check()",
            ca,
            "SHA-256 over the whole entry",
        ),
        (
            "reference: blake3 alone, 1 thread",
            hash,
            "hashing 256 MiB in 1 MiB blocks, no I/O: a ceiling for verified reads",
        ),
    ] {
        let m = median(v);
        let mut r = row("disk read-back 256 MiB", system, m, "GB/s");
        r.ratio = Some(m / base);
        r.note = note.into();
        out.push(r);
    }
    let _ = std::fs::remove_file(&raw_path);
    cacache::clear_sync(&ca_dir)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Hit path: open and drop a reader of a small finished entry, vs moka `get`
// ---------------------------------------------------------------------------------------------

const KEYS: usize = 100;
const HITS: usize = 200_000;

fn key(i: usize) -> String {
    format!("https://example.com/objects/{i}")
}

/// Operations per second of `HITS` calls of `op(i % KEYS)`, one timed pass.
fn ops_per_sec(op: &mut dyn FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..HITS {
        op(i % KEYS);
    }
    HITS as f64 / t.elapsed().as_secs_f64()
}

fn fill(cache: &Cache) -> Result<()> {
    for i in 0..KEYS {
        if let Entry::Miss(mut w) = cache.get_or_create(&key(i))? {
            w.write_all(&payload(64))?;
            w.finish()?;
        }
    }
    Ok(())
}

fn hit_path(dir: &Path, out: &mut Vec<Row>) -> Result<()> {
    eprintln!("hit path…");
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let moka: moka::sync::Cache<String, Arc<[u8]>> = moka::sync::Cache::new(1000);
    for k in &keys {
        moka.insert(k.clone(), Arc::from(payload(64)));
    }
    let mem = sc_memory()?;
    fill(&mem)?;
    let sdir = dir.join("hit-sc");
    fill(&sc_disk(&sdir)?)?;
    let disk = sc_disk(&sdir)?;
    // The three are interleaved, pass by pass (twice the usual run count: passes are short),
    // so that a burst of other work on the machine does not land on one system only.
    let mut ops: [Vec<f64>; 3] = Default::default();
    for _ in 0..2 * runs() {
        ops[0].push(ops_per_sec(&mut |i| {
            black_box(moka.get(&keys[i]).expect("present"));
        }));
        ops[1].push(ops_per_sec(&mut |i| {
            black_box(mem.get(&keys[i]).expect("get").expect("present"));
        }));
        ops[2].push(ops_per_sec(&mut |i| {
            black_box(disk.get(&keys[i]).expect("get").expect("present"));
        }));
    }
    let [moka_ops, mem_ops, disk_ops] = ops.map(median);
    let w = "hit path (64 B entry)";
    let mut r = row(w, "moka get of Arc<[u8]> (baseline)", moka_ops, "ops/s");
    r.ratio = Some(1.0);
    out.push(r);
    for (system, v) in [
        ("streamcache memory: open+drop reader", mem_ops),
        ("streamcache disk (reloaded): open+drop reader", disk_ops),
    ] {
        let mut r = row(w, system, v, "ops/s");
        r.ratio = Some(v / moka_ops);
        out.push(r);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Fan-out: one producer writes 256 MiB in 64 KiB chunks; N readers read it (live)
// ---------------------------------------------------------------------------------------------

const READERS: [usize; 3] = [1, 8, 32];

/// Starts one producer and `n` readers behind one barrier; returns the wall time from the
/// release to the last reader reaching the end.
fn fanout_run(
    n: usize,
    produce: Box<dyn FnOnce() -> Result<()> + Send>,
    read: Arc<dyn Fn() -> Result<()> + Send + Sync>,
) -> Result<Duration> {
    let barrier = Arc::new(Barrier::new(n + 2));
    let b = barrier.clone();
    let producer = thread::spawn(move || -> Result<()> {
        b.wait();
        produce()
    });
    let readers: Vec<_> = (0..n)
        .map(|_| {
            let (b, read) = (barrier.clone(), read.clone());
            thread::spawn(move || -> Result<Instant> {
                b.wait();
                read()?;
                Ok(Instant::now())
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut last = start;
    for h in readers {
        last = last.max(h.join().expect("reader panicked")?);
    }
    producer.join().expect("producer panicked")?;
    Ok(last - start)
}

/// The 256 MiB written by every producer, shared.
fn big_payload() -> Arc<Vec<u8>> {
    Arc::new(payload(BIG))
}

fn produce_vec(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(BIG);
    for c in data.chunks(CHUNK) {
        v.extend_from_slice(c);
    }
    v
}

fn fanout(rt: &tokio::runtime::Runtime, dir: &Path, out: &mut Vec<Row>) -> Result<()> {
    eprintln!("fan-out (256 MiB, N = 1, 8, 32)…");
    let data = big_payload();
    let runs = heavy_runs();
    let base_file = dir.join("fanout-baseline.bin");
    std::fs::write(&base_file, &data[..])?;
    let mut buf = vec![0u8; CHUNK];
    drain(File::open(&base_file)?, &mut buf, BIG)?;
    let copy_base = median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                drain(&data[..], &mut buf, BIG).expect("copy");
                gbps(BIG, t.elapsed())
            })
            .collect(),
    );
    let file_base = median(
        (0..runs)
            .map(|_| {
                let t = Instant::now();
                drain(File::open(&base_file).expect("open"), &mut buf, BIG).expect("read");
                gbps(BIG, t.elapsed())
            })
            .collect(),
    );
    let mut r = row(
        "fan-out memory",
        "copy, 64 KiB buffer, 1 thread (baseline)",
        copy_base,
        "GB/s",
    );
    r.ratio = Some(1.0);
    out.push(r);
    let mut r = row(
        "fan-out disk",
        "page-cache read, 64 KiB buffer, 1 thread (baseline)",
        file_base,
        "GB/s",
    );
    r.ratio = Some(1.0);
    out.push(r);

    let mut record = |workload: &'static str, system: &str, n: usize, times: Vec<Duration>| {
        let base = if workload == "fan-out memory" {
            copy_base
        } else {
            file_base
        };
        let m = median(times.into_iter().map(|t| gbps(n * BIG, t)).collect());
        let mut r = row(workload, &format!("{system}, N={n}"), m, "GB/s");
        r.ratio = Some(m / base);
        out.push(r);
    };

    // streamcache, memory and disk: the writer holds the Miss before the release; readers
    // open with `get` after it.
    for (system, workload, disk) in [
        ("streamcache memory", "fan-out memory", false),
        ("streamcache disk", "fan-out disk", true),
    ] {
        let cache = Arc::new(if disk {
            sc_disk(&dir.join("fanout-sc"))?
        } else {
            sc_memory()?
        });
        for n in READERS {
            let mut times = Vec::new();
            for run in 0..runs {
                let key = format!("fan-{n}-{run}");
                let Entry::Miss(mut w) = cache.get_or_create(&key)? else {
                    anyhow::bail!("fresh key was a hit")
                };
                let d = data.clone();
                let (c, k) = (cache.clone(), key.clone());
                times.push(fanout_run(
                    n,
                    Box::new(move || {
                        for ch in d.chunks(CHUNK) {
                            w.write_all(ch)?;
                        }
                        w.finish()?;
                        Ok(())
                    }),
                    Arc::new(move || {
                        let r = c.get(&k)?.context("present")?;
                        drain(r, &mut vec![0u8; CHUNK], BIG)
                    }),
                )?);
                cache.remove(&key)?;
                cache.run_pending_tasks();
            }
            record(workload, system, n, times);
        }
    }

    // moka: everyone calls get_with; one runs the init (the production), the others wait for
    // the value, then copy it out through a 64 KiB buffer.
    {
        let cache: moka::sync::Cache<String, Arc<Vec<u8>>> = moka::sync::Cache::new(4);
        for n in READERS {
            let mut times = Vec::new();
            for run in 0..runs {
                let key = format!("fan-{n}-{run}");
                let get = {
                    let (c, k, d) = (cache.clone(), key.clone(), data.clone());
                    move || c.get_with(k.clone(), || Arc::new(produce_vec(&d)))
                };
                let get2 = get.clone();
                times.push(fanout_run(
                    n,
                    Box::new(move || {
                        get();
                        Ok(())
                    }),
                    Arc::new(move || drain(&get2()[..], &mut vec![0u8; CHUNK], BIG)),
                )?);
                cache.invalidate(&key);
            }
            record("fan-out memory", "moka", n, times);
        }
    }

    // foyer: the same with get_or_fetch (in-memory tier of the hybrid cache).
    {
        let cache = foyer_cache(rt, &dir.join("fanout-foyer"))?;
        for n in READERS {
            let mut times = Vec::new();
            for run in 0..runs {
                let key = format!("fan-{n}-{run}");
                let get = {
                    let (c, k, d, h) = (
                        cache.clone(),
                        key.clone(),
                        data.clone(),
                        rt.handle().clone(),
                    );
                    move || {
                        let d = d.clone();
                        h.block_on(c.get_or_fetch(&k, move || async move {
                            Ok::<_, anyhow::Error>(produce_vec(&d))
                        }))
                        .map_err(|e| anyhow::anyhow!("foyer: {e}"))
                    }
                };
                let get2 = get.clone();
                times.push(fanout_run(
                    n,
                    Box::new(move || get().map(drop)),
                    Arc::new(move || drain(&get2()?.value()[..], &mut vec![0u8; CHUNK], BIG)),
                )?);
                cache.remove(&key);
            }
            record("fan-out memory", "foyer (hybrid)", n, times);
        }
        rt.block_on(cache.close())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }

    // cacache: the producer writes and commits; readers poll the index every 1 ms, then read
    // with a verified SyncReader.
    {
        let cdir = Arc::new(dir.join("fanout-cacache"));
        for n in READERS {
            let mut times = Vec::new();
            for run in 0..runs {
                let key = Arc::new(format!("fan-{n}-{run}"));
                let (d, k, dd) = (cdir.clone(), key.clone(), data.clone());
                let (d2, k2) = (cdir.clone(), key.clone());
                times.push(fanout_run(
                    n,
                    Box::new(move || {
                        let mut w = cacache::SyncWriter::create(&*d, &*k)?;
                        for ch in dd.chunks(CHUNK) {
                            w.write_all(ch)?;
                        }
                        w.commit()?;
                        Ok(())
                    }),
                    Arc::new(move || {
                        while cacache::metadata_sync(&*d2, &*k2)?.is_none() {
                            thread::sleep(Duration::from_millis(1));
                        }
                        let mut r = cacache::SyncReader::open(&*d2, &*k2)?;
                        drain(&mut r, &mut vec![0u8; CHUNK], BIG)?;
                        r.check()?;
                        Ok(())
                    }),
                )?);
                cacache::clear_sync(&*cdir)?;
            }
            record("fan-out disk", "cacache", n, times);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

const BEGIN: &str = "<!-- BEGIN GENERATED by `cargo run --release -p bench-peers` -->";
const END: &str = "<!-- END GENERATED -->";

fn fmt_value(v: f64, unit: &str) -> String {
    match unit {
        "ops/s" => format!("{:.2} M", v / 1e6),
        "runs" => format!("{v:.0}"),
        _ if v < 0.1 => format!("{v:.4}"),
        _ if v < 10.0 => format!("{v:.2}"),
        _ => format!("{v:.1}"),
    }
}

fn find<'a>(rows: &'a [Row], workload: &str, system: &str) -> Option<&'a Row> {
    rows.iter()
        .find(|r| r.workload == workload && r.system == system)
}

fn targets(rows: &[Row]) -> Vec<(String, bool)> {
    let mut t = Vec::new();
    let ratio = |w: &str, s: &str| find(rows, w, s).and_then(|r| r.ratio);
    let value = |w: &str, s: &str| find(rows, w, s).map(|r| r.value);
    for s in ["streamcache memory", "streamcache disk"] {
        if let Some(f) = ratio("late joiner: time to first byte", s) {
            t.push((
                format!(
                    "late joiner, {s}: first byte at {:.3}% of production time (target ≤ 1%)",
                    f * 100.0
                ),
                f <= 0.01,
            ));
        }
        if let Some(p) = value("herd: producer runs (16 requesters)", s) {
            t.push((
                format!("herd, {s}: {p:.0} producer run(s) (must be 1)"),
                p == 1.0,
            ));
        }
    }
    let w = "disk write 256 MiB";
    if let (Some(sc), Some(ca)) = (value(w, "streamcache disk"), value(w, "cacache (SHA-256)")) {
        t.push((
            format!("disk write: {:.2}× cacache (target ≥ 2×)", sc / ca),
            sc / ca >= 2.0,
        ));
    }
    if let Some(r) = ratio(w, "streamcache disk") {
        t.push((
            format!("disk write: {r:.2}× raw std::fs (target ≥ 0.6×)"),
            r >= 0.6,
        ));
    }
    let w = "disk read-back 256 MiB";
    if let Some(r) = ratio(w, "streamcache disk, first read after reopen") {
        t.push((
            format!("disk read-back, first read after reopen: {r:.2}× raw (target ≥ 0.7×)"),
            r >= 0.7,
        ));
    }
    if let Some(r) = ratio(w, "streamcache disk, first read after finish") {
        t.push((
            format!("disk read-back, first read after finish: {r:.2}× raw (target ≥ 0.7×)"),
            r >= 0.7,
        ));
    }
    if let Some(r) = ratio(w, "streamcache disk, warm") {
        t.push((
            format!("disk read-back, warm (for reference): {r:.2}× raw (target ≥ 0.7×)"),
            r >= 0.7,
        ));
    }
    for s in [
        "streamcache memory: open+drop reader",
        "streamcache disk (reloaded): open+drop reader",
    ] {
        if let Some(r) = ratio("hit path (64 B entry)", s) {
            t.push((
                format!("hit path, {s}: {r:.2}× moka get (target ≥ 0.5×)"),
                r >= 0.5,
            ));
        }
    }
    t
}

fn render(rows: &[Row], meta: &str, chart_name: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{BEGIN}\n");
    s.push_str(meta);
    let mut workloads: Vec<&str> = Vec::new();
    for r in rows {
        if !workloads.contains(&r.workload) {
            workloads.push(r.workload);
        }
    }
    let _ = writeln!(s, "\n| workload | system | median | unit | ratio | notes |");
    let _ = writeln!(s, "| --- | --- | ---: | --- | ---: | --- |");
    for w in workloads {
        for r in rows.iter().filter(|r| r.workload == w) {
            let ratio = match (r.ratio, r.workload) {
                (None, _) => "—".to_owned(),
                (Some(x), "late joiner: time to first byte") => {
                    format!("{:.3}% of production", x * 100.0)
                }
                (Some(_), "herd: producer runs (16 requesters)") => "—".to_owned(),
                (Some(x), _) if (x - 1.0).abs() < 1e-12 && r.system.contains("baseline") => {
                    "1.00× (baseline)".to_owned()
                }
                (Some(x), _) => format!("{x:.2}×"),
            };
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} |",
                r.workload,
                r.system,
                fmt_value(r.value, r.unit),
                r.unit,
                ratio,
                r.note
            );
        }
    }
    let _ = writeln!(s, "\nTargets (streamcache):\n");
    for (text, met) in targets(rows) {
        let _ = writeln!(s, "- {}: {text}", if met { "met" } else { "**MISSED**" });
    }
    let _ = writeln!(
        s,
        "\n![time to first byte and fan-out throughput per system]({chart_name})\n"
    );
    let _ = writeln!(s, "{END}");
    s
}

fn write_report(out_dir: &Path, rows: &[Row], meta: &str) -> Result<()> {
    std::fs::create_dir_all(out_dir)?;
    let md = out_dir.join("benchmarks.md");
    let generated = render(rows, meta, "benchmarks.svg");
    let text = match std::fs::read_to_string(&md) {
        Ok(old) => match (old.find(BEGIN), old.find(END)) {
            (Some(b), Some(e)) if b < e => {
                format!(
                    "{}{}{}",
                    &old[..b],
                    generated.trim_end(),
                    &old[e + END.len()..]
                )
            }
            _ => format!("{old}\n{generated}"),
        },
        Err(_) => format!(
            "# streamcache against moka, foyer and cacache\n\n\
             Regenerate with `cargo run --release -p bench-peers` (the program is in `bench-peers/`).\n\n\
             {generated}"
        ),
    };
    std::fs::write(&md, text)?;
    chart::draw(&out_dir.join("benchmarks.svg"), rows)?;
    eprintln!(
        "wrote {} and {}",
        md.display(),
        out_dir.join("benchmarks.svg").display()
    );
    Ok(())
}

fn default_out_dir() -> PathBuf {
    // bench-peers/ is one level below the repository root.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(|p| p.join("docs"))
        .unwrap_or_else(|| PathBuf::from("docs"))
}

fn main() -> Result<()> {
    let started = Instant::now();
    let load_before = load_average();
    let out_dir = std::env::var_os("BENCH_OUT").map_or_else(default_out_dir, PathBuf::from);
    let tmp = tempfile::Builder::new()
        .prefix("bench-peers-")
        .tempdir_in(std::env::temp_dir())?;
    let rt = tokio_runtime()?;
    // BENCH_ONLY=<word>: run only the workloads whose name contains it (e.g. for profiling);
    // the report files are then left alone.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wanted = |name: &str| name.contains(only.as_str());
    let mut rows = Vec::new();
    if wanted("late") {
        late_joiner(&rt, tmp.path(), &mut rows)?;
    }
    if wanted("herd") {
        herd(&rt, tmp.path(), &mut rows)?;
    }
    if wanted("hit") {
        hit_path(tmp.path(), &mut rows)?;
    }
    if wanted("disk") {
        disk(tmp.path(), &mut rows)?;
    }
    if wanted("fanout") {
        fanout(&rt, tmp.path(), &mut rows)?;
    }
    drop(rt);
    let meta = format!(
        "Measured {date} on {nproc} CPUs ({cpu}), Linux {kernel}, {rustc}; load average \
         (1, 5, 15 min) {load_before} before and {load_after} after; temporary files under \
         `{tmp}`. Medians of {runs} runs ({heavy} for the 256 MiB disk write and fan-out); whole run \
         {secs:.0} s. Versions: streamcache (this repository), moka 0.12 (`sync`), foyer 0.22 (hybrid, \
         tokio), cacache 13.1 (sync API).\n",
        date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        nproc = thread::available_parallelism().map_or(0, |n| n.get()),
        cpu = cpu_model(),
        kernel = command_output("uname", &["-r"]),
        rustc = command_output("rustc", &["--version"]),
        load_after = load_average(),
        tmp = std::env::temp_dir().display(),
        runs = runs(),
        heavy = heavy_runs(),
        secs = started.elapsed().as_secs_f64(),
    );
    if only.is_empty() {
        write_report(&out_dir, &rows, &meta)?;
    }
    println!("{}", render(&rows, &meta, "benchmarks.svg"));
    Ok(())
}
