#!/usr/bin/env bash
# Training on this machine with torchrun: N processes (one per GPU, or CPU processes sharing the cores).
#
#   launchers/local.sh                                   # 4 processes, configs/local/diffmoe-tiny.yaml
#   launchers/local.sh -n 2 train.steps=20 parallel.expert_parallel_size=2
#   CONFIG=configs/local/dense-tiny.yaml TRAIN_ARGS="logging.wandb=disabled" launchers/local.sh
#
# -n N (or NPROC=N) processes; the arguments are dotted overrides; CONFIG, TRAIN_ARGS, threads,
# allocator and data preparation (the digits shards are made when missing) as in common.sh.
# The config is checked once before any rank starts (a bad value: one line, exit 2); the exit status
# is the trainer's: 0 finished, 75 stopped by a signal or train.max_minutes after saving (run again).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

diffmoe_nproc_args "$@"

diffmoe_resolve_config configs/local/diffmoe-tiny.yaml
diffmoe_setup "$NPROC"
diffmoe_overrides -- "${ARGS[@]}"
[[ ${DRY_RUN:-0} == 1 ]] || diffmoe_check "$NPROC"
# --standalone: a rendezvous on localhost with a free port, so two local runs do not collide.
# --no-python: torchrun runs TRAIN_CMD as given (it already names the interpreter).
diffmoe_run_keeping_status "$NPROC" "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
  --no-python "${TRAIN_CMD[@]}" --config "$CONFIG" "${OVERRIDES[@]}"
