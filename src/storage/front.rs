//! A bounded memory tier in front of another storage; documented on [`FrontStorage`].

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use lru::LruCache;

use super::{BlobInfo, BlobReader, BlobWriter, Storage};

/// How many promotions may wait for the background thread; more are dropped.
const QUEUE: usize = 64;
/// Bytes charged per blob on top of its data, name and metadata (map entries, `Arc`s).
const OVERHEAD: usize = 128;

/// Keeps copies of small, recently opened committed blobs of another storage in memory.
///
/// * Writes go to the inner storage only; so do [`list`](Storage::list) and the writers of
///   [`create`](Storage::create) (whose commit drops any copy of the name it replaces).
/// * [`open`](Storage::open) of a blob held in front returns a reader over its one [`Bytes`]
///   (zero-copy [`read_bytes`](BlobReader::read_bytes)), without touching the inner storage.
///   Otherwise it returns the inner storage's reader at once and, if the blob is at most
///   `max_blob` bytes, asks the background thread to **promote** it: that thread opens the
///   blob again through the inner storage (whose reader checks integrity: for disk, every
///   block's blake3) and reads it into one `Bytes`. Promotions wait in a bounded queue
///   (64; more are dropped, and the blob is promoted at a later open) and are deduplicated by
///   name.
/// * The front is bounded by bytes (`max_bytes`, counting data, name, metadata and a fixed
///   overhead per blob) and evicts the least recently opened blobs first.
/// * Coherence: [`remove`](Storage::remove) drops the copy and cancels any promotion in
///   flight, before and after removing the blob from the inner storage, so no `open` that
///   starts after `remove` returned is served the removed bytes (a promotion that read the
///   blob before it was removed loses: it inserts only if its ticket is still the current
///   one, checked under the front's lock). A commit through [`create`](Storage::create)
///   does the same after it replaces a blob; [`set_meta`](Storage::set_meta) updates the copy's
///   metadata and cancels a promotion that may have read the old one.
/// * Bytes in front were checked when they were promoted; a later change to the stored file
///   is not seen by readers served from memory (they keep getting the bytes that were
///   committed, never damaged ones).
///
/// Dropping the storage stops the background thread (after the promotion it is doing, if
/// any) and waits for it.
///
/// # Measured (kept because it wins)
///
/// `cargo test --release --lib storage::front::measure -- --ignored --nocapture`, disk alone
/// vs this front over the same [`DiskStorage`](super::DiskStorage), same run, on the 2-core
/// development machine (shared with other builds; two runs, figures vary about 2x):
///
/// | path | disk | front | front / disk |
/// | --- | --- | --- | --- |
/// | open + read 4 KiB, copying (`read_at`) | 16–32 µs | 0.34 µs | 46x |
/// | open + read 64 KiB in 64 KiB chunks, copying | 56–71 µs | 2.6 µs | 21x |
/// | open + read 1 MiB in 64 KiB chunks, copying | 0.6–0.8 ms | 45 µs | 13–18x |
/// | held reader, 64 KiB blob, `read_at` 64 KiB chunks | 13–22 GB/s | 27–36 GB/s | 1.6–2.0x |
/// | held reader, 1 MiB blob, `read_at` 64 KiB chunks | 13–17 GB/s | 22–26 GB/s | 1.25–1.9x |
///
/// (memcpy of the same chunks in the same run: 29–40 GB/s; zero-copy `read_bytes` from the
/// front hands out slices without touching the bytes, so its figures are not throughput.)
/// The open path is where it pays: a disk `open` costs two file opens, a record read and an
/// `fstat`, and each fresh handle hashes every block again as it is read. A cache keeps the
/// handles of its most recently used entries (`max_idle_handles`, 128 by default), so that
/// path is a hit on an entry outside that set, or the first hit after a restart; on a held
/// handle the front wins less (pread from the page cache vs memcpy).
pub(crate) struct FrontStorage {
    shared: Arc<Shared>,
    jobs: Option<SyncSender<Job>>,
    worker: Option<JoinHandle<()>>,
}

