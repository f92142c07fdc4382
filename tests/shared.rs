//! The shared tier: several caches ("nodes") on one bucket.
//!
//! Each behaviour runs against one shared `InMemory` store (many nodes in one process) and,
//! where it concerns the wire (conditional writes, a bucket that is down or slow, a producer
//! process killed with SIGKILL), against a real S3-compatible server: moto, started by the
//! test (see `support/moto.rs`; the test says SKIPPED when moto is not installed, and fails
//! instead under `CI=true`).

#[path = "support/moto.rs"]
mod moto;
mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use futures_core::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use streamcache::cache::ManualClock;
use streamcache::shared::SharedTier;
use streamcache::{Cache, Entry, Error, Reader, Writer};
use support::*;

use moto::Moto;

/// One bucket and the timings its nodes use: fast ones for the in-memory bucket, so that
/// takeovers and failures show within a test's patience; slower ones for moto, a
/// single-threaded Python server that 64 polling nodes would otherwise outrun.
#[derive(Clone)]
struct Fleet {
    store: Arc<dyn ObjectStore>,
    lease: Duration,
    poll: Duration,
}

fn tier(f: &Fleet) -> SharedTier {
    SharedTier::new(f.store.clone())
        .prefix("test")
        .lease(f.lease)
        .chunk_size(64 << 10)
        .chunk_interval(Duration::from_millis(20))
        .poll_interval(f.poll)
        .timeout(Duration::from_secs(5))
}

fn node(f: &Fleet) -> Cache {
    Cache::builder().shared(tier(f)).build().unwrap()
}

fn bucket() -> Fleet {
    Fleet {
        store: Arc::new(InMemory::new()),
        lease: Duration::from_millis(800),
        poll: Duration::from_millis(10),
    }
}

fn read_to_vec(r: &mut Reader) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.read_to_end(&mut v)?;
    Ok(v)
}

/// Runs `f` to completion on a runtime of its own (the test's looks at the bucket).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Every object path under the bucket, sorted.
fn objects(f: &Fleet) -> Vec<String> {
    let store = &f.store;
    let mut out = Vec::new();
    block_on(async {
        let mut dirs = vec![None::<ObjPath>];
        while let Some(dir) = dirs.pop() {
            let l = store.list_with_delimiter(dir.as_ref()).await.unwrap();
            dirs.extend(l.common_prefixes.into_iter().map(Some));
            out.extend(l.objects.into_iter().map(|m| m.location.to_string()));
        }
    });
    out.sort();
    out
}

fn put_object(f: &Fleet, path: &str, bytes: Vec<u8>) {
    block_on(f.store.put(&ObjPath::from(path), PutPayload::from(bytes))).unwrap();
}

fn delete_object(f: &Fleet, path: &str) {
    block_on(f.store.delete(&ObjPath::from(path))).unwrap();
}

fn get_object(f: &Fleet, path: &str) -> Vec<u8> {
    let store = &f.store;
    block_on(async {
        store
            .get(&ObjPath::from(path))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec()
    })
}

/// A new request's bytes on `c`, if it is a hit that reads to a clean end.
fn hit_bytes(c: &Cache, key: &str) -> Option<Vec<u8>> {
    match c.get_or_create(key).ok()? {
        Entry::Hit(mut r) => read_to_vec(&mut r).ok(),
        Entry::Miss(_) => None,
    }
}

fn is_chunk(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .is_some_and(|last| last.len() == 8 && last.bytes().all(|b| b.is_ascii_digit()))
}

/// A bucket whose writes to the paths `puts` picks, and listings of the prefixes `lists`
/// picks, wait until the test opens the gate; writes to the paths `late` picks are made at
/// once but answered only then. A bucket slow to answer, on demand (no real server can be
/// made slow for one kind of request). Objects at the paths `huge` picks claim to be
/// `HUGE` bytes, a body of zeros counted in `pulled` as it is read. Reads of the paths
/// `failing` picks fail while `fail` is set; reads of the paths `gets` picks wait for the gate;
/// reads of the paths `counted` picks are counted.
#[derive(Debug)]
struct GateStore {
    inner: Arc<dyn ObjectStore>,
    puts: fn(&str) -> bool,
    lists: fn(&str) -> bool,
    late: fn(&str) -> bool,
    huge: fn(&str) -> bool,
    pulled: Arc<std::sync::atomic::AtomicU64>,
    failing: fn(&str) -> bool,
    fail: std::sync::atomic::AtomicBool,
    gets: fn(&str) -> bool,
    /// Reads of the paths `counted` picks, so far.
    counted: fn(&str) -> bool,
    reads: AtomicUsize,
    open: tokio::sync::watch::Sender<bool>,
    held: AtomicUsize,
}

impl GateStore {
    /// Holds the writes to the paths `puts` picks.
    fn new(inner: Arc<dyn ObjectStore>, puts: fn(&str) -> bool) -> GateStore {
        GateStore {
            inner,
            puts,
            lists: |_| false,
            late: |_| false,
            huge: |_| false,
            pulled: Arc::default(),
            failing: |_| false,
            fail: Default::default(),
            gets: |_| false,
            counted: |_| false,
            reads: AtomicUsize::new(0),
            open: tokio::sync::watch::Sender::new(false),
            held: AtomicUsize::new(0),
        }
    }

    /// Holds the listings of the prefixes `lists` picks.
    fn listing(inner: Arc<dyn ObjectStore>, lists: fn(&str) -> bool) -> GateStore {
        GateStore {
            lists,
            ..GateStore::new(inner, |_| false)
        }
    }

    /// Makes the writes to the paths `late` picks at once, and answers them when opened.
    fn answering_late(inner: Arc<dyn ObjectStore>, late: fn(&str) -> bool) -> GateStore {
        GateStore {
            late,
            ..GateStore::new(inner, |_| false)
        }
    }

    /// Makes the objects at the paths `huge` picks claim `HUGE` bytes.
    fn inflating(inner: Arc<dyn ObjectStore>, huge: fn(&str) -> bool) -> GateStore {
        GateStore {
            huge,
            ..GateStore::new(inner, |_| false)
        }
    }

    /// Makes the reads of the paths `failing` picks fail while `fail` is set.
    fn failing(inner: Arc<dyn ObjectStore>, failing: fn(&str) -> bool) -> GateStore {
        GateStore {
            failing,
            ..GateStore::new(inner, |_| false)
        }
    }

    /// Holds the reads of the paths `gets` picks.
    fn holding_gets(inner: Arc<dyn ObjectStore>, gets: fn(&str) -> bool) -> GateStore {
        GateStore {
            gets,
            ..GateStore::new(inner, |_| false)
        }
    }

    /// Counts the reads of the paths `counted` picks (`reads`).
    fn counting(inner: Arc<dyn ObjectStore>, counted: fn(&str) -> bool) -> GateStore {
        GateStore {
            counted,
            ..GateStore::new(inner, |_| false)
        }
    }

    async fn wait(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
    }

    /// Requests that reached the gate so far.
    fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    fn open(&self) {
        self.open.send_replace(true);
    }
}

/// What a `GateStore`'s huge objects claim to be.
const HUGE: u64 = 100 << 20;

/// `left` zero bytes, counted in `pulled` as they are read.
struct Zeros {
    left: u64,
    pulled: Arc<std::sync::atomic::AtomicU64>,
}

impl futures_core::Stream for Zeros {
    type Item = object_store::Result<bytes::Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
        let n = self.left.min(ZEROS.len() as u64);
        if n == 0 {
            return std::task::Poll::Ready(None);
        }
        self.left -= n;
        self.pulled.fetch_add(n, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(bytes::Bytes::from_static(&ZEROS[..n as usize]))))
    }
}

