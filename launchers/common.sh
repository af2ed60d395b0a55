# shellcheck shell=bash
# The launch environment every launcher shares; sourced (never run) by t2i_256gpu.sh, c2i.sh,
# local.sh and mpi.sh, so each fact below is written once.
#
# Inputs, all optional, all from the environment (nothing here needs editing):
#   CONFIG        YAML config; relative paths are tried from the caller's directory, then the checkout
#   TRAIN_ARGS    extra dotted overrides ("optim.lr=2e-4 train.steps=1000"); the launcher's own
#                 arguments come after them, and later overrides win
#   VENV          virtual environment to activate (default: .venv in the checkout, when present and
#                 no environment is active)
#   PYTHON        interpreter (default: python of the active environment)
#   DIFFMOE_TRAIN the training command (default: "$PYTHON -m diffmoe_dist.train.cli"); tests and
#                 wrappers (a profiler, a stub) replace it
#   DIFFMOE_DATA  where data sets live (default data/ in the checkout): a config's relative
#                 data.path under data/ (data/t2i-256) is read from $DIFFMOE_DATA/t2i-256 instead
#   DIFFMOE_RUNS  where run directories go (default runs/ in the checkout; RUNS is the older name):
#                 Slurm jobs write $DIFFMOE_RUNS/<job name>, other launchers map a relative
#                 train.run_dir under runs/ there. On a cluster point both at the shared file system:
#                 every node reads the same data and writes the same checkpoints.
#   OMP_NUM_THREADS, MALLOC_*_THRESHOLD_   kept when already set
#   DRY_RUN=1     print the command that would run, and run nothing
#
# The working directory becomes the checkout, so relative paths in configs (data/, runs/) and
# in overrides are relative to it.

DIFFMOE_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export DIFFMOE_ROOT
DIFFMOE_LAUNCHER=${DIFFMOE_LAUNCHER:-$(basename "${DIFFMOE_SCRIPT:-$0}")} # DIFFMOE_SCRIPT: an sbatch script's own path
# The two locations a shared file system must hold, set here and nowhere else.
DIFFMOE_DATA_SET=${DIFFMOE_DATA:+1}
DIFFMOE_RUNS_SET=${DIFFMOE_RUNS:-${RUNS:-}}
DIFFMOE_DATA=${DIFFMOE_DATA:-$DIFFMOE_ROOT/data}
DIFFMOE_RUNS=${DIFFMOE_RUNS:-${RUNS:-$DIFFMOE_ROOT/runs}}
export DIFFMOE_DATA DIFFMOE_RUNS
# Exit status with which the trainer says "I saved a checkpoint because I was told to stop; run me
# again" (sysexits.h EX_TEMPFAIL). A Slurm launcher requeues the job when its step exits with it.
DIFFMOE_EXIT_REQUEUE=75
DIFFMOE_SIGNALS=0 # signals trapped so far (diffmoe_forward): how diffmoe_run_step tells an interrupted wait

diffmoe_log() { echo "[$DIFFMOE_LAUNCHER] $*" >&2; }
diffmoe_die() {
  echo "$DIFFMOE_LAUNCHER: error: $*" >&2
  exit 2
}

