//! Disk replication end to end, with real NBD clients (qemu-io, nbdinfo)
//! and an in-test client for the SIGKILL trials: the backup's disk is the
//! primary's after a clean stop, and after a SIGKILL the disk after
//! exactly a prefix of the client's writes.

mod common;
use common::nbd::Nbd;
use common::trials::Trials;
use common::writes::{after, is_prefix, nth_write, BLOCKS};
use common::*;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SIM: &str = "sim:mem=4MiB,workload=uniform,rate=20000,seed=3";

/// Backup flags for a shared, loaded machine: a primary stalled by the
/// scheduler for half a second is not lost (a SIGKILL closes the
/// connection at once anyway).
pub const SLACK: &[&str] = &["--heartbeat-timeout", "2s"];

fn have(tool: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIP: {tool} is not installed (apt-get install qemu-utils libnbd-bin)");
    }
    ok
}

/// A loopback port free right now (the export binds it a moment later).
fn image(path: &Path, size: usize, fill: impl Fn(usize) -> u8) {
    let b: Vec<u8> = (0..size).map(fill).collect();
    std::fs::write(path, b).unwrap();
}

fn sigint(p: &mut Reaped) -> std::process::ExitStatus {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(p.0.id() as i32, libc::SIGINT) };
    p.0.wait().unwrap()
}

fn qemu_io(url: &str, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.args(["-c", x]);
    }
    let out = c.arg(url).output().unwrap();
    let so = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !so.contains("failed") && !so.contains("error"),
        "qemu-io {cmds:?} {url}:\n{so}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn qemu_io_writes_reach_the_backups_disk_byte_for_byte() {
    if sim_unavailable() || !have("qemu-io") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.img");
    // Non-zero content before protection: the seed must carry it.
    image(&path, 4 << 20, |i| {
        if (i / 4096) % 3 == 0 {
            (i % 251) as u8
        } else {
            0
        }
    });
    let b = Backup::start_with(&dir.path().join("replica"), SLACK, KEY);
    let port = free_port();
    let disk = format!("data={},nbd=127.0.0.1:{port}", path.display());
    let mut p = protect_flowing_with(SIM, &b.addr, "25ms", &["--disk", &disk]);
    let url = format!("nbd://127.0.0.1:{port}/data");
    qemu_io(
        &url,
        &[
            "write -P 0x5a 0 1M",
            "write -z 1536k 64k",
            "flush",
            "write -P 0xa5 2M 12k",
        ],
    );
    // The only export also answers to the default (empty) name.
    qemu_io(
        &format!("nbd://127.0.0.1:{port}"),
        &["read -P 0x5a 4096 4096", "write -P 0x11 3M 512"],
    );
    let info = Command::new("nbdinfo")
        .arg("--size")
        .arg(&url)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&info.stdout).trim(),
        (4 << 20).to_string()
    );
    let st = sigint(&mut p);
    assert!(st.success(), "protect exit {st:?}");
    let (st, err) = b.wait();
    assert!(st.success(), "backup:\n{err}");
    let primary = std::fs::read(&path).unwrap();
    let replica = std::fs::read(dir.path().join("replica/disks/data.img")).unwrap();
    assert_eq!(primary.len(), replica.len());
    assert!(
        primary == replica,
        "the backup's disk differs from the primary's"
    );
    assert!(primary[..1 << 20].iter().all(|&x| x == 0x5a));
    let m = meta(&dir.path().join("replica")).unwrap();
    assert_eq!(
        m.digest,
        replica_digest(&dir.path().join("replica")),
        "digest covers the disk"
    );
}

