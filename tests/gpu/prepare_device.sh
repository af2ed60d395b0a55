#!/usr/bin/env bash
# Prepares the GPU suite's one call on a lent device machine (the `device` tool's `run`). Run it HERE, on the
# CPU machine with the project's venv, first:
#   bash tests/gpu/prepare_device.sh        # -> .gpu/ (ignored): wheels and data, ~16 MB
# then, in one call that leaves time for a rerun (15 minutes of device time in all, machine start included):
#   run(command="bash tests/gpu/on_device.sh", carry=[".gpu"], timeout_s=450)
# The device image has its own python3 (3.12) and torch, and no package registry. It lacks DeepSpeed,
# megatron-core, webdataset and pydantic, whose wheels (cp312) go to .gpu/whl; and the packaged MiniLM
# text encoder (88 MB) is over the 64 MiB a call may carry, so the suite's captioned digits shards are
# made here and travel as .gpu/digits-t2i.tgz. Versions: requirements.txt's pins and this venv's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
out=.gpu
rm -rf "$out" && mkdir -p "$out/whl"
pin() { grep -E "^$1==" requirements.txt | cut -d= -f3; }
have() { "$PYTHON" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
pip=("$PYTHON" -m pip)
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$out/whl" \
  "megatron-core==$(pin megatron-core)" "webdataset==$(pin webdataset)" "braceexpand==$(have braceexpand)" \
  "hjson==$(have hjson)" "pydantic==$(have pydantic)" "pydantic-core==$(have pydantic-core)" \
  "annotated-types==$(have annotated-types)" "typing-inspection==$(have typing-inspection)"
# DeepSpeed is published as a source distribution only: its wheel (pure Python, no ops built) is made here.
"${pip[@]}" wheel -q --no-deps -w "$out/whl" "deepspeed==$(pin deepspeed)"
data=$(mktemp -d)
"$PYTHON" tools/make_shards.py digits-t2i --out "$data/digits-t2i" >/dev/null
tar czf "$out/digits-t2i.tgz" -C "$data" digits-t2i
rm -rf "$data"
ls -l "$out"/whl "$out/digits-t2i.tgz" && du -sh "$out"
