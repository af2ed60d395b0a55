"""Finding a checkpoint: the newest verified one of a run (bad ones skipped, loudly), or the one a
path names."""

from __future__ import annotations

import os

import torch.distributed as dist

from diffmoe_dist.checkpoint.io import verify_distributed
from diffmoe_dist.checkpoint.layout import MANIFEST, CheckpointError
from diffmoe_dist.parallel.groups import ParallelDims


def _candidates(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    candidates = sorted((d for d in os.listdir(root) if d.startswith("step_")), reverse=True)
    latest_file = os.path.join(root, "latest")
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            latest = f.read().strip()
        if latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
    return [os.path.join(root, d) for d in candidates]


def find_resumable(root: str, log=print, dims: ParallelDims | None = None, skipped: list | None = None) -> str | None:
    """The newest verified checkpoint, starting from `latest`; bad ones are reported loudly and
    skipped (and appended to ``skipped`` as (path, error)). With ``dims`` a collective: ranks share
    the checksum work and agree on the answer."""
    candidates = _candidates(root)
    if dims is not None and dims.distributed:
        box = [candidates]  # one listing for all ranks
        dist.broadcast_object_list(box, src=dist.get_process_group_ranks(dims.dp_group)[0], group=dims.dp_group)
        candidates = box[0]
    for path in candidates:
        try:
            verify_distributed(path, dims)
            return path
        except CheckpointError as exc:
            log(f"[diffmoe] WARNING: skipping bad checkpoint {path}: {exc}")
            if skipped is not None:
                skipped.append((path, str(exc)))
    return None


def resolve_checkpoint(path: str) -> str:
    """Accepts a run directory, a checkpoints directory or a step directory."""
    for candidate in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(candidate, MANIFEST)):
            return candidate
        found = find_resumable(candidate) if os.path.isdir(candidate) else None
        if found:
            return found
    raise CheckpointError(f"--ckpt {path!r} holds no verified checkpoint: pass a run directory from diffmoe-train")
