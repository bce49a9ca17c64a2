//! The backup's half of the `uring` transport (see the module doc of
//! [`crate::transport::uring`]): chunk headers and bodies read with
//! READ_FIXED, bodies straight into their slot of the registered ring;
//! credits go back as `Credit` records on the control writer. Records are
//! read from the ring by the shared [`RingReader`].

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;

use io_uring::{opcode, types, IoUring};

use super::{new_ring, Region, UringError, CHUNK_HEADER};
use crate::transport::record::{send_record, RecordError, RecordKind};
use crate::transport::ring::{MirrorRing, RingLink, RingReader};
use crate::transport::seal::ControlWriter;
use crate::transport::slots::{Announce, ChunkTag, Placement, RingState, SlotError};

/// The backup's receiving half over io_uring (see the module doc).
pub type UringSource = RingReader<UringLink>;

/// How chunks reach the ring over io_uring, and how credits go back.
///
/// Invariant: the ring registered as fixed buffer 0 is the one the
/// [`RingReader`] owning this link reads (it drops this link, and with it
/// the io_uring, before the ring).
pub struct UringLink {
    ring: IoUring,
    sock: TcpStream,
    /// Chunk headers land here (fixed buffer 1).
    hdr: Region,
    writer: ControlWriter,
    /// The chunk whose body is arriving: placement and bytes landed.
    in_chunk: Option<(Placement, usize)>,
    seq: u32,
}

impl UringSource {
    /// Sets up the ring for `ann` on `sock`; credits go out on `writer`.
    pub fn new(sock: TcpStream, ann: &Announce, writer: ControlWriter) -> Result<Self, UringError> {
        let ring = new_ring()?;
        let mem = MirrorRing::new(ann.ring_len())?;
        let hdr = Region::new(4096, "the chunk header buffer")?;
        let bufs = [
            libc::iovec {
                iov_base: mem.base().cast(),
                iov_len: mem.len(),
            },
            hdr.iovec(),
        ];
        // SAFETY: both regions are owned by the source and outlive the ring
        // (the link, holding the ring, drops before the mirror ring... and
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
        let link = UringLink {
            ring,
            sock,
            hdr,
            writer,
            in_chunk: None,
            seq: 0,
        };
        Ok(RingReader::over(link, mem, ann))
    }
}

impl UringLink {
    /// One READ_FIXED of up to `len` bytes into `ptr` (inside fixed buffer
    /// `idx`); returns bytes read (0 at end of stream).
    fn read_fixed(&mut self, ptr: *mut u8, len: usize, idx: u16) -> io::Result<usize> {
        let e = opcode::ReadFixed::new(types::Fixed(0), ptr, len as u32, idx)
            .offset(u64::MAX)
            .build()
            .user_data(7);
        // SAFETY: ptr..ptr+len lies inside registered buffer `idx` and in a
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

    /// Reads the next chunk header and has `state` accept its chunk.
    fn next_chunk(
        &mut self,
        state: &RingState,
        at_boundary: bool,
    ) -> Result<Placement, RecordError> {
        let mut got = 0;
        while got < CHUNK_HEADER {
            // SAFETY: within the 4096-byte header region.
            let ptr = unsafe { self.hdr.ptr.add(got) };
            let n = self.read_fixed(ptr, CHUNK_HEADER - got, 1)?;
            if n == 0 {
                return Err(if got == 0 && at_boundary {
                    RecordError::Eof
                } else {
                    RecordError::Truncated {
                        what: "chunk header",
                        got,
                        want: CHUNK_HEADER,
                    }
                });
            }
            got += n;
        }
        // SAFETY: CHUNK_HEADER bytes just landed in the header region.
        let h = unsafe { std::slice::from_raw_parts(self.hdr.ptr, CHUNK_HEADER) };
        let tag = u32::from_le_bytes(h[0..4].try_into().unwrap());
        let seq = u32::from_le_bytes(h[4..8].try_into().unwrap());
        if seq != self.seq {
            return Err(SlotError::ChunkSequence {
                got: seq,
                want: self.seq,
            }
            .into());
        }
        self.seq = self.seq.wrapping_add(1);
        let p = state.on_chunk(tag)?;
        debug_assert_eq!(ChunkTag::decode(tag), p.tag);
        Ok(p)
    }
}

impl RingLink for UringLink {
    fn send_credit(&mut self, state: &mut RingState) -> Result<(), RecordError> {
        if let Some(c) = state.take_credit() {
            let mut w = self.writer.lock().unwrap();
            send_record(&mut *w, RecordKind::Credit, 0, &c.encode())?;
        }
        Ok(())
    }

    /// Receives more bytes into the ring (one header or one body read).
    fn receive(
        &mut self,
        state: &mut RingState,
        ring: &MirrorRing,
        at_boundary: bool,
    ) -> Result<(), RecordError> {
        let (p, landed) = match self.in_chunk {
            Some(x) => x,
            None => (self.next_chunk(state, at_boundary)?, 0),
        };
        // SAFETY: the placement was accepted by RingState: inside the first
        // mapping, over bytes the parser has consumed and credited.
        let ptr = unsafe { ring.base().add(p.ring_offset + landed) };
        let n = self.read_fixed(ptr, p.len - landed, 0)?;
        if n == 0 {
            return Err(RecordError::Truncated {
                what: "chunk body",
                got: landed,
                want: p.len,
            });
        }
        state.on_landed(n);
        self.in_chunk = (landed + n < p.len).then_some((p, landed + n));
        Ok(())
    }

    fn stream(&self) -> &TcpStream {
        &self.sock
    }
}
