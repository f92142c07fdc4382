//! The shared tier against a real S3-compatible server (moto, single-threaded, on 127.0.0.1),
//! as ratios to baselines measured in the same run:
//!
//! 1. cold-node read of a finished 64 MiB entry through the tier, against a plain
//!    `object_store` GET of the same 64 MiB from the same server;
//! 2. producer throughput (from the `Miss` writer in hand: write 64 MiB and finish) with the
//!    upload overlapped, against the same writes into a cache without the tier; for the
//!    record also the miss itself (`get_or_create` until the writer is in hand: the lease
//!    round trips), the time until the manifest is committed, and the process's CPU time for
//!    the entry (writes alone; writes and the whole upload, up to the manifest);
//! 3. a remote late joiner's delay: from a producer's `flush` to a reader on another node
//!    having the bytes, against the configured chunk interval plus poll interval.
//!
//! All three run twice: with moto at normal CPU priority, then under `SCHED_IDLE`. Then, as a
//! diagnostic, the producer rounds of 2. run once more against a "far bucket": an in-memory
//! store that costs this machine no CPU for the bytes it is sent (a PUT of a chunk waits as
//! long as 1 GB/s would take and keeps a one-byte stand-in). That separates the client's own
//! cost from that of a server sharing its cores. Each producer line also gives the producing
//! thread's time on the run queue (runnable, but another thread had its core), from
//! `/proc/thread-self/schedstat`.
//!
//! ```text
//! STREAMCACHE_MOTO_PYTHON=/path/to/venv/bin/python cargo bench --bench shared --features s3
//! ```
//! (`.ci/run` leaves such a venv in `target/moto-venv`.) Without moto it prints why and exits.

#[path = "../tests/support/moto.rs"]
mod moto;

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_core::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use streamcache::shared::SharedTier;
use streamcache::{Cache, Entry};

const MIB: usize = 1 << 20;
const SIZE: usize = 64 * MIB;
/// Rounds of the cold read.
const ROUNDS: usize = 5;
/// Rounds of each producer case: a 64 MiB production takes 20–40 ms, where one ill-placed
/// wake-up shows, so its median needs more of them.
const PRODUCER_ROUNDS: usize = 15;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn tier(store: &Arc<dyn ObjectStore>, prefix: &str) -> SharedTier {
    SharedTier::new(store.clone()).prefix(prefix)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and harness probes
    }
    for idle in [false, true] {
        let Some(moto) = moto::Moto::start_with("bench shared", idle) else {
            return;
        };
        println!(
            "--- moto at {}",
            if idle {
                "SCHED_IDLE (only CPU the client leaves idle: a stand-in for a remote bucket)"
            } else {
                "normal CPU priority"
            }
        );
        run(&moto);
    }
    println!(
        "--- a far bucket (diagnostic, not a server: costs this machine no CPU for the bytes it is sent)"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let far: Arc<dyn ObjectStore> = Arc::new(FarBucket::default());
    produce(&rt, &far, &pattern());
}

/// The 64 MiB every case writes or reads.
fn pattern() -> Vec<u8> {
    (0..SIZE).map(|i| (i * 31 % 251) as u8).collect()
}

fn run(moto: &moto::Moto) {
    moto.create_bucket("bench");
    let store = moto.store("bench");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let data = pattern();

    // The server's own cost of one request, for the record (a chunked download makes one
    // per chunk, plus one for the manifest).
    let tiny = Path::from("plain/tiny");
    rt.block_on(store.put(&tiny, PutPayload::from_static(b"x")))
        .unwrap();
    let mut per_request = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        rt.block_on(async { store.get(&tiny).await.unwrap().bytes().await.unwrap() });
        per_request.push(t.elapsed().as_secs_f64());
    }
    println!(
        "one small GET: {:.1} ms (median of 20)",
        median(per_request) * 1e3
    );

    // 1. Cold-node read.
    let plain = Path::from("plain/object");
    rt.block_on(store.put(&plain, PutPayload::from(data.to_vec())))
        .unwrap();
    let producer = Cache::builder()
        .shared(tier(&store, "cold"))
        .build()
        .unwrap();
    let Entry::Miss(mut w) = producer.get_or_create("big").unwrap() else {
        panic!("fresh bucket")
    };
    w.write_all(&data).unwrap();
    w.finish().unwrap();
    wait_committed(&rt, &store, "cold");
    let (mut get_s, mut tier_s) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        let got = rt.block_on(async { store.get(&plain).await.unwrap().bytes().await.unwrap() });
        assert_eq!(got.len(), SIZE);
        get_s.push(t.elapsed().as_secs_f64());

        let node = Cache::builder()
            .shared(tier(&store, "cold"))
            .build()
            .unwrap();
        let t = Instant::now();
        let Entry::Hit(mut r) = node.get_or_create("big").unwrap() else {
            panic!("finished entry must be a hit")
        };
        let mut n = 0;
        loop {
            let b = r.read_chunk(MIB).unwrap();
            if b.is_empty() {
                break;
            }
            n += b.len();
        }
        assert_eq!(n, SIZE);
        tier_s.push(t.elapsed().as_secs_f64());
    }
    let (g, c) = (median(get_s), median(tier_s));
    let mbs = |s: f64| SIZE as f64 / s / 1e6;
    println!(
        "cold-node read of 64 MiB: plain GET {:.0} MB/s, through the tier {:.0} MB/s: {:.2}x",
        mbs(g),
        mbs(c),
        g / c
    );

    produce(&rt, &store, &data);
    late_joiner(&store);
}

