//! The bucket's objects: the lease, the chunks and the manifest, and their strict codecs.
//!
//! Everything read from the bucket is untrusted: a decoder returns `Err(reason)` for anything
//! that does not parse, names another generation or index, or fails its blake3 hash, and the
//! caller turns that into an error for the read (never wrong bytes).

use bytes::{Buf, Bytes};

use crate::codec::hex;

/// A chunk object: `magic | generation (16) | index (u32 LE) | flags (u8, 1 = last) |
/// offset in the entry (u64 LE) | metadata length (u32 LE) | payload length (u32 LE) |
/// hash (32) | metadata | payload`. Only chunk 0 carries metadata (what the writer had set
/// when the chunk was cut), so that remote readers see it before the body.
///
/// The hash is blake3 of `offset | metadata length | payload length | blake3(metadata) |
/// the blake3 of each piece of the payload`, where the payload is cut into pieces at every
/// multiple of [`PIECE`] of the entry's offsets: a two-level hash that covers every byte, and
/// whose pieces are the disk storage's blocks, whose hashes the uploading node already has
/// (hashing a disk entry a second time to upload it cost its producer a third of its speed
/// on two cores).
const CHUNK_MAGIC: &[u8; 4] = b"SCK2";
const CHUNK_HEADER: usize = 4 + 16 + 4 + 1 + 8 + 4 + 4 + 32;
/// The largest chunk payload a producer cuts (`SharedTier::chunk_size` is clamped to it).
pub(crate) const MAX_CHUNK_PAYLOAD: usize = 1 << 30;
/// The largest metadata the first chunk carries (for tailing readers, which otherwise get it
/// from the manifest at the end): larger metadata is left out of the chunk.
pub(crate) const MAX_CHUNK_METADATA: usize = 1 << 20;
/// The largest chunk object a producer writes.
pub(crate) const MAX_CHUNK_OBJECT: u64 =
    (CHUNK_HEADER + MAX_CHUNK_PAYLOAD + MAX_CHUNK_METADATA) as u64;

/// The largest a chunk object of `len` payload bytes can be: its header and payload, and for
/// the first chunk its metadata.
pub(crate) fn chunk_object_max(len: u64, first: bool) -> u64 {
    let meta = if first { MAX_CHUNK_METADATA as u64 } else { 0 };
    (CHUNK_HEADER as u64)
        .saturating_add(len)
        .saturating_add(meta)
}

/// The pieces a chunk's payload is hashed in end at the multiples of this, in entry offsets:
/// the storage's hash blocks.
pub(crate) const PIECE: u64 = crate::storage::HASH_BLOCK;
const LEASE_MAGIC: &str = "streamcache-lease 1";
const MANIFEST_MAGIC: &str = "streamcache-manifest 1";

/// Where a producer stands, as its lease says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// Writing; alive while `heartbeat` is recent.
    Producing,
    /// Finished: its manifest was written before the lease said so.
    Done,
    /// Gave up: remote readers must fail, the next request takes over.
    Aborted,
}

/// The lease object: who produces the key now, under which generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) generation: u128,
    pub(crate) node: u128,
    pub(crate) state: LeaseState,
    /// The producer's clock at its last heartbeat, milliseconds since the epoch.
    pub(crate) heartbeat: u64,
    /// Chunks uploaded so far (informational).
    pub(crate) chunks: u64,
}

