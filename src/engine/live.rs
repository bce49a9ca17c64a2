//! The live copy: the one copy of a domain that runs and speaks to the
//! world, protected by a backup whenever one is connected.
//!
//! ```text
//!            dial ok                      backup lost, arbiter held
//! unprotected ─────────► protected session ─────────────────────► unprotected
//!     │ ▲ (pass-through)   (output commit)                          (redial)
//!     │ └───────────────────────────────────────────────────────────────┘
//!     └─ lease lapsed (in either state) ──► SELF-FENCED: guest paused,
//!                                           output dropped, never released
//! ```
//!
//! Invariants:
//! - The guest runs unprotected (output released at once) only after the
//!   arbiter's heir record says [`Heir::Nobody`] (no backup's replica may
//!   take over: every one is older than the output now leaving), and only
//!   while this copy holds the arbiter: with a lease ([`LeaseWatch`]) its gate
//!   ([`LiveConfig::lease_gate`]) is asked every [`POLL`] and before every
//!   epoch boundary; without one (a local lock) the hold lasts as long as
//!   the process.
//! - Each protection session names its backup the heir before it starts
//!   ([`crate::ha::heir`]); a copy that cannot write the record (it lost
//!   the arbiter, or the arbiter stayed unreachable until its lease ran
//!   out) self-fences instead of running on.
//! - Output held by a protection session that ends without its acks is
//!   dropped ([`OutputQueue::unprotect`]), never released: the copy that
//!   resumes unprotected has already produced that output's state, and the
//!   guest's protocols retransmit what was lost.
//! - Re-protection never stops the guest for longer than an epoch's pause:
//!   a fresh backup is seeded by live pre-copy ([`primary::run_session`]).
//! - Dialing runs on its own thread, so an unreachable backup (connect
//!   timeouts of seconds) never delays a lease check.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::domain::{Domain, DomainError, Layout};
use crate::engine::primary::{self, PrimaryConfig, PrimaryError};
use crate::ha::heir::{self, Heir, HeirBook};
use crate::ha::lease::{LeaseGate, LeaseWatch, Verdict};
use crate::metrics::Summary;
use crate::outq::{OutputQueue, OutqReport};
use crate::transport::record::RecordReader;
use crate::transport::RecordSink;

/// How often the unprotected loop checks the lease, the dialer and the
/// stop flag.
pub const POLL: Duration = Duration::from_millis(20);

/// An authenticated link to a backup: its two halves.
pub type Link<R> = (Box<dyn RecordSink>, RecordReader<R>);

