//! The second heartbeat path: small authenticated UDP datagrams
//! ("beacons") from the primary to the backup, over a network path other
//! than the replication link.
//!
//! A backup that hears beacons does not suspect a primary whose
//! replication stream merely went quiet (a congested or cut replication
//! link): both paths must be silent past the heartbeat timeout. A stream
//! that *breaks* (EOF, reset) is still suspected at once, and the arbiter
//! decides, as without beacons.
//!
//! The primary sends beacons only while a protection session's sending
//! half lives ([`BeaconSink`] owns the sender): a primary that gave its
//! backup up stops beaconing, so the backup's detection is not delayed
//! past the primary's own decision.
//!
//! Wire layout, 64 bytes:
//! `"CSTB" | version u8 = 1 | 3 zero bytes | seq u64 LE | session nonce (32) |
//! HMAC-SHA256(psk, everything before)[..16]`.
//! The nonce is the primary's handshake nonce of the session, so beacons
//! of another session (or another pair sharing the key) never count; `seq`
//! grows within a session, so a replayed beacon never counts twice.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::ha::detector::Liveness;
use crate::transport::handshake::Psk;
use crate::transport::messages::NONCE_LEN;
use crate::transport::RecordSink;

const MAGIC: &[u8; 4] = b"CSTB";
const VERSION: u8 = 1;
const TAG_LEN: usize = 16;
/// Bytes of a beacon.
pub const LEN: usize = 4 + 4 + 8 + NONCE_LEN + TAG_LEN;

/// Why a datagram is not a beacon of the current session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BeaconError {
    #[error("{0} bytes, a beacon has {LEN}")]
    Length(usize),
    #[error("bad magic {0:02x?}")]
    Magic([u8; 4]),
    #[error("beacon version {0}, this castor speaks {VERSION}")]
    Version(u8),
    #[error("authentication tag does not match (wrong key, or altered)")]
    Tag,
    #[error("beacon of another session")]
    Session,
    #[error("sequence {got} not after {last} (replayed or reordered)")]
    Stale { got: u64, last: u64 },
}

/// Encodes beacon `seq` of the session named by `nonce`.
pub fn encode(psk: &Psk, nonce: &[u8; NONCE_LEN], seq: u64) -> [u8; LEN] {
    let mut b = [0u8; LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4] = VERSION;
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..16 + NONCE_LEN].copy_from_slice(nonce);
    let tag = psk.tag(&[&b[..LEN - TAG_LEN]]);
    b[LEN - TAG_LEN..].copy_from_slice(&tag[..TAG_LEN]);
    b
}

/// Checks a datagram and returns its sequence number. Every field is
/// checked before the tag; the tag before the session and sequence.
pub fn decode(psk: &Psk, d: &[u8]) -> Result<(u64, [u8; NONCE_LEN]), BeaconError> {
    if d.len() != LEN {
        return Err(BeaconError::Length(d.len()));
    }
    if &d[..4] != MAGIC {
        return Err(BeaconError::Magic(d[..4].try_into().expect("4 bytes")));
    }
    if d[4] != VERSION || d[5..8] != [0, 0, 0] {
        return Err(BeaconError::Version(d[4]));
    }
    if !psk.check_tag(&[&d[..LEN - TAG_LEN]], &d[LEN - TAG_LEN..]) {
        return Err(BeaconError::Tag);
    }
    let seq = u64::from_le_bytes(d[8..16].try_into().expect("8 bytes"));
    let nonce = d[16..16 + NONCE_LEN].try_into().expect("nonce length");
    Ok((seq, nonce))
}

