//! The Xen lab boots (Xen 4.17 under QEMU, Debian's kernel as PV dom0 with
//! xenstored and xenconsoled running), `xl info` answers, and a PV domU
//! (the same kernel with a busybox initramfs) is created with `xl create`,
//! prints its line on its console and is destroyed (tools/lab/guest/
//! xen-domu-smoke). Skips only when qemu-system-x86_64 is missing.

mod common;
use common::lab::{lab_run, lab_unavailable};

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