struct Shared {
    inner: Arc<dyn Storage>,
    max_bytes: usize,
    max_blob: u64,
    /// Lock: this mutex, held for map operations only, never across I/O.
    state: Mutex<State>,
    /// Serializes `set_meta` calls (inner write, then the copy's update) so the copy ends with
    /// the metadata that was written last.
    set_meta: Mutex<()>,
    /// Set when the storage is dropped: the worker stops.
    closed: AtomicBool,
    /// Promotions queued, and promotions that made it into the front (for tests and stats).
    scheduled: AtomicU64,
    promoted: AtomicU64,
}

struct State {
    /// Invariant: `bytes` is the sum of `charge` of the values, and at most `max_bytes`.
    lru: LruCache<Box<str>, Cached>,
    bytes: usize,
    /// Promotions queued or running: name → ticket. A promotion inserts its result only if its
    /// ticket is still here; removal, replacement and `set_meta` take it away.
    in_flight: HashMap<Box<str>, u64>,
    next_ticket: u64,
}

struct Cached {
    data: Bytes,
    info: BlobInfo,
}

impl Cached {
    fn charge(&self) -> usize {
        self.data.len() + self.info.name.len() + self.info.meta.len() + OVERHEAD
    }
}

/// A promotion to run: the blob's name, its ticket, and the reader and info `open` already
/// got (read again through the same reader, so a disk blob is neither reopened nor hashed a
/// second time).
struct Job {
    name: Box<str>,
    ticket: u64,
    reader: Arc<dyn BlobReader>,
    info: BlobInfo,
}

impl fmt::Debug for FrontStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("FrontStorage")
            .field("inner", &self.shared.inner)
            .field("blobs", &st.lru.len())
            .field("bytes", &st.bytes)
            .field("max_bytes", &self.shared.max_bytes)
            .field("max_blob", &self.shared.max_blob)
            .finish()
    }
}

impl FrontStorage {
    /// A front of at most `max_bytes` over `inner`; blobs larger than `max_bytes / 8` are
    /// never promoted.
    ///
    /// # Errors
    /// If the background thread cannot be started.
    pub(crate) fn new(inner: Arc<dyn Storage>, max_bytes: usize) -> io::Result<Self> {
        Self::with_max_blob(inner, max_bytes, (max_bytes / 8) as u64)
    }

