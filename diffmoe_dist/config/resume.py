"""What a changed field means when a run resumes, declared on the field in schema.py as dataclass
metadata: ``depth: int | None = field(default=None, metadata=refuse("model shape"))``. A field that
declares none takes its section's (the metadata of the section's field in `Config`).

- ``refuse``: a different run (model shape, router, expert count, seed): the resume is refused with
  one line naming the field and ``why`` (train/run_dir.py);
- ``warn``: it changes what a step computes (learning rate, capacity, batch, EMA, precision): one
  warning line (field, old, new), recorded in the run's history, applied;
- ``free``: topology (resharded on load), bookkeeping, sampling, logging: applied and recorded, not
  warned about.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RESUME_POLICIES = ("refuse", "warn", "free")
WARN = {"resume": "warn"}
FREE = {"resume": "free"}


def refuse(why: str) -> dict[str, str]:
    """Metadata of a field whose change makes a different run; ``why`` completes "a changed ..."."""
    return {"resume": "refuse", "why": why}


def resume_policies(config_cls: Any) -> dict[str, dict[str, str]]:
    """``{"section.field": {"resume": policy[, "why": ...]}}`` for every field of the config tree
    (``config_cls``: `Config`): the field's own metadata, else its section's; {} where neither says."""
    out = {}
    for section in dataclasses.fields(config_cls):
        for f in dataclasses.fields(section.default_factory):
            out[f"{section.name}.{f.name}"] = dict(f.metadata if "resume" in f.metadata else section.metadata)
    return out