impl std::fmt::Display for GateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GateStore({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for GateStore {
    async fn put_opts(
        &self,
        location: &ObjPath,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if (self.puts)(location.as_ref()) {
            self.wait().await;
        }
        let done = self.inner.put_opts(location, payload, opts).await;
        if (self.late)(location.as_ref()) {
            self.wait().await;
        }
        done
    }

    async fn put_multipart_opts(
        &self,
        location: &ObjPath,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &ObjPath,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        if (self.gets)(location.as_ref()) {
            self.wait().await;
        }
        if (self.counted)(location.as_ref()) {
            self.reads.fetch_add(1, Ordering::SeqCst);
        }
        if self.fail.load(Ordering::SeqCst) && (self.failing)(location.as_ref()) {
            return Err(object_store::Error::Generic {
                store: "GateStore",
                source: "injected failure".into(),
            });
        }
        let mut got = self.inner.get_opts(location, options).await?;
        if (self.huge)(location.as_ref()) {
            got.meta.size = HUGE;
            got.range = 0..HUGE;
            got.payload = object_store::GetResultPayload::Stream(Box::pin(Zeros {
                left: HUGE,
                pulled: self.pulled.clone(),
            }));
        }
        Ok(got)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<ObjPath>>,
    ) -> BoxStream<'static, object_store::Result<ObjPath>> {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&ObjPath>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&ObjPath>,
    ) -> object_store::Result<ListResult> {
        if (self.lists)(prefix.map_or("", |p| p.as_ref())) {
            self.wait().await;
        }
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &ObjPath,
        to: &ObjPath,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// The path of the manifest of `key` in the bucket, once there is one.
fn manifest_path(f: &Fleet, key: &str) -> Option<String> {
    let key_line = format!(
        "key {}",
        key.bytes().map(|b| format!("{b:02x}")).collect::<String>()
    );
    objects(f).into_iter().find(|p| {
        p.ends_with("/manifest")
            && String::from_utf8(get_object(f, p))
                .unwrap()
                .lines()
                .any(|l| l == key_line)
    })
}

/// The value of `field` in the manifest of `key` in the bucket, once there is one.
fn manifest_field(f: &Fleet, key: &str, field: &str) -> Option<String> {
    String::from_utf8(get_object(f, &manifest_path(f, key)?))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(' ').map(str::to_string))
}

/// Waits until the bucket holds a manifest of `key`.
fn wait_manifest(f: &Fleet, key: &str) {
    wait_until("manifest committed", DEADLINE, || {
        manifest_field(f, key, "generation").is_some()
    });
}

/// The state the (one) lease in the bucket says, if there is one.
fn lease_state(f: &Fleet) -> Option<String> {
    let path = objects(f).into_iter().find(|p| p.ends_with("/lease"))?;
    let text = String::from_utf8(get_object(f, &path)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("state ").map(str::to_string))
}

/// One in-memory bucket seen two ways, with `lease`: through the gate `make` builds on it
/// (for the nodes), and plain (for the test's own looks, which the gate must not hold).
fn gated(
    lease: Duration,
    make: impl FnOnce(Arc<dyn ObjectStore>) -> GateStore,
) -> (Arc<GateStore>, Fleet, Fleet) {
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let gate = Arc::new(make(inner.clone()));
    let through = Fleet {
        store: gate.clone(),
        lease,
        ..bucket()
    };
    let plain = Fleet {
        store: inner,
        lease,
        ..bucket()
    };
    (gate, through, plain)
}

/// Node A (over `plain`) produces `k` and has flushed `first`; node B (over `through`) tails
/// it and has read those bytes. Returns A, B, A's writer and B's reader.
fn tailing(plain: &Fleet, through: &Fleet, first: &[u8]) -> (Cache, Cache, Writer, Reader) {
    let a = node(plain);
    let b = node(through);
    let mut w = miss(&a, "k");
    w.write_all(first).unwrap();
    w.flush().unwrap();
    let mut r = hit(&b, "k");
    let mut head = vec![0; first.len()];
    r.read_exact(&mut head).unwrap();
    assert!(head == first);
    (a, b, w, r)
}

/// Writes `pieces` `gap` apart, each flushed, then finishes.
fn trickle<'a>(mut w: Writer, pieces: impl Iterator<Item = &'a [u8]>, gap: Duration) {
    for piece in pieces {
        thread::sleep(gap);
        w.write_all(piece).unwrap();
        w.flush().unwrap();
    }
    w.finish().unwrap();
}

/// A node that waits only 300 ms for the bucket.
fn impatient_node(f: &Fleet) -> Cache {
    Cache::builder()
        .shared(tier(f).timeout(Duration::from_millis(300)))
        .build()
        .unwrap()
}

/// The manifest records the entry's own finish time and time to live, read from its stream.
/// What went wrong before: the manifest took the time at which the upload reached the end,
/// so an upload that finished late (a slow bucket, or one that had been down) moved the
/// expiry later on every node. (It also took the time to live of whatever entry held the key
/// by then: none if the entry had just been removed or evicted, which the same change
/// closes but no test can time.)
#[test]
fn a_late_commit_keeps_the_entrys_finish_time_and_time_to_live() {
    deadline("late commit", || {
        let gate = Arc::new(GateStore::new(Arc::new(InMemory::new()), is_chunk));
        let f = Fleet {
            store: gate.clone(),
            ..bucket()
        };
        let clock = Arc::new(ManualClock::new());
        let a = Cache::builder()
            .clock(clock.clone())
            .shared(tier(&f))
            .build()
            .unwrap();
        let mut w = miss(&a, "k");
        w.set_time_to_live(Duration::from_secs(60));
        w.write_all(b"good for a minute").unwrap();
        w.finish().unwrap();
        let finished = a.entry_info("k").unwrap().finished.unwrap();
        wait_until("the upload reaches the bucket", DEADLINE, || {
            gate.held() == 1
        });
        // Time passes before the bucket answers.
        clock.advance(Duration::from_secs(30));
        gate.open();
        wait_until("k committed", DEADLINE, || {
            manifest_field(&f, "k", "finished").is_some()
        });
        assert_eq!(
            manifest_field(&f, "k", "finished").unwrap(),
            finished.to_string()
        );
        assert_eq!(manifest_field(&f, "k", "ttl").unwrap(), "60000");
    });
}

/// The producer's heartbeat goes on while its manifest is being written. What went wrong
/// before: the heartbeat stopped when the last chunk was up, so a manifest write slower than
/// the lease let the lease go stale; another node then took it over and produced the entry a
/// second time, and one of the two commits was refused (failing its remote readers).
#[test]
fn a_slow_commit_keeps_its_lease() {
    deadline("slow commit", || {
        let gate = Arc::new(GateStore::new(Arc::new(InMemory::new()), |p| {
            p.ends_with("/manifest")
        }));
        let f = Fleet {
            store: gate.clone(),
            ..bucket()
        };
        let (a, b) = (node(&f), node(&f));
        let mut w = miss(&a, "k");
        w.write_all(b"committed slowly").unwrap();
        w.finish().unwrap();
        wait_until("the commit reaches the bucket", DEADLINE, || {
            gate.held() == 1
        });
        // Three leases' worth of waiting for the bucket's answer.
        thread::sleep(f.lease * 3);
        let Entry::Hit(mut r) = b.get_or_create("k").unwrap() else {
            panic!("a node took over a lease whose producer was committing")
        };
        gate.open();
        assert_eq!(read_to_vec(&mut r).unwrap(), b"committed slowly");
        assert_eq!(a.shared_stats().unwrap().produced, 1);
        assert_eq!(b.shared_stats().unwrap().produced, 0);
    });
}

/// A tailing reader whose producer's lease says "done" while the rest of the entry is not in
/// the bucket fails instead of waiting for ever. What went wrong before: "done" counted as
/// alive, so a tailer waiting for a chunk or manifest that was gone (a removal that deleted
/// the manifest and chunks but failed to delete the lease) polled until some other node took
/// the key over. Here the lease is made to say "done" in the bucket mid-production.
#[test]
fn a_tail_whose_lease_says_done_with_data_missing_fails() {
    deadline("done but missing", || {
        let f = bucket();
        let (a, b) = (node(&f), node(&f));
        let mut w = miss(&a, "k");
        w.write_all(b"first part").unwrap();
        w.flush().unwrap();
        let mut r = hit(&b, "k");
        let mut first = [0; 10];
        r.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"first part");
        let lease = objects(&f)
            .into_iter()
            .find(|p| p.ends_with("/lease"))
            .unwrap();
        let text = String::from_utf8(get_object(&f, &lease)).unwrap();
        assert!(text.contains("state producing"), "{text}");
        put_object(
            &f,
            &lease,
            text.replace("state producing", "state done").into_bytes(),
        );
        let mut rest = Vec::new();
        assert!(
            r.read_to_end(&mut rest).is_err(),
            "read {rest:?} to a clean end"
        );
        drop(w);
    });
}

