//! ARP hold for a bridge port (a Xen vif or veth enslaved to a bridge).
//!
//! On this kernel ARP cannot go to NFQUEUE: nftables has no `queue`
//! statement (CONFIG_NFT_QUEUE unset) and the xt NFQUEUE target refuses the
//! ARP family ("NFQUEUE target: not valid for this family"); ebtables has
//! no NFQUEUE target. So:
//!
//! ```text
//! guest ─► DEV ─► packet taps (castor's AF_PACKET socket: copy, tag epoch) ─► netdev ingress: ARP dropped
//!                 castor-outq, on commit: the copy enters DEV's bridge through castor's
//!                 injection port, which forwards it and delivers it to the bridge's own stack
//! ```
//!
//! Packet taps see a received frame before the netdev ingress hook, so
//! castor holds a copy of every ARP frame the rule drops
//! ([`super::rules`] installs the rule). The injection port
//! ([`super::inject`]) is a TAP on the same bridge, so a released frame
//! reaches a client on the host's bridge address too, not only the other
//! ports. Tagging is conservative as for
//! NFQUEUE (the frame is tagged when read, after it was produced). Held
//! copies are simply discarded on shutdown; the originals are already gone.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::super::{Egress, OutputQueue};
use super::inject::InjectPort;

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_ARP: u16 = 0x0806;

#[derive(Debug, thiserror::Error)]
pub enum ArpError {
    #[error("ARP hold on {dev}: no such network device")]
    NoDevice { dev: String },
    #[error("ARP hold on {dev}: it is not a bridge port (ARP can be held only where castor can re-send it into a bridge)")]
    NotBridged { dev: String },
    #[error("ARP hold on {dev}: {source}")]
    Inject {
        dev: String,
        #[source]
        source: super::inject::InjectError,
    },
    #[error("ARP hold on {dev}: {what}: {source}")]
    Io {
        dev: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

pub(super) fn ifindex(dev: &str) -> Option<u32> {
    let c = std::ffi::CString::new(dev).ok()?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// The bridge `dev` is a port of, if any.
pub fn bridge_of(dev: &str) -> Option<String> {
    let link = std::fs::read_link(format!("/sys/class/net/{dev}/master")).ok()?;
    let name = link.file_name()?.to_str()?.to_string();
    std::path::Path::new(&format!("/sys/class/net/{name}/bridge"))
        .exists()
        .then_some(name)
}

fn packet_socket(proto: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            proto.to_be() as i32,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: &OwnedFd, level: i32, opt: i32, v: &T) -> std::io::Result<()> {
    // SAFETY: `v` points to a live T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            v as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn sockaddr_ll(ifindex: u32, proto: u16) -> libc::sockaddr_ll {
    // SAFETY: all-zero sockaddr_ll is valid.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto.to_be();
    sa.sll_ifindex = ifindex as i32;
    sa
}

/// Puts released ARP frames into the bridge through the injection port.
/// Runs on castor-outq.
struct BridgeEgress {
    port: InjectPort,
    sent: Arc<AtomicU64>,
}

impl Egress for BridgeEgress {
    fn release(&mut self, frame: &[u8]) {
        if frame.len() < 14 {
            return;
        }
        match self.port.inject(frame) {
            Ok(()) => {
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!("re-sending a held ARP frame on {}: {e}", self.port.name()),
        }
    }
}

/// Holds the ARP frames arriving from one bridge port.
pub struct ArpHold {
    dev: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    held: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

impl ArpHold {
    pub fn start(outq: &OutputQueue, dev: &str) -> Result<ArpHold, ArpError> {
        let io = |what, source| ArpError::Io {
            dev: dev.to_string(),
            what,
            source,
        };
        let idx = ifindex(dev).ok_or_else(|| ArpError::NoDevice { dev: dev.into() })?;
        let bridge = bridge_of(dev).ok_or_else(|| ArpError::NotBridged { dev: dev.into() })?;
        let port = InjectPort::open(&bridge).map_err(|source| ArpError::Inject {
            dev: dev.to_string(),
            source,
        })?;
        // Protocol 0 receives nothing until bind, so no frame of another
        // device slips in before the filter is attached.
        let cap = packet_socket(0).map_err(|e| io("opening a packet socket", e))?;
        // Classic BPF: accept ethertype 0x0806 (halfword at offset 12), else drop.
        let prog = [
            libc::sock_filter {
                code: 0x28,
                jt: 0,
                jf: 0,
                k: 12,
            }, // ldh [12]
            libc::sock_filter {
                code: 0x15,
                jt: 0,
                jf: 1,
                k: ETH_P_ARP as u32,
            }, // jeq #0x806
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0xffff,
            }, // ret #65535
            libc::sock_filter {
                code: 0x06,
                jt: 0,
                jf: 0,
                k: 0,
            }, // ret #0
        ];
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut _,
        };
        setsockopt(&cap, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &fprog)
            .map_err(|e| io("attaching the ARP filter", e))?;
        // Frames castor (or anyone) sends towards the guest are not its output.
        setsockopt(&cap, libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &1i32)
            .map_err(|e| io("PACKET_IGNORE_OUTGOING", e))?;
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        setsockopt(&cap, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)
            .map_err(|e| io("SO_RCVTIMEO", e))?;
        let sa = sockaddr_ll(idx, ETH_P_ALL);
        // SAFETY: `sa` is a valid sockaddr_ll of the length passed.
        let rc = unsafe {
            libc::bind(
                cap.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io(
                "binding the packet socket",
                std::io::Error::last_os_error(),
            ));
        }
        let sent = Arc::new(AtomicU64::new(0));
        let handle = outq.handle(Box::new(BridgeEgress {
            port,
            sent: sent.clone(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let held = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, held) = (stop.clone(), held.clone());
            std::thread::Builder::new()
                .name("castor-arp".into())
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop.load(Ordering::Relaxed) {
                        // SAFETY: `buf` is writable for its length.
                        let n = unsafe {
                            libc::recv(cap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                        };
                        // Timeout, signal or error: check `stop` and retry.
                        if n < 14 {
                            continue;
                        }
                        handle.emit_now(&buf[..n as usize]);
                        held.fetch_add(1, Ordering::Relaxed);
                    }
                })
                .map_err(|e| io("spawning castor-arp", e))?
        };
        Ok(ArpHold {
            dev: dev.to_string(),
            stop,
            thread: Some(thread),
            held,
            sent,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "ARP on {}: {} frames held, {} released",
            self.dev,
            self.held.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed)
        )
    }
}

impl Drop for ArpHold {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