impl Lease {
    pub(crate) fn encode(&self) -> Bytes {
        let state = match self.state {
            LeaseState::Producing => "producing",
            LeaseState::Done => "done",
            LeaseState::Aborted => "aborted",
        };
        Bytes::from(format!(
            "{LEASE_MAGIC}\ngeneration {:032x}\nnode {:032x}\nstate {state}\nheartbeat {}\nchunks {}\n",
            self.generation, self.node, self.heartbeat, self.chunks
        ))
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Lease, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "lease is not UTF-8".to_string())?;
        let mut lines = text.lines();
        if lines.next() != Some(LEASE_MAGIC) {
            return Err("not a streamcache lease (bad first line)".into());
        }
        let generation = hex_u128(field(lines.next(), "generation")?)?;
        let node = hex_u128(field(lines.next(), "node")?)?;
        let state = match field(lines.next(), "state")? {
            "producing" => LeaseState::Producing,
            "done" => LeaseState::Done,
            "aborted" => LeaseState::Aborted,
            other => return Err(format!("unknown lease state {other:?}")),
        };
        let heartbeat = number(field(lines.next(), "heartbeat")?)?;
        let chunks = number(field(lines.next(), "chunks")?)?;
        Ok(Lease {
            generation,
            node,
            state,
            heartbeat,
            chunks,
        })
    }
}

/// One chunk as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChunkRef {
    pub(crate) len: u64,
    /// blake3 of the chunk's metadata and payload, as in its header.
    pub(crate) hash: [u8; 32],
}

/// The manifest: the commit point of a finished entry, written after its last chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Manifest {
    pub(crate) key: String,
    pub(crate) generation: u128,
    pub(crate) length: u64,
    /// The producer's clock when it finished, milliseconds since the epoch.
    pub(crate) finished: u64,
    /// The entry's own time to live from `finished`, if it has one.
    pub(crate) ttl_ms: Option<u64>,
    pub(crate) metadata: Bytes,
    pub(crate) chunks: Vec<ChunkRef>,
}

impl Manifest {
    pub(crate) fn encode(&self) -> Bytes {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "{MANIFEST_MAGIC}");
        let _ = writeln!(s, "key {}", hex(self.key.as_bytes()));
        let _ = writeln!(s, "generation {:032x}", self.generation);
        let _ = writeln!(s, "length {}", self.length);
        let _ = writeln!(s, "finished {}", self.finished);
        match self.ttl_ms {
            Some(t) => {
                let _ = writeln!(s, "ttl {t}");
            }
            None => s.push_str("ttl -\n"),
        }
        let _ = writeln!(s, "metadata {}", hex(&self.metadata));
        let _ = writeln!(s, "chunks {}", self.chunks.len());
        for c in &self.chunks {
            let _ = writeln!(s, "{} {}", c.len, hex(&c.hash));
        }
        let check = blake3::hash(s.as_bytes());
        let _ = writeln!(s, "check {}", check.to_hex());
        Bytes::from(s)
    }

    /// Decodes a manifest and checks it is `key`'s, whole (its own hash) and consistent.
    pub(crate) fn decode(bytes: &[u8], key: &str) -> Result<Manifest, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "manifest is not UTF-8".to_string())?;
        let body_end = text
            .rfind("check ")
            .ok_or_else(|| "manifest has no check line".to_string())?;
        let (body, check) = text.split_at(body_end);
        let want = check
            .strip_prefix("check ")
            .and_then(|c| c.strip_suffix('\n'))
            .ok_or_else(|| "malformed check line".to_string())?;
        if blake3::hash(body.as_bytes()).to_hex().as_str() != want {
            return Err("manifest fails its own hash (truncated or altered)".into());
        }
        let mut lines = body.lines();
        if lines.next() != Some(MANIFEST_MAGIC) {
            return Err("not a streamcache manifest (bad first line)".into());
        }
        let stored_key = unhex(field(lines.next(), "key")?)?;
        if stored_key != key.as_bytes() {
            return Err("manifest belongs to another key".into());
        }
        let generation = hex_u128(field(lines.next(), "generation")?)?;
        let length = number(field(lines.next(), "length")?)?;
        let finished = number(field(lines.next(), "finished")?)?;
        let ttl_ms = match field(lines.next(), "ttl")? {
            "-" => None,
            t => Some(number(t)?),
        };
        let metadata = Bytes::from(unhex(field(lines.next(), "metadata")?)?);
        let count = number(field(lines.next(), "chunks")?)?;
        let mut chunks = Vec::new();
        let mut total = 0u64;
        for _ in 0..count {
            let line = lines
                .next()
                .ok_or("manifest lists fewer chunks than it says")?;
            let (len, hash) = line.split_once(' ').ok_or("malformed chunk line")?;
            let len = number(len)?;
            if len > MAX_CHUNK_PAYLOAD as u64 {
                return Err(format!(
                    "manifest lists a chunk of {len} bytes, more than any producer cuts"
                ));
            }
            let hash: [u8; 32] = unhex(hash)?
                .try_into()
                .map_err(|_| "chunk hash is not 32 bytes".to_string())?;
            total = total.checked_add(len).ok_or("chunk lengths overflow")?;
            chunks.push(ChunkRef { len, hash });
        }
        if lines.next().is_some() {
            return Err("manifest has trailing lines".into());
        }
        if total != length {
            return Err(format!(
                "chunks add up to {total} bytes, manifest says {length}"
            ));
        }
        if chunks.is_empty() {
            return Err("manifest lists no chunk".into());
        }
        Ok(Manifest {
            key: key.to_string(),
            generation,
            length,
            finished,
            ttl_ms,
            metadata,
            chunks,
        })
    }
}

