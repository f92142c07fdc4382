//! Loading a storage's committed entries into the index when the cache opens: in the
//! background, while the cache already serves requests.
//!
//! A loader thread reads the index hint the cache saved last ([`Storage::take_hint`]) and
//! applies the changes the storage journaled since; without a usable hint it lists the
//! storage in batches ([`Storage::list_batches`]; every version of a key is in one batch)
//! and indexes the newest version of each key. The reaper saves a new hint when the journal
//! has grown past `CHECKPOINT_BACKLOG`, and after a load that listed (`checkpoint_if_due`). Meanwhile a request
//! for a key that is not indexed yet **settles** it first: it looks the key's blobs up
//! directly ([`Storage::list_prefix`] with the key's blob-name prefix) and indexes the newest.
//!
//! Invariants:
//! * Each key is settled at most once while loading, by whichever of the loader and a request
//!   claims it first; from then on the index alone answers for it. A request claims a key in
//!   `Loading::claimed` before looking; the loader indexes a key only under the write guard of
//!   that key's `claimed` shard, after seeing it unclaimed. So the loader never indexes a key
//!   a request settled (which it may have removed or replaced since), and a request never
//!   misses a key the loader is indexing: at most one version of a key is ever indexed, and a
//!   finished entry on disk never gets a second producer.
//! * Requests that find a key claimed by another wait for its look-up to end; a look-up that
//!   fails (EMFILE, EIO) releases the claim, so the next request looks again.
//! * Older versions, blobs that are not cache entries or whose name does not match their key,
//!   and entries already past their time to live are deleted when found; `next_id` is raised
//!   above every id found for a key before that key can get a new version.
//! * While loading, size eviction waits (the recency of loaded entries is not known yet):
//!   loaded entries enter the recency list, oldest last-access at the least recent end, when
//!   loading completes, and a maintenance pass follows. Expiry applies throughout.

use std::collections::hash_map::Entry as HashEntry;
use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;

use super::evict::Refile;
use super::index::{Indexed, Inner, Slot};
use super::meta::EntryMeta;
use super::reaper;
use super::slot::blob_name;
use crate::error::{Error, Result};
use crate::storage::{BlobInfo, Change, HintReader, SavedHint};

/// A request's claim on a key while loading: set when its look-up ended (the error kind if
/// it failed).
type Claim = OnceLock<Result<(), io::ErrorKind>>;

/// The state of the background load (in `Inner`).
#[derive(Debug, Default)]
pub(crate) struct Loading {
    /// Set until the index holds every stored entry. While set, requests settle keys they do
    /// not find and size eviction waits. Cleared once, by the loader, after the loaded
    /// entries joined the recency list.
    pub(crate) active: AtomicBool,
    /// Lock: DashMap's shard locks (the loader holds one across indexing one key; a request
    /// only to claim). Keys claimed by requests while loading (see the module invariants).
    /// Emptied when loading completes.
    claimed: DashMap<Arc<str>, Arc<Claim>>,
    /// Lock: read-held by a request for the whole of settling a key (claim, look-up, insert),
    /// write-held by `complete` to clear `active`: so no look-up is still under way, or
    /// starts, once the index is complete (one could find the blob of an entry removed since,
    /// still on disk until the reaper deletes it, and index it again).
    gate: RwLock<()>,
    /// Set (under `gate`'s write lock) by a `Cache::clear` while loading: every stored entry
    /// not indexed yet predates the clear, so the loader and look-ups delete what they find
    /// instead of indexing it. (Keys created since the open are claimed, so never found.)
    cleared: AtomicBool,
    /// Lock: this mutex (a leaf lock). Loaded slots waiting to join the recency list: `Some`
    /// until `complete` takes them; a slot indexed after that joins the list at once.
    pending: Mutex<Option<Vec<Arc<Slot>>>>,
    /// Entries indexed by the loader and by settling requests so far.
    pub(crate) entries: AtomicU64,
    /// Asks the loader to stop (the cache is being dropped).
    stop: AtomicBool,
    /// Set when a load listed the storage (no usable hint): the reaper then saves a hint
    /// once it completes, so that the next open, after a crash too, need not list again.
    listed: AtomicBool,
    /// Lock: this mutex, with `done_cv`. `Some` once an attempt of the loader ended: `Ok` if
    /// it indexed everything, else why not (a failed attempt is retried, and may be followed
    /// by `Ok`).
    done: Mutex<Option<std::result::Result<(), String>>>,
    done_cv: Condvar,
}