/// `backup --from-saved` activates the saved version's disk, not the
/// working one beside it, which a backup that crashed mid-session carried
/// past the saved memory (here: a later write put there by hand).
#[test]
fn from_saved_activates_the_saved_versions_disk() {
    if sim_unavailable() || !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.img");
    image(&path, 1 << 20, |_| 0);
    let rdir = dir.path().join("replica");
    let b = Backup::start_with(&rdir, SLACK, KEY);
    let port = free_port();
    let disk = format!("data={},nbd=127.0.0.1:{port}", path.display());
    let mut p = protect_flowing_with(SIM, &b.addr, "25ms", &["--disk", &disk]);
    qemu_io(
        &format!("nbd://127.0.0.1:{port}/data"),
        &["write -P 0x5a 0 64k", "flush"],
    );
    assert!(sigint(&mut p).success());
    let (st, err) = b.wait();
    assert!(st.success(), "backup:\n{err}");
    let saved = std::fs::read(&path).unwrap();
    let working = rdir.join("disks/data.img");
    let mut later = std::fs::read(&working).unwrap();
    assert!(
        later == saved,
        "the session's disk differs from the primary's"
    );
    later[..4096].fill(0xee);
    std::fs::write(&working, &later).unwrap();
    let lock = format!("local:{}", dir.path().join("pair.lock").display());
    let nbd = format!("nbd.data=127.0.0.1:{}", free_port());
    let out = output_within(
        castor()
            .args([
                "backup",
                "--listen",
                "127.0.0.1:0",
                "--activate",
                "--from-saved",
                "--state-dir",
            ])
            .arg(&rdir)
            .args(["--arbiter", &lock, "--run-for", "1s", "--override", &nbd]),
        EXIT_PATIENCE,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--from-saved:\n{err}");
    assert!(err.contains("ACTIVATED"), "{err}");
    let activated = std::fs::read(rdir.join("activated/disks/data.img")).unwrap();
    assert!(
        activated == saved,
        "the activated disk is not the saved version's:\n{err}"
    );
}

#[test]
fn sigkill_while_a_client_writes_leaves_a_prefix_of_its_writes() {
    if sim_unavailable() {
        return;
    }
    let mut trials = Trials::seeded("disk kill trials");
    for trial in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.img");
        image(&path, (BLOCKS * 4096) as usize, |_| 0);
        let b = Backup::start_with(&dir.path().join("replica"), SLACK, KEY);
        let bdir = b.dir.clone();
        let port = free_port();
        let disk = format!("data={},nbd=127.0.0.1:{port}", path.display());
        let p = protect_flowing_with(SIM, &b.addr, "25ms", &["--disk", &disk]);
        let done = Arc::new(AtomicU64::new(0));
        let client = {
            let done = done.clone();
            let addr = format!("127.0.0.1:{port}");
            std::thread::spawn(move || {
                let mut c = Nbd::connect(&addr, "data").unwrap();
                for i in 0.. {
                    let (off, d) = nth_write(i);
                    match c.write(off, &d) {
                        Ok(0) => done.store(i + 1, Ordering::SeqCst),
                        _ => return,
                    }
                }
            })
        };
        // The random moment is the point of the trial, not a synchronisation.
        let extra = 100 + trials.below(500);
        std::thread::sleep(Duration::from_millis(extra));
        drop(p); // SIGKILL
        client.join().unwrap();
        let completed = done.load(Ordering::SeqCst);
        let (st, err) = b.wait();
        assert_eq!(
            st.code(),
            Some(2),
            "backup should report a broken stream:\n{err}"
        );
        let m = meta(&bdir).unwrap_or_else(|| panic!("trial {trial}: nothing saved:\n{err}"));
        let got = std::fs::read(bdir.join("disks/data.img")).unwrap();
        // A write applied and logged whose reply the client never read may
        // be in the last epoch: up to completed + 1.
        let k = (0..=completed + 1).rev().find(|&k| after(k) == got);
        eprintln!(
            "trial {trial}: killed {extra} ms in; client completed {completed} writes; \
             replica epoch {}, disk = first {k:?} writes",
            m.epoch
        );
        assert!(
            k.is_some(),
            "trial {trial}: the backup's disk is no prefix of the client's writes"
        );
        assert_eq!(
            m.digest,
            replica_digest(&bdir),
            "trial {trial}: files disagree with meta"
        );
    }
}

/// A protected disk whose backup runs with `CASTOR_TEST_DISK_FAULT=fault`
/// and a client writing the trial pattern; returns once the backup's
/// apply has reached the fault: the faulted epoch and BLAKE3 of the disk
/// before it and after it (from the backup's `TEST FAULT` line).
struct Faulted {
    dir: tempfile::TempDir,
    backup: Backup,
    err: common::lines::Lines,
    primary: Reaped,
    stop: Arc<AtomicU64>,
    client: std::thread::JoinHandle<()>,
    epoch: u64,
    before: String,
    after: String,
}

