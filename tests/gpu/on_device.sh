#!/usr/bin/env bash
# The GPU suite on a lent device machine, in one call, after tests/gpu/prepare_device.sh ran here:
#   run(command="bash tests/gpu/on_device.sh", carry=[".gpu"], timeout_s=450)
#   run(command="bash tests/gpu/on_device.sh -k 'compiled or throughput'", ...)   # a rerun of some checks
# Installs the carried wheels beside the image's own packages (its python3 and torch are used as they
# are: no registry there), unpacks the suite's data, runs tests/gpu/run.sh (arguments go to pytest) and
# copies the JSON and the log to $OUT (they come back). Inner limit: DIFFMOE_GPU_SUITE_LIMIT seconds
# (default 420: with the machine's start, ~8 minutes of the session's 15, leaving room for a rerun), so
# that the JSON, written after every check, comes back even when the suite runs long.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
out=${OUT:-/tmp/gpu-suite-out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl ||
  exit 2
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p /tmp/gpu-data && tar xzf .gpu/digits-t2i.tgz -C /tmp/gpu-data || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
export DIFFMOE_GPU_SUITE_DATA=/tmp/gpu-data/digits-t2i DIFFMOE_GPU_SMOKE_OUT=$out/gpu_smoke.json
PYTHON=python3 timeout --kill-after=20 "${DIFFMOE_GPU_SUITE_LIMIT:-420}" bash tests/gpu/run.sh "$@" 2>&1 | tee "$out/gpu_suite.log"
rc=${PIPESTATUS[0]}
mkdir -p benchmarks/results && cp "$out/gpu_smoke.json" benchmarks/results/gpu_smoke.json 2>/dev/null
exit "$rc"
