//! The transmission phase: requests served one at a time, in order, with
//! simple replies.
//!
//! Checks, all made before any byte moves: the request magic (a wrong one
//! ends the connection: the stream cannot be resynchronised); the flags
//! each command may carry; lengths (`1..=max_request` for READ/WRITE, at
//! least 1 for TRIM/WRITE_ZEROES, 0 for FLUSH); and the range against the
//! export's size (EINVAL for reads and trims, ENOSPC for writes). A WRITE
//! whose payload is refused is still read off the socket when it is within
//! `max_request` (so the stream stays in step); an oversize one ends the
//! connection after its error reply.
//!
//! Replies of requests the client pipelined (more requests already wait in
//! the read-ahead) are queued and sent together before the server next
//! reads the socket ([`Conn::reply`]); a FLUSH or a FUA request first sends
//! the queued replies (it waits for the disk).

use std::time::Instant;

use super::conn::Conn;
use super::proto::*;
use super::{Export, NbdError, ServerConfig};
use crate::disk::log::LogError;
use crate::disk::pool;

/// Serves requests until the client disconnects, the server stops, or the
/// stream breaks. `Ok` for an orderly end (DISC or EOF between requests).
pub fn serve(
    conn: &mut Conn,
    export: &Export,
    cfg: &ServerConfig,
    stopping: &dyn Fn() -> bool,
) -> Result<(), NbdError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut reply: Vec<u8> = Vec::new();
    loop {
        let Some(req) = next_request(conn, cfg, stopping)? else {
            return conn.flush();
        };
        if req.magic != REQUEST_MAGIC {
            // The earlier requests were served: their replies still go out.
            conn.flush()?;
            return Err(NbdError::Protocol(format!(
                "request magic {:#x}, expected {REQUEST_MAGIC:#x}",
                req.magic
            )));
        }
        reply.clear();
        let deadline = Instant::now() + cfg.request_timeout;
        if req.kind == CMD_FLUSH || req.flags & CMD_FLAG_FUA != 0 {
            conn.flush()?;
        }
        match req.kind {
            CMD_DISC => return conn.flush(),
            CMD_READ => read(export, &req, cfg, &mut reply),
            CMD_WRITE => {
                if req.len > cfg.max_request {
                    simple_reply(&mut reply, EINVAL, req.cookie);
                    conn.send(&reply)?;
                    return Err(NbdError::Protocol(format!(
                        "WRITE of {} bytes, limit {}",
                        req.len, cfg.max_request
                    )));
                }
                payload_buf(&mut buf, req.len as usize);
                conn.read_exact_until(&mut buf, deadline, "write payload")?;
                let err = write(export, &req, &mut buf);
                simple_reply(&mut reply, err, req.cookie);
            }
            CMD_FLUSH => {
                let err = if req.flags != 0 || req.offset != 0 || req.len != 0 {
                    EINVAL
                } else {
                    status(export.log.flush())
                };
                simple_reply(&mut reply, err, req.cookie);
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                let err = zero(export, &req);
                simple_reply(&mut reply, err, req.cookie);
            }
            // CACHE, BLOCK_STATUS and the rest were never advertised.
            _ => simple_reply(&mut reply, EINVAL, req.cookie),
        }
        conn.reply(&reply)?;
    }
}

/// Waits for the next request header: indefinitely idle up to
/// `idle_timeout` (checking `stopping` between slices), then the rest of
/// the header within `request_timeout`. `None` on EOF between requests.
fn next_request(
    conn: &mut Conn,
    cfg: &ServerConfig,
    stopping: &dyn Fn() -> bool,
) -> Result<Option<Request>, NbdError> {
    let mut h = [0u8; REQUEST_LEN];
    let idle_end = Instant::now() + cfg.idle_timeout;
    let first = loop {
        if stopping() {
            return Ok(None);
        }
        let slice = (Instant::now() + cfg.poll_slice).min(idle_end);
        match conn.read_until(&mut h, slice) {
            Ok(0) => return Ok(None),
            Ok(n) => break n,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                if Instant::now() >= idle_end {
                    return Err(NbdError::Deadline {
                        what: "next request (idle)",
                        got: 0,
                        want: REQUEST_LEN,
                    });
                }
            }
            Err(source) => {
                return Err(NbdError::Io {
                    op: "request header",
                    source,
                })
            }
        }
    };
    if first < REQUEST_LEN {
        let deadline = Instant::now() + cfg.request_timeout;
        conn.read_exact_until(&mut h[first..], deadline, "request header")?;
    }
    Ok(Some(Request::decode(&h)))
}

fn in_range(export: &Export, req: &Request) -> bool {
    req.offset
        .checked_add(req.len as u64)
        .is_some_and(|end| end <= export.log.size())
}

fn status(r: Result<(), LogError>) -> u32 {
    match r {
        Ok(()) => 0,
        Err(LogError::Fenced { .. }) => ESHUTDOWN,
        Err(e) => {
            tracing::warn!("nbd: {e}");
            EIO
        }
    }
}

fn read(export: &Export, req: &Request, cfg: &ServerConfig, reply: &mut Vec<u8>) {
    let err = if req.flags & !CMD_FLAG_FUA != 0
        || req.len == 0
        || req.len > cfg.max_request
        || !in_range(export, req)
    {
        EINVAL
    } else {
        0
    };
    if err != 0 {
        return simple_reply(reply, err, req.cookie);
    }
    simple_reply(reply, 0, req.cookie);
    let at = reply.len();
    reply.resize(at + req.len as usize, 0);
    if let Err(e) = export.log.read(&mut reply[at..], req.offset) {
        tracing::warn!("nbd: {e}");
        reply.clear();
        simple_reply(reply, EIO, req.cookie);
    }
}

/// Makes `buf` `len` bytes long to receive a write's payload. A large
/// payload goes into a buffer from [`pool`] (the log may keep it as the
/// write's data, [`crate::disk::WriteLog::write_vec`]); growing the
/// connection's own buffer would zero it first.
fn payload_buf(buf: &mut Vec<u8>, len: usize) {
    if len > buf.capacity() && len >= pool::MIN_POOLED {
        pool::give(std::mem::replace(buf, pool::take(len)));
    } else {
        buf.resize(len, 0);
    }
}

fn write(export: &Export, req: &Request, data: &mut Vec<u8>) -> u32 {
    if req.flags & !CMD_FLAG_FUA != 0 || req.len == 0 {
        return EINVAL;
    }
    if !in_range(export, req) {
        return ENOSPC;
    }
    status(
        export
            .log
            .write_vec(req.offset, data, req.flags & CMD_FLAG_FUA != 0),
    )
}

fn zero(export: &Export, req: &Request) -> u32 {
    let trim = req.kind == CMD_TRIM;
    let allowed = if trim {
        CMD_FLAG_FUA
    } else {
        CMD_FLAG_FUA | CMD_FLAG_NO_HOLE
    };
    if req.flags & !allowed != 0 || req.len == 0 {
        return EINVAL;
    }
    if !in_range(export, req) {
        return if trim { EINVAL } else { ENOSPC };
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    status(export.log.zero(req.offset, req.len, trim, fua))
}
