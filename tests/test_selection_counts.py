"""Issue 15 item 2: one DiffMoE layer forward in training (pool dp, W=2, P=2, 8 experts) issues at
most 8 collectives and at most 4 ops that make a GPU wait for the host, and the step's threshold
update (all layers at once) a few more collectives and no host sync.

Collectives are counted by wrapping the torch.distributed functions in each process; host-sync
ops by name in the torch profiler (the names the issue lists). Counted on CPU + gloo: the same
code path runs on CUDA + NCCL, where these ops are the ones that stall the stream.
"""

from __future__ import annotations

import collections

import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import MoEConfig
from diffmoe_dist.model.moe.layer import MoEFeedForward
from diffmoe_dist.parallel import build_parallel_dims, parallelize
from diffmoe_dist.parallel.groups import count_collectives

SYNC_OPS = (
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::bincount",
    "aten::repeat_interleave",
    "aten::unique",
    "aten::masked_select",
)
MAX_COLLECTIVES, MAX_SYNCS = 8, 4
EXPERTS, DIM, BATCH, SEQ = 8, 16, 2, 32


def _count(fn) -> tuple[dict, dict]:
    """Collectives and host-sync ops of ``fn()``. ``Tensor.tolist`` is counted too: on CPU it runs
    no aten op the profiler would name, on CUDA it is a device-to-host copy that waits."""
    tolist, reads = torch.Tensor.tolist, []

    def counted_tolist(t):
        reads.append(1)
        return tolist(t)

    torch.Tensor.tolist = counted_tolist
    try:
        with count_collectives() as c, torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            fn()
    finally:
        torch.Tensor.tolist = tolist
    syncs = collections.Counter(e.name for e in p.events() if e.name in SYNC_OPS)
    if reads:
        syncs["Tensor.tolist"] = len(reads)
    return dict(c), dict(syncs)


def _layer(dims, dispatch: str = "exact") -> MoEFeedForward:
    torch.manual_seed(0)
    cfg = MoEConfig(router="expert_choice_global", num_experts=EXPERTS, capacity=1.0, pool="dp", dispatch=dispatch)
    layer = MoEFeedForward(DIM, 4 * DIM, cfg)
    parallelize(layer, dims, cfg)
    return layer.train()


def _forward_counts(dims, dispatch: str = "exact") -> tuple[dict, dict]:
    layer = _layer(dims, dispatch)
    x = torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(dims.rank))
    layer(x)  # warm-up: first calls may initialise lazily
    return _count(lambda: layer(x))


def _counts(rank: int, world_size: int) -> dict:
    dims = build_parallel_dims(2, EXPERTS)
    return {"forward": _forward_counts(dims), "step": _step_counts(dims), "padded": _forward_counts(dims, "padded")}


@pytest.fixture(scope="module")
def counts() -> list[dict]:
    return run_distributed(_counts, 2)


def test_training_forward_of_a_dp_pool_layer_has_few_collectives_and_host_syncs(counts):
    for rank, (collectives, syncs) in enumerate(c["forward"] for c in counts):
        n_coll, n_sync = sum(collectives.values()), sum(syncs.values())
        what = f"rank {rank}: {n_coll} collectives {collectives}, {n_sync} host syncs {syncs}"
        assert n_coll <= MAX_COLLECTIVES and n_sync <= MAX_SYNCS, what


def test_padded_dispatch_forward_reads_nothing_on_the_host_and_exchanges_no_counts(counts):
    """moe.dispatch=padded: fixed splits from the capacity bound, so no host-sync op at all and one
    all-to-all fewer (the count exchange) than the exact dispatch, the selection's collectives equal."""
    for rank, c in enumerate(counts):
        (exact, _), (padded, syncs) = c["forward"], c["padded"]
        assert syncs == {}, (rank, syncs)
        assert padded == {**exact, "all_to_all_single": exact["all_to_all_single"] - 1}, (rank, exact, padded)


def _step_counts(dims) -> tuple[dict, dict, int]:
    from diffmoe_dist.model.moe.collector import MoECollector

    rank = dims.rank
    model = torch.nn.Sequential(_layer(dims), _layer(dims), _layer(dims))
    collector = MoECollector()
    for micro in range(2):  # two micro-batches: the step's pool is both
        x = torch.randn(BATCH, SEQ, DIM, generator=torch.Generator().manual_seed(10 * rank + micro))
        with collector.collect(model):
            model(x)
    collectives, syncs = _count(collector.update_thresholds)
    return collectives, syncs, len(collector.layers)


def test_step_threshold_update_selects_all_layers_in_one_radix_search_without_host_syncs(counts):
    """Pool dp: the quantiles are global, no replica mean; 3 layers share the 3 histogram passes."""
    for rank, (collectives, syncs, layers) in enumerate(c["step"] for c in counts):
        assert layers == 3 and collectives == {"all_reduce": 3} and syncs == {}, (rank, collectives, syncs)
