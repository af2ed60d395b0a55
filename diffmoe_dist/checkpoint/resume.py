"""Reading a checkpoint: any flat range of any global tensor, into the slots of the current layout
(any world size, EP size or ZeRO stage: resharded on load), or whole, into one process."""

from __future__ import annotations

import json
import os
from collections import defaultdict

import torch
import torch.nn as nn

from diffmoe_dist.checkpoint.layout import FORMAT, META, CheckpointError, Slot, rank_file
from diffmoe_dist.model.moe.experts import expert_modules


def read_meta(path: str) -> dict:
    """``checkpoint.json``: step, config, scalars, tensor specs and the index."""
    with open(os.path.join(path, META)) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta


def load_file(path: str, name: str, mmap: bool = False) -> dict:
    return torch.load(os.path.join(path, name), map_location="cpu", weights_only=True, mmap=mmap)


class ShardReader:
    """Reads any flat range of any global tensor from the pieces of a checkpoint, opening (memory-
    mapped) only the files that hold it."""

    def __init__(self, path: str, meta: dict | None = None):
        self.path = path
        self.meta = meta if meta is not None else read_meta(path)
        self.tensors = self.meta["tensors"]
        self._pieces: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        for fname, entries in self.meta["files"].items():
            for key, start, numel in entries:
                self._pieces[key].append((start, numel, fname))
        for entries in self._pieces.values():
            entries.sort()
        self._files: dict[str, dict] = {}
        self.bytes_read = 0  # tensor bytes copied out of the files (tests count reads per node)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return getattr(torch, self.tensors[key]["dtype"])

    def _piece(self, fname: str, key: str, start: int) -> torch.Tensor:
        if fname not in self._files:
            self._files[fname] = load_file(self.path, fname, mmap=True)["pieces"]
        return self._files[fname][f"{key}@{start}"]

    def read_into(self, key: str, start: int, out: torch.Tensor) -> None:
        """Fills the 1-D ``out`` with elements ``[start, start + out.numel())`` of tensor ``key``."""
        end, covered = start + out.numel(), 0
        for p_start, p_numel, fname in self._pieces.get(key, ()):
            lo, hi = max(start, p_start), min(end, p_start + p_numel)
            if lo >= hi:
                continue
            piece = self._piece(fname, key, p_start)
            out[lo - start : hi - start].copy_(piece[lo - p_start : hi - p_start])
            covered += hi - lo
            self.bytes_read += (hi - lo) * piece.element_size()
        if covered != end - start:  # pieces never overlap: a shortfall means a missing piece
            raise CheckpointError(
                f"{self.path}: {key}[{start}:{end}] is only {covered}/{end - start} present in the files' pieces"
            )

    def read(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, 0, out.view(-1))
        return out

    def rank_state(self, rank: int) -> dict:
        # mapped: only the RNG states' pages are read, not the rank file's pieces around them
        return load_file(self.path, rank_file(rank), mmap=True)["rank_state"]


def check_slot_shapes(reader: ShardReader, slots: list[Slot]) -> None:
    for slot in slots:
        if slot.key not in reader:
            raise CheckpointError(f"{reader.path} has no {slot.key}: the checkpoint does not match the model")
        if reader.shape(slot.key) != tuple(slot.global_shape):
            raise CheckpointError(
                f"{reader.path}: {slot.key} has shape {list(reader.shape(slot.key))} but the model needs "
                f"{list(slot.global_shape)}: resume with the checkpoint's model config"
            )


@torch.no_grad()
def load_slots(reader: ShardReader, slots: list[Slot]) -> None:
    """Copies into every slot the range of its global tensor it holds, checking global shapes. Every
    rank reads all it holds; checkpoint/load_once.py reads each byte once per job."""
    check_slot_shapes(reader, slots)
    for slot in slots:
        t = slot.tensor
        if t.is_contiguous():
            reader.read_into(slot.key, slot.start, t.view(-1))
        else:
            buf = torch.empty(t.numel(), dtype=t.dtype)
            reader.read_into(slot.key, slot.start, buf)
            t.copy_(buf.view(t.shape))


def check_keys(reader: ShardReader, namespace: str, slots: dict[str, Slot]) -> None:
    """The checkpoint's ``namespace/`` tensors are exactly the model's state-dict entries."""
    stored = {k.split("/", 1)[1] for k in reader.tensors if k.startswith(namespace + "/")}
    missing, unexpected = sorted(set(slots) - stored), sorted(stored - set(slots))
    if missing or unexpected:
        raise CheckpointError(
            f"{reader.path} does not match the model ({namespace}): missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def load_model_state(path: str, which: str = "ema") -> dict[str, torch.Tensor]:
    """One process: the full state dict (every expert at its global index) of ``which`` = ``ema``
    or ``model``, assembled from all ranks' pieces. For sampling and evaluation tools."""
    if which not in ("ema", "model"):
        raise ValueError(f"which={which!r}: use 'ema' or 'model'")
    reader = ShardReader(path)
    prefix = which + "/"
    return {key[len(prefix) :]: reader.read(key) for key in reader.tensors if key.startswith(prefix)}


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], ep_rank: int = 0, ep_size: int = 1) -> None:
    """Loads a full (global-expert) state dict into a possibly expert-sharded model."""
    state = dict(state)
    for prefix, experts in expert_modules(model).items():
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
