//! The stream core: every scenario of the Go `stream` package (one writer, many independent
//! readers, close/cancel/shutdown/remove), plus what we do better (abort semantics, declared
//! lengths, seeking, zero-copy), and threaded stress tests.
//!
//! Every test that can block runs under a deadline (`common::deadline`), so a deadlock fails
//! instead of hanging. "Still blocked" checks (`assert_blocked`) are negative checks only.

mod common;

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;

use common::{
    BLOCKED_GRACE, Backend, Rng, assert_aborted, assert_closed, assert_pattern, deadline, disk,
    memory, pattern, read_all, spawn, stream_error,
};
use streamcache::storage::{FaultOp, FaultyStorage, MemoryStorage, Storage};
use streamcache::{Error, Reader, Stream, Writer};

const MIB: usize = 1 << 20;

/// A named way to make a fresh storage.
type MakeStore = (&'static str, fn() -> Backend);

fn stores() -> [MakeStore; 2] {
    [("memory", memory), ("disk", disk)]
}

/// Runs `body` on memory and on disk storage, each under a deadline.
fn on_each_storage(body: fn(Arc<dyn Storage>)) {
    for (name, make) in stores() {
        deadline(name, move || {
            let s = make();
            body(s.storage.clone());
        });
    }
}

#[track_caller]
fn assert_cause(e: &io::Error, text: &str) {
    let err = stream_error(e);
    let cause = match err {
        Error::Aborted { cause, .. } | Error::Closed { cause, .. } => cause.as_ref(),
        other => panic!("no cause in {other:?}"),
    };
    let cause = cause.unwrap_or_else(|| panic!("{err:?} has no cause"));
    assert!(
        cause.to_string().contains(text),
        "cause {cause} lacks {text:?}"
    );
}

fn closed_cause(e: &Error) -> String {
    match e {
        Error::Closed { cause: Some(c), .. } => c.to_string(),
        other => panic!("expected Closed with a cause, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Go `stream` scenarios.

/// Go `TestStream`-like basic case: readers made before, during and after writing, and from a
/// `Stream` handle after the writer is gone, each see every byte from 0.
#[test]
fn readers_before_during_after_see_all_bytes() {
    on_each_storage(|s| {
        let len = 3 * MIB + 12_345;
        let mut w = Writer::create(s.clone(), "all").unwrap();
        let stream = w.stream();
        let before = w.reader().unwrap();
        let t_before = spawn("before", move || {
            let mut r = before;
            read_all(&mut r).unwrap()
        });
        w.write_all(&pattern(0, len / 2)).unwrap();
        w.flush().unwrap();
        let during = w.reader().unwrap();
        let t_during = spawn("during", move || {
            let mut r = during;
            read_all(&mut r).unwrap()
        });
        w.write_all(&pattern(len as u64 / 2, len - len / 2))
            .unwrap();
        let during_late = stream.reader().unwrap();
        w.finish().unwrap();
        let mut after = stream.reader().unwrap();
        for got in [
            t_before.join(),
            t_during.join(),
            read_all(&mut { during_late }).unwrap(),
            read_all(&mut after).unwrap(),
        ] {
            assert_eq!(got.len(), len);
            assert_pattern(&got, 0);
        }
        // And from storage, as a finished stream.
        let reopened = Stream::open(s.clone(), "all").unwrap();
        assert_eq!(reopened.size().len, len as u64);
        assert!(reopened.size().finished);
        let got = read_all(&mut reopened.reader().unwrap()).unwrap();
        assert_pattern(&got, 0);
        assert_eq!(got.len(), len);
    });
}

/// Go `Close`: finishing the stream unblocks a reader waiting at the written end with EOF.
#[test]
fn finish_unblocks_blocked_read() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "close").unwrap();
        let mut r = w.reader().unwrap();
        w.write_all(b"hello").unwrap();
        w.flush().unwrap();
        let mut buf = [0; 5];
        r.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        let blocked = spawn("read at end", move || {
            let mut buf = [0; 8];
            r.read(&mut buf).map(|n| (n, r))
        });
        blocked.assert_blocked(BLOCKED_GRACE);
        w.finish().unwrap();
        let (n, mut r) = blocked.join().unwrap();
        assert_eq!(n, 0, "EOF after finish");
        assert_eq!(r.read(&mut buf).unwrap(), 0, "EOF is sticky");
    });
}

/// Regression: reading at position `u64::MAX` computed `pos + 1`, which panicked in debug
/// builds and wrapped to "wait for 0 bytes" in release: a clean end of file at once, even on
/// a stream that then aborted. It now waits for the stream to end like any read past the end.
#[test]
fn read_at_the_largest_position_waits_for_the_end() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "far").unwrap();
        w.write_all(b"abc").unwrap();
        w.flush().unwrap();
        let mut r = w.reader().unwrap();
        let mut chunked = w.reader().unwrap();
        r.seek(SeekFrom::Start(u64::MAX)).unwrap();
        chunked.seek(SeekFrom::Start(u64::MAX)).unwrap();
        let blocked = spawn("read at u64::MAX", move || r.read(&mut [0; 4]));
        let chunk = spawn("read_chunk at u64::MAX", move || chunked.read_chunk(4));
        blocked.assert_blocked(BLOCKED_GRACE);
        chunk.assert_blocked(BLOCKED_GRACE);
        w.abort();
        assert_aborted(&blocked.join().unwrap_err());
        assert_aborted(&chunk.join().unwrap_err());
    });
}

