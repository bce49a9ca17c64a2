//! Typed payloads of the records (layouts in `docs/wire-format.md`).
//!
//! Encoders append to a send buffer; decoders take untrusted payloads through
//! [`Cursor`] and return [`PayloadError`] naming the field that was wrong.

use crate::transport::auth::Protection;
use crate::transport::record::{begin_record, finish_record, RecordKind};
use crate::transport::wire::{Cursor, PayloadError};

pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
/// Upper bound on a domain description string in the Hello.
pub const MAX_DESC: usize = 1024;
/// Pages records are closed once their payload passes this size, so a record
/// fits comfortably in socket buffers and receive slots.
pub const PAGES_RECORD_TARGET: usize = 256 << 10;
/// Bytes of one page entry before its payload: gfn u64, kind u8, len u16.
pub const PAGE_ENTRY_HEADER: usize = 11;

/// First record of a session, primary → backup.
#[derive(Debug, Clone, PartialEq)]
pub struct Hello {
    pub page_size: u32,
    pub pages: u64,
    pub nonce: [u8; NONCE_LEN],
    /// How records are protected after the handshake; the backup refuses
    /// a session whose protection differs from its own.
    pub protection: Protection,
    pub desc: String,
}

impl Hello {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.desc.len());
        v.extend_from_slice(&self.page_size.to_le_bytes());
        v.extend_from_slice(&self.pages.to_le_bytes());
        v.extend_from_slice(&self.nonce);
        v.push(self.protection as u8);
        v.extend_from_slice(&(self.desc.len() as u16).to_le_bytes());
        v.extend_from_slice(self.desc.as_bytes());
        v
    }

    pub fn decode(p: &[u8]) -> Result<Self, PayloadError> {
        let mut c = Cursor::new(p, "Hello");
        let page_size = c.u32()?;
        let pages = c.u64()?;
        let nonce = c.array()?;
        let p = c.u8()?;
        let protection =
            Protection::from_u8(p).ok_or_else(|| c.err(format!("unknown protection {p}")))?;
        let n = c.u16()? as usize;
        if n > MAX_DESC {
            return Err(c.err(format!("description of {n} bytes exceeds {MAX_DESC}")));
        }
        let desc = std::str::from_utf8(c.bytes(n)?)
            .map_err(|_| c.err("description is not UTF-8"))?
            .to_string();
        c.finish()?;
        Ok(Hello {
            page_size,
            pages,
            nonce,
            protection,
            desc,
        })
    }
}

/// Whether an epoch is the initial full copy (not a consistent checkpoint)
/// or a checkpoint the backup may commit.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochClass {
    /// Live pre-copy of all memory; applied in place, never committed.
    Seed = 0,
    Checkpoint = 1,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochBegin {
    pub class: EpochClass,
    /// Dirty pages harvested for this epoch (entries sent may be fewer:
    /// unchanged pages are not sent).
    pub dirty: u64,
}

impl EpochBegin {
    pub fn encode(&self) -> [u8; 9] {
        let mut b = [0u8; 9];
        b[0] = self.class as u8;
        b[1..9].copy_from_slice(&self.dirty.to_le_bytes());
        b
    }

    pub fn decode(p: &[u8]) -> Result<Self, PayloadError> {
        let mut c = Cursor::new(p, "EpochBegin");
        let class = match c.u8()? {
            0 => EpochClass::Seed,
            1 => EpochClass::Checkpoint,
            v => return Err(c.err(format!("unknown epoch class {v}"))),
        };
        let dirty = c.u64()?;
        c.finish()?;
        Ok(EpochBegin { class, dirty })
    }
}

/// Totals that let the backup prove it saw the whole epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EpochEnd {
    pub page_entries: u64,
    pub pages_records: u32,
    pub state_len: u32,
    /// DiskWrites records in the epoch (so a torn epoch loses them whole).
    pub disk_records: u32,
}

impl EpochEnd {
    pub fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&self.page_entries.to_le_bytes());
        b[8..12].copy_from_slice(&self.pages_records.to_le_bytes());
        b[12..16].copy_from_slice(&self.state_len.to_le_bytes());
        b[16..20].copy_from_slice(&self.disk_records.to_le_bytes());
        b
    }

    pub fn decode(p: &[u8]) -> Result<Self, PayloadError> {
        let mut c = Cursor::new(p, "EpochEnd");
        let e = EpochEnd {
            page_entries: c.u64()?,
            pages_records: c.u32()?,
            state_len: c.u32()?,
            disk_records: c.u32()?,
        };
        c.finish()?;
        Ok(e)
    }
}

/// One page entry of a Pages record, borrowed from the payload.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PageEntry<'a> {
    pub gfn: u64,
    pub kind: u8,
    pub payload: &'a [u8],
}

/// Iterates the entries of an untrusted Pages payload: `count u32` then
/// `count` × (gfn u64, kind u8, len u16, payload). Yields an error (once) for
/// a malformed payload, including a count that disagrees with the bytes.
pub fn parse_pages(p: &[u8]) -> Result<(u32, PagesIter<'_>), PayloadError> {
    let mut c = Cursor::new(p, "Pages");
    let count = c.u32()?;
    Ok((count, PagesIter { c, left: count }))
}

pub struct PagesIter<'a> {
    c: Cursor<'a>,
    left: u32,
}

