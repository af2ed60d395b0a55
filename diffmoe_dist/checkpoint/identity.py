"""Is the checkpoint a resume is about to load this run's, and does it say what its name says?
Checked once, in `train.run_dir.plan_start`, before anything is written; each refusal is one line
(`RunDirError`: diffmoe-train exits 2).

- its ``run_id`` belongs to this run directory's lineage (``history.jsonl``): another run's
  checkpoint dropped in place is refused, never adopted (to start from it on purpose, move it out
  and pass it as ``train.resume=PATH``: a new run initialised from it);
- the step in its directory name is the step inside;
- its ``world_size`` matches the rank files it holds;
- ``train.steps`` is not below its step;
- the data set it was trained on (the hash of ``data.path/train/manifest.json``, recorded at save)
  is the one configured: a changed one is a warning naming ``data.path``.
"""

from __future__ import annotations

import hashlib
import os
import re

from diffmoe_dist.checkpoint.layout import rank_file
from diffmoe_dist.checkpoint.ownership import RunDirError, RunHistory

_RANK_FILE = re.compile(r"rank\d{5}\.pt")


def data_manifest_hash(data_path: str) -> str | None:
    """sha256 of ``data_path/train/manifest.json`` (names, sizes and keys of the shards), or None."""
    try:
        with open(os.path.join(data_path, "train", "manifest.json"), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def run_ids(history: RunHistory) -> set[str]:
    return {r["run_id"] for r in history.records() if r.get("run_id")}


def check_identity(cfg, path: str, meta: dict, history: RunHistory, inside: bool, log) -> None:
    step, name = int(meta["step"]), os.path.basename(os.path.normpath(path))
    if name.startswith("step_") and name != f"step_{step:07d}":
        raise RunDirError(f"{path} holds step {step}, not the step its name says: rename or remove it")
    lineage = run_ids(history)
    theirs = meta.get("run_id")
    if inside and theirs and lineage and theirs not in lineage:
        raise RunDirError(
            f"{path} belongs to run {theirs}, not to this run directory's runs ({', '.join(sorted(lineage))}): "
            "remove it, or move it elsewhere and pass train.resume=PATH to start a new run from it"
        )
    files = [f for f in os.listdir(path) if _RANK_FILE.fullmatch(f)]
    world = int(meta.get("world_size", 0))
    if sorted(files) != [rank_file(r) for r in range(world)]:
        raise RunDirError(
            f"{path} says world size {world} but holds {len(files)} rank files: the checkpoint is damaged"
        )
    if cfg.train.steps < step:
        raise RunDirError(
            f"train.steps={cfg.train.steps} is below step {step} of {path}: set train.steps to at least {step}, "
            "or use a new train.run_dir"
        )
    recorded, now = meta.get("data_manifest_sha256"), data_manifest_hash(cfg.data.path)
    if recorded and now and recorded != now:
        log(
            f"[diffmoe] WARNING: data.path={cfg.data.path} is not the data set {name} was trained on "
            "(its train/manifest.json changed): the data order continues by position over other samples"
        )
