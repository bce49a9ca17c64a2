//! The injection port: a TAP device castor enslaves to a guest's bridge to
//! put released ARP frames back where they would have gone.
//!
//! A frame written to the TAP enters the bridge exactly as if it had come
//! from a port: the bridge forwards it to the other ports *and* hands it up
//! to the bridge's own stack when it is addressed there (broadcast, or the
//! bridge's MAC). Sending on the bridge device itself does only the first:
//! an ARP reply of the guest to a client on the host's own bridge address
//! never reached that client's stack, which then failed with "No route to
//! host".
//!
//! Invariants, so the port changes nothing else on the bridge:
//! - learning is off on it, so the guest's MAC is never learned there (the
//!   injected frames carry the guest's source address);
//! - unicast, multicast and broadcast flooding to it are off, so the bridge
//!   sends it nothing;
//! - its MAC is `fe:ff:ff:ff:ff:ff`, the highest unicast address, so a
//!   bridge that takes the lowest port MAC keeps its own; its MTU is the
//!   bridge's, so the bridge's MTU does not drop;
//! - the TAP is not persistent: it disappears when castor's descriptor
//!   closes, after a SIGKILL too.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Highest unicast, locally administered MAC (see the module doc).
const PORT_MAC: [u8; 6] = [0xfe, 0xff, 0xff, 0xff, 0xff, 0xff];
/// The kernel picks the first free number.
const NAME_TEMPLATE: &str = "castor-arp%d";
/// `_IOW('T', 202, int)`, linux/if_tun.h.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
/// linux/sockios.h.
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("ARP injection port on bridge {bridge}: {what}: {source}")]
    Io {
        bridge: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A TAP port on `bridge`; dropping it removes the device.
pub struct InjectPort {
    tap: File,
    name: String,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: an all-zero ifreq is valid (a name of NULs, a zero union).
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    r
}

fn name_of(r: &libc::ifreq) -> String {
    let bytes: Vec<u8> = r
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `ioctl(fd, req, r)`, the error naming `what`.
fn ioctl(fd: i32, req: libc::c_ulong, r: &mut libc::ifreq) -> std::io::Result<()> {
    // SAFETY: `r` is a live, writable ifreq for the call; every request
    // used here reads or writes only that struct.
    if unsafe { libc::ioctl(fd, req as _, r as *mut libc::ifreq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl InjectPort {
    /// Creates the TAP, sets its MAC and MTU, enslaves it to `bridge`
    /// with learning and flooding off, and brings it up (in that order, so
    /// it never forwards or learns before it is tamed).
    pub fn open(bridge: &str) -> Result<InjectPort, InjectError> {
        let io = |what: &str, source| InjectError::Io {
            bridge: bridge.into(),
            what: what.into(),
            source,
        };
        let tap = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|e| io("opening /dev/net/tun", e))?;
        let mut r = ifreq(NAME_TEMPLATE);
        r.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        ioctl(tap.as_raw_fd(), TUNSETIFF, &mut r).map_err(|e| io("TUNSETIFF(IFF_TAP)", e))?;
        let name = name_of(&r);
        let port = InjectPort { tap, name };
        port.configure(bridge).map_err(|(what, e)| io(&what, e))?;
        Ok(port)
    }

    fn configure(&self, bridge: &str) -> Result<(), (String, std::io::Error)> {
        let at = |what: &str| {
            let name = self.name.clone();
            let what = what.to_string();
            move |e| (format!("{what} on {name}"), e)
        };
        // SAFETY: plain socket(2); the fd is owned at once.
        let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if s < 0 {
            return Err(at("socket")(std::io::Error::last_os_error()));
        }
        // SAFETY: `s` is a fresh descriptor nobody else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(s) };
        let fd = sock.as_raw_fd();

        let mut r = ifreq(&self.name);
        // SAFETY: ifru_hwaddr is the union member SIOCSIFHWADDR reads.
        unsafe {
            r.ifr_ifru.ifru_hwaddr.sa_family = libc::ARPHRD_ETHER;
            for (d, s) in r.ifr_ifru.ifru_hwaddr.sa_data.iter_mut().zip(PORT_MAC) {
                *d = s as libc::c_char;
            }
        }
        ioctl(fd, libc::SIOCSIFHWADDR, &mut r).map_err(at("SIOCSIFHWADDR"))?;

        let mut b = ifreq(bridge);
        ioctl(fd, libc::SIOCGIFMTU, &mut b).map_err(at("SIOCGIFMTU of the bridge"))?;
        let mut r = ifreq(&self.name);
        // SAFETY: SIOCGIFMTU filled ifru_mtu; SIOCSIFMTU reads it.
        r.ifr_ifru.ifru_mtu = unsafe { b.ifr_ifru.ifru_mtu };
        ioctl(fd, libc::SIOCSIFMTU, &mut r).map_err(at("SIOCSIFMTU"))?;

        let index = super::arp::ifindex(&self.name)
            .ok_or_else(|| at("if_nametoindex")(std::io::ErrorKind::NotFound.into()))?;
        let mut b = ifreq(bridge);
        b.ifr_ifru.ifru_ifindex = index as libc::c_int;
        ioctl(fd, SIOCBRADDIF, &mut b).map_err(at("SIOCBRADDIF (enslaving)"))?;
        for knob in [
            "learning",
            "unicast_flood",
            "multicast_flood",
            "broadcast_flood",
        ] {
            let path = format!("/sys/class/net/{}/brport/{knob}", self.name);
            std::fs::write(&path, "0").map_err(at(&format!("writing 0 to {path}")))?;
        }

        let mut r = ifreq(&self.name);
        ioctl(fd, libc::SIOCGIFFLAGS, &mut r).map_err(at("SIOCGIFFLAGS"))?;
        // SAFETY: SIOCGIFFLAGS filled ifru_flags; SIOCSIFFLAGS reads it.
        unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        ioctl(fd, libc::SIOCSIFFLAGS, &mut r).map_err(at("SIOCSIFFLAGS(IFF_UP)"))
    }

    /// The TAP's interface name (`castor-arpN`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Puts one Ethernet frame into the bridge as if a port received it.
    pub fn inject(&mut self, frame: &[u8]) -> std::io::Result<()> {
        let n = self.tap.write(frame)?;
        if n != frame.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("TAP took {n} of {} bytes", frame.len()),
            ));
        }
        Ok(())
    }
}
