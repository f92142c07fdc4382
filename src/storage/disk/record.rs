//! The metadata record (`<name>.meta`): its format, its limits, and reading it from disk.
//! The format is documented on [`DiskStorage`] ("Metadata record").
//!
//! Invariants: a record is the commit point of its blob; [`Record::decode`] accepts only a
//! record whose checksum, magic, block size, block count, content digest and lengths are all
//! right, and never panics or allocates more than the format allows on other input; no
//! record is longer than [`MAX_RECORD_LEN`], so a longer file is damage known from its size,
//! before anything is read or allocated. Writers refuse metadata past
//! [`DiskStorage::MAX_META_LEN`] ([`check_meta_len`]) and blobs past
//! [`DiskStorage::MAX_BLOB_LEN`].

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

use bytes::BufMut;

use super::file::open_regular;
use super::{BLOCK, DiskStorage, corrupt, named_not_found};
use crate::codec::Cursor;

const MAGIC: &[u8; 8] = b"SCMETA01";
/// The largest record the format allows: its fixed fields, the hashes of a blob of
/// [`DiskStorage::MAX_BLOB_LEN`] and [`DiskStorage::MAX_META_LEN`] of metadata (48 MiB).
/// A bigger record file is damage, rejected before anything is allocated for it.
pub(super) const MAX_RECORD_LEN: u64 =
    8 * 5 + 32 * (DiskStorage::MAX_BLOB_LEN / BLOCK + 2) + DiskStorage::MAX_META_LEN as u64;

/// A parsed metadata record.
#[derive(Debug)]
pub(super) struct Record {
    pub(super) len: u64,
    pub(super) hashes: Vec<[u8; 32]>,
    pub(super) meta: Vec<u8>,
}

impl Record {
    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 5 + 32 * (self.hashes.len() + 2) + self.meta.len());
        out.put_slice(MAGIC);
        out.put_u64_le(self.len);
        out.put_u64_le(BLOCK);
        out.put_u64_le(self.hashes.len() as u64);
        let mut digest = blake3::Hasher::new();
        for h in &self.hashes {
            out.put_slice(h);
            digest.update(h);
        }
        out.put_slice(digest.finalize().as_bytes());
        out.put_u64_le(self.meta.len() as u64);
        out.put_slice(&self.meta);
        let check = blake3::hash(&out);
        out.put_slice(check.as_bytes());
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Record, &'static str> {
        if bytes.len() < 32 {
            return Err("record too short");
        }
        if bytes.len() as u64 > MAX_RECORD_LEN {
            return Err("record longer than the format allows");
        }
        let (body, check) = bytes.split_at(bytes.len() - 32);
        if blake3::hash(body).as_bytes() != check {
            return Err("record checksum mismatch");
        }
        let mut cur = Cursor::new(body, "record truncated");
        if cur.take(8)? != MAGIC {
            return Err("bad magic");
        }
        let len = cur.u64_le()?;
        if len > DiskStorage::MAX_BLOB_LEN {
            return Err("blob longer than the format allows");
        }
        if cur.u64_le()? != BLOCK {
            return Err("unsupported block size");
        }
        let n = cur.u64_le()?;
        if n != len.div_ceil(BLOCK) {
            return Err("block count does not match length");
        }
        let mut hashes = Vec::with_capacity(n.min(1 << 20) as usize);
        let mut digest = blake3::Hasher::new();
        for _ in 0..n {
            let h: [u8; 32] = cur.array()?;
            digest.update(&h);
            hashes.push(h);
        }
        if cur.take(32)? != digest.finalize().as_bytes() {
            return Err("content digest mismatch");
        }
        let m = cur.u64_le()?;
        if m > DiskStorage::MAX_META_LEN as u64 {
            return Err("metadata longer than the format allows");
        }
        let meta = cur
            .take(usize::try_from(m).map_err(|_| "metadata too long")?)?
            .to_vec();
        cur.finish("trailing bytes")?;
        Ok(Record { len, hashes, meta })
    }
}

/// Metadata longer than a record may hold is refused before anything is written.
pub(super) fn check_meta_len(meta: &[u8]) -> io::Result<()> {
    if meta.len() > DiskStorage::MAX_META_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} bytes of metadata: disk storage allows {}",
                meta.len(),
                DiskStorage::MAX_META_LEN
            ),
        ));
    }
    Ok(())
}

impl DiskStorage {
    pub(super) fn read_record(&self, name: &str) -> io::Result<Record> {
        self.read_record_with_id(name).map(|(record, ..)| record)
    }

