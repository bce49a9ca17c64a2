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
    #[cfg(feature = "xen")]
    xen::bindings(&out);
}

/// The `xen` feature: bindings to the Xen tool-stack libraries, generated
/// from the installed headers (Debian's libxen-dev) and linked through
/// pkg-config. Only what castor calls is allowlisted, so a header change
/// elsewhere cannot break the build.
#[cfg(feature = "xen")]
mod xen {
    use std::path::Path;

    const LIBS: &[&str] = &[
        "xencontrol",
        "xenguest",
        "xenforeignmemory",
        "xenevtchn",
        "xenstore",
        "xentoollog",
    ];

    const FUNCTIONS: &[&str] = &[
        "xc_interface_open",
        "xc_interface_close",
        "xc_domain_getinfolist",
        "xc_domain_pause",
        "xc_domain_unpause",
        "xc_domain_shutdown",
        "xc_domain_resume",
        "xc_domain_destroy",
        "xc_domain_maximum_gpfn",
        "xc_domain_get_guest_width",
        "xc_shadow_control",
        "xc_logdirty_control",
        "xc__hypercall_buffer_alloc_pages",
        "xc__hypercall_buffer_free_pages",
        "xc_vcpu_getcontext",
        "xc_get_pfn_type_batch",
        "xc_vcpu_setcontext",
        "xc_domain_hvm_getcontext",
        "xc_domain_hvm_setcontext",
        "xc_hvm_param_get",
        "xc_hvm_param_set",
        "xc_suspend_evtchn_init_exclusive",
        "xc_suspend_evtchn_release",
        "xenforeignmemory_open",
        "xenforeignmemory_close",
        "xenforeignmemory_map2",
        "xenforeignmemory_unmap",
        "xenevtchn_open",
        "xenevtchn_close",
        "xenevtchn_fd",
        "xenevtchn_notify",
        "xenevtchn_pending",
        "xenevtchn_unmask",
        "xs_open",
        "xs_close",
        "xs_read",
        "xs_write",
        "xs_get_domain_path",
        "xs_suspend_evtchn_port",
        "xs_resume_domain",
    ];

    const TYPES: &[&str] = &[
        "xc_domaininfo_t",
        "vcpu_guest_context_any_t",
        "xc_shadow_op_stats_t",
        "xc_hypercall_buffer_t",
        "shared_info",
    ];

    const VARS: &[&str] = &[
        "XEN_DOMCTL_SHADOW_OP_.*",
        "XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL",
        "XEN_DOMINF_.*",
        "SHUTDOWN_.*",
        "HVM_PARAM_.*",
        "XS_OPEN_.*",
        "XBT_NULL",
    ];

    pub fn bindings(out: &Path) {
        let mut includes = Vec::new();
        for lib in LIBS {
            match pkg_config::Config::new().probe(lib) {
                Ok(l) => includes.extend(l.include_paths),
                Err(e) => panic!(
                    "the `xen` feature needs the Xen tool-stack libraries: pkg-config {lib}: {e}\n\
                     on Debian/Ubuntu `apt-get install libxen-dev libclang-dev`"
                ),
            }
        }
        let header = "src/domain/xen/wrapper.h";
        println!("cargo:rerun-if-changed={header}");
        let mut b = bindgen::Builder::default()
            .header(header)
            .layout_tests(false)
            .derive_default(true)
            .clang_args(includes.iter().map(|p| format!("-I{}", p.display())));
        for f in FUNCTIONS {
            b = b.allowlist_function(f);
        }
        for t in TYPES {
            b = b.allowlist_type(t);
        }
        for v in VARS {
            b = b.allowlist_var(v);
        }
        let generated = b.generate().unwrap_or_else(|e| {
            panic!(
                "bindgen on the Xen headers ({header}) failed: {e:?}; is libclang-dev installed?"
            )
        });
        generated
            .write_to_file(out.join("xen_bindings.rs"))
            .expect("write xen_bindings.rs");
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
