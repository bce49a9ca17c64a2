//! `castor demo` (the first command of the README) shows a failover: the
//! client's counter continues on the activated copy, never stepping back or
//! repeating, and the timeline names every step.

mod common;
use common::*;

#[test]
fn demo_kills_the_primary_and_the_counter_continues() {
    if sim_unavailable() {
        return;
    }
    let out = output_within(
        castor().args(["demo", "--before", "4s", "--after", "2s"]),
        EXIT_PATIENCE,
    );
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n--- stderr ---\n{stderr}"
    );
    assert!(
        stdout.contains("CONTINUES: every answer is the previous one plus one"),
        "{stdout}"
    );
    assert!(
        stdout.contains("(0 steps back, 0 repeats, 0 gaps)"),
        "{stdout}"
    );
    // The timeline, in order.
    let pos = |step: &str| {
        stdout
            .lines()
            .position(|l| l.trim_start().starts_with(step))
            .unwrap_or_else(|| panic!("no {step:?} step in:\n{stdout}"))
    };
    let order = [
        pos("primary killed"),
        pos("suspect"),
        pos("arbiter"),
        pos("fence"),
        pos("running"),
        pos("first_output"),
        pos("first reply"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{stdout}");
    // The client's first answer after the kill came from the activated copy
    // and continued the count.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("client "))
        .expect("client line");
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    // "N answers; last from the primary A, first from the activated copy B"
    assert_eq!(nums[2], nums[1] + 1, "{line}");
    assert!(stderr.contains("castor backup: ACTIVATED"), "{stderr}");
}
