#!/usr/bin/env bash
# The GPU suite in one command, on a machine with one CUDA GPU (see tests/gpu/test_gpu_suite.py):
#   bash tests/gpu/run.sh                         # one H100/H200: ~5-7 min estimated (nothing has run on a GPU
#                                                 # yet). Writes benchmarks/results/gpu_smoke.json. On a lent
#                                                 # device machine: tests/gpu/prepare_device.sh, then on_device.sh
#   DIFFMOE_GPU_SUITE_DEVICE=cpu bash tests/gpu/run.sh   # the same checks on the CPU (gloo, tiny): debug the suite;
#                                                 # writes benchmarks/results/gpu_smoke_cpu.json
# Exit status: pytest's (0: every check passed). The JSON (rewritten after every check, so a run cut
# short keeps what it measured) holds the device, driver, torch, CUDA and NCCL versions, the date, each
# check's outcome and seconds, the table of figures printed at the end (the README's), the raw
# numbers, and "passed" (true only on a GPU, with the session finished and every check passed).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export WANDB_MODE=disabled DIFFMOE_NO_PROGRESS=1 CUBLAS_WORKSPACE_CONFIG=:4096:8
# As in the 256-GPU job's image (container/Dockerfile, container/diffmoe.def): its allocator and glibc settings.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296} MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
# A CPU debug run writes beside the GPU record, never over it.
[[ ${DIFFMOE_GPU_SUITE_DEVICE:-cuda} == cuda ]] && smoke=gpu_smoke.json || smoke=gpu_smoke_${DIFFMOE_GPU_SUITE_DEVICE}.json
export DIFFMOE_GPU_SMOKE_OUT=${DIFFMOE_GPU_SMOKE_OUT:-$PWD/benchmarks/results/$smoke}
rm -f "$DIFFMOE_GPU_SMOKE_OUT"
"$PYTHON" - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
PY
"$PYTHON" -m pytest -p no:cacheprovider -v -rs --durations=0 tests/gpu "$@"
rc=$?
"$PYTHON" - "$DIFFMOE_GPU_SMOKE_OUT" <<'PY'
import json, sys
try:
    doc = json.load(open(sys.argv[1]))
except FileNotFoundError:
    sys.exit(f"{sys.argv[1]}: not written (no check ran)")
gpu = f", {doc['memory_gib']} GiB, compute capability {doc['capability']}" if doc.get("memory_gib") else ""
print(f"\n{sys.argv[1]}\n")
print(f"GPU suite on {doc['device']}{gpu}, driver {doc['driver']}, torch {doc['torch']}, CUDA {doc['cuda']}, "
      f"NCCL {doc['nccl']}; {doc['date']}; passed: {doc['passed']}\n")
print("| check | outcome | s |\n|---|---|---:|")
for name, c in doc["checks"].items():
    why = c.get("error", c.get("reason", ""))
    print(f"| `{name}` | {c['outcome']}{': ' + why if why else ''} | {c['seconds']:.1f} |")
print("\n| check | figure | value |\n|---|---|---|")
for row in doc["table"]:
    print(f"| `{row['check'].removeprefix('test_')}` | {row['figure']} | {row['value']} |")
PY
exit $rc