/// A removal deletes only what was there when it ran. What went wrong before: its background
/// clean-up listed the key's whole directory in the bucket and deleted everything in it, so a
/// production that started as soon as the removal had deleted the lease lost its lease,
/// chunks or manifest to it. Here any listing of the key's directory is held back, as a slow
/// bucket would: the removal must not make one.
#[test]
fn a_removal_leaves_the_next_production_alone() {
    deadline("remove then produce", || {
        // Hold listings of a key's directory (`test/<key hash>`).
        let (gate, f, plain) = gated(bucket().lease, |inner| {
            GateStore::listing(inner, |p| p.split('/').count() == 2)
        });
        let (a, b, c) = (node(&f), node(&f), node(&f));
        put(&a, "k", b"first");
        wait_manifest(&plain, "k");
        assert!(a.remove("k").unwrap());
        assert!(manifest_field(&plain, "k", "generation").is_none());
        put(&b, "k", b"second");
        wait_manifest(&plain, "k");
        // The clean-up deletes generation directories only: it never lists the key's own,
        // so nothing is held back and there is nothing to wait for. (Before, its listing
        // was held here, and took the second production's objects once let go.)
        assert_eq!(gate.held(), 0, "the removal listed the key's directory");
        assert_eq!(hit_bytes(&c, "k").as_deref(), Some(&b"second"[..]));
    });
}

/// A lease write that landed after its node gave up waiting for the answer is that node's
/// orphan, and the node takes it over when it publishes the entry it produced locally
/// meanwhile. What went wrong before: the orphan said "producing" under this node's name and
/// nobody heartbeated it; the node's retry took it for another node's production and gave the
/// upload up, and other nodes would tail it until it went stale (the lease here is long).
#[test]
fn a_lease_answered_too_late_is_taken_over_by_its_own_node() {
    deadline("late lease", || {
        let (gate, slow, plain) = gated(Duration::from_secs(60), |inner| {
            GateStore::answering_late(inner, |p| p.ends_with("/lease"))
        });
        let a = impatient_node(&slow);
        let mut w = miss(&a, "k");
        assert_eq!(
            a.shared_stats().unwrap().fallbacks,
            1,
            "the lease's answer came too late"
        );
        w.write_all(b"made while the bucket was slow").unwrap();
        w.finish().unwrap();
        gate.open();
        // The upload is retried a second after the miss.
        wait_until("published", Duration::from_secs(10), || {
            manifest_field(&plain, "k", "generation").is_some()
        });
        let b = node(&plain);
        assert_eq!(
            hit_bytes(&b, "k").as_deref(),
            Some(&b"made while the bucket was slow"[..])
        );
    });
}

/// An object larger than any of its kind is not read: whoever can write the bucket cannot
/// make a node hold an object of any size in memory. What went wrong before: every object
/// was read whole, whatever its size. Here the key's lease claims 100 MiB (a lease is under
/// 200 bytes): it is taken over unread, as an unreadable lease is.
#[test]
fn an_oversized_object_is_not_read() {
    deadline("oversized", || {
        let (huge, through, plain) = gated(bucket().lease, |inner| {
            GateStore::inflating(inner, |p| p.ends_with("/lease"))
        });
        // A lease left by a producer that died.
        let a = node(&plain);
        drop(miss(&a, "k"));
        let b = node(&through);
        put(&b, "k", b"fresh");
        assert_eq!(b.shared_stats().unwrap().produced, 1);
        assert_eq!(huge.pulled.load(Ordering::SeqCst), 0, "lease bytes read");
        wait_manifest(&plain, "k");
        assert_eq!(
            hit_bytes(&node(&plain), "k").as_deref(),
            Some(&b"fresh"[..])
        );
    });
}

/// A manifest write whose answer was lost but which landed counts as the commit it is. What
/// went wrong before: its retry was refused (the manifest exists), which read as another
/// node's commit, so the lease was marked aborted over this node's own committed entry and
/// its tailing readers failed.
#[test]
fn a_commit_whose_answer_was_lost_still_counts() {
    deadline("lost answer", || {
        let (gate, slow, plain) = gated(bucket().lease, |inner| {
            GateStore::answering_late(inner, |p| p.ends_with("/manifest"))
        });
        let a = impatient_node(&slow);
        put(&a, "k", b"committed once");
        // The first write landed and its answer never came; a retry is at the gate.
        wait_until("a retry", DEADLINE, || gate.held() >= 2);
        gate.open();
        wait_until("the lease settles", DEADLINE, || {
            lease_state(&plain).is_some_and(|s| s != "producing")
        });
        assert_eq!(lease_state(&plain).as_deref(), Some("done"));
        assert_eq!(
            hit_bytes(&node(&plain), "k").as_deref(),
            Some(&b"committed once"[..])
        );
    });
}

/// A tailing reader whose producer finished waits out a bucket that fails its reads for a
/// while (less than the lease) and then reads on. What went wrong in the first version of
/// the "done but missing" check: a failed read did not reset it, so two lease checks that
/// said "done" during a bucket's bad moment failed a reader whose bytes were all there.
#[test]
fn a_tail_waits_out_failing_reads_after_its_producer_finished() {
    deadline("failing reads", || {
        let store = Arc::new(GateStore::failing(Arc::new(InMemory::new()), is_chunk));
        // Lease checks every second; the bucket fails for 2.5 s, under the 4 s lease.
        let f = Fleet {
            store: store.clone(),
            lease: Duration::from_secs(4),
            ..bucket()
        };
        let (a, b) = (node(&f), node(&f));
        let mut w = miss(&a, "k");
        w.write_all(b"first part, ").unwrap();
        w.flush().unwrap();
        let mut r = hit(&b, "k");
        let mut first = [0; 12];
        r.read_exact(&mut first).unwrap();
        store.fail.store(true, Ordering::SeqCst);
        w.write_all(b"then the rest").unwrap();
        w.finish().unwrap();
        wait_until("committed", DEADLINE, || {
            objects(&f).iter().any(|p| p.ends_with("/manifest"))
        });
        thread::sleep(Duration::from_millis(2500));
        store.fail.store(false, Ordering::SeqCst);
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"then the rest");
    });
}

/// A disk node's upload takes the 1 MiB block hashes its storage computed while writing, and
/// hashes only the pieces that are not whole blocks: chunks cut by size and by time at
/// offsets that are not block boundaries, read on a node that tails the production and on a
/// disk node that downloads it afterwards, arrive whole and verified.
#[test]
fn disk_node_uploads_with_its_block_hashes_across_unaligned_chunks() {
    let f = bucket();
    let tier = |f: &Fleet| tier(f).chunk_size(2 << 20);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let producer = Cache::builder()
        .disk(dirs[0].path())
        .shared(tier(&f))
        .build()
        .unwrap();
    let tailer = Cache::builder().shared(tier(&f)).build().unwrap();
    let data = pattern((5 << 20) + 17, 9);
    let mut w = miss(&producer, "big");
    let mut r = hit(&tailer, "big");
    // 1.5 MiB and a few bytes, cut into a chunk by time: the next chunk starts mid-block.
    let first = (3 << 19) + 3;
    w.write_all(&data[..first]).unwrap();
    w.flush().unwrap();
    wait_until("first chunk uploaded", DEADLINE, || {
        objects(&f).iter().any(|p| p.ends_with("/00000000"))
    });
    for piece in data[first..].chunks(300 << 10) {
        w.write_all(piece).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(read_to_vec(&mut r).unwrap(), data);
    wait_until("manifest committed", DEADLINE, || {
        objects(&f).iter().any(|p| p.ends_with("/manifest"))
    });
    let chunks = objects(&f).iter().filter(|p| is_chunk(p)).count();
    assert!(chunks >= 3, "{chunks} chunks");
    let downloader = Cache::builder()
        .disk(dirs[1].path())
        .shared(tier(&f))
        .build()
        .unwrap();
    assert_eq!(hit_bytes(&downloader, "big").as_deref(), Some(&data[..]));
}

/// A finished entry in the bucket is a hit on another node, downloaded once there however
/// many local readers ask at the same time.
fn finished_entry_is_downloaded_once_per_node(store: Fleet) {
    let a = node(&store);
    let data = pattern(1 << 20, 1);
    put(&a, "k", &data);
    wait_until("manifest committed", DEADLINE, || {
        objects(&store).iter().any(|p| p.ends_with("/manifest"))
    });
    let b = Arc::new(node(&store));
    let barrier = Arc::new(Barrier::new(8));
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (b, barrier) = (b.clone(), barrier.clone());
            thread::spawn(move || {
                barrier.wait();
                match b.get_or_create("k").unwrap() {
                    Entry::Hit(mut r) => read_to_vec(&mut r).unwrap(),
                    Entry::Miss(_) => panic!("a finished shared entry must be a hit"),
                }
            })
        })
        .collect();
    for r in readers {
        assert!(r.join().unwrap() == data);
    }
    let stats = b.shared_stats().unwrap();
    assert_eq!(stats.downloaded, 1, "{stats:?}");
    assert_eq!(stats.produced, 0);
    // It is in B's local cache now: served without the bucket.
    assert!(get_bytes(&b, "k") == data);
}

