//! Builds the kvm test guests in `guests/` into flat binaries in OUT_DIR
//! with the system gcc and binutils (`gcc -m32 -ffreestanding`, `ld`,
//! `objcopy`). The VMM embeds them with `include_bytes!`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Guests to build: name and the source files under `guests/NAME/`
/// (`../entry.S` is the entry all guests share; all link with
/// `guests/link.ld`).
const GUESTS: &[(&str, &[&str])] = &[
    ("memtouch", &["../entry.S", "main.c"]),
    ("counter", &["../entry.S", "main.c"]),
    ("blkcheck", &["../entry.S", "main.c"]),
    ("tcpcount", &["../entry.S", "main.c"]),
];

const CFLAGS: &[&str] = &[
    "-m32",
    "-march=i686",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mgeneral-regs-only",
    "-O2",
    // The guests define memcpy/memset themselves: keep gcc from turning
    // their loops into calls to themselves.
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Werror",
];

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=guests");
    check_m32(&out);
    for (name, sources) in GUESTS {
        build_guest(name, sources, &out);
    }
}

fn run(cmd: &mut Command, what: &str) {
    let shown = format!("{cmd:?}");
    match cmd.output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "{what} failed ({}): {shown}\n{}{}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("{what}: cannot run {shown}: {e} (install gcc and binutils)"),
    }
}

/// Fails the build with a clear message when gcc cannot target i386.
fn check_m32(out: &Path) {
    let probe = out.join("m32probe.c");
    std::fs::write(&probe, "int castor_probe(int x) { return x + 1; }\n").expect("write probe");
    let status = Command::new("gcc")
        .args(["-m32", "-ffreestanding", "-c", "-o"])
        .arg(out.join("m32probe.o"))
        .arg(&probe)
        .output();
    match status {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "gcc cannot compile 32-bit code (gcc -m32 -ffreestanding failed): {}\n\
             the kvm guests in guests/ need an i386-capable gcc: on Debian/Ubuntu \
             `apt-get install gcc-multilib` (or a gcc built with 32-bit support)",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!("cannot run gcc to build the kvm guests in guests/: {e}; install gcc"),
    }
}

fn build_guest(name: &str, sources: &[&str], out: &Path) {
    let dir = Path::new("guests").join(name);
    let mut objs = Vec::new();
    for src in sources {
        let obj = out.join(format!("{name}-{}.o", src.trim_start_matches("../")));
        run(
            Command::new("gcc")
                .args(CFLAGS)
                .arg("-c")
                .arg(dir.join(src))
                .arg("-o")
                .arg(&obj),
            &format!("compiling guest {name}/{src}"),
        );
        objs.push(obj);
    }
    let elf = out.join(format!("{name}.elf"));
    run(
        Command::new("ld")
            .args(["-m", "elf_i386", "-nostdlib", "-T"])
            .arg(Path::new("guests").join("link.ld"))
            .arg("-o")
            .arg(&elf)
            .args(&objs),
        &format!("linking guest {name}"),
    );
    run(
        Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&elf)
            .arg(out.join(format!("{name}.bin"))),
        &format!("objcopy of guest {name}"),
    );
}