/// An authenticated link to a backup, ready for a protection session.
pub struct Session<R> {
    pub sink: Box<dyn RecordSink>,
    pub reader: RecordReader<R>,
    /// The backup's name in the arbiter's heir record.
    pub heir: Heir,
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("domain: {0}")]
    Domain(#[from] DomainError),
    #[error("protection session: {0}")]
    Session(#[source] PrimaryError),
    #[error("output queue: {0}")]
    Output(#[from] crate::outq::OutqError),
}

/// How the live copy runs.
#[derive(Debug, Clone)]
pub struct LiveConfig {
    /// Tunables of each protection session (its `duration`/`max_epochs`
    /// are set from `run_for`/`run_epochs`).
    pub primary: PrimaryConfig,
    /// Stop after this long in all (None: until a stop signal).
    pub run_for: Option<Duration>,
    /// Stop after this many epochs in all (protected or not).
    pub run_epochs: Option<u64>,
    /// Whether to keep the guest running, unprotected, after the backup is
    /// lost (`false`: stop, as a plain benchmark wants).
    pub continue_unprotected: bool,
    /// Dial a (fresh) backup while unprotected, retrying this often;
    /// `None`: never re-protect.
    pub redial_every: Option<Duration>,
    /// Do not dial before this much unprotected time has passed (lets an
    /// activated copy finish announcing its addresses first).
    pub dial_after: Duration,
    /// The arbiter's lease, when its hold can lapse.
    pub lease: Option<LeaseWatch>,
    /// Where the arbiter keeps the heir record.
    pub heirs: HeirBook,
    /// Self-fence when less than this is left on the lease.
    pub lease_margin: Duration,
    /// Repeat `Domain::announce` at these times after the live loop starts.
    pub announce_at: Vec<Duration>,
    /// Prefix of progress messages (`castor protect`, `castor backup`).
    pub label: String,
}

/// Why the live copy stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveEnd {
    /// Run limit or stop signal; the guest is paused and whole.
    Stopped,
    /// The backup was lost and `continue_unprotected` is off.
    BackupLost(String),
    /// The arbiter's lease lapsed: the guest is paused and its held output
    /// dropped; another copy may be live now.
    SelfFenced(String),
}

pub struct LiveOutcome {
    pub end: LiveEnd,
    /// The domain, paused.
    pub domain: Box<dyn Domain>,
    /// Protection sessions run (backups that protected this copy).
    pub sessions: u64,
    /// Epochs run in all, protected or not.
    pub epochs: u64,
    /// Epochs run unprotected.
    pub unprotected_epochs: u64,
    /// Report of the last protection session that stopped cleanly.
    pub last_summary: Option<Summary>,
    /// Last epoch of the last clean session and the backup's ack of it.
    pub last_epochs: Option<(u64, u64)>,
    /// The output queue's report so far.
    pub output: OutqReport,
}

/// Dials backups on its own thread, one session per request.
struct Dialer<R> {
    req: Option<Sender<()>>,
    got: Receiver<Session<R>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl<R: std::io::Read + Send + 'static> Dialer<R> {
    fn spawn<D>(mut dial: D, every: Duration, label: String) -> Self
    where
        D: FnMut() -> Result<Session<R>, String> + Send + 'static,
    {
        let (req_tx, req_rx) = channel::<()>();
        let (got_tx, got_rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("castor-dial".into())
            .spawn(move || {
                for () in req_rx.iter() {
                    let mut said = None::<String>;
                    while !st.load(Ordering::Acquire) {
                        let t = Instant::now();
                        match dial() {
                            Ok(s) => {
                                let _ = got_tx.send(s);
                                break;
                            }
                            Err(e) => {
                                // Say each distinct failure once, not every retry.
                                if said.as_deref() != Some(e.as_str()) {
                                    eprintln!(
                                        "{label}: no backup yet ({e}); retrying every {every:?}"
                                    );
                                    said = Some(e);
                                }
                            }
                        }
                        let left = every.saturating_sub(t.elapsed());
                        // Sleep in small steps so a stop is seen promptly.
                        let until = Instant::now() + left;
                        while !st.load(Ordering::Acquire) && Instant::now() < until {
                            std::thread::sleep(POLL.min(until - Instant::now()));
                        }
                    }
                }
            })
            .expect("spawning the dialer thread");
        Dialer {
            req: Some(req_tx),
            got: got_rx,
            stop,
            thread: Some(thread),
        }
    }

    fn request(&self) {
        if let Some(r) = &self.req {
            let _ = r.send(());
        }
    }
}

impl<R> Drop for Dialer<R> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.req.take();
        // A dial in progress may take a connect timeout to return; do not
        // wait for it (the thread exits on its own, dropping any session).
        drop(self.thread.take());
    }
}

impl LiveConfig {
    /// The gate every lease decision of the live copy consults (the
    /// unprotected loop, the output queue, each protection session).
    pub fn lease_gate(&self) -> LeaseGate {
        LeaseGate::new(self.lease.clone(), self.lease_margin)
    }
}

fn lease_ok(cfg: &LiveConfig) -> bool {
    cfg.lease_gate().may_proceed(Instant::now()) == Verdict::Proceed
}

/// Self-fences because the lease lapsed.
fn fence(
    domain: &mut dyn Domain,
    outq: &mut OutputQueue,
    cfg: &LiveConfig,
) -> Result<LiveEnd, LiveError> {
    let gate = cfg.lease_gate();
    let why = format!(
        "the arbiter's lease lapsed ({} ms left, margin {} ms)",
        gate.remaining_at(Instant::now()).as_millis(),
        gate.margin().as_millis()
    );
    fence_for(domain, outq, cfg, why)
}

