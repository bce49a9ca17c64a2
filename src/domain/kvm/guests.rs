//! Guest images embedded in the binary, built by build.rs from guests/.

/// Names accepted by the spec's `guest=` key.
pub const NAMES: &[&str] = &["memtouch", "counter", "blkcheck", "tcpcount"];

/// The flat image of guest `name`, loaded at [`super::boot::IMAGE_GPA`].
pub fn image(name: &str) -> Option<&'static [u8]> {
    match name {
        "memtouch" => Some(include_bytes!(concat!(env!("OUT_DIR"), "/memtouch.bin"))),
        "counter" => Some(include_bytes!(concat!(env!("OUT_DIR"), "/counter.bin"))),
        "blkcheck" => Some(include_bytes!(concat!(env!("OUT_DIR"), "/blkcheck.bin"))),
        "tcpcount" => Some(include_bytes!(concat!(env!("OUT_DIR"), "/tcpcount.bin"))),
        _ => None,
    }
}
