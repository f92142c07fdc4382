//! Reading the crate's little-endian binary records: one [`Cursor`] for every decoder (the
//! disk storage's metadata record, the cache's entry record); and the small text helpers the
//! crate's text files share (hex, random ids).
//!
//! Invariants: a read never panics and never reads past the input; every error is a
//! `&'static str` naming what is wrong (the record being decoded supplies the messages), so
//! decoders need no allocation to fail. Encoding needs no helper: `Vec<u8>` implements
//! [`bytes::BufMut`] (`put_slice`, `put_u64_le`).

/// Reads a byte slice front to back.
#[derive(Debug)]
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
    /// The error of every read past the end, e.g. "entry record truncated".
    truncated: &'static str,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `bytes`; a read past their end fails with `truncated`.
    pub(crate) fn new(bytes: &'a [u8], truncated: &'static str) -> Cursor<'a> {
        Cursor {
            rest: bytes,
            truncated,
        }
    }

    /// The next `n` bytes.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if self.rest.len() < n {
            return Err(self.truncated);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// The next `N` bytes, as an array (a hash, a magic number).
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], &'static str> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// The next 8 bytes, as a little-endian `u64`.
    pub(crate) fn u64_le(&mut self) -> Result<u64, &'static str> {
        self.array().map(u64::from_le_bytes)
    }

    /// Ends decoding: `trailing` if any byte is left unread.
    pub(crate) fn finish(self, trailing: &'static str) -> Result<(), &'static str> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(trailing)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_order_and_finishes_only_at_the_end() {
        let mut bytes = b"MAGI".to_vec();
        bytes.extend_from_slice(&0x0102_0304_0506_0708u64.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        let mut c = Cursor::new(&bytes, "truncated");
        assert_eq!(c.take(4), Ok(&b"MAGI"[..]));
        assert_eq!(c.u64_le(), Ok(0x0102_0304_0506_0708));
        assert_eq!(c.array::<2>(), Ok(*b"ab"));
        assert_eq!(c.take(1), Ok(&b"c"[..]));
        assert_eq!(c.finish("trailing"), Ok(()));
    }

    /// Every read past the end is the caller's truncation error, and consumes nothing.
    #[test]
    fn short_input_is_the_truncation_error() {
        let mut c = Cursor::new(b"1234567", "entry record truncated");
        assert_eq!(c.u64_le(), Err("entry record truncated"));
        assert_eq!(c.take(8), Err("entry record truncated"));
        assert_eq!(c.array::<32>(), Err("entry record truncated"));
        assert_eq!(c.take(7), Ok(&b"1234567"[..]));
        assert_eq!(c.take(0), Ok(&b""[..]));
        assert_eq!(c.take(1), Err("entry record truncated"));
    }

    #[test]
    fn trailing_bytes_fail_finish() {
        let mut c = Cursor::new(b"ab", "truncated");
        c.take(1).unwrap();
        assert_eq!(c.finish("trailing bytes"), Err("trailing bytes"));
    }
}

/// Each byte's two lowercase hex digits.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        pairs[i] = [HEX[i >> 4], HEX[i & 15]];
        i += 1;
    }
    pairs
};

/// Writes the lower-case hex of `bytes` into `out`, which must be twice as long: a table
/// look-up per byte (blob names are formatted twice per entry, on the insert path).
pub(crate) fn hex_into(bytes: &[u8], out: &mut [u8]) {
    debug_assert_eq!(out.len(), 2 * bytes.len());
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// Lower-case hex of `bytes` (ids in files, keys and hashes in the shared tier's text objects).
#[cfg_attr(not(any(unix, feature = "shared")), allow(dead_code))]
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0; 2 * bytes.len()];
    hex_into(bytes, &mut out);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// The bytes of hex digits (either case); `None` for an odd length or a non-digit.
#[cfg_attr(not(any(unix, feature = "shared")), allow(dead_code))]
pub(crate) fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// 128 bits no other caller gets: blake3 of OS-seeded hasher output (std's `RandomState`
/// keys come from the OS), the time, the process and `salt`. Unique, not secret.
#[cfg_attr(not(any(unix, feature = "shared")), allow(dead_code))]
pub(crate) fn random_id(salt: &[u8]) -> [u8; 16] {
    use std::hash::{BuildHasher, Hasher};
    let mut h = blake3::Hasher::new();
    for _ in 0..4 {
        let mut s = std::hash::RandomState::new().build_hasher();
        s.write(salt);
        h.update(&s.finish().to_le_bytes());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.update(&now.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(salt);
    let mut id = [0; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}

#[cfg(test)]
mod text_tests {
    #[test]
    fn hex_round_trips_and_refuses_bad_digits() {
        let bytes = [0u8, 1, 0xab, 0xff];
        assert_eq!(super::hex(&bytes), "0001abff");
        assert_eq!(super::unhex("0001ABff").unwrap(), bytes);
        for bad in ["0", "zz", "0g", "\u{e9}0"] {
            assert!(super::unhex(bad).is_none(), "{bad:?}");
        }
        assert_ne!(super::random_id(b"x"), super::random_id(b"x"));
    }
}