impl Loading {
    /// Waits up to `timeout` for the loader to end; `None` if it has not.
    fn wait(&self, timeout: Duration) -> Option<std::result::Result<(), String>> {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let (done, _) = self
            .done_cv
            .wait_timeout_while(done, timeout, |d| d.is_none())
            .unwrap_or_else(|e| e.into_inner());
        done.clone()
    }

    /// Waits until an attempt of the loader ended (completed, failed or stopped).
    pub(crate) fn wait_ended(&self) {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        drop(
            self.done_cv
                .wait_while(done, |d| d.is_none())
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    fn end(&self, outcome: std::result::Result<(), String>) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = Some(outcome);
        self.done_cv.notify_all();
    }
}

/// Starts loading the storage's entries in the background and waits up to `wait` for it.
///
/// # Errors
/// The listing's error, if it failed within `wait` (the cache is then not built).
pub(super) fn start(
    inner: &Arc<Inner>,
    wait: Duration,
    hint: Option<SavedHint>,
) -> Result<JoinHandle<()>> {
    *inner
        .loading
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    inner.loading.active.store(true, Ordering::SeqCst);
    let loader = inner.clone();
    let handle = std::thread::Builder::new()
        .name("streamcache-loader".into())
        .spawn(move || load(&loader, hint))
        .map_err(|e| Error::io_without_path("spawn loader thread", e))?;
    match inner.loading.wait(wait) {
        Some(Err(e)) => {
            stop(inner, handle);
            Err(Error::from_io_without_path(
                "list stored entries",
                io::Error::other(e),
            ))
        }
        _ => Ok(handle),
    }
}

/// Asks the loader to stop and waits for it.
pub(super) fn stop(inner: &Inner, loader: JoinHandle<()>) {
    // (A `start` that failed stopped it already.)
    inner.loading.stop.store(true, Ordering::SeqCst);
    let _ = loader.join();
}

/// The loader thread: indexes every batch, then completes the load. A listing that fails is
/// retried with a growing delay; meanwhile requests keep settling the keys they ask for, so
/// nothing stored is missed, but size eviction waits.
fn load(inner: &Arc<Inner>, hint: Option<SavedHint>) {
    let loading = &inner.loading;
    if let Some(hint) = hint {
        match load_hint(inner, hint) {
            Ok(()) => return finish(inner),
            Err(e) => {
                tracing::warn!(error = %e, "the index hint is unusable; listing the storage instead");
            }
        }
    }
    loading.listed.store(true, Ordering::Relaxed);
    let mut delay = Duration::from_millis(100);
    loop {
        let listed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            inner.storage.list_batches(&|batch| {
                if loading.stop.load(Ordering::Relaxed) {
                    return ControlFlow::Break(());
                }
                index_batch(inner, batch);
                ControlFlow::Continue(())
            })
        }));
        let failure = match listed {
            _ if loading.stop.load(Ordering::Relaxed) => return finish(inner),
            Ok(Ok(())) => return finish(inner),
            Ok(Err(e)) => e.to_string(),
            Err(_) => "the storage panicked while listing".to_owned(),
        };
        tracing::error!(error = %failure, "loading the cache index failed; retrying in {delay:?} (keys are looked up one by one meanwhile)");
        loading.end(Err(failure));
        let until = std::time::Instant::now() + delay;
        while std::time::Instant::now() < until {
            if loading.stop.load(Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// Ends a load that went through (or was stopped): completes it unless stopped.
fn finish(inner: &Inner) {
    if inner.loading.stop.load(Ordering::Relaxed) {
        inner.loading.end(Err("stopped".to_owned()));
    } else {
        complete(inner);
        inner.loading.end(Ok(()));
    }
}

/// Indexes the newest version of each key of one batch, unless a request settled it.
fn index_batch(inner: &Inner, batch: Vec<BlobInfo>) {
    let _gate = inner.loading.gate.read().unwrap_or_else(|e| e.into_inner());
    let now = inner.books.clock.now_millis();
    for (key, (id, meta, len)) in newest_per_key(inner, batch, now) {
        index_one(inner, key, id, &meta, len);
    }
}

/// Indexes one stored entry found by the loader, unless a request settled its key.
fn index_one(inner: &Inner, key: String, id: u64, meta: &EntryMeta, len: u64) {
    let name = blob_name(&key, id);
    let key: Arc<str> = Arc::from(key);
    // Under the claimed shard's write guard: no request can claim the key meanwhile.
    let MapEntry::Vacant(_unclaimed) = inner.loading.claimed.entry(key.clone()) else {
        return;
    };
    if inner.loading.cleared.load(Ordering::Acquire) {
        reaper::delete_at_open(&*inner.storage, &name);
        return;
    }
    match insert(inner, key, id, meta, len) {
        // Indexed now, or by an earlier attempt of this load.
        None => {}
        Some(indexed) if indexed == id => {}
        Some(_) => {
            // Only a storage that splits a key's versions over batches gets here.
            tracing::warn!(blob = %name, "discarding a second version of a loaded key");
            reaper::delete_at_open(&*inner.storage, &name);
        }
    }
}

/// Whether an entry finished at `finished`, with its own time to live `ttl_ms` (0 = none),
/// is past its time to live at `now`.
fn expired(inner: &Inner, finished: u64, ttl_ms: u64, now: u64) -> bool {
    let own = (ttl_ms != 0).then_some(ttl_ms);
    inner
        .limits
        .expires_at(finished, own)
        .is_some_and(|at| now >= at)
}

/// Makes `key` settled before a request looks it up in the index while loading: indexes its
/// newest stored version if nobody has yet. Returns at once when not loading.
///
/// # Errors
/// [`Error::Io`] if the storage cannot be listed for the key right now (the request fails;
/// the next one looks again).
pub(crate) fn settle(inner: &Inner, key: &str) -> Result<()> {
    let loading = &inner.loading;
    if !loading.active.load(Ordering::Acquire) || inner.index.contains_key(key) {
        return Ok(());
    }
    let _gate = loading.gate.read().unwrap_or_else(|e| e.into_inner());
    if !loading.active.load(Ordering::Acquire) {
        return Ok(());
    }
    let key: Arc<str> = Arc::from(key);
    let (claim, mine) = match loading.claimed.entry(key.clone()) {
        MapEntry::Occupied(e) => (e.get().clone(), false),
        MapEntry::Vacant(v) => {
            let claim = Arc::new(Claim::new());
            v.insert(claim.clone());
            (claim, true)
        }
    };
    if !mine {
        return (*claim.wait()).map_err(|kind| {
            Error::io_without_path("look up a stored entry", io::Error::from(kind))
        });
    }
    // Whatever happens (an error, a panic), waiters are released and a failed claim
    // withdrawn, so that the next request looks again.
    struct Release<'a> {
        loading: &'a Loading,
        key: Arc<str>,
        claim: Arc<Claim>,
    }
    impl Drop for Release<'_> {
        fn drop(&mut self) {
            if self.claim.get().is_none() {
                let _ = self.claim.set(Err(io::ErrorKind::Other));
            }
            if self.claim.get().is_some_and(Result::is_err) {
                self.loading
                    .claimed
                    .remove_if(&self.key, |_, c| Arc::ptr_eq(c, &self.claim));
            }
        }
    }
    let release = Release {
        loading,
        key: key.clone(),
        claim: claim.clone(),
    };
    let looked = look_up(inner, &key);
    let _ = claim.set(looked.as_ref().map(|_| ()).map_err(io::Error::kind));
    drop(release);
    looked.map_err(|e| Error::from_io_without_path("look up a stored entry", e))
}