/// 2. Producer throughput with the upload overlapped into `store`.
fn produce(rt: &tokio::runtime::Runtime, store: &Arc<dyn ObjectStore>, data: &[u8]) {
    let mbs = |s: f64| SIZE as f64 / s / 1e6;
    // Into a memory cache and into a disk cache. Each cache is dropped before the next is
    // made and the order alternates, so that both sides get the same mix of fresh and
    // recycled pages; one unmeasured round of each first.
    for disk in [false, true] {
        let (mut local_s, mut shared_s, mut commit_s) = (Vec::new(), Vec::new(), Vec::new());
        let mut round = 0;
        let builder = |dir: &std::path::Path| {
            if disk {
                Cache::builder().disk(dir)
            } else {
                Cache::builder()
            }
        };
        let mut miss_s = Vec::new();
        let (mut local_cpu, mut shared_cpu) = (Vec::new(), Vec::new());
        let (mut local_queued, mut shared_queued) = (Vec::new(), Vec::new());
        let mut local_run = |measure: bool, local_s: &mut Vec<f64>| {
            let dir = tempfile::tempdir().unwrap();
            let local = builder(dir.path()).build().unwrap();
            let cpu = cpu_ms();
            let queued = run_queue_ms();
            let (_, wrote) = write_entry(&local, "p", data);
            if measure {
                local_s.push(wrote);
                local_cpu.push(cpu_ms() - cpu);
                local_queued.push(run_queue_ms() - queued);
            }
        };
        let mut shared_run = |measure: bool,
                              shared_s: &mut Vec<f64>,
                              commit_s: &mut Vec<f64>,
                              miss_s: &mut Vec<f64>| {
            round += 1;
            let prefix = format!("produce-{disk}-{round}");
            let dir = tempfile::tempdir().unwrap();
            let node = builder(dir.path())
                .shared(tier(store, &prefix))
                .build()
                .unwrap();
            let t = Instant::now();
            let cpu = cpu_ms();
            let queued = run_queue_ms();
            let (miss, wrote) = write_entry(&node, "p", data);
            let queued = run_queue_ms() - queued;
            wait_committed(rt, store, &prefix);
            if measure {
                shared_queued.push(queued);
                shared_cpu.push(cpu_ms() - cpu);
                shared_s.push(wrote);
                miss_s.push(miss);
                commit_s.push(t.elapsed().as_secs_f64());
            }
        };
        local_run(false, &mut local_s);
        shared_run(false, &mut shared_s, &mut commit_s, &mut miss_s);
        for i in 0..PRODUCER_ROUNDS {
            if i % 2 == 0 {
                local_run(true, &mut local_s);
                shared_run(true, &mut shared_s, &mut commit_s, &mut miss_s);
            } else {
                shared_run(true, &mut shared_s, &mut commit_s, &mut miss_s);
                local_run(true, &mut local_s);
            }
        }
        let (l, s, m) = (median(local_s), median(shared_s), median(commit_s));
        println!(
            "producer writes 64 MiB into a {} cache: without the tier {:.0} MB/s, with the upload overlapped {:.0} MB/s: {:.2}x (the miss took {:.1} ms; manifest committed {:.2} s after it began)",
            if disk { "disk" } else { "memory" },
            mbs(l),
            mbs(s),
            l / s,
            median(miss_s) * 1e3,
            m
        );
        println!(
            "  process CPU per entry: the writes alone {:.0} ms; the writes and the upload {:.0} ms",
            median(local_cpu),
            median(shared_cpu)
        );
        println!(
            "  the producing thread's time on the run queue per entry: without the tier {:.1} ms; with it {:.1} ms",
            median(local_queued),
            median(shared_queued)
        );
    }
}

