//! The wire's vocabulary, below every protocol module: the record header's
//! constants and the bounds-checked reader for untrusted payloads.
//!
//! [`crate::transport::record`] frames records with these constants,
//! [`crate::transport::messages`] and [`crate::transport::slots`] parse
//! payloads with [`Cursor`]; keeping them here lets the slot protocol use
//! them without depending on the record reader (whose error type carries
//! slot errors).

/// Wire format version. Bumped on any incompatible change of a header or
/// payload layout, or of a field's meaning (5: the header's CRC field is 0
/// in an authenticated session, where version 4 sent a CRC under the MAC).
pub const WIRE_VERSION: u16 = 5;
pub const MAGIC: u32 = u32::from_le_bytes(*b"CSTR");
pub const HEADER_LEN: usize = 24;
/// Largest payload a reader accepts. Pages records are kept far below it.
pub const MAX_PAYLOAD: usize = 4 << 20;
/// Bytes of the tag after the payload of every record sent after the
/// handshake (`transport::auth`).
pub const TAG_LEN: usize = 16;

/// Bounds-checked little-endian reader over an untrusted payload.
pub struct Cursor<'a> {
    data: &'a [u8],
    pos: usize,
    what: &'static str,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("malformed {what}: {reason} at byte {pos}")]
pub struct PayloadError {
    pub what: &'static str,
    pub reason: String,
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    pub fn new(data: &'a [u8], what: &'static str) -> Self {
        Cursor { data, pos: 0, what }
    }

    pub fn err(&self, reason: impl Into<String>) -> PayloadError {
        PayloadError {
            what: self.what,
            reason: reason.into(),
            pos: self.pos,
        }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], PayloadError> {
        if self.data.len() - self.pos < n {
            return Err(self.err(format!(
                "needs {n} more bytes, only {} left",
                self.data.len() - self.pos
            )));
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, PayloadError> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, PayloadError> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, PayloadError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, PayloadError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], PayloadError> {
        Ok(self.bytes(N)?.try_into().unwrap())
    }
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    /// Errors unless every byte was consumed: trailing garbage is malformed.
    pub fn finish(&self) -> Result<(), PayloadError> {
        if self.remaining() != 0 {
            return Err(self.err(format!("{} trailing bytes", self.remaining())));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_bounds() {
        let mut c = Cursor::new(&[1, 0, 0], "test");
        assert_eq!(c.u16().unwrap(), 1);
        assert!(c.u32().is_err());
        assert!(c.finish().is_err());
        assert_eq!(c.u8().unwrap(), 0);
        assert!(c.finish().is_ok());
    }
}
