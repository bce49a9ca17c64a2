//! Replays every fuzz target's corpus (`fuzz/corpus/TARGET/`) and every
//! input a fuzzer ever failed on (`fuzz/regressions/TARGET/`, one file per
//! crash, named after what it found) through the same bodies the fuzzer
//! runs (`castor::fuzzing`), so a fixed crash stays fixed in the normal
//! test suite. See docs/hardening.md for running the fuzzers.

use std::path::{Path, PathBuf};

use castor::fuzzing::{seeds, TARGETS};

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

#[test]
fn every_target_runs_its_seeds_corpus_and_regressions() {
    for (name, body) in TARGETS {
        let s = seeds(name);
        assert!(!s.is_empty(), "{name}: no seeds");
        s.iter().for_each(|d| body(d));
        let corpus = files(&root().join("corpus").join(name));
        assert!(!corpus.is_empty(), "{name}: fuzz/corpus/{name} is empty");
        for dir in ["corpus", "regressions"] {
            for f in files(&root().join(dir).join(name)) {
                let data = std::fs::read(&f).unwrap();
                eprintln!("{name}: {}", f.display());
                body(&data);
            }
        }
    }
}

/// The seeds really reach deep: the receiver's stream commits, the record
/// stream parses whole, the beacon decodes.
#[test]
fn seeds_are_valid_inputs() {
    // Plain, MAC-sealed and encrypted: every record opens.
    for (i, rs) in seeds("record").iter().enumerate() {
        assert_eq!(castor::fuzzing::record_run(rs), 6, "record seed {i}");
    }
    // One flipped bit in a sealed stream: nothing past it opens.
    let mut bad = seeds("record")[1].clone();
    bad[1 + 24 + 3] ^= 1;
    assert_eq!(castor::fuzzing::record_run(&bad), 0);
    let psk = castor::transport::handshake::Psk::from_bytes(castor::fuzzing::KEY);
    assert_eq!(
        castor::ha::beacon::decode(&psk, &seeds("beacon")[0])
            .unwrap()
            .0,
        5
    );
    let msgs = castor::outq::nfqueue::msg::parse(&seeds("nfqueue")[2]).unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(
        castor::fuzzing::receiver_run(&seeds("receiver")[0]),
        Some(2)
    );
}

/// Writes the seeds into fuzz/corpus/ (run once after adding a target:
/// `cargo test --release --test fuzz_corpus -- --ignored write_seed_corpus`).
#[test]
#[ignore]
fn write_seed_corpus() {
    for (name, _) in TARGETS {
        let dir = root().join("corpus").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
}
