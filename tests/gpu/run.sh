#!/usr/bin/env bash
# The GPU suite in one command, on a machine with one CUDA GPU (see tests/gpu/test_gpu_suite.py):
#   bash tests/gpu/run.sh                         # ~6-10 min on one H100/H200 (estimated; give it 600 s); writes benchmarks/results/gpu_smoke.json
#   DIFFMOE_GPU_SUITE_DEVICE=cpu bash tests/gpu/run.sh   # the same checks on the CPU (gloo, tiny): debug the suite
# Exit status: pytest's (0: every check passed). The JSON records the device, torch and CUDA versions,
# the date, each check's outcome and numbers, and "passed" (true only on a GPU with every check passed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=disabled DIFFMOE_NO_PROGRESS=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
export DIFFMOE_GPU_SMOKE_OUT=${DIFFMOE_GPU_SMOKE_OUT:-$PWD/benchmarks/results/gpu_smoke.json}
"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PY
"$PYTHON" -m pytest -p no:cacheprovider -v -rs tests/gpu "$@"
rc=$?
"$PYTHON" - "$DIFFMOE_GPU_SMOKE_OUT" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"{sys.argv[1]}: device {doc['device']}, passed {doc['passed']}")
for name, c in doc["checks"].items():
    print(f"  {c['outcome']:<8} {c['seconds']:>7.1f} s  {name}  {c.get('error', c.get('reason', ''))}")
PY
exit $rc
