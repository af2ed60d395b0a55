#!/usr/bin/env bash
# DiffMoE class-conditional training (ImageNet 256 latents, DiffMoE-L-E16) on 32 nodes x 8 GPUs: 256
# ranks, one Slurm task per GPU, requeued on time limits and preemption and resumed from the run
# directory's latest checkpoint. The twin of t2i_256gpu.sh: same options, same environment.
#
#   sbatch launchers/c2i.sh
#   sbatch -J c2i-L-E16-lr2e-4 -p gpu -A myproject --time=24:00:00 launchers/c2i.sh optim.lr=2e-4
#   sbatch --nodes=4 launchers/c2i.sh data.global_batch_size=256      # 32 GPUs
#   CONFIG=configs/c2i/diffmoe-B-E16.yaml TRAIN_ARGS="train.steps=1000 logging.wandb=offline" sbatch launchers/c2i.sh
#   DRY_RUN=1 bash launchers/c2i.sh                                   # print the command only
#
# Nothing here needs editing: sbatch options on the command line override the #SBATCH lines below
# (nodes, partition -p, account -A, time, job name -J); CONFIG picks the YAML; TRAIN_ARGS and this
# script's arguments are dotted overrides (the arguments win); DIFFMOE_RUNS (or RUNS) is where run directories go
# (default runs/ in the checkout). The run directory is RUNS/<job name>: a requeued job keeps its
# name and resumes (train.resume=auto); a new name starts a new run. Requeue, signals, threads and
# the allocator are handled in launchers/common.sh.
#
#SBATCH --job-name=diffmoe-c2i-L-E16
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
# Defaults, set in common.sh when unset: NCCL_DEBUG=WARN, NCCL_IB_TIMEOUT=22,
# TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (a rank that fails a collective raises instead of hanging the
# job until its time limit).
# Threads: OMP_NUM_THREADS = --cpus-per-task (12 here: data loading and host-side work only; the
# GPU does the math). Allocator: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ = 4 GiB (common.sh).

diffmoe_slurm_train configs/c2i/diffmoe-L-E16.yaml "$@"
