//! A real S3-compatible server for the shared tier's wire tests: moto (PyPI `moto[server]`),
//! started on 127.0.0.1 for one test binary and killed when dropped.
//!
//! moto runs **single-threaded** (werkzeug `run_simple(..., threaded=False)`): its threaded
//! server lets two conditional PUTs both win now and then.
//!
//! The Python with moto is `$STREAMCACHE_MOTO_PYTHON` (`.ci/run` installs one in a venv), else
//! `python3` if it can import moto. Without one, wire tests print a SKIP line and pass — except
//! under `CI=true`, where a missing server fails them (CI must never skip).

#![allow(unreachable_pub, dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

const LAUNCHER: &str = r#"
import sys
from werkzeug.serving import run_simple
from moto.server import DomainDispatcherApplication, create_backend_app
app = DomainDispatcherApplication(create_backend_app)
run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=False, use_reloader=False, use_debugger=False)
"#;

pub struct Moto {
    child: Child,
    pub endpoint: String,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn python() -> Option<String> {
    let candidates = std::env::var("STREAMCACHE_MOTO_PYTHON")
        .ok()
        .into_iter()
        .chain(["python3".to_string()]);
    for py in candidates {
        let ok = Command::new(&py)
            .args(["-c", "import moto.server, werkzeug"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(py);
        }
    }
    None
}

impl Moto {
    /// Starts moto, or returns `None` after printing why the calling test skips.
    pub fn start(test: &str) -> Option<Moto> {
        Self::start_with(test, false)
    }

    /// As [`start`](Moto::start); `idle` runs the server under `SCHED_IDLE` (`chrt --idle 0`),
    /// so that on a small machine it stands in for a remote bucket: it runs only on a core the
    /// client leaves idle, and a client thread waking up treats a core running only the server
    /// as idle. (`nice -n 19`, used before, still lets the kernel place a woken client thread
    /// beside a busy one while the server holds the other core.)
    pub fn start_with(test: &str, idle: bool) -> Option<Moto> {
        let Some(py) = python() else {
            let why = "no Python with moto[server] (set STREAMCACHE_MOTO_PYTHON, or run .ci/run, which installs it)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: {why}; CI must not skip wire tests"
            );
            // Straight to the process's stderr, past the test harness's capture, so that
            // a skip shows in a plain `cargo test` run.
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            return None;
        };
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let chrt = || {
            Command::new("chrt")
                .args(["--idle", "0", "true"])
                .status()
                .is_ok_and(|s| s.success())
        };
        let mut cmd = if idle && chrt() {
            let mut c = Command::new("chrt");
            c.args(["--idle", "0"]).arg(py);
            c
        } else if idle {
            eprintln!("{test}: no `chrt --idle` here; moto runs at nice 19 instead");
            let mut c = Command::new("nice");
            c.args(["-n", "19"]).arg(py);
            c
        } else {
            Command::new(py)
        };
        let child = cmd
            .args(["-c", LAUNCHER, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto did not start in 60 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
        Some(moto)
    }

    /// Creates `bucket` (a plain unsigned `PUT /bucket`: moto does not check signatures).
    pub fn create_bucket(&self, bucket: &str) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200"),
            "create bucket: {answer}"
        );
    }

    /// A store on `bucket` of this server, as a node would configure it.
    pub fn store(&self, bucket: &str) -> Arc<dyn ObjectStore> {
        Arc::new(store_at(&self.endpoint, bucket))
    }

    /// Suspends the server (SIGSTOP): a bucket that accepts connections and never answers.
    pub fn freeze(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Resumes a frozen server (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

/// An S3 store at `endpoint` (plain HTTP, moto's dummy credentials), with unsigned payloads
/// as `SharedTier::from_url` builds it by default.
pub fn store_at(endpoint: &str, bucket: &str) -> object_store::aws::AmazonS3 {
    AmazonS3Builder::new()
        .with_unsigned_payload(true)
        .with_endpoint(endpoint)
        .with_bucket_name(bucket)
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap()
}
