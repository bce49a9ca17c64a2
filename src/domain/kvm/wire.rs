//! The saved-state wire format: typed, versioned records.
//!
//! Every record is
//!
//! ```text
//! magic   [u8; 4]   ASCII tag naming the record ("REGS", "SREG", ...)
//! version u16 LE    bumped on any change of the payload layout
//! length  u32 LE    payload bytes that follow
//! payload           fixed-width little-endian fields, in documented order
//! ```
//!
//! A domain's saved state is one `CKVM` record whose payload is a sequence
//! of records (see `state.rs`). Readers check the magic, the version and
//! that every field lies inside the record, and report errors naming the
//! record and the field; they never panic on hostile input. A record must
//! be consumed exactly: trailing bytes are an error, so a length mismatch
//! between writer and reader cannot go unnoticed.

use super::error::KvmError;

/// Bytes of a record header: magic, version, length.
pub const HEADER: usize = 10;

/// Appends one record to a buffer; the length is patched by [`Self::finish`].
pub struct RecordWriter<'a> {
    out: &'a mut Vec<u8>,
    len_at: usize,
}

impl<'a> RecordWriter<'a> {
    pub fn begin(out: &'a mut Vec<u8>, magic: [u8; 4], version: u16) -> Self {
        out.extend_from_slice(&magic);
        out.extend_from_slice(&version.to_le_bytes());
        let len_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        RecordWriter { out, len_at }
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.out.push(v);
        self
    }

    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.out.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.out.extend_from_slice(v);
        self
    }

    /// The buffer itself, for nesting records inside this one.
    pub fn inner(&mut self) -> &mut Vec<u8> {
        self.out
    }

    /// Patches the payload length into the header.
    pub fn finish(self) {
        let len = (self.out.len() - self.len_at - 4) as u32;
        self.out[self.len_at..self.len_at + 4].copy_from_slice(&len.to_le_bytes());
    }
}

/// One record split out of a buffer, not yet decoded.
#[derive(Debug, Clone, Copy)]
pub struct RawRecord<'a> {
    pub magic: [u8; 4],
    pub version: u16,
    pub payload: &'a [u8],
}

impl RawRecord<'_> {
    pub fn tag(&self) -> String {
        String::from_utf8_lossy(&self.magic).into_owned()
    }
}

/// Splits `bytes` into consecutive records. `what` names the enclosing
/// record in errors.
pub fn split<'a>(what: &'static str, mut bytes: &'a [u8]) -> Result<Vec<RawRecord<'a>>, KvmError> {
    let mut records = Vec::new();
    let mut offset = 0usize;
    while !bytes.is_empty() {
        if bytes.len() < HEADER {
            return Err(KvmError::State {
                record: what,
                reason: format!(
                    "{} trailing bytes at offset {offset} are too short for a record header",
                    bytes.len()
                ),
            });
        }
        let magic: [u8; 4] = bytes[..4].try_into().expect("4 bytes");
        let version = u16::from_le_bytes(bytes[4..6].try_into().expect("2 bytes"));
        let len = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
        let payload = bytes
            .get(HEADER..HEADER.saturating_add(len))
            .ok_or_else(|| KvmError::State {
                record: what,
                reason: format!(
                    "record {:?} at offset {offset} claims {len} payload bytes, only {} remain",
                    String::from_utf8_lossy(&magic),
                    bytes.len() - HEADER
                ),
            })?;
        records.push(RawRecord {
            magic,
            version,
            payload,
        });
        bytes = &bytes[HEADER + len..];
        offset += HEADER + len;
    }
    Ok(records)
}

/// Bounds-checked little-endian reader over one record's payload.
pub struct Reader<'a> {
    record: &'static str,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Checks the record's version against `version` and reads its payload.
    pub fn new(record: &'static str, raw: &RawRecord<'a>, version: u16) -> Result<Self, KvmError> {
        if raw.version != version {
            return Err(KvmError::State {
                record,
                reason: format!(
                    "version {} not supported (this build reads {version})",
                    raw.version
                ),
            });
        }
        Ok(Reader {
            record,
            buf: raw.payload,
            pos: 0,
        })
    }

    fn take(&mut self, field: &str, n: usize) -> Result<&'a [u8], KvmError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(KvmError::State {
                record: self.record,
                reason: format!(
                    "field {field}: needs {n} bytes at offset {}, payload is {} bytes",
                    self.pos,
                    self.buf.len()
                ),
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self, field: &str) -> Result<u8, KvmError> {
        Ok(self.take(field, 1)?[0])
    }

    pub fn u16(&mut self, field: &str) -> Result<u16, KvmError> {
        Ok(u16::from_le_bytes(
            self.take(field, 2)?.try_into().expect("2"),
        ))
    }

    pub fn u32(&mut self, field: &str) -> Result<u32, KvmError> {
        Ok(u32::from_le_bytes(
            self.take(field, 4)?.try_into().expect("4"),
        ))
    }

    pub fn u64(&mut self, field: &str) -> Result<u64, KvmError> {
        Ok(u64::from_le_bytes(
            self.take(field, 8)?.try_into().expect("8"),
        ))
    }

    pub fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], KvmError> {
        Ok(self.take(field, N)?.try_into().expect("N"))
    }

    /// An error about `field` of this record.
    pub fn invalid(&self, field: &str, reason: impl std::fmt::Display) -> KvmError {
        KvmError::State {
            record: self.record,
            reason: format!("field {field}: {reason}"),
        }
    }

    /// Fails unless the whole payload was consumed.
    pub fn finish(self) -> Result<(), KvmError> {
        if self.pos != self.buf.len() {
            return Err(KvmError::State {
                record: self.record,
                reason: format!(
                    "{} unexpected trailing bytes after {} decoded",
                    self.buf.len() - self.pos,
                    self.pos
                ),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_truncation() {
        let mut out = Vec::new();
        let mut w = RecordWriter::begin(&mut out, *b"TEST", 3);
        w.u8(1).u16(2).u32(3).u64(4);
        w.finish();
        let recs = split("outer", &out).unwrap();
        assert_eq!(recs.len(), 1);
        let mut r = Reader::new("TEST", &recs[0], 3).unwrap();
        assert_eq!(r.u8("a").unwrap(), 1);
        assert_eq!(r.u16("b").unwrap(), 2);
        assert_eq!(r.u32("c").unwrap(), 3);
        assert_eq!(r.u64("d").unwrap(), 4);
        r.finish().unwrap();
        assert!(Reader::new("TEST", &recs[0], 4).is_err());
        for cut in 0..out.len() {
            let e = split("outer", &out[..cut]);
            assert!(cut == 0 || e.is_err(), "cut {cut}");
        }
        let mut r = Reader::new("TEST", &recs[0], 3).unwrap();
        r.u64("first").unwrap();
        let e = r.u64("second").unwrap_err().to_string();
        assert!(e.contains("TEST") && e.contains("second"), "{e}");
    }
}
