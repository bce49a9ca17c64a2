//! The few nfnetlink_queue messages castor exchanges with the kernel,
//! encoded and parsed by hand (see the module doc of [`super`] for why no
//! crate is used).
//!
//! ```text
//! nlmsghdr (16 B, host order) | nfgenmsg (4 B: family, version, res_id BE) | nlattr* (4 B header + payload, 4-aligned)
//! ```
//!
//! Every length read from the kernel is checked against what is left of
//! the buffer before anything is sliced; a malformed message is an error
//! naming the offending value, never a panic.

use libc::{NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG, NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT_BATCH};

pub const NLMSG_HDRLEN: usize = 16;
const NFGEN_LEN: usize = 4;
const NLA_HDRLEN: usize = 4;
/// Flags in `nla_type` that are not part of the type.
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

/// Netfilter verdicts (`NF_DROP`, `NF_ACCEPT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Drop = 0,
    Accept = 1,
}

/// A malformed message from the kernel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsgError {
    #[error("netlink message length {len} at offset {off} is outside 16..={left} (bytes left)")]
    BadNlmsgLen { off: usize, len: usize, left: usize },
    #[error("nfnetlink message of {0} bytes is shorter than its 4-byte nfgenmsg header")]
    ShortNfgen(usize),
    #[error("netlink attribute length {len} is outside 4..={left} (bytes left)")]
    BadAttrLen { len: usize, left: usize },
    #[error("NFQA_PACKET_HDR of {0} bytes (need 7)")]
    ShortPacketHdr(usize),
    #[error("queued packet without NFQA_PACKET_HDR")]
    NoPacketHdr,
    #[error("NLMSG_ERROR of {0} bytes (need 4)")]
    ShortError(usize),
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one nfnetlink_queue request: header, nfgenmsg, attributes.
pub struct Builder {
    buf: Vec<u8>,
}

impl Builder {
    /// `msg` is an `NFQNL_MSG_*` type; `flags` the `NLM_F_*` flags.
    pub fn new(msg: i32, flags: u16, seq: u32, queue: u16) -> Builder {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, patched in finish
        let ty = ((NFNL_SUBSYS_QUEUE as u16) << 8) | msg as u16;
        buf.extend_from_slice(&ty.to_ne_bytes());
        buf.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // to the kernel
        buf.push(libc::AF_UNSPEC as u8);
        buf.push(libc::NFNETLINK_V0 as u8);
        buf.extend_from_slice(&queue.to_be_bytes());
        Builder { buf }
    }