/// A chunk as read back: its payload, whether it is the last, its hash, and chunk 0's metadata.
#[derive(Debug)]
pub(crate) struct Chunk {
    pub(crate) payload: Bytes,
    pub(crate) metadata: Option<Bytes>,
    pub(crate) last: bool,
    pub(crate) hash: [u8; 32],
}

/// The header of chunk `index` of `generation`, which starts at `offset` in the entry; the
/// object is this followed by `metadata` and the `payload` parts (sent as they are, so the
/// payload is never copied). `known` gives a piece's hash when the caller has it already
/// (`Reader::known_hash`); other pieces are hashed here.
pub(crate) fn chunk_header(
    generation: u128,
    index: u32,
    last: bool,
    offset: u64,
    metadata: &[u8],
    payload: &[Bytes],
    known: impl Fn(u64, u64) -> Option<[u8; 32]>,
) -> Result<(Bytes, [u8; 32]), String> {
    let meta_len = u32::try_from(metadata.len()).map_err(|_| "metadata over 4 GiB")?;
    let total: usize = payload.iter().map(Bytes::len).sum();
    let len = u32::try_from(total).map_err(|_| "chunk over 4 GiB")?;
    let hash = chunk_hash(offset, metadata, payload, known);
    let mut h = Vec::with_capacity(CHUNK_HEADER);
    h.extend_from_slice(CHUNK_MAGIC);
    h.extend_from_slice(&generation.to_le_bytes());
    h.extend_from_slice(&index.to_le_bytes());
    h.push(u8::from(last));
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(&meta_len.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&hash);
    Ok((Bytes::from(h), hash))
}

/// The chunk hash (see [`CHUNK_MAGIC`]) of `payload` (in parts of any size) at `offset`.
fn chunk_hash(
    offset: u64,
    metadata: &[u8],
    payload: &[Bytes],
    known: impl Fn(u64, u64) -> Option<[u8; 32]>,
) -> [u8; 32] {
    let total: u64 = payload.iter().map(|p| p.len() as u64).sum();
    let mut top = blake3::Hasher::new();
    top.update(&offset.to_le_bytes());
    top.update(&(metadata.len() as u64).to_le_bytes());
    top.update(&total.to_le_bytes());
    top.update(blake3::hash(metadata).as_bytes());
    // Walks the parts piece by piece: `part` and `at` locate the next unhashed byte. The
    // bounds saturate at 2^64 - 1, so a hostile offset cannot wrap them (the decoder refuses
    // a chunk that would end past it; no entry holds that many bytes).
    let (mut part, mut at) = (0usize, 0usize);
    let (mut pos, end) = (offset, offset.saturating_add(total));
    while pos < end {
        let piece_end = (pos - pos % PIECE).saturating_add(PIECE).min(end);
        let mut want = (piece_end - pos) as usize;
        let known = known(pos, piece_end - pos);
        let mut piece = blake3::Hasher::new();
        while want > 0 {
            let p = &payload[part][at..];
            let n = p.len().min(want);
            if known.is_none() {
                piece.update(&p[..n]);
            }
            want -= n;
            at += n;
            if at == payload[part].len() {
                (part, at) = (part + 1, 0);
            }
        }
        let h = known.unwrap_or_else(|| *piece.finalize().as_bytes());
        top.update(&h);
        pos = piece_end;
    }
    *top.finalize().as_bytes()
}