/// Go `Cancel` before close: readers (blocked or not) fail with `Closed` carrying the cause,
/// new readers are refused, the writer's writes and finish fail.
#[test]
fn cancel_before_finish() {
    on_each_storage(|s| {
        let mut w = Writer::create(s.clone(), "cancel").unwrap();
        let stream = w.stream();
        let mut r1 = w.reader().unwrap();
        let r2 = w.reader().unwrap();
        w.write_all(b"some bytes").unwrap();
        w.flush().unwrap();
        let blocked = spawn("blocked reader", move || {
            let mut r = r2;
            read_all(&mut r)
        });
        blocked.assert_blocked(BLOCKED_GRACE);
        stream.cancel_with("operator said stop");
        let e = blocked.join().unwrap_err();
        assert_closed(&e);
        assert_cause(&e, "operator said stop");
        let mut buf = [0; 4];
        let e = r1.read(&mut buf).unwrap_err();
        assert_closed(&e);
        let e = r1.read_at(&mut buf, 0).unwrap_err();
        assert_closed(&e);
        let e = stream.reader().unwrap_err();
        assert_eq!(closed_cause(&e), "operator said stop");
        assert!(matches!(w.reader(), Err(Error::Closed { .. })));
        let e = w.write_all(b"more").unwrap_err();
        assert_closed(&e);
        assert!(matches!(w.finish(), Err(Error::Closed { .. })));
        assert!(!stream.size().finished);
        assert_eq!(
            s.open("cancel").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    });
}

/// Go `Cancel` after close: even a finished stream's readers fail from then on; no new readers.
#[test]
fn cancel_after_finish() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "cancel-after").unwrap();
        let stream = w.stream();
        let mut r = w.reader().unwrap();
        w.write_all(&pattern(0, 1000)).unwrap();
        w.finish().unwrap();
        let mut buf = [0; 10];
        r.read_exact(&mut buf).unwrap();
        stream.cancel_with("cancelled late");
        assert_closed(&r.read(&mut buf).unwrap_err());
        assert_closed(&r.read_at(&mut buf, 0).unwrap_err());
        let e = stream.reader().unwrap_err();
        assert_eq!(closed_cause(&e), "cancelled late");
        assert!(!stream.size().finished);
    });
}

/// Go `ShutdownWithErr` after close: existing readers read to the end; new readers get `Closed`
/// carrying the cause.
#[test]
fn shutdown_after_finish_lets_readers_finish() {
    on_each_storage(|s| {
        let len = 2 * MIB + 1;
        let mut w = Writer::create(s, "shutdown").unwrap();
        let stream = w.stream();
        let mut r = w.reader().unwrap();
        w.write_all(&pattern(0, len)).unwrap();
        w.finish().unwrap();
        let mut head = [0; 100];
        r.read_exact(&mut head).unwrap();
        stream.shutdown_with("going away");
        let e = stream.reader().unwrap_err();
        assert_eq!(closed_cause(&e), "going away");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest.len(), len - 100);
        assert_pattern(&rest, 100);
        let mut buf = [0; 10];
        assert_eq!(r.read_at(&mut buf, 5).unwrap(), 10);
        assert_pattern(&buf, 5);
    });
}

/// Shutdown while writing: the writer carries on and existing readers get every byte.
#[test]
fn shutdown_before_finish_writer_carries_on() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "shutdown-early").unwrap();
        let stream = w.stream();
        let r = w.reader().unwrap();
        let reader = spawn("reader", move || read_all(&mut { r }).unwrap());
        w.write_all(&pattern(0, 1000)).unwrap();
        stream.shutdown_with("no more readers");
        assert!(matches!(w.reader(), Err(Error::Closed { .. })));
        w.write_all(&pattern(1000, 1000)).unwrap();
        w.finish().unwrap();
        let got = reader.join();
        assert_eq!(got.len(), 2000);
        assert_pattern(&got, 0);
    });
}