#[test]
fn finished_entry_is_downloaded_once_per_node_in_memory() {
    deadline("download", || {
        finished_entry_is_downloaded_once_per_node(bucket())
    });
}

/// Another node's production is tailed: the remote reader gets bytes long before the end.
fn remote_reader_tails_a_production(store: Fleet) {
    let a = node(&store);
    let b = node(&store);
    let mut w = miss(&a, "slow");
    w.set_metadata(&b"type: test"[..]);
    let first = pattern(100_000, 2);
    w.write_all(&first).unwrap();
    w.flush().unwrap();
    let started = Instant::now();
    let mut r = hit(&b, "slow");
    let mut got = vec![0; first.len()];
    r.read_exact(&mut got).unwrap();
    let first_bytes = started.elapsed();
    assert!(got == first);
    assert_eq!(
        &r.metadata()[..],
        b"type: test",
        "chunk 0 carries the metadata"
    );
    // The producer has not finished: B read while A produced.
    let rest = pattern(200_000, 3);
    w.write_all(&rest).unwrap();
    w.finish().unwrap();
    let mut tail = Vec::new();
    r.read_to_end(&mut tail).unwrap();
    assert!(tail == rest);
    eprintln!("remote first bytes after {first_bytes:?}");
    assert_eq!(b.shared_stats().unwrap().tailed, 1);
    // B now has it locally and finished, with the producer's metadata.
    let info = b.entry_info("slow").unwrap();
    assert!(info.is_finished());
    assert_eq!(info.len, 300_000);
}

#[test]
fn remote_reader_tails_a_production_in_memory() {
    deadline("tail", || remote_reader_tails_a_production(bucket()));
}

/// 8 nodes × 8 threads race on one key: exactly one `Miss` fleet-wide; everyone else reads
/// the same bytes while they are produced.
fn herd_has_one_producer_fleet_wide(store: Fleet, nodes: usize, per_node: usize) {
    let caches: Vec<Arc<Cache>> = (0..nodes).map(|_| Arc::new(node(&store))).collect();
    let data = Arc::new(pattern(600_000, 4));
    let misses = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(Barrier::new(nodes * per_node));
    let mut threads = Vec::new();
    for c in &caches {
        for _ in 0..per_node {
            let (c, data, misses, barrier) =
                (c.clone(), data.clone(), misses.clone(), barrier.clone());
            threads.push(thread::spawn(move || {
                barrier.wait();
                match c.get_or_create("herd").unwrap() {
                    Entry::Miss(mut w) => {
                        misses.fetch_add(1, Ordering::SeqCst);
                        for piece in data.chunks(100_000) {
                            w.write_all(piece).unwrap();
                            w.flush().unwrap();
                            thread::sleep(Duration::from_millis(30));
                        }
                        w.finish().unwrap();
                        None
                    }
                    Entry::Hit(mut r) => Some(read_to_vec(&mut r).unwrap()),
                }
            }));
        }
    }
    for t in threads {
        if let Some(got) = t.join().unwrap() {
            assert!(got == *data, "a reader got different bytes");
        }
    }
    assert_eq!(
        misses.load(Ordering::SeqCst),
        1,
        "exactly one producer fleet-wide"
    );
    let produced: u64 = caches
        .iter()
        .map(|c| c.shared_stats().unwrap().produced)
        .sum();
    assert_eq!(produced, 1);
}

#[test]
fn herd_has_one_producer_fleet_wide_in_memory() {
    deadline("herd", || herd_has_one_producer_fleet_wide(bucket(), 8, 8));
}

/// A producer that stops heartbeating (its process gone): remote readers get an error, never
/// a clean end; the next requests race to take over, exactly one wins and produces from byte
/// 0 under a new generation, whose readers never see the dead generation's bytes.
fn dead_producer_is_taken_over(store: Fleet) {
    let a = node(&store);
    let b = node(&store);
    let mut w = miss(&a, "dead");
    w.write_all(&pattern(150_000, 5)).unwrap();
    w.flush().unwrap();
    let mut r = hit(&b, "dead");
    let mut head = vec![0; 1000];
    r.read_exact(&mut head).unwrap();
    // A's node dies: its tier stops (no heartbeat, no upload); its writer never finishes.
    drop(a);
    let died = Instant::now();
    let err = read_to_vec(&mut r).expect_err("a dead producer's remote reader must fail");
    assert!(is_aborted(&err), "{err}");
    eprintln!(
        "remote reader failed {:?} after the producer died",
        died.elapsed()
    );
    drop(w);
    // The next requests anywhere race to take over (a compare-and-swap on the stale lease):
    // exactly one wins and produces from byte 0; the others tail the new generation.
    let fresh = Arc::new(pattern(120_000, 6));
    let racers: Vec<Arc<Cache>> = (0..16).map(|_| Arc::new(node(&store))).collect();
    let barrier = Arc::new(Barrier::new(racers.len()));
    let threads: Vec<_> = racers
        .iter()
        .map(|c| {
            let (c, barrier, fresh) = (c.clone(), barrier.clone(), fresh.clone());
            thread::spawn(move || {
                barrier.wait();
                match c.get_or_create("dead").unwrap() {
                    Entry::Miss(mut w) => {
                        for piece in fresh.chunks(40_000) {
                            w.write_all(piece).unwrap();
                            w.flush().unwrap();
                            thread::sleep(Duration::from_millis(20));
                        }
                        w.finish().unwrap();
                        1
                    }
                    Entry::Hit(mut r) => {
                        let got = read_to_vec(&mut r).unwrap();
                        assert!(got == *fresh, "only the new generation's bytes");
                        0
                    }
                }
            })
        })
        .collect();
    let winners: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(
        winners, 1,
        "exactly one node takes the dead producer's key over"
    );
    let d = node(&store);
    let mut r2 = hit(&d, "dead");
    assert!(
        read_to_vec(&mut r2).unwrap() == *fresh,
        "only the new generation's bytes"
    );
    // B's failed local entry was dropped: B now downloads the new one.
    let mut r3 = hit(&b, "dead");
    assert!(read_to_vec(&mut r3).unwrap() == *fresh);
}

#[test]
fn dead_producer_is_taken_over_in_memory() {
    deadline("takeover", || dead_producer_is_taken_over(bucket()));
}

