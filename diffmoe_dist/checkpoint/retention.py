"""Retention and clean-up beside a save: stale temporary directories, a step directory of the same
name, and the older checkpoints of this run's lineage. Retention deletes only what the run's history
(``history.jsonl`` beside the checkpoints, checkpoint/ownership.py) proves to be an older checkpoint
of the same run; a temporary directory only when its owner (``owner.json``) is this process or gone."""

from __future__ import annotations

import json
import os
import shutil
import time

from diffmoe_dist.checkpoint.layout import MANIFEST, META
from diffmoe_dist.checkpoint.ownership import OWNER, RunHistory, owner_alive, owner_identity, read_owner


def clear_stale_tmp(root: str, log) -> None:
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


def replace_aside(root: str, final: str, history: RunHistory, run_id: str | None, log) -> None:
    """A step directory of the same name exists: replaced if this run wrote it, else set aside."""
    name = os.path.basename(final)
    if name in history.lineage(run_id) and _written_by(final, run_id):
        shutil.rmtree(final, ignore_errors=True)
        return
    aside = os.path.join(root, f"archive-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(aside, exist_ok=True)
    os.replace(final, os.path.join(aside, name))
    log(f"[diffmoe] WARNING: {final} was not written by this run: moved to {aside}")


def retain(root: str, keep_last: int, history: RunHistory, run_id: str | None, written: str) -> None:
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
            if _written_by(path, run_id):  # by the run id inside, not the name: never another run's
                shutil.rmtree(path, ignore_errors=True)
        elif name not in bad and os.path.isfile(os.path.join(path, MANIFEST)):
            kept += 1


def _written_by(path: str, run_id: str | None) -> bool:
    """The ``run_id`` inside ``path``'s checkpoint.json is ``run_id`` (or absent: saved before run ids)."""
    try:
        with open(os.path.join(path, META)) as f:
            theirs = json.load(f).get("run_id")
    except (OSError, ValueError, AttributeError):
        return True  # unreadable: the history's word stands (a partial save of this run)
    return theirs in (None, run_id)
