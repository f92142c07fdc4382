//! A storage wrapper that injects I/O errors: a test tool, compiled only with the `test-util`
//! feature.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{BlobInfo, BlobReader, BlobWriter, Storage};

/// The operations [`FaultyStorage`] can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultOp {
    /// [`Storage::create`].
    Create,
    /// [`BlobWriter::write`].
    Write,
    /// [`BlobReader::read_at`] (and [`BlobReader::read_bytes`]).
    Read,
    /// [`BlobWriter::commit`].
    Commit,
    /// [`Storage::open`] and [`Storage::info`].
    Open,
    /// [`Storage::remove`].
    Remove,
}

const OPS: usize = 6;

impl FaultOp {
    fn index(self) -> usize {
        self as usize
    }
}

/// Wraps a [`Storage`] and fails chosen calls with a chosen [`io::ErrorKind`].
///
/// A test tool, for exercising how code over a storage handles I/O errors; available only
/// with the `test-util` feature, which is meant for `[dev-dependencies]`
/// (`streamcache = { version = "0.1", features = ["test-util"] }`).
///
/// ```
/// use std::io;
/// use streamcache::storage::{FaultOp, FaultyStorage, MemoryStorage, Storage};
///
/// let s = FaultyStorage::new(MemoryStorage::new());
/// s.fail_nth(FaultOp::Write, 2, io::ErrorKind::StorageFull);
/// let mut w = s.create("blob").unwrap();
/// w.write(b"one").unwrap();
/// assert_eq!(w.write(b"two").unwrap_err().kind(), io::ErrorKind::StorageFull);
/// ```
#[derive(Debug, Clone)]
pub struct FaultyStorage {
    inner: Arc<dyn Storage>,
    plan: Arc<Plan>,
}

#[derive(Debug, Default)]
struct Plan {
    /// Calls seen per operation. Lock-free counters.
    calls: [AtomicU64; OPS],
    /// Lock: this mutex. Armed faults: (operation, call number that fails, error kind).
    armed: Mutex<Vec<(FaultOp, u64, io::ErrorKind)>>,
}

impl Plan {
    fn check(&self, op: FaultOp) -> io::Result<()> {
        let n = self.calls[op.index()].fetch_add(1, Ordering::SeqCst) + 1;
        let mut armed = self.armed.lock().unwrap();
        if let Some(i) = armed.iter().position(|&(o, at, _)| o == op && at == n) {
            let (_, _, kind) = armed.swap_remove(i);
            return Err(io::Error::new(kind, format!("injected {op:?} fault")));
        }
        Ok(())
    }
}

impl FaultyStorage {
    /// Wraps `inner`; nothing fails until armed.
    pub fn new(inner: impl Storage + 'static) -> Self {
        Self::wrap(Arc::new(inner))
    }

    /// Wraps a shared storage.
    pub fn wrap(inner: Arc<dyn Storage>) -> Self {
        FaultyStorage {
            inner,
            plan: Arc::default(),
        }
    }

    /// Makes the `n`th call (1-based, counted from now, across all blobs) of `op` fail once
    /// with `kind`.
    pub fn fail_nth(&self, op: FaultOp, n: u64, kind: io::ErrorKind) {
        let base = self.plan.calls[op.index()].load(Ordering::SeqCst);
        self.plan
            .armed
            .lock()
            .unwrap()
            .push((op, base + n.max(1), kind));
    }

    /// How many calls of `op` were made so far.
    pub fn calls(&self, op: FaultOp) -> u64 {
        self.plan.calls[op.index()].load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
struct FaultyWriter {
    inner: Box<dyn BlobWriter>,
    plan: Arc<Plan>,
}

#[derive(Debug)]
struct FaultyReader {
    inner: Arc<dyn BlobReader>,
    plan: Arc<Plan>,
}

impl BlobWriter for FaultyWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<()> {
        self.plan.check(FaultOp::Write)?;
        self.inner.write(buf)
    }

    fn publish(&mut self) -> io::Result<()> {
        self.inner.publish()
    }

    fn reader(&self) -> Arc<dyn BlobReader> {
        Arc::new(FaultyReader {
            inner: self.inner.reader(),
            plan: self.plan.clone(),
        })
    }

    fn commit(self: Box<Self>, meta: Vec<u8>) -> io::Result<()> {
        self.plan.check(FaultOp::Commit)?;
        self.inner.commit(meta)
    }
}

impl BlobReader for FaultyReader {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.plan.check(FaultOp::Read)?;
        self.inner.read_at(buf, offset)
    }

    fn read_bytes(&self, offset: u64, max: usize) -> Option<io::Result<bytes::Bytes>> {
        if let Err(e) = self.plan.check(FaultOp::Read) {
            return Some(Err(e));
        }
        self.inner.read_bytes(offset, max)
    }

    fn known_hash(&self, offset: u64, len: u64) -> Option<[u8; 32]> {
        self.inner.known_hash(offset, len)
    }

    fn idle(&self) {
        self.inner.idle()
    }

    fn revalidate(&self) {
        self.inner.revalidate()
    }

    // `file_range` keeps its default (`None`): every byte goes through the fault plan.
}

impl Storage for FaultyStorage {
    fn create(&self, name: &str) -> io::Result<Box<dyn BlobWriter>> {
        self.plan.check(FaultOp::Create)?;
        Ok(Box::new(FaultyWriter {
            inner: self.inner.create(name)?,
            plan: self.plan.clone(),
        }))
    }

    fn open(&self, name: &str) -> io::Result<(Arc<dyn BlobReader>, BlobInfo)> {
        self.plan.check(FaultOp::Open)?;
        let (inner, info) = self.inner.open(name)?;
        let reader = FaultyReader {
            inner,
            plan: self.plan.clone(),
        };
        Ok((Arc::new(reader), info))
    }

    fn info(&self, name: &str) -> io::Result<BlobInfo> {
        self.plan.check(FaultOp::Open)?;
        self.inner.info(name)
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        self.plan.check(FaultOp::Remove)?;
        self.inner.remove(name)
    }

    fn list(&self) -> io::Result<Vec<BlobInfo>> {
        self.inner.list()
    }

    fn list_prefix(&self, prefix: &str) -> io::Result<Vec<BlobInfo>> {
        self.inner.list_prefix(prefix)
    }

    fn list_batches(
        &self,
        each: &(dyn Fn(Vec<BlobInfo>) -> std::ops::ControlFlow<()> + Sync),
    ) -> io::Result<()> {
        self.inner.list_batches(each)
    }

    fn hint_epoch(&self) -> u64 {
        self.inner.hint_epoch()
    }

    fn put_hint(&self, hint: &[u8], epoch: u64) -> io::Result<bool> {
        self.inner.put_hint(hint, epoch)
    }

    fn take_hint(&self) -> io::Result<Option<crate::storage::SavedHint>> {
        self.inner.take_hint()
    }

    fn hint_backlog(&self) -> Option<u64> {
        self.inner.hint_backlog()
    }

    fn set_meta(&self, name: &str, meta: &[u8]) -> io::Result<()> {
        self.inner.set_meta(name, meta)
    }
}
