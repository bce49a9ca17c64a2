//! Tests of the kvm domain against the real /dev/kvm. Each skips (with a
//! printed reason) when /dev/kvm is missing or cannot run the guest.

use std::time::{Duration, Instant};

use super::*;
use crate::domain::Domain;
use crate::PAGE_SIZE;

/// Serial waits are generous: these hosts emulate the guest slowly and the
/// test binary runs tests in parallel on two cores.
const WAIT: Duration = Duration::from_secs(30);

fn spec(extra: &str) -> KvmSpec {
    KvmSpec::parse(&format!("guest=memtouch,mem=16MiB{extra}")).unwrap()
}

/// A fresh domain, or None (with the reason printed) without usable KVM.
fn open(s: &KvmSpec) -> Option<KvmDomain> {
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: /dev/kvm does not exist");
        return None;
    }
    match KvmDomain::new(s) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: /dev/kvm unusable: {e}");
            None
        }
    }
}

/// The `seq N ok` numbers in `text`, in order; panics on a FAIL line.
fn seqs(text: &str) -> Vec<u64> {
    for line in text.lines() {
        assert!(!line.starts_with("FAIL"), "guest reported: {line}\n{text}");
    }
    text.lines()
        .filter_map(|l| l.strip_prefix("seq ")?.strip_suffix(" ok")?.parse().ok())
        .collect()
}

fn last_seq(c: &Console) -> u64 {
    seqs(&c.text()).last().copied().unwrap_or(0)
}

/// Waits until the guest printed a seq line above `above`.
fn wait_seq_above(c: &Console, above: u64) -> u64 {
    let t = c
        .wait_for(WAIT, |t| {
            t.contains("FAIL") || seqs_lenient(t).last().is_some_and(|&s| s > above)
        })
        .unwrap_or_else(|| panic!("no seq line above {above} within {WAIT:?}:\n{}", c.text()));
    *seqs(&t).last().expect("a seq line")
}

fn seqs_lenient(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("seq ")?.strip_suffix(" ok")?.parse().ok())
        .collect()
}

fn mem_hash(d: &KvmDomain) -> blake3::Hash {
    // SAFETY: callers hold the domain paused, so nothing writes memory.
    blake3::hash(unsafe { d.memory().as_slice() })
}

#[test]
fn memtouch_boots_and_counts() {
    let Some(mut d) = open(&spec("")) else { return };
    d.start().unwrap();
    wait_seq_above(d.console(), 20);
    d.pause().unwrap();
    let text = d.console().text();
    assert!(text.starts_with("memtouch regions=64"), "{text}");
    let s = seqs(&text);
    assert!(s.len() >= 20, "{text}");
    for (i, w) in s.windows(2).enumerate() {
        assert_eq!(w[1], w[0] + 1, "line {i}: {text}");
    }
    assert_eq!(s[0], 1);
}