impl Faulted {
    fn start(fault: &str) -> Faulted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.img");
        image(&path, (BLOCKS * 4096) as usize, |_| 0);
        let mut cmd = castor();
        cmd.env("CASTOR_TEST_DISK_FAULT", fault);
        let mut backup = Backup::start_cmd(cmd, &dir.path().join("replica"), SLACK, KEY);
        let err = common::lines::Lines::watch(backup.child.stderr.take().unwrap());
        let port = free_port();
        let disk = format!("data={},nbd=127.0.0.1:{port}", path.display());
        let primary = protect_flowing_with(SIM, &backup.addr, "25ms", &["--disk", &disk]);
        let stop = Arc::new(AtomicU64::new(0));
        let client = {
            let (stop, addr) = (stop.clone(), format!("127.0.0.1:{port}"));
            std::thread::spawn(move || {
                let mut c = Nbd::connect(&addr, "data").unwrap();
                for i in 0.. {
                    let (off, d) = nth_write(i);
                    if stop.load(Ordering::SeqCst) != 0 || !matches!(c.write(off, &d), Ok(0)) {
                        return;
                    }
                }
            })
        };
        let line = err.wait_for("TEST FAULT", Duration::from_secs(120));
        let epoch = line
            .split("applying epoch ")
            .nth(1)
            .and_then(|r| r.split(';').next())
            .and_then(|e| e.parse().ok())
            .unwrap_or_else(|| panic!("no epoch in {line:?}"));
        let hex = |label: &str| {
            let h = line.split(label).nth(1).and_then(|r| r.split(';').next());
            h.unwrap_or_else(|| panic!("no {label:?} in {line:?}"))
                .trim()
                .to_string()
        };
        let (before, after) = (hex("before it: "), hex("after it: "));
        assert_ne!(before, after, "the faulted epoch changes the disk");
        Faulted {
            dir,
            backup,
            err,
            primary,
            stop,
            client,
            epoch,
            before,
            after,
        }
    }

    fn replica(&self) -> std::path::PathBuf {
        self.dir.path().join("replica")
    }

    /// Stops the client and kills the primary.
    fn stop_writing(self) -> Stopped {
        self.stop.store(1, Ordering::SeqCst);
        drop(self.primary); // SIGKILL: the client's next request fails
        self.client.join().unwrap();
        Stopped {
            _dir: self.dir,
            backup: self.backup,
            err: self.err,
            epoch: self.epoch,
            after: self.after,
        }
    }
}

/// A [`Faulted`] backup after its primary was killed.
struct Stopped {
    _dir: tempfile::TempDir,
    backup: Backup,
    err: common::lines::Lines,
    epoch: u64,
    after: String,
}

fn blake3_of(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap())
        .to_hex()
        .to_string()
}

/// An EIO mid-apply of epoch N (after its redo log was sealed and its
/// memory committed): the session ends with the error, and the save
/// replays the log, so the saved replica is epoch N, memory and disk,
/// never the disk half way.
#[test]
fn an_io_error_mid_apply_saves_the_epoch_whole_from_its_redo_log() {
    if sim_unavailable() {
        return;
    }
    let f = Faulted::start("eio@3");
    f.err
        .wait_for("replayed its redo log", Duration::from_secs(60));
    let replica = f.replica();
    let mut s = f.stop_writing();
    let st = wait_deadline(&mut s.backup.child, EXIT_PATIENCE).expect("backup exits");
    let (text, epoch) = (s.err.text(), s.epoch);
    assert_eq!(
        st.code(),
        Some(2),
        "the session ends with the error:\n{text}"
    );
    assert!(
        text.contains(&format!("half way through epoch {epoch}: replayed")),
        "{text}"
    );
    let m = meta(&replica).unwrap_or_else(|| panic!("nothing saved:\n{text}"));
    assert_eq!(m.epoch, epoch, "the replica is the faulted epoch:\n{text}");
    for d in [
        replica.join("disks/data.img"),
        replica.join("current/disks/data.img"),
    ] {
        assert_eq!(
            blake3_of(&d),
            s.after,
            "{} is not the disk after epoch {epoch}",
            d.display()
        );
    }
    assert!(is_prefix(
        &std::fs::read(replica.join("disks/data.img")).unwrap()
    ));
    assert_eq!(
        m.digest,
        replica_digest(&replica),
        "files disagree with meta"
    );
}

