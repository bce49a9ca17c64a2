//! Naming the transport of a session, and checking at start-up that this
//! build and machine can run it.

#[cfg(feature = "rdma")]
use crate::transport::rdma;
use crate::transport::uring;

/// Which transport carries the records. Both ends must use the same one:
/// the primary names it in a `Transport` record after the handshake (none
/// for tcp) and the backup refuses a mismatch with a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransportKind {
    #[default]
    Tcp,
    Uring,
    Rdma,
}

impl TransportKind {
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Uring => "uring",
            TransportKind::Rdma => "rdma",
        }
    }

    pub fn to_u8(self) -> u8 {
        self as u8
    }

    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => TransportKind::Tcp,
            1 => TransportKind::Uring,
            2 => TransportKind::Rdma,
            _ => return None,
        })
    }

    /// Fails at start-up when this binary or machine cannot run the
    /// transport (io_uring or SEND_ZC missing; no `rdma` feature or device).
    pub fn check_available(self) -> Result<(), String> {
        match self {
            TransportKind::Tcp => Ok(()),
            TransportKind::Uring => uring::probe().map_err(|e| e.to_string()),
            TransportKind::Rdma => {
                #[cfg(feature = "rdma")]
                {
                    rdma::probe().map_err(|e| e.to_string())
                }
                #[cfg(not(feature = "rdma"))]
                {
                    Err(
                        "--transport rdma: this castor was built without the `rdma` cargo feature \
                         (rebuild with `cargo build --release --features rdma`)"
                            .into(),
                    )
                }
            }
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
