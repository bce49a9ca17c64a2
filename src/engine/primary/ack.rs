//! The ack thread (`castor-ack`): the only reader of the connection. It
//! matches each Ack to the oldest checkpoint in flight, commits that
//! epoch's output, and records the checkpoint's latency.
//!
//! Invariants:
//! - Acks arrive in epoch order: an Ack for anything but the oldest epoch in
//!   flight fails the session (a backup that skipped or repeated one).
//! - Output of epoch N is committed (`Committer::commit`) before `acked`
//!   moves to N, so a clean stop, which waits for the final ack and then
//!   switches the queue's mode, finds the commit queued first.
//! - Every record read (ack, heartbeat) counts as a sign of life for the
//!   silence watchdog ([`super::watch`]).

use std::sync::Arc;
use std::time::Instant;

use super::shared::Shared;
use crate::outq::Committer;
use crate::transport::record::{RecordError, RecordKind, RecordReader};

/// Owns the receiving half: acks complete in-flight epochs.
pub(super) fn ack_thread<R: std::io::Read>(
    mut reader: RecordReader<R>,
    shared: Arc<Shared>,
    output: Committer,
) {
    loop {
        let rec = match reader.next() {
            Ok(r) => r,
            Err(RecordError::Eof) => return shared.fail("backup closed the connection".into()),
            Err(e) => return shared.fail(format!("reading from backup: {e}")),
        };
        *shared.heard.lock().unwrap() = Instant::now();
        match rec.kind {
            RecordKind::Ack => {
                if let Err(reason) = on_ack(&shared, &output, rec.epoch) {
                    return shared.fail(reason);
                }
            }
            RecordKind::Heartbeat => {}
            RecordKind::Error => {
                return shared.refuse(format!(
                    "backup reported: {}",
                    String::from_utf8_lossy(rec.payload)
                ))
            }
            other => return shared.fail(format!("unexpected {other:?} record from backup")),
        }
    }
}

/// The backup holds checkpoint `epoch` whole: commit its output, publish
/// the ack, record the checkpoint's measurements. Err: why the ack is wrong.
fn on_ack(shared: &Shared, output: &Committer, epoch: u64) -> Result<(), String> {
    let mut g = shared.inflight.lock().unwrap();
    let Some((&oldest, _)) = g.pending.iter().next() else {
        return Err(format!(
            "backup acknowledged epoch {epoch}, which is not in flight"
        ));
    };
    if oldest != epoch {
        return Err(format!(
            "backup acknowledged epoch {epoch} while the oldest in flight is {oldest}"
        ));
    }
    let entry = g.pending.remove(&epoch).expect("checked above");
    let inflight = g.pending.len();
    // Output commit: the backup holds checkpoint `epoch` whole,
    // so the output it produced may leave. Sent before `acked`
    // is published, so a clean stop (which waits for the final
    // ack, then shuts the queue) finds the commit queued first.
    // Read before the commit, which may release output at once.
    let acked_at_ns = crate::metrics::mono_ns();
    output.commit(epoch);
    g.acked = Some(epoch);
    g.last_ack_at = Some(Instant::now());
    shared.cv.notify_all();
    drop(g);
    if epoch > 0 {
        let mut r = entry.record;
        r.latency_us = entry.pause_start.elapsed().as_micros() as u64;
        r.acked_at_ns = acked_at_ns;
        shared.metrics.lock().unwrap().add(&r);
        crate::ops::telemetry::with(|t| t.epoch_acked(&r));
    }
    crate::ops::telemetry::with(|t| t.set_inflight(inflight));
    Ok(())
}
