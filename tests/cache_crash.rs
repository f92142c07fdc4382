//! Crash safety: a process killed with SIGKILL in the middle of a write leaves a directory
//! that reopens with every finished entry intact and no trace of the unfinished one.
//!
//! The test re-executes its own binary in "child mode" (selected by an environment variable
//! and an exact test-name filter); the child writes, reports readiness on stdout and waits to
//! be killed.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;

use streamcache::Cache;
use support::*;

const CHILD_ENV: &str = "STREAMCACHE_CRASH_CHILD_DIR";
const READY: &str = "STREAMCACHE-CHILD-READY";
const A_LEN: usize = 3 * (1 << 20) + 11;
const B_HALF: usize = 5 * (1 << 20) / 2;

/// The child's body: a no-op unless the parent selected it.
#[test]
fn child_mode() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let cache = Cache::builder().disk(Path::new(&dir)).build().unwrap();
    put(&cache, "A", &pattern(A_LEN, 1));
    let mut w = miss(&cache, "B");
    w.write_all(&pattern(B_HALF, 2)).unwrap();
    w.flush().unwrap();
    ready_then_wait(); // never finishes B
}

/// Child side: tells the parent it is ready, then waits to be killed.
fn ready_then_wait() -> ! {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{READY}").unwrap();
    out.flush().unwrap();
    drop(out);
    loop {
        thread::park();
    }
}

/// A child process running one test of this binary in child mode, past its readiness line.
/// Killed when dropped, so a failing assertion leaves no process parked behind.
struct ReadyChild {
    child: Child,
    lines: Option<thread::JoinHandle<()>>,
}

impl ReadyChild {
    /// Runs the test `name` with `env` set to `dir`; returns once it reports readiness, and
    /// fails the test (killing it) if it does not within the deadline.
    fn spawn(name: &str, env: &str, dir: &Path) -> ReadyChild {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(env, dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let lines = thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.contains(READY) {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(DEADLINE).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("child {name} never reported readiness (crashed or deadlocked)");
        }
        ReadyChild {
            child,
            lines: Some(lines),
        }
    }

    /// SIGKILL (on Unix); returns once the process is gone.
    fn kill(mut self) -> std::process::ExitStatus {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        if let Some(lines) = self.lines.take() {
            lines.join().unwrap();
        }
        status
    }
}

impl Drop for ReadyChild {
    fn drop(&mut self) {
        // After `kill` these fail harmlessly (the child is reaped; `wait` returns its status).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn sigkill_mid_write_keeps_finished_entries_only() {
    let dir = tempfile::tempdir().unwrap();
    let child = ReadyChild::spawn("child_mode", CHILD_ENV, dir.path());
    // The child is mid-write: B's bytes are staged in tmp/ (else the test proves nothing).
    let staged: u64 = files_under(&dir.path().join("tmp"))
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    assert!(
        staged >= B_HALF as u64,
        "B not staged in tmp/ ({staged} bytes)"
    );
    assert_eq!(data_files(dir.path()).len(), 1, "only A is committed");

    let status = child.kill();
    assert!(
        !status.success(),
        "child was supposed to be killed: {status:?}"
    );

    let cache = deadline("reopen after crash", {
        let dir = dir.path().to_path_buf();
        move || Cache::builder().disk(dir).build().unwrap()
    });
    assert!(
        get_bytes(&cache, "A") == pattern(A_LEN, 1),
        "finished entry damaged"
    );
    assert!(
        cache.get("B").unwrap().is_none(),
        "half-written entry served"
    );
    assert_eq!(cache.keys(), ["A"]);
    assert!(
        files_under(&dir.path().join("tmp")).is_empty(),
        "tmp/ not wiped at open"
    );
    // B can be written again from scratch.
    put(&cache, "B", b"whole");
    assert_eq!(get_bytes(&cache, "B"), b"whole");
    drop(cache);
    let cache = Cache::builder().disk(dir.path()).build().unwrap();
    assert_eq!(get_bytes(&cache, "B"), b"whole");
}

const LOCK_ENV: &str = "STREAMCACHE_LOCK_CHILD_DIR";

/// Child body for the cross-process lock test: holds the cache open until killed.
#[test]
fn lock_child_mode() {
    let Some(dir) = std::env::var_os(LOCK_ENV) else {
        return;
    };
    let cache = Cache::builder().disk(Path::new(&dir)).build().unwrap();
    put(&cache, "from-child", b"child");
    ready_then_wait();
}

/// Another live process holding the directory makes `build` fail with `Error::Locked`
/// naming it; once that process dies (even by SIGKILL) the directory opens again.
#[test]
fn directory_locked_by_another_process() {
    let dir = tempfile::tempdir().unwrap();
    let child = ReadyChild::spawn("lock_child_mode", LOCK_ENV, dir.path());
    let refused = Cache::builder().disk(dir.path()).build();
    child.kill();
    match refused {
        Err(streamcache::Error::Locked { dir: d }) => assert_eq!(d, dir.path()),
        other => panic!("expected Error::Locked while the child lives, got {other:?}"),
    }
    let cache = Cache::builder().disk(dir.path()).build().unwrap();
    assert_eq!(get_bytes(&cache, "from-child"), b"child");
}
