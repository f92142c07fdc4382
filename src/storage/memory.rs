//! In-memory storage: append-only segments, zero-copy reads, recycled buffers.

use std::collections::VecDeque;
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};

use bytes::{Bytes, BytesMut};
use dashmap::DashMap;

use super::{BlobInfo, BlobReader, BlobWriter, Storage, not_found, validate_name};

/// Largest segment; also the size of the recycled buffers.
const SEGMENT: usize = 1 << 20;
/// Smallest segment allocation (tiny blobs get exactly what they need above this).
const MIN_SEGMENT: usize = 64;
/// How many spent segments `take` examines before allocating a fresh one.
const RECLAIM_SCAN: usize = 8;

/// Blobs kept in memory as a list of immutable [`Bytes`] chunks.
///
/// * Appending never re-copies written bytes: the writer fills a segment and publishes its
///   filled part as a new chunk; a new segment is started when one is full. Segments grow from
///   the size of the first write up to 1 MiB.
/// * Readers take chunks without copying through [`BlobReader::read_bytes`]; the chunk list is
///   behind a `RwLock` that the writer holds only to push one chunk.
/// * The 1 MiB segments of dropped blobs are recycled, up to the pool limit (256 MiB by
///   default, see [`with_pool_limit`](MemoryStorage::with_pool_limit)): the first touch of
///   fresh pages (page faults) costs several times more than copying into warm ones, and
///   capped a writer near 2 GB/s in our measurements. The pool keeps that much freed memory
///   resident for reuse; a cache built with `max_bytes` sizes it to at most that.
///
/// Cloning a `MemoryStorage` gives another handle to the same blobs, so a cache can be "reopened"
/// on it.
#[derive(Debug, Clone)]
pub struct MemoryStorage {
    inner: Arc<Inner>,
}

/// Committed blobs by name, with their metadata (boxed slices: no spare capacity). Names are
/// hashed with foldhash, randomly seeded per map (as the cache's index hashes keys): SipHash
/// cost an insert-and-evict about 450 instructions of ≈ 9 900.
type Committed = DashMap<Box<str>, (Arc<MemBlob>, Box<[u8]>), lru::DefaultHasher>;

#[derive(Debug, Default)]
struct Inner {
    /// Lock: the map's shard locks, held for one map call. Invariant: holds exactly the
    /// committed blobs.
    committed: Committed,
    pool: Pool,
}

impl MemoryStorage {
    /// Default limit of the recycling pool.
    pub const DEFAULT_POOL_LIMIT: usize = 256 << 20;

    /// An empty storage with the default recycling pool ([`DEFAULT_POOL_LIMIT`](Self::DEFAULT_POOL_LIMIT)).
    pub fn new() -> Self {
        Self::with_pool_limit(Self::DEFAULT_POOL_LIMIT)
    }

    /// An empty storage that keeps up to `bytes` of spent 1 MiB segments for reuse (0: none).
    pub fn with_pool_limit(bytes: usize) -> Self {
        MemoryStorage {
            inner: Arc::new(Inner {
                committed: DashMap::default(),
                pool: Pool {
                    spent: Mutex::default(),
                    max: bytes / SEGMENT,
                },
            }),
        }
    }
}

/// Recycles 1 MiB segments. A segment whose capacity is used up is parked here (as an empty
/// `BytesMut` that still owns the allocation); once every chunk cut from it has been dropped,
/// [`BytesMut::try_reclaim`] gives the whole buffer back without a new allocation.
#[derive(Debug, Default)]
struct Pool {
    /// Lock: this mutex. Invariant: at most `max` handles, each an exhausted 1 MiB segment.
    spent: Mutex<VecDeque<BytesMut>>,
    max: usize,
}

impl Default for MemoryStorage {
    fn default() -> Self {
        Self::new()
    }
}

impl Pool {
    fn take(&self, cap: usize) -> BytesMut {
        if cap == SEGMENT {
            let mut spent = self.spent.lock().unwrap();
            for _ in 0..spent.len().min(RECLAIM_SCAN) {
                let mut seg = spent.pop_front().expect("len checked");
                if seg.try_reclaim(SEGMENT) {
                    return seg;
                }
                spent.push_back(seg);
            }
        }
        BytesMut::with_capacity(cap)
    }

    /// Parks a segment that was taken with `take(SEGMENT)` (any unpublished bytes are dropped).
    fn give(&self, mut seg: BytesMut) {
        seg.clear();
        if self.max > 0 {
            let mut spent = self.spent.lock().unwrap();
            if spent.len() >= self.max {
                spent.pop_front();
            }
            spent.push_back(seg);
        }
    }
}

