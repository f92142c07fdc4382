//! Model-based test: random sequences of cache operations, checked after every step against a
//! `BTreeMap` of finished entries plus the list of writers the test holds.
//!
//! Runs on memory storage (reopen = a new `Cache` over the same `MemoryStorage`), on disk
//! (reopen = drop and rebuild on the same directory) and on several directories (reopen = drop
//! and rebuild with one directory more, up to four).
//!
//! Time is a `ManualClock` shared by every open of a case. Entries get a time to live of their
//! own (`Writer::set_time_to_live`, or an `Expiry` that reads it from the metadata), and some
//! cases a cache-wide one too; the model drops a finished entry once `now >= finished + ttl`,
//! where `ttl` is the shorter of the two. Every step also checks `entry_info` and `iter`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use streamcache::cache::{Clock, EntryInfo, Expiry, ManualClock};
use streamcache::storage::MemoryStorage;
use streamcache::{Cache, Entry, Reader, Writer};
use support::*;

const KEYS: [&str; 4] = ["a", "b", "", "../a"];

#[derive(Debug, Clone)]
enum Op {
    /// `get_or_create(KEYS[k])`; a new writer sets metadata `<key>#<n>`, with `;ttl=<ms>`
    /// appended if `ttl` is given (which the case's `Expiry`, if it has one, reads).
    Create {
        k: usize,
        ttl: Option<u64>,
    },
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
    /// `set_time_to_live(ms)` on the `w`-th held writer.
    SetTtl {
        w: usize,
        ms: u64,
    },
    /// Advance the clock by `ms`, then `run_pending_tasks`.
    Advance(u64),
    Clear,
    /// Close the cache, advance the clock by `ms` while it is closed, open it again.
    Reopen(u64),
    /// The process dies (disk: a copy of the directory, taken once pending tasks ran, is
    /// what it leaves: no clean close, no hint saved at close), the clock advances by `ms`,
    /// and a cache opens what was left. Elsewhere the same as `Reopen`.
    Crash(u64),
}

/// `reopen`: the weight of `Reopen` (the others weigh 25 in all).
fn op(reopen: u32) -> impl Strategy<Value = Op> {
    let len = prop_oneof![
        8 => 0usize..3000,
        1 => ((1usize << 20) - 8)..((1 << 20) + 8),
    ];
    prop_oneof![
        4 => (0..KEYS.len(), prop::option::weighted(0.5, 1u64..40))
            .prop_map(|(k, ttl)| Op::Create { k, ttl }),
        5 => (0usize..4, len, any::<u64>()).prop_map(|(w, len, seed)| Op::Write { w, len, seed }),
        3 => (0usize..4).prop_map(Op::Finish),
        1 => (0usize..4).prop_map(Op::Abort),
        2 => (0..KEYS.len()).prop_map(Op::Remove),
        2 => (0..KEYS.len()).prop_map(Op::Get),
        3 => (0usize..4, 1u64..40).prop_map(|(w, ms)| Op::SetTtl { w, ms }),
        4 => (0u64..30).prop_map(Op::Advance),
        1 => Just(Op::Clear),
        reopen => prop_oneof![Just(0u64), 0u64..30].prop_map(Op::Reopen),
        reopen => prop_oneof![Just(0u64), 0u64..30].prop_map(Op::Crash),
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
    /// The metadata it set at creation.
    meta: Vec<u8>,
    /// Clock time of its creation.
    created: u64,
    /// The time to live its metadata asks the `Expiry` for.
    meta_ttl: Option<u64>,
    /// The last `set_time_to_live`.
    ttl: Option<u64>,
}

/// A finished entry of the model.
#[derive(Debug)]
struct Done {
    data: Vec<u8>,
    meta: Vec<u8>,
    created: u64,
    finished: u64,
    /// When it expires: `finished` plus the shorter of its own and the cache-wide time to live.
    expires: Option<u64>,
}

/// An entry's own time to live from its metadata: `...;ttl=<ms>`.
#[derive(Debug)]
struct MetaTtl;

impl Expiry for MetaTtl {
    fn time_to_live(&self, entry: &EntryInfo) -> Option<Duration> {
        let text = std::str::from_utf8(&entry.metadata).ok()?;
        let (_, ms) = text.rsplit_once(";ttl=")?;
        Some(Duration::from_millis(ms.parse().ok()?))
    }
}

/// What a case configures besides its storage.
#[derive(Debug, Clone, Copy)]
struct Setup {
    /// Cache-wide time to live, in ms.
    cache_ttl: Option<u64>,
    /// Whether the cache has the `MetaTtl` expiry.
    expiry: bool,
}

fn setup() -> impl Strategy<Value = Setup> {
    (prop::option::weighted(0.4, 5u64..100), any::<bool>())
        .prop_map(|(cache_ttl, expiry)| Setup { cache_ttl, expiry })
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<MemoryStorage>),
    Disk(PathBuf),
    /// Directories, and how many of them (from the first) the next open uses.
    Disks(Vec<PathBuf>, usize),
}

