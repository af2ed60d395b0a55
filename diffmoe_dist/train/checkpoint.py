"""Atomic, verified, topology-free checkpoints in which every rank writes only its own share.

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

Atomicity and integrity: everything is written into ``.tmp-step_N``; the manifest comes last; the
directory is renamed into place and ``latest`` replaced only after every rank finished. Loading
verifies checksums (each rank a share of the files, the verdict agreed by all); a corrupted or
partial checkpoint is reported by file name and skipped in favour of the previous good one. A save
that fails on any rank fails on all of them, and its temporary directory (which carries its owner,
``owner.json``) is removed. Retention deletes only what the run's history (``history.jsonl`` beside
the checkpoints, train/ownership.py) proves to be an older checkpoint of the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from diffmoe_dist.parallel.groups import ParallelDims
from diffmoe_dist.train.ownership import OWNER, RunHistory, owner_alive, owner_identity, read_owner

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


def _expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    from diffmoe_dist.model.moe.experts import StackedExperts

    return {name: m for name, m in model.named_modules() if isinstance(m, StackedExperts)}


def module_slots(namespace: str, model: nn.Module, dims: ParallelDims) -> dict[str, Slot]:
    """Slots of a (possibly expert-sharded) model's state dict, keyed by state-dict name."""
    experts = {}
    for prefix, m in _expert_modules(model).items():
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


# ---- files ------------------------------------------------------------------------------------
def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_write(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: str, obj) -> None:
    _fsync_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:07d}")


def rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _barrier(dims: ParallelDims | None) -> None:
    if dims is not None and dims.distributed:
        dist.barrier(group=dims.dp_group)


def _gather_to_rank0(obj, dims: ParallelDims | None) -> list | None:
    if dims is None or not dims.distributed:
        return [obj]
    out = [None] * dims.world_size if dims.rank == 0 else None
    dist.gather_object(obj, out, dst=dist.get_process_group_ranks(dims.dp_group)[0], group=dims.dp_group)
    return out


def save(
    root: str,
    step: int,
    slots: list[Slot],
    meta: dict,
    rank_state: dict,
    dims: ParallelDims | None = None,
    keep_last: int = 2,
    run_id: str | None = None,
    log=print,
) -> str:
    """Collective: every rank calls it with its own slots. Returns the step directory.

    A failure on any rank (a full disk, an I/O error) is agreed by all: the temporary directory is
    removed and every rank raises the same CheckpointError. After the rename, rank 0 records the save
    in the run's history and applies retention (`_retain`)."""
    rank = dims.rank if dims is not None else 0
    world_size = dims.world_size if dims is not None else 1
    final = step_dir(root, step)
    tmp = os.path.join(root, f".tmp-step_{step:07d}")
    error = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            _clear_stale_tmp(root, log)
            os.makedirs(tmp)
            _write_json(os.path.join(tmp, OWNER), owner_identity())  # only its owner deletes it
        except OSError as exc:
            error = f"rank 0: {exc}"
    _agree_or_raise(error, dims, tmp, step, rank)

    error = None
    try:
        pieces, index, specs = {}, [], {}
        for slot in slots:
            specs[slot.key] = [list(slot.global_shape), str(slot.tensor.dtype).removeprefix("torch.")]
            flat = slot.tensor.detach().reshape(-1)
            for offset, numel in owned_ranges(slot):
                start = slot.start + offset
                # a copy: torch.save of a view would write the view's whole storage (and CPU: readers map it)
                pieces[f"{slot.key}@{start}"] = flat[offset : offset + numel].to("cpu", copy=True)
                index.append([slot.key, start, numel])
        name = rank_file(rank)
        path = os.path.join(tmp, name)
        _fsync_write(path, lambda f: torch.save({"pieces": pieces, "rank_state": rank_state}, f))
        mine = (name, _sha256(path), index, specs)
    except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        mine = ("error", f"rank {rank}: {type(exc).__name__}: {exc}")
    gathered = _gather_to_rank0(mine, dims)  # also: every rank wrote (or failed)

    error = None
    if rank == 0:
        try:
            failed = [g[1] for g in gathered if g[0] == "error"]
            if failed:
                raise CheckpointError("; ".join(failed))
            files, digests, tensors = {}, {}, {}
            for fname, digest, findex, fspecs in gathered:
                files[fname], digests[fname] = findex, digest
                for key, spec in fspecs.items():
                    if tensors.setdefault(key, spec) != spec:
                        raise CheckpointError(f"ranks disagree on the global shape of {key}: {tensors[key]} vs {spec}")
            doc = {"format": FORMAT, "step": step, "world_size": world_size, "run_id": run_id, **meta}
            doc["tensors"] = {k: {"shape": s, "dtype": d} for k, (s, d) in sorted(tensors.items())}
            doc["files"] = files
            _write_json(os.path.join(tmp, META), doc)
            digests[META] = _sha256(os.path.join(tmp, META))
            _write_json(os.path.join(tmp, MANIFEST), {"step": step, "world_size": world_size, "files": digests})
            history = RunHistory(root)
            if os.path.isdir(final):
                _replace_aside(root, final, history, run_id, log)
            os.replace(tmp, final)
        except (OSError, CheckpointError) as exc:
            error = str(exc)
    _agree_or_raise(error, dims, tmp, step, rank)
    if rank == 0:
        try:  # the checkpoint is complete: a failure from here on loses nothing
            _write_latest(root, os.path.basename(final))
            history.append("save", run_id=run_id, step=step, dir=os.path.basename(final))
            _retain(root, keep_last, history, run_id, os.path.basename(final))
        except OSError as exc:
            log(f"[diffmoe] WARNING: {final} is saved, but recording it failed ({exc}): retention skipped")
    _barrier(dims)
    return final


