"""Run a function on W real processes joined by gloo on 127.0.0.1, for multi-process tests.

    def check(rank, world_size, ep_size):
        dims = build_parallel_dims(ep_size)      # from diffmoe_dist.parallel
        ...
        return some_picklable_value

    results = run_distributed(check, 4, 2)     # [value of rank 0, value of rank 1, ...]

Each child sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (so
``diffmoe_dist.parallel.init_distributed(read_launch_env())`` works inside ``fn`` too), runs with one
thread, and by default joins the default process group before calling ``fn(rank, world_size,
*args)``. An exception in any child is re-raised in the parent with the child's traceback; a
hang past ``timeout`` kills every child. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import pickle
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffmoe_dist.parallel.launch import free_port


class DistributedTestError(RuntimeError):
    """A child process failed; the message carries its rank and traceback."""


def _child(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    init_process_group: bool,
    results: Any,
    args: tuple,
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group("gloo", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args)
        # Pickled by value here: through the queue, torch would share a tensor by passing its file
        # descriptor over a socket to this process, which may have exited (exit_process below) by the
        # time the parent unpickles it (ConnectionResetError in the parent on a loaded machine).
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # noqa: B036 - the parent must see every failure, with its traceback
        results.put((rank, False, traceback.format_exc()))
        if init_process_group and dist.is_initialized():
            dist.destroy_process_group()
        raise
    # Torn down as a trainer's rank is (diffmoe-train): all ranks meet, the groups go, and the
    # process ends without interpreter finalization, which would tear down gloo threads that
    # destroy_process_group leaves running (diffmoe_dist.parallel.launch.exit_process).
    from diffmoe_dist.parallel.launch import destroy_distributed, exit_process

    destroy_distributed(barrier=dist.is_initialized())
    exit_process(0)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    init_process_group: bool = True,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; returns the
    per-rank return values in rank order."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = mp.start_processes(
        _child,
        args=(fn, world_size, port, init_process_group, results, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    outcomes: dict[int, tuple[bool, Any]] = {}

    def drain() -> None:  # read as we go: a large result would otherwise block its child's pipe
        while not results.empty():
            rank, ok, value = results.get()
            outcomes[rank] = (ok, value)

    try:
        while not procs.join(timeout=0.1):
            drain()
            if time.monotonic() > deadline:
                raise DistributedTestError(f"{fn.__name__} on {world_size} ranks hung past {timeout:.0f} s")
    except mp.ProcessRaisedException:
        pass  # the queue holds the child's traceback, reported below
    except mp.ProcessExitedException as exc:
        raise DistributedTestError(f"{fn.__name__}: a child process died: {exc}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    drain()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    if failures:
        raise DistributedTestError(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(failures))
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        raise DistributedTestError(f"{fn.__name__}: ranks {missing} returned nothing")
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]


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


def wait_all(procs: list, timeout: float) -> list[int]:
    """Return codes of ``procs``; kills them all (and raises) past ``timeout`` seconds."""
    import subprocess

    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise DistributedTestError(f"training ranks ran past {timeout:.0f} s") from None
