"""Atomic, verified checkpoints.

Layout: RUN/checkpoints/step_0000100/{model.pt, rank00000.pt, ..., manifest.json} and RUN/checkpoints/latest.
- model.pt (rank 0): model and EMA weights with experts at global indices, config, step.
- rankNNNNN.pt (every rank): its optimizer and scheduler state, RNG states, loader position.
Everything is written into a temporary directory, every file's sha256 goes into manifest.json,
the directory is renamed into place, and only then `latest` is replaced, after all ranks finished.
Loading verifies the checksums; a bad checkpoint is reported by file name and skipped in favour of
the previous good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _expert_modules(model: nn.Module):
    from diffmoe_dist.model.moe.experts import StackedExperts

    return {name: m for name, m in model.named_modules() if isinstance(m, StackedExperts)}


def full_state_dict(model: nn.Module, ep_group=None, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """State dict with every expert at its global index (gathered inside the EP group)."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ep_size == 1:
        return state
    for prefix, experts in _expert_modules(model).items():
        for name, t in list(experts.state_dict().items()):
            parts = [torch.empty_like(t) for _ in range(ep_size)]
            dist.all_gather(parts, t.detach().contiguous(), group=ep_group)
            state[f"{prefix}.{name}"] = torch.cat(parts, dim=0)
    return state


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], ep_rank: int = 0, ep_size: int = 1) -> None:
    """Loads a full (global-expert) state dict into a possibly expert-sharded model."""
    state = dict(state)
    for prefix, experts in _expert_modules(model).items():
        for name in experts.state_dict():
            key = f"{prefix}.{name}"
            full = state[key]
            n = full.shape[0] // ep_size
            state[key] = full[ep_rank * n : (ep_rank + 1) * n]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("pos_embed")]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def save_checkpoint(
    root: str, step: int, rank: int, world_size: int, shared: dict | None, per_rank: dict, keep_last: int
) -> str:
    """Collective: every rank calls it. `shared` is written by rank 0 only."""
    final = step_dir(root, step)
    tmp = os.path.join(root, f".tmp-step_{step:07d}")
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier(world_size)
    torch.save(per_rank, os.path.join(tmp, f"rank{rank:05d}.pt"))
    if rank == 0:
        torch.save(shared, os.path.join(tmp, "model.pt"))
    _barrier(world_size)
    if rank == 0:
        files = sorted(f for f in os.listdir(tmp) if f.endswith(".pt"))
        manifest = {"step": step, "world_size": world_size, "files": {f: _sha256(os.path.join(tmp, f)) for f in files}}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_latest(root, os.path.basename(final))
        _retain(root, keep_last)
    _barrier(world_size)
    return final


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(root, "latest"))


def _retain(root: str, keep_last: int) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    for d in steps[:-keep_last]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def verify(path: str) -> dict:
    """Checks every file against the manifest; raises CheckpointError naming the bad file."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{mpath} is missing: the checkpoint is partial")
    with open(mpath) as f:
        manifest = json.load(f)
    for name, digest in manifest["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise CheckpointError(f"{fpath} is missing")
        if _sha256(fpath) != digest:
            raise CheckpointError(f"{fpath} is corrupted: sha256 does not match the manifest")
    return manifest


def find_resumable(root: str, log=print) -> str | None:
    """The newest verified checkpoint, starting from `latest`; bad ones are reported loudly and skipped."""
    if not os.path.isdir(root):
        return None
    candidates = sorted((d for d in os.listdir(root) if d.startswith("step_")), reverse=True)
    latest_file = os.path.join(root, "latest")
    if os.path.isfile(latest_file):
        with open(latest_file) as f:
            latest = f.read().strip()
        if latest in candidates:
            candidates.remove(latest)
            candidates.insert(0, latest)
    for name in candidates:
        path = os.path.join(root, name)
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            log(f"[diffmoe] WARNING: skipping bad checkpoint {path}: {exc}")
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


def load_file(path: str, name: str) -> dict:
    return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True)
