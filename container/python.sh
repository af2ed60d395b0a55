#!/usr/bin/env bash
# `python "$@"` inside the job's container image, with the host's GPUs and the job's directories:
#   DIFFMOE_SIF=IMAGE.sif              Apptainer: apptainer exec --nv (one container per call; each rank
#                                      of launchers/t2i_256gpu.sh starts its own from the .sif)
#   DIFFMOE_CONTAINER_IMAGE=IMAGE      pyxis (enroot squashfs or image URI): a one-task step,
#                                      srun --container-image; the ranks themselves run in the container
#                                      that t2i_256gpu.sh asks srun for
# Bound: the checkout (the code that runs), DIFFMOE_DATA, DIFFMOE_RUNS, and DIFFMOE_BIND (more host
# paths, comma-separated, e.g. /models for the text encoder). The working directory is kept.
set -euo pipefail
root=${DIFFMOE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
binds=$root
for dir in "${DIFFMOE_DATA:-}" "${DIFFMOE_RUNS:-}"; do
  [[ -n $dir && $dir != "$root"/* ]] && binds+=",$dir"
done
[[ -n ${DIFFMOE_BIND:-} ]] && binds+=",$DIFFMOE_BIND"
mounts=$(sed -E 's#([^,]+)#\1:\1#g' <<<"$binds") # pyxis: SRC:DST pairs
if [[ ${1:-} == --pyxis-mounts ]]; then           # what launchers/t2i_256gpu.sh gives the ranks' srun
  echo "$mounts"
  exit 0
fi
if [[ -n ${DIFFMOE_SIF:-} ]]; then
  exec apptainer exec --nv --bind "$binds" --pwd "$PWD" "$DIFFMOE_SIF" python "$@"
elif [[ -n ${DIFFMOE_CONTAINER_IMAGE:-} ]]; then
  exec srun --nodes=1 --ntasks=1 --container-image="$DIFFMOE_CONTAINER_IMAGE" --container-mounts="$mounts" \
    --container-workdir="$PWD" python "$@"
fi
echo "container/python.sh: error: set DIFFMOE_SIF (Apptainer) or DIFFMOE_CONTAINER_IMAGE (pyxis)" >&2
exit 2