def _agree_or_raise(error: str | None, dims: ParallelDims | None, tmp: str, step: int, rank: int) -> None:
    """Collective: every rank learns whether any rank failed; then rank 0 removes ``tmp`` and all raise."""
    if dims is not None and dims.world_size > 1:
        errors = [None] * dims.world_size
        dist.all_gather_object(errors, error, group=dims.dp_group)
        error = "; ".join(e for e in errors if e) or None
    if error is None:
        return
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(
        f"saving step {step} failed ({error}); removed {tmp}: free space there (or lower checkpoint.keep_last) "
        "and run again (train.resume=auto continues from the last good checkpoint)"
    )


def _clear_stale_tmp(root: str, log) -> None:
    """Removes ``.tmp-step_*`` directories of earlier saves whose owner is this process or is gone;
    one of a live owner stays (and is named)."""
    me = owner_identity()
    for name in sorted(d for d in os.listdir(root) if d.startswith(".tmp-step_")):
        path = os.path.join(root, name)
        try:
            other, mtime = read_owner(os.path.join(path, OWNER))
        except FileNotFoundError:
            other, mtime = None, 0.0  # written before owners were recorded, or died creating it
        if other is not None:
            alive, why = owner_alive(other, me, mtime)
            if alive:
                log(f"[diffmoe] WARNING: leaving {path}: it belongs to {other.get('owner')} ({why})")
                continue
        shutil.rmtree(path, ignore_errors=True)


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, "latest.tmp")
    _fsync_write(tmp, lambda f: f.write((name + "\n").encode()))
    os.replace(tmp, os.path.join(root, "latest"))


def _replace_aside(root: str, final: str, history: RunHistory, run_id: str | None, log) -> None:
    """A step directory of the same name exists: replaced if this run wrote it, else set aside."""
    name = os.path.basename(final)
    if name in history.lineage(run_id):
        shutil.rmtree(final, ignore_errors=True)
        return
    aside = os.path.join(root, f"archive-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside, exist_ok=True)
    os.replace(final, os.path.join(aside, name))
    log(f"[diffmoe] WARNING: {final} was not written by this run: moved to {aside}")


def _retain(root: str, keep_last: int, history: RunHistory, run_id: str | None, written: str) -> None:
    """Keeps the ``keep_last`` newest verified checkpoints of this run's lineage (the one just written
    always); deletes only older ones of that lineage. Directories the history does not prove to be
    this run's - another run's, adopted-later ones, anything unknown - are never touched. Verified:
    its save completed (a ``save`` record) with a manifest, and no resume has found it corrupt since."""
    bad, kept = history.corrupt(), 0
    for name in reversed(history.lineage(run_id)):
        path = os.path.join(root, name)
        if not os.path.isdir(path):
            continue
        if name == written:
            kept += 1
        elif kept >= keep_last:
            shutil.rmtree(path, ignore_errors=True)
        elif name not in bad and os.path.isfile(os.path.join(path, MANIFEST)):
            kept += 1


# ---- integrity --------------------------------------------------------------------------------
def _manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise CheckpointError(f"{mpath} is missing: the checkpoint is partial")
    try:
        with open(mpath) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{mpath} is unreadable: {exc}") from None


def _check_file(path: str, name: str, digest: str) -> None:
    fpath = os.path.join(path, name)
    if not os.path.isfile(fpath):
        raise CheckpointError(f"{fpath} is missing")
    if _sha256(fpath) != digest:
        raise CheckpointError(f"{fpath} is corrupted: sha256 does not match the manifest")


def verify(path: str) -> dict:
    """Checks every file against the manifest; raises CheckpointError naming the bad file."""
    manifest = _manifest(path)
    for name, digest in manifest["files"].items():
        _check_file(path, name, digest)
    return manifest


def verify_distributed(path: str, dims: ParallelDims | None) -> None:
    """`verify` with the files shared out over the ranks; every rank raises the same error."""
    if dims is None or not dims.distributed:
        verify(path)
        return
    error = None
    try:
        files = sorted(_manifest(path)["files"].items())
        for name, digest in files[dims.rank :: dims.world_size]:
            _check_file(path, name, digest)
    except CheckpointError as exc:
        error = str(exc)
    errors = [None] * dims.world_size
    dist.all_gather_object(errors, error, group=dims.dp_group)
    bad = sorted({e for e in errors if e})
    if bad:
        raise CheckpointError("; ".join(bad))


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


# ---- reading ----------------------------------------------------------------------------------
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
        if covered != end - start:  # pieces never overlap: a shortfall means a missing piece
            raise CheckpointError(
                f"{self.path}: {key}[{start}:{end}] is only {covered}/{end - start} present in the files' pieces"
            )

    def read(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, 0, out.view(-1))
        return out

    def rank_state(self, rank: int) -> dict:
        return load_file(self.path, rank_file(rank))["rank_state"]


@torch.no_grad()
def load_slots(reader: ShardReader, slots: list[Slot]) -> None:
    """Copies into every slot the range of its global tensor it holds, checking global shapes."""
    for slot in slots:
        if slot.key not in reader:
            raise CheckpointError(f"{reader.path} has no {slot.key}: the checkpoint does not match the model")
        if reader.shape(slot.key) != tuple(slot.global_shape):
            raise CheckpointError(
                f"{reader.path}: {slot.key} has shape {list(reader.shape(slot.key))} but the model needs "
                f"{list(slot.global_shape)}: resume with the checkpoint's model config"
            )
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