/// 3. Remote late joiner.
fn late_joiner(store: &Arc<dyn ObjectStore>) {
    let chunk_interval = Duration::from_millis(250);
    let poll = Duration::from_millis(100);
    let mk = || {
        Cache::builder()
            .shared(
                tier(store, "late")
                    .chunk_interval(chunk_interval)
                    .poll_interval(poll),
            )
            .build()
            .unwrap()
    };
    let (a, b) = (mk(), mk());
    let Entry::Miss(mut w) = a.get_or_create("slow").unwrap() else {
        panic!("fresh key")
    };
    w.write_all(&[1; 1000]).unwrap();
    w.flush().unwrap();
    let Entry::Hit(mut r) = b.get_or_create("slow").unwrap() else {
        panic!("a production elsewhere must be a hit")
    };
    let mut buf = vec![0; 1000];
    r.read_exact(&mut buf).unwrap();
    let mut delays = Vec::new();
    for _ in 0..8 {
        let t = Instant::now();
        w.write_all(&[2; 1000]).unwrap();
        w.flush().unwrap();
        r.read_exact(&mut buf).unwrap();
        delays.push(t.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(50));
    }
    w.finish().unwrap();
    let d = median(delays.clone());
    let worst = delays.iter().copied().fold(0.0, f64::max);
    let bound = (chunk_interval + poll).as_secs_f64();
    println!(
        "remote late joiner: flush to remote bytes median {:.0} ms, worst {:.0} ms; chunk interval + poll = {:.0} ms: {:.2}x of the bound",
        d * 1e3,
        worst * 1e3,
        bound * 1e3,
        d / bound
    );
}

/// This process's CPU time so far (user + system, all threads), in milliseconds, at the
/// kernel's tick resolution (10 ms here).
fn cpu_ms() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are the 12th
    // and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) * 10.0
}

/// Writes `data` as a new entry; returns the seconds the miss took (`get_or_create` until the
/// writer is in hand) and then the writes and `finish`.
fn write_entry(cache: &Cache, key: &str, data: &[u8]) -> (f64, f64) {
    let t = Instant::now();
    let Entry::Miss(mut w) = cache.get_or_create(key).unwrap() else {
        panic!("fresh key")
    };
    let miss = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for piece in data.chunks(MIB) {
        w.write_all(piece).unwrap();
    }
    w.finish().unwrap();
    (miss, t.elapsed().as_secs_f64())
}

fn wait_committed(rt: &tokio::runtime::Runtime, store: &Arc<dyn ObjectStore>, prefix: &str) {
    let started = Instant::now();
    loop {
        let listed = rt.block_on(async {
            let mut dirs = vec![Path::from(prefix)];
            let mut found = false;
            while let Some(d) = dirs.pop() {
                let l = store.list_with_delimiter(Some(&d)).await.unwrap();
                found |= l
                    .objects
                    .iter()
                    .any(|o| o.location.as_ref().ends_with("/manifest"));
                dirs.extend(l.common_prefixes);
            }
            found
        });
        if listed {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "never committed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The calling thread's time so far waiting on a run queue (runnable while another thread had
/// its core), in milliseconds; 0 where `/proc/thread-self/schedstat` cannot be read.
fn run_queue_ms() -> f64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |ns| ns / 1e6)
}

/// A bucket that costs this machine no CPU for the bytes it is sent: an in-memory store whose
/// PUTs of more than 64 KiB (chunks) wait as long as sending them at 1 GB/s would take, then
/// let go of the payload, as a store does once its request is sent, and keep a one-byte
/// stand-in. Leases and manifests are kept whole. For the producer rounds only: chunks cannot
/// be read back.
#[derive(Debug, Default)]
struct FarBucket {
    inner: InMemory,
}

impl std::fmt::Display for FarBucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FarBucket")
    }
}

#[async_trait::async_trait]
impl ObjectStore for FarBucket {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        let len = payload.content_length();
        if len <= 64 << 10 {
            return self.inner.put_opts(location, payload, opts).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(len as f64 / 1e9)).await;
        drop(payload);
        self.inner
            .put_opts(location, PutPayload::from_static(b"x"), opts)
            .await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}
