//! The report of a run: the human-readable table (`bench`, `demo`) and the
//! JSON file (`--json` of `bench` and `protect`; the stable shape of
//! [`Summary`], documented in docs/).

use std::path::{Path, PathBuf};

use crate::metrics::{Pct, Summary};

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Writes the JSON report.
pub fn write_json(path: &Path, s: &Summary) -> Result<(), ReportError> {
    let j = serde_json::to_vec_pretty(s).expect("summary serialises");
    std::fs::write(path, j).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Prints the human-readable report table.
pub fn print_table(s: &Summary) {
    let pct = |p: &Pct| format!("{:>8} {:>8} {:>8}", p.p50, p.p99, p.max);
    println!("domain            {}", s.domain);
    println!(
        "transport         {}{}, epoch {}, max in flight {}, {} encode workers",
        s.transport,
        if s.records.is_empty() {
            String::new()
        } else {
            format!(" (records: {})", s.records)
        },
        s.epoch_policy,
        s.max_inflight,
        s.workers
    );
    println!(
        "run               {:.1} s, {} epochs, {:.1} epochs/s, {} extended ({} ms waiting for acks)",
        s.duration_s,
        s.epochs,
        s.epochs_per_s,
        s.extended_epochs,
        s.extension_us_total / 1000
    );
    if s.budget_ended_epochs + s.budget_held_epochs > 0 {
        println!(
            "pause budget      {} epochs ended at it, {} held at it (throttled hard waiting for acks)",
            s.budget_ended_epochs, s.budget_held_epochs
        );
    }
    println!(
        "seed              {:.1} ms, {} on the wire, first pass {} pages",
        s.seed_ms,
        crate::units::fmt_bytes(s.seed_wire_bytes),
        s.seed_first_pass_pages
    );
    println!("                       p50      p99      max");
    println!("epoch length µs   {}", pct(&s.epoch_len_us));
    println!("dirty pages/epoch {}", pct(&s.dirty_pages_per_epoch));
    println!("pause µs          {}", pct(&s.pause_us));
    println!("  harvest µs      {}", pct(&s.harvest_us));
    println!("  copy µs         {}", pct(&s.copy_us));
    println!("  state µs        {}", pct(&s.state_us));
    if let Some(m) = &s.memcpy_us {
        println!(
            "plain memcpy µs   {}   (same dirty sets, one thread, after the run)",
            pct(m)
        );
    }
    println!("encode µs (cpu)   {}", pct(&s.encode_us));
    println!("send µs           {}", pct(&s.send_us));
    println!("ckpt latency µs   {}", pct(&s.checkpoint_latency_us));
    println!(
        "wire              {} of {} raw dirty bytes ({:.2}%), {:.0} bytes per dirty page",
        crate::units::fmt_bytes(s.wire_bytes),
        crate::units::fmt_bytes(s.raw_bytes),
        s.wire_ratio * 100.0,
        s.wire_bytes_per_dirty_page
    );
    println!(
        "pages             {} delta, {} full, {} zero, {} unchanged",
        s.pages_delta, s.pages_full, s.pages_zero, s.pages_unchanged
    );
    if let Some(o) = &s.output {
        println!(
            "output            {} released ({} held), {} dropped; release delay µs p50 {} p99 {} max {}",
            o.released,
            o.held,
            o.dropped + o.late,
            o.release_delay_us.p50,
            o.release_delay_us.p99,
            o.release_delay_us.max
        );
    }
    println!(
        "cpu               primary {:.2} s, backup {:.2} s",
        s.cpu.primary_s, s.cpu.backup_s
    );
    println!(
        "primary digest    {} (epoch {})",
        s.primary_digest, s.acked_epoch
    );
    println!(
        "replica digest    {} (epoch {})",
        s.replica_digest, s.replica_epoch
    );
    println!(
        "replica           {}",
        if s.digest_match {
            "MATCHES the primary"
        } else {
            "DOES NOT MATCH the primary"
        }
    );
}
