"""Run a function on W local processes joined by gloo on 127.0.0.1: the one harness for every
multi-rank run on one machine (the planner's calibration, the benchmarks, tests/distributed.py).

    def measure(rank, world_size, size):
        ...                                     # the default group is up: collectives work here
        return some_picklable_value

    per_rank = run_ranks(measure, 4, "small")  # [value of rank 0, value of rank 1, ...]

Each child sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (so
``init_distributed(read_launch_env())`` works inside ``fn`` too), runs with ``threads`` threads, and
by default joins the default process group before calling ``fn(rank, world_size, *args)``. An
exception in any child is re-raised in the parent as `RanksError` with the child's traceback; a hang
past ``timeout`` kills every child. ``fn`` must be importable (a module-level function: a script's
own functions are, under the spawn start method).
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

from diffmoe_dist.parallel.launch import destroy_distributed, exit_process, free_port


class RanksError(RuntimeError):
    """A child process failed or hung; the message carries its rank and traceback."""


def _child(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    threads: int,
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
        OMP_NUM_THREADS=str(threads),
    )
    torch.set_num_threads(threads)
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
    # destroy_process_group leaves running (see exit_process).
    destroy_distributed(barrier=dist.is_initialized())
    exit_process(0)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float | None = None,
    threads: int = 1,
    init_process_group: bool = True,
) -> list[Any]:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` fresh spawned processes (also for one:
    every run starts from a clean thread pool and allocator); returns the per-rank return values in
    rank order. ``timeout`` None: no limit."""
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    procs = mp.start_processes(
        _child,
        args=(fn, world_size, free_port(), threads, init_process_group, results, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = None if timeout is None else time.monotonic() + timeout
    outcomes: dict[int, tuple[bool, Any]] = {}

    def drain() -> None:  # read as we go: a large result would otherwise block its child's pipe
        while not results.empty():
            rank, ok, value = results.get()
            outcomes[rank] = (ok, value)

    try:
        while not procs.join(timeout=0.1):
            drain()
            if deadline is not None and time.monotonic() > deadline:
                raise RanksError(f"{fn.__name__} on {world_size} ranks hung past {timeout:.0f} s")
    except mp.ProcessRaisedException:
        pass  # the queue holds the child's traceback, reported below
    except mp.ProcessExitedException as exc:
        raise RanksError(f"{fn.__name__}: a child process died: {exc}") from None
    finally:
        for p in procs.processes:
            if p.is_alive():
                p.kill()
    drain()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(outcomes.items()) if not ok]
    if failures:
        raise RanksError(f"{fn.__name__} failed on {world_size} ranks:\n" + "\n".join(failures))
    missing = [r for r in range(world_size) if r not in outcomes]
    if missing:
        raise RanksError(f"{fn.__name__}: ranks {missing} returned nothing")
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]
