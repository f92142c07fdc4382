//! Model-based test: random sequences of cache operations, checked after every step against a
//! `BTreeMap` of finished entries plus the list of writers the test holds.
//!
//! Runs on memory storage (reopen = a new `Cache` over the same `MemoryStorage`) and on disk
//! (reopen = drop and rebuild on the same directory).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use streamcache::storage::MemoryStorage;
use streamcache::{Cache, Entry, Reader, Writer};
use support::*;

const KEYS: [&str; 4] = ["a", "b", "", "../a"];

#[derive(Debug, Clone)]
enum Op {
    /// `get_or_create(KEYS[k])`.
    Create(usize),
    /// Write `len` bytes (seeded) to the `w`-th held writer.
    Write {
        w: usize,
        len: usize,
        seed: u64,
    },
    Finish(usize),
    Abort(usize),
    Remove(usize),
    Get(usize),
    Clear,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        8 => 0usize..3000,
        1 => ((1usize << 20) - 8)..((1 << 20) + 8),
    ];
    prop_oneof![
        4 => (0..KEYS.len()).prop_map(Op::Create),
        5 => (0usize..4, len, any::<u64>()).prop_map(|(w, len, seed)| Op::Write { w, len, seed }),
        3 => (0usize..4).prop_map(Op::Finish),
        1 => (0usize..4).prop_map(Op::Abort),
        2 => (0..KEYS.len()).prop_map(Op::Remove),
        2 => (0..KEYS.len()).prop_map(Op::Get),
        1 => Just(Op::Clear),
        1 => Just(Op::Reopen),
    ]
}

/// A writer the test holds, with a reader taken from it at creation.
struct Held {
    key: String,
    writer: Writer,
    early: Reader,
    data: Vec<u8>,
    /// Its entry is still in the cache (not removed or cleared since it was created).
    live: bool,
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<MemoryStorage>),
    Disk(PathBuf),
}

impl Backend {
    fn open(&self) -> Cache {
        match self {
            Backend::Memory(s) => Cache::builder().storage(s.clone()).build().unwrap(),
            Backend::Disk(d) => Cache::builder().disk(d).build().unwrap(),
        }
    }
}

struct Harness {
    backend: Backend,
    cache: Option<Cache>,
    finished: BTreeMap<String, Vec<u8>>,
    held: Vec<Held>,
}

macro_rules! check {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(TestCaseError::fail(format!($($fmt)+)));
        }
    };
}

impl Harness {
    fn cache(&self) -> &Cache {
        self.cache.as_ref().unwrap()
    }

    fn live_writer(&self, key: &str) -> Option<&Held> {
        self.held.iter().find(|h| h.live && h.key == key)
    }

