"""What a checkpoint holds and who writes what: the layout, the slots of a rank, and their ranges.

Layout of ``RUN/checkpoints/step_0000100/``:
- ``rankNNNNN.pt`` (every rank): ``pieces``, a flat dict ``"KEY@START" -> 1-D tensor``, each piece the
  contiguous range ``[START, START + numel)`` of the flattened *global* tensor KEY; and
  ``rank_state`` (this rank's RNG states).
- ``checkpoint.json`` (rank 0): step, config, scalars (EMA updates, optimizer steps, loader position,
  topology), the global shape and dtype of every KEY, and the index: which file holds which ranges.
- ``manifest.json`` (rank 0, written last): the sha256 of every other file.

Keys: ``model/NAME`` and ``ema/NAME`` (parameters and persistent buffers, so the router thresholds
too), ``optim/exp_avg/NAME`` and ``optim/exp_avg_sq/NAME`` (AdamW moments; the fp32 weights are the
master weights in both engines, so ``model/`` holds them). Experts are global tensors ``(E, ...)``:
a rank holding experts ``[lo, hi)`` holds the flat range ``[lo * S, hi * S)``, ``S`` one expert's size.

Why flat ranges of global tensors: every piece of training state - a replicated dense tensor, an
expert shard, a ZeRO partition's fragment of either - is one contiguous range of one global tensor,
so one rule describes them all. Saving, replicated ranges are split among their replicas (each rank
writes about 1/W of the model and EMA) and ZeRO fragments are written by their owner; nothing is
gathered but the index (metadata). Loading computes the ranges the *current* layout needs (any world
size, EP size or ZeRO stage) and copies the overlapping pieces from memory-mapped files, so a rank
reads only what it holds. megatron-core's ``dist_checkpointing`` would reshard too, but needs a
sharded-state-dict declaration per tensor (and per ZeRO fragment), its own file format and a ~6 s
import in every tool that merely samples; this format is plain ``torch.save`` files and one JSON.
"""

from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from diffmoe_dist.model.moe.experts import expert_modules
from diffmoe_dist.parallel.groups import ParallelDims

FORMAT = "diffmoe-flat-ranges/1"
META = "checkpoint.json"
MANIFEST = "manifest.json"
# Replicated tensors are split among replicas in chunks of at least this many elements; smaller
# ones are written whole by one replica, chosen by the key's hash so that they spread over ranks.
MIN_PIECE = 1 << 16


class CheckpointError(RuntimeError):
    pass


# ---- what a rank holds ------------------------------------------------------------------------
@dataclass
class Slot:
    """A tensor this rank holds, placed in its global tensor: ``tensor`` (used flat) is the range
    ``[start, start + numel)`` of the flattened global tensor ``key`` of ``global_shape``, held
    identically by ``replicas`` ranks, of which this rank is number ``replica_index``."""

    key: str
    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    start: int = 0
    replicas: int = 1
    replica_index: int = 0


def module_slots(namespace: str, model: nn.Module, dims: ParallelDims) -> dict[str, Slot]:
    """Slots of a (possibly expert-sharded) model's state dict, keyed by state-dict name."""
    experts = {}
    for prefix, m in expert_modules(model).items():
        for pname, _ in m.named_parameters(recurse=False):
            experts[f"{prefix}.{pname}" if prefix else pname] = m
    out = {}
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.detach()
        owner = experts.get(name)
        if owner is None:  # replicated on every DP rank
            out[name] = Slot(f"{namespace}/{name}", t, tuple(t.shape), 0, dims.world_size, dims.rank)
        else:  # experts [offset, offset + num_local) of num_experts, replicated over the EDP group
            per_expert = t[0].numel()
            out[name] = Slot(
                f"{namespace}/{name}",
                t,
                (owner.num_experts, *t.shape[1:]),
                owner.offset * per_expert,
                dims.edp_size,
                dims.edp_rank,
            )
    return out


def optimizer_slots(fragments, model_slots: dict[str, Slot]) -> list[Slot]:
    """Slots of the optimizer-state fragments an engine reports (`engine.StateFragment`)."""
    out = []
    for frag in fragments:
        base = model_slots[frag.name]
        replicas, index = (base.replicas, base.replica_index) if frag.replicated else (1, 0)
        for state, view in frag.tensors.items():
            out.append(
                Slot(f"optim/{state}/{frag.name}", view, base.global_shape, base.start + frag.start, replicas, index)
            )
    return out


def owned_ranges(slot: Slot) -> list[tuple[int, int]]:
    """(offset inside ``slot.tensor``, numel) of the ranges this rank writes: a pure function of
    the slot, so replicas agree on who writes what without talking."""
    n = slot.tensor.numel()
    if n == 0:
        return []
    if slot.replicas == 1:
        return [(0, n)]
    chunks = min(slot.replicas, math.ceil(n / MIN_PIECE))
    salt = zlib.crc32(slot.key.encode())
    bounds = [c * n // chunks for c in range(chunks + 1)]
    return [
        (bounds[c], bounds[c + 1] - bounds[c])
        for c in range(chunks)
        if (c + salt) % slot.replicas == slot.replica_index
    ]


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"