/// `Cache::clear` while loading: from now on, stored entries not indexed yet are deleted when
/// found (they predate the clear). Returns at once when not loading.
pub(crate) fn clear_stored(inner: &Inner) {
    let loading = &inner.loading;
    if loading.active.load(Ordering::Acquire) {
        // No batch of the loader and no look-up is under way while it is set.
        let _gate = loading.gate.write().unwrap_or_else(|e| e.into_inner());
        loading.cleared.store(true, Ordering::Release);
    }
}

/// Marks `key` settled while loading (its entry leaves the index, and its blob, deleted
/// later, must not be looked up again). Returns at once when not loading.
pub(crate) fn settled(inner: &Inner, key: &Arc<str>) {
    let loading = &inner.loading;
    if loading.active.load(Ordering::Acquire) {
        loading.claimed.entry(key.clone()).or_insert_with(|| {
            let done = Claim::new();
            let _ = done.set(Ok(()));
            Arc::new(done)
        });
    }
}

/// Indexes the newest stored version of `key`, if any and not indexed already.
fn look_up(inner: &Inner, key: &Arc<str>) -> io::Result<()> {
    if inner.index.contains_key(&**key) {
        return Ok(());
    }
    let name = blob_name(key, 0);
    let prefix = &name[..name.len() - 16];
    let found = inner.storage.list_prefix(prefix)?;
    let now = inner.books.clock.now_millis();
    for (_, (id, meta, len)) in newest_per_key(inner, found, now) {
        if *meta.key == **key && inner.loading.cleared.load(Ordering::Acquire) {
            reaper::delete_at_open(&*inner.storage, &blob_name(key, id));
        } else if *meta.key == **key {
            // Nobody else indexes the key while it is claimed; only the same version can be
            // there already (indexed by an earlier, failed attempt of the loader).
            if insert(inner, key.clone(), id, &meta, len).is_some_and(|other| other != id) {
                reaper::delete_at_open(&*inner.storage, &blob_name(key, id));
            }
        }
    }
    Ok(())
}

