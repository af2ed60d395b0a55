"""`diffmoe-train` with a slow disk: `python tests/slow_save.py --config ... [overrides]`.

The real trainer, except that each rank's file of a checkpoint save (of every save, or only of
step ``SLOW_SAVE_STEP``) is written after ``SLOW_SAVE_SECONDS`` (default 4), or once the file
``SLOW_SAVE_UNTIL`` exists (at most 300 s); first, a marker ``SLOW_SAVE_DIR/saving-rank{RANK}.pid``
holding ``PID NODEID`` appears. A test then knows that the save is in progress and which process
to signal (a signal "during the final save", as a requeue or a late time-limit warning arrives),
or holds a run alive (a live owner) for as long as it needs.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffmoe_dist.checkpoint import io as ckpt_io  # noqa: E402
from diffmoe_dist.train.cli import main  # noqa: E402

_write = ckpt_io._fsync_write


def _slow_write(path, write):
    tmp = os.path.basename(os.path.dirname(path))
    step = os.environ.get("SLOW_SAVE_STEP")
    if tmp.startswith(".tmp-step_") and path.endswith(".pt") and (not step or int(tmp[10:]) == int(step)):
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        marker = os.path.join(os.environ["SLOW_SAVE_DIR"], f"saving-rank{rank}.pid")
        with open(marker + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {os.environ.get('SLURM_NODEID', '0')}")
        os.replace(marker + ".tmp", marker)
        until = os.environ.get("SLOW_SAVE_UNTIL")
        if until:
            deadline = time.monotonic() + 300
            while not os.path.exists(until) and time.monotonic() < deadline:
                time.sleep(0.1)
        else:
            time.sleep(float(os.environ.get("SLOW_SAVE_SECONDS", "4")))
    _write(path, write)


ckpt_io._fsync_write = _slow_write

if __name__ == "__main__":
    sys.exit(main())