/// Go `Remove`: blocks until every reader is dropped, refuses new readers meanwhile, then
/// deletes the blob from storage.
#[test]
fn remove_blocks_until_readers_drop_then_deletes() {
    on_each_storage(|s| {
        let mut w = Writer::create(s.clone(), "rm").unwrap();
        let stream = w.stream();
        let mut r = w.reader().unwrap();
        w.write_all(&pattern(0, 5000)).unwrap();
        w.finish().unwrap();
        s.open("rm").unwrap();
        let remover = {
            let stream = stream.clone();
            spawn("remove", move || stream.remove())
        };
        remover.assert_blocked(BLOCKED_GRACE);
        // The reader still reads everything while removal waits for it.
        let got = read_all(&mut r).unwrap();
        assert_pattern(&got, 0);
        assert_eq!(got.len(), 5000);
        // New readers are refused once removal started (it may not have started yet: poll
        // until it has, which it must within the deadline).
        while stream.reader().is_ok() {
            thread::yield_now();
        }
        remover.assert_blocked(BLOCKED_GRACE);
        assert!(s.open("rm").is_ok(), "deleted while a reader is open");
        drop(r);
        remover.join().unwrap();
        assert_eq!(s.open("rm").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(matches!(stream.reader(), Err(Error::Closed { .. })));
    });
}

/// `remove` waits for an open writer too; the writer may finish, and the blob is deleted after.
#[test]
fn remove_waits_for_writer() {
    on_each_storage(|s| {
        let mut w = Writer::create(s.clone(), "rm-w").unwrap();
        let stream = w.stream();
        let remover = spawn("remove", move || stream.remove());
        remover.assert_blocked(BLOCKED_GRACE);
        w.write_all(b"late bytes").unwrap();
        w.finish().unwrap();
        remover.join().unwrap();
        assert_eq!(s.open("rm-w").unwrap_err().kind(), io::ErrorKind::NotFound);
    });
}

/// `remove_when_unused` returns at once, refuses new readers, lets open readers (and the
/// writer) go on, and deletes the blob once the last handle of any kind is gone.
#[test]
fn remove_when_unused_deletes_after_last_handle() {
    on_each_storage(|s| {
        // Finished stream.
        let mut w = Writer::create(s.clone(), "rwu").unwrap();
        let stream = w.stream();
        let mut r = w.reader().unwrap();
        w.write_all(&pattern(0, 3000)).unwrap();
        w.finish().unwrap();
        stream.remove_when_unused();
        assert!(matches!(stream.reader(), Err(Error::Closed { .. })));
        assert!(s.open("rwu").is_ok(), "deleted while a reader is open");
        let got = read_all(&mut r).unwrap();
        assert_pattern(&got, 0);
        drop(r);
        assert!(
            s.open("rwu").is_ok(),
            "deleted while a Stream handle is alive"
        );
        drop(stream);
        assert_eq!(s.open("rwu").unwrap_err().kind(), io::ErrorKind::NotFound);

        // Stream still being written: the writer finishes, its readers get every byte, and
        // nothing is left in storage.
        let mut w = Writer::create(s.clone(), "rwu2").unwrap();
        let r = w.reader().unwrap();
        let reader = spawn("reader", move || read_all(&mut { r }).unwrap());
        w.write_all(&pattern(0, 2 * MIB)).unwrap();
        w.stream().remove_when_unused();
        // New handles' readers are refused, the writer's are not (it may finish).
        assert!(matches!(w.stream().reader(), Err(Error::Closed { .. })));
        let mut late = w.reader().unwrap();
        w.write_all(&pattern(2 * MIB as u64, 10)).unwrap();
        w.finish().unwrap();
        let got = reader.join();
        assert_eq!(got.len(), 2 * MIB + 10);
        assert_pattern(&got, 0);
        assert_eq!(read_all(&mut late).unwrap(), got);
        drop(late);
        assert_eq!(s.open("rwu2").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert!(s.list().unwrap().is_empty());
    });
}

/// Go `ReadAt` wait: `read_at` blocks until the whole range is written, then returns it all;
/// at the end of a finished stream it returns what there is, then 0.
#[test]
fn read_at_waits_until_range_written() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "read-at").unwrap();
        let r = Arc::new(w.reader().unwrap());
        w.write_all(&pattern(0, 50)).unwrap();
        w.flush().unwrap();
        let waiting = {
            let r = r.clone();
            spawn("read_at(100..110)", move || {
                let mut buf = [0; 10];
                r.read_at(&mut buf, 100).map(|n| (n, buf))
            })
        };
        waiting.assert_blocked(BLOCKED_GRACE);
        // Half of the range is not enough.
        w.write_all(&pattern(50, 55)).unwrap();
        w.flush().unwrap();
        waiting.assert_blocked(BLOCKED_GRACE);
        w.write_all(&pattern(105, 20)).unwrap();
        w.flush().unwrap();
        let (n, buf) = waiting.join().unwrap();
        assert_eq!(n, 10);
        assert_pattern(&buf, 100);
        // A range that the finished stream only partly covers.
        let tail = {
            let r = r.clone();
            spawn("read_at(120..140)", move || {
                let mut buf = [0; 20];
                r.read_at(&mut buf, 120).map(|n| buf[..n].to_vec())
            })
        };
        tail.assert_blocked(BLOCKED_GRACE);
        w.finish().unwrap();
        let got = tail.join().unwrap();
        assert_eq!(got.len(), 5);
        assert_pattern(&got, 120);
        let mut buf = [0; 4];
        assert_eq!(r.read_at(&mut buf, 125).unwrap(), 0);
        assert_eq!(r.read_at(&mut buf, 10_000).unwrap(), 0);
        // read_at does not move the read position.
        let mut r = Arc::try_unwrap(r).unwrap();
        assert_eq!(r.position(), 0);
        let all = read_all(&mut r).unwrap();
        assert_eq!(all.len(), 125);
        assert_pattern(&all, 0);
    });
}