    /// A front of at most `max_bytes` over `inner` that promotes blobs of at most `max_blob`
    /// bytes.
    ///
    /// # Errors
    /// If the background thread cannot be started.
    pub(crate) fn with_max_blob(
        inner: Arc<dyn Storage>,
        max_bytes: usize,
        max_blob: u64,
    ) -> io::Result<Self> {
        let shared = Arc::new(Shared {
            inner,
            max_bytes,
            max_blob,
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                in_flight: HashMap::new(),
                next_ticket: 0,
            }),
            set_meta: Mutex::new(()),
            closed: AtomicBool::new(false),
            scheduled: AtomicU64::new(0),
            promoted: AtomicU64::new(0),
        });
        let (tx, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("streamcache-front".into())
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        if shared.closed.load(Ordering::Acquire) {
                            break;
                        }
                        shared.promote(job);
                    }
                })?
        };
        Ok(FrontStorage {
            shared,
            jobs: Some(tx),
            worker: Some(worker),
        })
    }

    #[cfg(test)]
    /// Bytes held in front (as charged against `max_bytes`).
    pub(crate) fn front_bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    #[cfg(test)]
    /// Whether a copy of blob `name` is held in front (no recency change).
    pub(crate) fn in_front(&self, name: &str) -> bool {
        self.shared.lock().lru.contains(name)
    }

    #[cfg(test)]
    /// Promotions queued or running.
    pub(crate) fn pending(&self) -> usize {
        self.shared.lock().in_flight.len()
    }

    #[cfg(test)]
    /// Promotions queued so far, and how many of them were inserted.
    pub(crate) fn promotions(&self) -> (u64, u64) {
        (
            self.shared.scheduled.load(Ordering::Relaxed),
            self.shared.promoted.load(Ordering::Relaxed),
        )
    }

    /// Queues a promotion of `name` unless it is in front or already on its way.
    fn schedule(&self, name: &str, reader: &Arc<dyn BlobReader>, info: &BlobInfo) {
        let Some(jobs) = &self.jobs else { return };
        let ticket = {
            let mut st = self.shared.lock();
            if st.lru.contains(name) || st.in_flight.contains_key(name) {
                return;
            }
            st.next_ticket += 1;
            let ticket = st.next_ticket;
            st.in_flight.insert(name.into(), ticket);
            ticket
        };
        let job = Job {
            name: name.into(),
            ticket,
            reader: reader.clone(),
            info: info.clone(),
        };
        match jobs.try_send(job) {
            Ok(()) => {
                self.shared.scheduled.fetch_add(1, Ordering::Relaxed);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                let mut st = self.shared.lock();
                if st.in_flight.get(name) == Some(&ticket) {
                    st.in_flight.remove(name);
                }
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the copy of `name` and cancels its promotion, if any.
    fn invalidate(&self, name: &str) {
        let mut st = self.lock();
        if let Some(old) = st.lru.pop(name) {
            st.bytes -= old.charge();
        }
        st.in_flight.remove(name);
    }

    /// The background thread's work for one promotion.
    fn promote(&self, job: Job) {
        let Job {
            name,
            ticket,
            reader,
            info,
        } = job;
        let name = &*name;
        let read = self.read_whole(name, &*reader, info);
        drop(reader);
        let mut st = self.lock();
        if st.in_flight.get(name) != Some(&ticket) {
            return; // removed, replaced or changed meanwhile: this copy may be stale
        }
        st.in_flight.remove(name);
        let Ok(Some(cached)) = read else { return };
        let charge = cached.charge();
        if charge > self.max_bytes {
            return;
        }
        while st.bytes + charge > self.max_bytes {
            let Some((_, old)) = st.lru.pop_lru() else {
                break;
            };
            st.bytes -= old.charge();
        }
        st.bytes += charge;
        st.lru.put(name.into(), cached);
        self.promoted.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads committed blob `name`, opened as `reader` with `info`, into one `Bytes`; `None`
    /// if it is too large to promote.
    fn read_whole(
        &self,
        name: &str,
        reader: &dyn BlobReader,
        info: BlobInfo,
    ) -> io::Result<Option<Cached>> {
        if info.len > self.max_blob {
            return Ok(None);
        }
        let len = usize::try_from(info.len).map_err(io::Error::other)?;
        let data = match reader.read_bytes(0, len) {
            Some(Ok(piece)) if piece.len() == len => piece,
            _ => {
                let mut buf = vec![0; len];
                let mut done = 0;
                while done < len {
                    let n = reader.read_at(&mut buf[done..], done as u64)?;
                    if n == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("blob {name:?} is shorter than its length"),
                        ));
                    }
                    done += n;
                }
                Bytes::from(buf)
            }
        };
        Ok(Some(Cached { data, info }))
    }
}