/// A backup killed mid-apply of epoch N (its first write landed) replays
/// the sealed redo log at its next start, before it listens: the disk is
/// exactly the disk after epoch N.
#[test]
fn a_backup_killed_mid_apply_replays_its_redo_log_at_restart() {
    if sim_unavailable() {
        return;
    }
    let f = Faulted::start("stall@3");
    f.err.wait_for("stalled mid-apply", Duration::from_secs(60));
    let replica = f.replica();
    let disk = replica.join("disks/data.img");
    let mid = blake3_of(&disk);
    assert!(
        mid != f.before && mid != f.after,
        "the apply stopped half way: its first write landed, not all"
    );
    let s = f.stop_writing();
    let epoch = s.epoch;
    drop(s.backup); // SIGKILL, mid-apply
    let mut b = Backup::start_with(&replica, SLACK, KEY);
    assert_eq!(blake3_of(&disk), s.after, "replayed before listening");
    assert!(is_prefix(&std::fs::read(&disk).unwrap()));
    let err = drain(b.child.stderr.take().unwrap());
    drop(b); // SIGKILL
    let text = err.take();
    assert!(
        text.contains(&format!("half way through epoch {epoch}: replayed")),
        "{text}"
    );
}

#[test]
fn the_sim_disk_workload_is_covered_by_the_digest_at_each_epoch() {
    if sim_unavailable() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "sim:mem=4MiB,writes=300,seed=3,disk={},disk_size=1MiB,disk_writes=20",
        dir.path().join("sim.img").display()
    );
    let b = Backup::start_with(&dir.path().join("replica"), SLACK, KEY);
    let out = castor()
        .args([
            "protect", "--domain", &spec, "--backup", &b.addr, "--epoch", "10ms", "--epochs", "8",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (st, err) = b.wait();
    assert!(st.success(), "backup:\n{err}");
    let rdir = dir.path().join("replica");
    let m = meta(&rdir).unwrap();
    assert_eq!(m.epoch, 8);
    assert_eq!(m.digest, replica_digest(&rdir));
    assert_eq!(
        m.digest,
        expected_digest(&spec, 8),
        "memory, state and disk after epoch 8"
    );
    assert_ne!(m.digest, expected_digest(&spec, 7));
    assert!(
        std::fs::read(rdir.join("disks/sim.img")).unwrap()
            == std::fs::read(dir.path().join("sim.img")).unwrap()
    );
}

mod hostile {
    //! Hostile disk records on the wire, sent by a fake primary: each is
    //! rejected whole, the session ends, and the replica (memory and disk)
    //! stays at the last committed epoch.
    use super::common::fake::*;
    use super::common::*;
    use super::SLACK;
    use castor::disk::session::{encode_announce, DiskSpec};
    use castor::disk::wire::{encode, DiskOp};
    use castor::transport::messages::{EpochBegin, EpochClass, EpochEnd};
    use castor::transport::record::{write_record, RecordKind};

    const DISK: u64 = 64 << 10;

    fn announce(name: &str, size: u64) -> Vec<u8> {
        let mut v = Vec::new();
        let p = encode_announce(&[DiskSpec {
            name: name.into(),
            size,
            nbd: String::new(),
        }]);
        write_record(&mut v, RecordKind::Disks, 0, &p);
        v
    }

    fn writes(epoch: u64, ops: &[DiskOp]) -> Vec<u8> {
        let mut p = Vec::new();
        encode(&mut p, 0, ops);
        let mut v = Vec::new();
        write_record(&mut v, RecordKind::DiskWrites, epoch, &p);
        v
    }

    /// A checkpoint with no pages, `disk` records and an end claiming `claim`.
    fn epoch(p: &mut Primary, disk: &[Vec<u8>], claim: u32) -> Vec<u8> {
        p.epoch += 1;
        let e = p.epoch;
        let mut v = Vec::new();
        let begin = EpochBegin {
            class: EpochClass::Checkpoint,
            dirty: 0,
        };
        write_record(&mut v, RecordKind::EpochBegin, e, &begin.encode());
        for r in disk {
            v.extend_from_slice(r);
        }
        let state = p.state();
        write_record(&mut v, RecordKind::State, e, &state);
        let end = EpochEnd {
            state_len: state.len() as u32,
            disk_records: claim,
            ..Default::default()
        };
        write_record(&mut v, RecordKind::EpochEnd, e, &end.encode());
        v
    }

    fn w(offset: u64, b: u8) -> DiskOp {
        DiskOp::Write {
            offset,
            data: vec![b; 4096],
        }
    }

    /// Announce, seed, epoch 1 writing 0x11 at 0, then `bad`; returns the
    /// backup's exit code, stderr, saved epoch and saved disk.
    fn run(
        bad: impl FnOnce(&mut Primary) -> Vec<u8>,
        name: &str,
    ) -> (Option<i32>, String, Option<u64>, Option<Vec<u8>>) {
        let dir = tempfile::tempdir().unwrap();
        let b = Backup::start_with(&dir.path().join("replica"), SLACK, KEY);
        let bdir = b.dir.clone();
        let mut s = session(&b.addr, KEY).unwrap();
        let mut p = Primary::new();
        let mut bytes = announce(name, DISK);
        bytes.extend(p.seed());
        let e1 = p.epoch + 1;
        bytes.extend(epoch(&mut p, &[writes(e1, &[w(0, 0x11)])], 1));
        bytes.extend(bad(&mut p));
        let mut rd = s.try_clone().unwrap();
        let drain = std::thread::spawn(move || std::io::copy(&mut rd, &mut std::io::sink()));
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = drain.join();
        let (st, err) = b.wait();
        let m = meta(&bdir);
        let disk = std::fs::read(bdir.join(format!("disks/{name}.img"))).ok();
        (st.code(), err, m.map(|m| m.epoch), disk)
    }

    fn assert_rejected(r: (Option<i32>, String, Option<u64>, Option<Vec<u8>>), needle: &str) {
        let (code, err, epoch, disk) = r;
        assert_eq!(code, Some(2), "{err}");
        assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
        assert_eq!(epoch, Some(1), "{err}");
        let disk = disk.expect("the replica disk of epoch 1");
        assert!(
            disk[..4096].iter().all(|&b| b == 0x11),
            "epoch 1's write is there"
        );
        assert!(
            disk[4096..].iter().all(|&b| b == 0),
            "nothing of the rejected epoch is"
        );
    }

    #[test]
    fn a_clean_stream_with_disk_writes_commits_them() {
        let (code, err, epoch, disk) = run(
            |p| {
                let e = p.epoch + 1;
                let mut v = epoch(p, &[writes(e, &[w(4096, 0x22), DiskOp::Flush])], 1);
                write_record(&mut v, RecordKind::Close, e, &[]);
                v
            },
            "d",
        );
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(epoch, Some(2));
        let disk = disk.unwrap();
        assert!(disk[4096..8192].iter().all(|&b| b == 0x22));
    }

    #[test]
    fn a_write_past_the_disk_is_rejected_whole() {
        // The first op is fine, the second runs past the end: neither lands.
        let r = run(
            |p| {
                let e = p.epoch + 1;
                epoch(p, &[writes(e, &[w(4096, 0x33), w(DISK - 100, 0x33)])], 1)
            },
            "d",
        );
        assert_rejected(r, "runs past the disk");
    }

    #[test]
    fn an_epoch_torn_after_its_disk_records_loses_them() {
        let r = run(
            |p| {
                p.epoch += 1;
                let e = p.epoch;
                let mut v = Vec::new();
                let begin = EpochBegin {
                    class: EpochClass::Checkpoint,
                    dirty: 0,
                };
                write_record(&mut v, RecordKind::EpochBegin, e, &begin.encode());
                v.extend(writes(e, &[w(4096, 0x44)]));
                v
            },
            "d",
        );
        assert_rejected(r, "connection closed");
    }

    #[test]
    fn a_disk_record_count_mismatch_is_rejected() {
        let r = run(
            |p| {
                let e = p.epoch + 1;
                epoch(p, &[writes(e, &[w(4096, 0x55)])], 2)
            },
            "disk",
        );
        assert_rejected(r, "DiskWrites");
    }

    #[test]
    fn unknown_kind_and_flags_in_an_op_are_rejected() {
        let r = run(
            |p| {
                let e = p.epoch + 1;
                let mut rec = writes(e, &[w(4096, 0x66)]);
                // Op kind byte: record header 24, payload header 6. The
                // session seals the record as it is (no CRC to fix under
                // the tag): only the payload is hostile.
                rec[24 + 6] = 9;
                epoch(p, &[rec], 1)
            },
            "d",
        );
        assert_rejected(r, "unknown kind 9");
    }

    #[test]
    fn a_disk_name_that_escapes_the_state_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let b = Backup::start_with(&dir.path().join("replica"), SLACK, KEY);
        let mut s = session(&b.addr, KEY).unwrap();
        let mut bytes = announce("../escape", DISK);
        bytes.extend(Primary::new().seed());
        let _ = s.write_all(&bytes);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let (st, err) = b.wait();
        assert_eq!(st.code(), Some(2), "{err}");
        assert!(err.contains("disk name"), "{err}");
        assert!(!dir.path().join("escape.img").exists());
    }
}