/// Decodes chunk `index` of `generation`, which must start at `offset` in the entry, and checks
/// its hash; a chunk of another generation, index or offset (a dead producer's, a misplaced
/// object) is refused.
pub(crate) fn decode_chunk(
    mut obj: Bytes,
    generation: u128,
    index: u32,
    offset: u64,
) -> Result<Chunk, String> {
    if obj.len() < CHUNK_HEADER {
        return Err(format!(
            "chunk {index} is {} bytes, shorter than its header",
            obj.len()
        ));
    }
    let mut h = obj.split_to(CHUNK_HEADER);
    if &h[..4] != CHUNK_MAGIC {
        return Err(format!("chunk {index} has a bad magic number"));
    }
    h.advance(4);
    if h.get_u128_le() != generation {
        return Err(format!("chunk {index} belongs to another generation"));
    }
    if h.get_u32_le() != index {
        return Err(format!("chunk {index} says it has another index"));
    }
    let last = match h.get_u8() {
        0 => false,
        1 => true,
        f => return Err(format!("chunk {index} has unknown flags {f}")),
    };
    let at = h.get_u64_le();
    if at != offset {
        return Err(format!(
            "chunk {index} says it starts at byte {at}, expected {offset}"
        ));
    }
    let meta_len = h.get_u32_le() as usize;
    let len = h.get_u32_le() as usize;
    let mut hash = [0u8; 32];
    h.copy_to_slice(&mut hash);
    if obj.len() != meta_len.saturating_add(len) {
        return Err(format!(
            "chunk {index} holds {} bytes after its header, header says {}",
            obj.len(),
            meta_len.saturating_add(len)
        ));
    }
    if offset.checked_add(len as u64).is_none() {
        return Err(format!(
            "chunk {index} says it ends past byte 2^64 ({len} bytes at {offset})"
        ));
    }
    let metadata = obj.split_to(meta_len);
    if chunk_hash(offset, &metadata, std::slice::from_ref(&obj), |_, _| None) != hash {
        return Err(format!("chunk {index} fails its blake3 hash"));
    }
    Ok(Chunk {
        payload: obj,
        metadata: (index == 0).then_some(metadata),
        last,
        hash,
    })
}

fn field<'a>(line: Option<&'a str>, name: &str) -> Result<&'a str, String> {
    line.and_then(|l| l.strip_prefix(name))
        .and_then(|l| l.strip_prefix(' '))
        .ok_or_else(|| format!("expected a {name:?} line"))
}

fn number(s: &str) -> Result<u64, String> {
    s.parse().map_err(|_| format!("{s:?} is not a number"))
}

