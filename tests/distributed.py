"""Multi-process tests: run a function on W real processes joined by gloo on 127.0.0.1, or start
``diffmoe-train`` as W separate ranks.

    def check(rank, world_size, ep_size):
        dims = build_parallel_dims(ep_size)      # from diffmoe_dist.parallel
        ...
        return some_picklable_value

    results = run_distributed(check, 4, 2)     # [value of rank 0, value of rank 1, ...]

`run_distributed` is the package's harness (`diffmoe_dist.parallel.spawn.run_ranks`, which the
benchmarks and the planner's calibration use too, and whose docstring says what each child sets up)
with a timeout that catches a hang. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from conftest import HANG_TIMEOUT

from diffmoe_dist.parallel.launch import free_port
from diffmoe_dist.parallel.spawn import RanksError as DistributedTestError
from diffmoe_dist.parallel.spawn import run_ranks

__all__ = ["DistributedTestError", "run_distributed", "start_training_ranks", "wait_all"]


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = HANG_TIMEOUT,
    init_process_group: bool = True,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes (the package's
    `run_ranks`, with a limit that catches a hang); returns the per-rank return values in rank order."""
    return run_ranks(fn, world_size, *args, timeout=timeout, init_process_group=init_process_group)


def start_training_ranks(
    world_size: int,
    overrides: list[str],
    log_dir: str,
    config: str = "configs/local/diffmoe-tiny.yaml",
    env: dict | None = None,
    script: tuple[str, ...] = ("-m", "diffmoe_dist.train.cli"),
) -> list:
    """Starts ``diffmoe-train`` (or ``script``: tests/slow_save.py) as ``world_size`` separate processes joined
    by gloo, as torchrun would
    (RANK, WORLD_SIZE, ... set per process) but without its agent, so that a test can signal one
    rank. Output goes to ``log_dir/rankN.log``. Returns the ``subprocess.Popen`` objects in rank order."""
    import subprocess
    import sys

    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(world_size):
        child_env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "DIFFMOE_NO_PROGRESS": "1",
            **(env or {}),
        }
        with open(os.path.join(log_dir, f"rank{rank}.log"), "w") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, *script, "--config", config, *overrides],
                    env=child_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def wait_all(procs: list, timeout: float = HANG_TIMEOUT) -> list[int]:
    """Return codes of ``procs``; kills them all (and raises) past ``timeout`` seconds."""
    import subprocess

    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise DistributedTestError(f"training ranks ran past {timeout:.0f} s") from None
