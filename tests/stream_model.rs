//! Model test of the stream core: random sequences of writer and reader operations checked
//! against a `Vec<u8>` reference, on memory and disk storage.
//!
//! The model knows a lower bound of what is published (flush, finish, and every 1 MiB of
//! writes) and only issues a blocking read when it knows the read can complete: the bytes it
//! needs are published, or the stream has ended. Every case runs under a deadline, so a read
//! that blocks when it should not fails the test instead of hanging it.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use common::{assert_aborted, deadline};
use proptest::prelude::*;
use streamcache::storage::{DiskStorage, MemoryStorage, Storage};
use streamcache::{Reader, Stream, Writer};

/// Writers publish on their own after this much unpublished data (documented behaviour).
const PUBLISH_EVERY: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write(Vec<u8>),
    /// A write of more than 1 MiB (content derived from the seed), which publishes by itself.
    WriteBig(usize, u8),
    Flush,
    Finish,
    Abort,
    Open,
    Read(usize, usize),
    ReadAt(usize, u64, usize),
    SeekStart(usize, u64),
    SeekCurrent(usize, i64),
    ReadChunk(usize, usize),
    Drop(usize),
}

fn op() -> impl Strategy<Value = Op> {
    // Finish and abort are rare so that most cases spend a while with the stream open.
    prop_oneof![
        18 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Op::Write),
        1 => (0..2000usize, any::<u8>()).prop_map(|(n, s)| Op::WriteBig(PUBLISH_EVERY + n, s)),
        8 => Just(Op::Flush),
        1 => Just(Op::Finish),
        1 => Just(Op::Abort),
        8 => Just(Op::Open),
        18 => (0..8usize, 1..400usize).prop_map(|(i, n)| Op::Read(i, n)),
        12 => (0..8usize, 0..3000u64, 1..400usize).prop_map(|(i, o, n)| Op::ReadAt(i, o, n)),
        5 => (0..8usize, 0..3000u64).prop_map(|(i, o)| Op::SeekStart(i, o)),
        5 => (0..8usize, -300..300i64).prop_map(|(i, d)| Op::SeekCurrent(i, d)),
        6 => (0..8usize, 1..400usize).prop_map(|(i, n)| Op::ReadChunk(i, n)),
        3 => (0..8usize).prop_map(Op::Drop),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Open,
    Finished,
    Aborted,
}

struct ModelReader {
    reader: Reader,
    pos: u64,
}

struct Model {
    storage: Arc<dyn Storage>,
    writer: Option<Writer>,
    stream: Stream,
    /// Every byte written.
    reference: Vec<u8>,
    /// Bytes certainly published (lower bound of what readers can see).
    published: usize,
    ended: Ended,
    readers: Vec<Option<ModelReader>>,
}

impl Model {
    fn new(storage: Arc<dyn Storage>) -> Model {
        let writer = Writer::create(storage.clone(), "model").unwrap();
        let stream = writer.stream();
        Model {
            storage,
            writer: Some(writer),
            stream,
            reference: Vec::new(),
            published: 0,
            ended: Ended::Open,
            readers: Vec::new(),
        }
    }

    /// The live reader chosen by `i` (modulo the readers made so far), if any.
    fn pick(&mut self, i: usize) -> Option<&mut ModelReader> {
        if self.readers.is_empty() {
            return None;
        }
        let n = self.readers.len();
        self.readers[i % n].as_mut()
    }

    fn write(&mut self, bytes: &[u8]) {
        let Some(w) = self.writer.as_mut() else {
            return;
        };
        w.write_all(bytes).unwrap();
        self.reference.extend_from_slice(bytes);
        if self.reference.len() - self.published >= PUBLISH_EVERY {
            self.published = self.reference.len();
        }
    }

