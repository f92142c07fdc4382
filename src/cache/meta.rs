//! The cache's record of an entry, stored as the blob's metadata.
//!
//! Format (little endian): magic `b"SCE1"`, created, finished, last access (u64 milliseconds
//! since the Unix epoch each), key length (u64) and key bytes, user metadata length (u64) and
//! bytes. `DiskStorage` checksums the whole record it stores.

use bytes::Bytes;

const MAGIC: &[u8; 4] = b"SCE1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryMeta {
    pub(crate) key: String,
    pub(crate) created: u64,
    pub(crate) finished: u64,
    pub(crate) last_access: u64,
    pub(crate) user: Bytes,
}

impl EntryMeta {
    pub(crate) fn encode(&self) -> Vec<u8> {
        Self::encode_parts(
            &self.key,
            self.created,
            self.finished,
            self.last_access,
            &self.user,
        )
    }

    /// Encodes a record without building an `EntryMeta` first.
    pub(crate) fn encode_parts(
        key: &str,
        created: u64,
        finished: u64,
        last_access: u64,
        user: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 8 * 5 + key.len() + user.len());
        out.extend_from_slice(MAGIC);
        for n in [created, finished, last_access] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        out.extend_from_slice(&(key.len() as u64).to_le_bytes());
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(&(user.len() as u64).to_le_bytes());
        out.extend_from_slice(user);
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<EntryMeta, &'static str> {
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8], &'static str> {
            if rest.len() < n {
                return Err("entry record truncated");
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        if take(4)? != MAGIC {
            return Err("not an entry record");
        }
        let mut num = || -> Result<u64, &'static str> {
            Ok(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")))
        };
        let (created, finished, last_access) = (num()?, num()?, num()?);
        let key_len = usize::try_from(num()?).map_err(|_| "key too long")?;
        let key = std::str::from_utf8(take(key_len)?)
            .map_err(|_| "key is not UTF-8")?
            .to_owned();
        let user_len = usize::try_from(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")))
            .map_err(|_| "metadata too long")?;
        let user = Bytes::copy_from_slice(take(user_len)?);
        if !rest.is_empty() {
            return Err("trailing bytes in entry record");
        }
        Ok(EntryMeta {
            key,
            created,
            finished,
            last_access,
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
            user: Bytes::from_static(b"text/plain"),
        };
        let bytes = m.encode();
        assert_eq!(EntryMeta::decode(&bytes).unwrap(), m);
        for cut in 0..bytes.len() {
            assert!(EntryMeta::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(EntryMeta::decode(b"nope").is_err());
    }
}
