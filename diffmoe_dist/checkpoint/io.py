"""Atomic, verified saves in which every rank writes only its own share, and their verification.

Everything is written into ``.tmp-step_N``; the manifest comes last; the directory is renamed into
place and ``latest`` replaced only after every rank finished. Loading verifies checksums (each rank
a share of the files, the verdict agreed by all). A save that fails on any rank fails on all of
them, and its temporary directory (which carries its owner, ``owner.json``) is removed. The layout
and why it is made of flat ranges: checkpoint/layout.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch
import torch.distributed as dist

from diffmoe_dist.checkpoint.layout import (
    FORMAT,
    MANIFEST,
    META,
    CheckpointError,
    Slot,
    owned_ranges,
    rank_file,
    step_dir,
)
from diffmoe_dist.checkpoint.ownership import OWNER, RunHistory, owner_identity
from diffmoe_dist.checkpoint.retention import clear_stale_tmp, replace_aside, retain
from diffmoe_dist.parallel.groups import ParallelDims


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


def _barrier(dims: ParallelDims | None) -> None:
    if dims is not None and dims.distributed:
        dist.barrier(group=dims.dp_group)


def _gather_to_rank0(obj, dims: ParallelDims | None) -> list | None:
    if dims is None or not dims.distributed:
        return [obj]
    out = [None] * dims.world_size if dims.rank == 0 else None
    dist.gather_object(obj, out, dst=dist.get_process_group_ranks(dims.dp_group)[0], group=dims.dp_group)
    return out


def snapshot(slots: list[Slot]) -> tuple[dict, list, dict]:
    """This rank's share as host copies: (pieces, index, specs). The only part of a save that must
    happen while training stands still; the rest (`write_snapshot`) may run beside it."""
    pieces, index, specs = {}, [], {}
    for slot in slots:
        specs[slot.key] = [list(slot.global_shape), str(slot.tensor.dtype).removeprefix("torch.")]
        flat = slot.tensor.detach().reshape(-1)
        for offset, numel in owned_ranges(slot):
            start = slot.start + offset
            # a copy: torch.save of a view would write the view's whole storage (and CPU: readers map it)
            pieces[f"{slot.key}@{start}"] = flat[offset : offset + numel].to("cpu", copy=True)
            index.append([slot.key, start, numel])
    return pieces, index, specs


def snapshot_or_error(slots: list[Slot], dims: ParallelDims | None) -> tuple[dict, list, dict] | str:
    """`snapshot(slots)`, or its error as a line for `write_snapshot` to agree on with the other ranks
    (a rank that fails alone must not leave the others waiting in the save's collectives)."""
    try:
        return snapshot(slots)
    except Exception as exc:  # noqa: BLE001 - agreed with the other ranks in write_snapshot
        return f"rank {dims.rank if dims is not None else 0}: {type(exc).__name__}: {exc}"


def save(
    root: str, step: int, slots: list[Slot], meta: dict, rank_state: dict, dims: ParallelDims | None = None, **kw
) -> str:
    """Collective: every rank calls it with its own slots; ``kw``: `write_snapshot`'s ``keep_last``,
    ``run_id`` and ``log``. Returns the step directory.

    A failure on any rank (a full disk, an I/O error) is agreed by all: the temporary directory is
    removed and every rank raises the same CheckpointError. After the rename, rank 0 records the save
    in the run's history and applies retention (`retention.retain`)."""
    return write_snapshot(root, step, snapshot_or_error(slots, dims), meta, rank_state, dims, **kw)


def write_snapshot(
    root: str,
    step: int,
    snap: tuple[dict, list, dict] | str,
    meta: dict,
    rank_state: dict,
    dims: ParallelDims | None = None,
    keep_last: int = 2,
    run_id: str | None = None,
    log=print,
) -> str:
    """Collective over ``dims.dp_group``: writes a `snapshot` (or agrees on its error, a str:
    `snapshot_or_error`) as `save` describes. checkpoint/async_save.py runs it in a thread, over a group of its own."""
    rank = dims.rank if dims is not None else 0
    world_size = dims.world_size if dims is not None else 1
    final = step_dir(root, step)
    tmp = os.path.join(root, f".tmp-step_{step:07d}")
    error = None
    if rank == 0:
        try:
            os.makedirs(root, exist_ok=True)
            clear_stale_tmp(root, log)
            os.makedirs(tmp)
            _write_json(os.path.join(tmp, OWNER), owner_identity())  # only its owner deletes it
        except OSError as exc:
            error = f"rank 0: {exc}"
    _agree_or_raise(error, dims, tmp, step, rank)

    error = None
    try:
        if isinstance(snap, str):
            raise CheckpointError(snap)
        pieces, index, specs = snap
        name = rank_file(rank)
        path = os.path.join(tmp, name)
        _fsync_write(path, lambda f: torch.save({"pieces": pieces, "rank_state": rank_state}, f))
        mine = (name, _sha256(path), index, specs)
    except Exception as exc:  # noqa: BLE001 - torch.save reports a full disk as RuntimeError
        mine = ("error", str(exc) if isinstance(snap, str) else f"rank {rank}: {type(exc).__name__}: {exc}")
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
                replace_aside(root, final, history, run_id, log)
            os.replace(tmp, final)
        except (OSError, CheckpointError) as exc:
            error = str(exc)
    _agree_or_raise(error, dims, tmp, step, rank)
    if rank == 0:
        try:  # the checkpoint is complete: a failure from here on loses nothing
            _write_latest(root, os.path.basename(final))
            history.append("save", run_id=run_id, step=step, dir=os.path.basename(final))
            retain(root, keep_last, history, run_id, os.path.basename(final))
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


def _write_latest(root: str, name: str) -> None:
    tmp = os.path.join(root, "latest.tmp")
    _fsync_write(tmp, lambda f: f.write((name + "\n").encode()))
    os.replace(tmp, os.path.join(root, "latest"))


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