    pub fn attr(mut self, ty: i32, payload: &[u8]) -> Builder {
        let len = (NLA_HDRLEN + payload.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&(ty as u16).to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// `NFQNL_CFG_CMD_BIND` of `queue` (acknowledged).
pub fn bind(seq: u32, queue: u16) -> Vec<u8> {
    // struct nfqnl_msg_config_cmd { u8 command; u8 pad; __be16 pf; }
    let cmd = [libc::NFQNL_CFG_CMD_BIND as u8, 0, 0, 0];
    Builder::new(NFQNL_MSG_CONFIG, libc::NLM_F_ACK as u16, seq, queue)
        .attr(libc::NFQA_CFG_CMD, &cmd)
        .finish()
}

/// Copy mode packet (first `range` bytes), queue length `maxlen`, and the
/// flags castor needs: fail-open OFF, so when the queue is full the kernel
/// drops packets instead of letting them out unheld (acknowledged).
pub fn configure(seq: u32, queue: u16, range: u32, maxlen: u32) -> Vec<u8> {
    // struct nfqnl_msg_config_params { __be32 copy_range; u8 copy_mode; } packed
    let mut params = [0u8; 5];
    params[..4].copy_from_slice(&range.to_be_bytes());
    params[4] = libc::NFQNL_COPY_PACKET as u8;
    Builder::new(NFQNL_MSG_CONFIG, libc::NLM_F_ACK as u16, seq, queue)
        .attr(libc::NFQA_CFG_PARAMS, &params)
        .attr(libc::NFQA_CFG_QUEUE_MAXLEN, &maxlen.to_be_bytes())
        // mask says which flags this message sets; value 0 clears them.
        .attr(
            libc::NFQA_CFG_MASK,
            &(libc::NFQA_CFG_F_FAIL_OPEN as u32).to_be_bytes(),
        )
        .attr(libc::NFQA_CFG_FLAGS, &0u32.to_be_bytes())
        .finish()
}

/// `NFQNL_MSG_VERDICT_BATCH`: `verdict` for every packet of `queue` with
/// id ≤ `id` (not acknowledged; a failure comes back as NLMSG_ERROR).
pub fn verdict_batch(seq: u32, queue: u16, verdict: Verdict, id: u32) -> Vec<u8> {
    // struct nfqnl_msg_verdict_hdr { __be32 verdict; __be32 id; }
    let mut hdr = [0u8; 8];
    hdr[..4].copy_from_slice(&(verdict as u32).to_be_bytes());
    hdr[4..].copy_from_slice(&id.to_be_bytes());
    Builder::new(NFQNL_MSG_VERDICT_BATCH, 0, seq, queue)
        .attr(libc::NFQA_VERDICT_HDR, &hdr)
        .finish()
}

/// One message from the kernel, as far as castor cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A queued packet: its id and link-layer protocol (ETH_P_IP...).
    Packet { id: u32, hw_protocol: u16 },
    /// NLMSG_ERROR: 0 is an acknowledgement, otherwise -errno.
    Error { seq: u32, errno: i32 },
    /// Anything else (NLMSG_DONE, NOOP, other subsystems): ignored.
    Other(u16),
}

/// Splits a datagram into messages and parses each one.
pub fn parse(mut buf: &[u8]) -> Result<Vec<Incoming>, MsgError> {
    let mut out = Vec::new();
    let mut off = 0;
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(MsgError::BadNlmsgLen {
                off,
                len,
                left: buf.len(),
            });
        }
        let ty = u16::from_ne_bytes(buf[4..6].try_into().unwrap());
        let seq = u32::from_ne_bytes(buf[8..12].try_into().unwrap());
        let body = &buf[NLMSG_HDRLEN..len];
        out.push(parse_one(ty, seq, body)?);
        let step = align4(len).min(buf.len());
        buf = &buf[step..];
        off += step;
    }
    Ok(out)
}

