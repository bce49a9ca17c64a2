//! A TAP network device: whole Ethernet frames (no packet-info header) on a
//! non-blocking file descriptor from /dev/net/tun.
//!
//! The interface lives in the network namespace of the thread that opens
//! it and disappears when the fd closes (it is not made persistent).
//! Configuring the host side (addresses, `up`) is the caller's job.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::devices::net::{FrameSink, FrameSource};

/// Errors of the TAP device, naming the interface.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("opening TAP {name}: interface names are 1..=15 bytes without NUL")]
    BadName { name: String },
    #[error("opening TAP {name}: /dev/net/tun: {source}")]
    OpenTun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening TAP {name}: TUNSETIFF(IFF_TAP|IFF_NO_PI): {source}{hint}")]
    SetIff {
        name: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// From linux/if_tun.h.
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// `struct ifreq` as TUNSETIFF uses it: the name and the flags, padded to
/// the kernel's 40 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Largest frame read from the TAP (the kernel never gives more than the
/// interface MTU + 14; 64 KiB covers any MTU).
pub const MAX_READ: usize = 65536;

pub struct Tap {
    name: String,
    file: File,
    /// Frames the kernel refused (queue full, interface down).
    send_errors: AtomicU64,
}

impl Tap {
    /// Creates (or attaches to) TAP interface `name`, non-blocking.
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(TapError::BadName { name: name.into() });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.into(),
                source,
            })?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: `file` is an open /dev/net/tun fd and `req` is a valid,
        // writable ifreq-sized struct that outlives the call; TUNSETIFF
        // reads and writes only those 40 bytes.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc != 0 {
            let source = std::io::Error::last_os_error();
            let hint = if source.raw_os_error() == Some(libc::EPERM) {
                " (needs CAP_NET_ADMIN)"
            } else {
                ""
            };
            return Err(TapError::SetIff {
                name: name.into(),
                hint,
                source,
            });
        }
        Ok(Tap {
            name: name.into(),
            file,
            send_errors: AtomicU64::new(0),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame into `buf`; `Ok(None)` when none is queued.
    pub fn recv(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        match (&self.file).read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one whole frame.
    pub fn send(&self, frame: &[u8]) -> std::io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::other(format!(
                "short TAP write: {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }
}

impl Tap {
    /// Frames whose write to the TAP failed.
    pub fn send_errors(&self) -> u64 {
        self.send_errors.load(Ordering::Relaxed)
    }
}

/// The TAP as the NIC's backend: TX frames are written at once, RX frames
/// are read without blocking. Under protection the NIC's TX goes to the
/// output queue instead, which writes released frames through this.
#[derive(Clone)]
pub struct TapBackend(pub Arc<Tap>);

impl FrameSink for TapBackend {
    fn emit(&mut self, frame: &[u8]) {
        // A frame the kernel refuses is lost, as on a real wire; count it.
        if self.0.send(frame).is_err() {
            self.0.send_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl FrameSource for TapBackend {
    fn poll(&mut self, buf: &mut [u8]) -> Option<usize> {
        self.0.recv(buf).ok().flatten()
    }
}