    /// `name`'s record, the file it was read from (still open) and that file's inode. (The
    /// same system calls as `fs::read`, which also takes the metadata to size its buffer.)
    /// Only a regular file is read (see `open_regular`), and only if it is no longer than a
    /// record can be: a bigger one (a sparse 100 GB file, say) is damage, found before any
    /// allocation; reading stops past that size too, should the file grow meanwhile.
    pub(super) fn read_record_with_id(&self, name: &str) -> io::Result<(Record, File, u64)> {
        let path = self.inner.meta_path(name);
        let (file, md) = open_regular(&path).map_err(|e| named_not_found(e, name))?;
        let too_long = |len: u64| {
            corrupt(
                &path,
                format!("record of {len} bytes, longer than the format allows ({MAX_RECORD_LEN})"),
            )
        };
        if md.len() > MAX_RECORD_LEN {
            return Err(too_long(md.len()));
        }
        let mut bytes = Vec::with_capacity(md.len() as usize);
        io::Read::read_to_end(&mut io::Read::take(&file, MAX_RECORD_LEN + 1), &mut bytes)?;
        if bytes.len() as u64 > MAX_RECORD_LEN {
            return Err(too_long(bytes.len() as u64));
        }
        let record = Record::decode(&bytes).map_err(|reason| corrupt(&path, reason))?;
        Ok((record, file, md.ino()))
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File};
    use std::io;

    use super::super::test_support::commit_bytes;
    use super::*;
    use crate::storage::{BlobWriter, Storage};

    #[test]
    fn record_round_trip_and_tamper() {
        let rec = Record {
            len: BLOCK + 5,
            hashes: vec![[1; 32], [2; 32]],
            meta: b"hello".to_vec(),
        };
        let bytes = rec.encode();
        let back = Record::decode(&bytes).unwrap();
        assert_eq!(back.len, rec.len);
        assert_eq!(back.hashes, rec.hashes);
        assert_eq!(back.meta, rec.meta);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Record::decode(&bad).is_err(), "flip at {i} accepted");
        }
        assert!(Record::decode(&bytes[..bytes.len() - 1]).is_err());
    }

    /// Records shorter than their checksum are damage, never a panic (a mutant that let
    /// them through to `split_at` survived every other test).
    #[test]
    fn records_shorter_than_a_checksum_are_damage() {
        for n in 0..=32 {
            assert!(Record::decode(&vec![0; n]).is_err(), "{n} bytes accepted");
        }
        // A body that is empty but correctly checksummed is still no record.
        assert!(Record::decode(blake3::hash(b"").as_bytes()).is_err());
    }

    /// The format's limits: metadata up to `MAX_META_LEN` round-trips, one byte more is
    /// refused by the writer and by the decoder; a blob longer than `MAX_BLOB_LEN` is refused
    /// by both too; a record file longer than any record can be is damage, unread.
    #[test]
    fn record_limits() {
        let max = DiskStorage::MAX_META_LEN;
        let at_max = Record {
            len: 1,
            hashes: vec![[3; 32]],
            meta: vec![1; max],
        };
        assert_eq!(Record::decode(&at_max.encode()).unwrap().meta.len(), max);
        let over = Record {
            meta: vec![1; max + 1],
            ..at_max
        };
        assert!(Record::decode(&over.encode()).is_err());
        // A claimed length past the limit, in a record otherwise well formed.
        let mut body = Vec::new();
        body.extend_from_slice(MAGIC);
        let len = DiskStorage::MAX_BLOB_LEN + 1;
        body.extend_from_slice(&len.to_le_bytes());
        body.extend_from_slice(&BLOCK.to_le_bytes());
        body.extend_from_slice(&len.div_ceil(BLOCK).to_le_bytes());
        let check = blake3::hash(&body);
        body.extend_from_slice(check.as_bytes());
        assert_eq!(
            Record::decode(&body).unwrap_err(),
            "blob longer than the format allows"
        );

        let dir = tempfile::tempdir().unwrap();
        let s = DiskStorage::open(dir.path()).unwrap();
        let w = s.create("big-meta").unwrap();
        let err = w.commit(vec![0; max + 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        commit_bytes(&s, "blob", b"abc");
        let err = s.set_meta("blob", &vec![0; max + 1]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        s.set_meta("blob", &vec![0; max]).unwrap();
        assert_eq!(s.info("blob").unwrap().meta.len(), max);

        let mut w = s.create_writer("huge").unwrap();
        w.len = DiskStorage::MAX_BLOB_LEN - 3;
        let err = w.write(b"four").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        w.write(b"3by").unwrap();

        // The longest record the format allows (the longest blob, the most metadata) is read;
        // one byte more is damage, found from its size.
        let longest = Record {
            len: DiskStorage::MAX_BLOB_LEN,
            hashes: vec![[5; 32]; (DiskStorage::MAX_BLOB_LEN / BLOCK) as usize],
            meta: vec![2; max],
        }
        .encode();
        assert_eq!(longest.len() as u64, MAX_RECORD_LEN);
        fs::write(s.inner.meta_path("blob"), &longest).unwrap();
        drop(longest);
        let info = s.info("blob").unwrap();
        assert_eq!(
            (info.len, info.meta.len()),
            (DiskStorage::MAX_BLOB_LEN, max)
        );
        File::options()
            .write(true)
            .open(s.inner.meta_path("blob"))
            .unwrap()
            .set_len(MAX_RECORD_LEN + 1)
            .unwrap();
        let err = s.info("blob").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(
            err.to_string().contains("longer than the format allows"),
            "{err}"
        );
    }
}