mod kvm {
    //! The kvm block device replicated: the blkcheck guest writes a checked
    //! sequence (the disk must hold exactly writes 0..n-1 where its memory
    //! says n); after a SIGKILL of the primary the activated guest goes on
    //! checking on the replica disk, so disk and memory come from one epoch.
    use super::common::trials::Trials;
    use super::common::*;
    use std::path::Path;
    use std::time::{Duration, Instant};

    fn kvm_unavailable() -> bool {
        if std::fs::File::open("/dev/kvm").is_err() {
            eprintln!("SKIP: /dev/kvm is not available");
            return true;
        }
        false
    }

    /// The `blk seq N` numbers of a console log, and whether a line failed.
    fn seqs(path: &Path) -> (Vec<u64>, bool) {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let fail = text.contains("FAIL");
        let v = text
            .lines()
            .filter_map(|l| l.strip_prefix("blk seq ")?.trim().parse().ok())
            .collect();
        (v, fail)
    }

    fn wait_seq(log: &Path, want: u64) {
        let t0 = Instant::now();
        while seqs(log).0.last().map_or(true, |&s| s < want) {
            assert!(
                !seqs(log).1,
                "guest self-check failed:\n{}",
                std::fs::read_to_string(log).unwrap()
            );
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "guest never reached blk seq {want}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn blkcheck_disk_is_replicated_and_checked_after_failover() {
        if kvm_unavailable() {
            return;
        }
        let mut trials = Trials::seeded("blkcheck kill trials");
        for trial in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let (plog, blog) = (dir.path().join("p.log"), dir.path().join("b.log"));
            let img = dir.path().join("blk.img");
            std::fs::write(&img, vec![0u8; 64 * 512]).unwrap();
            let b = Backup::start_with(
                &dir.path().join("replica"),
                &[
                    "--activate",
                    "--override",
                    &format!("console={}", blog.display()),
                    "--run-for",
                    "4s",
                    "--heartbeat-timeout",
                    "2s",
                ],
                KEY,
            );
            let spec = format!(
                "kvm:guest=blkcheck,mem=8MiB,disk={},console={}",
                img.display(),
                plog.display()
            );
            let p = Reaped(
                castor()
                    .args(["protect", "--quiet", "--domain", &spec, "--backup", &b.addr])
                    .spawn()
                    .unwrap(),
            );
            wait_seq(&plog, 64 * (1 + trials.below(8)));
            drop(p); // SIGKILL
            let (st, err) = b.wait();
            assert_eq!(st.code(), Some(2), "{err}");
            assert!(err.contains("ACTIVATED"), "{err}");
            let (pseq, pfail) = seqs(&plog);
            let (bseq, bfail) = seqs(&blog);
            assert!(!pfail, "primary guest failed its check");
            assert!(
                !bfail,
                "the activated guest found its disk and memory from different epochs:\n{}",
                std::fs::read_to_string(&blog).unwrap()
            );
            eprintln!(
                "kvm trial {trial}: primary reached blk seq {:?}, activated guest went on to {:?}",
                pseq.last(),
                bseq.last()
            );
            assert!(
                !bseq.is_empty(),
                "the activated guest wrote nothing:\n{err}"
            );
            assert!(
                dir.path()
                    .join("replica/activated/disks/block.img")
                    .exists(),
                "the activated guest runs on the replica disk"
            );
        }
    }
}