impl Drop for FrontStorage {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        drop(self.jobs.take());
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

impl Storage for FrontStorage {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        let inner = self.shared.inner.create(name)?;
        Ok(Box::new(FrontWriter {
            inner,
            name: name.into(),
            shared: self.shared.clone(),
        }))
    }

    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        {
            let mut st = self.shared.lock();
            if let Some(c) = st.lru.get(name) {
                let reader = Arc::new(FrontReader {
                    data: c.data.clone(),
                });
                return Ok((reader, c.info.clone()));
            }
        }
        let (reader, info) = self.shared.inner.open(name)?;
        if info.len <= self.shared.max_blob {
            self.schedule(name, &reader, &info);
        }
        Ok((reader, info))
    }

    fn info(&self, name: &str) -> io::Result<BlobInfo> {
        if let Some(c) = self.shared.lock().lru.peek(name) {
            return Ok(c.info.clone());
        }
        self.shared.inner.info(name)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.shared.invalidate(name);
        let result = self.shared.inner.remove(name);
        // Again: a promotion queued between the first invalidation and the removal may have
        // read the blob; its ticket goes now, before `remove` returns.
        self.shared.invalidate(name);
        result
    }

    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        self.shared.inner.list()
    }

    fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        self.shared.inner.list_prefix(prefix)
    }

    fn list_batches(
        &self,
        each: &(dyn Fn(Vec<BlobInfo>) -> std::ops::ControlFlow<()> + Sync),
    ) -> io::Result<()> {
        self.shared.inner.list_batches(each)
    }

    fn hint_epoch(&self) -> u64 {
        self.shared.inner.hint_epoch()
    }

    fn put_hint(&self, hint: &[u8], epoch: u64) -> io::Result<bool> {
        self.shared.inner.put_hint(hint, epoch)
    }

    fn take_hint(&self) -> io::Result<Option<crate::storage::SavedHint>> {
        self.shared.inner.take_hint()
    }

    fn hint_backlog(&self) -> Option<u64> {
        self.shared.inner.hint_backlog()
    }

    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        let _serial = self
            .shared
            .set_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let result = self.shared.inner.set_meta(name, meta);
        let mut st = self.shared.lock();
        // A promotion in flight may have read the old metadata.
        st.in_flight.remove(name);
        let st = &mut *st;
        if let Some(c) = st.lru.peek_mut(name) {
            let before = c.charge();
            if result.is_ok() {
                c.info.meta = meta.to_vec();
            }
            let after = c.charge();
            st.bytes = st.bytes - before + after;
            if result.is_err() || st.bytes > self.shared.max_bytes {
                // Unknown state after a failure, or no room for the larger record.
                let c = st.lru.pop(name).expect("peeked");
                st.bytes -= c.charge();
            }
        }
        result
    }
}

/// A writer of the inner storage whose commit drops the front's copy of a replaced blob.
struct FrontWriter {
    inner: Box<dyn BlobWriter>,
    name: Box<str>,
    shared: Arc<Shared>,
}

impl fmt::Debug for FrontWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FrontWriter")
            .field("name", &self.name)
            .field("inner", &self.inner)
            .finish()
    }
}

impl BlobWriter for FrontWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write(buf)
    }

    fn publish(&mut self) -> io::Result<()> {
        self.inner.publish()
    }

    fn reader(&self) -> Arc<dyn BlobReader> {
        self.inner.reader()
    }

    fn commit(self: Box<Self>, meta: Vec<u8>) -> io::Result<()> {
        let FrontWriter {
            inner,
            name,
            shared,
        } = *self;
        let result = inner.commit(meta);
        // Whether it replaced a blob or failed part-way (which may leave the name empty).
        shared.invalidate(&name);
        result
    }
}

/// A reader over a blob's bytes held in front.
#[derive(Debug)]
struct FrontReader {
    data: Bytes,
}