/// Checks the listed blobs and keeps the newest version of each key: deletes older versions,
/// blobs that are not cache entries or whose name does not match their key, and entries past
/// their time to live; raises `next_id` above every id seen.
fn newest_per_key(
    inner: &Inner,
    blobs: Vec<BlobInfo>,
    now: u64,
) -> HashMap<String, (u64, EntryMeta, u64)> {
    let mut newest: HashMap<String, (u64, EntryMeta, u64)> = HashMap::new();
    let mut max_id = 0;
    for blob in blobs {
        let id = blob
            .name
            .rsplit_once('-')
            .and_then(|(_, id)| u64::from_str_radix(id, 16).ok());
        let meta = EntryMeta::decode(&blob.meta);
        // Ids come from a counter that starts at 0 in a fresh directory: one in the top half
        // of the range was not made by a cache (and `id + 1` below must not overflow).
        let id = id.filter(|&id| id < 1 << 63);
        let (Some(id), Ok(meta)) = (id, meta) else {
            tracing::warn!(blob = %blob.name, "discarding blob that is not a cache entry");
            reaper::delete_at_open(&*inner.storage, &blob.name);
            continue;
        };
        if blob_name(&meta.key, id) != blob.name {
            tracing::warn!(blob = %blob.name, "discarding blob whose name does not match its key");
            reaper::delete_at_open(&*inner.storage, &blob.name);
            continue;
        }
        max_id = max_id.max(id + 1);
        if expired(inner, meta.finished, meta.ttl_ms, now) {
            reaper::delete_at_open(&*inner.storage, &blob.name);
            continue;
        }
        match newest.entry(meta.key.clone()) {
            HashEntry::Occupied(mut e) => {
                let (old_id, old, _) = e.get();
                let older = if (old.finished, *old_id) >= (meta.finished, id) {
                    blob.name
                } else {
                    let old = blob_name(&old.key, *old_id);
                    e.insert((id, meta, blob.len));
                    old
                };
                reaper::delete_at_open(&*inner.storage, &older);
            }
            HashEntry::Vacant(e) => {
                e.insert((id, meta, blob.len));
            }
        }
    }
    inner.next_id.fetch_max(max_id, Ordering::Relaxed);
    newest
}

