#!/usr/bin/env bash
# The two set-up commands of the README, on a fresh machine with nothing but Python:
#   bash run.sh main   # multi-process CPU training on the embedded digits data, samples, evaluation
#   bash run.sh test   # the test suite (what CI runs)
# and for developers: bash run.sh test-fast (the suite without the slow tier), bash run.sh golden
# (regenerate the reference loss curves of tests/golden/).
# Both create .venv on first use (torch pinned to the CPU wheel; see requirements.txt).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

setup_venv() {
  if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c "import diffmoe_dist, torch, deepspeed, megatron.core" 2>/dev/null; then
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    # torch first, alone: the pinned CPU wheel must win before anything can ask for a CUDA build.
    .venv/bin/pip install -q "$(grep -E '^torch==' requirements.txt)"
    .venv/bin/pip install -q -r requirements.txt
    .venv/bin/pip install -q --no-deps -e .
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
  # glibc maps every tensor over 32 MB afresh (100K+ page faults per step at 16K tokens): keep them.
  export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
}

cmd=${1:-}
shift || true
case "$cmd" in
  main)
    setup_venv
    RUN=${RUN:-runs/main}
    # torchrun with NPROC (default 4) processes; shards are made when missing (launchers/common.sh)
    export CONFIG=${CONFIG:-configs/local/t2i-diffmoe-tiny.yaml}
    bash launchers/local.sh train.run_dir="$RUN" "$@"
    diffmoe-eval --ckpt "$RUN" --num-samples 300 --cfg-scale "${CFG_SCALE:-2.0}" --steps 20 --sampler heun | tee "$RUN/eval.json"
    ;;
  test)
    setup_venv
    export WANDB_MODE=disabled DIFFMOE_NO_PROGRESS=1
    # Trainer processes build the Megatron rank sets without importing megatron-core (~4 CPU-s each,
    # minutes over the suite): tests/test_parallel_launch.py proves the sets equal megatron-core's, and
    # the launcher runs of tests/test_launchers.py build them through megatron-core end to end.
    export DIFFMOE_NO_MEGATRON=${DIFFMOE_NO_MEGATRON:-1}
    ruff check .
    # The whole suite; the 15 slowest tests are listed at the end (CI's log shows where time goes).
    exec python -m pytest tests --durations=15 "$@"
    ;;
  test-fast)
    # The edit-test loop: everything but the `slow` tier (tests/conftest.py: training, several
    # processes, launchers, SLURM), a few minutes on 2 cores. CI runs `test`.
    setup_venv
    export WANDB_MODE=disabled DIFFMOE_NO_PROGRESS=1
    # Trainer processes build the Megatron rank sets without importing megatron-core (~4 CPU-s each,
    # minutes over the suite): tests/test_parallel_launch.py proves the sets equal megatron-core's, and
    # the launcher runs of tests/test_launchers.py build them through megatron-core end to end.
    export DIFFMOE_NO_MEGATRON=${DIFFMOE_NO_MEGATRON:-1}
    ruff check .
    exec python -m pytest tests -m "not slow" --durations=15 "$@"
    ;;
  golden)
    # Regenerate tests/golden/*.json (the tiny configs' reference loss curves) after an intended change.
    setup_venv
    export WANDB_MODE=disabled DIFFMOE_NO_PROGRESS=1
    # Trainer processes build the Megatron rank sets without importing megatron-core (~4 CPU-s each,
    # minutes over the suite): tests/test_parallel_launch.py proves the sets equal megatron-core's, and
    # the launcher runs of tests/test_launchers.py build them through megatron-core end to end.
    export DIFFMOE_NO_MEGATRON=${DIFFMOE_NO_MEGATRON:-1}
    exec python -m tools.golden "$@"
    ;;
  *)
    echo "usage: bash run.sh main|test|test-fast|golden [args]" >&2
    exit 2
    ;;
esac