impl BlobReader for FrontReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let Ok(from) = usize::try_from(offset) else {
            return Ok(0);
        };
        let Some(rest) = self.data.get(from..) else {
            return Ok(0);
        };
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        Ok(n)
    }

    fn read_bytes(&self, offset: u64, max: usize) -> Option<io::Result<Bytes>> {
        let from = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.data.len());
        let to = from + max.min(self.data.len() - from);
        Some(Ok(self.data.slice(from..to)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::storage::{DiskStorage, MemoryStorage};

    const KIB: usize = 1 << 10;

    fn content(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn commit(s: &dyn Storage, name: &str, data: &[u8], meta: &[u8]) {
        let mut w = s.create(name).unwrap();
        w.write(data).unwrap();
        w.commit(meta.to_vec()).unwrap();
    }

    fn read_all(r: &dyn BlobReader, len: u64) -> Vec<u8> {
        let mut buf = vec![0; len as usize];
        let mut done = 0;
        while done < buf.len() {
            let n = r.read_at(&mut buf[done..], done as u64).unwrap();
            assert!(n > 0);
            done += n;
        }
        assert_eq!(r.read_at(&mut [0; 1], len).unwrap(), 0);
        buf
    }

    /// Polls `cond` until it holds or 10 s pass (then panics with `what`).
    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < until, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn disk() -> (tempfile::TempDir, Arc<dyn Storage>) {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskStorage::open(dir.path()).unwrap();
        (dir, Arc::new(disk))
    }

    #[test]
    fn a_read_blob_is_promoted_and_served_identically() {
        let (_dir, inner) = disk();
        let data = content(1, 100 * KIB + 7);
        commit(&*inner, "b", &data, b"meta");
        let front = FrontStorage::new(inner.clone(), 4 << 20).unwrap();
        assert!(!front.in_front("b"));
        let (r, info) = front.open("b").unwrap();
        assert_eq!(r.read_bytes(0, 10).map(|_| ()), None, "disk's reader first");
        assert_eq!(read_all(&*r, info.len), data);
        wait_for("promotion", || front.in_front("b"));
        assert_eq!(front.pending(), 0);
        let (r, info2) = front.open("b").unwrap();
        assert_eq!(info2, info);
        assert_eq!(front.info("b").unwrap(), info);
        assert_eq!(read_all(&*r, info.len), data);
        // Zero-copy pieces agree with the data, at any offset.
        let piece = r.read_bytes(5, 1000).unwrap().unwrap();
        assert_eq!(&piece[..], &data[5..1005]);
        let tail = r.read_bytes(info.len - 3, 1000).unwrap().unwrap();
        assert_eq!(&tail[..], &data[data.len() - 3..]);
        assert!(r.read_bytes(info.len + 9, 10).unwrap().unwrap().is_empty());
        assert_eq!(r.read_at(&mut [0; 4], u64::MAX).unwrap(), 0);
        // One promotion, however many opens.
        for _ in 0..10 {
            front.open("b").unwrap();
        }
        assert_eq!(front.promotions(), (1, 1));
        // list and create go through; the new blob is readable, then promoted in turn.
        commit(&front, "c", b"new", b"");
        let mut names: Vec<_> = front.list().unwrap().into_iter().map(|b| b.name).collect();
        names.sort();
        assert_eq!(names, ["b", "c"]);
        assert_eq!(read_all(&*front.open("c").unwrap().0, 3), b"new");
        wait_for("promotion of c", || front.in_front("c"));
    }

    #[test]
    fn remove_replace_and_set_meta_keep_the_front_coherent() {
        let (_dir, inner) = disk();
        let front = FrontStorage::new(inner.clone(), 4 << 20).unwrap();
        commit(&front, "b", b"one", b"m1");
        front.open("b").unwrap();
        wait_for("promotion", || front.in_front("b"));
        front.set_meta("b", b"m2").unwrap();
        assert!(front.in_front("b"));
        assert_eq!(front.open("b").unwrap().1.meta, b"m2");
        assert_eq!(inner.info("b").unwrap().meta, b"m2");
        assert_eq!(
            front.set_meta("zz", b"x").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        // Replacing drops the copy.
        commit(&front, "b", b"two!", b"m3");
        assert!(!front.in_front("b"));
        let (r, info) = front.open("b").unwrap();
        assert_eq!(
            (read_all(&*r, info.len), info.meta),
            (b"two!".to_vec(), b"m3".to_vec())
        );
        wait_for("promotion", || front.in_front("b"));
        front.remove("b").unwrap();
        assert!(!front.in_front("b"));
        assert_eq!(front.open("b").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(front.info("b").unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(front.front_bytes(), 0);
    }

    /// A storage whose readers stop the promotion thread at its first read, until the test
    /// lets it go (when `pause.armed`): a promotion holds the old blob while the test removes
    /// or replaces it.
    #[derive(Debug)]
    struct Gate {
        inner: MemoryStorage,
        pause: Arc<Pause>,
        /// Also stop `remove` before it removes (from any thread).
        armed_remove: AtomicBool,
    }

    #[derive(Debug)]
    struct Pause {
        armed: AtomicBool,
        entered: Mutex<mpsc::Sender<()>>,
        release: Mutex<mpsc::Receiver<()>>,
    }

    impl Pause {
        fn here(&self) {
            self.entered.lock().unwrap().send(()).unwrap();
            self.release.lock().unwrap().recv().unwrap();
        }

        fn at_promotion(&self) {
            let promoting = std::thread::current().name() == Some("streamcache-front");
            if promoting && self.armed.swap(false, Ordering::SeqCst) {
                self.here();
            }
        }
    }

    #[derive(Debug)]
    struct GatedReader {
        inner: Arc<dyn BlobReader>,
        pause: Arc<Pause>,
    }

    impl BlobReader for GatedReader {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            self.pause.at_promotion();
            self.inner.read_at(buf, offset)
        }
        fn read_bytes(&self, offset: u64, max: usize) -> Option<io::Result<Bytes>> {
            self.pause.at_promotion();
            self.inner.read_bytes(offset, max)
        }
    }

    impl Storage for Gate {
        fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
            self.inner.create(name)
        }
        fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
            let (inner, info) = self.inner.open(name)?;
            let reader = GatedReader {
                inner,
                pause: self.pause.clone(),
            };
            Ok((Arc::new(reader), info))
        }
        fn remove(&self, name: &str) -> io::Result<()> {
            if self.armed_remove.swap(false, Ordering::SeqCst) {
                self.pause.here();
            }
            self.inner.remove(name)
        }
        fn list(&self) -> io::Result<Vec<BlobInfo>> {
            self.inner.list()
        }
        fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
            self.inner.set_meta(name, meta)
        }
    }

    fn gate() -> (Arc<Gate>, mpsc::Receiver<()>, mpsc::Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        let gate = Arc::new(Gate {
            inner: MemoryStorage::new(),
            pause: Arc::new(Pause {
                armed: AtomicBool::new(false),
                entered: Mutex::new(entered_tx),
                release: Mutex::new(release_rx),
            }),
            armed_remove: AtomicBool::new(false),
        });
        (gate, entered, release)
    }

    /// A blob opened and promoted while `remove` is under way (before the inner storage
    /// removed it) must not stay in front once `remove` returned.
    #[test]
    fn a_promotion_completed_during_a_remove_is_dropped_by_it() {
        let (gate, entered, release) = gate();
        let front = Arc::new(FrontStorage::new(gate.clone(), 1 << 20).unwrap());
        commit(&*front, "b", b"old", b"");
        gate.armed_remove.store(true, Ordering::SeqCst);
        let remover = {
            let front = front.clone();
            std::thread::spawn(move || front.remove("b").unwrap())
        };
        entered.recv().unwrap(); // remove is under way, the blob still there
        front.open("b").unwrap();
        wait_for("promotion", || front.in_front("b"));
        release.send(()).unwrap();
        remover.join().unwrap();
        assert!(!front.in_front("b"));
        assert_eq!(front.open("b").unwrap_err().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn a_promotion_that_read_a_removed_or_replaced_blob_loses() {
        let (gate, entered, release) = gate();
        let front = FrontStorage::new(gate.clone(), 1 << 20).unwrap();
        for replace in [false, true] {
            commit(&front, "b", b"old", b"");
            gate.pause.armed.store(true, Ordering::SeqCst);
            front.open("b").unwrap();
            entered.recv().unwrap(); // the promotion has the old blob open, unread
            if replace {
                commit(&front, "b", b"new", b"");
            } else {
                front.remove("b").unwrap();
            }
            release.send(()).unwrap();
            wait_for("the promotion to end", || front.pending() == 0);
            assert!(!front.in_front("b"), "replace: {replace}");
            if replace {
                let (r, info) = front.open("b").unwrap();
                assert_eq!(read_all(&*r, info.len), b"new");
                wait_for("promotion", || front.in_front("b"));
                let (r, info) = front.open("b").unwrap();
                assert_eq!(read_all(&*r, info.len), b"new");
                front.remove("b").unwrap();
            } else {
                assert_eq!(front.open("b").unwrap_err().kind(), io::ErrorKind::NotFound);
            }
        }
    }

    #[test]
    fn remove_racing_promotions_never_lets_removed_bytes_be_served() {
        let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let front = Arc::new(FrontStorage::new(inner, 1 << 20).unwrap());
        for round in 0..300 {
            let name = format!("b{}", round % 7);
            commit(&*front, &name, &content(round as u8, 3000), b"");
            front.open(&name).unwrap();
            let barrier = Arc::new(Barrier::new(2));
            let opener = {
                let (front, barrier, name) = (front.clone(), barrier.clone(), name.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    for _ in 0..20 {
                        let _ = front.open(&name);
                    }
                })
            };
            barrier.wait();
            front.remove(&name).unwrap();
            assert_eq!(
                front.open(&name).unwrap_err().kind(),
                io::ErrorKind::NotFound,
                "round {round}: served after remove returned"
            );
            opener.join().unwrap();
            wait_for("promotions to end", || front.pending() == 0);
            assert!(
                !front.in_front(&name),
                "round {round}: removed blob promoted"
            );
            assert_eq!(
                front.open(&name).unwrap_err().kind(),
                io::ErrorKind::NotFound
            );
        }
    }

    #[test]
    fn the_byte_budget_holds_and_recent_blobs_stay() {
        let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let max = 64 * KIB;
        let front = FrontStorage::new(inner, max).unwrap();
        for i in 0..40 {
            let name = format!("n{i:02}");
            commit(&front, &name, &content(i, 4 * KIB), b"meta");
            front.open(&name).unwrap();
            wait_for("promotion", || front.in_front(&name));
            assert!(
                front.front_bytes() <= max,
                "{} > {max}",
                front.front_bytes()
            );
            // Keep n00 recently used: it must survive.
            front.open("n00").unwrap();
        }
        assert!(front.in_front("n00"));
        assert!(front.in_front("n39"));
        assert!(!front.in_front("n01"), "least recently used kept");
        let held = (0..40)
            .filter(|i| front.in_front(&format!("n{i:02}")))
            .count();
        assert!(held >= 10, "only {held} blobs of 4 KiB in 64 KiB");
        assert!(front.front_bytes() > max / 2);
    }

    #[test]
    fn oversized_blobs_are_never_promoted() {
        let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let front = FrontStorage::new(inner, 80 * KIB).unwrap(); // blobs up to 10 KiB
        commit(&front, "big", &content(3, 10 * KIB + 1), b"");
        commit(&front, "fits", &content(4, 10 * KIB - OVERHEAD - 4), b"");
        for _ in 0..5 {
            let (r, info) = front.open("big").unwrap();
            assert_eq!(read_all(&*r, info.len), content(3, 10 * KIB + 1));
        }
        assert_eq!(front.promotions(), (0, 0), "an oversized blob was queued");
        front.open("fits").unwrap();
        wait_for("promotion", || front.in_front("fits"));
        assert!(!front.in_front("big"));
        // A blob at the cap whose charge exceeds the whole budget is not kept either.
        let tiny = FrontStorage::with_max_blob(Arc::new(MemoryStorage::new()), 1000, 1000).unwrap();
        commit(&tiny, "x", &[7; 1000], b"");
        tiny.open("x").unwrap();
        wait_for("the promotion to end", || tiny.pending() == 0);
        assert!(!tiny.in_front("x"));
        assert_eq!(tiny.front_bytes(), 0);
    }

    #[test]
    fn dropping_stops_the_worker_and_releases_the_inner_storage() {
        let inner: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
        let front = FrontStorage::new(inner.clone(), 1 << 20).unwrap();
        commit(&front, "b", b"x", b"");
        front.open("b").unwrap();
        drop(front);
        assert_eq!(Arc::strong_count(&inner), 1);
    }
}

/// Same-run figures: disk alone vs the front over it, plus a memcpy baseline. Run with
/// `cargo test --release --lib storage::front::measure -- --ignored --nocapture`.
#[cfg(test)]
mod measure {
    use std::hint::black_box;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::storage::DiskStorage;

    const CHUNK: usize = 64 << 10;

    /// Median over 7 rounds of the time per call of `f`, each round at least 100 ms.
    fn per_op(mut f: impl FnMut()) -> Duration {
        let mut n = 1u32;
        loop {
            let t = Instant::now();
            for _ in 0..n {
                f();
            }
            if t.elapsed() >= Duration::from_millis(100) {
                break;
            }
            n *= 2;
        }
        let mut rounds: Vec<Duration> = (0..7)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..n {
                    f();
                }
                t.elapsed() / n
            })
            .collect();
        rounds.sort();
        rounds[3]
    }

    /// Reads `[0, len)` of `r` in 64 KiB chunks: zero-copy pieces when offered and `zero_copy`
    /// is set, else `read_at` into `buf`.
    fn read_through(r: &dyn BlobReader, len: u64, buf: &mut [u8], zero_copy: bool) -> u64 {
        let mut off = 0;
        while off < len {
            let n = match r.read_bytes(off, CHUNK).filter(|_| zero_copy) {
                Some(piece) => black_box(piece.unwrap()).len(),
                None => r.read_at(&mut buf[..CHUNK], off).unwrap(),
            };
            assert!(n > 0);
            off += n as u64;
        }
        black_box(&buf[..8]);
        off
    }

    fn gbps(bytes: usize, t: Duration) -> f64 {
        bytes as f64 / t.as_secs_f64() / 1e9
    }

    #[test]
    #[ignore = "measurement; prints figures"]
    fn measure() {
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskStorage::open(dir.path()).unwrap();
        let sizes = [
            ("4 KiB", 4usize << 10),
            ("64 KiB", 64 << 10),
            ("1 MiB", 1 << 20),
        ];
        for (i, (_, len)) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..*len).map(|j| (j * 7 + i) as u8).collect();
            let mut w = disk.create(&format!("hot{i}")).unwrap();
            w.write(&data).unwrap();
            w.commit(b"meta".to_vec()).unwrap();
        }
        let inner: Arc<dyn Storage> = Arc::new(disk.clone());
        let front = FrontStorage::new(inner, 64 << 20).unwrap();
        for i in 0..sizes.len() {
            let name = format!("hot{i}");
            front.open(&name).unwrap();
            let until = Instant::now() + Duration::from_secs(10);
            while !front.in_front(&name) {
                assert!(Instant::now() < until, "not promoted");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let mut buf = vec![0u8; CHUNK];
        let stores: [(&str, &dyn Storage); 2] = [("disk", &disk), ("front", &front)];

        println!("open + read whole blob (a hit whose handle is not held), 64 KiB chunks:");
        for (i, (label, _)) in sizes.iter().enumerate() {
            let name = format!("hot{i}");
            let mut t = [Duration::ZERO; 3];
            for (k, (s, zero_copy)) in [
                (stores[0].1, false),
                (stores[1].1, false),
                (stores[1].1, true),
            ]
            .into_iter()
            .enumerate()
            {
                t[k] = per_op(|| {
                    let (r, info) = s.open(&name).unwrap();
                    read_through(&*r, info.len, &mut buf, zero_copy);
                });
            }
            println!(
                "  {label:>6}: disk {:>9.2?} | front, read_at {:>9.2?} ({:6.1}x) | front, read_bytes {:>9.2?} ({:6.1}x)",
                t[0],
                t[1],
                t[0].as_secs_f64() / t[1].as_secs_f64(),
                t[2],
                t[0].as_secs_f64() / t[2].as_secs_f64(),
            );
        }

        println!("held reader (the cache keeps the handle of a hot entry), 64 KiB chunks:");
        for (i, (label, len)) in sizes.iter().enumerate().skip(1) {
            let name = format!("hot{i}");
            let (dr, _) = disk.open(&name).unwrap();
            let (fr, _) = front.open(&name).unwrap();
            read_through(&*dr, *len as u64, &mut buf, false); // blocks checked once
            let td = per_op(|| {
                read_through(&*dr, *len as u64, &mut buf, false);
            });
            let tf_copy = per_op(|| {
                read_through(&*fr, *len as u64, &mut buf, false);
            });
            let tf_zero = per_op(|| {
                read_through(&*fr, *len as u64, &mut buf, true);
            });
            let src: Vec<u8> = vec![1; *len];
            let tm = per_op(|| {
                for c in src.chunks(CHUNK) {
                    buf[..c.len()].copy_from_slice(c);
                }
                black_box(&buf[..8]);
            });
            println!(
                "  {label:>6}: disk read_at {:5.2} GB/s | front read_at {:5.2} GB/s ({:4.2}x) | front read_bytes {:6.1} GB/s ({:4.1}x, no copy) | memcpy {:5.2} GB/s",
                gbps(*len, td),
                gbps(*len, tf_copy),
                td.as_secs_f64() / tf_copy.as_secs_f64(),
                gbps(*len, tf_zero),
                td.as_secs_f64() / tf_zero.as_secs_f64(),
                gbps(*len, tm),
            );
        }
    }
}
