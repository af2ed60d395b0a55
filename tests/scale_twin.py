"""The scale twin: the project's real code at W ranks (256 and more) on one CPU machine.

`run_threaded(fn, W, *args)` runs ``fn(rank, W, *args)`` on W threads joined by torch's threaded
process group (``torch.testing._internal.distributed.multi_threaded_pg``): every collective is real
(all ranks meet, values move), only the transport is memory. Nothing in ``diffmoe_dist`` can tell:
it sees an initialised default group of world size W, ``dist.new_group`` works, backends report
"threaded" (so ``comm_device`` answers CPU as for gloo).

Two things are process-wide in torch and would otherwise be shared by the W "ranks":
- the default CPU generator (``torch.manual_seed`` in the trainer, label dropout, model init);
- the compute itself (2 cores, W threads).
So the twin passes a baton: exactly one rank computes at a time, and it hands the baton on when it
enters a collective (where it would wait for the others anyway). With the baton goes the default
generator's state: each rank saves its own on the way into a collective and restores it on the way
out, so every rank has a private default generator, as a process has. A rank thus computes with one
torch thread, alone, deterministically in its own values (the order in which ranks take turns does
not change any value: collectives combine in rank order).

What does not run here: signal handlers (Python installs them from the main thread only) and
anything that forks per rank (loader worker processes): the twin runs the loader with
``data.num_workers=0`` and drives the trainer's step, grid, save and resume directly instead of
``Trainer.fit`` (whose StopRequest installs handlers). The stop-flag agreement is called directly.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from conftest import HANG_TIMEOUT, TINY_MODEL
from torch.overrides import TorchFunctionMode
from torch.testing._internal.distributed import multi_threaded_pg as mtpg
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

_BATON = threading.Lock()
_LOCAL = threading.local()


def _take() -> None:
    _BATON.acquire()
    state = getattr(_LOCAL, "rng", None)
    if state is not None:
        torch.set_rng_state(state)


def _give() -> None:
    _LOCAL.rng = torch.get_rng_state()
    _BATON.release()


_original_join = mtpg.Collective.join


def _sent_bytes(work: Any, rank: int, size: int, data: Any) -> int:
    """Bytes this rank hands to a collective over ``size`` ranks: the message of an all-reduce,
    all-gather or broadcast; the rows an all-to-all sends to the other ranks (its own split stays)."""
    if isinstance(work, mtpg.AllToAllBase):
        _, inp, _, splits = data
        rows = inp.size(0)
        own = splits[rank] if splits else rows // size
        return (rows - own) * (inp.nbytes // rows if rows else 0)
    if isinstance(work, mtpg.AllGather):
        return sum(t.nbytes for t in data[1])
    return sum(t.nbytes for t in mtpg.flatten_list(data) if torch.is_tensor(t))


def _join(self, rank, data):
    counts = getattr(_LOCAL, "counts", None)
    if counts is not None:
        kind = _LOCAL.kinds.get(self._world_size, f"size{self._world_size}")
        counts[(kind, "collectives")] += 1
        counts[(kind, "bytes")] += _sent_bytes(self._collective, rank, self._world_size, data)
        counts[(kind, type(self._collective).__name__)] += 1
    # Group rank 0's thread copies every rank's data inside join: not this rank's ops, so uncounted.
    with _disable_current_modes():
        if not getattr(_LOCAL, "holds", False):
            return _original_join(self, rank, data)
        _give()
        try:
            return _original_join(self, rank, data)
        finally:
            _take()


@contextmanager
def counting(dims: Any):
    """Counts this rank's collectives and the bytes it sends, by group (``dp`` the world, ``ep``,
    ``edp``), while active: a Counter keyed (group, "collectives" | "bytes" | collective kind)."""
    _LOCAL.kinds = {dims.world_size: "dp", dims.edp_size: "edp", dims.ep_size: "ep"}
    _LOCAL.counts = counts = collections.Counter()
    try:
        yield counts
    finally:
        _LOCAL.counts = None


_HOST_READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__"}


class OpCounter(TorchDispatchMode):
    """Counts this thread's aten ops (a proxy for kernel launches) and host reads (``.tolist``,
    ``.item`` and the scalar conversions, seen as torch functions) while active."""

    def __init__(self):
        super().__init__()
        self.aten_ops = 0
        self.host_reads = collections.Counter()
        outer = self

        class _Reads(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name in _HOST_READS:
                    outer.host_reads[name] += 1
                return func(*args, **(kwargs or {}))

        self._reads = _Reads()

    def __enter__(self):
        self._reads.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._reads.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.aten_ops += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def baton():
    """Hold the baton (compute alone) in this rank's thread; collectives hand it on while they wait."""
    _take()
    _LOCAL.holds = True
    try:
        yield
    finally:
        _LOCAL.holds = False
        _give()