/// The chunks of one blob.
#[derive(Debug, Default)]
struct MemBlob {
    /// Lock: this `RwLock`; the writer takes it only to push.
    chunks: RwLock<Chunks>,
}

/// Invariant: `first` is the chunk at offset 0 (empty only while nothing was pushed); `rest[i].0`
/// is the offset of `rest[i].1`; chunks are non-empty and contiguous. Most blobs have a single
/// chunk, which needs no list allocation.
#[derive(Debug, Default)]
struct Chunks {
    first: Bytes,
    rest: Vec<(u64, Bytes)>,
    len: u64,
}

impl Chunks {
    fn push(&mut self, chunk: Bytes) {
        if chunk.is_empty() {
            return;
        }
        let at = self.len;
        self.len += chunk.len() as u64;
        if self.first.is_empty() {
            self.first = chunk;
            return;
        }
        if self.rest.len() < 3 {
            // Most blobs have one or two chunks: do not reserve room for four.
            self.rest.reserve_exact(1);
        }
        self.rest.push((at, chunk));
    }

    /// The chunk holding `offset` and the range of it to read, at most `max` bytes; `None`
    /// past the end (or for `max == 0`).
    fn locate(&self, offset: u64, max: usize) -> Option<(&Bytes, Range<usize>)> {
        if offset >= self.len || max == 0 {
            return None;
        }
        let (start, chunk) = if offset < self.first.len() as u64 {
            (0, &self.first)
        } else {
            let i = self.rest.partition_point(|(s, _)| *s <= offset) - 1;
            let (start, chunk) = &self.rest[i];
            (*start, chunk)
        };
        let from = (offset - start) as usize;
        Some((chunk, from..chunk.len().min(from.saturating_add(max))))
    }
}

impl BlobReader for MemBlob {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let chunks = self.chunks.read().unwrap();
        let mut done = 0;
        // Copies straight out of the chunks: no `Bytes` handle (refcount) per piece.
        while let Some((chunk, range)) = chunks.locate(offset + done as u64, buf.len() - done) {
            let n = range.len();
            buf[done..done + n].copy_from_slice(&chunk[range]);
            done += n;
        }
        Ok(done)
    }

    fn read_bytes(&self, offset: u64, max: usize) -> Option<io::Result<Bytes>> {
        let chunks = self.chunks.read().unwrap();
        let piece = chunks
            .locate(offset, max)
            .map_or_else(Bytes::new, |(chunk, range)| chunk.slice(range));
        Some(Ok(piece))
    }
}

#[derive(Debug)]
struct MemWriter {
    storage: Arc<Inner>,
    name: String,
    blob: Arc<MemBlob>,
    /// The segment being filled; its `len()` bytes are not yet published.
    seg: BytesMut,
    /// Whether `seg` is a full-size segment that goes back to the pool.
    pooled: bool,
    written: u64,
}

impl MemWriter {
    fn next_segment(&mut self, want: usize) {
        self.release_segment();
        let cap = (self.written as usize)
            .max(want)
            .clamp(MIN_SEGMENT, SEGMENT);
        self.seg = self.storage.pool.take(cap);
        self.pooled = cap == SEGMENT;
    }

    fn release_segment(&mut self) {
        let seg = std::mem::take(&mut self.seg);
        if std::mem::take(&mut self.pooled) {
            self.storage.pool.give(seg);
        }
    }
}

impl BlobWriter for MemWriter {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let room = self.seg.capacity() - self.seg.len();
            if room == 0 {
                self.publish()?;
                self.next_segment(buf.len());
                continue;
            }
            let n = room.min(buf.len());
            self.seg.extend_from_slice(&buf[..n]);
            self.written += n as u64;
            buf = &buf[n..];
        }
        Ok(())
    }

    fn publish(&mut self) -> io::Result<()> {
        // (Handing a full small segment over whole here, to save the split's shared header,
        // cost fan-out readers ~25 % in `benches/fanout.rs`; `commit` does it for the last
        // segment, where it is free.)
        if !self.seg.is_empty() {
            let chunk = self.seg.split().freeze();
            self.blob.chunks.write().unwrap().push(chunk);
        }
        Ok(())
    }

    fn reader(&self) -> Arc<dyn BlobReader> {
        self.blob.clone()
    }

    fn commit(mut self: Box<Self>, meta: Vec<u8>) -> io::Result<()> {
        if !self.pooled && !self.seg.is_empty() {
            // The last, small segment is not recycled: hand it over whole (no split, so no
            // shared-buffer header is allocated for it).
            let chunk = std::mem::take(&mut self.seg).freeze();
            self.blob.chunks.write().unwrap().push(chunk);
        }
        self.publish()?;
        self.release_segment();
        let blob = self.blob.clone();
        let name = std::mem::take(&mut self.name).into_boxed_str();
        // No copy when `meta` has no spare capacity (the cache's records are sized exactly).
        self.storage
            .committed
            .insert(name, (blob, meta.into_boxed_slice()));
        Ok(())
    }
}

