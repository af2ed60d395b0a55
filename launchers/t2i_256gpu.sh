#!/usr/bin/env bash
# DiffMoE text-to-image training on 32 nodes x 8 GPUs: 256 ranks, one Slurm task per GPU, requeued
# on time limits and preemption and resumed from the run directory's latest checkpoint.
#
#   sbatch launchers/t2i_256gpu.sh
#   sbatch -J t2i-e16-lr2e-4 -p gpu -A myproject --time=24:00:00 launchers/t2i_256gpu.sh optim.lr=2e-4
#   sbatch --nodes=4 launchers/t2i_256gpu.sh data.global_batch_size=1024     # 32 GPUs, 32 images each
#   CONFIG=configs/t2i/other.yaml TRAIN_ARGS="train.steps=1000 logging.wandb=offline" sbatch launchers/t2i_256gpu.sh
#   DRY_RUN=1 bash launchers/t2i_256gpu.sh                                   # print the command only
#
# Nothing here needs editing: sbatch options on the command line override the #SBATCH lines below
# (nodes, partition -p, account -A, time, job name -J); CONFIG picks the YAML; TRAIN_ARGS and this
# script's arguments are dotted overrides (the arguments win). Locations, for a shared file system:
# DIFFMOE_DATA holds the data sets (data/t2i-256 of the config is read as $DIFFMOE_DATA/t2i-256) and
# DIFFMOE_RUNS the run directories (default data/ and runs/ in the checkout; RUNS still works):
#   DIFFMOE_DATA=/shared/diffmoe/data DIFFMOE_RUNS=/shared/diffmoe/runs sbatch launchers/t2i_256gpu.sh
# The run directory is DIFFMOE_RUNS/<job name>: a requeued job keeps its name and resumes
# (train.resume=auto); a new name starts a new run. Requeue, signals, threads and the allocator are
# handled in launchers/common.sh.
#
# Layout (configs/t2i/diffmoe-e16-256gpu.yaml; `tools/plan.py --recommend` on tools/clusters/h100_32x8.yaml
# ranks it first but for the gradient dtype: docs/tuning.md): 32 images per GPU (global batch 8192), EP 8
# inside each node, plain data parallelism (ZeRO-0: it fits in ~57 of 80 GB, and ZeRO-1/2 would add an
# exposed all-gather of the fp32 weights), fp32 gradient reduction overlapped with backward in 25 MB
# buckets (planned MFU 19.2%; bf16 would plan 27.5% but errs by 1.6-9.2% over 256 ranks). Fewer nodes at
# the same images per GPU: sbatch --nodes=N ... with data.global_batch_size=$((N * 8 * 32)).
#
# Placement: srun runs with --distribution=block (SLURM_DISTRIBUTION, e.g. from sbatch
# --distribution, wins), so each node holds 8 consecutive ranks, one EP group (EP = 8): the
# all-to-alls stay on NVLink. A layout that splits an EP group over nodes is refused at start-up on
# every rank with one line and exit 2. The rendezvous port, 15000 + job id % 17000, stays below
# Linux's ephemeral ports (32768+). A rank stuck in a collective raises after
# parallel.timeout_minutes (10 by default) instead of idling 256 GPUs.
#
#SBATCH --job-name=diffmoe-t2i-e16
#SBATCH --nodes=32
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
# Slurm runs a copy of this file from its spool directory (as "slurm_script"): the checkout is
# DIFFMOE_ROOT, else the one holding the script the job was submitted with (scontrol's Command=,
# which also names the launcher in its log lines), else this file's.
DIFFMOE_SCRIPT=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p') || true
_common=${DIFFMOE_ROOT:-$(dirname "${DIFFMOE_SCRIPT:-${BASH_SOURCE[0]}}")/..}/launchers/common.sh
# shellcheck source=common.sh
if [[ -f $_common ]]; then source "$_common"; else echo "$0: error: no $_common: set DIFFMOE_ROOT to the diffmoe-dist checkout" >&2; exit 2; fi

