//! The first thing to run: one producer, several readers that stream while it writes, a
//! positional read, an aborted entry, and a disk cache that survives a reopen.
//!
//! `cargo run --release --example quickstart`

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use streamcache::{Cache, Entry, Error};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cache = Arc::new(Cache::builder().memory().max_entries(1_000).build()?);

    // 1. The first requester becomes the producer; it streams 8 pieces over ~400 ms.
    let Entry::Miss(mut writer) = cache.get_or_create("report")? else {
        unreachable!("the cache is empty")
    };
    let producer = thread::spawn(move || -> std::io::Result<()> {
        for i in 0..8 {
            writeln!(writer, "line {i}")?;
            writer.flush()?; // publish now: readers are waiting
            thread::sleep(Duration::from_millis(50));
        }
        Ok(writer.finish()?)
    });

    // 2. Three more requesters arrive while it is being written: each gets a reader from byte 0.
    let start = Instant::now();
    let readers: Vec<_> = (0..3)
        .map(|n| {
            let cache = cache.clone();
            thread::spawn(move || -> std::io::Result<String> {
                let Entry::Hit(mut r) = cache.get_or_create("report")? else {
                    unreachable!("the producer is registered")
                };
                let mut first = [0; 6];
                r.read_exact(&mut first)?;
                println!("reader {n}: first bytes after {:?}", start.elapsed());
                let mut rest = String::new();
                r.read_to_string(&mut rest)?;
                Ok(String::from_utf8_lossy(&first).into_owned() + &rest)
            })
        })
        .collect();
    producer.join().expect("producer thread")?;
    for (n, r) in readers.into_iter().enumerate() {
        let text = r.join().expect("reader thread")?;
        println!(
            "reader {n}: {} lines, done after {:?}",
            text.lines().count(),
            start.elapsed()
        );
    }

    // 3. Positional reads do not move the reader and wait only for the range they need.
    let r = cache.get("report")?.expect("finished entry");
    let mut word = [0; 6];
    r.read_at(&mut word, 7)?;
    println!("read_at(7): {:?}", String::from_utf8_lossy(&word));

    // 4. A producer that fails aborts the entry: readers get an error, never a short success,
    //    and the next request is a miss again.
    if let Entry::Miss(mut w) = cache.get_or_create("flaky")? {
        let mut r = w.reader()?;
        w.write_all(b"partial")?;
        drop(w); // no finish()
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        let typed = err.get_ref().and_then(|e| e.downcast_ref::<Error>());
        println!(
            "reader of an aborted entry: {err} ({})",
            matches!(typed, Some(Error::Aborted { .. }))
        );
    }
    assert!(matches!(cache.get_or_create("flaky")?, Entry::Miss(_)));

    // 5. On disk, finished entries survive a restart.
    let dir = tempfile::tempdir()?;
    {
        let disk = Cache::builder().disk(dir.path()).build()?;
        if let Entry::Miss(mut w) = disk.get_or_create("model.bin")? {
            w.set_metadata("application/octet-stream");
            w.write_all(&vec![7u8; 3 << 20])?;
            w.finish()?;
        }
    }
    let disk = Cache::builder().disk(dir.path()).build()?;
    let mut r = disk.get("model.bin")?.expect("reloaded");
    let mut bytes = Vec::new();
    r.read_to_end(&mut bytes)?;
    println!(
        "after reopen: {} bytes, metadata {:?}, stats {:?}",
        bytes.len(),
        String::from_utf8_lossy(&r.metadata()),
        cache.stats()
    );
    Ok(())
}
