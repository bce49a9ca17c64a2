//! The Xen lab (Xen 4.17 under QEMU, Debian's kernel as PV dom0 with
//! xenstored and xenconsoled running; docs/lab.md):
//! - it boots, `xl info` answers, and a PV domU (the same kernel with a
//!   busybox initramfs) is created with `xl create`, prints its line on its
//!   console and is destroyed (tools/lab/guest/xen-domu-smoke);
//! - `castor bench --domain xen:name=...,suspend=xenstore` replicates a PVH
//!   domU whose init keeps rewriting memory (tools/lab/xen-castor-bench):
//!   log-dirty through HAP, foreign mapping, each epoch the guest's own
//!   suspend (xenstore control/shutdown), harvest, copy, state and fast
//!   resume, and the replica's digest equals the primary's (it did not
//!   before the shared-info page, which Xen writes behind log-dirty,
//!   joined every harvest);
//! - the same bench on a PV domU under a hypervisor built with shadow
//!   paging (`tools/lab/run --xen-shadow`; Debian's has none, and a PV
//!   guest's log-dirty is shadow paging): replica digest equal;
//! - failover (tools/lab/xen-failover): the backup builds the replica
//!   domain of a PVH guest at activation after the primary castor is
//!   SIGKILLed, the guest's own memory self-check passes there, and a
//!   client in dom0 keeps its one TCP connection to the guest's counter
//!   across the failover (output held on the guest's vif by NFQUEUE);
//! - the same failover of a PV domU under the shadow-paging hypervisor:
//!   the backup writes the checkpoint as a Xen save file and builds the
//!   replica with `xl restore -p`;
//! - the same failover of an HVM domU with QEMU (qemu-xen) as its device
//!   model: the primary saves QEMU's device state over QMP in each pause,
//!   and the backup writes an HVM save file with it for `xl restore -p`.
//!
//! All skip only when qemu-system-x86_64 is missing (the PV bench also
//! when apt knows no Xen source to build the shadow hypervisor from).
//! Plus, without the `xen` feature: what castor says about a `xen:` domain.

mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::lab::{lab_run, lab_run_unchecked, lab_unavailable, repo};

