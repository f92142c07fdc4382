//! The running tier: its runtime, the plan a local miss follows, and the background tasks that
//! download, tail and upload entries.

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use object_store::path::Path;
use object_store::{
    ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion,
};
use tokio::io::AsyncRead as _;
use tokio::runtime::Runtime;
use tokio::sync::Notify;

use super::SharedTier;
use super::format::{self, ChunkRef, Lease, LeaseState, Manifest};
use crate::cache::{Clock, Entry};
use crate::error::{Error, Result};
use crate::stream::{Reader, Writer};
use crate::tokio::AsyncReader;

/// How many chunk downloads of one entry run ahead of the one being written.
const DOWNLOAD_AHEAD: usize = 4;
/// Entries produced while the bucket was unreachable whose upload is retried in the
/// background; more are logged and left local (each holds one reader, no bytes).
const MAX_PENDING_PUBLISH: usize = 256;
/// Plans that lose this many conditional writes in a row give up (and produce locally).
const MAX_PLAN_ROUNDS: usize = 6;

/// The largest lease object read (one is under 200 bytes).
const MAX_LEASE: u64 = 64 << 10;
/// The largest manifest read: about 90 bytes per chunk, so 256 MiB lists some 3 million
/// chunks (24 TB of 8 MiB chunks).
const MAX_MANIFEST: u64 = 256 << 20;

type StoreError = object_store::Error;

/// What a local miss does, decided by the bucket.
#[derive(Debug)]
enum Plan {
    /// A finished entry: download it (its manifest and that manifest's e-tag).
    Download(Manifest, Option<String>),
    /// Another node produces it under this generation: tail its chunks.
    Tail(u128),
    /// We hold the lease: produce, and upload while producing.
    Produce(Held),
}

/// A lease this node won.
#[derive(Debug)]
struct Held {
    generation: u128,
    version: UpdateVersion,
    /// The manifest present when the lease was won (expired or unusable), replaced with a
    /// conditional update; `None` creates the manifest.
    manifest: Option<Previous>,
    /// Registered as this node's from before the lease was written, so that no plan here
    /// takes it for an orphan meanwhile.
    uploading: Uploading,
}

/// A manifest the producer replaces.
#[derive(Debug, Clone)]
struct Previous {
    version: UpdateVersion,
    /// Its generation, if it parsed: those chunks are deleted once it is replaced.
    generation: Option<u128>,
}

/// The tier's state shared by its tasks.
pub(crate) struct Ctx {
    cfg: SharedTier,
    node: u128,
    clock: Arc<dyn Clock>,
    /// The cache-wide time to live of this node, in milliseconds.
    cache_ttl_ms: Option<u64>,
    /// E-tags of manifests whose chunks failed verification here: treated as absent.
    /// Lock: held for one set operation; bounded (cleared past 1024).
    bad: Mutex<HashSet<String>>,
    /// Entries waiting for the bucket to come back (at most `MAX_PENDING_PUBLISH`).
    pending_publish: AtomicUsize,
    /// Generations this node is uploading: their leases name this node and a heartbeat keeps
    /// them. A fresh lease naming this node and none of these is an orphan (see
    /// `Ctx::orphan`). Lock: held for one set operation.
    uploading: Mutex<HashSet<u128>>,
    /// Counters for tests, benchmarks and the fleet example.
    pub(crate) stats: TierStats,
}

/// What the tier did, for observability.
#[derive(Debug, Default)]
pub(crate) struct TierStats {
    pub(crate) gets: AtomicU64,
    pub(crate) puts: AtomicU64,
    pub(crate) produced: AtomicU64,
    pub(crate) downloaded: AtomicU64,
    pub(crate) tailed: AtomicU64,
    pub(crate) fallbacks: AtomicU64,
}

/// The running tier of one cache: a small runtime of its own and the shared state.
pub(crate) struct Tier {
    ctx: Arc<Ctx>,
    rt: Option<Runtime>,
}

impl fmt::Debug for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tier")
            .field("config", &self.ctx.cfg)
            .field("node", &format_args!("{:032x}", self.ctx.node))
            .finish()
    }
}

impl Drop for Tier {
    fn drop(&mut self) {
        // Never blocks (the cache may be dropped inside an async runtime): tasks still
        // running are dropped, so entries being downloaded here abort, uploads stop and
        // their leases expire.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Tier {
    /// Starts the tier's runtime and checks that the store can do what the tier needs.
    pub(crate) fn start(
        cfg: SharedTier,
        clock: Arc<dyn Clock>,
        cache_ttl_ms: Option<u64>,
    ) -> Result<Tier> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("streamcache-shared")
            .enable_all()
            .build()
            .map_err(|e| Error::io_without_path("start the shared tier's runtime", e))?;
        let ctx = Arc::new(Ctx {
            cfg,
            node: random_u128(),
            clock,
            cache_ttl_ms,
            bad: Mutex::default(),
            pending_publish: AtomicUsize::new(0),
            uploading: Mutex::default(),
            stats: TierStats::default(),
        });
        let tier = Tier { ctx, rt: Some(rt) };
        match tier.block_on(probe(tier.ctx.clone())) {
            Some(Ok(())) => {}
            Some(Err(Probe::Unsupported(reason))) => {
                return Err(Error::invalid(format!(
                    "the shared tier's store ({}) cannot be used: {reason}",
                    tier.ctx.cfg.store
                )));
            }
            Some(Err(Probe::Unreachable(e))) => tracing::warn!(
                error = %e,
                "shared tier unreachable at start; serving locally until it answers"
            ),
            None => tracing::warn!(
                "shared tier did not answer within its timeout at start; serving locally until it answers"
            ),
        }
        Ok(tier)
    }

    pub(crate) fn stats(&self) -> &TierStats {
        &self.ctx.stats
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.rt
            .as_ref()
            .expect("runtime lives as long as the tier")
            .handle()
    }

