//! The backup's failover, once the primary's stream ended or broke:
//! suspect → win the arbiter → run the fence command → activate → announce.
//!
//! Each step is a function with a typed result; the transitions between
//! them ([`after_arbiter`], [`after_fence`]) are pure, and the sequence
//! ([`run`]) only strings them together, so what guarantee 3 (one active
//! copy) rests on can be read in one place and tested without the CLI:
//!
//! - no activation unless the arbiter was won (held by another copy: the
//!   replica stays saved, exit status [`exit::ARBITER_HELD`]);
//! - no activation when the arbiter's heir record says the replica is
//!   stale: the primary ran on unprotected after losing this backup, or a
//!   later backup replaced it ([`crate::ha::heir`]; exit status
//!   [`exit::REPLICA_STALE`]);
//! - no activation when the fence command failed (exit status
//!   [`exit::FENCE_FAILED`]);
//! - an activated copy whose lease lapsed self-fenced (exit status
//!   [`exit::SELF_FENCED`]).
//!
//! Activating itself (restoring the domain, running it, re-protecting it
//! with a fresh backup) is the caller's: it is handed in as a closure that
//! reports plain data ([`Activated`]), so this module depends on nothing
//! but the arbiter and the fence hook. Every step's time is recorded in a
//! [`Timeline`], relative to the moment the stream was lost.

use std::path::Path;
use std::time::{Duration, Instant};

use super::arbiter::{Arbiter, ArbiterError, FencingToken};
use super::exit;
use super::fence::{self, FenceError};
use super::heir::{self, HeirBook, HeirError, Stale};
use super::lease::LeaseWatch;
use crate::ops::telemetry::{self, FailoverState};

/// How often a backup campaigning for the arbiter tries again.
const CAMPAIGN_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("arbiter: {0}")]
    Arbiter(#[from] ArbiterError),
    /// The heir record could not be read after winning: whether the
    /// replica is stale is unknown, so it is not activated.
    #[error("not activating: {0}")]
    Heir(#[from] HeirError),
    /// The activation closure's error, as it said it.
    #[error("{0}")]
    Activate(String),
}

/// What the failover starts from.
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    /// The suspected primary's address.
    pub peer: &'a str,
    /// Why it is suspected (how its stream ended).
    pub why: &'a str,
    /// The last committed checkpoint: the one activated.
    pub from_epoch: u64,
    /// The protection session the replica belongs to (the primary's
    /// handshake nonce, hex), matched against the arbiter's heir record;
    /// `None` for a replica saved without one.
    pub session: Option<&'a str>,
    /// When the stream ended or broke.
    pub stream_lost_at: Instant,
    /// The backup's heartbeat timeout: a dying primary's lock is released
    /// only once its process exits, which may take up to this long.
    pub heartbeat_timeout: Duration,
    /// `sh -c CMD` run after winning the arbiter, before activating.
    pub fence_cmd: Option<&'a str>,
    pub fence_timeout: Duration,
    /// Where the replica stays saved when the backup does not activate.
    pub state_dir: &'a Path,
    /// Where the activated domain's final image goes.
    pub activated_dir: &'a Path,
}

/// When each step completed, after the stream was lost (plain data, for
/// reports). `None`: the step was not reached or not configured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeline {
    pub stream_lost_at: Instant,
    pub arbiter_won: Option<Duration>,
    pub fenced: Option<Duration>,
    /// The restored guest was started.
    pub running: Option<Duration>,
}

impl Timeline {
    fn new(stream_lost_at: Instant) -> Self {
        Timeline {
            stream_lost_at,
            arbiter_won: None,
            fenced: None,
            running: None,
        }
    }

    fn since_loss(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.stream_lost_at)
    }
}