/// A tailer whose producer died while the bucket failed every read of the lease (and answered
/// "absent" for the next chunk) fails once the lease has been unreadable for a whole lease.
/// What went wrong before: a lease read that failed counted as "the producer is alive", and
/// only chunk reads that failed were timed, so that reader waited for ever.
#[test]
fn a_tail_whose_producers_lease_stays_unreadable_fails() {
    deadline("lease unreadable", || {
        let (gate, through, plain) = gated(Duration::from_millis(800), |inner| {
            GateStore::failing(inner, |p| p.ends_with("/lease"))
        });
        let (a, _b, w, mut r) = tailing(&plain, &through, &pattern(100_000, 2));
        gate.fail.store(true, Ordering::SeqCst);
        // A's node dies: no heartbeat, no more chunks; its writer never finishes.
        drop(a);
        let err = read_to_vec(&mut r).expect_err("a reader of a dead producer must fail");
        assert!(is_aborted(&err), "{err}");
        assert!(
            format!("{err:?}").contains("lease could not be read"),
            "{err:?}"
        );
        drop(w);
    });
}

/// A tail whose lease reads all fail keeps going while chunks keep coming: each new chunk shows
/// its producer alive. What went wrong in the first version of the check above: only a lease
/// read that succeeded reset the "unreadable since" time, so two failed checks a lease apart,
/// with chunks flowing in between, aborted a live production (a review caught it).
#[test]
fn a_tail_with_unreadable_leases_completes_while_chunks_come() {
    deadline("lease unreadable, chunks flowing", || {
        let lease = Duration::from_millis(800);
        let (gate, through, plain) = gated(lease, |inner| {
            GateStore::failing(inner, |p| p.ends_with("/lease"))
        });
        let data = pattern(12 * 10_000, 5);
        let mut pieces = data.chunks(10_000);
        let (_a, _b, w, mut r) = tailing(&plain, &through, pieces.next().unwrap());
        // From here on every look B takes at the lease fails.
        gate.fail.store(true, Ordering::SeqCst);
        let reader = thread::spawn(move || read_to_vec(&mut r));
        // Gaps longer than a lease check's interval (a quarter lease), over several leases.
        trickle(w, pieces, lease / 3);
        let got = reader
            .join()
            .unwrap()
            .expect("a live producer's tail must complete");
        assert!(got == data[10_000..]);
    });
}

/// A tailer whose producer's lease was taken over (another generation, heartbeating) fails at
/// its next lease check and says why; it does not wait on a generation that will never go on
/// until the new one happens to finish or go stale. (Found missing by mutation testing: with
/// the generation check gone, every test still passed.)
#[test]
fn a_tail_fails_when_another_node_takes_the_lease_over() {
    deadline("lease taken over", || {
        let store = bucket();
        let (_a, _b, w, mut r) = tailing(&store, &store, &pattern(1000, 6));
        // What a takeover leaves in the bucket: a lease of another generation, fresh.
        let lease = objects(&store)
            .into_iter()
            .find(|p| p.ends_with("/lease"))
            .unwrap();
        let text = String::from_utf8(get_object(&store, &lease)).unwrap();
        let forged: String = text
            .lines()
            .map(|l| match l.split_once(' ') {
                Some(("generation", _)) => format!("generation {:032x}\n", 0xabcd_u128),
                Some(("heartbeat", _)) => format!("heartbeat {}\n", now_ms() + 60_000),
                _ => format!("{l}\n"),
            })
            .collect();
        put_object(&store, &lease, forged.into_bytes());
        let err = read_to_vec(&mut r).expect_err("the tailed generation will never go on");
        assert!(is_aborted(&err), "{err}");
        assert!(format!("{err:?}").contains("took over"), "{err:?}");
        drop(w);
    });
}

/// A tailer whose chunk reads keep failing for a whole lease gives up with an error, even while
/// its producer's lease reads fine. (Found missing by mutation testing: a tail that never gave
/// up on a failing bucket passed every test.)
#[test]
fn a_tail_gives_up_on_chunk_reads_that_keep_failing() {
    deadline("chunk reads failing", || {
        let (gate, through, plain) = gated(Duration::from_millis(800), |inner| {
            GateStore::failing(inner, is_chunk)
        });
        let (_a, _b, w, mut r) = tailing(&plain, &through, &pattern(1000, 7));
        gate.fail.store(true, Ordering::SeqCst);
        let err = read_to_vec(&mut r).expect_err("a bucket that keeps failing ends the tail");
        assert!(is_aborted(&err), "{err}");
        assert!(format!("{err:?}").contains("kept failing"), "{err:?}");
        drop(w);
    });
}

/// A tailer looks at its producer's lease once per quarter lease, not at every poll for the next
/// chunk (with the defaults, 40 times fewer requests). (Found missing by mutation testing: a
/// tail that read the lease at every poll passed every test.)
#[test]
fn a_tail_reads_the_lease_once_per_quarter_lease() {
    deadline("lease reads while tailing", || {
        let lease = Duration::from_millis(800);
        let (gate, through, plain) = gated(lease, |inner| {
            GateStore::counting(inner, |p| p.ends_with("/lease"))
        });
        let data = pattern(10 * 1000, 8);
        let mut pieces = data.chunks(1000);
        let (_a, _b, w, mut r) = tailing(&plain, &through, pieces.next().unwrap());
        let before = gate.reads.load(Ordering::SeqCst);
        let reader = thread::spawn(move || read_to_vec(&mut r));
        let started = Instant::now();
        trickle(w, pieces, Duration::from_millis(150));
        assert!(reader.join().unwrap().unwrap() == data[1000..]);
        let tailed = started.elapsed();
        let reads = gate.reads.load(Ordering::SeqCst) - before;
        // One per quarter lease, and a few more for slack; at every 10 ms poll it would be
        // about a hundred.
        let most = (tailed.as_millis() / (lease / 4).as_millis()) as usize + 4;
        assert!(
            reads <= most,
            "{reads} lease reads in {tailed:?} (at most {most})"
        );
    });
}

/// A writer that aborts: remote readers get an error; the next request produces again.
#[test]
fn writer_abort_fails_remote_readers_and_the_next_request_retries() {
    deadline("abort", || {
        let store = bucket();
        let a = node(&store);
        let b = node(&store);
        let mut w = miss(&a, "k");
        w.write_all(&pattern(100_000, 7)).unwrap();
        w.flush().unwrap();
        let mut r = hit(&b, "k");
        let mut head = vec![0; 100];
        r.read_exact(&mut head).unwrap();
        w.abort();
        let err = read_to_vec(&mut r).expect_err("an aborted remote entry must fail");
        assert!(is_aborted(&err), "{err}");
        let mut w = miss(&b, "k");
        w.write_all(b"second try").unwrap();
        w.finish().unwrap();
        let c = node(&store);
        assert_eq!(read_to_vec(&mut hit(&c, "k")).unwrap(), b"second try");
    });
}

/// A chunk that fails its hash, or a manifest that does not parse, is an error for that read
/// (never wrong bytes); the entry is then treated as absent and produced again.
#[test]
fn corrupt_chunk_or_manifest_is_an_error_never_wrong_bytes() {
    deadline("corrupt", || {
        let store = bucket();
        let a = node(&store);
        put(&a, "k", &pattern(200_000, 8));
        wait_until("committed", DEADLINE, || {
            objects(&store).iter().any(|p| p.ends_with("/manifest"))
        });
        let chunk = objects(&store).into_iter().find(|p| is_chunk(p)).unwrap();
        let mut bytes = get_object(&store, &chunk);
        let last = bytes.len() - 1;
        bytes[last] ^= 0x55;
        put_object(&store, &chunk, bytes);

        let b = node(&store);
        let mut r = hit(&b, "k");
        let err = read_to_vec(&mut r).expect_err("a corrupt chunk must fail the read");
        assert!(is_aborted(&err), "{err}");
        assert!(format!("{err:?}").contains("Corrupt"), "{err:?}");
        // Treated as absent here: B produces it again and replaces the manifest.
        let fresh = pattern(50_000, 9);
        let mut w = miss(&b, "k");
        w.write_all(&fresh).unwrap();
        w.finish().unwrap();
        wait_until("replaced", DEADLINE, || {
            hit_bytes(&node(&store), "k").is_some_and(|v| v == fresh)
        });

        // A manifest that does not parse: absent, so the next request is a miss.
        let manifest = objects(&store)
            .into_iter()
            .find(|p| p.ends_with("/manifest"))
            .unwrap();
        put_object(
            &store,
            &manifest,
            b"streamcache-manifest 1\ngarbage\n".to_vec(),
        );
        let d = node(&store);
        let mut w = miss(&d, "k");
        w.write_all(b"third").unwrap();
        w.finish().unwrap();
        wait_until("third version", DEADLINE, || {
            hit_bytes(&node(&store), "k").is_some_and(|v| v == b"third")
        });
    });
}

