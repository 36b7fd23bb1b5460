//! The bounds-checked byte reader behind every binary parser (control
//! requests, sealed state files, swtpm blobs, migration blobs and pieces,
//! the device-state stream). Reads never panic and never allocate: a field
//! that runs past the end is an error naming the field.

use thiserror::Error;

/// A field ran past the end of the input.
#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
#[error("truncated at {what}: needs {need} bytes, {have} left")]
pub struct Truncated {
    pub what: &'static str,
    pub need: usize,
    pub have: usize,
}

/// Big-endian reads from a byte slice, front to back.
#[derive(Debug, Clone)]
pub struct ByteReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> ByteReader<'a> {
    pub fn new(buf: &'a [u8]) -> ByteReader<'a> {
        ByteReader { buf, pos: 0 }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.remaining() == 0
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Truncated> {
        let have = self.remaining();
        if n > have {
            return Err(Truncated {
                what,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], Truncated> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, Truncated> {
        Ok(self.array::<1>(what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, Truncated> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, Truncated> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, Truncated> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    /// A be16 length, then that many bytes.
    pub fn bytes_u16(&mut self, what: &'static str) -> Result<&'a [u8], Truncated> {
        let n = self.u16(what)?;
        self.take(usize::from(n), what)
    }

    /// A be32 length, then that many bytes.
    pub fn bytes_u32(&mut self, what: &'static str) -> Result<&'a [u8], Truncated> {
        let n = self.u32(what)?;
        self.take(n as usize, what)
    }

    /// Everything not yet consumed.
    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_in_order() {
        let b = [1, 0, 2, 0, 0, 0, 3, 0, 2, 9, 9, 7];
        let mut r = ByteReader::new(&b);
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u16("b").unwrap(), 2);
        assert_eq!(r.u32("c").unwrap(), 3);
        assert_eq!(r.bytes_u16("d").unwrap(), &[9, 9]);
        assert_eq!(r.position(), 11);
        assert_eq!(r.rest(), &[7]);
        assert!(r.is_empty());
    }

    #[test]
    fn truncated_names_the_field() {
        let mut r = ByteReader::new(&[0, 5, 1]);
        let e = r.bytes_u16("name").unwrap_err();
        assert_eq!(
            e,
            Truncated {
                what: "name",
                need: 5,
                have: 1
            }
        );
        assert!(ByteReader::new(&[]).u64("x").is_err());
        let mut r = ByteReader::new(&[0xff; 4]);
        assert!(r.bytes_u32("huge").is_err(), "no allocation, just an error");
    }
}
