//! The backup's half of the `uring` transport (see the module doc of
//! [`crate::transport::uring`]): the record stream read with READ_FIXED
//! straight into the registered ring, at the stream's position, as much as
//! has arrived and the ring has room for. Records are read from the ring
//! by the shared [`RingReader`]; the ring's room is the TCP receive window
//! the primary sees, so no credit goes back on the wire.

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::{new_ring, UringError};
use crate::transport::record::RecordError;
use crate::transport::ring::{MirrorRing, RingLink, RingReader};
use crate::transport::slots::{Announce, RingState};
use crate::transport::wire::HEADER_LEN;

/// The backup's receiving half over io_uring (see the module doc).
pub type UringSource = RingReader<UringLink>;

/// How the stream reaches the ring over io_uring.
///
/// Invariant: the ring registered as fixed buffer 0 is the one the
/// [`RingReader`] owning this link reads (it drops this link, and with it
/// the io_uring, before the ring).
pub struct UringLink {
    ring: IoUring,
    sock: TcpStream,
}

impl UringSource {
    /// Sets up the ring for `ann` on `sock`.
    pub fn new(sock: TcpStream, ann: &Announce) -> Result<Self, UringError> {
        let ring = new_ring()?;
        let mem = MirrorRing::new(ann.ring_len())?;
        let bufs = [libc::iovec {
            iov_base: mem.base().cast(),
            iov_len: mem.len(),
        }];
        // SAFETY: the ring memory is owned by the source and outlives the
        // io_uring (the link, holding it, drops before the mirror ring; and
        // pinned pages survive regardless).
        unsafe { ring.submitter().register_buffers(&bufs) }.map_err(|source| {
            UringError::Register {
                what: "the receive ring",
                source,
            }
        })?;
        ring.submitter()
            .register_files(&[sock.as_raw_fd()])
            .map_err(|source| UringError::Register {
                what: "the socket as a fixed file",
                source,
            })?;
        Ok(RingReader::over(UringLink { ring, sock }, mem, ann))
    }
}

impl UringLink {
    /// One READ_FIXED of up to `len` bytes into `ptr` (inside the
    /// registered ring); returns bytes read (0 at end of stream).
    fn read_fixed(&mut self, ptr: *mut u8, len: usize) -> io::Result<usize> {
        let e = opcode::ReadFixed::new(types::Fixed(0), ptr, len as u32, 0)
            .offset(u64::MAX)
            .build()
            .user_data(7);
        // SAFETY: ptr..ptr+len lies inside registered buffer 0 and in a
        // range no reader looks at until it has landed.
        unsafe { self.ring.submission().push(&e) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(e),
            }
            let next = self.ring.completion().next();
            if let Some(c) = next {
                let r = c.result();
                if r == -libc::EINTR || r == -libc::EAGAIN {
                    // SAFETY: as above.
                    unsafe { self.ring.submission().push(&e) }
                        .map_err(|_| io::Error::other("io_uring submission queue full"))?;
                    continue;
                }
                if r < 0 {
                    return Err(io::Error::from_raw_os_error(-r));
                }
                return Ok(r as usize);
            }
        }
    }
}

impl RingLink for UringLink {
    /// Frees the consumed slots locally: the primary never waits for them
    /// (the TCP window paces it).
    fn send_credit(&mut self, state: &mut RingState) -> Result<(), RecordError> {
        state.free_consumed();
        Ok(())
    }

    /// Reads as much of the stream as has arrived (at least one byte) into
    /// the ring at the stream's position, up to the ring's end or room.
    fn receive(
        &mut self,
        state: &mut RingState,
        ring: &MirrorRing,
        at_boundary: bool,
    ) -> Result<(), RecordError> {
        state.free_consumed();
        let (off, len) = state.landing_room();
        // The reader asks for bytes only while no whole record is in the
        // ring, and a record fits in the ring behind a partly read slot
        // (validated announcement), so there is room.
        debug_assert!(len > 0, "no room in the receive ring");
        // SAFETY: off + len <= ring length (landing_room), over bytes the
        // parser has consumed.
        let ptr = unsafe { ring.base().add(off) };
        let n = self.read_fixed(ptr, len)?;
        if n == 0 {
            return Err(if at_boundary {
                RecordError::Eof
            } else {
                RecordError::Truncated {
                    what: "record in the receive ring",
                    got: state.available() as usize,
                    want: HEADER_LEN,
                }
            });
        }
        state.on_landed(n);
        Ok(())
    }

    fn stream(&self) -> &TcpStream {
        &self.sock
    }
}
