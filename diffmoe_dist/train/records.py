"""The run's JSONL records, written and read one way: one value per step, the one the run continued.

``RUN/metrics.jsonl`` (and ``RUN/routing.jsonl``) are appended to by every start of a run. A crash, a
requeue or a rollback (``train.resume=RUN/checkpoints/step_N``) goes back to a checkpoint's step
and logs the steps after it again, so the files can hold two or three records of one step. Each
start from a checkpoint therefore first appends a resume record::

    {"event": "resume", "step": N, "checkpoint": ".../step_000000N", "run_id": "...", "time": ...}

`read_continued` replays a file in order: a resume record at step N drops every record kept so far
with a step above N (the branch the run abandoned), later records of a step replace earlier ones.
What is left is one record per step, as an uninterrupted run would have logged it. Tools and plots
read through it (`read_metrics`, `metric_series`; `train.telemetry.read_routing`).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

METRICS_FILE = "metrics.jsonl"
ROUTING_FILE = "routing.jsonl"


def append_record(path: str, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def write_resume(run_dir: str, step: int, checkpoint: str, run_id: str) -> dict:
    """Rank 0, once the checkpoint is loaded: the resume record, into metrics.jsonl and, when the run
    has one, routing.jsonl (both are read through `read_continued`)."""
    record = {"event": "resume", "step": int(step), "checkpoint": checkpoint, "run_id": run_id, "time": time.time()}
    append_record(os.path.join(run_dir, METRICS_FILE), record)
    if os.path.isfile(os.path.join(run_dir, ROUTING_FILE)):
        append_record(os.path.join(run_dir, ROUTING_FILE), record)
    return record


def read_records(path: str) -> list[dict]:
    """Every record of a JSONL file in file order; a torn last line (a crash mid-write) is skipped."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def continued(records: list[dict]) -> list[dict]:
    """One record per step in step order: the value the run continued with (module docstring)."""
    by_step: dict[int, dict] = {}
    for record in records:
        if record.get("event") == "resume":
            by_step = {s: r for s, r in by_step.items() if s <= record["step"]}
        elif "event" not in record:
            by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def read_continued(path: str) -> list[dict]:
    return continued(read_records(path))


def read_metrics(run_dir: str) -> list[dict]:
    """``RUN/metrics.jsonl`` as one record per logged step, resumes and rollbacks resolved."""
    return read_continued(os.path.join(run_dir, METRICS_FILE))


def metric_series(run_dir: str, key: str) -> dict[int, Any]:
    """step -> the continued value of ``key`` (steps whose record lacks it are left out)."""
    return {r["step"]: r[key] for r in read_metrics(run_dir) if key in r}


def resumes(run_dir: str) -> list[dict]:
    """The resume records of ``RUN/metrics.jsonl``, in order."""
    return [r for r in read_records(os.path.join(run_dir, METRICS_FILE)) if r.get("event") == "resume"]