/// `SeekFrom::Start` and `SeekFrom::Current` never block, even with the writer stalled;
/// reads after them wait for the bytes there.
#[test]
fn seek_start_and_current_never_block() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "seek").unwrap();
        let mut r = w.reader().unwrap();
        w.write_all(&pattern(0, 10)).unwrap();
        w.flush().unwrap();
        // The writer is stalled from here on: if a seek waited, the deadline would fire.
        let r = deadline("seeks", move || {
            assert_eq!(r.seek(SeekFrom::Start(1000)).unwrap(), 1000);
            assert_eq!(r.seek(SeekFrom::Current(-995)).unwrap(), 5);
            assert_eq!(r.seek(SeekFrom::Current(3)).unwrap(), 8);
            assert_eq!(r.stream_position().unwrap(), 8);
            let e = r.seek(SeekFrom::Current(-9)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert_eq!(r.position(), 8, "failed seek moved the position");
            let mut two = [0; 2];
            r.read_exact(&mut two).unwrap();
            assert_pattern(&two, 8);
            r.seek(SeekFrom::Start(20)).unwrap();
            r
        });
        let reading = spawn("read at 20", move || {
            let mut r = r;
            let mut buf = [0; 5];
            r.read_exact(&mut buf).map(|()| buf)
        });
        reading.assert_blocked(BLOCKED_GRACE);
        w.write_all(&pattern(10, 20)).unwrap();
        w.flush().unwrap();
        assert_pattern(&reading.join().unwrap(), 20);
        w.finish().unwrap();
    });
}

/// `SeekFrom::End` waits for finish; with a declared length it does not.
#[test]
fn seek_end_waits_for_finish_unless_length_declared() {
    on_each_storage(|s| {
        let mut w = Writer::create(s.clone(), "seek-end").unwrap();
        let r = w.reader().unwrap();
        w.write_all(&pattern(0, 100)).unwrap();
        w.flush().unwrap();
        let seeking = spawn("seek end", move || {
            let mut r = r;
            r.seek(SeekFrom::End(-10)).map(|p| (p, r))
        });
        seeking.assert_blocked(BLOCKED_GRACE);
        w.write_all(&pattern(100, 50)).unwrap();
        w.finish().unwrap();
        let (pos, mut r) = seeking.join().unwrap();
        assert_eq!(pos, 140);
        let tail = read_all(&mut r).unwrap();
        assert_eq!(tail.len(), 10);
        assert_pattern(&tail, 140);
        assert_eq!(
            r.seek(SeekFrom::End(5)).unwrap(),
            155,
            "past the end is allowed"
        );
        assert_eq!(r.read(&mut [0; 4]).unwrap(), 0);

        // Declared length: no waiting, even with the writer stalled.
        let mut w = Writer::create(s, "seek-end-declared").unwrap();
        w.set_expected_len(300).unwrap();
        let r = w.reader().unwrap();
        assert_eq!(r.expected_len(), Some(300));
        w.write_all(&pattern(0, 10)).unwrap();
        w.flush().unwrap();
        let r = deadline("seek end, declared", move || {
            let mut r = r;
            assert_eq!(r.seek(SeekFrom::End(-20)).unwrap(), 280);
            r
        });
        let reading = spawn("read tail", move || read_all(&mut { r }));
        reading.assert_blocked(BLOCKED_GRACE);
        w.write_all(&pattern(10, 290)).unwrap();
        w.finish().unwrap();
        let tail = reading.join().unwrap();
        assert_eq!(tail.len(), 20);
        assert_pattern(&tail, 280);
    });
}

/// `abort` (with or without a cause) and dropping the writer without `finish` give every
/// reader `Error::Aborted` — blocked or not, sequential or positional — never a clean EOF.
#[test]
fn abort_and_drop_give_aborted_never_eof() {
    #[derive(Clone, Copy, Debug)]
    enum End {
        Abort,
        AbortWith,
        Drop,
    }
    for end in [End::Abort, End::AbortWith, End::Drop] {
        on_each_storage_with(end, |s, end| {
            let mut w = Writer::create(s.clone(), "abort").unwrap();
            let stream = w.stream();
            let mut r_idle = w.reader().unwrap();
            let blocked_seq = {
                let r = w.reader().unwrap();
                spawn("read_to_end", move || read_all(&mut { r }))
            };
            let blocked_at = {
                let r = w.reader().unwrap();
                spawn("read_at", move || r.read_at(&mut [0; 10], 2 * MIB as u64))
            };
            w.write_all(&pattern(0, MIB + 500)).unwrap();
            w.flush().unwrap();
            blocked_seq.assert_blocked(BLOCKED_GRACE);
            blocked_at.assert_blocked(BLOCKED_GRACE);
            match end {
                End::Abort => w.abort(),
                End::AbortWith => w.abort_with("producer failed"),
                End::Drop => drop(w),
            }
            for e in [
                blocked_seq.join().unwrap_err(),
                blocked_at.join().unwrap_err(),
            ] {
                assert_aborted(&e);
            }
            // A reader that has data left may read the published bytes, but must end in an
            // error, not EOF.
            let mut got = Vec::new();
            let e = loop {
                let mut buf = vec![0; 64 * 1024];
                match r_idle.read(&mut buf) {
                    Ok(0) => panic!("clean EOF on an aborted stream after {} bytes", got.len()),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => break e,
                }
            };
            assert_aborted(&e);
            assert_pattern(&got, 0);
            match end {
                End::AbortWith => assert_cause(&e, "producer failed"),
                End::Drop => assert_cause(&e, "dropped"),
                End::Abort => {}
            }
            assert_aborted(&r_idle.read_at(&mut [0; 4], 0).unwrap_err());
            // Readers made after the abort fail too.
            if let Ok(mut late) = stream.reader() {
                assert_aborted(&read_all(&mut late).unwrap_err());
            }
            assert!(!stream.size().finished);
            assert_eq!(s.open("abort").unwrap_err().kind(), io::ErrorKind::NotFound);
            assert!(s.list().unwrap().is_empty());
        });
    }
}

