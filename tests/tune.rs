//! `castor tune` and `--epoch auto`, driving the real binary on the sim
//! domain (short runs: the machine is shared).

mod common;

use std::path::Path;

use common::{castor, sim_unavailable};

fn stdout_of(args: &[&str]) -> String {
    let out = castor().args(args).output().expect("running castor");
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "castor {args:?} failed\nstdout:\n{so}\nstderr:\n{se}"
    );
    so.into_owned()
}

fn is_png(p: &Path) -> bool {
    std::fs::read(p).is_ok_and(|b| b.len() > 1000 && b.starts_with(b"\x89PNG\r\n\x1a\n"))
}

/// The command: three fixed epochs, one CSV row each with the
/// named columns, JSON, an interval log per configuration and the plots.
#[test]
fn tune_sweeps_epochs_into_csv_json_hlog_and_plots() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("t");
    let o = out.to_str().unwrap();
    let text = stdout_of(&[
        "tune",
        "--domain",
        "sim:mem=256MiB,workload=edits,rate=50000",
        "--epochs",
        "10ms,25ms,50ms",
        "--duration",
        "3s",
        "--out",
        o,
    ]);
    assert!(text.contains("e25ms-k2-lz4-tcp"), "{text}");
    let csv = std::fs::read_to_string(out.join("tune.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    for col in [
        "epoch_ms",
        "epochs_per_s",
        "guest_speed_ratio",
        "pause_p50_us",
        "pause_p99_us",
        "checkpoint_latency_p99_us",
        "output_latency_p99_us",
        "wire_bytes_per_s",
        "cpu_primary_per_s",
        "cpu_backup_per_s",
    ] {
        assert!(header.contains(&col), "column {col} missing: {header:?}");
    }
    let col = |row: &[&str], name: &str| -> f64 {
        let i = header.iter().position(|h| *h == name).unwrap();
        row[i]
            .parse()
            .unwrap_or_else(|_| panic!("{name}={:?}", row[i]))
    };
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3, "{csv}");
    let epochs: Vec<f64> = rows.iter().map(|r| col(r, "epoch_ms")).collect();
    assert_eq!(epochs, [10.0, 25.0, 50.0]);
    for r in &rows {
        let digest = header.iter().position(|h| *h == "digest_match").unwrap();
        assert_eq!(r[digest], "true", "replica mismatch: {r:?}");
        assert!(col(r, "pause_p99_us") > 0.0 && col(r, "wire_bytes_per_s") > 0.0);
    }
    // Fewer checkpoints per second with longer epochs: the sweep varied.
    assert!(col(&rows[0], "epochs_per_s") > col(&rows[2], "epochs_per_s"));
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("tune.json")).unwrap()).unwrap();
    assert_eq!(json["rows"].as_array().unwrap().len(), 3);
    for png in [
        "latency_vs_epoch.png",
        "guest_speed_vs_epoch.png",
        "wire_vs_epoch.png",
    ] {
        assert!(is_png(&out.join(png)), "{png} missing or not a PNG");
    }
    let run: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("runs/e10ms-k2-lz4-tcp-r1.json")).expect("each run's report"),
    )
    .unwrap();
    assert_eq!(run["digest_match"], true);
    assert!(
        run.get("per_epoch").is_none(),
        "epoch records stay in hlog/"
    );
    let hlog = std::fs::read_to_string(out.join("hlog/e10ms-k2-lz4-tcp.hlog")).unwrap();
    assert!(hlog.contains("#[StartTime: "), "{hlog}");
    assert!(hlog.contains("Tag=pause,") && hlog.contains("Tag=checkpoint_latency,"));
}

/// `bench --epoch auto` on a phased workload with synthetic output: the
/// report names the policy and the epoch lengths it chose, which vary
/// with the phases (short while the guest talks, long while it only
/// writes), within the bounds given; the interval log is written.
#[test]
fn bench_epoch_auto_reports_the_lengths_it_chose() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (json, hlog) = (dir.path().join("r.json"), dir.path().join("r.hlog"));
    let text = stdout_of(&[
        "bench",
        "--domain",
        "sim:mem=64MiB,workload=edits,rate=20000,out=10,phase=600ms",
        "--duration",
        "4s",
        "--epoch",
        "auto:target=15ms,min=5ms,max=80ms",
        "--json",
        json.to_str().unwrap(),
        "--hlog",
        hlog.to_str().unwrap(),
    ]);
    assert!(text.contains("epoch length µs"), "{text}");
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["digest_match"], true);
    assert!(
        r["epoch_policy"]
            .as_str()
            .unwrap()
            .starts_with("auto:target=15ms"),
        "{}",
        r["epoch_policy"]
    );
    let len = &r["epoch_len_us"];
    let (p50, p99) = (len["p50"].as_u64().unwrap(), len["p99"].as_u64().unwrap());
    // Talking phases: at most target (15 ms) plus scheduling slack.
    assert!((4_000..=25_000).contains(&p50), "p50 {p50} µs");
    // Write-only phases: grown towards max (80 ms).
    assert!(p99 >= 40_000, "p99 {p99} µs: the epoch never grew");
    assert!(
        r["output"]["released"].as_u64().unwrap() > 100,
        "{}",
        r["output"]
    );
    assert!(
        r.get("per_epoch").is_none(),
        "--hlog alone must not add per_epoch"
    );
    let h = std::fs::read_to_string(&hlog).unwrap();
    assert!(h.contains("Tag=pause,"), "{h}");
}

/// The cut: with a target of 200 ms the nominal epoch of a talking guest
/// is ~200 ms, but held output ends each epoch `delay` after its first
/// frame (never before `min`), so the epochs run and the output waits far
/// less than the nominal length. Without the held-output wake-up both
/// would be ~200 ms. Each epoch's record counts the frames the guest
/// emitted in it: every frame after the seed in exactly one record.
#[test]
fn auto_cuts_an_epoch_short_when_its_output_is_held() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    stdout_of(&[
        "bench",
        "--domain",
        "sim:mem=64MiB,workload=edits,rate=2000,out=1",
        "--duration",
        "3s",
        "--epoch",
        "auto:target=200ms,min=5ms,max=200ms,delay=1ms",
        "--per-epoch",
        "--json",
        json.to_str().unwrap(),
    ]);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(r["digest_match"], true);
    let len_p50 = r["epoch_len_us"]["p50"].as_u64().unwrap();
    assert!(len_p50 < 50_000, "epoch p50 {len_p50} µs: epochs not cut");
    // Frames emitted during the seed belong to no checkpoint epoch: the
    // records count at most every frame, and at 2,000 frames/s for 3 s
    // after a seed of well under a second, most of them.
    let recs = r["per_epoch"].as_array().expect("per_epoch records");
    let counted: u64 = recs
        .iter()
        .map(|e| e["output_frames"].as_u64().unwrap())
        .sum();
    let items = r["output"]["items"].as_u64().unwrap();
    assert!(
        counted <= items && counted * 10 >= items * 8,
        "records count {counted} frames of {items} emitted"
    );
    let out = &r["output"]["release_delay_steady_us"];
    let delay_p50 = out["p50"].as_u64().unwrap();
    assert!(
        delay_p50 < 60_000,
        "release delay p50 {delay_p50} µs: {out}"
    );
}

#[test]
fn bad_epoch_values_are_refused_naming_them() {
    for (v, needle) in [
        ("auto:speed=3", "unknown key"),
        ("auto:target=abc", "target=abc"),
        ("0ms", "\"0ms\""),
    ] {
        let out = castor()
            .args(["bench", "--duration", "1s", "--epoch", v])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{v}: {err}");
    }
}
