#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests of launch/slurm/*.sbatch.
#
#   tests/slurm/start_cluster.sh [--stop]
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (only as root
# with apt-get), writes a private slurm.conf, starts munged, slurmctld and slurmd without systemd,
# and waits until the node is idle. Idempotent: daemons that already answer are left alone.
# The last line of stdout is `SLURM_CONF=<path>`; client commands (sbatch, squeue, scontrol) need
# that variable, since /etc/slurm is deliberately left untouched (a real cluster's configuration
# may live there). Exit status 3 means "SLURM cannot be made available here" (tests skip on it).
#
# Choices, each because of where this runs (containers/VMs without systemd or cgroup delegation):
#   proctrack/linuxproc + task/none   no cgroups needed
#   select/cons_tres, CR_CPU          2 CPUs -> 2 single-CPU tasks; memory not tracked
#   SlurmdParameters=config_overrides the node advertises CPUs=2 whatever the hardware says
#   ports 16817/16818                 not SLURM's defaults, so a real slurmd on the host is unaffected
#   SlurmUser=root                    spool/state directories need no extra user or permissions
#   cred_expire=10, sched_interval=2  a requeued job restarts after ~10 s instead of ~2-3 minutes
set -euo pipefail

STATE=${SYNTHUNLEARN_SLURM_DIR:-/var/tmp/synthunlearn-slurm}
CONF=$STATE/slurm.conf
NODE=$(hostname -s)

die_unavailable() { echo "slurm unavailable: $*" >&2; exit 3; }

stop() {
    for d in slurmd slurmctld; do
        if [[ -f $STATE/$d.pid ]] && kill -0 "$(cat "$STATE/$d.pid")" 2>/dev/null; then
            kill "$(cat "$STATE/$d.pid")" || true
        fi
    done
}

if [[ ${1:-} == --stop ]]; then stop; exit 0; fi

# -- 1. packages ----------------------------------------------------------------------------------
need_install=0
for bin in slurmctld slurmd sbatch munged; do
    command -v "$bin" >/dev/null 2>&1 || [[ -x /usr/sbin/$bin ]] || need_install=1
done
if (( need_install )); then
    [[ $(id -u) == 0 ]] || die_unavailable "slurmctld/slurmd/munge are not installed and we are not root"
    command -v apt-get >/dev/null || die_unavailable "slurmctld/slurmd/munge are not installed and there is no apt-get"
    export DEBIAN_FRONTEND=noninteractive
    pkgs=(slurmctld slurmd slurm-client munge)
    # Try without `apt-get update` first: a warm package index saves a minute.
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$STATE.apt.log" 2>&1 \
        && ! { apt-get update -q >>"$STATE.apt.log" 2>&1 \
               && apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$STATE.apt.log" 2>&1; }; then
        tail -20 "$STATE.apt.log" >&2
        die_unavailable "apt-get install ${pkgs[*]} failed (log: $STATE.apt.log)"
    fi
fi
export PATH=$PATH:/usr/sbin:/sbin
[[ $(id -u) == 0 ]] || { command -v sinfo >/dev/null && SLURM_CONF=$CONF sinfo >/dev/null 2>&1 \
    && { echo "SLURM_CONF=$CONF"; exit 0; }; die_unavailable "starting slurm daemons needs root"; }

mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/jobs"

# -- 2. munge (authentication between the daemons and the client commands) ------------------------
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key --force
        else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    # munged refuses to run as root; the Debian package's user is `munge`.
    runuser -u munge -- /usr/sbin/munged || die_unavailable "munged did not start"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || die_unavailable "munge does not answer"
fi

# -- 3. configuration -----------------------------------------------------------------------------
new_conf=$(cat <<EOF
# Written by tests/slurm/start_cluster.sh: a one-node test cluster, see the comments there.
ClusterName=synthunlearn-test
MailProg=/bin/true
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=16817
SlurmdPort=16818
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# A requeued job becomes eligible by the clock, which only the periodic pass notices (default 60 s).
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobRequeue=1
KillWait=10
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
)
restart=0
if [[ ! -f $CONF ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" >"$CONF"
    restart=1
fi
export SLURM_CONF=$CONF

running() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

# -- 4. daemons -----------------------------------------------------------------------------------
if (( restart )) && { running slurmctld || running slurmd; }; then
    stop
    for _ in $(seq 50); do running slurmctld || running slurmd || break; sleep 0.2; done
fi
running slurmctld || slurmctld -f "$CONF" || die_unavailable "slurmctld did not start (see $STATE/slurmctld.log)"
running slurmd || slurmd -f "$CONF" -N "$NODE" || die_unavailable "slurmd did not start (see $STATE/slurmd.log)"

# -- 5. wait for an idle node ---------------------------------------------------------------------
state=
for i in $(seq 120); do
    state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true)
    case $state in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case $state in
    idle|mixed|allocated|completing) ;;
    *) tail -5 "$STATE/slurmctld.log" "$STATE/slurmd.log" >&2 || true
       die_unavailable "node $NODE is '${state:-unknown}' after 60 s" ;;
esac
echo "SLURM_CONF=$CONF"