fn on_each_storage_with<T: Copy + Send + 'static>(arg: T, body: fn(Arc<dyn Storage>, T)) {
    for (name, make) in stores() {
        deadline(name, move || {
            let s = make();
            body(s.storage.clone(), arg);
        });
    }
}

/// A storage write error (ENOSPC) aborts the stream: the writer gets the error, readers get
/// `Aborted` with the cause, nothing is committed.
#[test]
fn storage_write_error_aborts() {
    for (name, make) in stores() {
        deadline(name, move || {
            let inner = make();
            let faulty = FaultyStorage::wrap(inner.storage.clone());
            let s: Arc<dyn Storage> = Arc::new(faulty.clone());
            let mut w = Writer::create(s.clone(), "enospc").unwrap();
            let r = w.reader().unwrap();
            let reader = spawn("reader", move || read_all(&mut { r }));
            faulty.fail_nth(FaultOp::Write, 3, io::ErrorKind::StorageFull);
            w.write_all(&pattern(0, 100)).unwrap();
            w.flush().unwrap();
            w.write_all(&pattern(100, 100)).unwrap();
            let e = w.write_all(&pattern(200, 100)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
            let e = reader.join().unwrap_err();
            assert_aborted(&e);
            assert_cause(&e, "write");
            // The writer is dead: further writes and finish fail.
            assert!(w.write_all(b"x").is_err());
            assert!(w.finish().is_err());
            assert_eq!(
                s.open("enospc").unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
        });
    }
}

/// A commit error aborts too; a read error reaches the reader with its kind.
#[test]
fn storage_commit_and_read_errors() {
    for (name, make) in stores() {
        deadline(name, move || {
            let inner = make();
            let faulty = FaultyStorage::wrap(inner.storage.clone());
            let s: Arc<dyn Storage> = Arc::new(faulty.clone());
            let mut w = Writer::create(s.clone(), "commit").unwrap();
            let mut r = w.reader().unwrap();
            w.write_all(b"data").unwrap();
            faulty.fail_nth(FaultOp::Commit, 1, io::ErrorKind::PermissionDenied);
            let e = w.finish().unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert_aborted(&read_all(&mut r).unwrap_err());
            assert_eq!(
                s.open("commit").unwrap_err().kind(),
                io::ErrorKind::NotFound
            );

            let mut w = Writer::create(s.clone(), "read").unwrap();
            let mut r = w.reader().unwrap();
            w.write_all(&pattern(0, 100)).unwrap();
            w.finish().unwrap();
            faulty.fail_nth(FaultOp::Read, 1, io::ErrorKind::TimedOut);
            let e = r.read(&mut [0; 10]).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::TimedOut);
            let got = read_all(&mut r).unwrap();
            assert_eq!(got.len(), 100);
            assert_pattern(&got, 0);
        });
    }
}

/// A small unflushed write is not published (readers need not wake); `flush` publishes and
/// wakes a waiting reader at once; 1 MiB of writes publishes without a flush.
#[test]
fn flush_wakes_waiting_reader() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "flush").unwrap();
        let stream = w.stream();
        let r = w.reader().unwrap();
        let waiting = spawn("reader", move || {
            let mut r = r;
            let mut buf = [0; 100];
            let n = r.read(&mut buf)?;
            Ok::<_, io::Error>(buf[..n].to_vec())
        });
        w.write_all(&pattern(0, 10)).unwrap();
        assert_eq!(stream.size().len, 0, "small write published without flush");
        waiting.assert_blocked(BLOCKED_GRACE);
        w.flush().unwrap();
        assert_eq!(stream.size().len, 10);
        let got = waiting.join().unwrap();
        assert_eq!(got.len(), 10);
        assert_pattern(&got, 0);

        // 1 MiB of progress publishes on its own.
        let r = w.reader().unwrap();
        let waiting = spawn("reader 2", move || {
            let mut r = r;
            let mut buf = vec![0; 64];
            r.seek(SeekFrom::Start(MIB as u64)).unwrap();
            r.read_exact(&mut buf).map(|()| buf)
        });
        w.write_all(&pattern(10, MIB + 100)).unwrap();
        assert!(stream.size().len >= MIB as u64 + 64);
        assert_pattern(&waiting.join().unwrap(), MIB as u64);
        w.finish().unwrap();
    });
}