impl Backend {
    fn open(&self, clock: &Arc<ManualClock>, setup: Setup) -> Cache {
        let mut b = match self {
            Backend::Memory(s) => Cache::builder().storage(s.clone()),
            Backend::Disk(d) => Cache::builder().disk(d),
            Backend::Disks(dirs, n) => Cache::builder().disks(&dirs[..*n]),
        };
        b = b.clock(clock.clone());
        if let Some(ms) = setup.cache_ttl {
            b = b.time_to_live(Duration::from_millis(ms));
        }
        if setup.expiry {
            b = b.expiry(MetaTtl);
        }
        b.build().unwrap()
    }

    /// Before a reopen: partitioned storage gets one directory more (up to all of them).
    fn grow(&mut self) {
        if let Backend::Disks(dirs, n) = self {
            *n = (*n + 1).min(dirs.len());
        }
    }
}

struct Harness {
    backend: Backend,
    setup: Setup,
    clock: Arc<ManualClock>,
    cache: Option<Cache>,
    finished: BTreeMap<String, Done>,
    held: Vec<Held>,
    /// Writers created so far (numbers their metadata).
    created: u64,
    /// Crashes so far (names the directories they leave).
    crashes: u32,
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
            Op::Create { k, ttl } => {
                let key = KEYS[k];
                let present = self.finished.contains_key(key) || self.live_writer(key).is_some();
                match self.cache().get_or_create(key).unwrap() {
                    Entry::Miss(mut writer) => {
                        check!(!present, "{key:?} is present but get_or_create missed");
                        self.created += 1;
                        let mut meta = format!("{key}#{}", self.created);
                        if let Some(ms) = ttl {
                            meta.push_str(&format!(";ttl={ms}"));
                        }
                        writer.set_metadata(meta.clone().into_bytes());
                        let early = writer.reader().unwrap();
                        self.held.push(Held {
                            key: key.to_owned(),
                            writer,
                            early,
                            data: Vec::new(),
                            live: true,
                            meta: meta.into_bytes(),
                            created: self.clock.now_millis(),
                            meta_ttl: ttl.filter(|_| self.setup.expiry),
                            ttl: None,
                        });
                    }
                    Entry::Hit(mut r) => {
                        check!(present, "{key:?} is absent but get_or_create hit");
                        if let Some(want) = self.finished.get(key) {
                            let got = read_all(&mut r).unwrap();
                            check!(got == want.data, "hit on {key:?} read wrong bytes");
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
                    let finished = self.clock.now_millis();
                    let own = h.ttl.or(h.meta_ttl);
                    let ttl = match (own, self.setup.cache_ttl) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                    self.finished.insert(
                        h.key,
                        Done {
                            data: h.data,
                            meta: h.meta,
                            created: h.created,
                            finished,
                            expires: ttl.map(|t| finished + t),
                        },
                    );
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
                        self.finished.get(key).map(|d| &d.data) == got.as_ref().ok(),
                        "get({key:?}) read {got:?}"
                    );
                }
            }
            Op::SetTtl { w, ms } => {
                if self.held.is_empty() {
                    return Ok(());
                }
                let i = w % self.held.len();
                let h = &mut self.held[i];
                h.writer.set_time_to_live(Duration::from_millis(ms));
                h.ttl = Some(ms);
            }
            Op::Advance(ms) => {
                self.clock.advance(Duration::from_millis(ms));
                self.expire();
                self.cache().run_pending_tasks();
                // Before `check_all` looks the keys up (which unlinks expired entries on the
                // way): the reaper alone must have made the counts exact.
                self.check_counts()?;
            }
            Op::Clear => {
                self.cache().clear();
                self.finished.clear();
                for h in &mut self.held {
                    h.live = false;
                }
            }
            Op::Reopen(ms) | Op::Crash(ms) => {
                if matches!(op, Op::Crash(_))
                    && let Backend::Disk(dir) = &self.backend
                {
                    // Deletions done (a removal not yet carried out at a crash may come back,
                    // as without the journal), then what a crash would leave: the directory
                    // as it is now, unfinished writers' files included. The cache goes on in
                    // the copy; the old directory gets the clean close.
                    self.cache().run_pending_tasks();
                    self.crashes += 1;
                    let copy = dir.with_file_name(format!("crash{}", self.crashes));
                    copy_tree(dir, &copy);
                    drop(self.cache.take());
                    self.backend = Backend::Disk(copy);
                }
                // Shut down the cache first, then abandon the unfinished writers (on disk
                // they hold the directory), then reopen: only finished entries come back.
                drop(self.cache.take());
                for mut h in self.held.drain(..) {
                    drop(h.writer);
                    let res = read_all(&mut h.early);
                    check!(res.is_err(), "abandoned writer's reader got {res:?}");
                }
                // Entries that expire while the cache is closed must not come back.
                self.clock.advance(Duration::from_millis(ms));
                self.expire();
                self.backend.grow();
                self.cache = Some(self.backend.open(&self.clock, self.setup));
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

    /// Drops the finished entries whose time to live has passed.
    fn expire(&mut self) {
        let now = self.clock.now_millis();
        self.finished
            .retain(|_, d| d.expires.is_none_or(|at| now < at));
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
                    check!(
                        got.as_ref() == Some(&want.data),
                        "get({key:?}) = wrong content"
                    );
                    let info = cache.entry_info(key);
                    check!(
                        info.as_ref().is_some_and(|i| i.is_finished()
                            && i.key == key
                            && i.len == want.data.len() as u64
                            && i.created == want.created
                            && i.finished == Some(want.finished)
                            && i.expires == want.expires
                            && i.metadata == want.meta),
                        "entry_info({key:?}) = {info:?}, model {want:?}"
                    );
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
                    let info = cache.entry_info(key);
                    check!(
                        info.as_ref().is_some_and(|i| i.finished.is_none()
                            && i.key == key
                            && i.len == h.data.len() as u64
                            && i.created == h.created
                            && i.expires.is_none()
                            && i.metadata == h.meta),
                        "entry_info({key:?}) = {info:?} for an entry in progress, {} written, \
                         metadata {:?}",
                        h.data.len(),
                        String::from_utf8_lossy(&h.meta)
                    );
                }
                (None, None) => {
                    check!(!cache.contains_key(key), "{key:?} absent but contained");
                    check!(
                        cache.get(key).unwrap().is_none(),
                        "{key:?} absent but get() hit"
                    );
                    let info = cache.entry_info(key);
                    check!(info.is_none(), "{key:?} absent but entry_info = {info:?}");
                }
            }
        }
        self.check_counts()?;
        // `iter` yields each live entry once, as `entry_info` describes it.
        let mut seen = BTreeSet::new();
        for info in cache.iter() {
            check!(
                seen.insert(info.key.clone()),
                "iter() yielded {:?} twice",
                info.key
            );
            let single = cache.entry_info(&info.key);
            check!(
                single.as_ref() == Some(&info),
                "iter() yielded {info:?}, entry_info says {single:?}"
            );
        }
        let want = self.live_keys();
        check!(seen == want, "iter() keys {seen:?} != {want:?}");
        Ok(())
    }

    /// The keys the model says are present.
    fn live_keys(&self) -> BTreeSet<String> {
        self.finished
            .keys()
            .cloned()
            .chain(self.held.iter().filter(|h| h.live).map(|h| h.key.clone()))
            .collect()
    }

    /// `len`, `keys` and `total_bytes` agree with the model.
    fn check_counts(&self) -> Result<(), TestCaseError> {
        let cache = self.cache();
        let live = self.held.iter().filter(|h| h.live).count();
        check!(
            cache.len() == self.finished.len() + live,
            "len {} != {} finished + {live} writing",
            cache.len(),
            self.finished.len()
        );
        let keys: BTreeSet<String> = cache.keys().into_iter().collect();
        let want = self.live_keys();
        check!(keys == want, "keys() {keys:?} != {want:?}");
        let bytes: u64 = self
            .finished
            .values()
            .map(|v| v.data.len() as u64)
            .sum::<u64>()
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

fn run_model(cases: u32, reopen: u32, make: fn() -> (Backend, Option<tempfile::TempDir>)) {
    let mut runner = TestRunner::new(Config {
        cases,
        max_shrink_iters: 2000,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (setup(), proptest::collection::vec(op(reopen), 1..40));
    let result = runner.run(&strategy, |(setup, ops)| {
        let (backend, _dir) = make();
        let clock = Arc::new(ManualClock::new());
        let mut h = Harness {
            cache: Some(backend.open(&clock, setup)),
            backend,
            setup,
            clock,
            finished: BTreeMap::new(),
            held: Vec::new(),
            created: 0,
            crashes: 0,
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
        run_model(256, 1, || {
            (Backend::Memory(Arc::new(MemoryStorage::new())), None)
        })
    });
}

#[test]
fn model_disk() {
    deadline_in(std::time::Duration::from_secs(300), "model disk", || {
        run_model(96, 1, || {
            // In a directory of its own, beside which crashes leave their copies.
            let dir = tempfile::tempdir().unwrap();
            (Backend::Disk(dir.path().join("cache")), Some(dir))
        })
    });
}

#[test]
fn model_partitioned() {
    deadline_in(
        std::time::Duration::from_secs(300),
        "model partitioned",
        || {
            run_model(32, 3, || {
                let dir = tempfile::tempdir().unwrap();
                let dirs = (0..4).map(|i| dir.path().join(format!("d{i}"))).collect();
                (Backend::Disks(dirs, 2), Some(dir))
            })
        },
    );
}