    /// Runs `fut` on the tier's runtime and waits for it at most the tier's timeout (plus a
    /// margin for the runtime itself). Safe to call from any thread, async ones included
    /// (it blocks that thread; async callers use the `tokio` module's methods).
    fn block_on<T: Send + 'static>(
        &self,
        fut: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let limit = self.ctx.cfg.timeout;
        self.handle().spawn(async move {
            if let Ok(v) = tokio::time::timeout(limit, fut).await {
                let _ = tx.send(v);
            }
        });
        rx.recv_timeout(limit + Duration::from_millis(500)).ok()
    }

    /// Decides what a local miss of `w`'s key becomes: a hit that streams from the bucket, or
    /// a miss whose bytes are uploaded as they are written. Never fails: if the bucket does
    /// not answer within the timeout, the caller produces locally and the upload is retried
    /// in the background.
    pub(crate) fn resolve(&self, w: Writer) -> Entry {
        let ctx = self.ctx.clone();
        let key = w.key().to_string();
        let outcome = self.block_on(async move { plan(&ctx, &key).await });
        self.act(w, outcome)
    }

    /// [`resolve`](Tier::resolve) without blocking a thread.
    pub(crate) async fn resolve_async(self: Arc<Self>, w: Writer) -> Entry {
        let ctx = self.ctx.clone();
        let key = w.key().to_string();
        let limit = ctx.cfg.timeout;
        let task = self
            .handle()
            .spawn(async move { tokio::time::timeout(limit, plan(&ctx, &key)).await.ok() });
        let outcome = task.await.ok().flatten();
        self.act(w, outcome)
    }

    fn act(&self, w: Writer, outcome: Option<Result<Plan, StoreError>>) -> Entry {
        let ctx = self.ctx.clone();
        let key = w.key().to_string();
        match outcome {
            Some(Ok(Plan::Download(m, etag))) => match w.reader() {
                Ok(r) => {
                    ctx.stats.downloaded.fetch_add(1, Ordering::Relaxed);
                    self.handle().spawn(download(ctx, w, m, etag));
                    Entry::Hit(r)
                }
                Err(_) => Entry::Miss(w),
            },
            Some(Ok(Plan::Tail(generation))) => match w.reader() {
                Ok(r) => {
                    ctx.stats.tailed.fetch_add(1, Ordering::Relaxed);
                    self.handle().spawn(tail(ctx, w, generation));
                    Entry::Hit(r)
                }
                Err(_) => Entry::Miss(w),
            },
            Some(Ok(Plan::Produce(held))) => {
                ctx.stats.produced.fetch_add(1, Ordering::Relaxed);
                match w.reader() {
                    Ok(r) => {
                        self.handle().spawn(upload(ctx, r, key, held));
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "cannot read the new entry back to upload it");
                        // Nothing will be uploaded: other nodes should not tail the lease.
                        self.handle().spawn(async move {
                            let keeper = LeaseKeeper::new(
                                &ctx,
                                &key_hash(&key),
                                held.generation,
                                held.version,
                            );
                            let _ = keeper.update(&ctx, LeaseState::Aborted).await;
                        });
                    }
                }
                Entry::Miss(w)
            }
            failed => {
                ctx.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
                match failed {
                    Some(Err(e)) => {
                        tracing::warn!(%key, error = %e, "shared tier failed; producing locally, the upload will be retried")
                    }
                    _ => {
                        tracing::warn!(%key, "shared tier did not answer in time; producing locally, the upload will be retried")
                    }
                }
                if let Ok(r) = w.reader() {
                    self.handle().spawn(publish_later(ctx, r, key));
                }
                Entry::Miss(w)
            }
        }
    }

    /// Deletes `key` in the bucket: its manifest and lease at once (so no node serves or
    /// tails it any more), its chunks in the background.
    pub(crate) fn remove(&self, key: &str) -> Result<()> {
        let ctx = self.ctx.clone();
        let key = key.to_string();
        let done = self.block_on(async move {
            let h = key_hash(&key);
            // The generations whose chunks go are learnt before anything is deleted, and
            // only their directories are: a production that starts as soon as the lease is
            // gone keeps its own lease, chunks and manifest. (Deleting the key's whole
            // directory in the background once took those too.)
            // Best effort: a look that fails only leaves those chunks to the bucket's
            // lifecycle rules; the removal itself goes on.
            let (manifest_path, lease_path) = (ctx.path(&h, "manifest"), ctx.path(&h, "lease"));
            let (manifest, lease) = tokio::join!(
                ctx.get(&manifest_path, MAX_MANIFEST),
                ctx.get(&lease_path, MAX_LEASE)
            );
            let mut generations = Vec::new();
            if let Ok(Some((bytes, _))) = manifest {
                generations.extend(Manifest::decode(&bytes, &key).ok().map(|m| m.generation));
            }
            if let Ok(Some((bytes, _))) = lease {
                generations.extend(Lease::decode(&bytes).ok().map(|l| l.generation));
            }
            generations.dedup();
            ctx.delete(&manifest_path).await?;
            ctx.delete(&lease_path).await?;
            let ctx2 = ctx.clone();
            tokio::spawn(async move {
                for g in generations {
                    let dir = ctx2.path(&h, &format!("{g:032x}"));
                    if let Err(e) = ctx2.delete_prefix(&dir).await {
                        tracing::warn!(error = %e, "could not delete a removed entry's chunks; the bucket's lifecycle rules will");
                    }
                }
            });
            Ok::<(), StoreError>(())
        });
        match done {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(Error::Shared {
                op: "remove",
                cause: Arc::new(e),
            }),
            None => Err(Error::Shared {
                op: "remove",
                cause: Arc::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the bucket did not answer in time",
                )),
            }),
        }
    }
}

enum Probe {
    Unsupported(String),
    Unreachable(StoreError),
}

/// Checks that the store does both conditional writes the protocol rests on.
async fn probe(ctx: Arc<Ctx>) -> Result<(), Probe> {
    let path = ctx.path(".streamcache-probe", &format!("{:032x}", ctx.node));
    let unsupported = |what: &str, e: StoreError| match e {
        StoreError::NotImplemented { .. } | StoreError::NotSupported { .. } => {
            Probe::Unsupported(format!("it does not support {what}: {e}"))
        }
        e => Probe::Unreachable(e),
    };
    let put = |mode| ctx.put(&path, PutPayload::from_static(b"probe"), mode);
    let first = put(PutMode::Create)
        .await
        .map_err(|e| unsupported("conditional create (If-None-Match: *)", e))?;
    let result = async {
        match put(PutMode::Create).await {
            Err(StoreError::AlreadyExists { .. }) => {}
            Ok(_) => {
                return Err(Probe::Unsupported(
                    "it ignores conditional create (If-None-Match: *): two nodes could both produce a key".into(),
                ));
            }
            Err(e) => return Err(unsupported("conditional create (If-None-Match: *)", e)),
        }
        let wrong = UpdateVersion {
            e_tag: Some("\"streamcache-probe-mismatch\"".into()),
            version: None,
        };
        match put(PutMode::Update(wrong)).await {
            Err(StoreError::Precondition { .. }) => {}
            Ok(_) => {
                return Err(Probe::Unsupported(
                    "it ignores conditional update (If-Match): two nodes could both take over a lease".into(),
                ));
            }
            Err(e) => return Err(unsupported("conditional update (If-Match)", e)),
        }
        put(PutMode::Update(first))
            .await
            .map_err(|e| unsupported("conditional update (If-Match)", e))?;
        Ok(())
    }
    .await;
    let _ = ctx.delete(&path).await;
    result
}

