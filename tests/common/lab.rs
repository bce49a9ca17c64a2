//! Driving the emulated lab (`tools/lab/run`) from tests: QEMU boots
//! Debian's kernel (with Soft-RoCE for `--rdma`, or Xen 4.17 with a PV dom0
//! for `--xen`) and runs one command inside; see docs/lab.md.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The repository root (tools/lab lives there).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Skips (returns true, reason printed) when this host cannot run the lab:
/// only a missing `qemu-system-x86_64` is a reason.
pub fn lab_unavailable() -> bool {
    let found = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        eprintln!("SKIP: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86); the lab cannot boot");
    }
    !found
}

/// castor built with the `rdma` feature (tools/lab/build-castor-rdma, its
/// own target directory, incremental), built once per test binary.
pub fn rdma_castor() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_by("build-castor-rdma"))
}

/// castor's library unit tests built with the `rdma` feature
/// (tools/lab/build-castor-rdma-unit), built once per test binary.
pub fn rdma_unit_tests() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| built_by("build-castor-rdma-unit"))
}

/// Runs tools/lab/SCRIPT, which builds something and prints its path.
fn built_by(script: &str) -> PathBuf {
    let out = Command::new(repo().join("tools/lab").join(script))
        .output()
        .unwrap_or_else(|e| panic!("running tools/lab/{script}: {e}"));
    assert!(
        out.status.success(),
        "tools/lab/{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Runs `tools/lab/run ARGS -- CMD` with `out` shared as $LAB_OUT; returns
/// its output after checking nothing in the lab itself failed (exit 124:
/// timeout, 125: the guest never reported the command's status).
pub fn lab_run(args: &[&str], out: &Path, cmd: &[&str]) -> Output {
    let res = lab_run_unchecked(args, out, cmd);
    let code = res.status.code();
    assert!(
        code != Some(124) && code != Some(125) && code != Some(1),
        "the lab itself failed (exit {code:?}):\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    res
}

/// [`lab_run`] without its check of the lab's own exit status, for a
/// caller that inspects a failure before deciding (a named, retried one).
pub fn lab_run_unchecked(args: &[&str], out: &Path, cmd: &[&str]) -> Output {
    Command::new(repo().join("tools/lab/run"))
        .args(args)
        .arg("--out")
        .arg(out)
        .arg("--")
        .args(cmd)
        .current_dir(repo())
        .output()
        .expect("running tools/lab/run")
}

/// A file the lab command wrote into $LAB_OUT, trimmed ("" when absent).
pub fn out_file(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_default()
        .trim()
        .to_string()
}
