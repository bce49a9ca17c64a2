//! The pause budget (`--pause-target`) through the real binary: a guest
//! that dirties pages faster than a budget allows gets its epochs ended at
//! the budget (or throttled hard), so its dirty sets, and with them its
//! pauses' copies, stay bounded; the replica still equals the primary.

mod common;
use common::*;

/// The budget never falls below this many pages (`budget::MIN_PAGES`); a
/// pause target of 50 µs asks for less, so the budget is exactly this on
/// any machine, however fast its copies.
const MIN_BUDGET: u64 = 1024;

#[test]
fn epochs_end_at_the_pause_budget() {
    if sim_unavailable() {
        return;
    }
    // 100,000 rewrites/s of a 64 MiB guest: about 2,500 pages per 25 ms
    // epoch when unbounded, against a budget of 1,024.
    let v = bench_json(&[
        "--domain",
        "sim:mem=64MiB,workload=uniform,rate=100000",
        "--compress",
        "none",
        "--duration",
        "3s",
        "--pause-target",
        "50us",
        "--per-epoch",
    ]);
    assert_eq!(v["digest_match"], true, "{v}");
    let epochs = v["per_epoch"].as_array().expect("per_epoch records");
    assert!(epochs.len() >= 20, "{} epochs", epochs.len());
    for e in epochs {
        assert_eq!(e["budget_pages"], MIN_BUDGET, "{e}");
    }
    let ended = v["budget_ended_epochs"].as_u64().unwrap();
    let held = v["budget_held_epochs"].as_u64().unwrap();
    assert!(ended + held > 0, "the budget never acted: {v}");
    // Structural bound: an epoch that reached the budget ends (or stops
    // growing) within a poll and a harvest's share; 9 of 10 epochs must
    // be within half a budget of it (a descheduled epoch thread lets a few
    // overshoot on a loaded host). Unbounded, the median is about 2,500.
    let mut dirty: Vec<u64> = epochs
        .iter()
        .map(|e| e["dirty_pages"].as_u64().unwrap())
        .collect();
    dirty.sort_unstable();
    let p90 = dirty[dirty.len() * 9 / 10];
    assert!(
        p90 <= MIN_BUDGET * 3 / 2,
        "dirty pages p90 {p90} over a budget of {MIN_BUDGET}: {dirty:?}"
    );
}

#[test]
fn bad_pause_targets_are_refused_by_name() {
    for bad in ["0ms", "5s", "soon"] {
        let out = output_within(
            castor().args(["bench", "--pause-target", bad, "--duration", "1s"]),
            EXIT_PATIENCE,
        );
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
    }
}