impl Ctx {
    fn path(&self, key_hash: &str, rest: &str) -> Path {
        let prefix = self.cfg.prefix.as_str();
        let full = match (prefix.is_empty(), rest.is_empty()) {
            (true, true) => key_hash.to_string(),
            (true, false) => format!("{key_hash}/{rest}"),
            (false, true) => format!("{prefix}/{key_hash}"),
            (false, false) => format!("{prefix}/{key_hash}/{rest}"),
        };
        Path::from(full)
    }

    fn chunk_path(&self, key_hash: &str, generation: u128, index: u32) -> Path {
        self.path(key_hash, &format!("{generation:032x}/{index:08}"))
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.cfg.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Generic {
                store: "streamcache shared tier",
                source: format!("{op} did not answer within {:?}", self.cfg.timeout).into(),
            }),
        }
    }

    /// Reads the object at `path` whole; one larger than `max` bytes is not read and comes
    /// back empty (so that whoever can write the bucket cannot make a node hold an object of
    /// any size in memory).
    async fn get(&self, path: &Path, max: u64) -> Result<Option<(Bytes, ObjectMeta)>, StoreError> {
        self.stats.gets.fetch_add(1, Ordering::Relaxed);
        let got = self
            .timed("GET", async {
                let r = self.cfg.store.get(path).await?;
                let meta = r.meta.clone();
                if meta.size > max {
                    // Unread, it is an unreadable object: its decoder refuses it, and the
                    // caller goes on as for any corrupt one (a lease is taken over, a
                    // manifest replaced, a chunk fails its read).
                    tracing::warn!(
                        %path,
                        size = meta.size,
                        max,
                        "object larger than any of its kind; not read, treated as unreadable"
                    );
                    return Ok((Bytes::new(), meta));
                }
                Ok((r.bytes().await?, meta))
            })
            .await;
        match got {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The ETag of the manifest of the key hashed `h` now, `None` if there is none.
    async fn manifest_etag(&self, h: &str) -> Result<Option<String>, StoreError> {
        let path = self.path(h, "manifest");
        match self.timed("HEAD", self.cfg.store.head(&path)).await {
            Ok(meta) => Ok(meta.e_tag),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn put(
        &self,
        path: &Path,
        payload: PutPayload,
        mode: PutMode,
    ) -> Result<UpdateVersion, StoreError> {
        self.stats.puts.fetch_add(1, Ordering::Relaxed);
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.timed("PUT", self.cfg.store.put_opts(path, payload, opts))
            .await
            .map(UpdateVersion::from)
    }

    async fn delete(&self, path: &Path) -> Result<(), StoreError> {
        match self.timed("DELETE", self.cfg.store.delete(path)).await {
            Err(StoreError::NotFound { .. }) => Ok(()),
            r => r,
        }
    }

    /// Deletes every object under `prefix` (a key's directory: two levels at most).
    async fn delete_prefix(&self, prefix: &Path) -> Result<(), StoreError> {
        let mut dirs = vec![prefix.clone()];
        while let Some(dir) = dirs.pop() {
            let listing = self
                .timed("LIST", self.cfg.store.list_with_delimiter(Some(&dir)))
                .await?;
            dirs.extend(listing.common_prefixes);
            for meta in listing.objects {
                self.delete(&meta.location).await?;
            }
        }
        Ok(())
    }

    fn lease_ms(&self) -> u64 {
        self.cfg.lease.as_millis() as u64
    }

    fn stale(&self, lease: &Lease) -> bool {
        self.clock.now_millis().saturating_sub(lease.heartbeat) > self.lease_ms()
    }

    /// The time to live left to a manifest's entry on this node: `None` if it has expired,
    /// `Some(None)` if no time to live applies.
    fn remaining(&self, m: &Manifest) -> Option<Option<Duration>> {
        let ttl = match (m.ttl_ms, self.cache_ttl_ms) {
            (Some(a), Some(b)) => a.min(b),
            (Some(t), None) | (None, Some(t)) => t,
            (None, None) => return Some(None),
        };
        let left = m
            .finished
            .saturating_add(ttl)
            .checked_sub(self.clock.now_millis())?;
        (left > 0).then(|| Some(Duration::from_millis(left)))
    }

    /// Whether `lease` is this node's own with no upload behind it: a plan whose lease write
    /// landed after the plan had given up on its answer (the timeout), so that the entry was
    /// produced locally. Nobody heartbeats it; this node takes it over instead of tailing it.
    fn orphan(&self, lease: &Lease) -> bool {
        lease.node == self.node
            && !self
                .uploading
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&lease.generation)
    }

    fn is_bad(&self, etag: Option<&String>) -> bool {
        etag.is_some_and(|e| self.bad.lock().unwrap().contains(e))
    }

    fn mark_bad(&self, etag: Option<String>) {
        if let Some(e) = etag {
            let mut bad = self.bad.lock().unwrap();
            if bad.len() >= 1024 {
                bad.clear();
            }
            bad.insert(e);
        }
    }

    fn new_lease(&self, generation: u128) -> Lease {
        Lease {
            generation,
            node: self.node,
            state: LeaseState::Producing,
            heartbeat: self.clock.now_millis(),
            chunks: 0,
        }
    }
}

fn version_of(meta: &ObjectMeta) -> UpdateVersion {
    UpdateVersion {
        e_tag: meta.e_tag.clone(),
        version: meta.version.clone(),
    }
}

/// The protocol of a local miss (see the module docs): a finished manifest is downloaded; a
/// live lease is tailed; otherwise one node wins the lease with a conditional write.
async fn plan(ctx: &Arc<Ctx>, key: &str) -> Result<Plan, StoreError> {
    let h = key_hash(key);
    let manifest_path = ctx.path(&h, "manifest");
    let lease_path = ctx.path(&h, "lease");
    let mut rechecked = false;
    for _ in 0..MAX_PLAN_ROUNDS {
        let mut previous = None;
        if let Some((bytes, meta)) = ctx.get(&manifest_path, MAX_MANIFEST).await? {
            let decoded = Manifest::decode(&bytes, key);
            previous = Some(Previous {
                version: version_of(&meta),
                generation: decoded.as_ref().ok().map(|m| m.generation),
            });
            match decoded {
                _ if ctx.is_bad(meta.e_tag.as_ref()) => {
                    tracing::debug!(key, "manifest known bad here; treating the entry as absent")
                }
                Ok(m) if ctx.remaining(&m).is_some() => {
                    return Ok(Plan::Download(m, meta.e_tag));
                }
                Ok(_) => tracing::debug!(key, "shared entry expired; producing it again"),
                Err(reason) => {
                    tracing::warn!(key, %reason, "unusable manifest in the bucket; treating the entry as absent")
                }
            }
        }
        let generation = random_u128();
        let lease = ctx.new_lease(generation);
        let uploading = Uploading::new(ctx, generation);
        let held = |version, uploading| {
            Plan::Produce(Held {
                generation,
                version,
                manifest: previous.clone(),
                uploading,
            })
        };
        if let Some(version) = take_lease(ctx, &lease_path, &lease, PutMode::Create).await? {
            return Ok(held(version, uploading));
        }
        let Some((bytes, meta)) = ctx.get(&lease_path, MAX_LEASE).await? else {
            continue; // removed meanwhile: try to create it again
        };
        match Lease::decode(&bytes) {
            Ok(l) if l.state == LeaseState::Producing && !ctx.stale(&l) && !ctx.orphan(&l) => {
                return Ok(Plan::Tail(l.generation));
            }
            // The producer finished after we looked for its manifest: look again, once. (Not
            // when the manifest we saw is this lease's own, expired or unusable: looking again
            // would only cost three more requests.)
            Ok(l)
                if l.state == LeaseState::Done
                    && !rechecked
                    && previous.as_ref().and_then(|p| p.generation) != Some(l.generation) =>
            {
                rechecked = true;
                continue;
            }
            Ok(_) => {}
            Err(reason) => {
                tracing::warn!(key, %reason, "unreadable lease in the bucket; taking it over")
            }
        }
        // Dead, aborted, finished without a usable manifest, or unreadable: take it over.
        // Exactly one node's conditional update wins.
        let mode = PutMode::Update(version_of(&meta));
        if let Some(version) = take_lease(ctx, &lease_path, &lease, mode).await? {
            return Ok(held(version, uploading));
        }
    }
    Err(StoreError::Generic {
        store: "streamcache shared tier",
        source: format!("lost {MAX_PLAN_ROUNDS} conditional writes in a row on one key").into(),
    })
}

/// Writes `lease` with the conditional `mode`: its new version if this node won, `None` if
/// another node's write came first (the object exists, or changed since it was read).
async fn take_lease(
    ctx: &Ctx,
    path: &Path,
    lease: &Lease,
    mode: PutMode,
) -> Result<Option<UpdateVersion>, StoreError> {
    match ctx.put(path, PutPayload::from(lease.encode()), mode).await {
        Ok(version) => Ok(Some(version)),
        Err(
            StoreError::AlreadyExists { .. }
            | StoreError::Precondition { .. }
            | StoreError::NotFound { .. },
        ) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether two ETags name the same object version, whether or not a proxy weakened one
/// (`W/"…"`) or a store left the quotes off.
fn same_etag(a: Option<&str>, b: Option<&str>) -> bool {
    fn bare(e: &str) -> &str {
        let e = e.strip_prefix("W/").unwrap_or(e);
        e.strip_prefix('"')
            .and_then(|e| e.strip_suffix('"'))
            .unwrap_or(e)
    }
    matches!((a, b), (Some(a), Some(b)) if bare(a) == bare(b))
}

fn corrupt(ctx: &Ctx, key_hash: &str, what: &str, reason: String) -> Error {
    Error::Corrupt {
        path: PathBuf::from(ctx.path(key_hash, what).as_ref()),
        reason,
    }
}

fn remote_abort(w: Writer, why: String) {
    w.abort_with(Error::Shared {
        op: "read a remote entry",
        cause: Arc::new(std::io::Error::other(why)),
    });
}

fn write_chunk(w: &mut Writer, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(payload)?;
    // Publish now: local readers (and this node's clients) see each chunk as it lands.
    w.flush()
}

fn finish_local(ctx: &Ctx, mut w: Writer, m: &Manifest) {
    w.set_metadata(m.metadata.clone());
    match ctx.remaining(m) {
        Some(Some(left)) => w.set_time_to_live(left),
        Some(None) => {}
        // Expired while it was read: served to the readers already reading, then gone.
        None => w.set_time_to_live(Duration::from_millis(1)),
    }
    if let Err(e) = w.finish() {
        tracing::warn!(key = %m.key, error = %e, "could not commit a downloaded entry locally");
    }
}

/// The chunk fetches running ahead of a download; cancelled if the download stops early.
struct Ahead<T>(VecDeque<tokio::task::JoinHandle<T>>);

impl<T> Drop for Ahead<T> {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Streams a finished entry into the local writer, a few chunks ahead, each verified against
/// the manifest before its bytes are written.
async fn download(ctx: Arc<Ctx>, mut w: Writer, m: Manifest, etag: Option<String>) {
    let h = key_hash(&m.key);
    w.set_metadata(m.metadata.clone());
    let _ = w.set_expected_len(m.length);
    let n = m.chunks.len();
    let mut ahead = Ahead(VecDeque::new());
    let mut next = 0usize;
    let mut next_offset = 0u64;
    for i in 0..n {
        while next < n && ahead.0.len() < DOWNLOAD_AHEAD {
            let (ctx, path) = (ctx.clone(), ctx.chunk_path(&h, m.generation, next as u32));
            let (generation, index) = (m.generation, next as u32);
            let offset = next_offset;
            let max = format::chunk_object_max(m.chunks[next].len, next == 0);
            next_offset += m.chunks[next].len;
            // Each chunk is fetched and hashed in its own task, so the runtime's threads
            // verify several chunks at once; bytes are written in order below.
            ahead.0.push_back(tokio::spawn(async move {
                let mut tries = 0;
                loop {
                    match ctx.get(&path, max).await {
                        Err(e) if tries < 3 => {
                            tries += 1;
                            tracing::debug!(error = %e, "chunk download failed; retrying");
                            tokio::time::sleep(Duration::from_millis(100 << tries)).await;
                        }
                        r => {
                            return r.map(|found| {
                                found.map(|(obj, _)| {
                                    format::decode_chunk(obj, generation, index, offset)
                                })
                            });
                        }
                    }
                }
            }));
            next += 1;
        }
        let got = ahead.0.pop_front().expect("one per chunk").await;
        let chunk_name = format!("{:032x}/{i:08}", m.generation);
        let decoded = match got {
            Ok(Ok(Some(decoded))) => decoded,
            Ok(Ok(None)) => {
                // Gone: the entry was replaced or removed since its manifest was read (the
                // replaced generation's chunks are deleted a lease after the new manifest), or
                // the chunk was lost. Only the second damages the manifest still in place.
                return match ctx.manifest_etag(&h).await {
                    Ok(now) if same_etag(now.as_deref(), etag.as_deref()) => {
                        ctx.mark_bad(etag);
                        w.abort_with(corrupt(
                            &ctx,
                            &h,
                            &chunk_name,
                            "chunk listed by the manifest is missing".into(),
                        ));
                    }
                    Ok(_) => remote_abort(
                        w,
                        format!(
                            "chunk {i} is gone: the entry was replaced or removed in the bucket \
                             while it was downloaded"
                        ),
                    ),
                    Err(e) => remote_abort(w, format!("chunk {i} is missing ({e})")),
                };
            }
            Ok(Err(e)) => return remote_abort(w, format!("chunk {i}: {e}")),
            Err(e) => return remote_abort(w, format!("chunk {i}: {e}")),
        };
        let want = &m.chunks[i];
        let checked = decoded.and_then(|c| {
            if c.hash != want.hash || c.payload.len() as u64 != want.len {
                Err(format!("chunk {i} does not match the manifest"))
            } else if c.last != (i + 1 == n) {
                Err(format!("chunk {i} has the wrong end marker"))
            } else {
                Ok(c)
            }
        });
        match checked {
            Ok(c) => {
                if let Err(e) = write_chunk(&mut w, &c.payload) {
                    tracing::warn!(key = %m.key, error = %e, "local write of a downloaded chunk failed");
                    return; // the writer aborted itself
                }
            }
            Err(reason) => {
                ctx.mark_bad(etag);
                w.abort_with(corrupt(&ctx, &h, &chunk_name, reason));
                return;
            }
        }
    }
    finish_local(&ctx, w, &m);
}

/// Why a tail stops.
enum Gone {
    Aborted(String),
}

/// A tailed generation's lease, while its producer is not gone.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    /// Producing.
    Alive,
    /// The lease could not be read this time (the bucket failed).
    Unread,
    /// Done: its manifest and every chunk were written before it said so.
    Done,
}

/// Checks the lease of a tailed generation: `Err` if its producer is gone.
async fn check_lease(ctx: &Ctx, h: &str, generation: u128) -> Result<Seen, Gone> {
    match ctx.get(&ctx.path(h, "lease"), MAX_LEASE).await {
        Ok(None) => Err(Gone::Aborted(
            "the entry was removed from the bucket".into(),
        )),
        Ok(Some((bytes, _))) => match Lease::decode(&bytes) {
            Ok(l) if l.generation != generation => Err(Gone::Aborted(
                "the producer lost its lease (another node took over)".into(),
            )),
            Ok(l) if l.state == LeaseState::Aborted => {
                Err(Gone::Aborted("the remote producer aborted".into()))
            }
            Ok(l) if l.state == LeaseState::Producing && ctx.stale(&l) => {
                Err(Gone::Aborted(format!(
                    "the remote producer stopped (no heartbeat for {:?})",
                    ctx.cfg.lease
                )))
            }
            Ok(l) if l.state == LeaseState::Done => Ok(Seen::Done),
            Ok(_) => Ok(Seen::Alive),
            Err(reason) => Err(Gone::Aborted(format!("unreadable lease: {reason}"))),
        },
        // A failing bucket is judged by how long it fails (in `tail`), not by one error.
        Err(_) => Ok(Seen::Unread),
    }
}

/// Starts `since` at a first failure; whether the failures have now lasted longer than `limit`.
fn outlasts(since: &mut Option<Instant>, limit: Duration) -> bool {
    since.get_or_insert_with(Instant::now).elapsed() > limit
}

/// Tails another node's production: polls for each next chunk, checks its producer's lease
/// while waiting, and commits locally only when the manifest agrees with every chunk read.
async fn tail(ctx: Arc<Ctx>, mut w: Writer, generation: u128) {
    let key = w.key().to_string();
    let h = key_hash(&key);
    let mut index = 0u32;
    let mut read: Vec<ChunkRef> = Vec::new();
    // Bytes of the chunks in `read`: where the next chunk starts.
    let mut offset = 0u64;
    let check_every = (ctx.cfg.lease / 4).max(ctx.cfg.poll_interval);
    let mut last_check = Instant::now();
    let mut failing_since: Option<Instant> = None;
    // Since when every look at the producer's lease failed.
    let mut lease_unread_since: Option<Instant> = None;
    let mut ended = false;
    // The lease said "done" at the last check, and nothing was found since.
    let mut done_seen = false;
    loop {
        let found = if ended {
            ctx.get(&ctx.path(&h, "manifest"), MAX_MANIFEST).await
        } else {
            ctx.get(
                &ctx.chunk_path(&h, generation, index),
                format::MAX_CHUNK_OBJECT,
            )
            .await
        };
        match found {
            Ok(Some((obj, _))) if !ended => {
                failing_since = None;
                match format::decode_chunk(obj, generation, index, offset) {
                    Ok(c) => {
                        if let Some(meta) = c.metadata.filter(|m| !m.is_empty()) {
                            w.set_metadata(meta);
                        }
                        if write_chunk(&mut w, &c.payload).is_err() {
                            return;
                        }
                        offset += c.payload.len() as u64;
                        read.push(ChunkRef {
                            len: c.payload.len() as u64,
                            hash: c.hash,
                        });
                        ended = c.last;
                        index += 1;
                        done_seen = false;
                        // A new chunk shows its producer alive since the last lease check,
                        // however that went.
                        lease_unread_since = None;
                        continue;
                    }
                    Err(reason) => {
                        let name = format!("{generation:032x}/{index:08}");
                        return w.abort_with(corrupt(&ctx, &h, &name, reason));
                    }
                }
            }
            Ok(Some((obj, _))) => match Manifest::decode(&obj, &key) {
                Ok(m) if m.generation == generation && m.chunks == read => {
                    return finish_local(&ctx, w, &m);
                }
                Ok(m) if m.generation != generation => {
                    // An older manifest still there (being replaced): wait for ours.
                    tracing::trace!(key, "manifest of another generation; waiting");
                }
                Ok(_) => {
                    return w.abort_with(corrupt(
                        &ctx,
                        &h,
                        "manifest",
                        "manifest disagrees with the chunks read".into(),
                    ));
                }
                Err(reason) => return w.abort_with(corrupt(&ctx, &h, "manifest", reason)),
            },
            Ok(None) => failing_since = None,
            Err(e) => {
                // Only a look that found nothing shows the data gone; a failed one shows
                // nothing (a slow or failing bucket is judged by how long it fails).
                done_seen = false;
                if outlasts(&mut failing_since, ctx.cfg.lease) {
                    return remote_abort(w, format!("the bucket kept failing: {e}"));
                }
            }
        }
        if last_check.elapsed() >= check_every {
            last_check = Instant::now();
            match check_lease(&ctx, &h, generation).await {
                Err(Gone::Aborted(why)) => return remote_abort(w, why),
                // Done means everything was written before the lease said so; still missing
                // a poll later, it is gone (a removal whose lease delete failed, say), and
                // waiting on would never end.
                Ok(Seen::Done) if done_seen => {
                    return remote_abort(
                        w,
                        "the producer finished, but the rest of the entry is gone from the bucket"
                            .into(),
                    );
                }
                // A producer whose lease cannot be read for a whole lease is not vouched for
                // (it may be dead), whatever the chunk reads answer: without this, a bucket
                // that failed only the lease reads while it answered "absent" for the next
                // chunk kept the reader waiting for ever.
                Ok(Seen::Unread) if outlasts(&mut lease_unread_since, ctx.cfg.lease) => {
                    return remote_abort(
                        w,
                        format!(
                            "the producer's lease could not be read for {:?}",
                            ctx.cfg.lease
                        ),
                    );
                }
                Ok(seen) => {
                    if seen != Seen::Unread {
                        lease_unread_since = None;
                    }
                    done_seen = seen == Seen::Done;
                }
            }
        }
        tokio::time::sleep(ctx.cfg.poll_interval).await;
    }
}

/// Why an upload stopped.
enum Stop {
    /// The local writer failed or aborted.
    Local(std::io::Error),
    /// Another node holds the lease now.
    Lost,
    /// The bucket kept failing.
    Remote(StoreError),
    /// Another node committed the key first.
    Refused,
}

/// The lease this node holds, kept fresh by a heartbeat task.
struct LeaseKeeper {
    path: Path,
    generation: u128,
    version: tokio::sync::Mutex<UpdateVersion>,
    lost: AtomicBool,
    chunks: AtomicU64,
    stop: Notify,
}

impl LeaseKeeper {
    fn new(ctx: &Ctx, h: &str, generation: u128, version: UpdateVersion) -> LeaseKeeper {
        LeaseKeeper {
            path: ctx.path(h, "lease"),
            generation,
            version: tokio::sync::Mutex::new(version),
            lost: AtomicBool::new(false),
            chunks: AtomicU64::new(0),
            stop: Notify::new(),
        }
    }

    /// Writes the lease with `state` if this node still holds it. A conditional write whose
    /// answer was lost (a timeout) is recovered by reading the lease back: it is still ours
    /// while it names our generation.
    async fn update(&self, ctx: &Ctx, state: LeaseState) -> Result<(), Stop> {
        let mut version = self.version.lock().await;
        let lease = Lease {
            state,
            chunks: self.chunks.load(Ordering::Relaxed),
            ..ctx.new_lease(self.generation)
        };
        for second_try in [false, true] {
            let mode = PutMode::Update(version.clone());
            match take_lease(ctx, &self.path, &lease, mode).await {
                Ok(Some(v)) => {
                    *version = v;
                    return Ok(());
                }
                Err(e) => return Err(Stop::Remote(e)),
                Ok(None) if second_try => break,
                // Refused: either another node took it, or our last write landed without
                // its answer reaching us. Still ours while it names our generation.
                Ok(None) => match ctx.get(&self.path, MAX_LEASE).await {
                    Ok(Some((bytes, meta)))
                        if Lease::decode(&bytes).is_ok_and(|l| {
                            l.generation == self.generation && l.state == LeaseState::Producing
                        }) =>
                    {
                        *version = version_of(&meta);
                    }
                    Ok(_) => break,
                    Err(e) => return Err(Stop::Remote(e)),
                },
            }
        }
        self.lost.store(true, Ordering::Release);
        Err(Stop::Lost)
    }
}

async fn heartbeat(ctx: Arc<Ctx>, keeper: Arc<LeaseKeeper>) {
    let every = ctx.cfg.lease / 4;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = keeper.stop.notified() => return,
        }
        match keeper.update(&ctx, LeaseState::Producing).await {
            Ok(()) => {}
            Err(Stop::Lost) => return,
            Err(Stop::Remote(e)) => tracing::warn!(error = %e, "lease heartbeat failed; retrying"),
            Err(Stop::Local(_) | Stop::Refused) => return,
        }
    }
}

/// Uploads a local entry as it is written: reads it through a local reader, cuts a chunk
/// every `chunk_size` bytes or `chunk_interval` after its first byte, and commits the
/// manifest after the last chunk. The memory it holds is one chunk.
async fn upload(ctx: Arc<Ctx>, reader: Reader, key: String, held: Held) {
    let h = key_hash(&key);
    let Held {
        generation,
        version,
        manifest: previous,
        uploading: _uploading,
    } = held;
    let keeper = Arc::new(LeaseKeeper::new(&ctx, &h, generation, version));
    let beat = tokio::spawn(heartbeat(ctx.clone(), keeper.clone()));
    let body = upload_chunks(&ctx, reader, &h, &keeper).await;
    // The heartbeat goes on while the manifest is written: a commit slow to answer must not
    // let the lease go stale, or another node takes it over and produces the entry again
    // (and one of the two commits is refused, failing that production's remote readers).
    let outcome = match body {
        Ok(Uploaded {
            chunks,
            length,
            metadata,
            lifetime,
        }) => {
            // The local entry's own finish time and time to live, read from its stream: not
            // the time the upload got to the end (which may come minutes later, after the
            // bucket was down) nor whatever entry holds the key by now (this one may be
            // evicted or replaced already). A stream always has them once finished; the
            // fallback is for form's sake.
            let (finished, ttl_ms) =
                lifetime.unwrap_or_else(|| (ctx.clock.now_millis(), ctx.cache_ttl_ms));
            let m = Manifest {
                key: key.clone(),
                generation,
                length,
                finished,
                ttl_ms,
                metadata,
                chunks,
            };
            commit(&ctx, &h, &m, previous, &keeper).await
        }
        Err(stop) => Err(stop),
    };
    // Stopped before the last word on the lease, so that no heartbeat writes "producing"
    // over it.
    keeper.stop.notify_one();
    let _ = beat.await;
    match outcome {
        Ok(old_generation) => {
            let _ = keeper.update(&ctx, LeaseState::Done).await;
            if let Some(old) = old_generation.filter(|g| *g != generation) {
                // Readers still downloading the replaced version get a grace period.
                let (ctx, prefix) = (ctx.clone(), ctx.path(&h, &format!("{old:032x}")));
                tokio::spawn(async move {
                    tokio::time::sleep(ctx.cfg.lease).await;
                    let _ = ctx.delete_prefix(&prefix).await;
                });
            }
        }
        Err(Stop::Local(e)) => {
            tracing::debug!(%key, error = %e, "local entry aborted; marking its lease aborted");
            let _ = keeper.update(&ctx, LeaseState::Aborted).await;
        }
        Err(Stop::Lost) => {
            tracing::warn!(%key, "another node took the lease over; this node's upload stops (its local entry is kept)");
        }
        Err(Stop::Remote(e)) => {
            tracing::warn!(%key, error = %e, "upload abandoned: the bucket kept failing (the local entry is kept)");
            let _ = keeper.update(&ctx, LeaseState::Aborted).await;
        }
        Err(Stop::Refused) => {
            tracing::debug!(%key, "another node committed this key first");
            let _ = keeper.update(&ctx, LeaseState::Aborted).await;
        }
    }
}

/// A generation in `Ctx::uploading` for as long as this lives: from before its lease is
/// written until its upload ends (or the plan or the lease is given up).
struct Uploading(Arc<Ctx>, u128);

impl Uploading {
    fn new(ctx: &Arc<Ctx>, generation: u128) -> Uploading {
        ctx.uploading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(generation);
        Uploading(ctx.clone(), generation)
    }
}

impl fmt::Debug for Uploading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Uploading({:032x})", self.1)
    }
}

