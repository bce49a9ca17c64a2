#!/usr/bin/env python3
"""A duty-cycle CPU load: BUSY_MS of spinning, then IDLE_MS asleep, until
killed. The control for the disk benchmark's shared-CPU runs: beside an
unprotected export it shows what a background load of the backup's size
costs fio and the NBD thread on this machine, with no castor code in it.

Usage: tools/bench-disk/duty.py BUSY_MS IDLE_MS
"""
import sys
import time


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    busy, idle = (float(a) / 1000 for a in sys.argv[1:])
    if busy < 0 or idle <= 0:
        sys.exit("BUSY_MS must be >= 0 and IDLE_MS > 0")
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < busy:
            pass
        time.sleep(idle)


if __name__ == "__main__":
    main()