#[test]
fn xen_lab_boots_and_runs_a_pv_domu() {
    if lab_unavailable() {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let res = lab_run(
        &["--xen", "--timeout", "900"],
        out.path(),
        &["sh", "-c", "xl info && xen-domu-smoke"],
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    let caps = stdout
        .lines()
        .find(|l| l.starts_with("virt_caps"))
        .unwrap_or_else(|| panic!("xl info printed no virt_caps:\n{stdout}"));
    assert!(caps.contains("pv"), "{caps}");
    assert!(stdout.contains("xen_version            : 4.17"), "{stdout}");
    assert!(
        stdout.contains("castor-lab domU up"),
        "the domU's console line is missing:\n{stdout}"
    );
    assert!(stdout.contains("domU destroyed"), "{stdout}");
}

/// castor built with the `xen` feature (tools/lab/build-castor-xen: its own
/// target directory, or $CASTOR_LAB_XEN_BIN as CI builds it), once.
fn xen_castor() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(repo().join("tools/lab/build-castor-xen"))
            .output()
            .expect("running tools/lab/build-castor-xen");
        assert!(
            out.status.success(),
            "building castor with --features xen failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
}

#[test]
fn castor_bench_replicates_a_pvh_domu() {
    if lab_unavailable() {
        return;
    }
    // HAP: the PVH guest logs dirty pages through nested paging.
    bench_replicates("--xen", "pvh", "hap");
}

/// Runs `tools/lab/xen-castor-bench KIND xenstore` in the lab booted with
/// `profile` and checks the report: acked epochs with the writer's pages
/// dirty, the replica's digest equal to the primary's, and the guest
/// running on after castor. `marker` must appear in the lab's output (what
/// makes log-dirty possible there). The guest triple-faulting inside its
/// own suspend (the emulated x2APIC; see xen_failover_of_a_pvh_domu) is
/// retried; any other failure fails the test.
fn bench_replicates(profile: &str, kind: &str, marker: &str) {
    let castor = xen_castor().to_str().unwrap().to_string();
    let (out, res) = retrying_a_guest_crash(
        || {
            let out = tempfile::tempdir().unwrap();
            let res = lab_run_unchecked(
                &[profile, "--timeout", "900", "--castor", &castor],
                out.path(),
                &["sh", "tools/lab/xen-castor-bench", kind, "xenstore"],
            );
            (out, res)
        },
        guest_crashed_in_suspend,
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(res.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.contains(marker),
        "no {marker:?} in the lab's output:\n{stdout}"
    );
    let report = std::fs::read_to_string(out.path().join(format!("bench-{kind}-xenstore.json")))
        .unwrap_or_else(|e| panic!("no bench report ({e}):\n{stdout}"));
    let v: serde_json::Value = serde_json::from_str(&report).expect("bench JSON");
    let ctx = || format!("report:\n{report}\nstdout:\n{stdout}");
    assert!(v["epochs"].as_u64().unwrap() >= 2, "{}", ctx());
    // The guest's writer rewrites 256 pages five times a second: log-dirty
    // must have reported them.
    assert!(v["dirty_pages"].as_u64().unwrap() >= 64, "{}", ctx());
    let (p, r) = (&v["primary_digest"], &v["replica_digest"]);
    assert!(p.as_str().is_some_and(|s| s.len() == 64), "{}", ctx());
    assert_eq!(p, r, "replica differs from the primary: {}", ctx());
    assert_eq!(v["replica_epoch"], v["acked_epoch"], "{}", ctx());
    assert_eq!(v["digest_match"], true, "{}", ctx());
    assert!(
        stdout.contains(&format!("after castor: lab-{kind}")) && !stdout.contains("left paused"),
        "the guest must run on after castor: {stdout}"
    );
}

/// The lab can boot a hypervisor with shadow paging only when apt can
/// fetch Xen's source (tools/lab/build-xen-shadow; .ci/run adds the deb-src
/// entries): skips, saying why, when it cannot.
fn shadow_hypervisor_unavailable() -> bool {
    let out = Command::new("apt-cache").args(["showsrc", "xen"]).output();
    let found = out.is_ok_and(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with("Version: 4.17."))
    });
    if !found {
        eprintln!(
            "SKIP: apt knows no xen 4.17 source (no deb-src entry; .ci/run adds one), so the lab \
             cannot build a hypervisor with shadow paging for a PV guest's log-dirty"
        );
    }
    !found
}

/// A PV domU (the same kernel and writer, `type = "pv"`) under the lab's
/// hypervisor built with shadow paging (`tools/lab/run --xen-shadow`):
/// log-dirty is enabled through shadow paging (Debian's hypervisor
/// refuses with EOPNOTSUPP), the p2m-mapped memory is harvested and
/// copied every epoch, and the replica's digest equals the primary's.
/// `suspend=xenstore`: the guest's own suspend, as a failover needs.
#[test]
fn castor_bench_replicates_a_pv_domu_with_shadow_paging() {
    if lab_unavailable() || shadow_hypervisor_unavailable() {
        return;
    }
    bench_replicates("--xen-shadow", "pv", "hypervisor: shadow");
}

/// The guest died while castor waited for it to suspend (castor names it;
/// under TCG it is the guest's triple fault in its own suspend path).
fn guest_crashed_in_suspend(output: &str) -> bool {
    output.contains("while castor waited for a suspend")
}

/// Runs `run` until it succeeds or fails for another reason than the
/// guest's crash `crashed` recognises in its output; that one emulation
/// fault (docs/xen.md) is retried at most three times, and said (stop 17:
/// the HVM guest crashed so in three attempts in a row on a new machine,
/// then passed at its first attempt on the same build).
fn retrying_a_guest_crash(
    mut run: impl FnMut() -> (tempfile::TempDir, Output),
    crashed: impl Fn(&str) -> bool,
) -> (tempfile::TempDir, Output) {
    for attempt in 1.. {
        let (out, res) = run();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&res.stdout),
            String::from_utf8_lossy(&res.stderr)
        );
        if res.status.success() || !crashed(&all) || attempt == 4 {
            return (out, res);
        }
        eprintln!(
            "attempt {attempt}: the guest crashed in its own suspend (an emulation fault, not \
             castor's); retrying:\n{all}"
        );
    }
    unreachable!("the loop returns by its fourth attempt")
}

