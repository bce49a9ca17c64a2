//! The primary's return path on the session's TCP connection, for the
//! slot-ring transports: acknowledgements and heartbeats pass through to
//! the ack thread; a `Credit` record is refused (rdma credits travel by
//! RDMA SEND, uring has none: TCP's window paces it).

use std::io::{self, Read};
use std::net::TcpStream;

use crate::transport::record::{write_record, RecordError, RecordKind, RecordReader};

/// The primary's return path for non-tcp transports.
pub type ReturnPath = RecordReader<Box<dyn Read + Send>>;

/// The primary's return path: reads the backup's records and passes every
/// one on unchanged (re-framed) to whoever reads it (the primary's ack
/// thread), except a `Credit` record, which is a protocol error.
pub struct CreditFilter {
    inner: RecordReader<TcpStream>,
    out: Vec<u8>,
    pos: usize,
}

impl CreditFilter {
    /// A return path on which a `Credit` record is a protocol error.
    pub fn passthrough(inner: RecordReader<TcpStream>) -> Self {
        CreditFilter {
            inner,
            out: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for CreditFilter {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            match self.inner.next() {
                Ok(rec) if rec.kind == RecordKind::Credit => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "backup sent a Credit record, which this session's transport never uses \
                         (rdma credits travel by RDMA SEND, uring has none: \
                         are both ends the same castor version?)",
                    ))
                }
                Ok(rec) => {
                    self.out.clear();
                    self.pos = 0;
                    write_record(&mut self.out, rec.kind, rec.epoch, rec.payload);
                }
                Err(RecordError::Eof) => return Ok(0),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())),
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