/// A declared length: readers see it; writing past it or finishing short is an error that
/// aborts the stream; declaring less than what is written is refused.
#[test]
fn declared_length_is_enforced() {
    on_each_storage(|s| {
        // Exact: fine.
        let mut w = Writer::create(s.clone(), "exact").unwrap();
        w.set_expected_len(10).unwrap();
        let mut r = w.reader().unwrap();
        assert_eq!(w.stream().expected_len(), Some(10));
        w.write_all(&pattern(0, 10)).unwrap();
        w.finish().unwrap();
        assert_eq!(read_all(&mut r).unwrap().len(), 10);

        // Past it.
        let mut w = Writer::create(s.clone(), "over").unwrap();
        w.set_expected_len(10).unwrap();
        let mut r = w.reader().unwrap();
        w.write_all(&pattern(0, 8)).unwrap();
        let e = w.write_all(&pattern(8, 3)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert_aborted(&read_all(&mut r).unwrap_err());
        assert!(w.finish().is_err());
        assert_eq!(s.open("over").unwrap_err().kind(), io::ErrorKind::NotFound);

        // Short of it.
        let mut w = Writer::create(s.clone(), "short").unwrap();
        w.set_expected_len(10).unwrap();
        let mut r = w.reader().unwrap();
        w.write_all(&pattern(0, 9)).unwrap();
        assert!(matches!(w.finish(), Err(Error::InvalidInput { .. })));
        assert_aborted(&read_all(&mut r).unwrap_err());
        assert_eq!(s.open("short").unwrap_err().kind(), io::ErrorKind::NotFound);

        // Less than already written.
        let mut w = Writer::create(s.clone(), "late").unwrap();
        w.write_all(&pattern(0, 20)).unwrap();
        assert!(matches!(
            w.set_expected_len(19),
            Err(Error::InvalidInput { .. })
        ));
        w.set_expected_len(20).unwrap();
        w.finish().unwrap();
    });
}

/// Metadata set by the writer is visible to readers at once and after reopening the blob.
#[test]
fn metadata_visible_to_readers() {
    on_each_storage(|s| {
        let mut w = Writer::create(s.clone(), "meta").unwrap();
        let r = w.reader().unwrap();
        assert!(r.metadata().is_empty());
        w.set_metadata(&b"content-type: text/plain"[..]);
        assert_eq!(&r.metadata()[..], b"content-type: text/plain");
        w.write_all(b"body").unwrap();
        w.finish().unwrap();
        let reopened = Stream::open(s.clone(), "meta").unwrap();
        assert_eq!(
            &reopened.reader().unwrap().metadata()[..],
            b"content-type: text/plain"
        );
    });
}

/// `size` reports the published length and whether it is final, from writer, stream and reader.
#[test]
fn size_reports_len_and_finished() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "size").unwrap();
        let stream = w.stream();
        let r = w.reader().unwrap();
        let sz = stream.size();
        assert_eq!((sz.len, sz.finished), (0, false));
        w.write_all(&pattern(0, 123)).unwrap();
        w.flush().unwrap();
        assert_eq!(w.written(), 123);
        let sz = r.size();
        assert_eq!((sz.len, sz.finished), (123, false));
        w.write_all(&pattern(123, 7)).unwrap();
        w.finish().unwrap();
        let sz = r.size();
        assert_eq!((sz.len, sz.finished), (130, true));
        assert_eq!(stream.size(), r.size());
        assert_eq!(stream.handles(), 1, "one reader left, writer gone");
        drop(r);
        assert_eq!(stream.handles(), 0);
    });
}

/// `read_chunk` on memory storage hands out the storage's own buffers (no copy) and the right
/// bytes; on disk it returns the right bytes too.
#[test]
fn read_chunk_returns_right_bytes_zero_copy_on_memory() {
    for (name, make) in stores() {
        deadline(name, move || {
            let st = make();
            let s = st.storage.clone();
            let len = 2 * MIB + 999;
            let mut w = Writer::create(s.clone(), "chunks").unwrap();
            let mut r = w.reader().unwrap();
            let sizes = [1usize, 100, 7, MIB, 3 * MIB];
            let reading = spawn("read_chunk", move || {
                let mut got = Vec::new();
                let mut i = 0;
                loop {
                    let max = sizes[i % sizes.len()];
                    i += 1;
                    let chunk = r.read_chunk(max).unwrap();
                    if chunk.is_empty() {
                        break;
                    }
                    assert!(chunk.len() <= max);
                    got.extend_from_slice(&chunk);
                }
                assert_eq!(r.read_chunk(0).unwrap().len(), 0);
                got
            });
            for (i, piece) in pattern(0, len).chunks(77_777).enumerate() {
                w.write_all(piece).unwrap();
                if i % 3 == 0 {
                    w.flush().unwrap();
                }
            }
            w.finish().unwrap();
            let got = reading.join();
            assert_eq!(got.len(), len);
            assert_pattern(&got, 0);

            let mut r = Stream::open(s.clone(), "chunks").unwrap().reader().unwrap();
            r.seek(SeekFrom::Start(MIB as u64 + 5)).unwrap();
            let chunk = r.read_chunk(1000).unwrap();
            assert_eq!(chunk.len(), 1000);
            assert_pattern(&chunk, MIB as u64 + 5);
            if name == "memory" {
                let (blob, _) = s.open("chunks").unwrap();
                let direct = blob.read_bytes(MIB as u64 + 5, 1000).unwrap().unwrap();
                assert_eq!(chunk.as_ptr(), direct.as_ptr(), "read_chunk copied");
            }
        });
    }
}