/// Failover of a real Xen guest (tools/lab/xen-failover): a PVH domU whose
/// init keeps rewriting memory and checking it against a record in its own
/// memory, protected by `castor protect` (suspend=xenstore) against
/// `castor backup --activate` on the same Xen host; the primary castor is
/// SIGKILLed, the backup fences (destroys the primary domain), builds the
/// replica domain from the carried config and the last checkpoint, and the
/// guest runs on there with its self-check passing.
#[test]
fn xen_failover_of_a_pvh_domu() {
    if lab_unavailable() {
        return;
    }
    failover(&[], "xl in");
}

/// The same failover with a PV domU, under the hypervisor built with shadow
/// paging (`tools/lab/xen-failover --pv`): the primary carries each
/// checkpoint's page types and p2m frames, and at activation the backup
/// writes the checkpoint as a Xen save file (page tables and vCPU frames
/// normalised to pfns) and builds the replica with `xl restore -p`. The
/// same checks: the guest's self-check passes in the replica, its first
/// round is not past the primary's, and the client's one TCP connection is
/// answered on, every request once, in order.
#[test]
fn xen_failover_of_a_pv_domu() {
    if lab_unavailable() || shadow_hypervisor_unavailable() {
        return;
    }
    failover(&["--pv"], "restored by xl in");
}

/// The same failover with an HVM domU and its QEMU device model
/// (`tools/lab/xen-failover --hvm`): each checkpoint carries QEMU's device
/// state (QMP `stop`, `xen-save-devices-state`, `cont`, inside the pause),
/// and at activation the backup writes an HVM save file (RAM without the
/// holes, the special pages, HVM context and params, then libxl's
/// EMULATOR_CONTEXT with QEMU's state) into `xl restore -p`, which starts
/// QEMU from that state. The same checks as above.
#[test]
fn xen_failover_of_an_hvm_domu() {
    if lab_unavailable() {
        return;
    }
    failover(&["--hvm"], "QEMU state");
}

