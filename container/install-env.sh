#!/usr/bin/env bash
# The whole environment into the active Python (a venv, or an image's interpreter): torch 2.13.0 of one
# CUDA build first and alone (so nothing can pull another build), then requirements.txt, then this
# package; finally the build is checked. The Dockerfile and diffmoe.def run it; so can a bare-metal venv:
#   python3.11 -m venv .venv && . .venv/bin/activate && TORCH_CUDA=cu126 bash container/install-env.sh
#
# TORCH_CUDA  the torch build (docs/operations.md "Install on a GPU cluster"), by the driver the
#             nodes run (nvidia-smi, top right):
#               cu126  CUDA 12.6   driver >= 560.28.03
#               cu128  CUDA 12.8   driver >= 570.26      (default; H100, H200, B200)
#               cu130  CUDA 13.0   driver >= 580.65.06   (also PyPI's plain torch==2.13.0 wheel)
#               cpu    no CUDA     (CPU machines, CI)
#             Each from PyTorch's index for that build, pinned with its local version (2.13.0+cu128):
#             a plain torch==2.13.0 also matches 2.13.0+cpu, which pip prefers when both are visible.
# TORCH_INDEX where that build comes from (default: PyTorch's index for it; a site mirror or proxy here)
# PIP         the pip command (default: python -m pip)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_CUDA=${TORCH_CUDA:-cu128}
read -ra pip <<<"${PIP:-python -m pip}"
case $TORCH_CUDA in
  cu126 | cu128 | cu130) want=${TORCH_CUDA#cu} want=${want:0:2}.${want:2} ;;
  cpu) want=None ;;
  *)
    echo "install-env.sh: error: TORCH_CUDA=$TORCH_CUDA is invalid: use cu126, cu128, cu130 or cpu" >&2
    exit 2
    ;;
esac
torch=$(grep -E '^torch==' requirements.txt)
"${pip[@]}" install "$torch+$TORCH_CUDA" --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/$TORCH_CUDA}"
"${pip[@]}" install -r requirements.txt # torch==2.13.0 is met by the build above: nothing replaces it
"${pip[@]}" install --no-deps .
python - "$want" <<'PY'
import sys

import torch

want = sys.argv[1]
found = str(torch.version.cuda) if want == "None" else ".".join(str(torch.version.cuda).split(".")[:2])
if found != want:
    sys.exit(f"install-env.sh: error: torch {torch.__version__} has torch.version.cuda={torch.version.cuda}, not {want}")
print(f"torch {torch.__version__}, torch.version.cuda={torch.version.cuda}: installed")
PY
