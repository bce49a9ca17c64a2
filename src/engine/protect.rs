//! The `protect` job: the live copy of a domain protected by a remote
//! backup. Opens the domain and its output queue (with host devices, with
//! `--nfqueue`), dials the first backup (which must answer within 10 s),
//! and runs [`crate::engine::live`], which dials later backups after a
//! loss. Ends with the domain paused and its digest taken.

use std::time::Duration;

use crate::digest::Digest;
use crate::domain::{DomainError, DomainSpec};
use crate::engine::dial::{open_protection, DialError};
use crate::engine::live::{self, LiveConfig, LiveError, LiveOutcome};
use crate::engine::primary::{PrimaryConfig, PrimaryError};
use crate::outq::{Mode, OutputQueue};
use crate::transport::handshake::Psk;
use crate::transport::TransportKind;

#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Dial(#[from] DialError),
    #[error(transparent)]
    Primary(#[from] PrimaryError),
}

/// How `protect` treats the loss of its backup.
#[derive(Debug, Clone)]
pub struct ProtectOpts {
    /// Keep the guest running unprotected while the arbiter is held.
    pub continue_unprotected: bool,
    /// Dial `addr` again this often while unprotected (re-protection).
    pub redial_every: Option<Duration>,
    /// The backup's beacon address (second heartbeat path), if any.
    pub beacon: Option<std::net::SocketAddr>,
    /// Transport of every session (the backups must run the same).
    pub transport: TransportKind,
    /// The arbiter's lease, when its hold can lapse.
    pub lease: Option<crate::ha::lease::LeaseWatch>,
    /// Where the arbiter keeps the heir record.
    pub heirs: crate::ha::heir::HeirBook,
}

/// What `protect` ends with.
pub struct Protected {
    pub live: LiveOutcome,
    /// Digest of the paused domain's memory and state at the end.
    pub digest: Digest,
}

/// Runs `spec` as the live copy protected by the backup at `addr`: the
/// first backup must answer within 10 s; later ones (after a loss) are
/// dialed per `opts`.
pub fn protect(
    spec: &DomainSpec,
    addr: &str,
    psk: &Psk,
    cfg: &PrimaryConfig,
    opts: &ProtectOpts,
) -> Result<Protected, ProtectError> {
    let mut domain = spec.open()?;
    // Hold from the first item: the sources are attached before the first
    // session opens (dialing and the handshake take a while), and nothing
    // they produce in between may pass through.
    let mut outq = OutputQueue::start(Mode::Hold)
        .map_err(|e| ProtectError::Primary(PrimaryError::Protocol(e.to_string())))?;
    domain.attach_output(&outq)?;
    // Host devices (`--nfqueue`): alive until after the queue's shutdown.
    let host = crate::outq::nfqueue::attach(&outq, cfg.nfqueue.as_ref())
        .map_err(|e| ProtectError::Primary(e.into()))?;
    let beacon = opts.beacon.map(|b| (b, cfg.heartbeat_interval));
    let first = open_protection(
        addr,
        psk,
        domain.layout(),
        &domain.describe(),
        Duration::from_secs(10),
        beacon,
        opts.transport,
    )?;
    crate::ops::sdnotify::notify_or_log(&format!("READY=1\nSTATUS=protected by {addr}"));
    let lcfg = LiveConfig {
        primary: cfg.clone(),
        run_for: cfg.duration,
        run_epochs: cfg.max_epochs,
        continue_unprotected: opts.continue_unprotected,
        redial_every: opts.redial_every,
        dial_after: Duration::ZERO,
        lease: opts.lease.clone(),
        heirs: opts.heirs.clone(),
        lease_margin: Duration::from_millis(100),
        announce_at: Vec::new(),
        label: "castor protect".into(),
    };
    let (target, psk) = (addr.to_string(), psk.clone());
    let transport = opts.transport;
    let dial = move |layout, desc: &str| {
        open_protection(
            &target,
            &psk,
            layout,
            desc,
            Duration::ZERO,
            beacon,
            transport,
        )
        .map_err(|e| e.to_string())
    };
    let mut live =
        live::run(domain, &mut outq, Some(first), dial, &lcfg).map_err(|(e, _)| match e {
            LiveError::Session(p) => ProtectError::Primary(p),
            LiveError::Domain(d) => ProtectError::Domain(d),
            LiveError::Output(o) => ProtectError::Primary(PrimaryError::Protocol(o.to_string())),
        })?;
    if let Ok(r) = outq.shutdown() {
        live.output = r;
    }
    if let Some(h) = host {
        eprintln!("castor: {}", h.describe());
    }
    let mut state = Vec::new();
    live.domain.save_state(&mut state)?;
    // SAFETY: the live copy ends with the domain paused and no castor
    // thread touching guest memory.
    let digest = Digest::of(unsafe { live.domain.memory().as_slice() }, &state);
    Ok(Protected { live, digest })
}
