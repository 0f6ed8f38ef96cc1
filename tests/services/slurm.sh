#!/usr/bin/env bash
# A single-node SLURM cluster on 127.0.0.1, for tests/test_slurm.py and CI (`make slurm`).
#
# Idempotent: when `sinfo` already shows a usable node (idle, mixed or allocated), it does
# nothing. Otherwise, as root: installs Debian's slurm-wlm and munge if they are missing,
# writes /etc/slurm/slurm.conf for this host (nproc CPUs, a bit less memory than the host,
# one partition `debug`, no accounting database), starts munged, slurmctld and slurmd, and
# waits until a trivial `sbatch --wait` job runs through. Exits non-zero with the reason
# otherwise.
#
# Environment: LETI_SLURM_TIMEOUT (seconds to wait for the node and the trial job, default 120).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# Written by leti-workflow tests/services/slurm.sh"
LOG_DIR=/var/log/slurm
SPOOL=/var/spool
PARTITION=debug
TIMEOUT="${LETI_SLURM_TIMEOUT:-120}"

say() { echo "slurm.sh: $*" >&2; }

show_logs() {
    for file in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        if [[ -r "$file" ]]; then
            echo "--- last lines of $file" >&2
            tail -n 15 "$file" >&2
        fi
    done
}

fail() {
    echo "tests/services/slurm.sh: cannot bring up the test SLURM cluster: $*" >&2
    show_logs
    exit 1
}

node_state() {
    # Compact state of this cluster's node(s): idle, mix, alloc, down*, drain, ... (empty if no answer)
    timeout 10 sinfo --noheader --Node --format='%t' 2>/dev/null | head -n 1 || true
}

node_usable() {
    [[ "$(node_state)" =~ ^(idle|mix|alloc)$ ]]
}

if command -v sinfo > /dev/null && node_usable; then
    say "SLURM is up: $(sinfo --noheader --Node --format='%N %t %c CPUs %m MB, partition %P' | head -n 1)"
    exit 0
fi

is_root=false
[[ "$(id -u)" == 0 ]] && is_root=true

# --- software

export PATH="$PATH:/usr/sbin:/sbin"  # the daemons live there
missing=()
for tool in sinfo sbatch squeue scontrol slurmctld slurmd munged munge unmunge; do
    command -v "$tool" > /dev/null || missing+=("$tool")
done
if ((${#missing[@]})); then
    if ! $is_root || ! command -v apt-get > /dev/null; then
        fail "missing ${missing[*]}; install Debian's slurm-wlm and munge (needs root and apt-get)"
    fi
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || fail "apt-get update failed"
    apt-get install -y -qq slurm-wlm munge > /dev/null || fail "apt-get install slurm-wlm munge failed"
fi

$is_root || fail "SLURM is not running here, and starting its daemons needs root"

# --- configuration

host="$(hostname -s)"
cpus="$(nproc)"
total_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024))
# A bit less than the host has: slurmd marks a node that has less than RealMemory invalid.
margin=$((total_mb / 20 > 512 ? total_mb / 20 : 512))
real_mb=$((total_mb - margin))

if [[ -e "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    fail "$CONF exists and was not written by this script; not overwriting it. Start that cluster, or move the file away to let this script set up a test cluster."
fi

new_conf="$(
    cat << EOF
$MARKER: a one-node test cluster.
ClusterName=leti-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# No accounting database: sacct does not work, squeue reports job states. Finished jobs
# stay visible to squeue for a day (Snakemake's SLURM executor polls them with squeue).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=86400
StateSaveLocation=$SPOOL/slurmctld
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)"

conf_changed=false
if [[ ! -e "$CONF" ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    mkdir -p "$CONF_DIR"
    printf '%s\n' "$new_conf" > "$CONF"
    conf_changed=true
    say "wrote $CONF ($host on 127.0.0.1: $cpus CPUs, $real_mb MB, partition $PARTITION)"
fi
mkdir -p "$LOG_DIR" "$SPOOL/slurmctld" "$SPOOL/slurmd"

# --- munge

munge_ok() { munge -n 2> /dev/null | unmunge > /dev/null 2>&1; }

if ! munge_ok; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        mkdir -p /etc/munge
        if command -v mungekey > /dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    say "starting munged"
    su -s /bin/sh munge -c munged || fail "munged did not start (see /var/log/munge/munged.log)"
    for _ in $(seq 20); do
        munge_ok && break
        sleep 0.5
    done
    munge_ok || fail "munge -n | unmunge does not succeed (see /var/log/munge/munged.log)"
fi

# --- slurmctld and slurmd

running() {
    # Is the daemon whose pid file is $1 alive?
    [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2> /dev/null
}

if running /run/slurmctld.pid && timeout 10 scontrol ping 2> /dev/null | grep -q "is UP"; then
    if $conf_changed; then
        say "slurmctld is running; reloading the new configuration"
        scontrol reconfigure || true
    fi
else
    say "starting slurmctld"
    slurmctld || fail "slurmctld did not start"
    for _ in $(seq 30); do
        timeout 10 scontrol ping 2> /dev/null | grep -q "is UP" && break
        sleep 1
    done
    timeout 10 scontrol ping 2> /dev/null | grep -q "is UP" || fail "slurmctld does not answer scontrol ping"
fi

if ! running /run/slurmd.pid; then
    say "starting slurmd"
    slurmd || fail "slurmd did not start"
fi

# --- wait for the node, then run a trial job

resumed=false
deadline=$((SECONDS + TIMEOUT))
until node_usable; do
    state="$(node_state)"
    if ! $resumed && [[ "$state" =~ ^(down|drain|drng|inval|fail) ]]; then
        # e.g. "Node unexpectedly rebooted" after a restart of the daemons.
        say "node $host is $state; resuming it"
        scontrol update NodeName="$host" State=RESUME 2> /dev/null || true
        resumed=true
    fi
    ((SECONDS < deadline)) || fail "node $host did not become idle within ${TIMEOUT}s (state: ${state:-no answer}; $(scontrol show node "$host" 2> /dev/null | grep -o 'Reason=.*' || true))"
    sleep 1
done

trial_out="$(mktemp)"
trap 'rm -f "$trial_out"' EXIT
if ! timeout "$TIMEOUT" sbatch --wait --quiet --partition="$PARTITION" --ntasks=1 --cpus-per-task=1 \
    --mem=64 --time=1 --job-name=leti-slurm-check --output="$trial_out" --wrap='echo ok'; then
    fail "a trial job (sbatch --wait --wrap 'echo ok') did not complete within ${TIMEOUT}s"
fi
grep -qx ok "$trial_out" || fail "the trial job ran but wrote '$(cat "$trial_out")' instead of 'ok'"

say "SLURM is up: $(sinfo --noheader --Node --format='%N %t %c CPUs %m MB, partition %P' | head -n 1)"
