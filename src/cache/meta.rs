//! The cache's record of an entry, stored as the blob's metadata.
//!
//! Format (little endian): magic `b"SCE2"`, created, finished, last access (u64 milliseconds
//! since the Unix epoch each), the entry's own time to live (u64 milliseconds, 0 = none), key
//! length (u64) and key bytes, user metadata length (u64) and bytes. Records written before
//! per-entry expiry (magic `b"SCE1"`, no time-to-live field) still decode, with none.
//! `DiskStorage` checksums the whole record it stores.

use bytes::{BufMut, Bytes};

use crate::codec::Cursor;

const MAGIC: &[u8; 4] = b"SCE2";
/// The format before per-entry expiry: no time-to-live field.
const MAGIC_V1: &[u8; 4] = b"SCE1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryMeta {
    pub(crate) key: String,
    pub(crate) created: u64,
    pub(crate) finished: u64,
    pub(crate) last_access: u64,
    /// The entry's own time to live in milliseconds, counted from `finished`; 0 = none.
    pub(crate) ttl_ms: u64,
    pub(crate) user: Bytes,
}

impl EntryMeta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Self::encode_parts(
            &self.key,
            [self.created, self.finished, self.last_access, self.ttl_ms],
            &self.user,
        )
    }

    /// Encodes a record without building an `EntryMeta` first; `times` are created,
    /// finished, last access and time to live, in the record's order.
    pub(crate) fn encode_parts(key: &str, times: [u64; 4], user: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * 6 + key.len() + user.len());
        out.put_slice(MAGIC);
        for n in times {
            out.put_u64_le(n);
        }
        out.put_u64_le(key.len() as u64);
        out.put_slice(key.as_bytes());
        out.put_u64_le(user.len() as u64);
        out.put_slice(user);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<EntryMeta, &'static str> {
        let mut c = Cursor::new(bytes, "entry record truncated");
        let with_ttl = match &c.array::<4>()? {
            MAGIC => true,
            MAGIC_V1 => false,
            _ => return Err("not an entry record"),
        };
        let (created, finished, last_access) = (c.u64_le()?, c.u64_le()?, c.u64_le()?);
        let ttl_ms = if with_ttl { c.u64_le()? } else { 0 };
        let key_len = usize::try_from(c.u64_le()?).map_err(|_| "key too long")?;
        let key = std::str::from_utf8(c.take(key_len)?)
            .map_err(|_| "key is not UTF-8")?
            .to_owned();
        let user_len = usize::try_from(c.u64_le()?).map_err(|_| "metadata too long")?;
        let user = Bytes::copy_from_slice(c.take(user_len)?);
        c.finish("trailing bytes in entry record")?;
        Ok(EntryMeta {
            key,
            created,
            finished,
            last_access,
            ttl_ms,
            user,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reject_garbage() {
        let m = EntryMeta {
            key: "a\0/../ключ".into(),
            created: 1,
            finished: 2,
            last_access: 3,
            ttl_ms: 4,
            user: Bytes::from_static(b"text/plain"),
        };
        let bytes = m.encode();
        assert_eq!(EntryMeta::decode(&bytes).unwrap(), m);
        for cut in 0..bytes.len() {
            assert!(EntryMeta::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert_eq!(
            EntryMeta::decode(&long),
            Err("trailing bytes in entry record")
        );
        assert!(EntryMeta::decode(b"nope").is_err());
    }

    /// Directories written before per-entry expiry keep their entries (with no time to live
    /// of their own). The bytes are an `SCE1` record as that version wrote it.
    #[test]
    fn records_without_time_to_live_still_decode() {
        let mut v1 = b"SCE1".to_vec();
        for n in [10u64, 20, 30, 3] {
            v1.extend_from_slice(&n.to_le_bytes());
        }
        v1.extend_from_slice(b"key");
        v1.extend_from_slice(&2u64.to_le_bytes());
        v1.extend_from_slice(b"md");
        let m = EntryMeta::decode(&v1).unwrap();
        assert_eq!(
            (
                m.key.as_str(),
                m.created,
                m.finished,
                m.last_access,
                m.ttl_ms
            ),
            ("key", 10, 20, 30, 0)
        );
        assert_eq!(&m.user[..], b"md");
    }
}
