//! `--metrics ADDR`: the Prometheus endpoint and `/status` of running castor
//! processes, checked by `promtool check metrics` and scraped by a real
//! Prometheus server (Debian's `prometheus`) whose HTTP API is queried.

mod common;
use common::lines::Lines;
use common::*;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `GET path` on `addr`: the body of a 200 answer, or None.
fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = TcpStream::connect(addr).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    c.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut r = String::new();
    c.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// The value of sample `name` (with its labels, exactly) in `text`.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == name).then(|| v.parse().ok())?
    })
}

/// The address a castor process announced on its stderr line
/// "metrics on http://ADDR/metrics".
fn metrics_addr(line: &str) -> String {
    line.split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no metrics address in {line:?}"))
        .to_string()
}

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("SKIP part: {tool} not installed (Debian package prometheus)");
    }
    ok
}

fn promtool_check(text: &str) {
    if !have("promtool") {
        return;
    }
    let mut c = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{said}"
    );
    // promtool prints lint findings (bad names, missing units) and still
    // exits 0 for some of them: none is acceptable.
    assert!(said.trim().is_empty(), "promtool findings:\n{said}");
}

#[test]
fn bench_serves_metrics_while_it_runs() {
    if sim_unavailable() {
        return;
    }
    let mut b = Reaped::spawn(
        castor()
            .args([
                "bench",
                "--domain",
                "sim:mem=32MiB,workload=edits,rate=20000",
                "--duration",
                "6s",
                "--metrics",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let err = Lines::watch(b.0.stderr.take().unwrap());
    let addr = metrics_addr(&err.wait_for("metrics on http://", Duration::from_secs(20)));
    // Scrape until epochs have been acknowledged (the run lasts 6 s).
    let t0 = Instant::now();
    let text = loop {
        let text = http_get(&addr, "/metrics").expect("/metrics answers during the run");
        if sample(&text, "castor_epochs_total").unwrap_or(0.0) >= 5.0 {
            break text;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "no epochs:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        b.0.try_wait().unwrap().is_none(),
        "scraped while the run goes on"
    );
    let pauses = sample(&text, "castor_pause_seconds_count").unwrap();
    assert!(pauses >= 5.0, "{text}");
    // Every pause lands in some bucket at or below 1 s.
    assert_eq!(
        sample(&text, "castor_pause_seconds_bucket{le=\"1\"}"),
        Some(pauses),
        "{text}"
    );
    assert!(sample(&text, "castor_pause_seconds_bucket{le=\"0.0001\"}").is_some());
    assert!(sample(&text, "castor_wire_bytes_total").unwrap() > 0.0);
    assert!(sample(&text, "castor_raw_bytes_total").unwrap() > 0.0);
    assert_eq!(sample(&text, "castor_backup_connected"), Some(1.0));
    // Fed by the throttle (0 unless the pipeline fell behind, which a
    // loaded machine can make happen): a fraction either way.
    let throttle = sample(&text, "castor_throttle_ratio").unwrap();
    assert!((0.0..=1.0).contains(&throttle), "{text}");
    assert_eq!(sample(&text, "castor_role{role=\"bench\"}"), Some(1.0));
    promtool_check(&text);
    let st: serde_json::Value = serde_json::from_str(&http_get(&addr, "/status").unwrap()).unwrap();
    assert_eq!(st["role"], "bench");
    assert!(st["acked_epoch"].as_u64().unwrap() > 0, "{st}");
    assert!(b.wait_within(EXIT_PATIENCE).success(), "{}", err.text());
}

/// Writes a Prometheus config scraping `targets` every 500 ms.
fn prometheus_config(dir: &Path, targets: &[&str]) -> std::path::PathBuf {
    let list: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
    let p = dir.join("prometheus.yml");
    std::fs::write(
        &p,
        format!(
            "global:\n  scrape_interval: 500ms\n  scrape_timeout: 400ms\nscrape_configs:\n  - job_name: castor\n    static_configs:\n      - targets: [{}]\n",
            list.join(", ")
        ),
    )
    .unwrap();
    p
}

/// `query` through Prometheus' HTTP API: the first result's value.
fn prom_query(prom: &str, query: &str) -> Option<f64> {
    let q: String = query
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(prom, &format!("/api/v1/query?query={q}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_a_running_pair() {
    if sim_unavailable() || !have("prometheus") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock = format!("local:{}", dir.path().join("arb.lock").display());
    let backup = Backup::start_with(
        &dir.path().join("replica"),
        &["--metrics", "127.0.0.1:0"],
        KEY,
    );
    let mut backup = backup;
    let berr = Lines::watch(backup.child.stderr.take().unwrap());
    let baddr = metrics_addr(&berr.wait_for("metrics on http://", Duration::from_secs(10)));
    let mut p = Reaped::spawn(
        castor()
            .args([
                "protect",
                "--domain",
                "sim:mem=32MiB,workload=edits,rate=20000",
                "--backup",
                &backup.addr,
                "--arbiter",
                &lock,
                "--metrics",
                "127.0.0.1:0",
                "--duration",
                "60s",
            ])
            .stderr(Stdio::piped()),
    );
    let perr = Lines::watch(p.0.stderr.take().unwrap());
    let paddr = metrics_addr(&perr.wait_for("metrics on http://", Duration::from_secs(10)));
    perr.wait_for("acked", Duration::from_secs(20));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom = format!("127.0.0.1:{port}");
    let cfg = prometheus_config(dir.path(), &[&paddr, &baddr]);
    let _server = Reaped::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={prom}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    // Both targets up, the primary's acknowledged epochs growing, and
    // enough samples for a rate of its pause histogram.
    let p99_query = "histogram_quantile(0.99, sum(rate(castor_pause_seconds_bucket[10s])) by (le))";
    let t0 = Instant::now();
    let (mut up, mut acked, mut p99) = (0.0, 0.0, None);
    while t0.elapsed() < Duration::from_secs(90) {
        up = prom_query(&prom, "sum(up{job=\"castor\"})").unwrap_or(0.0);
        acked = prom_query(
            &prom,
            &format!("castor_acked_epoch{{instance=\"{paddr}\"}}"),
        )
        .unwrap_or(0.0);
        p99 = prom_query(&prom, p99_query).filter(|v| v.is_finite());
        if up == 2.0 && acked > 10.0 && p99.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(up, 2.0, "both castor targets up in Prometheus");
    assert!(acked > 10.0, "acked epoch through Prometheus: {acked}");
    let committed = prom_query(
        &prom,
        &format!("castor_epochs_total{{instance=\"{baddr}\"}}"),
    );
    assert!(
        committed.unwrap_or(0.0) > 0.0,
        "the backup's committed epochs"
    );
    assert!(
        p99.is_some_and(|v| v > 0.0 && v <= 1.0),
        "pause p99 {p99:?}"
    );
    let st: serde_json::Value = serde_json::from_str(&castor_status(&baddr)).unwrap();
    assert_eq!(st["role"], "backup");
    assert_eq!(st["peer_connected"], true, "{st}");
    drop(p);
    drop(backup);
}

/// `castor status --metrics ADDR --json`.
fn castor_status(addr: &str) -> String {
    let out = output_within(
        castor().args(["status", "--metrics", addr, "--json"]),
        EXIT_PATIENCE,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