class TwinError(RuntimeError):
    """A rank of the twin failed; the message carries its rank and traceback."""


def run_threaded(
    fn: Callable[..., Any], world_size: int, ep_size: int, *args: Any, timeout: float = HANG_TIMEOUT
) -> list[Any]:
    """``[fn(dims_0, *args), ..., fn(dims_{W-1}, *args)]``, each on its own thread and rank of one
    threaded process group of size W, with the real EP and EDP groups of `build_parallel_dims`
    (created before the baton: ``new_group`` waits on a store barrier, not a collective). A failure
    on any rank stops every rank and is raised here with its traceback; a hang past ``timeout`` too."""
    from diffmoe_dist.parallel.groups import build_parallel_dims

    torch.set_num_threads(1)
    world = mtpg._install_threaded_pg()
    mtpg.Collective.join = _join
    torch._C._distributed_c10d._set_thread_isolation_mode(True)
    store = dist.HashStore()
    results: list[Any] = [None] * world_size
    errors: list[str] = []

    def worker(rank: int) -> None:
        try:
            dist.init_process_group("threaded", rank=rank, world_size=world_size, store=store)
            dims = build_parallel_dims(ep_size)
            with baton():
                results[rank] = fn(dims, *args)
        except BaseException as exc:  # noqa: B036 - every failure must reach the caller
            if not isinstance(exc, SystemExit) or not errors:
                errors.append(f"rank {rank}:\n{traceback.format_exc()}")
            mtpg.ProcessLocalGroup.exception_handle(exc)
        finally:
            if world == dist.distributed_c10d._world:
                dist.destroy_process_group()

    threads = [threading.Thread(target=worker, args=(r,), daemon=True) for r in range(world_size)]
    old_stack = threading.stack_size(1 << 20)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout)
            if t.is_alive():
                mtpg.ProcessLocalGroup.exception_handle(TimeoutError())
                raise TwinError(f"the twin at W={world_size} hung past {timeout:.0f} s")
    finally:
        threading.stack_size(old_stack)
        torch._C._distributed_c10d._set_thread_isolation_mode(False)
        mtpg.Collective.join = _original_join
        mtpg._uninstall_threaded_pg()
        mtpg.ProcessLocalGroup.reset()
    if errors:
        raise TwinError(errors[0])
    return results


if __name__ == "__main__":  # a smoke run: python tests/scale_twin.py 256
    W = int(sys.argv[1]) if len(sys.argv) > 1 else 8

    def _sum(dims):
        t = torch.tensor([float(dims.rank)])
        dist.all_reduce(t, group=dims.edp_group)
        return t.item()

    print(sorted(set(run_threaded(_sum, W, 8))))


# ---- the 256-GPU job, twinned -------------------------------------------------------------------
CONFIG_256 = "configs/t2i/diffmoe-e16-256gpu.yaml"
# What differs from configs/t2i/diffmoe-e16-256gpu.yaml: widths (the CI digits: 16 px, 1 channel,
# MiniLM's 384-d captions of 16 tokens), CPU and gloo, one thread, no loader workers (threads cannot
# fork per rank), no wandb, no MFU peak timed per rank (W matmul benchmarks in a row), 2 Euler steps
# per sample. The layout (W, EP 8, pool dp, 16 experts, bf16, ZeRO-0, overlapped fp32 gradient
# buckets), the grid (8 prompt columns x 4) and the checkpoint settings are the config's; callers
# choose the batch and the steps.
TWIN = [
    *TINY_MODEL, "model.image_size=16", "model.in_channels=1",
    "model.text_dim=384", "model.text_len=16", "data.num_workers=0", "data.text_encoder=minilm",
    "parallel.backend=gloo", "parallel.device=cpu", "train.threads=1", "logging.wandb=disabled",
    "logging.mfu_peak=off", "sample.num_steps=2",
]  # fmt: skip


