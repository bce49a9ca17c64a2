//! The primary's return path on the session's TCP connection, for the
//! slot-ring transports: acknowledgements and heartbeats pass through to
//! the ack thread, `Credit` records (uring) are taken out and handed to the
//! sink through [`CreditShared`].

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use crate::transport::record::{write_record, RecordError, RecordKind, RecordReader};
use crate::transport::slots::Credit;

/// The primary's return path for non-tcp transports.
pub type ReturnPath = RecordReader<Box<dyn Read + Send>>;

/// Credits and end-of-stream handed from the return path to the sink.
#[derive(Default)]
pub struct CreditShared {
    m: Mutex<CreditQueue>,
    cv: Condvar,
}

#[derive(Default)]
struct CreditQueue {
    credits: VecDeque<Credit>,
    /// Why the return path ended, once it has.
    closed: Option<String>,
}

/// Why [`CreditShared::wait`] returned without a credit.
#[derive(Debug, PartialEq, Eq)]
pub enum CreditWait {
    /// The return path ended, for this reason.
    Closed(String),
    /// The deadline passed.
    TimedOut,
}

impl CreditShared {
    fn close(&self, why: String) {
        let mut g = self.m.lock().unwrap();
        g.closed.get_or_insert(why);
        self.cv.notify_all();
    }

    fn push(&self, c: Credit) {
        let mut g = self.m.lock().unwrap();
        g.credits.push_back(c);
        self.cv.notify_all();
    }

    /// Every credit queued so far, oldest first.
    pub fn take(&self) -> Vec<Credit> {
        self.m.lock().unwrap().credits.drain(..).collect()
    }

    /// Blocks until at least one credit is queued (then returns without
    /// taking it), the return path has closed, or `deadline` passes.
    pub fn wait(&self, deadline: Instant) -> Result<(), CreditWait> {
        let mut g = self.m.lock().unwrap();
        while g.credits.is_empty() {
            if let Some(why) = &g.closed {
                return Err(CreditWait::Closed(why.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(CreditWait::TimedOut);
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
        Ok(())
    }
}

/// The primary's return path: reads the backup's records, applies `Credit`
/// records to the sink's queue and passes every other record on unchanged
/// (re-framed) to whoever reads it (the primary's ack thread).
pub struct CreditFilter {
    inner: RecordReader<TcpStream>,
    /// None: credits do not travel on this path (rdma, uring), and one is
    /// an error.
    shared: Option<Arc<CreditShared>>,
    out: Vec<u8>,
    pos: usize,
}

impl CreditFilter {
    pub fn new(inner: RecordReader<TcpStream>, shared: Arc<CreditShared>) -> Self {
        CreditFilter {
            inner,
            shared: Some(shared),
            out: Vec::new(),
            pos: 0,
        }
    }

    /// A return path on which a `Credit` record is a protocol error.
    pub fn passthrough(inner: RecordReader<TcpStream>) -> Self {
        CreditFilter {
            inner,
            shared: None,
            out: Vec::new(),
            pos: 0,
        }
    }

    fn close(&self, why: String) {
        if let Some(s) = &self.shared {
            s.close(why);
        }
    }
}

impl Read for CreditFilter {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            match self.inner.next() {
                Ok(rec) if rec.kind == RecordKind::Credit => {
                    match (Credit::decode(rec.payload), &self.shared) {
                        (Ok(c), Some(sh)) => sh.push(c),
                        (Ok(_), None) => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "backup sent a Credit record, which this session's transport never uses \
                                 (rdma credits travel by RDMA SEND, uring has none: \
                                 are both ends the same castor version?)",
                            ))
                        }
                        (Err(e), _) => {
                            let msg = format!("malformed credit from the backup: {e}");
                            self.close(msg.clone());
                            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
                        }
                    }
                }
                Ok(rec) => {
                    self.out.clear();
                    self.pos = 0;
                    write_record(&mut self.out, rec.kind, rec.epoch, rec.payload);
                }
                Err(RecordError::Eof) => {
                    self.close("backup closed the connection".into());
                    return Ok(0);
                }
                Err(e) => {
                    let msg = e.to_string();
                    self.close(msg.clone());
                    return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
                }
            }
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
