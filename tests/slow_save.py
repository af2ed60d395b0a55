"""`diffmoe-train` with a slow disk: `python tests/slow_save.py --config ... [overrides]`.

The real trainer, except that each rank's file of every checkpoint save is written after
``SLOW_SAVE_SECONDS`` (default 4) and, first, a marker ``SLOW_SAVE_DIR/saving-rank{RANK}.pid``
holding ``PID NODEID`` appears: a test then knows the save is in progress and which process to
signal (a signal "during the final save", as a requeue or a late time-limit warning would arrive).
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffmoe_dist.train import checkpoint as ckpt  # noqa: E402
from diffmoe_dist.train.cli import main  # noqa: E402

_write = ckpt._fsync_write


def _slow_write(path, write):
    if os.path.basename(os.path.dirname(path)).startswith(".tmp-step_") and path.endswith(".pt"):
        rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
        marker = os.path.join(os.environ["SLOW_SAVE_DIR"], f"saving-rank{rank}.pid")
        with open(marker + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {os.environ.get('SLURM_NODEID', '0')}")
        os.replace(marker + ".tmp", marker)
        time.sleep(float(os.environ.get("SLOW_SAVE_SECONDS", "4")))
    _write(path, write)


ckpt._fsync_write = _slow_write

if __name__ == "__main__":
    sys.exit(main())
