//! Child processes for fault tests: a test binary re-executes itself in "child mode" (one
//! test selected by an exact name filter, `CHILD_ENV` set to a directory), optionally with a
//! lowered open-file limit, and talks back through marked lines on its stdout.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const CHILD_ENV: &str = "STREAMCACHE_TEST_CHILD_DIR";
pub const READY: &str = "STREAMCACHE-CHILD-READY";
pub const REPORT: &str = "STREAMCACHE-CHILD-REPORT";

/// How long a child may take before it counts as hung.
pub const CHILD_DEADLINE: Duration = Duration::from_secs(20);

/// A child process running the test `name` of this binary in child mode (`CHILD_ENV` set to
/// `dir`), with its stdout lines collected. Killed when dropped.
pub struct ChildRun {
    child: Child,
    lines: mpsc::Receiver<String>,
    name: String,
}

impl ChildRun {
    pub fn spawn(name: &str, dir: &Path) -> ChildRun {
        Self::spawn_with(name, dir, None)
    }

    /// As `spawn`, with these environment variables set in the child.
    pub fn spawn_env(name: &str, dir: &Path, envs: &[(&str, &str)]) -> ChildRun {
        Self::spawn_full(name, dir, None, envs)
    }

    /// `nofile`: the child's open-file limit, set with `prlimit` (util-linux); `None` if it
    /// is not installed.
    pub fn spawn_with(name: &str, dir: &Path, nofile: Option<u32>) -> ChildRun {
        Self::spawn_full(name, dir, nofile, &[])
    }

    fn spawn_full(name: &str, dir: &Path, nofile: Option<u32>, envs: &[(&str, &str)]) -> ChildRun {
        let exe = std::env::current_exe().unwrap();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg("--").arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .args(["--exact", name, "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildRun {
            child,
            lines,
            name: name.to_owned(),
        }
    }

    /// Waits for a line containing `marker`; fails the test if the child does not print one
    /// within the deadline.
    pub fn line(&self, marker: &str) -> String {
        let until = Instant::now() + CHILD_DEADLINE;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(_) => {}
                Err(_) => panic!(
                    "child {} printed no {marker} within {CHILD_DEADLINE:?} (hung, aborted or failed)",
                    self.name
                ),
            }
        }
    }

    /// Waits for the child to exit on its own; fails the test if it does not in time.
    pub fn wait(mut self) -> std::process::ExitStatus {
        let until = Instant::now() + CHILD_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "child {} still running after {CHILD_DEADLINE:?}",
                self.name
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ChildRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn child_dir() -> Option<PathBuf> {
    std::env::var_os(CHILD_ENV).map(PathBuf::from)
}

/// Peak resident memory of this process in KiB (`VmHWM`), if the kernel reports it.
pub fn peak_rss_kib() -> Option<u64> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn report(fields: &str) {
    let mut out = io::stdout().lock();
    writeln!(out, "{REPORT} {fields}").unwrap();
    out.flush().unwrap();
}

/// Whether `prlimit` (util-linux), used to lower a child's open-file limit, is installed;
/// prints why a test is skipped if not.
pub fn has_prlimit(test: &str) -> bool {
    let ok = Command::new("prlimit")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip(&format!("{test}: prlimit (util-linux) not installed"));
    }
    ok
}

/// Reports a fault test skipped for want of a tool or privilege. Under CI (`CI=true`, as
/// `.ci/run` sets, which also installs the tools) a skip is a failure: the fault must be real
/// there.
pub fn skip(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "fault test cannot run under CI: {why}"
    );
    // Straight to the process's stderr, past the test harness's capture, so that a skip
    // shows in a plain `cargo test` run.
    let _ = writeln!(io::stderr(), "SKIPPED {why}");
}

/// Runs the child-mode test `name` with `dir` and at most `nofile` open files, and fails
/// unless it succeeds in time. Skipped (with a message) without `prlimit`.
pub fn run_child_with_nofile(name: &str, nofile: u32, dir: &Path) {
    if !has_prlimit(name) {
        return;
    }
    let status = ChildRun::spawn_with(name, dir, Some(nofile)).wait();
    assert!(status.success(), "child {name} failed: {status:?}");
}
