"""A run directory belongs to one run: the start decision, made and checked before anything is written.

`RunOwner.take` (collective) takes ``RUN/owner.lock`` on rank 0 (checkpoint/ownership.py). `plan_start`
(collective) decides what this start is, from ``train.resume`` and what the directory holds:

- ``never``: a new run; refused when ``RUN/checkpoints`` holds checkpoints (they would be another
  run's, and ``auto`` would later continue the wrong one).
- ``auto``: the newest verified checkpoint; a new run when there is none; refused when there are
  checkpoints but every one is corrupt (nothing silently restarts from step 0).
- a path: that checkpoint; one outside this run directory starts a new run here (refused, as
  ``never``, when this directory already holds checkpoints).
- ``archive``: a new run, after moving whatever the directory holds (checkpoints, history, metrics,
  samples, config.yaml) into ``RUN/checkpoints/archive-<time>/``; a requeued SLURM job (same job
  id as the run's start) continues its own run instead of archiving it.

A resumed checkpoint's config is compared with the new one (`compare_configs`): a changed model
shape, router, expert count or seed is refused; any other training-relevant change is warned about
on one line (field, old, new), recorded in the history, and applied. `begin` (rank 0) then writes the
history records and ``config.yaml``: only after the decision has been made and checked.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from diffmoe_dist import checkpoint as ckpt
from diffmoe_dist.checkpoint.identity import check_identity
from diffmoe_dist.checkpoint.ownership import HISTORY, RunDirError, RunHistory, RunLock, owner_identity
from diffmoe_dist.config import MODEL_SIZES
from diffmoe_dist.train.records import write_resume

# A change of any of these makes a different run: refused on resume.
IDENTITY = {
    "model.depth": "model shape",
    "model.hidden_size": "model shape",
    "model.num_heads": "model shape",
    "model.patch_size": "model shape",
    "model.in_channels": "model shape",
    "model.image_size": "model shape",
    "model.num_classes": "model shape",
    "model.mlp_ratio": "model shape",
    "model.task": "model",
    "model.text_dim": "model shape",
    "model.text_len": "model shape",
    "moe.router": "router",
    "moe.num_experts": "expert count",
    "moe.interleave": "MoE placement",
    "train.seed": "seed (the data order and the noise follow it)",
}
# Changes that do not change what a step computes (topology: resharded on load; bookkeeping; sampling).
NOT_TRAINING = {
    "model.size",  # compared through the resolved depth / width / heads
    "train.run_dir",
    "train.resume",
    "train.steps",
    "train.threads",
    "train.max_minutes",
    "train.zero_stage",
    "train.deepspeed_config",
    "train.activation_checkpointing",
    "train.compile",
    "data.num_workers",
    "moe.inference",
    "moe.gamma",
    "moe.dispatch",  # the same rows computed, padded or not (equal within float tolerance, docs/notes/issue-23a.md)
}
NOT_TRAINING_SECTIONS = ("parallel", "sample", "checkpoint", "logging")


def _flat(cfg: dict) -> dict[str, Any]:
    out = {f"{section}.{k}": v for section, values in cfg.items() for k, v in (values or {}).items()}
    size = MODEL_SIZES.get(out.get("model.size"), (None, None, None))
    for key, default in zip(("model.depth", "model.hidden_size", "model.num_heads"), size, strict=True):
        out[key] = out.get(key) or default  # None / 0 mean "the size's"
    return out


def compare_configs(old: dict, new: dict) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]], list]:
    """(refused, training-relevant, other) changes as (field, old, new), old being the checkpoint's."""
    a, b = _flat(old), _flat(new)
    refused, relevant, other = [], [], []
    for key in sorted(set(a) | set(b)):
        if key not in a or key not in b or a[key] == b[key]:
            continue  # a field added or removed since: nothing to compare
        change = (key, a[key], b[key])
        if key in IDENTITY:
            refused.append(change)
        elif key in NOT_TRAINING or key.split(".", 1)[0] in NOT_TRAINING_SECTIONS:
            other.append(change)
        else:
            relevant.append(change)
    return refused, relevant, other