    fn step(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Create(k) => {
                let key = KEYS[k];
                let present = self.finished.contains_key(key) || self.live_writer(key).is_some();
                match self.cache().get_or_create(key).unwrap() {
                    Entry::Miss(writer) => {
                        check!(!present, "{key:?} is present but get_or_create missed");
                        let early = writer.reader().unwrap();
                        self.held.push(Held {
                            key: key.to_owned(),
                            writer,
                            early,
                            data: Vec::new(),
                            live: true,
                        });
                    }
                    Entry::Hit(mut r) => {
                        check!(present, "{key:?} is absent but get_or_create hit");
                        if let Some(want) = self.finished.get(key) {
                            let got = read_all(&mut r).unwrap();
                            check!(&got == want, "hit on {key:?} read wrong bytes");
                        }
                    }
                }
            }
            Op::Write { w, len, seed } => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let i = w % self.held.len();
                let bytes = pattern(len, seed);
                let h = &mut self.held[i];
                h.writer.write_all(&bytes).unwrap();
                h.writer.flush().unwrap();
                h.data.extend_from_slice(&bytes);
            }
            Op::Finish(w) => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let mut h = self.held.remove(w % self.held.len());
                h.writer.finish().unwrap();
                let got = read_all(&mut h.early).unwrap();
                check!(
                    got == h.data,
                    "early reader of {:?} read wrong bytes",
                    h.key
                );
                if h.live {
                    self.finished.insert(h.key, h.data);
                }
            }
            Op::Abort(w) => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let mut h = self.held.remove(w % self.held.len());
                drop(h.writer);
                let res = read_all(&mut h.early);
                check!(
                    res.as_ref().is_err_and(is_aborted),
                    "reader of an aborted writer got {res:?}"
                );
            }
            Op::Remove(k) => {
                let key = KEYS[k];
                let was = self.finished.remove(key).is_some();
                let mut was_writing = false;
                for h in self.held.iter_mut().filter(|h| h.live && h.key == key) {
                    h.live = false;
                    was_writing = true;
                }
                let removed = self.cache().remove(key).unwrap();
                check!(
                    removed == (was || was_writing),
                    "remove({key:?}) returned {removed}"
                );
            }
            Op::Get(k) => {
                let key = KEYS[k];
                // (An in-progress entry is checked by `check_all`; reading it to the end
                // here would wait for a writer this thread holds.)
                if self.live_writer(key).is_none()
                    && let Some(mut r) = self.cache().get(key).unwrap()
                {
                    let got = read_all(&mut r);
                    check!(
                        self.finished.get(key) == got.as_ref().ok(),
                        "get({key:?}) read {got:?}"
                    );
                }
            }
            Op::Clear => {
                self.cache().clear();
                self.finished.clear();
                for h in &mut self.held {
                    h.live = false;
                }
            }
            Op::Reopen => {
                // Shut down the cache first, then abandon the unfinished writers (on disk
                // they hold the directory), then reopen: only finished entries come back.
                drop(self.cache.take());
                for mut h in self.held.drain(..) {
                    drop(h.writer);
                    let res = read_all(&mut h.early);
                    check!(res.is_err(), "abandoned writer's reader got {res:?}");
                }
                self.cache = Some(self.backend.open());
                let blobs = self.cache().storage().list().unwrap().len();
                check!(
                    blobs == self.finished.len(),
                    "{blobs} blobs stored for {} finished entries",
                    self.finished.len()
                );
            }
        }
        self.check_all()
    }

    /// Every key behaves as the model says.
    fn check_all(&self) -> Result<(), TestCaseError> {
        let cache = self.cache();
        for key in KEYS {
            let writer = self.live_writer(key);
            match (self.finished.get(key), writer) {
                (Some(_), Some(_)) => unreachable!("model: finished and writing"),
                (Some(want), None) => {
                    check!(
                        cache.contains_key(key),
                        "{key:?} finished but not contained"
                    );
                    let mut r = cache.get(key).unwrap();
                    let got = r.as_mut().map(|r| read_all(r).unwrap());
                    check!(got.as_ref() == Some(want), "get({key:?}) = wrong content");
                }
                (None, Some(h)) => {
                    check!(
                        cache.contains_key(key),
                        "{key:?} in progress but not contained"
                    );
                    let r = cache.get(key).unwrap();
                    check!(r.is_some(), "{key:?} in progress but get() missed");
                    let r = r.unwrap();
                    let size = r.size();
                    check!(
                        !size.finished && size.len == h.data.len() as u64,
                        "in-progress {key:?}: size {size:?}, {} written and flushed",
                        h.data.len()
                    );
                    let mut buf = vec![0; h.data.len()];
                    let n = r.read_at(&mut buf, 0).unwrap();
                    check!(
                        n == buf.len() && buf == h.data,
                        "in-progress {key:?}: wrong prefix"
                    );
                }
                (None, None) => {
                    check!(!cache.contains_key(key), "{key:?} absent but contained");
                    check!(
                        cache.get(key).unwrap().is_none(),
                        "{key:?} absent but get() hit"
                    );
                }
            }
        }
        let live = self.held.iter().filter(|h| h.live).count();
        check!(
            cache.len() == self.finished.len() + live,
            "len {} != {} finished + {live} writing",
            cache.len(),
            self.finished.len()
        );
        let keys: BTreeSet<String> = cache.keys().into_iter().collect();
        let want: BTreeSet<String> = self
            .finished
            .keys()
            .cloned()
            .chain(self.held.iter().filter(|h| h.live).map(|h| h.key.clone()))
            .collect();
        check!(keys == want, "keys() {keys:?} != {want:?}");
        let bytes: u64 = self.finished.values().map(|v| v.len() as u64).sum::<u64>()
            + self
                .held
                .iter()
                .filter(|h| h.live)
                .map(|h| h.data.len() as u64)
                .sum::<u64>();
        check!(
            cache.total_bytes() == bytes,
            "total_bytes {} != {bytes}",
            cache.total_bytes()
        );
        Ok(())
    }

    /// At the end: after the reaper ran, storage holds exactly the finished entries.
    fn check_storage(&mut self) -> Result<(), TestCaseError> {
        for h in self.held.drain(..) {
            drop(h.writer);
        }
        let cache = self.cache();
        cache.run_pending_tasks();
        let blobs = cache.storage().list().unwrap().len();
        check!(
            blobs == self.finished.len(),
            "{blobs} blobs stored for {} finished entries",
            self.finished.len()
        );
        Ok(())
    }
}

fn run_model(cases: u32, make: fn() -> (Backend, Option<tempfile::TempDir>)) {
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let (backend, _dir) = make();
        let mut h = Harness {
            cache: Some(backend.open()),
            backend,
            finished: BTreeMap::new(),
            held: Vec::new(),
        };
        for op in &ops {
            h.step(op)?;
        }
        h.check_storage()
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn model_memory() {
    deadline_in(std::time::Duration::from_secs(300), "model memory", || {
        run_model(256, || {
            (Backend::Memory(Arc::new(MemoryStorage::new())), None)
        })
    });
}

#[test]
fn model_disk() {
    deadline_in(std::time::Duration::from_secs(300), "model disk", || {
        run_model(96, || {
            let dir = tempfile::tempdir().unwrap();
            (Backend::Disk(dir.path().to_path_buf()), Some(dir))
        })
    });
}