/// A chunk that is gone because the entry was replaced in the bucket while a node downloaded
/// it fails that download as a failure of the shared tier, not as a corrupt entry. What went
/// wrong before: any missing chunk was reported as `Error::Corrupt` ("chunk listed by the
/// manifest is missing"), also when a newer production had replaced the entry and its old
/// chunks had been deleted after their grace period. (A chunk missing under the very manifest
/// that lists it is still corruption: `a_chunk_missing_under_its_manifest_is_corrupt`.)
#[test]
fn a_chunk_gone_with_a_replaced_entry_is_a_shared_error_not_corruption() {
    deadline("replaced while downloading", || {
        let (gate, through, plain) = gated(Duration::from_millis(800), |inner| {
            GateStore::holding_gets(inner, is_chunk)
        });
        let a = node(&plain);
        let old = pattern(200_000, 3);
        put(&a, "k", &old);
        wait_manifest(&plain, "k");
        let b = node(&through);
        let mut r = hit(&b, "k");
        wait_until("download at its first chunk", DEADLINE, || gate.held() >= 1);
        // Replaced meanwhile: removed, its chunks deleted, produced again.
        a.remove("k").unwrap();
        wait_until("old chunks deleted", DEADLINE, || {
            !objects(&plain).iter().any(|p| is_chunk(p))
        });
        let new = pattern(100_000, 4);
        put(&a, "k", &new);
        wait_until("new manifest", DEADLINE, || {
            manifest_field(&plain, "k", "length").as_deref() == Some("100000")
        });
        gate.open();
        let err = read_to_vec(&mut r).expect_err("the old version's chunks are gone");
        assert!(is_aborted(&err), "{err}");
        assert!(format!("{err:?}").contains("Shared"), "{err:?}");
        assert!(
            format!("{err:?}").contains("replaced or removed"),
            "{err:?}"
        );
        // The new version is served.
        wait_until("new version on B", DEADLINE, || {
            hit_bytes(&b, "k").is_some_and(|v| v == new)
        });
    });
}

/// A chunk missing under the very manifest that lists it is corruption: the download compares
/// the manifest's ETag now (a HEAD) with the one it read (a GET), so this also checks that a
/// store gives both alike (on moto: `wire_download_tail_and_takeover_on_moto`).
fn a_chunk_missing_under_its_manifest_is_corrupt(store: Fleet) {
    let a = node(&store);
    put(&a, "gap", &pattern(200_000, 9));
    wait_manifest(&store, "gap");
    let dir = manifest_path(&store, "gap").unwrap();
    let dir = dir.trim_end_matches("manifest");
    let chunk = objects(&store)
        .into_iter()
        .find(|p| p.starts_with(dir) && is_chunk(p))
        .unwrap();
    delete_object(&store, &chunk);
    let c = node(&store);
    let err = read_to_vec(&mut hit(&c, "gap")).expect_err("a chunk is missing");
    assert!(format!("{err:?}").contains("Corrupt"), "{err:?}");
    assert!(format!("{err:?}").contains("is missing"), "{err:?}");
}

#[test]
fn a_chunk_missing_under_its_manifest_is_corrupt_in_memory() {
    deadline("missing chunk", || {
        a_chunk_missing_under_its_manifest_is_corrupt(bucket())
    });
}

/// `remove` deletes in the bucket (other nodes' local copies live on); local eviction never
/// deletes from the bucket.
#[test]
fn remove_deletes_in_the_bucket_and_eviction_does_not() {
    deadline("remove", || {
        let store = bucket();
        let a = Cache::builder()
            .max_entries(1)
            .shared(tier(&store))
            .build()
            .unwrap();
        put(&a, "one", b"first");
        put(&a, "two", b"second");
        a.run_pending_tasks();
        wait_until("local eviction", DEADLINE, || {
            a.run_pending_tasks();
            a.len() == 1
        });
        let b = node(&store);
        wait_until("both committed", DEADLINE, || {
            objects(&store)
                .iter()
                .filter(|p| p.ends_with("/manifest"))
                .count()
                == 2
        });
        assert_eq!(
            read_to_vec(&mut hit(&b, "one")).unwrap(),
            b"first",
            "evicted on A, still shared"
        );
        assert_eq!(read_to_vec(&mut hit(&b, "two")).unwrap(), b"second");

        assert!(a.remove("two").unwrap());
        let left = objects(&store);
        assert_eq!(
            left.iter().filter(|p| p.ends_with("/manifest")).count(),
            1,
            "{left:?}"
        );
        wait_until("chunks deleted", DEADLINE, || {
            objects(&store).iter().filter(|p| is_chunk(p)).count() == 1
        });
        // B's local copy lives on; a new node misses.
        assert_eq!(get_bytes(&b, "two"), b"second");
        let c = node(&store);
        drop(miss(&c, "two"));
        // Removing a key only in the bucket (not local) deletes it there too.
        assert!(!c.remove("one").unwrap());
        assert!(!objects(&store).iter().any(|p| p.ends_with("/manifest")));
    });
}

/// The time to live counts from the manifest's finish time on every node.
#[test]
fn ttl_counts_from_the_manifests_finish_time() {
    deadline("ttl", || {
        let store = bucket();
        let clock = Arc::new(ManualClock::new());
        let build = || {
            Cache::builder()
                .clock(clock.clone())
                .time_to_live(Duration::from_secs(3600))
                .shared(tier(&store))
                .build()
                .unwrap()
        };
        let a = build();
        let mut w = miss(&a, "k");
        w.set_time_to_live(Duration::from_secs(60));
        w.write_all(b"fresh for a minute").unwrap();
        w.finish().unwrap();
        let finished = a.entry_info("k").unwrap().finished.unwrap();
        wait_until("committed", DEADLINE, || {
            objects(&store).iter().any(|p| p.ends_with("/manifest"))
        });
        clock.advance(Duration::from_secs(40));
        let b = build();
        assert_eq!(
            read_to_vec(&mut hit(&b, "k")).unwrap(),
            b"fresh for a minute"
        );
        let info = b.entry_info("k").unwrap();
        let expires = info.expires.unwrap();
        // 60 s from A's finish (give or take the download's milliseconds), not from B's.
        assert!(
            expires >= finished + 59_000 && expires <= finished + 61_000,
            "expires {expires}, finished {finished}"
        );
        clock.advance(Duration::from_secs(21));
        assert!(b.get("k").unwrap().is_none(), "expired on B");
        // And in the bucket: a new node produces it again.
        let c = build();
        drop(miss(&c, "k"));
    });
}

/// Producing an expired entry again takes the round trips the docs promise (manifest, lease
/// create refused, lease, lease takeover). What went wrong before: a lease that said "done"
/// sent the miss back to the manifest once more even when the manifest it had just read was
/// that lease's own (expired), three more requests that made a slow bucket's timeout likely.
#[test]
fn producing_an_expired_entry_again_takes_four_requests() {
    deadline("expired again", || {
        // A long lease: no heartbeat's write falls between the miss and the count.
        let f = Fleet {
            lease: Duration::from_secs(60),
            ..bucket()
        };
        let clock = Arc::new(ManualClock::new());
        let build = || {
            Cache::builder()
                .clock(clock.clone())
                .time_to_live(Duration::from_secs(60))
                .shared(tier(&f))
                .build()
                .unwrap()
        };
        let a = build();
        put(&a, "k", b"old");
        // Committed: the lease says "done" once the manifest is in.
        wait_until("committed", DEADLINE, || {
            lease_state(&f).as_deref() == Some("done")
        });
        clock.advance(Duration::from_secs(61));
        let b = build();
        let before = b.shared_stats().unwrap();
        let w = miss(&b, "k");
        let after = b.shared_stats().unwrap();
        assert_eq!(
            (after.gets - before.gets, after.puts - before.puts),
            (2, 2),
            "GET manifest, PUT lease (refused), GET lease, PUT lease (taken over)"
        );
        drop(w);
    });
}

