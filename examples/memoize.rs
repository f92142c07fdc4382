//! Memoizing a slow download: 16 requesters arrive at staggered times while one producer
//! emits 64 MiB over about 2 s. The producer runs once; everyone streams from the cache as the
//! bytes arrive. Then the cache is reopened from disk and serves the same key with no producer.
//!
//! `cargo run --release --example memoize`

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use streamcache::Cache;

const TOTAL: usize = 64 << 20;
const PIECE: usize = 1 << 20;
const KEY: &str = "https://example.com/datasets/big.bin";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let runs = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    {
        let cache = Arc::new(Cache::builder().disk(dir.path()).build()?);
        let requesters: Vec<_> = (0..16)
            .map(|i| {
                let (cache, runs) = (cache.clone(), runs.clone());
                thread::spawn(move || -> std::io::Result<(Duration, Duration, usize)> {
                    thread::sleep(Duration::from_millis(120 * i)); // staggered arrivals
                    let asked = Instant::now();
                    let mut reader = cache.get_or_produce(KEY, move |w| {
                        runs.fetch_add(1, Ordering::SeqCst);
                        slow_download(w)
                    })?;
                    let mut buf = vec![0; 256 << 10];
                    let mut n = reader.read(&mut buf)?;
                    let first = asked.elapsed();
                    let mut total = n;
                    while n > 0 {
                        n = reader.read(&mut buf)?;
                        total += n;
                    }
                    Ok((first, asked.elapsed(), total))
                })
            })
            .collect();
        println!("requester  arrived  first byte  last byte  bytes");
        for (i, r) in requesters.into_iter().enumerate() {
            let (first, last, total) = r.join().expect("requester thread")?;
            assert_eq!(total, TOTAL);
            println!(
                "{i:>9}  {:>5}ms  {:>10.1?}  {:>7}ms  {total}",
                120 * i,
                first,
                last.as_millis()
            );
        }
        println!("producer ran {} time(s)", runs.load(Ordering::SeqCst));
        println!("stats: {:?}", cache.stats());
    }

    let reopened = Cache::builder().disk(dir.path()).build()?;
    let t = Instant::now();
    let mut reader = reopened.get_or_produce(KEY, |_| panic!("served from disk: no producer"))?;
    let mut bytes = Vec::with_capacity(TOTAL);
    reader.read_to_end(&mut bytes)?;
    let took = t.elapsed();
    assert_eq!(bytes.len(), TOTAL);
    assert!(
        bytes
            .iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(i % PIECE))
    );
    println!(
        "after reopen: {} MiB verified from disk in {:?}, producer ran {} time(s) in total ({:?} overall)",
        bytes.len() >> 20,
        took,
        runs.load(Ordering::SeqCst),
        start.elapsed()
    );
    Ok(())
}

fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// A producer that emits 64 MiB in 1 MiB pieces over about 2 s, flushing each piece.
fn slow_download(w: &mut streamcache::Writer) -> std::io::Result<()> {
    w.set_expected_len(TOTAL as u64)?;
    let piece: Vec<u8> = (0..PIECE).map(pattern).collect();
    for _ in 0..TOTAL / PIECE {
        thread::sleep(Duration::from_millis(31));
        w.write_all(&piece)?;
        w.flush()?;
    }
    Ok(())
}