impl<'a> Iterator for PagesIter<'a> {
    type Item = Result<PageEntry<'a>, PayloadError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return match self.c.finish() {
                Ok(()) => None,
                Err(e) => {
                    // Report trailing bytes once, then stop.
                    self.c = Cursor::new(&[], "Pages");
                    Some(Err(e))
                }
            };
        }
        self.left -= 1;
        let r = (|| {
            let gfn = self.c.u64()?;
            let kind = self.c.u8()?;
            let len = self.c.u16()? as usize;
            let payload = self.c.bytes(len)?;
            Ok(PageEntry { gfn, kind, payload })
        })();
        if r.is_err() {
            self.left = 0;
            self.c = Cursor::new(&[], "Pages");
        }
        Some(r)
    }
}

/// Builds Pages records for one epoch directly in a send buffer.
pub struct PagesWriter {
    epoch: u64,
    open: Option<(usize, usize)>, // (record start, count offset)
    count: u32,
    /// Pages records closed so far.
    pub records: u32,
    /// Page entries written so far.
    pub entries: u64,
}

impl PagesWriter {
    pub fn new(epoch: u64) -> Self {
        PagesWriter {
            epoch,
            open: None,
            count: 0,
            records: 0,
            entries: 0,
        }
    }

    /// Appends an entry whose payload the closure writes into `out`. The
    /// closure returns the page kind, or `None` to drop the entry (e.g. an
    /// unchanged page), in which case everything it wrote is rolled back.
    pub fn push(
        &mut self,
        out: &mut Vec<u8>,
        gfn: u64,
        write: impl FnOnce(&mut Vec<u8>) -> Option<u8>,
    ) {
        if self.open.is_none() {
            let start = begin_record(out, RecordKind::Pages, self.epoch);
            let count_at = out.len();
            out.extend_from_slice(&0u32.to_le_bytes());
            self.open = Some((start, count_at));
            self.count = 0;
        }
        let at = out.len();
        out.extend_from_slice(&gfn.to_le_bytes());
        out.extend_from_slice(&[0, 0, 0]);
        let Some(kind) = write(out) else {
            out.truncate(at);
            return;
        };
        let len = out.len() - at - PAGE_ENTRY_HEADER;
        assert!(len <= u16::MAX as usize, "page payload {len} too long");
        out[at + 8] = kind;
        out[at + 9..at + 11].copy_from_slice(&(len as u16).to_le_bytes());
        self.count += 1;
        self.entries += 1;
        let (start, _) = self.open.expect("record opened above");
        if out.len() - start >= PAGES_RECORD_TARGET {
            self.close(out);
        }
    }

    /// Closes the open record, if any; an open record with no entries is
    /// removed. Call once at the end of the shard.
    pub fn close(&mut self, out: &mut Vec<u8>) {
        if let Some((start, count_at)) = self.open.take() {
            if self.count == 0 {
                out.truncate(start);
                return;
            }
            out[count_at..count_at + 4].copy_from_slice(&self.count.to_le_bytes());
            finish_record(out, start);
            self.records += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::record::RecordReader;

    #[test]
    fn hello_round_trip_and_limits() {
        let h = Hello {
            page_size: 4096,
            pages: 1 << 18,
            nonce: [5; 32],
            protection: Default::default(),
            desc: "sim:mem=1GiB".into(),
        };
        assert_eq!(Hello::decode(&h.encode()).unwrap(), h);
        let mut bad = h.encode();
        bad.push(0);
        assert!(Hello::decode(&bad).is_err());
        assert!(Hello::decode(&h.encode()[..10]).is_err());
    }

    #[test]
    fn pages_writer_splits_records_and_parses_back() {
        let mut out = Vec::new();
        let mut w = PagesWriter::new(9);
        for gfn in 0..200u64 {
            w.push(&mut out, gfn, |o| {
                if gfn % 7 == 3 {
                    o.extend_from_slice(b"dropped");
                    return None;
                }
                o.extend_from_slice(&[gfn as u8; 4000]);
                Some(6)
            });
        }
        w.close(&mut out);
        assert!(w.records >= 3);
        // Built for a sealed session: no CRC until a keyless reader needs one.
        assert!(matches!(
            RecordReader::new(&out[..]).next(),
            Err(crate::transport::record::RecordError::Checksum { got, .. }) if got != 0
        ));
        crate::transport::record::add_checksums(&mut out);
        let mut r = RecordReader::new(&out[..]);
        let mut got = Vec::new();
        for _ in 0..w.records {
            let rec = r.next().unwrap();
            assert_eq!(rec.epoch, 9);
            let (n, it) = parse_pages(rec.payload).unwrap();
            let before = got.len();
            for e in it {
                let e = e.unwrap();
                assert_eq!(e.payload, &[e.gfn as u8; 4000][..]);
                got.push(e.gfn);
            }
            assert_eq!(got.len() - before, n as usize);
        }
        assert!(matches!(
            r.next(),
            Err(crate::transport::record::RecordError::Eof)
        ));
        let want: Vec<u64> = (0..200).filter(|g| g % 7 != 3).collect();
        assert_eq!(got, want);
        assert_eq!(w.entries, 200 - 200 / 7 - 1);
    }

    #[test]
    fn pages_count_mismatch_is_an_error() {
        let mut p = 2u32.to_le_bytes().to_vec();
        p.extend_from_slice(&1u64.to_le_bytes());
        p.extend_from_slice(&[1, 0, 0]);
        let (_, it) = parse_pages(&p).unwrap();
        let v: Vec<_> = it.collect();
        assert!(v[0].is_ok());
        assert!(v[1].is_err());
        assert_eq!(v.len(), 2);
    }
}
