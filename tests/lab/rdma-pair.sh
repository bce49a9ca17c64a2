#!/bin/sh
# Inside the rdma lab: a backup and a primary as separate processes over
# Soft-RoCE.
#   rdma-pair.sh BACKUP_TRANSPORT PRIMARY_TRANSPORT SPEC EPOCHS [KILL_MS...]
# Without KILL_MS: protect runs SPEC for EPOCHS epochs. With KILL_MS: one
# trial per value; the primary runs until its first "acked" progress line,
# then SIGKILL after KILL_MS more milliseconds ($KILL_AFTER_ACKED: wait for
# a progress line with at least that many epochs acknowledged; default 1). Per trial N (0 without
# KILL_MS) $LAB_OUT/N/ gets both stderrs and exit codes and the replica's
# digests (see finish_backup); the host checks them.
set -eu
bt=$1 pt=$2 spec=$3 epochs=$4
shift 4
export CASTOR_PSK=lab-integration-key-0123456789
addr=${CASTOR_LAB_RDMA_ADDR:?not in the rdma lab}

# Starts a backup; sets $baddr (from its "listening on" line) and $bpid.
start_backup() {
    rm -rf /tmp/replica /tmp/bout && mkfifo /tmp/bout
    castor backup --listen "$addr:0" --state-dir /tmp/replica --transport "$bt" --heartbeat-timeout 10s \
        >/tmp/bout 2>"$1/backup.err" &
    bpid=$!
    exec 3</tmp/bout
    read -r line <&3
    baddr=${line#listening on }
}

# Waits for the backup and saves into $1 its exit code, the replica's
# meta.json, `castor digest --replica` of it and the recomputed state
# (`castor digest --domain SPEC --at-epoch` the replica's epoch; this
# kernel has the PAGEMAP_SCAN the sim domain needs, the host may not).
finish_backup() {
    set +e
    wait "$bpid"
    echo $? >"$1/backup.rc"
    set -e
    exec 3<&-
    # The replica is a versioned directory behind the `current` symlink.
    [ -f /tmp/replica/current/meta.json ] || return 0
    cp /tmp/replica/current/meta.json "$1/meta.json"
    castor digest --replica /tmp/replica >"$1/replica.digest"
    e=$(sed -n 's/.*"epoch": *\([0-9]*\).*/\1/p' /tmp/replica/current/meta.json)
    castor digest --domain "$spec" --at-epoch "$e" >"$1/expected.digest"
}

if [ $# -eq 0 ]; then
    d=$LAB_OUT/0 && mkdir -p "$d"
    start_backup "$d"
    set +e
    castor protect --quiet --domain "$spec" --backup "$baddr" --arbiter none \
        --epoch 5ms --epochs "$epochs" --transport "$pt" --backup-timeout 10s 2>"$d/primary.err"
    echo $? >"$d/primary.rc"
    set -e
    finish_backup "$d"
    exit 0
fi

n=0
for ms in "$@"; do
    d=$LAB_OUT/$n && mkdir -p "$d"
    start_backup "$d"
    rm -f /tmp/perr && mkfifo /tmp/perr
    castor protect --domain "$spec" --backup "$baddr" --arbiter none \
        --epoch 5ms --transport "$pt" --backup-timeout 10s 2>/tmp/perr &
    ppid=$!
    exec 4</tmp/perr
    # The first progress line with an acknowledged epoch is the event that
    # checkpoints flow (here the seed alone can take longer than the first
    # line's second).
    flowing=""
    while read -r line <&4; do
        echo "$line" >>"$d/primary.err"
        acked=$(echo "$line" | sed -n 's/.*] acked *\([0-9]*\) .*/\1/p')
        if [ "${acked:-0}" -ge "${KILL_AFTER_ACKED:-1}" ]; then flowing=1 && break; fi
    done
    [ -n "$flowing" ] || echo "no progress line" >>"$d/primary.err"
    # Drain the rest so the primary never blocks on a full pipe.
    cat <&4 >>"$d/primary.err" &
    usleep $((ms * 1000))
    kill -9 "$ppid"
    wait "$ppid" || true
    exec 4<&-
    finish_backup "$d"
    echo "$ms" >"$d/kill_ms"
    n=$((n + 1))
done
