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

const JOURNAL_ENV: &str = "STREAMCACHE_JOURNAL_CHILD_DIR";

/// Child side of the journal test: 200 entries, a hint saved by the reaper, then changes the
/// hint does not show (50 new entries, 10 removed, one replaced); reports readiness and
/// waits to be killed.
#[test]
fn journal_child_mode() {
    let Some(dir) = std::env::var_os(JOURNAL_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let cache = Cache::builder()
        .disk(dir)
        .startup_wait(std::time::Duration::MAX)
        .build()
        .unwrap();
    for i in 0..200 {
        put(&cache, &format!("k{i}"), &pattern(1000 + i, i as u64));
    }
    // A new directory has no hint: the reaper's next pass saves one.
    cache.run_pending_tasks();
    assert!(
        dir.join("index-hint").exists(),
        "no hint saved by the reaper"
    );
    for i in 0..50 {
        put(&cache, &format!("j{i}"), &pattern(500 + i, 7));
    }
    for i in 0..10 {
        cache.remove(&format!("k{i}")).unwrap();
    }
    cache.remove("k10").unwrap();
    put(&cache, "k10", b"replaced");
    cache.run_pending_tasks();
    ready_then_wait();
}

/// After a crash, the hint the reaper saved and the storage's journal of the changes since
/// give back exactly the committed entries, without listing the directory: a decoy (a copy
/// of an entry's files under a newer version of its key) that a listing would pick instead
/// is left alone.
#[test]
fn sigkill_after_changes_reopens_from_the_hint_and_journal() {
    let dir = tempfile::tempdir().unwrap();
    let child = ReadyChild::spawn("journal_child_mode", JOURNAL_ENV, dir.path());
    assert!(!child.kill().success());
    assert!(dir.path().join("index-hint").exists());
    assert!(dir.path().join("index-journal").exists());
    // The decoy: k100's record and data under the same key hash with a much higher id (a
    // blob is named <key hash>-<id, 16 hex digits>; its record holds the key after its u64
    // length).
    let mut key_in_record = 4u64.to_le_bytes().to_vec();
    key_in_record.extend_from_slice(b"k100");
    let meta = files_under(&dir.path().join("v1"))
        .into_iter()
        .find(|p| {
            p.extension().is_some_and(|e| e == "meta")
                && std::fs::read(p)
                    .unwrap()
                    .windows(key_in_record.len())
                    .any(|w| w == key_in_record)
        })
        .expect("k100's record");
    let name = meta.file_stem().unwrap().to_str().unwrap().to_owned();
    let (hash, id) = name.rsplit_once('-').unwrap();
    let decoy = format!(
        "{hash}-{:016x}",
        u64::from_str_radix(id, 16).unwrap() + 1000
    );
    let shard = meta.parent().unwrap();
    std::fs::copy(shard.join(&name), shard.join(&decoy)).unwrap();
    std::fs::copy(&meta, shard.join(format!("{decoy}.meta"))).unwrap();
    let cache = deadline("reopen after crash", {
        let dir = dir.path().to_path_buf();
        move || {
            Cache::builder()
                .disk(dir)
                .startup_wait(std::time::Duration::MAX)
                .build()
                .unwrap()
        }
    });
    for i in 0..10 {
        assert!(
            cache.get(&format!("k{i}")).unwrap().is_none(),
            "k{i} came back"
        );
    }
    assert_eq!(get_bytes(&cache, "k10"), b"replaced");
    for i in 11..200 {
        assert_eq!(
            get_bytes(&cache, &format!("k{i}")),
            pattern(1000 + i, i as u64)
        );
    }
    for i in 0..50 {
        assert_eq!(get_bytes(&cache, &format!("j{i}")), pattern(500 + i, 7));
    }
    assert_eq!(cache.len(), 240);
    // A listing would have kept the decoy, the newer version, and deleted the original.
    assert!(
        shard.join(&name).exists() && shard.join(&decoy).exists(),
        "the directory was listed"
    );
    assert_eq!(data_files(dir.path()).len(), 241);
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
