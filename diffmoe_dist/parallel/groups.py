"""Process groups for data and expert parallelism, in Megatron's layout with TP = PP = CP = 1.

With W ranks and expert-parallel size P (docs/design.md section 2):
- the data-parallel (DP) group is the whole world: every rank holds a different micro-batch;
- expert-parallel (EP) groups are consecutive ranks ``[0..P-1], [P..2P-1], ...``; EP rank ``i`` of a
  group holds experts ``[i * E/P, (i + 1) * E/P)`` and tokens move by all-to-all inside the group;
- expert-data-parallel (EDP) groups are strided ``[i, i+P, i+2P, ...]``: the replicas of one
  expert shard, over which expert gradients are reduced.

`ParallelDims` carries the groups and the ranks; a one-process run uses `ParallelDims.single()`
(every group ``None``), so model code never needs a process group to exist.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from diffmoe_dist.config import ConfigError
from diffmoe_dist.config.validate import layout_error

# Every torch.distributed collective this code may issue, by name (for the counting benchmarks and
# tests that wrap them); all_gather_single is torch 2.13's all_gather_into_tensor (the tie counts).
COLLECTIVE_NAMES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "barrier",
)


@contextlib.contextmanager
def count_collectives(counts: collections.Counter | None = None) -> Iterator[collections.Counter]:
    """Counts the calls of each `COLLECTIVE_NAMES` function by name into ``counts`` (a new Counter
    when None), which it yields, while active. It patches the ``torch.distributed`` module's
    attributes: the code calls them as ``dist.<name>``."""
    counts = collections.Counter() if counts is None else counts
    saved = {}
    for name in COLLECTIVE_NAMES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        saved[name] = original

        def counted(*args, _name=name, _original=original, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)
    try:
        yield counts
    finally:
        for name, original in saved.items():
            setattr(dist, name, original)


class ParallelSetupError(ConfigError):
    """An impossible (world size, experts, expert-parallel size): one line naming field, value and fix."""


def validate_parallel(world_size: int, num_experts: int | None, ep_size: int) -> None:
    """Checks the parallel layout before any process group starts; raises `ParallelSetupError`."""
    if world_size < 1:
        raise ParallelSetupError(f"world_size={world_size} is invalid: launch at least 1 process")
    if ep_size < 1:
        raise ParallelSetupError(
            f"parallel.expert_parallel_size={ep_size} is invalid: use a positive integer such as 1"
        )
    if num_experts is not None and num_experts < 1:
        raise ParallelSetupError(f"moe.num_experts={num_experts} is invalid: use at least 1 expert")
    if error := layout_error(world_size, ep_size, num_experts):
        name, value, fix = error
        raise ParallelSetupError(f"{name}={value!r} is invalid: {fix}")


def expert_parallel_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """EP groups: consecutive blocks of ``ep_size`` ranks (Megatron's order ``tp-cp-ep-dp-pp``)."""
    return [list(range(start, start + ep_size)) for start in range(0, world_size, ep_size)]


def expert_data_parallel_ranks(world_size: int, ep_size: int) -> list[list[int]]:
    """EDP groups: ranks with the same EP rank, strided by ``ep_size``."""
    return [list(range(i, world_size, ep_size)) for i in range(ep_size)]


def comm_device(group: Any = None) -> torch.device:
    """Where a small tensor made up for a collective must live: NCCL only moves CUDA tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class ParallelDims:
    """This rank's place in the DP x EP layout, and the groups to talk over (``None``: one process)."""

    world_size: int
    rank: int
    ep_size: int
    ep_rank: int
    ep_ranks: tuple[int, ...]  # global ranks of this rank's EP group, in EP-rank order
    edp_ranks: tuple[int, ...]  # global ranks of this rank's EDP group
    dp_group: Any = None
    ep_group: Any = None
    edp_group: Any = None
    # Run the distributed code path (parallelize, the pool, the all-to-all, every collective) even
    # at world size 1: how one GPU tests the NCCL path (parallel.force_distributed).
    force_distributed: bool = False

    @property
    def edp_size(self) -> int:
        return self.world_size // self.ep_size

    @property
    def edp_rank(self) -> int:
        return self.rank // self.ep_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.force_distributed

    def local_experts(self, num_experts: int) -> range:
        """Global indices of the experts this rank holds."""
        per_rank = num_experts // self.ep_size
        return range(self.ep_rank * per_rank, (self.ep_rank + 1) * per_rank)

    @classmethod
    def single(cls) -> ParallelDims:
        return cls(world_size=1, rank=0, ep_size=1, ep_rank=0, ep_ranks=(0,), edp_ranks=(0,))


def build_parallel_dims(ep_size: int, num_experts: int | None = None) -> ParallelDims:
    """Creates the EP and EDP groups with plain ``dist.new_group`` on an initialised default group.

    Same rank sets as megatron-core's ``initialize_model_parallel(expert_model_parallel_size=P)``
    (checked in tests/test_parallel_launch.py) without its ~6 s import: the choice for tests and
    for runs that do not need Megatron's other groups. A collective: every rank must call it.
    """
    world_size, rank = dist.get_world_size(), dist.get_rank()
    validate_parallel(world_size, num_experts, ep_size)
    ep_group = edp_group = None
    # new_group is itself collective: every rank creates every group, in the same order.
    for ranks in expert_parallel_ranks(world_size, ep_size):
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for ranks in expert_data_parallel_ranks(world_size, ep_size):
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return _dims(dist.group.WORLD, ep_group, edp_group)


def megatron_parallel_dims() -> ParallelDims:
    """Reads the groups megatron-core's ``initialize_model_parallel`` created."""
    from megatron.core import parallel_state as mpu

    return _dims(
        mpu.get_data_parallel_group(),
        mpu.get_expert_model_parallel_group(),
        mpu.get_expert_data_parallel_group(),
    )


def _dims(dp_group: Any, ep_group: Any, edp_group: Any) -> ParallelDims:
    ep_ranks = tuple(dist.get_process_group_ranks(ep_group))
    edp_ranks = tuple(dist.get_process_group_ranks(edp_group))
    rank = dist.get_rank()
    return ParallelDims(
        world_size=dist.get_world_size(dp_group),
        rank=rank,
        ep_size=len(ep_ranks),
        ep_rank=ep_ranks.index(rank),
        ep_ranks=ep_ranks,
        edp_ranks=edp_ranks,
        dp_group=dp_group,
        ep_group=ep_group,
        edp_group=edp_group,
    )
