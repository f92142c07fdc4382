//! A fleet of nodes on one bucket: each node is a separate cache (as on separate machines),
//! each with several requesters that all want the same slowly produced key at once. Prints
//! who produced, each node's time to first byte and completion, and its bucket requests.
//!
//! ```text
//! cargo run --release --example fleet --features shared                 # in-memory bucket
//! cargo run --release --example fleet --features s3 -- --bucket s3://fleet/demo
//! ```
//!
//! With `--bucket`, endpoint and credentials come from the `AWS_*` environment variables (see
//! the README's "Many machines" section for a local moto server).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use streamcache::shared::SharedTier;
use streamcache::{Cache, Entry};

const USAGE: &str = "\
fleet: N nodes (separate caches) on one bucket, M requesters each, one key produced slowly.

USAGE:
    fleet [--nodes N] [--requesters M] [--mib SIZE] [--seconds S] [--bucket s3://bucket/prefix]

OPTIONS:
    --nodes N          nodes, each its own cache [3]
    --requesters M     requesters per node, all at once [4]
    --mib SIZE         size of the entry in MiB [16]
    --seconds S        how long the producer takes to write it [2]
    --bucket URL       an S3 bucket (needs the `s3` feature; AWS_* variables configure it)
                       [an in-memory bucket shared by the nodes]";

struct Args {
    nodes: usize,
    requesters: usize,
    mib: usize,
    seconds: f64,
    bucket: Option<String>,
}

fn parse() -> Result<Option<Args>, String> {
    let mut a = Args {
        nodes: 3,
        requesters: 4,
        mib: 16,
        seconds: 2.0,
        bucket: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Ok(None);
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--nodes" => a.nodes = num(&value)?.max(1),
            "--requesters" => a.requesters = num(&value)?.max(1),
            "--mib" => a.mib = num(&value)?.max(1),
            "--seconds" => {
                a.seconds = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                    .ok_or_else(|| format!("--seconds: {value:?} is not a duration"))?
            }
            "--bucket" => a.bucket = Some(value),
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    Ok(Some(a))
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let memory: Arc<dyn object_store::ObjectStore> =
        Arc::new(object_store::memory::InMemory::new());
    let tier = || match &args.bucket {
        Some(url) => SharedTier::from_url(url),
        None => Ok(SharedTier::new(memory.clone())),
    };
    let nodes = (0..args.nodes)
        .map(|_| Ok(Arc::new(Cache::builder().shared(tier()?).build()?)))
        .collect::<Result<Vec<_>, streamcache::Error>>()?;
    // A fresh key per run, so that a bucket kept between runs does not answer at once.
    let key = format!(
        "fleet-demo-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    let piece = 256 << 10;
    let pieces = args.mib * (1 << 20) / piece;
    let pause = Duration::from_secs_f64(args.seconds / pieces as f64);
    let start = Arc::new(Barrier::new(args.nodes * args.requesters));
    let t0 = Instant::now();
    let mut threads = Vec::new();
    for (n, cache) in nodes.iter().enumerate() {
        for _ in 0..args.requesters {
            let (cache, start, key) = (cache.clone(), start.clone(), key.clone());
            threads.push(thread::spawn(
                move || -> Result<(usize, Option<Duration>, Duration, bool), std::io::Error> {
                    start.wait();
                    match cache.get_or_create(&key)? {
                        Entry::Miss(mut w) => {
                            let buf = vec![7u8; piece];
                            for _ in 0..pieces {
                                w.write_all(&buf)?;
                                w.flush()?;
                                thread::sleep(pause);
                            }
                            w.finish()?;
                            Ok((n, None, t0.elapsed(), true))
                        }
                        Entry::Hit(mut r) => {
                            let mut first = [0u8; 1];
                            r.read_exact(&mut first)?;
                            let ttfb = t0.elapsed();
                            std::io::copy(&mut r, &mut std::io::sink())?;
                            Ok((n, Some(ttfb), t0.elapsed(), false))
                        }
                    }
                },
            ));
        }
    }
    let mut rows: Vec<Vec<(Option<Duration>, Duration, bool)>> = vec![Vec::new(); args.nodes];
    for t in threads {
        let (n, ttfb, done, produced) = t.join().map_err(|_| "a requester panicked")??;
        rows[n].push((ttfb, done, produced));
    }
    println!(
        "{} nodes x {} requesters, one key of {} MiB produced over {:.1} s\n",
        args.nodes, args.requesters, args.mib, args.seconds
    );
    println!(
        "node  role                first byte (min..max)   complete (max)   bucket GETs  PUTs"
    );
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let mut producers = 0;
    for (n, row) in rows.iter().enumerate() {
        let produced = row.iter().any(|r| r.2);
        producers += usize::from(produced);
        let firsts: Vec<Duration> = row.iter().filter_map(|r| r.0).collect();
        let done = row.iter().map(|r| r.1).max().unwrap_or_default();
        let stats = nodes[n].shared_stats().unwrap_or_default();
        let role = if produced {
            "producer + readers"
        } else if stats.tailed > 0 {
            "tailed the producer"
        } else {
            "downloaded"
        };
        let first = match (firsts.iter().min(), firsts.iter().max()) {
            (Some(a), Some(b)) => format!("{}..{}", ms(*a), ms(*b)),
            _ => "-".into(),
        };
        println!(
            "{n:>4}  {role:<18}  {first:<22}  {:<15}  {:>11}  {:>4}",
            ms(done),
            stats.gets,
            stats.puts
        );
    }
    println!("\nproductions fleet-wide: {producers}");
    Ok(())
}
