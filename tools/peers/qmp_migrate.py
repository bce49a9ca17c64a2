#!/usr/bin/env python3
"""Drive one QEMU live migration over QMP and print what it cost, as JSON.

    qmp_migrate.py SRC_SOCK DST_SOCK URI MODE [TIMEOUT_S] [MAX_BANDWIDTH]

MODE is `xbzrle` (XBZRLE delta pages, 64 MiB cache) or `multifd-zstd`
(2 multifd channels, zstd level 1): QEMU cannot combine them. The target
was started with `-incoming defer`; both sides get the same capabilities
and parameters, then the target listens on URI and the source migrates to
it. query-migrate is polled every 50 ms; the counters at the end of the
first pass over RAM (dirty-sync-count 1 -> 2) are kept, so the dirty-page
rounds that follow can be costed apart from the bulk copy.

MAX_BANDWIDTH (bytes/s, default 32 MiB/s) is the same link budget for both
modes: low enough that the first pass takes seconds, so that dirty-page
rounds happen at all (on loopback, unlimited, a small guest is gone in one
pass and there is nothing to cost).

Every socket operation has a deadline; a migration that has not completed
within TIMEOUT_S (default 300) is cancelled and reported as failed.
"""
import json
import socket
import sys
import time


class Qmp:
    def __init__(self, path, timeout=10.0):
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(path)
        self.f = self.s.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name, **args):
        req = {"execute": name}
        if args:
            req["arguments"] = args
        self.f.write(json.dumps(req).encode() + b"\n")
        self.f.flush()
        rep = self._read()
        if "error" in rep:
            raise RuntimeError(f"{name} {args}: {rep['error']}")
        return rep.get("return")


def setup(q, mode, bandwidth):
    if mode == "xbzrle":
        q.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "xbzrle", "state": True}])
        q.cmd("migrate-set-parameters", **{"xbzrle-cache-size": 64 << 20})
    elif mode == "multifd-zstd":
        q.cmd("migrate-set-capabilities",
              capabilities=[{"capability": "multifd", "state": True}])
        q.cmd("migrate-set-parameters", **{
            "multifd-channels": 2,
            "multifd-compression": "zstd",
            "multifd-zstd-level": 1,
        })
    else:
        raise SystemExit(f"unknown mode {mode!r} (xbzrle, multifd-zstd)")
    q.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})


def counters(info):
    ram = info.get("ram", {})
    xb = info.get("xbzrle-cache", {})
    return {
        "transferred": ram.get("transferred", 0),
        "normal": ram.get("normal", 0),
        "duplicate": ram.get("duplicate", 0),
        "xbzrle_pages": xb.get("pages", 0),
        "xbzrle_bytes": xb.get("bytes", 0),
        "multifd_bytes": ram.get("multifd-bytes", 0),
    }


def main():
    src_path, dst_path, uri, mode = sys.argv[1:5]
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 300.0
    bandwidth = int(sys.argv[6]) if len(sys.argv) > 6 else 32 << 20
    src, dst = Qmp(src_path), Qmp(dst_path)
    setup(dst, mode, bandwidth)
    setup(src, mode, bandwidth)
    dst.cmd("migrate-incoming", uri=uri)
    src.cmd("migrate", uri=uri)
    start = time.monotonic()
    first_pass = None
    info = {}
    while True:
        info = src.cmd("query-migrate")
        status = info.get("status")
        syncs = info.get("ram", {}).get("dirty-sync-count", 0)
        if first_pass is None and syncs >= 2:
            first_pass = counters(info)
        if status in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() - start > timeout:
            src.cmd("migrate_cancel")
            info["status"] = "timeout"
            break
        time.sleep(0.05)
    # The target runs the guest on its own once the migration completed
    # (autostart); wait for that, at most 10 s.
    target_status = None
    for _ in range(200):
        target_status = dst.cmd("query-status").get("status")
        if target_status == "running" or info.get("status") != "completed":
            break
        time.sleep(0.05)
    end = counters(info)
    first_pass = first_pass or end
    rounds = {k: end[k] - first_pass[k] for k in end}
    # Pages sent after the first pass: whole pages, XBZRLE deltas, zero pages.
    sent = rounds["normal"] + rounds["xbzrle_pages"] + rounds["duplicate"]
    ram = info.get("ram", {})
    out = {
        "mode": mode,
        "max_bandwidth": bandwidth,
        "status": info.get("status"),
        "target_status": target_status,
        "total_time_ms": info.get("total-time"),
        "downtime_ms": info.get("downtime"),
        "setup_time_ms": info.get("setup-time"),
        "dirty_sync_count": ram.get("dirty-sync-count"),
        "transferred_bytes": end["transferred"],
        "ram_total_bytes": ram.get("total"),
        "first_pass": first_pass,
        "after_first_pass": rounds,
        "pages_after_first_pass": sent,
        "wire_bytes_per_page_after_first_pass":
            round(rounds["transferred"] / sent, 1) if sent else None,
        "xbzrle_cache_miss": info.get("xbzrle-cache", {}).get("cache-miss"),
        "xbzrle_encoding_rate": info.get("xbzrle-cache", {}).get("encoding-rate"),
    }
    print(json.dumps(out, indent=1))
    return 0 if info.get("status") == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
