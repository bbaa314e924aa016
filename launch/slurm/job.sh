# Body of launch/slurm/{sft,unlearn}.sbatch, sourced by them with JOB and SYNTHUNLEARN_ROOT set and
# "$@" = the launcher's arguments (--config FILE --output-dir DIR ... key.sub=value).
#
# One srun task per GPU (or per CPU rank on nodes without GPUs); synthunlearn/distributed.py maps
# SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS to RANK/LOCAL_RANK/WORLD_SIZE, and this file supplies the
# rendezvous (MASTER_ADDR = first host of the job, MASTER_PORT derived from the job id).
#
# Stop / requeue protocol (see docs/cluster.md):
#   SIGUSR1 (from `#SBATCH --signal=B:USR1@N` or `scancel --signal=USR1 --batch`) or SIGTERM reaching
#   this shell is forwarded to srun as SIGUSR1, which srun forwards to every rank. The trainer then
#   checkpoints at the next step boundary, writes <output-dir>/STOPPED and exits 0. Only that
#   combination (exit 0 + STOPPED) requeues the job; the requeued run executes this same script
#   with the same arguments and the trainer resumes from the newest complete checkpoint.
#   A run that finishes exits 0 without STOPPED; a crash exits non-zero: neither is requeued.

set -uo pipefail

log() { echo "[synthunlearn-slurm $(date '+%F %T')] $*"; }

# Traps first: bash's default action for SIGUSR1 is to die, which would lose the job.
SRUN_PID=
TRAPPED=0
STOP_REQUESTED=
RESENDER_PID=
forward_stop() {
    TRAPPED=1
    log "received SIG$1: asking the ranks to checkpoint at the next step boundary and exit"
    STOP_REQUESTED=$1
    # Before srun starts, the request is acted on where srun would start or just after it has.
    [[ -n $SRUN_PID ]] || return 0
    # USR1, never TERM: srun answers TERM by SIGKILLing the tasks, which would lose the step.
    kill -USR1 "$SRUN_PID" 2>/dev/null
    repeat_stop
}
repeat_stop() {
    # Ranks still starting up ignore USR1 until the trainer installs its handler (see the srun
    # line), so repeat it until srun ends; the trainer treats repeats as one request.
    if [[ -z $RESENDER_PID ]]; then
        # (its output goes nowhere, so a sleep still running after the job does not hold the log open)
        ( while sleep "${SYNTHUNLEARN_STOP_RESEND_S:-30}" && kill -USR1 "$SRUN_PID"; do :; done ) >/dev/null 2>&1 &
        RESENDER_PID=$!
    fi
}
trap 'forward_stop USR1' USR1
trap 'forward_stop TERM' TERM

requeue_or_give_up() {
    local max=${SYNTHUNLEARN_MAX_REQUEUES:-50}
    if (( ${SLURM_RESTART_COUNT:-0} >= max )); then
        log "already requeued ${SLURM_RESTART_COUNT:-0} times (SYNTHUNLEARN_MAX_REQUEUES=$max); not again." \
            "Resubmit the same command to resume."
        exit 75
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        log "requeued job $SLURM_JOB_ID; the next run resumes from the checkpoint in $OUT/checkpoints"
        exit 0
    fi
    log "could not requeue (job submitted with --no-requeue, or requeue disabled on this cluster)." \
        "Resubmit the same command to resume from the checkpoint."
    exit 75   # EX_TEMPFAIL: not finished, so `--dependency=afterok` jobs must not start
}

