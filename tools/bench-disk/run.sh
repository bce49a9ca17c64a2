#!/usr/bin/env bash
# Disk replication benchmark: fio (ioengine=nbd) through a castor NBD export,
# replicated (`castor protect --disk`, 25 ms epochs, loopback backup) vs the
# same export unprotected (`castor serve-disk`), side by side in one run.
# Sequential 1 MiB writes and 4 KiB random writes (and optionally sequential 4 KiB); throughput ratio, write
# latency p50/p99 (submission to completion), and wire bytes per disk write (DiskWrites record bytes
# from protect's JSON report over fio's write count).
#
# Usage: tools/bench-disk/run.sh [SIZE_MiB (default 256)] [RUNTIME_s (default 10)]
# QD=N: fio's iodepth (default 1; the server answers a pipelined burst with
# one write). fio's own CPU per MiB is printed too (it shares the CPUs).
# SPLIT=1: the I/O path on one CPU, replication on another. fio and castor's
# NBD threads (castor-nbd-*) run on CPU $IO_CPU (default 0) in both modes;
# replicated, every other thread of `protect` and the whole backup run on
# CPU $REP_CPU (default 1), and unprotected that CPU idles. A stand-in for a
# backup on its own host and the primary's replication threads on their own
# core (`--cores`), which one 2-CPU machine cannot give otherwise; without
# it all of them share every CPU.
# FILL=1: the image is written whole before each export starts (else it is
# sparse): with a sparse image the timed writes land in page-cache pages
# never written before, which cost several times a rewrite on this VM, and
# a time-based run that writes faster rewrites more of them.
# LOAD="BUSY_MS IDLE_MS": runs tools/bench-disk/duty.py (a CPU load with no
# castor code in it) beside every fio run, the control for what a
# background load costs the I/O path on these CPUs.
set -euo pipefail
SIZE=${1:-256}
RUNTIME=${2:-10}
IDLE_S=${IDLE_S:-2}
QD=${QD:-1}
BIN=${CASTOR:-target/release/castor}
SPLIT=${SPLIT:-0}
LOAD=${LOAD:-}
IO_CPU=${IO_CPU:-0}
REP_CPU=${REP_CPU:-1}
if [ "$SPLIT" = 1 ]; then
  online=$(taskset -pc $$ | sed 's/.*: //')
  for c in "$IO_CPU" "$REP_CPU"; do
    taskset -c "$c" true 2>/dev/null || { echo "SPLIT=1: CPU $c is not available to this shell (allowed: $online)" >&2; exit 2; }
  done
  [ "$IO_CPU" != "$REP_CPU" ] || { echo "SPLIT=1 needs two CPUs: IO_CPU and REP_CPU are both $IO_CPU" >&2; exit 2; }
fi
if [ -n "$LOAD" ] && ! { [[ "$LOAD" =~ ^[0-9]+(\.[0-9]+)?\ [0-9]+(\.[0-9]+)?$ ]] && awk "BEGIN { exit !(${LOAD#* } > 0) }"; }; then
  echo "LOAD=\"$LOAD\": want \"BUSY_MS IDLE_MS\" (numbers, IDLE_MS above 0), e.g. LOAD=\"2 3\"" >&2
  exit 2
