#!/usr/bin/env bash
# QEMU live migration of a guest that dirties pages at a known rate, next to
# castor's codec on the same synthetic workload (docs/tuning.md, "Peers").
#
#   tools/peers/qemu-migrate.sh [--mib 64] [--rate 2000] [--edit 64]
#       [--modes "xbzrle multifd-zstd"] [--warm 5] [--kernel VMLINUZ]
#       [--bandwidth MIB_PER_S (32)]
#       [--castor target/release/castor] [--out DIR]
#
# The guest: a Linux kernel (--kernel; else the host's /boot/vmlinuz-*,
# else the lab's Debian kernel, tools/lab/build rdma) and an initramfs made
# here: busybox and tools/peers/dirtier.c (static), which fills --mib MiB
# with text and then writes --edit bytes into --rate random pages per
# second. QEMU 7.2 runs it under TCG (no KVM for 64-bit guests here) and
# migrates it over loopback TCP to a second QEMU (-incoming defer), once
# per mode; QMP (tools/peers/qmp_migrate.py) sets the capabilities, starts
# the migration and reads query-migrate. Then castor bench runs the sim
# domain with the same memory, rate and edit size.
#
# Writes DIR/MODE.json (QEMU's counters) and DIR/castor.json, and prints a
# table: wire bytes per dirty page, downtime / pause, total time.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

mib=64 rate=2000 edit=64 warm=5 bandwidth=32 modes="xbzrle multifd-zstd" kernel="" out=""
castor=$repo/target/release/castor
while (($#)); do
    case $1 in
    --mib) mib=$2 ;;
    --rate) rate=$2 ;;
    --edit) edit=$2 ;;
    --warm) warm=$2 ;;
    --bandwidth) bandwidth=$2 ;;
    --modes) modes=$2 ;;
    --kernel) kernel=$2 ;;
    --castor) castor=$2 ;;
    --out) out=$2 ;;
    *) echo "qemu-migrate.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift 2
done
die() { echo "qemu-migrate.sh: $*" >&2; exit 1; }
for t in qemu-system-x86_64 gcc cpio gzip busybox python3; do
    command -v "$t" >/dev/null || die "$t not found (Debian: qemu-system-x86 gcc cpio gzip busybox-static python3)"
done
[[ -x $castor ]] || die "$castor not built (cargo build --release)"

work=$(mktemp -d /tmp/castor-peers.XXXXXX)
out=${out:-$work/out}
mkdir -p "$out"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    rm -rf "$work/root"
}
trap cleanup EXIT

# --- the guest -------------------------------------------------------------
if [[ -z $kernel ]]; then
    for k in /boot/vmlinuz-"$(uname -r)" /boot/vmlinuz; do
        [[ -r $k ]] && { kernel=$k; break; }
    done
fi
if [[ -z $kernel ]]; then
    echo "qemu-migrate.sh: no --kernel and none in /boot: using the lab's Debian kernel" >&2
    kernel=$("$repo/tools/lab/build" rdma)/vmlinuz
fi
[[ -r $kernel ]] || die "kernel $kernel not readable"

root=$work/root
mkdir -p "$root/bin" "$root/dev" "$root/proc"
cp "$(command -v busybox)" "$root/bin/busybox"
gcc -static -O2 -o "$root/dirtier" "$here/dirtier.c"
cat >"$root/init" <<INIT
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
exec /dirtier $mib $rate $edit
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/initrd.gz"

# Guest RAM: the working set plus room for the kernel.
qemu_args=(-machine pc,accel=tcg -cpu qemu64 -smp 1 -m $((mib + 96))M
    -kernel "$kernel" -initrd "$work/initrd.gz"
    -append "console=ttyS0 panic=-1 quiet loglevel=3"
    -display none -monitor none -no-reboot -nic none)

# Waits until FILE contains TEXT (deadline S seconds).
wait_for() {
    local file=$1 text=$2 s=$3 i
    for ((i = 0; i < s * 10; i++)); do
        grep -q "$text" "$file" 2>/dev/null && return 0
        sleep 0.1
    done
    return 1
}

port=$((20000 + RANDOM % 20000))
for mode in $modes; do
    echo "== $mode: booting source and target (TCG)" >&2
    rm -f "$work"/*.sock "$work"/*.console
    qemu-system-x86_64 "${qemu_args[@]}" -serial "file:$work/dst.console" \
        -qmp "unix:$work/dst.sock,server=on,wait=off" -incoming defer &
    pids+=($!)
    qemu-system-x86_64 "${qemu_args[@]}" -serial "file:$work/src.console" \
        -qmp "unix:$work/src.sock,server=on,wait=off" &
    pids+=($!)
    wait_for "$work/src.console" "dirtier: ready" 300 ||
        die "$mode: the guest did not start its workload within 300 s (console: $work/src.console)"
    sleep "$warm"
    echo "== $mode: migrating" >&2
    python3 "$here/qmp_migrate.py" "$work/src.sock" "$work/dst.sock" \
        "tcp:127.0.0.1:$port" "$mode" 300 $((bandwidth << 20)) >"$out/$mode.json" ||
        die "$mode: migration did not complete: $(cat "$out/$mode.json")"
    # The guest runs on at the target: its next rate line shows up there.
    # A migration can report "completed" and still hand over a broken
    # guest: say so, keep its console, and go on.
    if wait_for "$work/dst.console" "pages/s" 30; then
        echo '{"target_guest_runs": true}' >"$out/$mode.target.json"
    else
        echo "qemu-migrate.sh: $mode: the migrated guest does not run on the target" \
            "(console kept: $out/$mode.target-console.txt)" >&2
        echo '{"target_guest_runs": false}' >"$out/$mode.target.json"
    fi
    cp "$work/dst.console" "$out/$mode.target-console.txt"
    grep "pages/s" "$work/src.console" | tail -3 | sed 's/^/  source guest: /' >&2
    kill "${pids[@]}" 2>/dev/null || true
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
    port=$((port + 1))
done

# --- castor on the same workload -------------------------------------------
echo "== castor bench: sim, ${mib} MiB, $rate pages/s, $edit-byte edits" >&2
"$castor" bench --domain "sim:mem=${mib}MiB,workload=edits,edit=$edit,rate=$rate,fill=1" \
    --epoch 25ms --duration 10s --json "$out/castor.json" >"$out/castor.txt"

python3 - "$out" $modes <<'PY'
import json, sys
out, modes = sys.argv[1], sys.argv[2:]
c = json.load(open(f"{out}/castor.json"))
c_pp = c["wire_bytes_per_dirty_page"]
pause = c["pause_us"]
print(f"{'system':<22}{'wire B / dirty page':>20}{'downtime / pause p99':>24}{'total time':>12}")
print(f"{'castor (lz4, 25ms)':<22}{c_pp:>20.1f}{str(pause.get('p99')) + ' us':>24}{'periodic':>12}")
for m in modes:
    q = json.load(open(f"{out}/{m}.json"))
    pp = q["wire_bytes_per_page_after_first_pass"]
    ok = json.load(open(f"{out}/{m}.target.json"))["target_guest_runs"]
    print(f"{'qemu ' + m:<22}{pp if pp is not None else float('nan'):>20.1f}"
          f"{str(q['downtime_ms']) + ' ms':>24}{str(q['total_time_ms']) + ' ms':>12}"
          + ("" if ok else "  (target guest crashed)"))
    if pp:
        print(f"  qemu {m} / castor: {pp / c_pp:.2f} bytes per dirty page")
PY
echo "results in $out" >&2
