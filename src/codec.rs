//! Reading the crate's little-endian binary records: one [`Cursor`] for every decoder (the
//! disk storage's metadata record, the cache's entry record).
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