impl Drop for Uploading {
    fn drop(&mut self) {
        self.0
            .uploading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

/// Writes the manifest (the commit point) while the lease is still this node's; returns the
/// generation it replaced, if any. The caller's heartbeat keeps the lease fresh meanwhile.
async fn commit(
    ctx: &Ctx,
    h: &str,
    m: &Manifest,
    previous: Option<Previous>,
    keeper: &LeaseKeeper,
) -> Result<Option<u128>, Stop> {
    // Still ours? (A node that lost the lease must not commit over its successor.)
    keeper.update(ctx, LeaseState::Producing).await?;
    let old_generation = previous.as_ref().and_then(|p| p.generation);
    let mode = previous.map_or(PutMode::Create, |p| PutMode::Update(p.version));
    let path = ctx.path(h, "manifest");
    let body = m.encode();
    let mut tries = 0;
    loop {
        match ctx
            .put(&path, PutPayload::from(body.clone()), mode.clone())
            .await
        {
            Ok(_) => return Ok(old_generation),
            Err(StoreError::AlreadyExists { .. } | StoreError::Precondition { .. }) => {
                // Refused: another node's commit came first, or a try of ours whose answer
                // was lost (a timeout) landed. The manifest says which.
                return match ctx.get(&path, MAX_MANIFEST).await {
                    Ok(Some((bytes, _)))
                        if Manifest::decode(&bytes, &m.key)
                            .is_ok_and(|there| there.generation == m.generation) =>
                    {
                        Ok(old_generation)
                    }
                    _ => Err(Stop::Refused),
                };
            }
            Err(e) if tries < 5 => {
                tries += 1;
                tracing::warn!(key = %m.key, error = %e, "manifest upload failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 << tries)).await;
                // The heartbeat found the lease taken over meanwhile: the successor commits.
                if keeper.lost.load(Ordering::Acquire) {
                    return Err(Stop::Lost);
                }
            }
            Err(e) => return Err(Stop::Remote(e)),
        }
    }
}

/// A whole entry uploaded: what its manifest needs.
struct Uploaded {
    chunks: Vec<ChunkRef>,
    length: u64,
    metadata: Bytes,
    /// When the local entry finished and its time to live (`Reader::lifetime`).
    lifetime: Option<(u64, Option<u64>)>,
}

async fn upload_chunks(
    ctx: &Ctx,
    reader: Reader,
    h: &str,
    keeper: &LeaseKeeper,
) -> Result<Uploaded, Stop> {
    let mut r = AsyncReader::from(reader);
    let size = ctx.cfg.chunk_size;
    // From a memory cache the chunk is made of the stored bytes themselves; from a disk cache
    // the bytes are copied into one chunk-sized buffer, reused from chunk to chunk once the
    // store has let go of it (fresh 8 MiB buffers per chunk cost the producer's page faults
    // as much as the copy itself).
    let mut parts: Vec<Bytes> = Vec::new();
    let mut copy: Option<BytesMut> = (!r.get_ref().shares_bytes()).then(|| BytesMut::zeroed(size));
    let mut buffered = 0usize;
    let mut deadline: Option<tokio::time::Instant> = None;
    let mut refs = Vec::new();
    let mut total = 0u64;
    loop {
        if keeper.lost.load(Ordering::Acquire) {
            return Err(Stop::Lost);
        }
        let read = match &mut copy {
            Some(buf) => {
                let into = &mut buf[buffered..];
                until(
                    deadline,
                    std::future::poll_fn(|cx| {
                        let mut rb = tokio::io::ReadBuf::new(into);
                        std::pin::Pin::new(&mut r)
                            .poll_read(cx, &mut rb)
                            .map_ok(|()| rb.filled().len())
                    }),
                )
                .await
            }
            None => until(deadline, r.read_chunk(size - buffered))
                .await
                .map(|got| {
                    got.map(|b| {
                        let n = b.len();
                        if n > 0 {
                            parts.push(b);
                        }
                        n
                    })
                }),
        };
        let last = match read {
            Some(Ok(0)) => true,
            Some(Ok(n)) => {
                if buffered == 0 {
                    deadline = Some(tokio::time::Instant::now() + ctx.cfg.chunk_interval);
                }
                buffered += n;
                if buffered < size {
                    continue;
                }
                false
            }
            Some(Err(e)) => return Err(Stop::Local(e)),
            None => false, // the interval passed with bytes waiting
        };
        let index = u32::try_from(refs.len())
            .map_err(|_| Stop::Local(std::io::Error::other("entry has over 2^32 chunks")))?;
        // The first chunk carries the metadata so far, for tailing readers, unless it is
        // large (they get it from the manifest at the end).
        let metadata = match index {
            0 => Some(r.get_ref().metadata())
                .filter(|m| m.len() <= format::MAX_CHUNK_METADATA)
                .unwrap_or_default(),
            _ => Bytes::new(),
        };
        let filled = copy.take().map(|b| b.freeze());
        if let Some(b) = &filled {
            parts.push(b.slice(..buffered));
        }
        let (header, hash) = format::chunk_header(
            keeper.generation,
            index,
            last,
            total,
            &metadata,
            &parts,
            |offset, len| r.get_ref().known_hash(offset, len),
        )
        .map_err(|e| Stop::Local(std::io::Error::other(e)))?;
        let len: u64 = parts.iter().map(|p| p.len() as u64).sum();
        // The parts go out as they are: no copy of the payload.
        let object: PutPayload = [header, metadata]
            .into_iter()
            .chain(parts.drain(..))
            .collect();
        put_chunk(
            ctx,
            &ctx.chunk_path(h, keeper.generation, index),
            object,
            keeper,
        )
        .await?;
        // The buffer again, unless the store still holds the bytes (an in-memory store keeps
        // them): then a new one.
        copy = filled.map(|b| b.try_into_mut().unwrap_or_else(|_| BytesMut::zeroed(size)));
        total += len;
        refs.push(ChunkRef { len, hash });
        keeper.chunks.store(refs.len() as u64, Ordering::Relaxed);
        buffered = 0;
        deadline = None;
        if last {
            let reader = r.get_ref();
            return Ok(Uploaded {
                chunks: refs,
                length: total,
                metadata: reader.metadata(),
                lifetime: reader.lifetime(),
            });
        }
    }
}

/// `fut`'s output, or `None` if `deadline` passes first.
async fn until<T>(
    deadline: Option<tokio::time::Instant>,
    fut: impl Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// Puts one chunk, retrying while the bucket fails (up to twice the lease) and the lease is
/// still ours.
async fn put_chunk(
    ctx: &Ctx,
    path: &Path,
    object: PutPayload,
    keeper: &LeaseKeeper,
) -> Result<(), Stop> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(50);
    loop {
        match ctx.put(path, object.clone(), PutMode::Overwrite).await {
            Ok(_) => return Ok(()),
            Err(e) if started.elapsed() > ctx.cfg.lease * 2 => return Err(Stop::Remote(e)),
            Err(e) => {
                tracing::debug!(error = %e, "chunk upload failed; retrying");
                if keeper.lost.load(Ordering::Acquire) {
                    return Err(Stop::Lost);
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// An entry produced while the bucket did not answer: try to publish it until the bucket
/// answers (with a growing delay), unless another node has it by then.
async fn publish_later(ctx: Arc<Ctx>, reader: Reader, key: String) {
    if ctx.pending_publish.fetch_add(1, Ordering::AcqRel) >= MAX_PENDING_PUBLISH {
        ctx.pending_publish.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!(%key, "too many entries wait for the shared tier; this one stays local");
        return;
    }
    let mut delay = Duration::from_secs(1);
    loop {
        tokio::time::sleep(delay).await;
        if reader.failed() {
            break;
        }
        match tokio::time::timeout(ctx.cfg.timeout, plan(&ctx, &key)).await {
            Ok(Ok(Plan::Produce(held))) => {
                upload(ctx.clone(), reader, key, held).await;
                break;
            }
            Ok(Ok(_)) => break, // another node has it or makes it
            _ => delay = (delay * 2).min(Duration::from_secs(60)),
        }
    }
    ctx.pending_publish.fetch_sub(1, Ordering::AcqRel);
}

/// The key's directory in the bucket: blake3 of the key, in hex.
pub(crate) fn key_hash(key: &str) -> String {
    blake3::hash(key.as_bytes()).to_hex().to_string()
}

/// A random 128-bit number (node identities and generations): unique, not secret.
pub(crate) fn random_u128() -> u128 {
    u128::from_le_bytes(crate::codec::random_id(b"streamcache shared tier"))
}

#[cfg(test)]
mod tests {
    use super::same_etag;

    #[test]
    fn etags_compare_without_weakness_or_quotes() {
        assert!(same_etag(Some("\"abc\""), Some("\"abc\"")));
        assert!(same_etag(Some("W/\"abc\""), Some("\"abc\"")));
        assert!(same_etag(Some("abc"), Some("\"abc\"")));
        assert!(!same_etag(Some("\"abc\""), Some("\"abd\"")));
        assert!(!same_etag(Some("\"\""), Some("\"abc\"")));
        assert!(!same_etag(None, Some("\"abc\"")));
        assert!(!same_etag(Some("\"abc\""), None));
        assert!(!same_etag(None, None), "no ETag: nothing to tell by");
    }
}