/// Pauses the guest and drops its held output for good, because of `why`.
fn fence_for(
    domain: &mut dyn Domain,
    outq: &mut OutputQueue,
    cfg: &LiveConfig,
    why: String,
) -> Result<LiveEnd, LiveError> {
    domain.pause()?;
    let r = outq.fence()?;
    eprintln!(
        "{}: SELF-FENCED: {why}; guest paused, {} held output items dropped, nothing more will be released",
        cfg.label, r.dropped
    );
    Ok(LiveEnd::SelfFenced(why))
}

/// Runs `domain` as the live copy until a run limit, a stop signal, or a
/// lapsed lease. `first` is a session already open (protect's initial
/// backup); `dial(layout, description)` opens later ones. The domain's output must already be
/// attached to `outq`.
pub fn run<R, D>(
    mut domain: Box<dyn Domain>,
    outq: &mut OutputQueue,
    first: Option<Session<R>>,
    dial: D,
    cfg: &LiveConfig,
) -> Result<LiveOutcome, (LiveError, Option<Box<dyn Domain>>)>
where
    R: std::io::Read + Send + 'static,
    D: FnMut(Layout, &str) -> Result<Session<R>, String> + Send + 'static,
{
    let started = Instant::now();
    let gate = cfg.lease_gate();
    if gate.can_lapse() {
        // Checked by the output thread before every release, in every mode.
        outq.set_gate(gate);
    }
    let mut out = Outcome {
        // Every session after a first one handed in is a re-protection.
        fresh: u64::from(first.is_none()),
        ..Outcome::default()
    };
    let (layout, desc) = (domain.layout(), domain.describe());
    let mut dial = dial;
    let dialer = cfg
        .redial_every
        .map(|every| Dialer::spawn(move || dial(layout, &desc), every, cfg.label.clone()));
    let mut pending = first;
    let mut announce = cfg.announce_at.clone();
    announce.sort();
    announce.reverse(); // pop() yields the earliest
    let end = loop {
        if let Some(session) = pending.take() {
            match protected(domain, outq, session, cfg, started, &mut out) {
                Ok((d, None)) => domain = d,
                Ok((d, Some(end))) => {
                    domain = d;
                    break end;
                }
                Err(e) => return Err(e),
            }
        }
        match unprotected(
            &mut *domain,
            outq,
            dialer.as_ref(),
            cfg,
            started,
            &mut announce,
            &mut out,
        ) {
            Ok(Phase::Session(s)) => pending = Some(s),
            Ok(Phase::End(end)) => break end,
            Err(e) => return Err((e, Some(domain))),
        }
    };
    drop(dialer);
    // Stopped: the guest is paused and whole, nothing is held. Fenced: it
    // stays fenced for whatever may still be emitted.
    let report = match end {
        LiveEnd::SelfFenced(_) => outq.fence(),
        _ => outq.unprotect(),
    };
    let output = match report {
        Ok(r) => r,
        Err(e) => return Err((e.into(), Some(domain))),
    };
    Ok(LiveOutcome {
        end,
        domain,
        sessions: out.sessions,
        epochs: out.epochs,
        unprotected_epochs: out.unprotected_epochs,
        last_summary: out.last_summary,
        last_epochs: out.last_epochs,
        output,
    })
}

#[derive(Default)]
struct Outcome {
    /// 1 when no session was open at the start (an activated copy).
    fresh: u64,
    sessions: u64,
    epochs: u64,
    unprotected_epochs: u64,
    last_summary: Option<Summary>,
    last_epochs: Option<(u64, u64)>,
}

enum Phase<R> {
    Session(Session<R>),
    End(LiveEnd),
}

type Protected = Result<(Box<dyn Domain>, Option<LiveEnd>), (LiveError, Option<Box<dyn Domain>>)>;

