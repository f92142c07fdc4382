//! The writer's block-hashing pipeline: the blake3 hash of every 1 MiB block of a blob, in
//! order, computed while the blob is written.
//!
//! Invariants: the hashes are those of exactly the bytes handed to the writer, in block order,
//! the partial last block included; at most one helper thread per core runs process-wide
//! (`HELPERS`), other writers hash on their own threads; a blob of one block starts no thread;
//! a helper that stops or panics is an error of the write or commit, never a missing hash.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;

use super::BLOCK;

/// The hashes of a blob's blocks as they are computed, in block order: by the writer (the
/// first block, or every block when it hashes inline) or by its helper. The blob's readers
/// share them, so that a reader that must hash the same bytes again (the shared tier's
/// upload) can take them instead (`BlobReader::known_hash`).
#[derive(Debug, Default)]
pub(super) struct BlockHashes {
    /// Lock: this mutex (held only to push or copy one hash). Invariant: entry `i` is the
    /// hash of block `i` of the bytes written, pushed once and never changed.
    hashes: Mutex<Vec<[u8; 32]>>,
}

impl BlockHashes {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<[u8; 32]>> {
        self.hashes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn push(&self, hash: [u8; 32]) {
        self.lock().push(hash);
    }

    /// The hash of block `index`, once computed.
    pub(super) fn get(&self, index: u64) -> Option<[u8; 32]> {
        self.lock().get(usize::try_from(index).ok()?).copied()
    }

    /// Every hash computed so far.
    pub(super) fn to_vec(&self) -> Vec<[u8; 32]> {
        self.lock().clone()
    }
}

/// The blocks of a blob past its first: the writer copies them into `fill`, and once a whole
/// one is there a helper thread hashes them while the writer goes on writing, so that the
/// writer's `write(2)` and the hashing overlap (in series they capped a disk write near 0.65×
/// of a raw one). A blob that never fills its second block starts no thread; with no helper to
/// be had (see `HELPERS`), blocks are hashed here.
pub(super) struct Tail {
    /// The block being filled.
    pub(super) fill: Vec<u8>,
    helper: Option<Helper>,
    /// No helper could be had: every block is hashed on the writer's thread.
    inline: bool,
}

impl fmt::Debug for Tail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tail")
            .field("filled", &self.fill.len())
            .field("helper", &self.helper.is_some())
            .finish()
    }
}

/// A thread hashing whole blocks in the order they are sent; at most two wait for it (the
/// writer waits beyond that), and their buffers come back for reuse.
struct Helper {
    blocks: Option<mpsc::SyncSender<Vec<u8>>>,
    spare: mpsc::Receiver<Vec<u8>>,
    /// Pushes the hash of every block it is sent, in order, to the blob's `BlockHashes`.
    thread: Option<JoinHandle<()>>,
}

/// Hashing helpers running, process-wide; `DiskStorage` allows one per core (more would only
/// compete for the same cores), and writers beyond that hash on their own threads.
static HELPERS: AtomicUsize = AtomicUsize::new(0);

/// One of the `HELPERS` places, given back when dropped.
struct HelperPlace;

impl HelperPlace {
    fn take(max: usize) -> Option<HelperPlace> {
        HELPERS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| HelperPlace)
    }
}