/// Hostile NBD clients against the real `castor serve-disk`: bad magic in
/// the handshake and in a request, ranges past the end, an oversize WRITE,
/// a client that vanishes mid-payload. Each gets a protocol error or a
/// closed connection; the server keeps serving a well-behaved client and
/// not one byte outside that client's write changes (the image keeps its
/// size and its pattern).
#[test]
fn hostile_nbd_clients_get_errors_and_the_server_serves_others() {
    use std::io::{BufRead, Read, Write};
    const SIZE: usize = 1 << 20;
    const EINVAL: u32 = 22;
    const ENOSPC: u32 = 28;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.img");
    let pattern = |i: usize| (i % 251) as u8;
    image(&img, SIZE, pattern);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut srv = Reaped::spawn(
        castor()
            .args(["serve-disk", "--disk"])
            .arg(format!("data={},nbd={addr}", img.display()))
            .stderr(std::process::Stdio::piped()),
    );
    let mut err = std::io::BufReader::new(srv.0.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("served at"), "{line}");
    let closed = |s: &mut std::net::TcpStream| {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut b = [0u8; 64];
        // EOF, or a reset: either way the server dropped the connection.
        matches!(s.read(&mut b), Ok(0) | Err(_))
    };

    // Handshake: client flags without FIXED_NEWSTYLE.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&0u32.to_be_bytes()).unwrap();
    assert!(closed(&mut s), "old-style client flags end the handshake");

    // Handshake: an option with a bad magic.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.read_exact(&mut hello).unwrap();
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s.write_all(&[0xEE; 16]).unwrap();
    assert!(closed(&mut s), "a bad option magic ends the handshake");

    // Ranges past the end and an oversize WRITE.
    let mut c = Nbd::connect(&addr, "data").unwrap();
    assert_eq!(c.size, SIZE as u64);
    assert_eq!(c.write(SIZE as u64 - 2, &[1; 4]).unwrap(), ENOSPC);
    assert_eq!(c.write(u64::MAX - 1, &[1; 4]).unwrap(), ENOSPC);
    assert_eq!(c.request(0, 0, SIZE as u64, 1, &[]).unwrap(), EINVAL);
    assert_eq!(c.request(4, 0, SIZE as u64 - 1, 2, &[]).unwrap(), EINVAL);
    assert_eq!(
        c.request(1, 0, 0, u32::MAX, &[]).unwrap(),
        EINVAL,
        "a 4 GiB WRITE is refused before its payload is read"
    );
    assert!(closed(c.stream()), "and the connection closes");

    // A request with a bad magic.
    let mut c = Nbd::connect(&addr, "data").unwrap();
    c.stream().write_all(&[0x55; 28]).unwrap();
    assert!(
        closed(c.stream()),
        "a bad request magic closes the connection"
    );

    // A client that vanishes after half of a WRITE's payload.
    let mut c = Nbd::connect(&addr, "data").unwrap();
    let mut h = 0x2560_9513u32.to_be_bytes().to_vec();
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&1u16.to_be_bytes());
    h.extend_from_slice(&7u64.to_be_bytes());
    h.extend_from_slice(&4096u64.to_be_bytes());
    h.extend_from_slice(&4096u32.to_be_bytes());
    h.extend_from_slice(&[0xFF; 2048]);
    c.stream().write_all(&h).unwrap();
    drop(c);

    // The server still serves, and only the good write changed the image.
    let mut good = Nbd::connect(&addr, "data").unwrap();
    assert_eq!(good.write(10, &[0xC3; 5]).unwrap(), 0);
    assert_eq!(good.flush().unwrap(), 0);
    assert_eq!(good.read(8, 9).unwrap()[2..7], [0xC3; 5]);
    assert!(
        srv.0.try_wait().unwrap().is_none(),
        "the server is still up"
    );
    let mut want: Vec<u8> = (0..SIZE).map(pattern).collect();
    want[10..15].fill(0xC3);
    let got = std::fs::read(&img).unwrap();
    assert_eq!(got.len(), SIZE, "the image kept its size");
    assert!(got == want, "no byte outside the good write changed");
}