/// `get_or_produce` on two nodes: one production, both get the bytes.
#[test]
fn get_or_produce_uses_the_tier() {
    deadline("produce", || {
        let store = bucket();
        let a = node(&store);
        let b = node(&store);
        let runs = Arc::new(AtomicUsize::new(0));
        let produce = |c: &Cache| {
            let runs = runs.clone();
            c.get_or_produce("p", move |w| {
                runs.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(300));
                w.write_all(b"produced once")
            })
            .unwrap()
        };
        // Whichever node asks first (they race), one production serves both.
        let mut ra = produce(&a);
        let mut rb = produce(&b);
        assert_eq!(read_to_vec(&mut ra).unwrap(), b"produced once");
        assert_eq!(read_to_vec(&mut rb).unwrap(), b"produced once");
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    });
}

/// The async way: `get_or_create_async` awaits the bucket without blocking the executor.
#[test]
fn get_or_create_async_uses_the_tier() {
    use streamcache::tokio::CacheExt;
    deadline("async", || {
        let store = bucket();
        let a = node(&store);
        let b = node(&store);
        put(&a, "k", b"async bytes");
        wait_until("committed", DEADLINE, || {
            objects(&store).iter().any(|p| p.ends_with("/manifest"))
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let entry = rt.block_on(b.get_or_create_async("k")).unwrap();
        let Entry::Hit(mut r) = entry else {
            panic!("expected a hit")
        };
        assert_eq!(read_to_vec(&mut r).unwrap(), b"async bytes");
        let Entry::Miss(w) = rt.block_on(b.get_or_create_async("new")).unwrap() else {
            panic!("expected a miss")
        };
        drop(w);
    });
}

/// A store without conditional update (`LocalFileSystem`) is refused by `build()`.
#[test]
fn a_store_without_conditional_update_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap());
    let err = Cache::builder()
        .shared(SharedTier::new(fs))
        .build()
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("conditional update"), "{err}");
}

/// Bad URLs are clear errors.
#[test]
fn from_url_refuses_bad_urls() {
    for bad in ["", "http://bucket", "s3://", "s3:///prefix"] {
        let err = SharedTier::from_url(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad:?}: {err}");
    }
    SharedTier::from_url("s3://bucket/some/prefix").unwrap();
}

// ---------------------------------------------------------------------------------------
// Against a real S3-compatible server (moto).

fn moto_bucket(test: &str) -> Option<(Moto, Fleet)> {
    let moto = Moto::start(test)?;
    moto.create_bucket("fleet");
    let store = Fleet {
        store: moto.store("fleet"),
        lease: Duration::from_secs(3),
        poll: Duration::from_millis(50),
    };
    Some((moto, store))
}

#[test]
fn wire_download_tail_and_takeover_on_moto() {
    let Some((_moto, store)) = moto_bucket("wire_download_tail_and_takeover_on_moto") else {
        return;
    };
    deadline_in(Duration::from_secs(120), "moto", move || {
        finished_entry_is_downloaded_once_per_node(store.clone());
        remote_reader_tails_a_production(store.clone());
        a_chunk_missing_under_its_manifest_is_corrupt(store.clone());
        dead_producer_is_taken_over(store);
    });
}

#[test]
fn wire_herd_has_one_producer_on_moto() {
    let Some((_moto, store)) = moto_bucket("wire_herd_has_one_producer_on_moto") else {
        return;
    };
    deadline_in(Duration::from_secs(180), "moto herd", move || {
        herd_has_one_producer_fleet_wide(store, 8, 8);
    });
}

/// The conditional writes themselves, 16 racers per round: exactly one lease create wins.
#[test]
fn wire_conditional_create_has_one_winner_on_moto() {
    let Some((_moto, store)) = moto_bucket("wire_conditional_create_has_one_winner_on_moto") else {
        return;
    };
    deadline_in(Duration::from_secs(180), "moto races", move || {
        for round in 0..20 {
            let barrier = Arc::new(Barrier::new(16));
            let caches: Vec<Arc<Cache>> = (0..16).map(|_| Arc::new(node(&store))).collect();
            let key = format!("race-{round}");
            let threads: Vec<_> = caches
                .iter()
                .map(|c| {
                    let (c, barrier, key) = (c.clone(), barrier.clone(), key.clone());
                    thread::spawn(move || {
                        barrier.wait();
                        match c.get_or_create(&key).unwrap() {
                            Entry::Miss(w) => {
                                w.finish().unwrap();
                                1
                            }
                            Entry::Hit(mut r) => {
                                read_to_vec(&mut r).unwrap();
                                0
                            }
                        }
                    })
                })
                .collect();
            let winners: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
            assert_eq!(winners, 1, "round {round}");
        }
    });
}

/// A bucket that does not answer (moto frozen with SIGSTOP) or refuses connections: requests
/// produce locally within the timeout, never fail; `get_or_produce` does not wait at all; when
/// the bucket comes back, the entry is published in the background.
#[test]
fn wire_bucket_down_or_slow_keeps_serving_locally() {
    let Some((moto, store)) = moto_bucket("wire_bucket_down_or_slow_keeps_serving_locally") else {
        return;
    };
    deadline_in(Duration::from_secs(120), "bucket down", move || {
        // Bounds are deadlines (a call that waited for the bucket would hang past them), not
        // timings: `a` gives up on the bucket after 1 s, `patient` only after an hour.
        let timeout = Duration::from_secs(1);
        let a = Arc::new(
            Cache::builder()
                .shared(tier(&store).timeout(timeout))
                .build()
                .unwrap(),
        );
        let patient = Arc::new(
            Cache::builder()
                .shared(tier(&store).timeout(Duration::from_secs(3600)))
                .build()
                .unwrap(),
        );
        moto.freeze();
        let a2 = a.clone();
        let mut w = deadline_in(
            Duration::from_secs(20),
            "get_or_create, bucket frozen",
            move || miss(&a2, "k"),
        );
        w.write_all(b"made while the bucket slept").unwrap();
        w.finish().unwrap();
        assert_eq!(get_bytes(&a, "k"), b"made while the bucket slept");
        assert!(a.shared_stats().unwrap().fallbacks >= 1);
        let p = patient.clone();
        let mut r = deadline_in(
            Duration::from_secs(20),
            "get_or_produce, bucket frozen",
            move || p.get_or_produce("p", |w| w.write_all(b"produced")).unwrap(),
        );
        moto.thaw();
        // The producer thread's decision was waiting for the bucket; now it goes on.
        assert_eq!(read_to_vec(&mut r).unwrap(), b"produced");
        // Published in the background once the bucket answers: its manifest appears (looked
        // for directly, so that no node here competes for the key), then a new node reads it.
        wait_until(
            "published after the outage",
            Duration::from_secs(60),
            || {
                objects(&store)
                    .iter()
                    .filter(|p| p.ends_with("/manifest"))
                    .count()
                    == 2
            },
        );
        let b = node(&store);
        assert_eq!(
            read_to_vec(&mut hit(&b, "k")).unwrap(),
            b"made while the bucket slept"
        );

        // Connection refused from the start: build() works, requests produce locally.
        let dead_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let refused = Fleet {
            store: Arc::new(moto::store_at(
                &format!("http://127.0.0.1:{dead_port}"),
                "fleet",
            )),
            ..store.clone()
        };
        let c = Cache::builder()
            .shared(tier(&refused).timeout(timeout))
            .build()
            .unwrap();
        put(&c, "x", b"local only");
        assert_eq!(get_bytes(&c, "x"), b"local only");
    });
}

// ---------------------------------------------------------------------------------------
// A producer process killed with SIGKILL mid-entry, on moto.

const CRASH_KEY: &str = "killed-mid-entry";