def twin_config(data: str, run_dir: str, world_size: int, *overrides: str):
    from diffmoe_dist.config import load_config

    cfg = load_config(CONFIG_256, [*TWIN, f"data.path={data}", f"train.run_dir={run_dir}", *overrides])
    return cfg.validate(world_size=world_size)


def twin_trainer(dims: Any, cfg: Any):
    """One rank's real Trainer, started as `Trainer.fit` starts it (resume decision, run history),
    without `fit`'s signal handlers."""
    from diffmoe_dist.train.run_dir import begin
    from diffmoe_dist.train.trainer import Trainer

    trainer = Trainer(cfg, dims, torch.device("cpu"), local_world_size=8)
    trainer._saved_step = None
    trainer.maybe_resume(lambda _: None)
    if dims.rank == 0:
        begin(trainer.run_plan, cfg, trainer.run_dir, trainer.ckpt_root, lambda _: None)
    return trainer


def train_rank(
    dims: Any, cfg: Any, count_ranks: tuple[int, ...] = (), signal_at: tuple[int, int] | None = None
) -> dict:
    """`Trainer._fit`'s schedule on one rank: steps, a grid at every step ``sample.every`` asks for
    one and at the end, a save at every ``checkpoint.every`` and at the end, the stop-flag agreement
    after every step (``signal_at=(rank, step)``: that rank alone "receives" SIGTERM after that
    step, as its handler would record it; every rank must stop there and save). Returns the per-step
    metrics, this rank's first-step counts (on ``count_ranks``) and its final weights."""
    from diffmoe_dist.train.metrics import Throughput
    from diffmoe_dist.train.preemption import StopRequest
    from diffmoe_dist.train.telemetry import RoutingTelemetry

    trainer = twin_trainer(dims, cfg)
    stop = StopRequest(dims)  # off the main thread it installs no handler: the agreement alone
    every = cfg.logging.routing_every
    telemetry = RoutingTelemetry(trainer.model, every, trainer.run_dir, dims, trainer.step + 1, collector=trainer.moe)
    throughput = Throughput(cfg, dims, trainer.device)
    metrics, counts, grids, stopped = [], {}, [], None
    while trainer.step < cfg.train.steps:
        if not counts and dims.rank in count_ranks:
            ops = OpCounter()
            with counting(dims) as comm, ops:
                metrics.append(trainer.train_step())
            counts = {"comm": dict(comm), "aten_ops": ops.aten_ops, "host_reads": dict(ops.host_reads)}
        else:
            metrics.append(trainer.train_step())
        telemetry.after_step(trainer.step)  # the routing gathers (a W x E buffer over DP)
        if trainer.step % cfg.logging.log_every == 0 or trainer.step == cfg.train.steps:
            metrics[-1].update(throughput.measure(1, 1.0))  # the peak-memory gather
        every = cfg.sample.every
        if every and trainer.step % every == 0 and trainer.step < cfg.train.steps:
            grids.append(_grid(trainer))
        if cfg.checkpoint.every and trainer.step % cfg.checkpoint.every == 0 and trainer.step < cfg.train.steps:
            trainer.save()
        if signal_at is not None and (dims.rank, trainer.step) == signal_at:
            stop._own = signal.SIGTERM
        stopped = stop.should_stop()
        if stopped and trainer.step < cfg.train.steps:
            break
        stopped = None
    if trainer._saved_step != trainer.step:
        trainer.save()
    if not stopped:
        grids.append(_grid(trainer))
    stop.close()
    return {
        "metrics": metrics, "counts": counts, "grids": grids, "stopped": stopped, "step": trainer.step,
        "weights": fingerprint(trainer),
    }  # fmt: skip


def _grid(trainer: Any) -> str:
    path = os.path.join(trainer.run_dir, "samples", f"step_{trainer.step:07d}.png")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    trainer.sample_grid(path)
    return path


def fingerprint(trainer: Any) -> dict[str, torch.Tensor]:
    """This rank's weights, EMA weights and buffers (its expert shard included), as stored."""
    out = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items()}
    out.update({f"ema.{k}": v.detach().clone() for k, v in trainer.ema.model.state_dict().items()})
    return out
