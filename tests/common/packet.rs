//! Raw packet sockets for tests that watch or craft frames on a device.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// A raw packet socket (ethertype `proto`, host order) in the calling
/// thread's namespace, bound to `dev`, with a receive timeout.
pub fn packet_socket(dev: &str, proto: u16, timeout: std::time::Duration) -> OwnedFd {
    // SAFETY: plain socket(2), checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto.to_be() as i32) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(dev).unwrap();
    // SAFETY: zeroed sockaddr_ll is valid; `name` outlives the call.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = proto.to_be();
    sa.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
    assert!(sa.sll_ifindex > 0, "no device {dev}");
    // SAFETY: `sa` is a valid sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &sa as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: a live timeval of the size passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    fd
}