/// The child: produces `CRASH_KEY` slowly on the bucket named in its directory, says when
/// half is written, and waits to be killed.
#[test]
fn child_produces_until_killed() {
    let Some(dir) = child_dir() else { return };
    let endpoint = std::fs::read_to_string(dir.join("endpoint")).unwrap();
    let store = Fleet {
        store: Arc::new(moto::store_at(endpoint.trim(), "fleet")),
        lease: Duration::from_secs(3),
        poll: Duration::from_millis(50),
    };
    let cache = node(&store);
    let mut w = miss(&cache, CRASH_KEY);
    w.write_all(&pattern(300_000, 10)).unwrap();
    w.flush().unwrap();
    // The parent reads the first bytes through the bucket before it kills us.
    report("half");
    loop {
        thread::park();
    }
}

#[test]
fn wire_producer_killed_with_sigkill_is_taken_over() {
    let Some((moto, store)) = moto_bucket("wire_producer_killed_with_sigkill_is_taken_over") else {
        return;
    };
    deadline_in(Duration::from_secs(120), "sigkill", move || {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("endpoint"), &moto.endpoint).unwrap();
        let child = ChildRun::spawn("child_produces_until_killed", dir.path());
        child.line(REPORT);
        let b = node(&store);
        let mut r = hit(&b, CRASH_KEY);
        let mut head = vec![0; 1000];
        r.read_exact(&mut head).unwrap();
        assert!(head[..] == pattern(300_000, 10)[..1000]);
        drop(child); // SIGKILL
        let err = read_to_vec(&mut r).expect_err("never a short body as complete");
        assert!(is_aborted(&err), "{err}");
        // Taken over within the lease plus a few seconds (a deadline, not a timing).
        let lease = store.lease;
        let c = Arc::new(node(&store));
        let c2 = c.clone();
        let mut w = deadline_in(
            lease + Duration::from_secs(5),
            "takeover of a killed producer",
            move || loop {
                match c2.get_or_create(CRASH_KEY).unwrap() {
                    Entry::Miss(w) => break w,
                    Entry::Hit(mut r) => {
                        assert!(
                            read_to_vec(&mut r).is_err(),
                            "the dead generation must not complete"
                        );
                    }
                }
            },
        );
        w.write_all(b"new generation").unwrap();
        w.finish().unwrap();
        let d = node(&store);
        assert_eq!(
            read_to_vec(&mut hit(&d, CRASH_KEY)).unwrap(),
            b"new generation"
        );
    });
}

// ---------------------------------------------------------------------------------------
// The acceptance scenario: three processes on one moto bucket, 20 requesters each, one key
// produced slowly.

const FLEET_KEY: &str = "produced-slowly";
const FLEET_PIECES: usize = 10;
const FLEET_PIECE: usize = 200_000;
const FLEET_PAUSE: Duration = Duration::from_millis(150);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// One process of the fleet: 20 requesters start together at the time the parent wrote, and
/// the process reports its misses, each requester's first-byte and completion times (epoch
/// ms), the production's end if it produced, and the blake3 of every body it read.
#[test]
fn child_fleet_node() {
    let Some(dir) = child_dir() else { return };
    let endpoint = std::fs::read_to_string(dir.join("endpoint")).unwrap();
    let start_at: u64 = std::fs::read_to_string(dir.join("start_at"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The tier as users make it: from the URL and the `AWS_*` environment the parent set
    // (moto's endpoint and dummy credentials), with `from_url`'s defaults (unsigned bodies).
    assert_eq!(std::env::var("AWS_ENDPOINT").unwrap(), endpoint.trim());
    let tier = SharedTier::from_url("s3://fleet/test")
        .unwrap()
        .lease(Duration::from_secs(3))
        .chunk_size(64 << 10)
        .chunk_interval(Duration::from_millis(20))
        .poll_interval(Duration::from_millis(50))
        .timeout(Duration::from_secs(5));
    let cache = Arc::new(Cache::builder().shared(tier).build().unwrap());
    while now_ms() < start_at {
        thread::sleep(Duration::from_millis(1));
    }
    let threads: String = (0..20)
        .map(|_| {
            let cache = cache.clone();
            thread::spawn(move || match cache.get_or_create(FLEET_KEY).unwrap() {
                Entry::Miss(mut w) => {
                    for i in 0..FLEET_PIECES {
                        w.write_all(&pattern(FLEET_PIECE, i as u64)).unwrap();
                        w.flush().unwrap();
                        thread::sleep(FLEET_PAUSE);
                    }
                    w.finish().unwrap();
                    format!("miss end={}", now_ms())
                }
                Entry::Hit(mut r) => {
                    let mut first = [0u8; 1];
                    r.read_exact(&mut first).unwrap();
                    let first_at = now_ms();
                    let mut rest = Vec::new();
                    r.read_to_end(&mut rest).unwrap();
                    let mut body = first.to_vec();
                    body.extend_from_slice(&rest);
                    format!(
                        "hit first={first_at} done={} hash={}",
                        now_ms(),
                        blake3::hash(&body).to_hex()
                    )
                }
            })
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|t| t.join().unwrap())
        .collect::<Vec<_>>()
        .join(";");
    report(&format!("pid={} {threads}", std::process::id()));
    loop {
        thread::park();
    }
}

#[test]
fn wire_three_processes_twenty_requesters_one_production() {
    let Some((_moto, fleet)) = moto_bucket("wire_three_processes_twenty_requesters_one_production")
    else {
        return;
    };
    let _ = fleet;
    let endpoint = _moto.endpoint.clone();
    deadline_in(Duration::from_secs(120), "three processes", move || {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("endpoint"), &endpoint).unwrap();
        // Start together, once all three have started up.
        std::fs::write(dir.path().join("start_at"), (now_ms() + 3000).to_string()).unwrap();
        let env = [
            ("AWS_ENDPOINT", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
            ("AWS_REGION", "us-east-1"),
        ];
        let children: Vec<_> = (0..3)
            .map(|_| ChildRun::spawn_env("child_fleet_node", dir.path(), &env))
            .collect();
        let reports: Vec<String> = children.iter().map(|c| c.line(REPORT)).collect();
        let mut expected = Vec::new();
        for i in 0..FLEET_PIECES {
            expected.extend_from_slice(&pattern(FLEET_PIECE, i as u64));
        }
        let expected = blake3::hash(&expected).to_hex().to_string();
        let mut misses = 0;
        let mut production_end = None;
        let mut remote_first = Vec::new();
        for report in &reports {
            let requests: Vec<&str> = report.split_once(' ').unwrap().1.split(';').collect();
            let (mine, local_end) = requests.iter().fold((0, None), |(n, end), r| {
                match r.strip_prefix("STREAMCACHE-CHILD-REPORT ").unwrap_or(r) {
                    r if r.contains("miss end=") => (
                        n + 1,
                        r.rsplit('=').next().map(|e| e.parse::<u64>().unwrap()),
                    ),
                    _ => (n, end),
                }
            });
            misses += mine;
            if let Some(end) = local_end {
                production_end = Some(end);
            }
            for r in requests.iter().filter(|r| r.contains("hit first=")) {
                assert!(
                    r.contains(&format!("hash={expected}")),
                    "identical, complete bytes: {r}"
                );
                if mine == 0 {
                    let first: u64 = r
                        .split("first=")
                        .nth(1)
                        .unwrap()
                        .split(' ')
                        .next()
                        .unwrap()
                        .parse()
                        .unwrap();
                    remote_first.push(first);
                }
            }
        }
        assert_eq!(
            misses, 1,
            "exactly one production across three processes: {reports:#?}"
        );
        let end = production_end.unwrap();
        let earliest = *remote_first
            .iter()
            .min()
            .expect("two processes read remotely");
        assert_eq!(
            remote_first.len(),
            40,
            "every requester of the other two processes read"
        );
        let production = FLEET_PAUSE * FLEET_PIECES as u32;
        eprintln!(
            "production took ~{production:?}; first remote byte {} ms before its end",
            end.saturating_sub(earliest)
        );
        assert!(
            end > earliest + production.as_millis() as u64 / 2,
            "a remote requester must get its first byte long before the production ends \
             (end {end}, first remote byte {earliest})"
        );
        drop(children);
    });
}