/// A stalled reader (holds a reader and never reads) blocks neither the writer nor the others.
#[test]
fn stalled_reader_blocks_nobody() {
    on_each_storage(|s| {
        let len = 8 * MIB + 3;
        let mut w = Writer::create(s, "stalled").unwrap();
        let stalled = w.reader().unwrap();
        let r = w.reader().unwrap();
        let reader = spawn("active", move || read_all(&mut { r }).unwrap());
        for piece in pattern(0, len).chunks(100_003) {
            w.write_all(piece).unwrap();
        }
        w.finish().unwrap();
        let got = reader.join();
        assert_eq!(got.len(), len);
        assert_pattern(&got, 0);
        assert_eq!(stalled.position(), 0);
        drop(stalled);
    });
}

/// Readers, writer and stream handles move across threads and outlive each other.
#[test]
fn handles_are_send_and_static() {
    fn check<T: Send + 'static>() {}
    check::<Writer>();
    check::<Reader>();
    check::<Stream>();
    fn sync<T: Sync>() {}
    sync::<Stream>();
}

// ---------------------------------------------------------------------------------------------
// Stress.

/// 1 writer, 32 readers (+ a stalled one), 16 MiB in odd-sized writes: every reader checks
/// every byte it reads; some read sequentially, some in zero-copy chunks, some at random
/// offsets, some join late, some drop early.
fn fan_out(s: Arc<dyn Storage>, seed: u64) {
    const READERS: usize = 32;
    let len: u64 = 16 * MIB as u64;
    let mut w = Writer::create(s.clone(), "stress").unwrap();
    let stream = w.stream();
    let barrier = Arc::new(Barrier::new(READERS + 1));
    let _stalled = w.reader().unwrap();
    let checked = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for i in 0..READERS {
        // Half the readers exist before writing starts; the others are made by their thread
        // once the writer is under way.
        let early = if i % 2 == 0 {
            Some(w.reader().unwrap())
        } else {
            None
        };
        let (stream, barrier, checked) = (stream.clone(), barrier.clone(), checked.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng::new(seed ^ (i as u64 * 7919));
            barrier.wait();
            let mut r = early.unwrap_or_else(|| stream.reader().unwrap());
            match i % 4 {
                // Sequential reads with odd buffer sizes.
                0 => {
                    let mut pos = 0u64;
                    let mut buf = vec![0; 200_000];
                    loop {
                        let want = 1 + rng.below(buf.len() as u64) as usize;
                        let n = r.read(&mut buf[..want]).unwrap();
                        if n == 0 {
                            break;
                        }
                        assert_pattern(&buf[..n], pos);
                        pos += n as u64;
                    }
                    assert_eq!(pos, len, "reader {i}");
                    checked.fetch_add(pos, Ordering::Relaxed);
                }
                // Zero-copy chunks.
                1 => {
                    let mut pos = 0u64;
                    loop {
                        let chunk = r
                            .read_chunk(1 + rng.below(3 * MIB as u64) as usize)
                            .unwrap();
                        if chunk.is_empty() {
                            break;
                        }
                        assert_pattern(&chunk, pos);
                        pos += chunk.len() as u64;
                    }
                    assert_eq!(pos, len, "reader {i}");
                    checked.fetch_add(pos, Ordering::Relaxed);
                }
                // Positional reads anywhere (they wait for the range), then a full pass.
                2 => {
                    let mut buf = vec![0; 70_000];
                    for _ in 0..40 {
                        let n = 1 + rng.below(buf.len() as u64) as usize;
                        let off = rng.below(len - n as u64 + 1);
                        assert_eq!(r.read_at(&mut buf[..n], off).unwrap(), n);
                        assert_pattern(&buf[..n], off);
                    }
                    let all = read_all(&mut r).unwrap();
                    assert_eq!(all.len() as u64, len, "reader {i}");
                    assert_pattern(&all, 0);
                    checked.fetch_add(len, Ordering::Relaxed);
                }
                // Drop early, after a random prefix.
                _ => {
                    let stop = rng.below(len / 2);
                    let mut buf = vec![0; 50_001];
                    let mut pos = 0;
                    while pos < stop {
                        let n = r.read(&mut buf).unwrap();
                        assert!(n > 0);
                        assert_pattern(&buf[..n], pos);
                        pos += n as u64;
                    }
                    drop(r);
                }
            }
        }));
    }
    let mut rng = Rng::new(seed);
    barrier.wait();
    let mut pos = 0u64;
    while pos < len {
        // Odd sizes from 1 byte to ~300 KiB, with occasional flushes.
        let n = (1 + 2 * rng.below(150_000)).min(len - pos) as usize;
        w.write_all(&pattern(pos, n)).unwrap();
        pos += n as u64;
        if rng.below(8) == 0 {
            w.flush().unwrap();
        }
    }
    w.finish().unwrap();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(checked.load(Ordering::Relaxed), 24 * len);
    let (_, info) = s.open("stress").unwrap();
    assert_eq!(info.len, len);
}