# CONFIG -> an absolute path that exists. $1: the launcher's default.
diffmoe_resolve_config() {
  local c=${CONFIG:-$1}
  if [[ $c != /* ]]; then
    if [[ -f $PWD/$c ]]; then c=$PWD/$c; else c=$DIFFMOE_ROOT/$c; fi
  fi
  [[ -f $c ]] || diffmoe_die "CONFIG=${CONFIG:-$1} does not exist: set CONFIG to a YAML file, e.g. CONFIG=configs/local/diffmoe-tiny.yaml"
  CONFIG=$c
  export CONFIG
}

# Python, the venv and the trainer command (array TRAIN_CMD).
diffmoe_python() {
  local venv=${VENV:-$DIFFMOE_ROOT/.venv}
  if [[ -z ${VIRTUAL_ENV:-} && -f $venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
  PYTHON=${PYTHON:-$(command -v python || command -v python3)} || diffmoe_die "no python on PATH: set PYTHON or VENV"
  export PYTHON
  # The module form also works from a checkout that is not pip-installed (the cwd is the checkout).
  read -ra TRAIN_CMD <<<"${DIFFMOE_TRAIN:-$PYTHON -m diffmoe_dist.train.cli}"
}

# Allocator and threads. $1: processes per node.
diffmoe_cpu_env() {
  # glibc maps every allocation over 32 MB afresh and unmaps it on free: a fp32 FFN at 16K tokens
  # took 100K-220K page faults per step (0.2-0.9 s in the kernel). Raising both thresholds keeps
  # those blocks in the heap; measured, the mmap threshold alone does not help, both together do.
  export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
  export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
  # One intra-op pool per process over its share of the cores: more threads than cores makes
  # every rank slower (and a collective waits for the slowest). Slurm's --cpus-per-task is exact.
  local per_node=${1:-1} threads
  if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    threads=$SLURM_CPUS_PER_TASK
  else
    threads=$((${SLURM_CPUS_ON_NODE:-$(nproc)} / per_node))
  fi
  ((threads >= 1)) || threads=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
  export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
}

# Interconnect defaults (documented in t2i_256gpu.sh); a value already set wins.
diffmoe_nccl_env() {
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}
  # No gloo groups beside the NCCL ones (parallel/launch.py): gloo would pick an interface by host
  # name and can hang on multi-homed nodes. Who turns them on (DIFFMOE_GLOO_GROUPS=1) sets
  # GLOO_SOCKET_IFNAME; it defaults to NCCL_SOCKET_IFNAME when that names one interface.
  if [[ -n ${NCCL_SOCKET_IFNAME:-} && $NCCL_SOCKET_IFNAME != ^* && -z ${GLOO_SOCKET_IFNAME:-} ]]; then
    export GLOO_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME
  fi
  # A rank that fails a collective raises instead of hanging the job until its time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
}

# Overrides in order: launcher defaults ($@ of the caller, passed first), TRAIN_ARGS, arguments.
# Usage: diffmoe_overrides DEFAULT... -- ARG...   -> array OVERRIDES
diffmoe_overrides() {
  OVERRIDES=()
  while (($#)) && [[ $1 != -- ]]; do
    OVERRIDES+=("$1")
    shift
  done
  (($#)) && shift
  local extra=()
  read -ra extra <<<"${TRAIN_ARGS:-}"
  OVERRIDES+=("${extra[@]}" "$@")
  diffmoe_locations
}

# A config read above failed: status 2 means the line naming the field is printed already.
diffmoe_config_failed() {
  (($1 == 2)) && exit 2
  diffmoe_die "$2"
}

# DIFFMOE_DATA / DIFFMOE_RUNS (when set) for relative data/... and runs/... paths of the config and
# overrides; appended last, so the paths resolve to the same place on every node.
diffmoe_locations() {
  [[ -n $DIFFMOE_DATA_SET || -n $DIFFMOE_RUNS_SET ]] || return 0
  local paths data run
  paths=$(
    "$PYTHON" - "$CONFIG" "${OVERRIDES[@]}" <<'EOF'
import sys
from diffmoe_dist.config import ConfigError, load_config
try:
    cfg = load_config(sys.argv[1], sys.argv[2:])
except ConfigError as exc:  # the trainer's own line, once (the launchers' contract: one line, exit 2)
    print(f"diffmoe-train: error: {exc}", file=sys.stderr)
    sys.exit(2)
print(cfg.data.path)
print(cfg.train.run_dir)
EOF
  ) || diffmoe_config_failed $? "cannot read data.path / train.run_dir from $CONFIG ${OVERRIDES[*]}"
  {
    read -r data
    read -r run
  } <<<"$paths"
  data=${data#./}
  run=${run#./}
  if [[ -n $DIFFMOE_DATA_SET && $data == data/* ]]; then OVERRIDES+=("data.path=$DIFFMOE_DATA/${data#data/}"); fi
  if [[ -n $DIFFMOE_RUNS_SET && $run == runs/* ]]; then OVERRIDES+=("train.run_dir=$DIFFMOE_RUNS/${run#runs/}"); fi
  return 0
}

# Makes the data set when it is the embedded digits set and missing; any other missing path is an
# error now rather than on every rank after the job has started. Uses CONFIG and OVERRIDES.
diffmoe_prepare_data() {
  local path
  path=$(
    "$PYTHON" - "$CONFIG" "${OVERRIDES[@]}" <<'EOF'
import sys
from diffmoe_dist.config import ConfigError, load_config
try:
    print(load_config(sys.argv[1], sys.argv[2:]).data.path)
except ConfigError as exc:  # the trainer's own line, once (the launchers' contract: one line, exit 2)
    print(f"diffmoe-train: error: {exc}", file=sys.stderr)
    sys.exit(2)
EOF
  ) || diffmoe_config_failed $? "cannot read data.path from $CONFIG ${OVERRIDES[*]}"
  [[ -e $path ]] && return 0
  local kind
  kind=$(basename "$path")
  if [[ $kind == digits || $kind == digits-t2i ]]; then
    diffmoe_log "making the $kind shards in $path (once)"
    "$PYTHON" tools/make_shards.py "$kind" --out "$path" >&2 || diffmoe_die "tools/make_shards.py $kind --out $path failed"
  else
    diffmoe_die "data.path=$path does not exist: make it with tools/make_shards.py, or pass data.path=DIR"
  fi
}

# The config and the files it names (data shards, a resume path), checked once before any rank
# starts: a bad value is one line and exit 2 here, not one line per rank plus torchrun's traceback.
# Always the real trainer's check (DIFFMOE_TRAIN may be a wrapper or a stub); DIFFMOE_VALIDATE=0
# skips it. $1: the job's world size; $2 "values": the values only (before diffmoe_prepare_data makes
# the digits shards), else the files too. Uses CONFIG and OVERRIDES; exports DIFFMOE_EXIT_STATUS_FILE
# (see diffmoe_run_keeping_status) for the run directory it read.
diffmoe_validate() {
  local run_dir=runs/unnamed rc=0 values=()
  [[ ${2:-} == values ]] && values=(--no-file-checks)
  if [[ ${DIFFMOE_VALIDATE:-1} != 0 ]]; then
    run_dir=$("$PYTHON" -m diffmoe_dist.train.cli --validate-only --world-size "$1" "${values[@]}" \
      --config "$CONFIG" "${OVERRIDES[@]}") || rc=$?
    ((rc == 0)) || exit "$rc" # the trainer printed the one line
    # the ranks need not walk every shard's tar headers again
    ((${#values[@]})) || export DIFFMOE_FILES_CHECKED=1
  fi
  [[ $run_dir == /* ]] || run_dir=$DIFFMOE_ROOT/$run_dir
  mkdir -p "$(dirname "$run_dir")"
  export DIFFMOE_EXIT_STATUS_FILE
  DIFFMOE_EXIT_STATUS_FILE="$(dirname "$run_dir")/.$(basename "$run_dir").exit-status.$(hostname -s).$$"
}

# Everything checked before any rank starts: the config's values, then the data (the digits shards
# made when missing), then the files. $1: the job's world size.
diffmoe_check() {
  diffmoe_validate "$1" values
  diffmoe_prepare_data
  diffmoe_validate "$1"
}

# -n N (or NPROC=N, default 4) of local.sh and mpi.sh: sets NPROC, and ARGS to the other arguments.
diffmoe_nproc_args() {
  NPROC=${NPROC:-4}
  if [[ ${1:-} == -n ]]; then
    NPROC=${2:?-n needs a process count}
    shift 2
  fi
  [[ $NPROC =~ ^[1-9][0-9]*$ ]] || diffmoe_die "NPROC=$NPROC is invalid: pass a positive process count, e.g. -n 4"
  # shellcheck disable=SC2034 # read by the launcher
  ARGS=("$@")
}

# ---- Running the ranks: one wait loop, one exit-75 path -------------------------------------------
# Exit 75 ($DIFFMOE_EXIT_REQUEUE) does not survive the launchers: torchrun and mpirun turn a rank's 75
# into 1 (torchrun also kills the other ranks in their teardown), and srun --kill-on-bad-exit kills
# the peers of the first rank to exit 75 (measured: one rank "Terminated", the step's status not 75).
# So each rank appends "RANK STATUS" (75 stopped, 0 finished) to DIFFMOE_EXIT_STATUS_FILE and exits 0
# instead (train/cli.py; under srun the task's shell does it for a trainer that exits 75 itself), and
# diffmoe_run_step counts the lines. The file (diffmoe_validate names it) sits beside the run
# directory (a shared file system for several hosts), never inside it.
#
# bash runs a trap only between commands, so the ranks' command runs in the background and the shell
# waits in a loop; the caller's traps call diffmoe_forward, which passes the signal on.
diffmoe_forward() {
  DIFFMOE_SIGNALS=$((DIFFMOE_SIGNALS + 1))
  diffmoe_log "SIG$1 received: forwarding it to the training step"
  [[ -n ${DIFFMOE_STEP_PID:-} ]] && kill "-$1" "$DIFFMOE_STEP_PID" 2>/dev/null
  return 0
}

# Runs "$@" and waits for it. Sets DIFFMOE_STEP_RC (its exit status), DIFFMOE_RANKS_75 and
# DIFFMOE_RANKS_0 (how many ranks stopped and finished).
diffmoe_run_step() {
  [[ -n ${DIFFMOE_EXIT_STATUS_FILE:-} ]] || diffmoe_die "diffmoe_validate must run before diffmoe_run_step"
  rm -f "$DIFFMOE_EXIT_STATUS_FILE"
  "$@" &
  DIFFMOE_STEP_PID=$!
  local rc seen again
  while :; do
    seen=$DIFFMOE_SIGNALS
    rc=0
    wait "$DIFFMOE_STEP_PID" || rc=$?
    if ((seen != DIFFMOE_SIGNALS)); then
      # interrupted by a trap: the command may still run, or may have ended meanwhile (its status is
      # then still to be collected; 127 means the interrupted wait had collected it after all)
      if kill -0 "$DIFFMOE_STEP_PID" 2>/dev/null; then continue; fi
      again=0
      wait "$DIFFMOE_STEP_PID" 2>/dev/null || again=$?
      ((again == 127)) || rc=$again
    fi
    break
  done
  DIFFMOE_STEP_PID=
  DIFFMOE_STEP_RC=$rc
  DIFFMOE_RANKS_75=0
  DIFFMOE_RANKS_0=0
  if [[ -f $DIFFMOE_EXIT_STATUS_FILE ]]; then
    DIFFMOE_RANKS_75=$(grep -c " $DIFFMOE_EXIT_REQUEUE\$" "$DIFFMOE_EXIT_STATUS_FILE" || true)
    DIFFMOE_RANKS_0=$(grep -c " 0\$" "$DIFFMOE_EXIT_STATUS_FILE" || true)
    rm -f "$DIFFMOE_EXIT_STATUS_FILE"
  fi
}

# torchrun / mpirun: runs the command with TERM, INT and HUP forwarded to the launcher process, which
# passes them to every rank, and exits with the trainer's status: 0 when all $1 ranks finished (a
# signal in the launcher's teardown does not undo that), 75 when they stopped after a checkpoint.
# $1: world size, then the command.
diffmoe_run_keeping_status() {
  local world=$1 sig
  shift
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  diffmoe_log "$*"
  for sig in TERM INT HUP; do
    # shellcheck disable=SC2064
    trap "diffmoe_forward $sig" "$sig"
  done
  diffmoe_run_step "$@"
  trap - TERM INT HUP
  local rc=$DIFFMOE_STEP_RC stopped=$DIFFMOE_RANKS_75
  if ((DIFFMOE_RANKS_0 >= world)); then
    ((rc == 0)) || diffmoe_log "all $world ranks finished; launcher exit $rc (a late signal): exit 0"
    exit 0
  fi
  if ((stopped > 0)); then
    diffmoe_log "$stopped of $world ranks exited $DIFFMOE_EXIT_REQUEUE (checkpoint saved, run again to resume); launcher exit $rc"
    # every rank stopped cleanly after the checkpoint: what the launcher made of the last one's
    # teardown (e.g. torchrun's status after a forwarded SIGTERM) does not matter
    ((stopped >= world)) && rc=$DIFFMOE_EXIT_REQUEUE
    ((rc != 0)) || rc=$DIFFMOE_EXIT_REQUEUE
  fi
  exit "$rc"
}

# Everything a launcher needs before it builds its command. $1: processes per node.
diffmoe_setup() {
  cd "$DIFFMOE_ROOT" || diffmoe_die "cannot cd to $DIFFMOE_ROOT"
  diffmoe_python
  diffmoe_cpu_env "$1"
  diffmoe_nccl_env
}

# Prints the command (DRY_RUN=1) or replaces the shell with it.
diffmoe_exec() {
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "$@"
    echo
    exit 0
  fi
  diffmoe_log "$*"
  exec "$@"
}

# ---- Slurm ------------------------------------------------------------------------------------
# The batch-script side of preemption and time limits:
# - `--signal=B:USR1@300` delivers USR1 to this batch shell only, 300 s before the time limit: it
#   is forwarded to the step (srun passes it to every task), the trainer saves and exits with
#   $DIFFMOE_EXIT_REQUEUE, and this script requeues the job, which then resumes from RUN/checkpoints.
# - Preemption (PreemptMode=REQUEUE), `scontrol requeue` and `scancel` send SIGTERM to every task
#   and this shell, then SIGKILL after KillWait: SIGTERM is the same warning; Slurm decides what
#   follows (requeue or not), so this script never requeues after a SIGTERM.
# - `scancel --signal=USR1 JOB` reaches the tasks directly; their exit status 75 requeues the job.
# The step runs and is waited for as torchrun and mpirun are (diffmoe_run_step), its ranks' exit 75
# reaching this shell through the same status file.
DIFFMOE_MAX_REQUEUES=${DIFFMOE_MAX_REQUEUES:-100}

diffmoe_srun() {
  DIFFMOE_WARNED=
  trap 'DIFFMOE_WARNED=TERM; diffmoe_forward TERM' TERM
  trap '[[ $DIFFMOE_WARNED == TERM ]] || DIFFMOE_WARNED=USR1; diffmoe_forward USR1' USR1
  # srun does not inherit --cpus-per-task from sbatch in Slurm 22.05-23.02: pass it on.
  # --kill-on-bad-exit: a rank that dies ends the step instead of leaving the others in a collective.
  # Each task prints where it runs (all tasks of a node share a host name; SLURM_NODEID tells them apart).
  # The task's shell outlives the signals the step gets (`trap :`; the trainer, its child, starts
  # with default handlers, since bash resets caught signals for children, and installs its own), so
  # that it can write a trainer's bare exit 75 into DIFFMOE_EXIT_STATUS_FILE (the exit-75 path above).
  # --distribution=block: consecutive ranks on one node, so each EP group (consecutive ranks) shares
  # its node's NVLink; a site default or user choice of cyclic comes through SLURM_DISTRIBUTION and
  # is refused at start-up by the trainer when it would split an EP group (one line, exit 2).
  diffmoe_run_step srun --kill-on-bad-exit=1 --distribution="$DIFFMOE_DISTRIBUTION" \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} \
    bash -c 'echo "[diffmoe-task] rank $SLURM_PROCID/$SLURM_NTASKS node $SLURM_NODEID local $SLURM_LOCALID host $(hostname -s) restart ${SLURM_RESTART_COUNT:-0}"
      trap : TERM USR1
      "$@"
      rc=$?
      if ((rc == 75)); then echo "$SLURM_PROCID 75" >>"$DIFFMOE_EXIT_STATUS_FILE"; rc=0; fi
      exit $rc' \
    diffmoe-task "$@"
  trap - TERM USR1
  if ((DIFFMOE_RANKS_75 > 0)); then
    diffmoe_log "$DIFFMOE_RANKS_75 of ${SLURM_NTASKS:-?} ranks exited $DIFFMOE_EXIT_REQUEUE (checkpoint saved, requeue asked)"
    ((DIFFMOE_STEP_RC != 0)) || DIFFMOE_STEP_RC=$DIFFMOE_EXIT_REQUEUE
  fi
}

# After the step: requeue on the trainer's request (exit 75) or after a time-limit warning that the
# step did not survive cleanly (a trainer without a USR1 handler dies of it: requeue resumes from
# the last periodic checkpoint). A step that finished (0) after the warning is not rerun.
diffmoe_maybe_requeue() {
  local rc=$DIFFMOE_STEP_RC restarts=${SLURM_RESTART_COUNT:-0}
  if [[ $DIFFMOE_WARNED == TERM ]]; then
    diffmoe_log "step exited $rc after SIGTERM: Slurm requeues (preemption, scontrol requeue) or ends the job"
    return 0
  fi
  if ((rc == DIFFMOE_EXIT_REQUEUE || DIFFMOE_RANKS_75 > 0)) || [[ $DIFFMOE_WARNED == USR1 && $rc != 0 ]]; then
    if ((restarts >= DIFFMOE_MAX_REQUEUES)); then
      diffmoe_log "step exited $rc; not requeueing: restart $restarts reached DIFFMOE_MAX_REQUEUES=$DIFFMOE_MAX_REQUEUES"
      return 0
    fi
    diffmoe_log "step exited $rc (warning: ${DIFFMOE_WARNED:-none}): requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
    scontrol requeue "$SLURM_JOB_ID" || diffmoe_log "scontrol requeue $SLURM_JOB_ID failed (was the job submitted with --requeue?)"
    DIFFMOE_STEP_RC=0
  fi
}

# The whole body of an sbatch script: $1 default CONFIG, then the script's arguments (overrides).
# The run directory is keyed by the job name, so the requeued job (same name) resumes it.
diffmoe_slurm_train() {
  local default_config=$1
  shift
  if [[ -z ${SLURM_JOB_ID:-} && ${DRY_RUN:-0} != 1 ]]; then
    diffmoe_die "not inside a Slurm job: submit with sbatch $0 (or set DRY_RUN=1 to print the command)"
  fi
  local tasks_per_node=${SLURM_TASKS_PER_NODE:-1} # "4(x2),3": the first node's count
  local per_node=${SLURM_NTASKS_PER_NODE:-${tasks_per_node%%(*}}
  diffmoe_resolve_config "$default_config"
  diffmoe_setup "${per_node:-1}"
  local job=${SLURM_JOB_NAME:-$(basename "$CONFIG" .yaml)}
  local run_dir=$DIFFMOE_RUNS/$job
  DIFFMOE_DISTRIBUTION=${SLURM_DISTRIBUTION:-block}
  diffmoe_overrides "train.run_dir=$run_dir" train.resume=auto -- "$@"
  local cmd=("${TRAIN_CMD[@]}" --config "$CONFIG" "${OVERRIDES[@]}")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' srun "--distribution=$DIFFMOE_DISTRIBUTION" "${cmd[@]}"
    echo
    exit 0
  fi
  # Data is made once, on the batch node, before any task starts (a shared file system is assumed).
  diffmoe_check "${SLURM_NTASKS:-1}"
  diffmoe_log "job $SLURM_JOB_ID ($job) restart ${SLURM_RESTART_COUNT:-0}: ${SLURM_NTASKS:-?} tasks on ${SLURM_JOB_NODELIST:-?}, OMP_NUM_THREADS=$OMP_NUM_THREADS"
  diffmoe_log "${cmd[*]}"
  diffmoe_srun "${cmd[@]}"
  diffmoe_maybe_requeue
  return "$DIFFMOE_STEP_RC"
}