    /// Checks that a result of `len` bytes read at `off` matches the reference.
    fn check_bytes(&self, got: &[u8], off: u64) {
        if got.is_empty() {
            return;
        }
        let off = off as usize;
        assert_eq!(
            got,
            &self.reference[off..off + got.len()],
            "wrong bytes at {off}..{}",
            off + got.len()
        );
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Write(bytes) => self.write(&bytes),
            Op::WriteBig(n, seed) => {
                let bytes: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
                self.write(&bytes);
            }
            Op::Flush => {
                if let Some(w) = self.writer.as_mut() {
                    w.flush().unwrap();
                    self.published = self.reference.len();
                }
            }
            Op::Finish => {
                if let Some(w) = self.writer.take() {
                    w.finish().unwrap();
                    self.published = self.reference.len();
                    self.ended = Ended::Finished;
                }
            }
            Op::Abort => {
                if let Some(w) = self.writer.take() {
                    w.abort();
                    self.ended = Ended::Aborted;
                }
            }
            Op::Open => {
                let reader = match &self.writer {
                    Some(w) => w.reader(),
                    None => self.stream.reader(),
                };
                // Nothing closes the stream to new readers in this model.
                let reader = reader.unwrap();
                self.readers.push(Some(ModelReader { reader, pos: 0 }));
            }
            Op::Drop(i) => {
                if !self.readers.is_empty() {
                    let n = self.readers.len();
                    self.readers[i % n] = None;
                }
            }
            Op::SeekStart(i, off) => {
                let Some(r) = self.pick(i) else { return };
                assert_eq!(r.reader.seek(SeekFrom::Start(off)).unwrap(), off);
                r.pos = off;
            }
            Op::SeekCurrent(i, d) => {
                let Some(r) = self.pick(i) else { return };
                match r.pos.checked_add_signed(d) {
                    Some(target) => {
                        assert_eq!(r.reader.seek(SeekFrom::Current(d)).unwrap(), target);
                        r.pos = target;
                    }
                    None => {
                        assert!(r.reader.seek(SeekFrom::Current(d)).is_err());
                    }
                }
                assert_eq!(r.reader.position(), r.pos);
            }
            Op::Read(i, n) | Op::ReadChunk(i, n) => {
                let chunked = matches!(op, Op::ReadChunk(..));
                let (ended, published, total) = (self.ended, self.published, self.reference.len());
                let Some(r) = self.pick(i) else { return };
                let pos = r.pos;
                if ended == Ended::Open && pos >= published as u64 {
                    return; // would block: the model cannot tell when it would wake
                }
                let res = if chunked {
                    r.reader.read_chunk(n).map(|b| b.to_vec())
                } else {
                    let mut buf = vec![0; n];
                    r.reader.read(&mut buf).map(|k| {
                        buf.truncate(k);
                        buf
                    })
                };
                match ended {
                    Ended::Aborted => assert_aborted(&res.unwrap_err()),
                    Ended::Finished if pos >= total as u64 => {
                        assert_eq!(res.unwrap().len(), 0, "EOF at {pos} of {total}")
                    }
                    _ => {
                        let got = res.unwrap();
                        assert!(!got.is_empty(), "empty read at {pos} of {total}");
                        assert!(got.len() <= n);
                        r.pos += got.len() as u64;
                        self.check_bytes(&got, pos);
                    }
                }
                let r = self.pick(i).unwrap();
                assert_eq!(r.reader.position(), r.pos);
            }
            Op::ReadAt(i, off, n) => {
                let (ended, published, total) = (self.ended, self.published, self.reference.len());
                let Some(r) = self.pick(i) else { return };
                if ended == Ended::Open && off as usize + n > published {
                    return; // would block
                }
                let pos_before = r.reader.position();
                let mut buf = vec![0; n];
                let res = r.reader.read_at(&mut buf, off);
                assert_eq!(
                    r.reader.position(),
                    pos_before,
                    "read_at moved the position"
                );
                match ended {
                    Ended::Aborted => assert_aborted(&res.unwrap_err()),
                    Ended::Finished => {
                        let k = res.unwrap();
                        assert_eq!(k, n.min(total.saturating_sub(off as usize)));
                        self.check_bytes(&buf[..k], off);
                    }
                    Ended::Open => {
                        assert_eq!(res.unwrap(), n);
                        self.check_bytes(&buf, off);
                    }
                }
            }
        }
        self.check_size();
    }

    /// `size` lies between what is certainly published and what was written; it is final
    /// exactly when finished.
    fn check_size(&self) {
        let size = self.stream.size();
        assert!(
            size.len as usize >= self.published.min(self.reference.len()),
            "size {} below published {}",
            size.len,
            self.published
        );
        assert!(size.len as usize <= self.reference.len());
        assert_eq!(size.finished, self.ended == Ended::Finished);
        if size.finished {
            assert_eq!(size.len as usize, self.reference.len());
        }
    }

    /// Ends the case: finish the writer if it is still open, then every reader reads the rest.
    fn conclude(mut self) {
        if let Some(w) = self.writer.take() {
            w.finish().unwrap();
            self.ended = Ended::Finished;
        }
        let reference = std::mem::take(&mut self.reference);
        for slot in self.readers.iter_mut() {
            let Some(r) = slot else { continue };
            let mut rest = Vec::new();
            let res = r.reader.read_to_end(&mut rest);
            match self.ended {
                Ended::Aborted => assert_aborted(&res.unwrap_err()),
                _ => {
                    let from = (r.pos as usize).min(reference.len());
                    assert_eq!(rest, &reference[from..]);
                }
            }
        }
        match self.ended {
            Ended::Aborted => {
                assert!(self.storage.open("model").is_err());
                assert!(self.storage.list().unwrap().is_empty());
            }
            _ => {
                let (blob, info) = self.storage.open("model").unwrap();
                assert_eq!(info.len as usize, reference.len());
                let mut all = vec![0; reference.len()];
                let mut done = 0;
                while done < all.len() {
                    let k = blob.read_at(&mut all[done..], done as u64).unwrap();
                    assert!(k > 0);
                    done += k;
                }
                assert!(all == reference, "stored bytes differ");
            }
        }
    }
}

fn run(storage: Arc<dyn Storage>, ops: Vec<Op>) {
    let mut model = Model::new(storage);
    for op in ops {
        model.apply(op);
    }
    model.conclude();
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 200,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn model_memory(ops in prop::collection::vec(op(), 1..150)) {
        deadline("model on memory", move || run(Arc::new(MemoryStorage::new()), ops));
    }

    #[test]
    fn model_disk(ops in prop::collection::vec(op(), 1..150)) {
        deadline("model on disk", move || {
            let dir = tempfile::tempdir().unwrap();
            let storage = Arc::new(DiskStorage::open(dir.path()).unwrap());
            run(storage, ops);
        });
    }
}