#[test]
fn stress_fan_out_memory() {
    deadline("fan-out on memory", || {
        fan_out(Arc::new(MemoryStorage::new()), 1)
    });
}

#[test]
fn stress_fan_out_disk() {
    deadline("fan-out on disk", || {
        let st = disk();
        fan_out(st.storage.clone(), 2);
    });
}

// ---------------------------------------------------------------------------------------------
// A removed stream's writer keeps its readers (DESIGN.md: "a writer of a removed entry may keep
// writing and finish, and its readers still get every byte").
// ---------------------------------------------------------------------------------------------

/// Regression: a removal closed the stream to *every* new reader, the writer's own included,
/// so `Writer::reader()` failed with `Closed` on a stream its writer went on to finish.
/// Handles (`Stream::reader`) stay refused; a shutdown or cancel still refuses the writer too.
#[test]
fn writer_reader_after_remove_when_unused_gets_every_byte() {
    on_each_storage(|s| {
        let len = 2 * MIB + 7;
        let mut w = Writer::create(s.clone(), "doomed").unwrap();
        let stream = w.stream();
        w.write_all(&pattern(0, 1000)).unwrap();
        stream.remove_when_unused();
        assert!(matches!(stream.reader(), Err(Error::Closed { .. })));
        let mut early = w.reader().expect("the writer's reader after a removal");
        w.write_all(&pattern(1000, len - 1000)).unwrap();
        let mut late = w.reader().expect("a second one, mid-write");
        w.finish().unwrap();
        for r in [&mut early, &mut late] {
            let got = read_all(r).unwrap();
            assert_eq!(got.len(), len);
            assert_pattern(&got, 0);
        }
        let mut buf = [0; 10];
        assert_eq!(late.read_at(&mut buf, 2 * MIB as u64).unwrap(), 7);
        assert_pattern(&buf[..7], 2 * MIB as u64);
        assert!(matches!(stream.reader(), Err(Error::Closed { .. })));
        drop((early, late, stream));
        assert_eq!(
            s.open("doomed").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    });
}

/// A shutdown after a removal still refuses the writer's readers (and the reverse order too).
#[test]
fn writer_reader_refused_after_shutdown_even_when_removed() {
    on_each_storage(|s| {
        let w = Writer::create(s.clone(), "shut").unwrap();
        w.stream().remove_when_unused();
        w.stream().shutdown_with("no more");
        assert_eq!(closed_cause(&w.reader().unwrap_err()), "removed");
        let w = Writer::create(s, "shut2").unwrap();
        w.stream().shutdown_with("no more");
        w.stream().remove_when_unused();
        assert_eq!(closed_cause(&w.reader().unwrap_err()), "no more");
    });
}

/// A cancelled removed stream: the writer's readers are refused; ones opened before fail.
#[test]
fn writer_reader_of_removed_then_cancelled_stream_fails() {
    on_each_storage(|s| {
        let mut w = Writer::create(s, "cancelled").unwrap();
        let stream = w.stream();
        stream.remove_when_unused();
        let mut r = w.reader().unwrap();
        w.write_all(b"bytes").unwrap();
        w.flush().unwrap();
        stream.cancel_with("stop");
        assert!(matches!(w.reader(), Err(Error::Closed { .. })));
        let mut buf = [0; 4];
        assert_cause(&r.read(&mut buf).unwrap_err(), "stop");
        assert!(matches!(w.finish(), Err(Error::Closed { .. })));
    });
}

/// The same through a cache: `remove` between the miss and `Writer::reader()`.
#[test]
fn cache_writer_reader_after_remove_gets_every_byte() {
    deadline("cache remove then writer reader", || {
        let cache = streamcache::Cache::builder().memory().build().unwrap();
        let streamcache::Entry::Miss(mut w) = cache.get_or_create("k").unwrap() else {
            panic!("fresh cache")
        };
        assert!(cache.remove("k").unwrap());
        let mut r = w.reader().expect("the writer's reader after Cache::remove");
        let len = MIB + 3;
        w.write_all(&pattern(0, len)).unwrap();
        w.finish().unwrap();
        let got = read_all(&mut r).unwrap();
        assert_eq!(got.len(), len);
        assert_pattern(&got, 0);
        assert!(matches!(
            cache.get_or_create("k").unwrap(),
            streamcache::Entry::Miss(_)
        ));
    });
}