/// Sends beacons every `every` until dropped.
pub struct Sender {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    /// Beacons for the session `nonce` to `to`.
    pub fn start(
        to: SocketAddr,
        psk: Psk,
        nonce: [u8; NONCE_LEN],
        every: Duration,
    ) -> io::Result<Sender> {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let sock = UdpSocket::bind(bind)?;
        sock.connect(to)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("castor-beacon".into())
            .spawn(move || {
                let mut seq = 0u64;
                while !st.load(Ordering::Acquire) {
                    seq += 1;
                    // A lost or refused datagram is what this path exists
                    // to tolerate: keep sending.
                    let _ = sock.send(&encode(&psk, &nonce, seq));
                    std::thread::sleep(every);
                }
            })?;
        Ok(Sender {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A session's sending half that beacons while it lives.
pub struct BeaconSink {
    pub inner: Box<dyn RecordSink>,
    _beacon: Sender,
}

impl BeaconSink {
    pub fn new(inner: Box<dyn RecordSink>, beacon: Sender) -> Self {
        BeaconSink {
            inner,
            _beacon: beacon,
        }
    }
}

impl RecordSink for BeaconSink {
    fn send(&mut self, bufs: &[&[u8]]) -> io::Result<()> {
        self.inner.send(bufs)
    }
    fn send_lent(&mut self, lent: Box<dyn crate::transport::Lent>) -> io::Result<()> {
        self.inner.send_lent(lent)
    }
    fn reclaim(&mut self) {
        self.inner.reclaim()
    }
    fn connection(&self) -> Option<std::net::TcpStream> {
        self.inner.connection()
    }
    fn kernel_kept_buffers(&self) -> bool {
        self.inner.kernel_kept_buffers()
    }
    fn on_failure(&mut self, report: crate::transport::link::FailureReport) {
        self.inner.on_failure(report)
    }
}

/// The backup's end: a socket whose beacons of the current session stamp
/// that session's [`Liveness`].
pub struct Receiver {
    sock: UdpSocket,
    current: Arc<Mutex<Option<Session>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Session {
    nonce: [u8; NONCE_LEN],
    last_seq: u64,
    live: Arc<Liveness>,
    heard: u64,
}

impl Receiver {
    /// Listens on `addr` (UDP).
    pub fn bind(addr: &str, psk: Psk) -> io::Result<Receiver> {
        let sock = UdpSocket::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("beacon socket on {addr}: {e}")))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let current: Arc<Mutex<Option<Session>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, cur, st) = (sock.try_clone()?, current.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("castor-beacon-rx".into())
            .spawn(move || {
                let mut buf = [0u8; LEN + 1];
                let mut said = false;
                while !st.load(Ordering::Acquire) {
                    let n = match s.recv_from(&mut buf) {
                        Ok((n, _)) => n,
                        Err(_) => continue,
                    };
                    let r = decode(&psk, &buf[..n]).and_then(|(seq, nonce)| {
                        let mut g = cur.lock().unwrap();
                        let Some(sess) = g.as_mut() else {
                            return Err(BeaconError::Session);
                        };
                        if sess.nonce != nonce {
                            return Err(BeaconError::Session);
                        }
                        if seq <= sess.last_seq {
                            return Err(BeaconError::Stale {
                                got: seq,
                                last: sess.last_seq,
                            });
                        }
                        sess.last_seq = seq;
                        sess.heard += 1;
                        sess.live.beat();
                        Ok(())
                    });
                    if let Err(e) = r {
                        // Name the first rejected kind once; a flood must
                        // not flood the log.
                        if !said && !matches!(e, BeaconError::Session | BeaconError::Stale { .. }) {
                            tracing::warn!("ignoring a datagram on the beacon socket: {e}");
                            said = true;
                        }
                    }
                }
            })?;
        Ok(Receiver {
            sock,
            current,
            stop,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// From now on, beacons of session `nonce` stamp `live`.
    pub fn follow(&self, nonce: [u8; NONCE_LEN], live: Arc<Liveness>) {
        *self.current.lock().unwrap() = Some(Session {
            nonce,
            last_seq: 0,
            live,
            heard: 0,
        });
    }

    /// Stops following; returns how many beacons the session contributed.
    pub fn unfollow(&self) -> u64 {
        self.current.lock().unwrap().take().map_or(0, |s| s.heard)
    }
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "beacon::Receiver({:?})", self.sock.local_addr().ok())
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_every_field_checked() {
        let psk = Psk::from_bytes(b"beacon-test-key-0123456789abcdef");
        let nonce = [7u8; NONCE_LEN];
        let b = encode(&psk, &nonce, 42);
        assert_eq!(decode(&psk, &b), Ok((42, nonce)));
        assert_eq!(
            decode(&psk, &b[..LEN - 1]),
            Err(BeaconError::Length(LEN - 1))
        );
        let other = Psk::from_bytes(b"another-key-0123456789abcdefghij");
        assert_eq!(decode(&other, &b), Err(BeaconError::Tag));
        for i in 0..LEN {
            let mut bad = b;
            bad[i] ^= 0x40;
            assert!(
                decode(&psk, &bad).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    /// Only authentic, fresh beacons of the followed session stamp it.
    #[test]
    fn receiver_counts_only_fresh_beacons_of_its_session() {
        let psk = Psk::from_bytes(b"beacon-test-key-0123456789abcdef");
        let rx = Receiver::bind("127.0.0.1:0", psk.clone()).unwrap();
        let to = rx.local_addr().unwrap();
        let live = Arc::new(Liveness::new(Duration::from_secs(1)));
        let nonce = [1u8; NONCE_LEN];
        rx.follow(nonce, live);
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let other = Psk::from_bytes(b"another-key-0123456789abcdefghij");
        s.send_to(&encode(&other, &nonce, 1), to).unwrap(); // wrong key
        s.send_to(&encode(&psk, &[2u8; NONCE_LEN], 1), to).unwrap(); // other session
        s.send_to(&encode(&psk, &nonce, 5), to).unwrap(); // counts
        s.send_to(&encode(&psk, &nonce, 5), to).unwrap(); // replay
        s.send_to(&encode(&psk, &nonce, 3), to).unwrap(); // older
        s.send_to(b"garbage", to).unwrap();
        s.send_to(&encode(&psk, &nonce, 6), to).unwrap(); // counts
                                                          // The last datagram (seq 6) is a valid one: once it was taken,
                                                          // everything before it was judged.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let last = rx
                .current
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, |s| s.last_seq);
            if last == 6 || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert_eq!(rx.unfollow(), 2, "only seq 5 and 6 may count");
    }
}
