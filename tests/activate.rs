//! Activation: after the primary dies, `castor backup --activate` restores
//! the last committed checkpoint and runs the domain on. For a deterministic
//! sim domain the activated domain must continue exactly where the
//! checkpoint left off: after K more epochs its memory and state equal an
//! independent recomputation of epoch E+K (a restart from scratch, a stale
//! or a torn checkpoint would all differ).

mod common;
use common::*;

#[test]
fn activated_replica_continues_the_workload() {
    if sim_unavailable() {
        return;
    }
    let spec = "sim:mem=16MiB,workload=mixed,writes=300,seed=21,threads=2";
    let dir = tempfile::tempdir().unwrap();
    let lock = pair_lock(dir.path());
    let b = Backup::start_with(
        &dir.path().join("replica"),
        &[
            "--activate",
            "--epoch",
            "5ms",
            "--run-epochs",
            "10",
            "--arbiter",
            &lock,
        ],
        KEY,
    );
    let bdir = b.dir.clone();
    let p = protect_flowing_with(spec, &b.addr, "5ms", &["--arbiter", &lock]);
    drop(p); // SIGKILL
    let (st, err) = b.wait();
    assert_eq!(st.code(), Some(2), "{err}");
    assert!(err.contains("ACTIVATED"), "{err}");
    let m = meta(&bdir).expect("replica saved");
    assert_eq!(m.digest, expected_digest(spec, m.epoch));
    let a = meta(&bdir.join("activated")).expect("activated image saved");
    assert_eq!(a.epoch, m.epoch + 10, "{err}");
    assert_eq!(
        a.digest,
        expected_digest(spec, a.epoch),
        "the activated domain did not continue from checkpoint {}",
        m.epoch
    );
}

#[test]
fn activation_without_a_checkpoint_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let b = Backup::start_with(
        &dir.path().join("replica"),
        &["--activate", "--arbiter", &pair_lock(dir.path())],
        KEY,
    );
    // A stranger is dropped and the backup keeps listening; a primary
    // that authenticates, then hangs up before any checkpoint, ends it.
    drop(std::net::TcpStream::connect(&b.addr).unwrap());
    drop(common::fake::session(&b.addr, KEY).unwrap());
    let (st, err) = b.wait();
    assert!(!st.success());
    assert!(err.contains("no checkpoint"), "{err}");
}