impl Drop for MemWriter {
    fn drop(&mut self) {
        self.release_segment();
    }
}

/// What `open` and `list` report of a committed blob.
fn blob_info(name: &str, blob: &MemBlob, meta: &[u8]) -> BlobInfo {
    BlobInfo {
        name: name.to_owned(),
        len: blob.chunks.read().unwrap().len,
        meta: meta.to_vec(),
    }
}

impl Storage for MemoryStorage {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        validate_name(name)?;
        Ok(Box::new(MemWriter {
            storage: self.inner.clone(),
            name: name.to_owned(),
            blob: Arc::default(),
            seg: BytesMut::new(),
            pooled: false,
            written: 0,
        }))
    }

    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        let entry = self
            .inner
            .committed
            .get(name)
            .ok_or_else(|| not_found(name))?;
        let (blob, meta) = entry.value();
        Ok((blob.clone(), blob_info(name, blob, meta)))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        let removed = self.inner.committed.remove(name);
        removed.map(drop).ok_or_else(|| not_found(name))
    }

    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        self.list_prefix("")
    }

    fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        Ok(self
            .inner
            .committed
            .iter()
            .filter(|e| e.key().starts_with(prefix))
            .map(|e| blob_info(e.key(), &e.value().0, &e.value().1))
            .collect())
    }

    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        let mut entry = self
            .inner
            .committed
            .get_mut(name)
            .ok_or_else(|| not_found(name))?;
        entry.1 = meta.into();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_not_recopied_and_slices_share_memory() {
        let s = MemoryStorage::new();
        let mut w = s.create("a").unwrap();
        let r = w.reader();
        w.write(&[1; 100]).unwrap();
        w.publish().unwrap();
        let first = r.read_bytes(0, usize::MAX).unwrap().unwrap();
        w.write(&[2; 3 << 20]).unwrap();
        w.publish().unwrap();
        let again = r.read_bytes(0, usize::MAX).unwrap().unwrap();
        // The first chunk was not moved by growth: same memory.
        assert_eq!(first.as_ptr(), again.as_ptr());
        let mut buf = vec![0; 200];
        assert_eq!(r.read_at(&mut buf, 0).unwrap(), 200);
        assert_eq!(&buf[..100], &[1; 100]);
        assert_eq!(&buf[100..], &[2; 100]);
    }

    #[test]
    fn segments_are_recycled() {
        let s = MemoryStorage::with_pool_limit(8 << 20);
        let mut w = s.create("a").unwrap();
        w.write(&vec![7; 4 << 20]).unwrap();
        w.publish().unwrap();
        let r = w.reader();
        let mut originals: Vec<usize> = (0..4)
            .map(|i| r.read_bytes(i << 20, 1).unwrap().unwrap().as_ptr() as usize)
            .collect();
        drop(w);
        drop(r);
        // Every 1 MiB segment comes back from the pool, same allocation, full capacity.
        let mut again: Vec<usize> = (0..4)
            .map(|_| {
                let seg = s.inner.pool.take(SEGMENT);
                assert!(seg.capacity() >= SEGMENT);
                seg.as_ptr() as usize
            })
            .collect();
        originals.sort_unstable();
        again.sort_unstable();
        assert_eq!(originals, again);
    }

    #[test]
    fn chunks_held_by_readers_are_not_recycled() {
        let s = MemoryStorage::with_pool_limit(8 << 20);
        let mut w = s.create("a").unwrap();
        w.write(&vec![7; 2 << 20]).unwrap();
        w.publish().unwrap();
        let held = w.reader().read_bytes(0, 10).unwrap().unwrap();
        drop(w);
        for _ in 0..4 {
            let mut seg = s.inner.pool.take(SEGMENT);
            seg.extend_from_slice(&[0; 10]);
            assert_ne!(seg.as_ptr(), held.as_ptr());
        }
        assert_eq!(&held[..], &[7; 10]);
    }
}