/// One protection session. `Some(end)`: the live copy stops.
fn protected<R: std::io::Read + Send + 'static>(
    domain: Box<dyn Domain>,
    outq: &mut OutputQueue,
    session: Session<R>,
    cfg: &LiveConfig,
    started: Instant,
    out: &mut Outcome,
) -> Protected {
    // Named before the session holds any output: if this copy dies, only
    // this backup's replica may take over. Not named: run on without it
    // (the unprotected loop fences if the arbiter cannot be told that).
    if let Err(e) = heir::name_while_held(&cfg.heirs, &session.heir, &cfg.lease_gate()) {
        eprintln!(
            "{}: not protecting with this backup: naming it the heir failed: {e}",
            cfg.label
        );
        return Ok((domain, None));
    }
    let Session { sink, reader, .. } = session;
    let mut pcfg = cfg.primary.clone();
    // The session self-fences on its own (primary.rs) when the lease lapses.
    pcfg.lease = cfg.lease.clone();
    pcfg.lease_margin = cfg.lease_margin;
    pcfg.duration = cfg.run_for.map(|d| d.saturating_sub(started.elapsed()));
    pcfg.max_epochs = cfg.run_epochs.map(|n| n.saturating_sub(out.epochs).max(1));
    out.sessions += 1;
    if out.sessions + out.fresh > 1 {
        eprintln!(
            "{}: re-protecting: seeding a fresh backup while the guest runs (session {})",
            cfg.label, out.sessions
        );
    }
    match primary::run_session(domain, outq, sink, reader, &pcfg) {
        Ok(o) => {
            out.epochs += o.final_epoch;
            out.last_epochs = Some((o.final_epoch, o.acked_epoch));
            out.last_summary = Some(o.summary);
            Ok((o.domain, Some(LiveEnd::Stopped)))
        }
        Err((e, Some(mut d))) => {
            if let PrimaryError::Domain(_) = e {
                return Err((LiveError::Session(e), Some(d)));
            }
            // The backup we were started against refused us (a transport
            // or size mismatch, ...): a configuration error to report, not
            // a lost backup to run on without.
            if matches!(e, PrimaryError::Refused { .. }) && out.sessions == 1 && out.fresh == 0 {
                return Err((LiveError::Session(e), Some(d)));
            }
            if let PrimaryError::BackupLost { acked, .. } = &e {
                out.epochs += acked;
            }
            if !lease_ok(cfg) {
                return match fence(&mut *d, outq, cfg) {
                    Ok(end) => Ok((d, Some(end))),
                    Err(fe) => Err((fe, Some(d))),
                };
            }
            if !cfg.continue_unprotected {
                return Ok((d, Some(LiveEnd::BackupLost(e.to_string()))));
            }
            eprintln!(
                "{}: backup lost ({e}); the guest continues UNPROTECTED while this copy holds the arbiter{}",
                cfg.label,
                if cfg.redial_every.is_some() {
                    "; re-protecting as soon as a backup answers"
                } else {
                    ""
                }
            );
            Ok((d, None))
        }
        Err((e, None)) => Err((LiveError::Session(e), None)),
    }
}