fi
# Prefixes a command with its CPU under SPLIT=1: io or rep.
on() {
  if [ "$SPLIT" = 1 ]; then
    local c=$IO_CPU; [ "$1" = rep ] && c=$REP_CPU
    echo "taskset -c $c"
  fi
}
# A SIZE MiB image at $1: sparse, or with FILL=1 written whole (a non-zero
# pattern) before the export starts, so the timed writes rewrite cached
# pages in both modes (the backup's copy is written by the session's first
# checkpoint).
new_image() {
  if [ "${FILL:-0}" = 1 ]; then
    (yes castor-bench-disk-fill || true) | head -c $((SIZE << 20)) >"$1"
  else
    truncate -s "${SIZE}M" "$1"
  fi
}
# SPLIT=1: moves the NBD threads of process $1 (castor-nbd-*: the accept
# thread, whose connection threads inherit its CPU) to CPU $IO_CPU and
# every other thread to CPU $REP_CPU.
pin_replication() {
  [ "$SPLIT" = 1 ] || return 0
  local t c
  for t in /proc/"$1"/task/*; do
    c=$REP_CPU
    case "$(cat "$t/comm")" in castor-nbd-*) c=$IO_CPU ;; esac
    taskset -p -c "$c" "${t##*/}" >/dev/null
  done
}
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
export CASTOR_PSK=bench-disk-key-0123456789abcdef
SIM="sim:mem=64MiB,workload=uniform,rate=2000,seed=1"
# Waits until file $2 contains $3 while process $1 lives (at most 60 s).
await() {
  local i
  for i in $(seq 1200); do
    grep -q "$3" "$2" 2>/dev/null && return 0
    kill -0 "$1" 2>/dev/null || { echo "process $1 exited before '$3' appeared in $2:" >&2; cat "$2" >&2; return 1; }
    sleep 0.05
  done
  echo "no '$3' in $2 after 60 s" >&2; return 1
}
# CPU time (ms, user + system, all threads) the processes $@ used so far.
cpu_ms() {
  local hz t=0 pid; hz=$(getconf CLK_TCK)
  for pid in "$@"; do
    [ -r "/proc/$pid/stat" ] || { echo "process $pid is gone" >&2; continue; }
    t=$((t + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
  done
  echo $((t * 1000 / hz))
}
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }

# fio job: $1 name, $2 rw, $3 bs, $4 uri, $5 extra fio args -> JSON in $W/$1.json
# (beside tools/bench-disk/duty.py $LOAD when LOAD is set).
run_fio() {
  local load=""
  if [ -n "$LOAD" ]; then
    # shellcheck disable=SC2086
    python3 "$(dirname "$0")/duty.py" $LOAD &
    load=$!
  fi
  # shellcheck disable=SC2086
  $(on io) fio --name="$1" --ioengine=nbd --uri="$4" --rw="$2" --bs="$3" --size="${SIZE}M" \
      --time_based --runtime="$RUNTIME" --iodepth="$QD" --lat_percentiles=1 --percentile_list=50:90:99 $5 --output-format=json --output="$W/$1.json" >/dev/null
  if [ -n "$load" ]; then kill "$load"; wait "$load" 2>/dev/null || true; fi
}

unprotected() { # $1 job $2 rw $3 bs $4 extra
  local p; p=$(port)
  new_image "$W/u.img"
  $(on io) "$BIN" serve-disk --disk "data=$W/u.img,nbd=127.0.0.1:$p" 2>"$W/$1.serve.log" &
  local pid=$!
  await $pid "$W/$1.serve.log" "served at"
  local c0; c0=$(cpu_ms $pid)
  run_fio "$1" "$2" "$3" "nbd://127.0.0.1:$p/data" "$4"
  echo $(($(cpu_ms $pid) - c0)) >"$W/$1.cpu"
  kill -INT $pid; wait $pid
  rm -f "$W/u.img"
}

replicated() { # $1 job $2 rw $3 bs $4 extra
  local p; p=$(port)
  new_image "$W/r.img"
  rm -rf "$W/replica"
  # A file per job: a reused one could still hold the last job's address
  # when the new backup has not truncated it yet.
  $(on rep) "$BIN" backup --listen 127.0.0.1:0 --state-dir "$W/replica" >"$W/$1.backup.out" 2>"$W/$1.backup.log" &
  local bpid=$!
  await $bpid "$W/$1.backup.out" "listening on"
  local addr; addr=$(sed -n 's/^listening on //p' "$W/$1.backup.out")
  local cores=""; [ "$SPLIT" = 1 ] && cores="--cores $REP_CPU"
  "$BIN" protect --domain "$SIM" --backup "$addr" --epoch 25ms --arbiter none $cores \
      --json "$W/$1.protect.json" --disk "data=$W/r.img,nbd=127.0.0.1:$p" 2>"$W/$1.protect.log" &
  local ppid=$!
  await $ppid "$W/$1.protect.log" "acked *[1-9]"
  pin_replication $ppid
  # What the session costs with no disk write (the sim domain's memory
  # replication, the epochs): CPU ms per second over IDLE_S seconds.
  local i0 i1; i0=$(cpu_ms $ppid $bpid); sleep "$IDLE_S"; i1=$(cpu_ms $ppid $bpid)
  echo $(((i1 - i0) / IDLE_S)) >"$W/$1.idle"
  local c0 b0; c0=$(cpu_ms $ppid); b0=$(cpu_ms $bpid)
  run_fio "$1" "$2" "$3" "nbd://127.0.0.1:$p/data" "$4"
  echo $(($(cpu_ms $ppid) - c0)) >"$W/$1.pcpu"
  echo $(($(cpu_ms $bpid) - b0)) >"$W/$1.bcpu"
  echo $(($(cat "$W/$1.pcpu") + $(cat "$W/$1.bcpu"))) >"$W/$1.cpu"
  local prc=0
  kill -INT $ppid 2>/dev/null || true; wait $ppid || prc=$?
  wait $bpid || true
  if [ $prc -ne 0 ]; then
    echo "  $1: protect exited with code $prc (not by the benchmark's SIGINT); its log ends:"
    tail -5 "$W/$1.protect.log" | sed 's/^/    /'
    echo "  the backup's log ends:"; tail -5 "$W/$1.backup.log" | sed 's/^/    /'
  fi
  cmp -s "$W/r.img" "$W/replica/disks/data.img" && echo "  $1: backup disk == primary disk" \
    || echo "  $1: backup disk differs from the primary's (expected only if protect failed above)"
  rm -f "$W/r.img"
}

summary() { # $1 job -> "MiB/s writes p50us p90us p99us CPU-ms-per-MiB-written primary-part backup-part fio-part"
  python3 - "$W/$1.json" "$(cat "$W/$1.cpu")" "$(cat "$W/$1.pcpu" 2>/dev/null || cat "$W/$1.cpu")" "$(cat "$W/$1.bcpu" 2>/dev/null || echo 0)" <<'PY'
import json,sys
j=json.load(open(sys.argv[1]))["jobs"][0]["write"]
# Total latency (submission to completion): fio's nbd engine completes
# asynchronously, so its clat alone can read as ~1 us.
p=j.get("lat_ns",{}).get("percentile") or j["clat_ns"]["percentile"]
mib=max(j["io_bytes"]/2**20, 1e-9)
c=[int(x)/mib for x in sys.argv[2:5]]
job=json.load(open(sys.argv[1]))["jobs"][0]
fio=(job["usr_cpu"]+job["sys_cpu"])/100*job["job_runtime"]/mib
print(f'{j["bw_bytes"]/2**20:.1f} {j["total_ios"]} {p["50.000000"]/1000:.0f} {p["90.000000"]/1000:.0f} {p["99.000000"]/1000:.0f} {c[0]:.2f} {c[1]:.2f} {c[2]:.2f} {fio:.2f}')
PY
}

wire() { # $1 job -> bytes of DiskWrites records on the wire (protect's JSON report; 0 without one)
  python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disk_wire_bytes"])' "$W/$1.protect.json" 2>/dev/null || echo 0
}

cpus="$(nproc) CPUs shared"
[ "$SPLIT" = 1 ] && cpus="I/O path (fio, castor-nbd-*) on CPU $IO_CPU, replication on CPU $REP_CPU"
[ -n "$LOAD" ] && cpus="$cpus; a CPU load (duty.py $LOAD ms) beside fio"
[ "${FILL:-0}" = 1 ] && cpus="$cpus; images written whole before each run"
echo "castor disk benchmark: ${SIZE} MiB image, ${RUNTIME} s per run, fio iodepth $QD, 25 ms epochs; $cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"
# CASES (optional): which of seq, rand, sync, seq4k to run (default the
# first three; seq4k: sequential 4 KiB writes).
CASES=${CASES:-seq rand sync}
for case in "seq write 1M" "rand randwrite 4k" "sync randwrite 4k --fsync=1" "seq4k write 4k"; do
  case " $CASES " in *" ${case%% *} "*) ;; *) continue ;; esac
  # shellcheck disable=SC2086
  set -- $case
  unprotected "$1-u" "$2" "$3" "${4:-}"
  replicated "$1-r" "$2" "$3" "${4:-}"
  read -r ubw uios up50 up90 up99 ucpu _ _ ufio <<<"$(summary "$1-u")"
  read -r rbw rios rp50 rp90 rp99 rcpu rpcpu rbcpu rfio <<<"$(summary "$1-r")"
  ratio=$(python3 -c "print(f'{$rbw/$ubw*100:.0f}')")
  wr=$(wire "$1-r")
  per=$(python3 -c "print(f'{$wr/max($rios,1):.0f}')")
  idle=$(cat "$W/$1-r.idle")
  echo "$2 bs=$3 qd=$QD ${4:-}: unprotected ${ubw} MiB/s p50 ${up50} us p90 ${up90} us p99 ${up99} us | replicated ${rbw} MiB/s p50 ${rp50} us p90 ${rp90} us p99 ${rp99} us | ratio ${ratio}% | wire bytes per write ~${per} (${rios} writes) | castor CPU ms per MiB written: unprotected ${ucpu}, replicated ${rcpu} (primary ${rpcpu} + backup ${rbcpu}; the session costs ${idle} ms per s with no disk write) | fio CPU ms per MiB: unprotected ${ufio}, replicated ${rfio}"
done