/// Indexes a stored entry as a finished slot, if its key is not indexed; if it is, returns
/// the id of the version indexed.
fn insert(inner: &Inner, key: Arc<str>, id: u64, meta: &EntryMeta, len: u64) -> Option<u64> {
    let slot = Arc::new(Slot::new(
        inner,
        key,
        id,
        meta.finished.max(1),
        meta.last_access,
        len,
    ));
    slot.set_ttl_ms(meta.ttl_ms);
    slot.set_live();
    // Counted before it is visible (see `Cache::get_or_create`).
    inner.entries.fetch_add(1, Ordering::Relaxed);
    inner.bytes.fetch_add(len, Ordering::Relaxed);
    match inner.index.entry(Indexed(slot.clone())) {
        MapEntry::Occupied(e) => {
            let indexed = e.key().0.id;
            drop(e);
            inner.entries.fetch_sub(1, Ordering::Relaxed);
            inner.bytes.fetch_sub(len, Ordering::Relaxed);
            slot.flags.store(0, Ordering::SeqCst);
            Some(indexed)
        }
        MapEntry::Vacant(v) => {
            v.insert(None);
            // Stamps of this session must order after those persisted by the last one.
            inner
                .books
                .access
                .fetch_max(meta.last_access, Ordering::Relaxed);
            inner.loading.entries.fetch_add(1, Ordering::Relaxed);
            let late = {
                let mut pending = inner
                    .loading
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                match &mut *pending {
                    Some(pending) => {
                        pending.push(slot);
                        None
                    }
                    None => Some(slot),
                }
            };
            if let Some(slot) = late {
                join_recency(inner, vec![slot]);
            }
            None
        }
    }
}

/// Ends a complete load: loaded entries join the recency list behind everything used in this
/// session, least recently accessed at the end; then size eviction may run.
fn complete(inner: &Inner) {
    let loaded = inner
        .loading
        .pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or_default();
    join_recency(inner, loaded);
    {
        let _gate = inner
            .loading
            .gate
            .write()
            .unwrap_or_else(|e| e.into_inner());
        inner.loading.active.store(false, Ordering::SeqCst);
    }
    inner.loading.claimed.clear();
    if inner.over_limits() {
        inner.request_maintenance();
    }
}

/// Puts loaded slots at the least recent end of the recency list, least recently accessed
/// last.
fn join_recency(inner: &Inner, mut loaded: Vec<Arc<Slot>>) {
    loaded.sort_unstable_by_key(|s| s.last_access.load(Ordering::Relaxed));
    inner.refile(loaded, Refile::LeastRecent);
}

/// How far the storage's journal may run past its hint before the reaper saves a new one:
/// what an open after a crash replays (and holds in memory) stays about this small.
const CHECKPOINT_BACKLOG: u64 = 16 << 20;

/// Saves a new hint if the storage journaled much since the one in place, or has none (after
/// a load that listed the storage): so that an open after a crash reads a hint and a short
/// journal, not every record file. Called by the reaper; only for a storage the cache opened
/// itself, and not while loading.
pub(crate) fn checkpoint_if_due(inner: &Inner) {
    if !inner.saves_hints || inner.loading.active.load(Ordering::Acquire) {
        return;
    }
    let Some(backlog) = inner.storage.hint_backlog() else {
        return;
    };
    let listed = inner.loading.listed.swap(false, Ordering::Relaxed);
    if listed || backlog > CHECKPOINT_BACKLOG {
        save_hint(inner);
    }
}

/// Describes the index to the storage (see `Storage::put_hint`): the mark first, so that
/// every change the scan may miss comes after it.
pub(crate) fn save_hint(inner: &Inner) {
    let epoch = inner.storage.hint_epoch();
    if let Some(hint) = encode_hint(inner)
        && let Err(e) = inner.storage.put_hint(&hint, epoch)
    {
        tracing::warn!(error = %e, "could not save the index hint");
    }
}

/// Format of the hint a cache leaves at a clean close (see `Storage::put_hint`): magic, then
/// per entry its key (u64 length and bytes), id, length, finish time, last access and own
/// time to live (u64 little endian each), then `END` where a key length would be, and the
/// blake3 hash of everything before it.
const HINT_MAGIC: &[u8; 4] = b"SCH1";
const HINT_END: u64 = u64::MAX;
/// Entries indexed from the hint per batch.
const HINT_BATCH: usize = 4096;