/// Runs tools/lab/xen-failover with `args` and checks its report; `built`
/// must appear in the backup's line naming the replica domain.
fn failover(args: &[&str], built: &str) {
    let castor = xen_castor().to_str().unwrap().to_string();
    // The primary's guest has been seen (1 run in 5) to triple-fault inside
    // its own suspend under the emulated x2APIC before the first
    // checkpoint (docs/xen.md): the failover is then never reached. Only
    // that named condition is retried.
    let (out, res) = retrying_a_guest_crash(
        || {
            let out = tempfile::tempdir().unwrap();
            let res = Command::new(repo().join("tools/lab/xen-failover"))
                .args(args)
                .args(["--castor", &castor, "--timeout", "1800", "--out"])
                .arg(out.path())
                .env("FO_EPOCHS", "2")
                .env("FO_ROUNDS", "3")
                .env("FO_REPLIES", "3")
                .current_dir(repo())
                .output()
                .expect("running tools/lab/xen-failover");
            (out, res)
        },
        |all| guest_crashed_in_suspend(all) && !all.contains("ACTIVATED"),
    );
    let stdout = String::from_utf8_lossy(&res.stdout);
    let stderr = String::from_utf8_lossy(&res.stderr);
    let ctx = || format!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(res.status.success(), "{}", ctx());
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("xen failover: ok"), "{}", ctx());
    // The figures, for `cargo test -- --nocapture` and CI logs.
    eprintln!("xen-failover {args:?}: {last}");
    // "rounds A..B (primary at R)": the activated guest resumed at or
    // before the primary's last round (the checkpoint is never ahead of
    // the primary) and ran on for several rounds, each one checked.
    let nums = |after: &str| -> Vec<u64> {
        let rest = &last[last
            .find(after)
            .unwrap_or_else(|| panic!("{after}: {}", ctx()))
            + after.len()..];
        rest.split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .take(3)
            .map(|s| s.parse().unwrap())
            .collect()
    };
    let r = nums("rounds ");
    let (first, lastr, primary) = (r[0], r[1], r[2]);
    assert!(first >= 1 && first <= primary + 1, "{}", ctx());
    assert!(lastr >= first + 2, "{}", ctx());
    assert!(last.contains("self-check passed"), "{}", ctx());
    let console = std::fs::read_to_string(out.path().join("console-activated.log")).unwrap();
    assert!(!console.contains("FAIL"), "{console}");
    let replica = stdout
        .lines()
        .find(|l| l.contains("castor: xen replica \"lab-fo\" is domain"))
        .unwrap_or_else(|| panic!("the backup did not build the replica domain: {}", ctx()));
    assert!(replica.contains(built), "{replica}: {}", ctx());
    // The guest's output on its vif was held by castor's queue.
    assert!(
        stdout.contains("castor protect: holding output of vif"),
        "{}",
        ctx()
    );
    // TCP across the failover, from the script's summary ...
    let t = nums("tcp one connection requests ");
    let (before, after, total) = (t[0], t[1], nums("counter 1..")[0]);
    assert!(before >= 1 && after >= 3, "{}", ctx());
    assert_eq!(before + after, total, "{}", ctx());
    assert!(last.contains("kill-to-first-reply "), "{}", ctx());
    // ... and re-checked here from the client's own log.
    let client = std::fs::read_to_string(out.path().join("client.log")).unwrap();
    check_client_log(&client, total);
}

/// The failover client's log (tools/lab/failover/client): lines `UPTIME K
/// C R`, then `END K`. Every request K = 1, 2, ... was answered once, over
/// the one connection (the service counts per connection: a new one would
/// start at 1 again), with the counter C one more than before (never a
/// repeat, a skip or a step back), the reply echoing its request R, and
/// the client stopped on request, not on a reset, EOF or timeout.
fn check_client_log(log: &str, total: u64) {
    let mut lines = log.lines().peekable();
    let mut k = 0u64;
    let mut prev_t = 0.0f64;
    while let Some(line) = lines.next() {
        if lines.peek().is_none() {
            assert_eq!(line, format!("END {k}"), "client log:\n{log}");
            break;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 4, "bad line {line:?} in client log:\n{log}");
        let t: f64 = f[0].parse().unwrap_or_else(|_| panic!("{line:?}"));
        k += 1;
        assert!(t >= prev_t, "time went back at {line:?}:\n{log}");
        prev_t = t;
        let want = k.to_string();
        assert_eq!(
            (f[1], f[2], f[3]),
            (want.as_str(), want.as_str(), want.as_str()),
            "reply {k} out of sequence in client log:\n{log}"
        );
    }
    assert_eq!(k, total, "client log:\n{log}");
}

/// A build without the feature names it when asked for a Xen guest, and
/// the help lists the `xen:` spec beside sim and kvm.
#[test]
#[cfg(not(feature = "xen"))]
fn without_the_feature_xen_domains_are_refused_by_name() {
    let castor = env!("CARGO_BIN_EXE_castor");
    let o = Command::new(castor)
        .args(["bench", "--domain", "xen:name=lab-pvh", "--duration", "1s"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("xen:name=lab-pvh") && err.contains("built without the `xen` feature"),
        "{err}"
    );
    let help = Command::new(castor)
        .args(["protect", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for kind in ["sim:mem=", "kvm:guest=", "xen:name=NAME|domid=N"] {
        assert!(help.contains(kind), "{kind} missing from:\n{help}");
    }
}
