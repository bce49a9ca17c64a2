//! Bad command-line values are refused up front with a message that names
//! the option and the value, before anything runs.

mod common;

use common::{castor, output_within, EXIT_PATIENCE};

fn refused(args: &[&str]) -> String {
    let out = output_within(castor().args(args), EXIT_PATIENCE);
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// `castor backup` on a fresh state directory with `extra` arguments.
fn backup_refused(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "backup",
        "--listen",
        "127.0.0.1:0",
        "--state-dir",
        dir.path().to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    refused(&args)
}

#[test]
fn core_lists_are_checked() {
    let e = refused(&["bench", "--cores", "4096"]);
    assert!(e.contains("core 4096 is not available"), "{e}");
    let e = refused(&["bench", "--cores", "1-0"]);
    assert!(e.contains("runs backwards"), "{e}");
    let e = refused(&["bench", "--cores", "x"]);
    assert!(e.contains("\"x\" is not a core number"), "{e}");
    let e = refused(&["bench", "--cores", "0", "--no-pin"]);
    assert!(e.contains("--no-pin") && e.contains("--cores"), "{e}");
}

#[test]
fn decode_lanes_are_checked() {
    for bad in ["0", "65", "x"] {
        let e = backup_refused(&["--decode-lanes", bad]);
        assert!(e.contains("--decode-lanes") && e.contains(bad), "{e}");
        let e = refused(&["bench", "--decode-lanes", bad]);
        assert!(e.contains("--decode-lanes") && e.contains(bad), "{e}");
    }
}

#[test]
fn heartbeat_interval_must_leave_two_beats_per_timeout() {
    let e = backup_refused(&["--heartbeat-interval", "300ms"]);
    assert!(
        e.contains("--heartbeat-interval vs --heartbeat-timeout"),
        "{e}"
    );
    let e = refused(&[
        "protect",
        "--domain",
        "sim:mem=1MiB",
        "--backup",
        "127.0.0.1:1",
        "--heartbeat-interval",
        "2s",
    ]);
    assert!(
        e.contains("--heartbeat-interval vs --backup-timeout"),
        "{e}"
    );
}

#[test]
fn reprotect_needs_an_explicit_arbiter() {
    let e = backup_refused(&["--activate", "--reprotect", "127.0.0.1:9"]);
    assert!(e.contains("--arbiter"), "{e}");
}

/// A bench whose domain cannot be opened (here a Xen guest, refused by a
/// build without the `xen` feature or a host without Xen) fails after its
/// backup child started: that child must not outlive it (it used to wait
/// for a primary forever; CI found one a test had left behind).
#[test]
fn a_bench_that_fails_leaves_no_backup_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = output_within(
        castor().env("TMPDIR", tmp.path()).args([
            "bench",
            "--domain",
            "xen:name=no-such-guest",
            "--duration",
            "1s",
        ]),
        EXIT_PATIENCE,
    );
    assert!(!out.status.success());
    let marker = tmp.path().to_str().unwrap().to_string();
    let left: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            e.file_name().to_str()?.parse::<u32>().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            cmd.contains(&marker).then_some(cmd)
        })
        .collect();
    assert!(left.is_empty(), "still running: {left:?}");
}