/// The hint describing every finished entry of the index, or `None` while the load has not
/// completed. Blobs whose deletion is still pending are in none: should the process end
/// before they are deleted, they stay on disk, unindexed, until an open lists the storage.
pub(super) fn encode_hint(inner: &Inner) -> Option<Vec<u8>> {
    use bytes::BufMut;
    if inner.loading.active.load(Ordering::SeqCst) {
        return None;
    }
    let mut out = Vec::with_capacity(64 * inner.entries.load(Ordering::Relaxed) + 40);
    out.put_slice(HINT_MAGIC);
    for e in inner.index.iter() {
        let slot = &e.key().0;
        let finished = slot.finished.load(Ordering::Relaxed);
        let len = slot.accounted.load(Ordering::Relaxed);
        // Committed, or being committed (stamped by `commit_meta`, then journaled by the
        // storage before its rename): a commit journaled before the mark this hint goes
        // with must be in it. One that then fails is a blob the next open does not find,
        // which it handles as a lost entry.
        if !slot.is_live() || finished == 0 || len == super::slot::GONE {
            continue;
        }
        out.put_u64_le(slot.key.len() as u64);
        out.put_slice(slot.key.as_bytes());
        for n in [
            slot.id,
            len,
            finished,
            slot.last_access.load(Ordering::Relaxed),
            slot.ttl_ms().unwrap_or(0),
        ] {
            out.put_u64_le(n);
        }
    }
    out.put_u64_le(HINT_END);
    let hash = blake3::hash(&out);
    out.put_slice(hash.as_bytes());
    Some(out)
}

/// Indexes the entries of a hint, in batches, after checking its hash (a damaged hint indexes
/// nothing: its entries could name versions that are not there, and the listing that follows
/// would then delete the real ones as second versions).
/// This thread reads and parses; the batches are indexed on as many threads as there are
/// cores (at most 4), while the next ones are read.
fn load_hint(inner: &Inner, saved: SavedHint) -> io::Result<()> {
    let SavedHint { mut hint, changes } = saved;
    check_hint(&mut *hint)?;
    let replay = Replay::new(inner, changes);
    let replay = &replay;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<HintEntry>>(workers * 2);
    let rx = Mutex::new(rx);
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                loop {
                    let batch = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    match batch {
                        Ok(batch) => index_hinted(inner, batch, replay),
                        Err(_) => return,
                    }
                }
            });
        }
        let read = read_hint(inner, &mut *hint, &tx);
        drop(tx);
        read
    })?;
    // The changes since the hint, over it: the newest version of each key they committed.
    let _gate = inner.loading.gate.read().unwrap_or_else(|e| e.into_inner());
    for (key, (id, meta, len)) in replay.newest.iter() {
        index_one(inner, key.clone(), *id, meta, *len);
    }
    Ok(())
}

/// The changes a storage journaled since its hint, ready to apply over it.
struct Replay {
    /// Every blob name the changes touched: a hinted entry of one of them is out of date
    /// (removed since, or described again by `newest`).
    touched: HashSet<String>,
    /// The newest version of each key committed by the changes and not removed since (as
    /// `newest_per_key` picks and checks them; it deletes the older and the expired).
    newest: HashMap<String, (u64, EntryMeta, u64)>,
}

impl Replay {
    fn new(inner: &Inner, changes: Vec<Change>) -> Replay {
        let mut last: HashMap<String, Option<BlobInfo>> = HashMap::new();
        for change in changes {
            match change {
                Change::Committed(blob) => {
                    last.insert(blob.name.clone(), Some(blob));
                }
                Change::Removed(name) => {
                    last.insert(name, None);
                }
            }
        }
        let touched = last.keys().cloned().collect();
        let committed = last.into_values().flatten().collect();
        let now = inner.books.clock.now_millis();
        Replay {
            touched,
            newest: newest_per_key(inner, committed, now),
        }
    }

    /// Whether the hinted version `id` of `key` is to be indexed: not if the changes touched
    /// it, nor if they committed a newer version of the key (then it was superseded, and its
    /// removal is what a crash cut short: it is deleted here).
    fn keeps(&self, inner: &Inner, key: &str, id: u64) -> bool {
        if self.touched.is_empty() {
            return true;
        }
        let name = blob_name(key, id);
        if self.touched.contains(&name) {
            return false;
        }
        match self.newest.get(key) {
            Some((newer, ..)) if *newer > id => {
                reaper::delete_at_open(&*inner.storage, &name);
                false
            }
            _ => true,
        }
    }
}