# -- interpreter: explicit > active virtualenv (sbatch exports the submitting shell) > repo .venv
if [[ -n ${SYNTHUNLEARN_PYTHON:-} ]]; then PY=$SYNTHUNLEARN_PYTHON
elif [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then PY=$VIRTUAL_ENV/bin/python
elif [[ -x $SYNTHUNLEARN_ROOT/.venv/bin/python ]]; then PY=$SYNTHUNLEARN_ROOT/.venv/bin/python
else PY=$(command -v python3 || command -v python); fi

# -- one task per GPU: a mismatch would leave GPUs idle or put two ranks on one GPU
gpus=${SLURM_GPUS_PER_NODE:-0}
gpus=${gpus##*:}            # "a100:4" -> "4"
if [[ $gpus =~ ^[0-9]+$ ]] && (( gpus > 0 )) && [[ -n ${SLURM_NTASKS_PER_NODE:-} ]] \
        && (( SLURM_NTASKS_PER_NODE != gpus )); then
    echo "error: --ntasks-per-node=$SLURM_NTASKS_PER_NODE but --gpus-per-node=$gpus; synthunlearn runs" \
         "one task per GPU, so pass the same number to both" >&2
    exit 2
fi

# -- where the run writes, decided by the launcher's own argument parser (also validates "$@")
OUT=$("$PY" -m synthunlearn.slurm output-dir "$JOB" -- "$@") || exit 2
RDZV=$("$PY" -m synthunlearn.slurm env) || exit 2
eval "$RDZV"
# A RANK inherited from the submitting shell would stop distributed.py from reading SLURM's ids.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK
# One OpenMP pool per rank sized to its CPUs, not to the whole node (torch's default).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1

log "job ${SLURM_JOB_ID} (${SLURM_JOB_NAME:-}) run $(( ${SLURM_RESTART_COUNT:-0} + 1 )):" \
    "${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NUM_NODES:-1} node(s) ${SLURM_JOB_NODELIST:-?}," \
    "rendezvous ${MASTER_ADDR}:${MASTER_PORT}, output ${OUT}"
log "command: $PY $SYNTHUNLEARN_ROOT/launch/$JOB.py $*"

# A marker left by an earlier run must not be mistaken for this run's.
rm -f "$OUT/STOPPED"

if [[ -n $STOP_REQUESTED ]]; then   # signalled during the set-up above: nothing to save yet
    log "stop requested before training started; not starting it"
    requeue_or_give_up
fi

# srun in the background, because bash runs traps only between commands: a foreground srun would
# hold the signal until training ended. srun itself starts with SIGUSR1 ignored (an ignored signal
# stays ignored across exec) until it installs its own handler, which forwards the signal to the
# ranks: a USR1 in between, e.g. a stop request just after srun was forked, would otherwise kill
# it and end the job unrequeued (on a test cluster: killed when sent as srun was forked, forwarded
# when sent 50 ms later); now such a request is lost, and its repeats (repeat_stop) reach the
# ranks. Each rank likewise starts with SIGUSR1 ignored so that a stop request during its imports
# does not kill it; the trainer's own handler replaces that. --kill-on-bad-exit: one crashed rank
# ends the step instead of leaving the others blocked in a collective.
( trap '' USR1
  exec srun --kill-on-bad-exit=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
      bash -c 'trap "" USR1; exec "$@"' synthunlearn-rank \
      "$PY" -u "$SYNTHUNLEARN_ROOT/launch/$JOB.py" "$@" ) &
SRUN_PID=$!
# A request that came after the check above but before SRUN_PID was set found no srun to signal.
# srun has only just been forked and would ignore it: the repeats start SYNTHUNLEARN_STOP_RESEND_S later.
[[ -n $STOP_REQUESTED ]] && repeat_stop
while :; do
    TRAPPED=0
    wait "$SRUN_PID"
    rc=$?
    (( TRAPPED )) || break    # wait returned because a trap ran, not because srun ended
done
[[ -n $RESENDER_PID ]] && kill "$RESENDER_PID" 2>/dev/null

if (( rc != 0 )); then
    log "training exited with status $rc; not requeueing"
    exit "$rc"
fi
if [[ ! -f $OUT/STOPPED ]]; then
    log "finished: model in $OUT/final"
    exit 0
fi
log "stopped by signal after a checkpoint: $(cat "$OUT/STOPPED" 2>/dev/null)"
requeue_or_give_up