impl Drop for HelperPlace {
    fn drop(&mut self) {
        HELPERS.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Helper {
    /// A helper, unless `max` are running already or no thread can be started.
    fn start(max: usize, hashes: Arc<BlockHashes>) -> Option<Helper> {
        let place = HelperPlace::take(max)?;
        let (blocks, todo) = mpsc::sync_channel::<Vec<u8>>(2);
        let (done, spare) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("streamcache-hash".into())
            .spawn(move || {
                let _place = place;
                for block in todo {
                    hashes.push(*blake3::hash(&block).as_bytes());
                    let _ = done.send(block);
                }
            })
            .ok()?;
        Some(Helper {
            blocks: Some(blocks),
            spare,
            thread: Some(thread),
        })
    }

    /// An empty block buffer: one the helper is done with, or a new one. Keeps no more than
    /// that one (a slow writer would otherwise hold every buffer it ever used).
    fn buffer(&mut self) -> Vec<u8> {
        let mut reuse = None;
        while let Ok(b) = self.spare.try_recv() {
            reuse.get_or_insert(b);
        }
        match reuse {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(BLOCK as usize),
        }
    }

    fn send(&mut self, block: Vec<u8>) -> io::Result<()> {
        if self
            .blocks
            .as_ref()
            .is_some_and(|tx| tx.send(block).is_ok())
        {
            return Ok(());
        }
        // The helper is gone: its join says why.
        self.join()?;
        Err(io::Error::other("the block hashing thread stopped"))
    }

    /// Waits for the helper to hash everything sent.
    fn join(&mut self) -> io::Result<()> {
        drop(self.blocks.take());
        let thread = self
            .thread
            .take()
            .ok_or_else(|| io::Error::other("the block hashing thread stopped"))?;
        thread
            .join()
            .map_err(|_| io::Error::other("the block hashing thread panicked"))
    }
}

impl Tail {
    pub(super) fn new() -> Tail {
        Tail {
            fill: Vec::with_capacity(BLOCK as usize),
            helper: None,
            inline: false,
        }
    }

    /// `fill` holds a whole block: hashes it (on the helper, started now if need be, or here)
    /// into `hashes`, and starts the next.
    pub(super) fn block_full(
        &mut self,
        hashes: &Arc<BlockHashes>,
        max_helpers: usize,
    ) -> io::Result<()> {
        if self.helper.is_none() && !self.inline {
            self.helper = Helper::start(max_helpers, hashes.clone());
            self.inline = self.helper.is_none();
        }
        match &mut self.helper {
            Some(h) => {
                let next = h.buffer();
                h.send(std::mem::replace(&mut self.fill, next))
            }
            None => {
                hashes.push(*blake3::hash(&self.fill).as_bytes());
                self.fill.clear();
                Ok(())
            }
        }
    }

    /// Appends the hashes of the blocks not in `hashes` yet, the partial last one included.
    pub(super) fn finish(mut self, hashes: &BlockHashes) -> io::Result<()> {
        let last = std::mem::take(&mut self.fill);
        match &mut self.helper {
            Some(h) => {
                if !last.is_empty() {
                    h.send(last)?;
                }
                h.join()?;
            }
            None if !last.is_empty() => hashes.push(*blake3::hash(&last).as_bytes()),
            None => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::DiskStorage;
    use super::*;
    use crate::storage::{BlobWriter, Storage};

    /// Blocks hashed inline or on a helper thread (everything past the first block, once a
    /// second one fills) land in the record in order, whatever the write sizes and wherever
    /// the blob ends relative to a block.
    #[test]
    fn block_hashes_are_right_on_both_threads() {
        for (_dir, s) in super::super::test_support::inline_and_helped() {
            check_block_hashes(&s);
        }
    }

    fn check_block_hashes(s: &DiskStorage) {
        let b = BLOCK as usize;
        for (i, len) in [
            0,
            1,
            b - 1,
            b,
            b + 1,
            2 * b - 1,
            2 * b,
            2 * b + 1,
            3 * b + 5,
        ]
        .into_iter()
        .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|j| (j * 7 + i) as u8).collect();
            write_and_check(s, &format!("blob{i}"), &data, 65_537 + i);
        }
    }

    /// Writes `data` as blob `name` in `piece`-byte writes, commits, and checks the record's
    /// block hashes.
    fn write_and_check(s: &DiskStorage, name: &str, data: &[u8], piece: usize) {
        let mut w = s.create(name).unwrap();
        for p in data.chunks(piece) {
            w.write(p).unwrap();
        }
        w.commit(Vec::new()).unwrap();
        let want: Vec<[u8; 32]> = data
            .chunks(BLOCK as usize)
            .map(|c| *blake3::hash(c).as_bytes())
            .collect();
        assert_eq!(
            s.read_record(name).unwrap().hashes,
            want,
            "len {}",
            data.len()
        );
    }

    /// More large writers than cores: some get a hashing helper, the others hash inline, and
    /// every record is right.
    #[test]
    fn concurrent_large_writers_all_hash_right() {
        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let b = BLOCK as usize;
        let writers = 3 * std::thread::available_parallelism().map_or(2, |n| n.get());
        std::thread::scope(|scope| {
            for t in 0..writers {
                let s = &s;
                scope.spawn(move || {
                    let data: Vec<u8> = (0..3 * b + t).map(|j| (j * 31 + t) as u8).collect();
                    write_and_check(s, &format!("w{t}"), &data, 64 << 10);
                });
            }
        });
    }
}