/// One entry of a hint: key, id, length, finish time, last access, own time to live.
type HintEntry = (String, u64, u64, u64, u64, u64);

/// Checks a hint's hash (the last 32 bytes: blake3 of all before), and rewinds it.
fn check_hint(hint: &mut dyn HintReader) -> io::Result<()> {
    let damaged = || io::Error::new(io::ErrorKind::InvalidData, "index hint: hash mismatch");
    let len = hint.seek(io::SeekFrom::End(0))?;
    let body = len.checked_sub(32).ok_or_else(damaged)?;
    hint.seek(io::SeekFrom::Start(0))?;
    let mut hasher = blake3::Hasher::new();
    let mut whole = io::Read::take(&mut *hint, body);
    io::copy(&mut whole, &mut hasher)?;
    let mut want = [0u8; 32];
    hint.read_exact(&mut want)?;
    if hasher.finalize().as_bytes() != &want {
        return Err(damaged());
    }
    hint.seek(io::SeekFrom::Start(0))?;
    Ok(())
}

/// Parses a checked hint, sending its entries in batches to `out`.
fn read_hint(
    inner: &Inner,
    hint: &mut dyn HintReader,
    out: &std::sync::mpsc::SyncSender<Vec<HintEntry>>,
) -> io::Result<()> {
    let damaged =
        |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("index hint: {what}"));
    let num = |hint: &mut dyn HintReader| {
        let mut b = [0u8; 8];
        hint.read_exact(&mut b)?;
        io::Result::Ok(u64::from_le_bytes(b))
    };
    let mut magic = [0u8; 4];
    hint.read_exact(&mut magic)?;
    if &magic != HINT_MAGIC {
        return Err(damaged("not a hint"));
    }
    let mut batch = Vec::with_capacity(HINT_BATCH);
    let mut max_id = 0;
    loop {
        let key_len = num(hint)?;
        if key_len == HINT_END {
            break;
        }
        let key_len = usize::try_from(key_len)
            .ok()
            .filter(|&n| n <= 1 << 20)
            .ok_or_else(|| damaged("key too long"))?;
        let mut key = vec![0; key_len];
        hint.read_exact(&mut key)?;
        let key = String::from_utf8(key).map_err(|_| damaged("key is not UTF-8"))?;
        let mut n = [0u64; 5];
        for v in &mut n {
            *v = num(hint)?;
        }
        let [id, len, finished, last_access, ttl_ms] = n;
        if id >= 1 << 63 {
            return Err(damaged("id out of range"));
        }
        max_id = max_id.max(id + 1);
        batch.push((key, id, len, finished, last_access, ttl_ms));
        if batch.len() == HINT_BATCH {
            // Ids first: a key indexed from this batch may get a new version at once.
            inner.next_id.fetch_max(max_id, Ordering::Relaxed);
            if inner.loading.stop.load(Ordering::Relaxed)
                || out.send(std::mem::take(&mut batch)).is_err()
            {
                return Ok(());
            }
        }
    }
    inner.next_id.fetch_max(max_id, Ordering::Relaxed);
    let _ = out.send(batch);
    Ok(())
}

/// Indexes hinted entries: those past their time to live are deleted instead.
fn index_hinted(inner: &Inner, batch: Vec<HintEntry>, replay: &Replay) {
    let _gate = inner.loading.gate.read().unwrap_or_else(|e| e.into_inner());
    let now = inner.books.clock.now_millis();
    for (key, id, len, finished, last_access, ttl_ms) in batch {
        if !replay.keeps(inner, &key, id) {
            continue;
        }
        if expired(inner, finished, ttl_ms, now) {
            reaper::delete_at_open(&*inner.storage, &blob_name(&key, id));
            continue;
        }
        let meta = EntryMeta {
            key: String::new(),
            created: 0,
            finished,
            last_access,
            ttl_ms,
            user: bytes::Bytes::new(),
        };
        index_one(inner, key, id, &meta, len);
    }
}