# ---- Interconnect (NCCL). Set these in the environment before sbatch to change them (sbatch exports
# the submitting environment); the right values are cluster-specific:
#   NCCL_SOCKET_IFNAME  the interface for NCCL's bootstrap and socket fallback, e.g. ib0, eth0 or
#                       "^lo,docker0" (exclude); a wrong one hangs at the first collective.
#   NCCL_IB_HCA         which InfiniBand/RoCE adapters, e.g. mlx5_0,mlx5_1 or "=mlx5_0:1"; leave unset
#                       to let NCCL use all; NCCL_IB_GID_INDEX=3 is usual on RoCE v2.
#   NCCL_IB_TIMEOUT     IB retry timeout exponent (4.096 us * 2^N): a larger one rides out congestion
#                       on large fabrics instead of aborting an all-to-all.
#   NCCL_IB_DISABLE=1   only on machines without IB (forces TCP sockets: far slower all-to-all).
#   NCCL_DEBUG=INFO     to see the chosen transport and rings once; WARN otherwise.
#   GLOO_SOCKET_IFNAME  only with DIFFMOE_GLOO_GROUPS=1 (megatron-core's gloo groups beside NCCL's; off
#                       by default: nothing needs them, and gloo picking the wrong interface on a
#                       multi-homed node hangs start-up); defaults to a single NCCL_SOCKET_IFNAME.
# Defaults, set in common.sh when unset: NCCL_DEBUG=WARN, NCCL_IB_TIMEOUT=22,
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (a rank that fails a collective raises instead of hanging the
# job until its time limit).
# Threads: OMP_NUM_THREADS = --cpus-per-task (12 here: data loading and host-side work only; the
# GPU does the math). Allocator: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = 4 GiB (common.sh).

# ---- Container (optional): every Python command of the job inside the image of container/ -------
#   DIFFMOE_SIF=/shared/diffmoe-dist-cu128.sif sbatch launchers/t2i_256gpu.sh             # Apptainer
#   DIFFMOE_CONTAINER_IMAGE=/shared/diffmoe-dist-cu128.sqsh sbatch launchers/t2i_256gpu.sh # pyxis (enroot)
# Bound into it: this checkout (its code runs), DIFFMOE_DATA, DIFFMOE_RUNS and DIFFMOE_BIND (more host
# paths, comma-separated: the config's text encoder lives in /models, so DIFFMOE_BIND=/models).
# Apptainer: container/python.sh is the job's python, so the config check and each rank run in
# `apptainer exec --nv`. pyxis: the batch shell's checks run as one-task steps in the image, and the
# ranks' step gets srun --container-image (each rank then runs the image's python).
# The image sets PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True. /dev/shm holds the loader workers'
# batches in flight (ranks per node x data.num_workers x 2 x one batch; docs/operations.md, "Containers").
# A CPU build of torch on this GPU job is refused in one line by the first config check
# (diffmoe-train --validate-only: parallel.device=cuda, or auto in a job given GPUs).
if [[ -n ${DIFFMOE_SIF:-}${DIFFMOE_CONTAINER_IMAGE:-} ]]; then
  export PYTHON=$DIFFMOE_ROOT/container/python.sh DIFFMOE_SIF DIFFMOE_CONTAINER_IMAGE
  if [[ -n ${DIFFMOE_CONTAINER_IMAGE:-} ]]; then
    export DIFFMOE_TRAIN=${DIFFMOE_TRAIN:-python -m diffmoe_dist.train.cli}
    srun() { # the ranks' step only: container/python.sh calls the real srun for its one-task steps
      command srun --container-image="$DIFFMOE_CONTAINER_IMAGE" --container-workdir="$DIFFMOE_ROOT" \
        --container-mounts="$("$PYTHON" --pyxis-mounts)" "$@"
    }
  fi
fi

diffmoe_slurm_train configs/t2i/diffmoe-e16-256gpu.yaml "$@"