@dataclass
class StartPlan:
    path: str | None  # checkpoint to load; None: a new run from step 0
    run_id: str
    event: dict  # the history record of this start ("start" or "resume")
    changes: list = field(default_factory=list)  # (field, old, new), training-relevant: warned
    other_changes: list = field(default_factory=list)
    corrupt: list = field(default_factory=list)  # (path, error) skipped on the way
    adopt: list = field(default_factory=list)  # older checkpoints without history, made this run's
    archive: bool = False


def _choices(root: str) -> str:
    return (
        "use a new train.run_dir, train.resume=auto to continue it, or train.resume=archive to move them to "
        f"{root}/archive-<time>/ and start over"
    )


def _step_dirs(root: str) -> list[str]:
    return sorted(d for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else []


def plan_start(cfg, root: str, dims, log) -> StartPlan:
    """Collective (every rank, the same answer or the same RunDirError). Writes nothing."""
    mode, history = cfg.train.resume, RunHistory(root)
    existing, current = _step_dirs(root), history.current()
    new_run = StartPlan(None, uuid.uuid4().hex[:12], {})
    if mode == "archive":
        me = owner_identity()
        if current and me.get("slurm_job_id") and current.get("slurm_job_id") == me["slurm_job_id"]:
            mode = "auto"  # this job's own run, requeued: continue it, never archive it
        else:
            new_run.archive = bool(existing or os.path.isfile(history.path))
            new_run.event = {"event": "start", "resume": "archive"}
            return new_run
    if mode == "never":
        if existing:
            raise RunDirError(
                f"train.resume=never but {root} holds checkpoints of an earlier run ({', '.join(existing[-2:])}): "
                + _choices(root)
            )
        new_run.event = {"event": "start", "resume": "never"}
        return new_run
    corrupt: list = []
    if mode == "auto":
        path = ckpt.find_resumable(root, log, dims, skipped=corrupt)
        if path is None and existing:
            newest = corrupt[0] if corrupt else (os.path.join(root, existing[-1]), "unreadable")
            raise RunDirError(
                f"every checkpoint in {root} is corrupt or partial ({len(existing)}; newest {newest[0]}: {newest[1]}): "
                f"nothing to resume; start over with train.resume=archive (keeps them in {root}/archive-<time>/) "
                "or a new train.run_dir"
            )
        inside = True
    else:
        try:
            path = ckpt.resolve_checkpoint(mode)
            ckpt.verify_distributed(path, dims)
        except (ckpt.CheckpointError, OSError) as exc:
            raise RunDirError(f"train.resume={mode!r}: {exc}") from None
        inside = os.path.realpath(os.path.dirname(path)) == os.path.realpath(root)
        if not inside and existing:
            raise RunDirError(
                f"train.resume={mode} starts a new run in {root}, which holds checkpoints of an earlier run "
                f"({', '.join(existing[-2:])}): " + _choices(root)
            )
    if path is None:
        new_run.event = {"event": "start", "resume": mode}
        new_run.corrupt = corrupt
        return new_run
    meta = ckpt.read_meta(path)
    refused, relevant, other = compare_configs(meta.get("config", {}), cfg.to_dict())
    if refused:
        key, old, new = refused[0]
        raise RunDirError(
            f"{key}={new!r} but {path} was trained with {key}={old!r}: a changed {IDENTITY[key]} is a different "
            f"run: resume with {key}={old}, use a new train.run_dir, or train.resume=archive to move the old "
            f"checkpoints to {root}/archive-<time>/ and start over"
        )
    check_identity(cfg, path, meta, history, inside, log)  # run id, name, rank files, steps, data
    step, name = int(meta["step"]), os.path.basename(path)
    if not inside:  # a new run here, initialised from another run's checkpoint
        plan = StartPlan(path, uuid.uuid4().hex[:12], {"event": "start", "resume": path, "step": step})
    else:
        run_id = meta.get("run_id") or (current or {}).get("run_id")
        plan = StartPlan(path, run_id or uuid.uuid4().hex[:12], {"event": "resume", "from": name, "step": step})
        if not run_id:  # checkpoints from before run ids: this run's, up to the one resumed
            plan.event = {"event": "start", "resume": mode, "from": name, "step": step}
            plan.adopt = [d for d in existing if d <= name]
    plan.changes, plan.other_changes, plan.corrupt = relevant, other, corrupt
    for key, old, new in relevant:
        log(f"[diffmoe] WARNING: resuming {name} with {key} changed: {old!r} -> {new!r} (recorded in {HISTORY})")
    return plan


def _archive(run_dir: str, root: str, log) -> str:
    dest = os.path.join(root, f"archive-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(dest, exist_ok=True)
    moved = []
    for name in sorted(os.listdir(root)):
        if name.startswith(("step_", ".tmp-step_")) or name in ("latest", HISTORY):
            os.replace(os.path.join(root, name), os.path.join(dest, name))
            moved.append(name)
    for name in ("config.yaml", "metrics.jsonl", "routing.jsonl", "samples", "wandb"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.replace(os.path.join(run_dir, name), os.path.join(dest, name))
            moved.append(name)
    log(f"[diffmoe] train.resume=archive: moved {len(moved)} entries of the earlier run to {dest}")
    return dest


def begin(plan: StartPlan, cfg, run_dir: str, root: str, log) -> None:
    """Rank 0, after `plan_start` and the load succeeded: the first writes into the run directory."""
    from diffmoe_dist.config import save_config

    history = RunHistory(root)
    if plan.archive:
        plan.event["archived_to"] = _archive(run_dir, root, log)
    me = owner_identity()
    who = {k: me[k] for k in ("owner", "host", "pid", "slurm_job_id") if k in me}
    history.append(plan.event.pop("event"), run_id=plan.run_id, **plan.event, **who)
    if plan.adopt:
        history.append("adopt", run_id=plan.run_id, dirs=plan.adopt)
    for path, error in plan.corrupt:
        history.append("corrupt", run_id=plan.run_id, dir=os.path.basename(path), error=error)
    step = plan.event.get("step", 0)
    for key, old, new in plan.changes:
        history.append("config_change", run_id=plan.run_id, step=step, field=key, old=old, new=new)
    for key, old, new in plan.other_changes:
        history.append("config_change", run_id=plan.run_id, step=step, field=key, old=old, new=new, training=False)
    save_config(cfg, os.path.join(run_dir, "config.yaml"))
    if plan.path is not None:  # metrics.jsonl: the steps after this one are logged again (train/records.py)
        write_resume(run_dir, step, plan.path, plan.run_id)


class RunOwner:
    """The run directory's owner lock, taken collectively: rank 0 takes it, every rank gets its verdict."""

    def __init__(self, lock: RunLock | None):
        self.lock = lock

    @classmethod
    def take(cls, run_dir: str, dims, log) -> RunOwner:
        lock, error = None, None
        if dims.rank == 0:
            lock = RunLock(run_dir)
            try:
                lock.acquire(log)
            except (RunDirError, OSError) as exc:
                error = str(exc)
        if dims.world_size > 1:
            box = [error]
            dist.broadcast_object_list(box, src=dist.get_process_group_ranks(dims.dp_group)[0], group=dims.dp_group)
            error = box[0]
        if error is not None:
            if lock is not None:
                lock.release(remove_empty_dir=True)
            raise RunDirError(error)
        return cls(lock)

    def heartbeat(self) -> None:
        if self.lock is not None:
            self.lock.heartbeat()

    def release(self, failed: bool = False) -> None:
        if self.lock is not None:
            self.lock.release(remove_empty_dir=failed)