/// Runs the guest unprotected, in epochs, until a backup answers the
/// dialer, a limit or stop signal, or the lease lapses.
fn unprotected<R: std::io::Read + Send + 'static>(
    domain: &mut dyn Domain,
    outq: &mut OutputQueue,
    dialer: Option<&Dialer<R>>,
    cfg: &LiveConfig,
    started: Instant,
    announce: &mut Vec<Duration>,
    out: &mut Outcome,
) -> Result<Phase<R>, LiveError> {
    if !lease_ok(cfg) {
        return fence(domain, outq, cfg).map(Phase::End);
    }
    // Before the first byte leaves unprotected: no replica may take over.
    if let Err(e) = heir::name_while_held(&cfg.heirs, &Heir::Nobody, &cfg.lease_gate()) {
        let why = format!("the arbiter could not be told that no backup may take over ({e})");
        return fence_for(domain, outq, cfg, why).map(Phase::End);
    }
    outq.unprotect()?;
    domain.resume()?;
    let mut dialing = false;
    let mut deadline = Instant::now() + cfg.primary.epoch;
    let mut scratch = Vec::new();
    loop {
        let now = Instant::now();
        if !lease_ok(cfg) {
            return fence(domain, outq, cfg).map(Phase::End);
        }
        if announce
            .last()
            .is_some_and(|&at| now.duration_since(started) >= at)
        {
            announce.pop();
            domain.announce()?;
        }
        if let Some(d) = dialer {
            if !dialing && announce.is_empty() && now.duration_since(started) >= cfg.dial_after {
                d.request();
                dialing = true;
            }
            if dialing {
                match d.got.recv_timeout(Duration::ZERO) {
                    Ok(s) => return Ok(Phase::Session(s)),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => dialing = false,
                }
            }
        }
        if now < deadline && !crate::engine::stop_requested() {
            std::thread::sleep((deadline - now).min(POLL));
            continue;
        }
        deadline += cfg.primary.epoch;
        domain.pause()?;
        out.epochs += 1;
        out.unprotected_epochs += 1;
        // Nobody needs this dirty set, but keep tracking current so the
        // next seed's first harvest is small.
        scratch.clear();
        domain.harvest_dirty(&mut scratch)?;
        let done = crate::engine::stop_requested()
            || cfg.run_epochs.is_some_and(|n| out.epochs >= n)
            || cfg.run_for.is_some_and(|d| started.elapsed() >= d);
        if done {
            return Ok(Phase::End(LiveEnd::Stopped));
        }
        // Re-check right before the guest may speak again.
        if !lease_ok(cfg) {
            return fence(domain, outq, cfg).map(Phase::End);
        }
        domain.resume()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::DomainSpec;
    use crate::outq::{Egress, Mode};
    use std::net::TcpStream;
    use std::sync::mpsc::Sender;

    struct Wire(Sender<Vec<u8>>);
    impl Egress for Wire {
        fn release(&mut self, frame: &[u8]) {
            let _ = self.0.send(frame.to_vec());
        }
    }

    /// An unprotected live copy whose lease lapses pauses its guest and
    /// releases nothing from then on; while the lease held, output passed.
    #[test]
    fn unprotected_copy_self_fences_when_its_lease_lapses() {
        let spec = DomainSpec::parse("sim:mem=1MiB,workload=edits,rate=1000").unwrap();
        let mut domain = match spec.open() {
            Ok(d) => d,
            Err(DomainError::DirtyTracking(why)) => {
                eprintln!("skipping: kernel dirty tracking unavailable here: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        let mut outq = OutputQueue::start(Mode::PassThrough).unwrap();
        domain.attach_output(&outq).unwrap();
        let (tx, rx) = channel();
        let h = outq.handle(Box::new(Wire(tx)));
        let lease = LeaseWatch::new();
        lease.extend_to(Instant::now() + Duration::from_millis(400));
        let cfg = LiveConfig {
            primary: PrimaryConfig {
                epoch: Duration::from_millis(10),
                ..PrimaryConfig::default()
            },
            run_for: Some(Duration::from_secs(30)),
            run_epochs: None,
            continue_unprotected: true,
            // Dialing fails every time: no backup exists.
            redial_every: Some(Duration::from_millis(50)),
            dial_after: Duration::ZERO,
            lease: Some(lease.clone()),
            heirs: HeirBook::Nowhere,
            lease_margin: Duration::from_millis(100),
            announce_at: Vec::new(),
            label: "test".into(),
        };
        let dials = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let d2 = dials.clone();
        let dial = move |_: Layout, _: &str| -> Result<Session<TcpStream>, String> {
            d2.fetch_add(1, Ordering::Relaxed);
            Err("no backup".into())
        };
        // Output while the lease holds passes straight through.
        h.emit_now(b"before");
        let t0 = Instant::now();
        let out = run(domain, &mut outq, None, dial, &cfg)
            .map_err(|(e, _)| e)
            .unwrap();
        let took = t0.elapsed();
        assert!(
            matches!(out.end, LiveEnd::SelfFenced(_)),
            "ended {:?} instead of self-fencing",
            out.end
        );
        // Fenced no later than the margin before expiry plus one poll.
        assert!(
            took < Duration::from_millis(400),
            "self-fenced only after {took:?}"
        );
        assert!(
            out.unprotected_epochs > 0,
            "the guest never ran unprotected"
        );
        assert!(dials.load(Ordering::Relaxed) > 0, "never dialed a backup");
        h.emit_now(b"after");
        let r = outq.shutdown().unwrap();
        let got: Vec<Vec<u8>> = rx.try_iter().collect();
        assert_eq!(got, [b"before".to_vec()], "output left a fenced copy");
        assert_eq!(r.dropped, 1);
    }

    /// Egress that reads the heir record at each release.
    struct Checked(Sender<(Vec<u8>, Option<Heir>)>, HeirBook);
    impl Egress for Checked {
        fn release(&mut self, frame: &[u8]) {
            let _ = self.0.send((frame.to_vec(), self.1.read().unwrap()));
        }
    }

    fn heir_cfg(heirs: HeirBook) -> LiveConfig {
        LiveConfig {
            primary: PrimaryConfig {
                epoch: Duration::from_millis(10),
                ..PrimaryConfig::default()
            },
            run_for: None,
            run_epochs: Some(5),
            continue_unprotected: true,
            redial_every: None,
            dial_after: Duration::ZERO,
            lease: None,
            heirs,
            lease_margin: Duration::from_millis(100),
            announce_at: Vec::new(),
            label: "test".into(),
        }
    }

    fn open_sim() -> Option<Box<dyn Domain>> {
        let spec = DomainSpec::parse("sim:mem=1MiB,workload=edits,rate=1000").unwrap();
        match spec.open() {
            Ok(d) => Some(d),
            Err(DomainError::DirtyTracking(why)) => {
                eprintln!("skipping: kernel dirty tracking unavailable here: {why}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    type NoDial = fn(Layout, &str) -> Result<Session<TcpStream>, String>;

    /// Output held from before the copy went live leaves only once the
    /// heir record says no backup may take over.
    #[test]
    fn unprotected_output_leaves_only_after_the_record_says_nobody() {
        let Some(mut domain) = open_sim() else { return };
        let dir = tempfile::tempdir().unwrap();
        let book = HeirBook::File(dir.path().join("pair.lock.heir"));
        book.name(&Heir::Session("0a".into())).unwrap();
        let mut outq = OutputQueue::start(Mode::Hold).unwrap();
        domain.attach_output(&outq).unwrap();
        let (tx, rx) = channel();
        let h = outq.handle(Box::new(Checked(tx, book.clone())));
        h.emit_now(b"held");
        let dial: NoDial = |_, _| Err("no backup".into());
        let out = run(domain, &mut outq, None, dial, &heir_cfg(book.clone()))
            .map_err(|(e, _)| e)
            .unwrap();
        assert_eq!(out.end, LiveEnd::Stopped);
        drop(outq.shutdown());
        let got: Vec<_> = rx.try_iter().collect();
        assert_eq!(got, [(b"held".to_vec(), Some(Heir::Nobody))]);
    }

    /// A copy that cannot write the record self-fences: nothing leaves.
    #[test]
    fn a_copy_that_cannot_record_nobody_self_fences() {
        let Some(mut domain) = open_sim() else { return };
        let book = HeirBook::File("/proc/castor-no-such-dir/pair.lock.heir".into());
        let mut outq = OutputQueue::start(Mode::Hold).unwrap();
        domain.attach_output(&outq).unwrap();
        let (tx, rx) = channel();
        let h = outq.handle(Box::new(Wire(tx)));
        h.emit_now(b"held");
        let dial: NoDial = |_, _| Err("no backup".into());
        let out = run(domain, &mut outq, None, dial, &heir_cfg(book))
            .map_err(|(e, _)| e)
            .unwrap();
        assert!(
            matches!(&out.end, LiveEnd::SelfFenced(why) if why.contains("no backup may take over")),
            "{:?}",
            out.end
        );
        assert_eq!(out.unprotected_epochs, 0);
        h.emit_now(b"after");
        drop(outq.shutdown());
        assert_eq!(
            rx.try_iter().count(),
            0,
            "output left a copy that could not record"
        );
    }
}
