"""The allocator setting every training process should run with, in one place for Python.

glibc malloc maps every block over 32 MB afresh and page-faults it in on each use (100K+ faults per
step at 16K tokens; docs/design.md section 4). Raising the mmap and trim thresholds to 4 GiB keeps
those blocks in the heap. `run.sh` and `launchers/common.sh` export these for the trainer; the
benchmarks and the planner's measurement take them from here. glibc reads them at the first malloc,
so a running process can only pick them up by re-executing itself (`ensure_malloc`).
"""

from __future__ import annotations

import os
import sys

TUNED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}


def ensure_malloc(tuned: bool = True) -> None:
    """Re-execute this process unless its environment already has (``tuned``) or lacks (glibc's
    defaults) the thresholds; returns only when it does."""
    env = {k: v for k, v in os.environ.items() if k not in TUNED_MALLOC}
    if tuned:
        env.update(TUNED_MALLOC)
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