fn parse_one(ty: u16, seq: u32, body: &[u8]) -> Result<Incoming, MsgError> {
    if ty == libc::NLMSG_ERROR as u16 {
        if body.len() < 4 {
            return Err(MsgError::ShortError(body.len()));
        }
        let err = i32::from_ne_bytes(body[..4].try_into().unwrap());
        return Ok(Incoming::Error { seq, errno: -err });
    }
    let packet = ((NFNL_SUBSYS_QUEUE as u16) << 8) | NFQNL_MSG_PACKET as u16;
    if ty != packet {
        return Ok(Incoming::Other(ty));
    }
    if body.len() < NFGEN_LEN {
        return Err(MsgError::ShortNfgen(body.len()));
    }
    let mut attrs = &body[NFGEN_LEN..];
    while attrs.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes(attrs[..2].try_into().unwrap()) as usize;
        let aty = u16::from_ne_bytes(attrs[2..4].try_into().unwrap()) & NLA_TYPE_MASK;
        if len < NLA_HDRLEN || len > attrs.len() {
            return Err(MsgError::BadAttrLen {
                len,
                left: attrs.len(),
            });
        }
        let payload = &attrs[NLA_HDRLEN..len];
        if aty as i32 == libc::NFQA_PACKET_HDR {
            // struct nfqnl_msg_packet_hdr { __be32 packet_id; __be16 hw_protocol; u8 hook; } packed
            if payload.len() < 7 {
                return Err(MsgError::ShortPacketHdr(payload.len()));
            }
            return Ok(Incoming::Packet {
                id: u32::from_be_bytes(payload[..4].try_into().unwrap()),
                hw_protocol: u16::from_be_bytes(payload[4..6].try_into().unwrap()),
            });
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    Err(MsgError::NoPacketHdr)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A packet message as the kernel sends it: header, nfgenmsg, an
    /// unrelated attribute, then NFQA_PACKET_HDR.
    fn packet_msg(id: u32, proto: u16) -> Vec<u8> {
        let mut hdr = Vec::new();
        hdr.extend_from_slice(&id.to_be_bytes());
        hdr.extend_from_slice(&proto.to_be_bytes());
        hdr.push(0);
        let mut m = Builder::new(NFQNL_MSG_PACKET, 0, 0, 7)
            .attr(libc::NFQA_MARK, &1u32.to_be_bytes())
            .attr(libc::NFQA_PACKET_HDR, &hdr)
            .finish();
        // The kernel does not set NLM_F_REQUEST; irrelevant to parsing.
        m[6] = 0;
        m
    }

    #[test]
    fn parses_two_packets_in_one_datagram() {
        let mut d = packet_msg(5, 0x0800);
        d.extend(packet_msg(6, 0x86dd));
        assert_eq!(
            parse(&d).unwrap(),
            vec![
                Incoming::Packet {
                    id: 5,
                    hw_protocol: 0x0800
                },
                Incoming::Packet {
                    id: 6,
                    hw_protocol: 0x86dd
                }
            ]
        );
    }

    #[test]
    fn rejects_lengths_past_the_buffer() {
        let mut d = packet_msg(5, 0x0800);
        let n = d.len() as u32 + 4;
        d[..4].copy_from_slice(&n.to_ne_bytes());
        assert!(matches!(parse(&d), Err(MsgError::BadNlmsgLen { .. })));
        let mut d = packet_msg(5, 0x0800);
        d[..4].copy_from_slice(&8u32.to_ne_bytes());
        assert!(matches!(
            parse(&d),
            Err(MsgError::BadNlmsgLen { len: 8, .. })
        ));
        // An attribute claiming more than the message holds.
        let mut d = packet_msg(5, 0x0800);
        d[20..22].copy_from_slice(&200u16.to_ne_bytes());
        assert!(matches!(
            parse(&d),
            Err(MsgError::BadAttrLen { len: 200, .. })
        ));
        // A truncated packet header.
        let d = Builder::new(NFQNL_MSG_PACKET, 0, 0, 7)
            .attr(libc::NFQA_PACKET_HDR, &[0, 0, 0, 1])
            .finish();
        assert_eq!(parse(&d), Err(MsgError::ShortPacketHdr(4)));
        let d = Builder::new(NFQNL_MSG_PACKET, 0, 0, 7).finish();
        assert_eq!(parse(&d), Err(MsgError::NoPacketHdr));
    }

    #[test]
    fn parses_errors_and_acks() {
        let mut d = Vec::new();
        d.extend_from_slice(&36u32.to_ne_bytes());
        d.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
        d.extend_from_slice(&0u16.to_ne_bytes());
        d.extend_from_slice(&9u32.to_ne_bytes());
        d.extend_from_slice(&0u32.to_ne_bytes());
        d.extend_from_slice(&(-libc::EBUSY).to_ne_bytes());
        d.extend_from_slice(&[0; 16]); // the echoed request header
        assert_eq!(
            parse(&d).unwrap(),
            vec![Incoming::Error {
                seq: 9,
                errno: libc::EBUSY
            }]
        );
    }

    #[test]
    fn verdict_batch_layout() {
        let m = verdict_batch(3, 0x0102, Verdict::Accept, 0x0a0b0c0d);
        assert_eq!(m.len(), 16 + 4 + 4 + 8);
        assert_eq!(u32::from_ne_bytes(m[..4].try_into().unwrap()), 32);
        assert_eq!(
            u16::from_ne_bytes(m[4..6].try_into().unwrap()),
            (3 << 8) | 3
        );
        assert_eq!(&m[18..20], &[1, 2]); // res_id: queue, big-endian
        assert_eq!(&m[24..], &[0, 0, 0, 1, 0x0a, 0x0b, 0x0c, 0x0d]);
    }
}