/// `+12.3 ms`.
fn ms(d: Duration) -> String {
    format!("+{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// The activation step's report: what the caller's activation did.
#[derive(Debug, Clone, PartialEq)]
pub struct Activated {
    /// Checkpoint the domain was restored from.
    pub from_epoch: u64,
    /// When the restored guest was started.
    pub running_at: Instant,
    /// Epochs the activated domain ran.
    pub epochs_run: u64,
    /// Epoch and digest of its final, saved image.
    pub stopped_epoch: u64,
    pub digest: String,
    /// Why it self-fenced (its arbiter lease lapsed), if it did.
    pub self_fenced: Option<String>,
}

/// Result of the arbiter step.
#[derive(Debug, Clone, PartialEq)]
pub enum Arbitration {
    Won(FencingToken),
    /// Another copy still held it after `waited`.
    Held {
        arbiter: String,
        waited: Duration,
    },
    /// Won, but the heir record names another replica than ours.
    Stale {
        arbiter: String,
        why: Stale,
    },
}

/// Result of the fence step.
#[derive(Debug)]
pub enum Fencing {
    /// No fence command configured.
    Skipped,
    Fenced,
    Failed(FenceError),
}

/// How a failover ended.
#[derive(Debug)]
pub enum Outcome {
    /// Not activated: another copy holds the arbiter.
    ArbiterHeld { arbiter: String, waited: Duration },
    /// Not activated: the heir record says this replica is stale.
    ReplicaStale { arbiter: String, why: Stale },
    /// Not activated: the fence command failed.
    FenceFailed(FenceError),
    /// Activated (and since stopped).
    Activated {
        token: FencingToken,
        activated: Activated,
    },
}

impl Outcome {
    /// The exit status this outcome imposes; `None` when the backup exits
    /// as its stream ended (0 closed cleanly, [`exit::STREAM_LOST`] broken).
    pub fn exit_status(&self) -> Option<u8> {
        match self {
            Outcome::ArbiterHeld { .. } => Some(exit::ARBITER_HELD),
            Outcome::ReplicaStale { .. } => Some(exit::REPLICA_STALE),
            Outcome::FenceFailed(_) => Some(exit::FENCE_FAILED),
            Outcome::Activated { activated, .. } => {
                activated.self_fenced.as_ref().map(|_| exit::SELF_FENCED)
            }
        }
    }
}

/// Where the sequence stands.
#[derive(Debug)]
pub enum Stage {
    Arbitrate,
    Fence(FencingToken),
    Activate(FencingToken),
    Done(Outcome),
}

/// Pure: a won arbiter leads to the fence step; a held one ends the
/// failover without activation.
pub fn after_arbiter(a: Arbitration) -> Stage {
    match a {
        Arbitration::Won(t) => Stage::Fence(t),
        Arbitration::Held { arbiter, waited } => {
            Stage::Done(Outcome::ArbiterHeld { arbiter, waited })
        }
        Arbitration::Stale { arbiter, why } => Stage::Done(Outcome::ReplicaStale { arbiter, why }),
    }
}

/// Pure: activation follows only a fence that succeeded or was not asked
/// for.
pub fn after_fence(token: FencingToken, f: Fencing) -> Stage {
    match f {
        Fencing::Skipped | Fencing::Fenced => Stage::Activate(token),
        Fencing::Failed(e) => Stage::Done(Outcome::FenceFailed(e)),
    }
}

/// What a failover did and when.
#[derive(Debug)]
pub struct Failover {
    pub outcome: Outcome,
    pub timeline: Timeline,
}

/// Runs the failover. `activate` is called at most once, only after the
/// arbiter was won, its heir record names this replica (or nothing), and
/// the fence (if any) succeeded, with the arbiter's lease (when its hold
/// can lapse) and where the activated copy records its own heirs.
pub fn run<F>(plan: &Plan, arb: &mut dyn Arbiter, activate: F) -> Result<Failover, FailoverError>
where
    F: FnOnce(Option<LeaseWatch>, HeirBook) -> Result<Activated, String>,
{
    let mut tl = Timeline::new(plan.stream_lost_at);
    telemetry::with(|t| t.failover_began(plan.stream_lost_at));
    suspect(plan);
    let mut stage = Stage::Arbitrate;
    let token = loop {
        stage = match stage {
            Stage::Arbitrate => after_arbiter(arbitrate(plan, arb, &mut tl)?),
            Stage::Fence(token) => after_fence(token, fence(plan, token, &mut tl)),
            Stage::Activate(token) => break token,
            Stage::Done(outcome) => return Ok(finish(plan, outcome, tl)),
        }
    };
    // Step 4: activate, holding the arbiter (and its lease, if any).
    telemetry::with(|t| t.set_failover_state(FailoverState::Activating));
    let activated = activate(arb.lease(), arb.heir_book()).map_err(FailoverError::Activate)?;
    tl.running = Some(tl.since_loss(activated.running_at));
    Ok(finish(plan, Outcome::Activated { token, activated }, tl))
}

fn finish(plan: &Plan, outcome: Outcome, timeline: Timeline) -> Failover {
    if !matches!(outcome, Outcome::Activated { .. }) {
        telemetry::with(|t| {
            t.set_failover_state(FailoverState::Refused);
            t.failover_step("refused", None);
        });
    }
    announce(plan, &outcome, &timeline);
    Failover { outcome, timeline }
}

/// Step 1: say whom we suspect and why.
fn suspect(plan: &Plan) {
    eprintln!("castor backup: suspect primary {}: {}", plan.peer, plan.why);
}

/// Step 2: campaign for the arbiter. A dying primary's lock is released
/// only when its process has exited: give it up to one heartbeat timeout,
/// plus the time a dead holder's lease takes to expire. Once won, no
/// earlier holder can change the heir record: read it.
fn arbitrate(
    plan: &Plan,
    arb: &mut dyn Arbiter,
    tl: &mut Timeline,
) -> Result<Arbitration, FailoverError> {
    let wait = plan.heartbeat_timeout + arb.takeover_wait();
    telemetry::with(|t| t.set_failover_state(FailoverState::Arbiter));
    let Some(token) = arb.acquire_within(wait, CAMPAIGN_POLL)? else {
        return Ok(Arbitration::Held {
            arbiter: arb.describe(),
            waited: wait,
        });
    };
    let won = tl.since_loss(Instant::now());
    tl.arbiter_won = Some(won);
    telemetry::with(|t| {
        t.set_arbiter(&arb.describe(), Some(token.0), arb.lease());
        t.failover_step("arbiter", Some(won));
    });
    eprintln!(
        "castor backup: arbiter {} won (fencing token {token}) {}",
        arb.describe(),
        ms(won)
    );
    let gate = super::lease::LeaseGate::new(arb.lease(), Duration::ZERO);
    let recorded = heir::read_while_held(&arb.heir_book(), &gate)?;
    if let Err(why) = heir::may_activate(plan.session, recorded.as_ref()) {
        return Ok(Arbitration::Stale {
            arbiter: arb.describe(),
            why,
        });
    }
    Ok(Arbitration::Won(token))
}

/// Step 3: the fence command, if any.
fn fence(plan: &Plan, token: FencingToken, tl: &mut Timeline) -> Fencing {
    let Some(cmd) = plan.fence_cmd else {
        return Fencing::Skipped;
    };
    telemetry::with(|t| t.set_failover_state(FailoverState::Fence));
    if let Err(e) = fence::run(cmd, token, plan.peer, plan.fence_timeout) {
        return Fencing::Failed(e);
    }
    let t = tl.since_loss(Instant::now());
    tl.fenced = Some(t);
    telemetry::with(|tm| tm.failover_step("fence", Some(t)));
    eprintln!("castor backup: fenced {}", ms(t));
    Fencing::Fenced
}

/// Last step: say how it ended.
fn announce(plan: &Plan, outcome: &Outcome, tl: &Timeline) {
    let from = plan.from_epoch;
    match outcome {
        Outcome::ArbiterHeld { arbiter, waited } => eprintln!(
            "castor backup: NOT ACTIVATING: the arbiter {arbiter} is still held by another copy after {} ms \
             (the primary is alive: a network partition, or it closed the connection but runs on). \
             Activating now would run two copies. The replica of epoch {from} stays saved in {}.",
            waited.as_millis(),
            plan.state_dir.display()
        ),
        Outcome::ReplicaStale { arbiter, why } => eprintln!(
            "castor backup: NOT ACTIVATING: the arbiter {arbiter}'s heir record says this replica (epoch \
             {from}) is stale: {why}. Activating it would step the service's state backwards. The \
             replica stays saved in {}.",
            plan.state_dir.display()
        ),
        Outcome::FenceFailed(e) => eprintln!(
            "castor backup: error: {e}. The replica of epoch {from} stays saved in {}.",
            plan.state_dir.display()
        ),
        Outcome::Activated { token, activated: a } => {
            let at = |d: Option<Duration>| ms(d.unwrap_or_default());
            eprintln!(
                "castor backup: failover: suspect → arbiter won (token {token}) {} → {} → activated {}",
                at(tl.arbiter_won),
                tl.fenced
                    .map_or("no fence command".to_string(), |d| format!("fenced {}", ms(d))),
                at(tl.running),
            );
            eprintln!(
                "castor backup: activated domain ran {} epochs past checkpoint {} (stream loss → guest running: {:.1} ms); \
                 stopped at epoch {}, digest {}, image in {}",
                a.epochs_run,
                a.from_epoch,
                tl.running.unwrap_or_default().as_secs_f64() * 1000.0,
                a.stopped_epoch,
                a.digest,
                plan.activated_dir.display()
            );
            if let Some(why) = &a.self_fenced {
                eprintln!("castor backup: activated copy self-fenced: {why}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::arbiter::{LocalLock, NoArbiter};

    fn plan<'a>(dir: &'a Path, fence_cmd: Option<&'a str>) -> Plan<'a> {
        Plan {
            peer: "192.0.2.1:7700",
            why: "stream broken",
            from_epoch: 7,
            session: Some("0a0b"),
            stream_lost_at: Instant::now(),
            heartbeat_timeout: Duration::from_millis(50),
            fence_cmd,
            fence_timeout: Duration::from_secs(10),
            state_dir: dir,
            activated_dir: dir,
        }
    }

    fn activated(self_fenced: Option<&str>) -> Activated {
        Activated {
            from_epoch: 7,
            running_at: Instant::now(),
            epochs_run: 3,
            stopped_epoch: 10,
            digest: "d".into(),
            self_fenced: self_fenced.map(String::from),
        }
    }

    #[test]
    fn held_arbiter_ends_without_activation_exit_3() {
        let s = after_arbiter(Arbitration::Held {
            arbiter: "local:/x".into(),
            waited: Duration::from_millis(500),
        });
        let Stage::Done(o) = s else {
            panic!("held arbiter must end the failover, got {s:?}")
        };
        assert_eq!(o.exit_status(), Some(exit::ARBITER_HELD));
        assert!(matches!(
            after_arbiter(Arbitration::Won(FencingToken(4))),
            Stage::Fence(FencingToken(4))
        ));
    }

    #[test]
    fn failed_fence_ends_without_activation_exit_4() {
        let failed = Fencing::Failed(FenceError::Failed {
            cmd: "false".into(),
            status: "exit status: 1".into(),
        });
        let s = after_fence(FencingToken(2), failed);
        let Stage::Done(o) = s else {
            panic!("failed fence must end the failover, got {s:?}")
        };
        assert_eq!(o.exit_status(), Some(exit::FENCE_FAILED));
        for ok in [Fencing::Skipped, Fencing::Fenced] {
            assert!(matches!(
                after_fence(FencingToken(2), ok),
                Stage::Activate(FencingToken(2))
            ));
        }
    }

    #[test]
    fn activated_exit_status_is_the_streams_unless_self_fenced() {
        let o = |sf| Outcome::Activated {
            token: FencingToken(1),
            activated: activated(sf),
        };
        assert_eq!(o(None).exit_status(), None);
        assert_eq!(
            o(Some("lease lapsed")).exit_status(),
            Some(exit::SELF_FENCED)
        );
    }

    #[test]
    fn arbiter_held_by_another_copy_never_activates() {
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("pair.lock");
        let mut holder = LocalLock::new(&lock);
        holder.try_acquire().unwrap().expect("holder wins");
        let mut arb = LocalLock::new(&lock);
        let f = run(&plan(d.path(), None), &mut arb, |_, _| {
            panic!("activated while another copy holds the arbiter")
        })
        .unwrap();
        assert_eq!(f.outcome.exit_status(), Some(exit::ARBITER_HELD));
        assert_eq!(f.timeline.arbiter_won, None);
        assert_eq!(f.timeline.running, None);
    }

    /// A backup that wins the lock activates only when the heir record
    /// left by the lock's last holder names its own session (or nothing).
    #[test]
    fn a_stale_replica_never_activates_exit_6() {
        use crate::ha::heir::Heir;
        let d = tempfile::tempdir().unwrap();
        let lock = d.path().join("pair.lock");
        let cases = [
            (None, true),
            (Some(Heir::Session("0a0b".into())), true),
            (Some(Heir::Nobody), false),
            (Some(Heir::Session("0c0d".into())), false),
        ];
        for (record, activates) in cases {
            {
                let mut primary = LocalLock::new(&lock);
                primary.try_acquire().unwrap().expect("primary wins");
                let book = primary.heir_book();
                let _ = std::fs::remove_file(crate::ha::arbiter::heir_path(&lock));
                if let Some(h) = &record {
                    book.name(h).unwrap();
                }
            } // the primary dies: its lock is released
            let mut arb = LocalLock::new(&lock);
            let mut called = false;
            let f = run(&plan(d.path(), None), &mut arb, |_, heirs| {
                called = true;
                assert!(heirs.records(), "the activated copy must record its heirs");
                Ok(activated(None))
            })
            .unwrap();
            assert_eq!(called, activates, "record {record:?}");
            if !activates {
                assert!(
                    matches!(f.outcome, Outcome::ReplicaStale { .. }),
                    "{:?}",
                    f.outcome
                );
                assert_eq!(f.outcome.exit_status(), Some(exit::REPLICA_STALE));
                assert_eq!(f.timeline.running, None);
            }
        }
    }

    #[test]
    fn failing_fence_command_never_activates() {
        let d = tempfile::tempdir().unwrap();
        let f = run(&plan(d.path(), Some("exit 7")), &mut NoArbiter, |_, _| {
            panic!("activated although the fence command failed")
        })
        .unwrap();
        assert!(matches!(
            f.outcome,
            Outcome::FenceFailed(FenceError::Failed { .. })
        ));
        assert_eq!(f.outcome.exit_status(), Some(exit::FENCE_FAILED));
        assert!(f.timeline.arbiter_won.is_some());
        assert_eq!(f.timeline.fenced, None);
    }

    #[test]
    fn full_sequence_records_ordered_step_times() {
        let d = tempfile::tempdir().unwrap();
        let p = plan(d.path(), Some("true"));
        let mut calls = 0;
        let f = run(&p, &mut NoArbiter, |lease, _| {
            calls += 1;
            assert!(lease.is_none(), "a none arbiter has no lease");
            Ok(activated(Some("lease lapsed")))
        })
        .unwrap();
        assert_eq!(calls, 1);
        assert_eq!(f.outcome.exit_status(), Some(exit::SELF_FENCED));
        let t = f.timeline;
        let (won, fenced, running) = (
            t.arbiter_won.unwrap(),
            t.fenced.unwrap(),
            t.running.unwrap(),
        );
        assert!(won <= fenced && fenced <= running, "{t:?}");
    }

    #[test]
    fn activation_error_is_passed_on() {
        let d = tempfile::tempdir().unwrap();
        let e = run(&plan(d.path(), None), &mut NoArbiter, |_, _| {
            Err("restoring the domain: boom".into())
        })
        .unwrap_err();
        assert_eq!(e.to_string(), "restoring the domain: boom");
    }
}
