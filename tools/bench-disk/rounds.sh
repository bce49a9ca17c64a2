#!/usr/bin/env bash
# Two castor binaries through tools/bench-disk/run.sh, interleaved in one
# sitting (A B, B A, A B, ... so neither always runs first), then the median
# of each figure per binary and workload. On a shared, noisy machine only
# figures measured side by side like this compare.
#
# Usage: tools/bench-disk/rounds.sh BIN_A BIN_B [ROUNDS=3] [SIZE_MiB=64] [RUNTIME_s=4]
# (CASES and QD as for run.sh). Raw lines go to $OUT (default: a temporary file,
# named at the end).
set -euo pipefail
A=$1
B=$2
ROUNDS=${3:-3}
SIZE=${4:-64}
RUNTIME=${5:-4}
OUT=${OUT:-$(mktemp /tmp/bench-disk-rounds.XXXXXX)}
here=$(dirname "$0")
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) -eq 1 ]; then order="A B"; else order="B A"; fi
  for which in $order; do
    if [ "$which" = A ]; then bin=$A; else bin=$B; fi
    echo "round $r $which ($bin): load $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    CASTOR=$bin "$here/run.sh" "$SIZE" "$RUNTIME" | sed "s|^|$which $r |" | tee -a "$OUT" >&2 || true
  done
done
python3 - "$OUT" "$A" "$B" <<'PY'
import re, statistics, sys
rows = {}
pat = re.compile(
    r'^(\S) (\d+) (\S+) bs=(\S+) ?(.*?): unprotected ([\d.]+) MiB/s p50 (\d+) us p90 (\d+) us p99 (\d+) us \| '
    r'replicated ([\d.]+) MiB/s p50 (\d+) us p90 (\d+) us p99 (\d+) us \| ratio (\d+)% \| wire bytes per write ~(\d+) .*'
    r'unprotected ([\d.]+), replicated ([\d.]+) \(primary ([\d.]+) \+ backup ([\d.]+); the session costs (\d+) ms'
    r'.*fio CPU ms per MiB: unprotected ([\d.]+), replicated ([\d.]+)')
bad = 0
for line in open(sys.argv[1]):
    if 'differs from the primary' in line:
        bad += 1
    m = pat.match(line)
    if not m:
        continue
    g = m.groups()
    key = (g[0], f'{g[2]} {g[3]} {g[4]}'.strip())
    rows.setdefault(key, []).append([float(x) for x in g[5:]])
names = ['u MiB/s', 'u p50', 'u p90', 'u p99', 'r MiB/s', 'r p50', 'r p90', 'r p99', 'ratio %',
         'wire B/write', 'u ms/MiB', 'r ms/MiB', 'r prim', 'r backup', 'idle ms/s', 'fio u ms/MiB',
         'fio r ms/MiB']
print(f'medians over rounds (A = {sys.argv[2]}, B = {sys.argv[3]}); backup disk differed in {bad} run(s)')
print('bin workload | ' + ' | '.join(names) + ' | rounds')
for (which, wl), vals in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    med = [statistics.median(c) for c in zip(*vals)]
    print(f'{which} {wl} | ' + ' | '.join(f'{v:.2f}' if v < 10 else f'{v:.0f}' for v in med)
          + f' | {len(vals)}')
PY
echo "raw lines: $OUT" >&2