fn hex_u128(s: &str) -> Result<u128, String> {
    if s.len() != 32 {
        return Err(format!("{s:?} is not a 128-bit hex number"));
    }
    u128::from_str_radix(s, 16).map_err(|_| format!("{s:?} is not a 128-bit hex number"))
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    crate::codec::unhex(s).ok_or_else(|| "malformed hex".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            key: "a key\nwith a newline".into(),
            generation: 0x1234_5678_9abc_def0_1122_3344_5566_7788,
            length: 7,
            finished: 1_700_000_000_000,
            ttl_ms: Some(60_000),
            metadata: Bytes::from_static(b"content-type: text/plain"),
            chunks: vec![
                ChunkRef {
                    len: 4,
                    hash: [1; 32],
                },
                ChunkRef {
                    len: 3,
                    hash: [2; 32],
                },
            ],
        }
    }

    #[test]
    fn manifest_round_trips_and_refuses_every_alteration() {
        let m = manifest();
        let bytes = m.encode();
        assert_eq!(Manifest::decode(&bytes, &m.key).unwrap(), m);
        assert!(Manifest::decode(&bytes, "another key").is_err());
        // Every truncation and every single-byte change is refused.
        for cut in 0..bytes.len() {
            assert!(
                Manifest::decode(&bytes[..cut], &m.key).is_err(),
                "cut at {cut}"
            );
        }
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 0x01;
            assert!(Manifest::decode(&b, &m.key).is_err(), "flip at {i}");
        }
        let none = Manifest { ttl_ms: None, ..m };
        assert_eq!(Manifest::decode(&none.encode(), &none.key).unwrap(), none);
    }

    #[test]
    fn manifest_must_add_up() {
        let mut m = manifest();
        m.length = 8;
        assert!(
            Manifest::decode(&m.encode(), &m.key)
                .unwrap_err()
                .contains("add up")
        );
        m.chunks.clear();
        m.length = 0;
        assert!(Manifest::decode(&m.encode(), &m.key).is_err());
        // A chunk longer than any producer cuts (a forged manifest would have a node read an
        // object of that size).
        let big = MAX_CHUNK_PAYLOAD as u64 + 1;
        m.chunks = vec![ChunkRef {
            len: big,
            hash: [0; 32],
        }];
        m.length = big;
        assert!(
            Manifest::decode(&m.encode(), &m.key)
                .unwrap_err()
                .contains("more than any producer cuts")
        );
        m.chunks[0].len -= 1;
        m.length -= 1;
        assert!(Manifest::decode(&m.encode(), &m.key).is_ok());
    }

    #[test]
    fn lease_round_trips() {
        for state in [LeaseState::Producing, LeaseState::Done, LeaseState::Aborted] {
            let l = Lease {
                generation: 7,
                node: u128::MAX,
                state,
                heartbeat: 99,
                chunks: 3,
            };
            assert_eq!(Lease::decode(&l.encode()).unwrap(), l);
        }
        assert!(Lease::decode(b"streamcache-lease 1\ngeneration 7\n").is_err());
        assert!(Lease::decode(b"garbage").is_err());
    }

    fn chunk(generation: u128, index: u32, last: bool, meta: &[u8], payload: &[u8]) -> Bytes {
        let parts = [Bytes::copy_from_slice(payload)];
        let (h, _) = chunk_header(generation, index, last, 0, meta, &parts, |_, _| None).unwrap();
        [&h[..], meta, payload].concat().into()
    }

    #[test]
    fn chunks_check_generation_index_offset_and_hash() {
        let c = chunk(5, 0, false, b"meta", b"payload");
        let d = decode_chunk(c.clone(), 5, 0, 0).unwrap();
        assert_eq!(&d.payload[..], b"payload");
        assert_eq!(d.metadata.as_deref(), Some(&b"meta"[..]));
        assert!(!d.last);
        let last = decode_chunk(chunk(5, 3, true, b"", b"end"), 5, 3, 0).unwrap();
        assert!(last.last && last.metadata.is_none());
        // An empty entry's one chunk is its header alone.
        let empty = decode_chunk(chunk(5, 0, true, b"", b""), 5, 0, 0).unwrap();
        assert!(empty.last && empty.payload.is_empty());
        assert!(
            decode_chunk(c.clone(), 6, 0, 0)
                .unwrap_err()
                .contains("generation")
        );
        assert!(
            decode_chunk(c.clone(), 5, 1, 0)
                .unwrap_err()
                .contains("index")
        );
        assert!(
            decode_chunk(c.clone(), 5, 0, 7)
                .unwrap_err()
                .contains("starts at")
        );
        for cut in 0..c.len() {
            assert!(
                decode_chunk(c.slice(..cut), 5, 0, 0).is_err(),
                "cut at {cut}"
            );
        }
        for i in 0..c.len() {
            let mut b = c.to_vec();
            b[i] ^= 0x80;
            assert!(decode_chunk(b.into(), 5, 0, 0).is_err(), "flip at {i}");
        }
    }

    /// A chunk's offset comes from a manifest, which whoever can write the bucket can forge.
    /// Offsets in the last piece below 2^64 made the piece arithmetic wrap: a panic (overflow
    /// in a debug build, an out-of-bounds slice in a release one) instead of an error.
    #[test]
    fn offsets_at_the_end_of_the_u64_range_never_panic() {
        let payload = [Bytes::from_static(b"xy")];
        // Ends exactly at 2^64 - 1: a valid (if absurd) chunk.
        let at = u64::MAX - 2;
        let (h, hash) = chunk_header(3, 1, true, at, b"", &payload, |_, _| None).unwrap();
        let obj: Bytes = [&h[..], b"xy"].concat().into();
        let d = decode_chunk(obj, 3, 1, at).unwrap();
        assert_eq!((&d.payload[..], d.hash), (&b"xy"[..], hash));
        // Would end past it: refused, not hashed.
        let at = u64::MAX - 1;
        let (h, _) = chunk_header(3, 1, true, at, b"", &payload, |_, _| None).unwrap();
        let obj: Bytes = [&h[..], b"xy"].concat().into();
        assert!(
            decode_chunk(obj, 3, 1, at)
                .unwrap_err()
                .contains("past byte 2^64")
        );
    }

    /// A payload in parts of any size, at any offset, hashes the same as in one piece, and
    /// piece hashes the uploader already has stand in for hashing those bytes; a wrong one
    /// makes a chunk that no reader accepts (never wrong bytes).
    #[test]
    fn chunk_hash_is_by_pieces_and_takes_known_piece_hashes() {
        let p = PIECE as usize;
        let data: Vec<u8> = (0..3 * p + 77).map(|i| (i * 13 % 251) as u8).collect();
        for offset in [0, 5, PIECE - 1, PIECE, 7 * PIECE + 3] {
            let whole = [Bytes::from(data.clone())];
            let (header, hash) =
                chunk_header(9, 2, false, offset, b"", &whole, |_, _| None).unwrap();
            let obj: Bytes = [&header[..], &data].concat().into();
            assert_eq!(decode_chunk(obj, 9, 2, offset).unwrap().hash, hash);
            // In odd parts, with the true hash of every whole piece given.
            let parts: Vec<Bytes> = data.chunks(p / 3 + 1).map(Bytes::copy_from_slice).collect();
            let asked = std::cell::Cell::new(0);
            let true_hash = |at: u64, len: u64| {
                asked.set(asked.get() + 1);
                let from = (at - offset) as usize;
                (len == PIECE).then(|| *blake3::hash(&data[from..from + len as usize]).as_bytes())
            };
            let (_, by_parts) = chunk_header(9, 2, false, offset, b"", &parts, true_hash).unwrap();
            assert_eq!(by_parts, hash, "offset {offset}");
            assert!(asked.get() >= 3, "every piece is asked for");
            // A wrong piece hash: the chunk it makes fails its check.
            let (bad, _) =
                chunk_header(9, 2, false, offset, b"", &whole, |_, _| Some([7; 32])).unwrap();
            let obj: Bytes = [&bad[..], &data].concat().into();
            assert!(decode_chunk(obj, 9, 2, offset).is_err());
        }
    }
}
