//! The fixed newstyle handshake: option haggling until the client picks an
//! export (`NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`) or gives up.
//!
//! ```text
//! server: NBDMAGIC · IHAVEOPT · handshake flags u16 (FIXED_NEWSTYLE | NO_ZEROES)
//! client: client flags u32 (FIXED_NEWSTYLE required, NO_ZEROES optional, nothing else)
//! client: IHAVEOPT · option u32 · length u32 · data      (repeated)
//! server: REPLY_MAGIC · option u32 · reply type u32 · length u32 · data
//! ```
//!
//! Every option's length is bounded ([`MAX_OPTION_LEN`]) before its data
//! is read, and INFO/GO data must parse exactly. Unknown options get
//! `NBD_REP_ERR_UNSUP`; a malformed one `NBD_REP_ERR_INVALID`; an unknown
//! export `NBD_REP_ERR_UNKNOWN` (or, for EXPORT_NAME, which has no error
//! reply, a closed connection).

use std::time::Instant;

use super::conn::Conn;
use super::proto::*;
use super::{Export, NbdError};

/// What the handshake settled.
pub enum Outcome {
    /// Transmission with export `.0`.
    Serve(usize),
    /// The client aborted (or only listed exports).
    Abort,
}

/// Finds the export a client named: its own name, or "" when it is the
/// only one.
pub fn lookup(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() && exports.len() == 1 {
        return Some(0);
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

pub fn negotiate(
    conn: &mut Conn,
    exports: &[Export],
    max_request: u32,
    deadline: Instant,
) -> Result<Outcome, NbdError> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    conn.send(&hello)?;
    let mut b4 = [0u8; 4];
    conn.read_exact_until(&mut b4, deadline, "client flags")?;
    let cflags = u32::from_be_bytes(b4);
    if cflags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0
        || cflags & CLIENT_FIXED_NEWSTYLE == 0
    {
        return Err(NbdError::Handshake(format!(
            "client flags {cflags:#x}: need FIXED_NEWSTYLE and nothing but NO_ZEROES"
        )));
    }
    let no_zeroes = cflags & CLIENT_NO_ZEROES != 0;
    let mut out = Vec::new();
    loop {
        let mut h = [0u8; 16];
        conn.read_exact_until(&mut h, deadline, "option header")?;
        let magic = u64::from_be_bytes(h[0..8].try_into().expect("8"));
        let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        if magic != IHAVEOPT {
            return Err(NbdError::Handshake(format!(
                "option magic {magic:#x}, expected IHAVEOPT"
            )));
        }
        if len > MAX_OPTION_LEN {
            return Err(NbdError::Handshake(format!(
                "option {opt} with {len} bytes of data, limit {MAX_OPTION_LEN}"
            )));
        }
        let mut data = vec![0u8; len as usize];
        conn.read_exact_until(&mut data, deadline, "option data")?;
        out.clear();
        let done = match opt {
            OPT_EXPORT_NAME => {
                let Some(i) = lookup(exports, &data) else {
                    return Err(NbdError::Handshake(format!(
                        "EXPORT_NAME names no export: {:?}",
                        String::from_utf8_lossy(&data)
                    )));
                };
                out.extend_from_slice(&exports[i].log.size().to_be_bytes());
                out.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Some(Outcome::Serve(i))
            }
            OPT_ABORT => {
                option_reply(&mut out, opt, REP_ACK, &[]);
                Some(Outcome::Abort)
            }
            OPT_LIST if len != 0 => {
                option_reply(&mut out, opt, REP_ERR_INVALID, b"LIST takes no data");
                None
            }
            OPT_LIST => {
                for e in exports {
                    let mut d = (e.name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(e.name.as_bytes());
                    option_reply(&mut out, opt, REP_SERVER, &d);
                }
                option_reply(&mut out, opt, REP_ACK, &[]);
                None
            }
            OPT_INFO | OPT_GO => info_or_go(&mut out, opt, &data, exports, max_request),
            _ => {
                option_reply(&mut out, opt, REP_ERR_UNSUP, b"option not supported");
                None
            }
        };
        conn.send(&out)?;
        if let Some(o) = done {
            return Ok(o);
        }
    }
}

/// Parses INFO/GO data (`name_len u32, name, n u16, n × info u16`) and
/// replies; returns `Serve` when GO picked an export.
fn info_or_go(
    out: &mut Vec<u8>,
    opt: u32,
    data: &[u8],
    exports: &[Export],
    max_request: u32,
) -> Option<Outcome> {
    let Some((name, infos)) = parse_info(data) else {
        option_reply(out, opt, REP_ERR_INVALID, b"malformed INFO/GO data");
        return None;
    };
    let Some(i) = lookup(exports, name) else {
        option_reply(out, opt, REP_ERR_UNKNOWN, b"no such export");
        return None;
    };
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&exports[i].log.size().to_be_bytes());
    d.extend_from_slice(&EXPORT_FLAGS.to_be_bytes());
    option_reply(out, opt, REP_INFO, &d);
    if infos.contains(&INFO_BLOCK_SIZE) {
        let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for v in [1u32, 4096, max_request] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        option_reply(out, opt, REP_INFO, &d);
    }
    if infos.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(exports[i].name.as_bytes());
        option_reply(out, opt, REP_INFO, &d);
    }
    option_reply(out, opt, REP_ACK, &[]);
    (opt == OPT_GO).then_some(Outcome::Serve(i))
}

fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4usize.checked_add(name_len)?)?;
    let rest = &data[4 + name_len..];
    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = &rest[2..];
    if list.len() != n * 2 {
        return None;
    }
    let infos = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some((name, infos))
}
