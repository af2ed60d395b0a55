"""Everything parallel, applied from outside to a built model and its EMA (torchtitan's parallelize_*).

The model code builds every MoE layer with all E experts (or, inside `expert_shard`, only this
rank's), a `LocalPool` and a `LocalDispatcher`, and knows nothing of processes or DeepSpeed.
`parallelize` then, on the model and in the same way on its EMA copy:
- keeps only this rank's ``E/P`` experts (``experts.shard``) and tags them for DeepSpeed's MoE
  paths (`tag_expert_params`);
- swaps in the `AllToAllDispatcher` over the EP group when ``P > 1``;
- swaps in the token pool ``moe.pool`` asks for (docs/design.md section 2): ``rank`` (own batch),
  ``ep`` (the EP group's batches) or ``dp`` (every rank's batch), all with thresholds averaged
  over DP so the predictor buffers stay identical;
- broadcasts parameters and buffers so that all replicas start identical: non-expert tensors
  from rank 0 over DP, expert shards from the first rank of each EDP group;
and to the trained model alone (the EMA never runs backward): one weight cast per block under bf16
autocast (parallel/mixed_precision.py, eager blocks), activation checkpointing, compiled
blocks (``compile``, parallel/compile.py), and the
gradient reduction overlapped with backward (`GradReducer`, parallel/grads.py), which it returns
for the engine to finish at the optimizer step.

Call it once, after the EMA copy and before building the optimizer: sharding replaces the expert
Parameters. On one process it changes no weight (only checkpointing, when asked, wraps blocks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from diffmoe_dist.config import POOLS
from diffmoe_dist.model.moe.experts import expert_modules
from diffmoe_dist.model.moe.layer import MoEFeedForward, moe_layers
from diffmoe_dist.model.moe.pool import LocalPool, TokenPool
from diffmoe_dist.parallel.activation_checkpoint import checkpoint_blocks
from diffmoe_dist.parallel.all_to_all import AllToAllDispatcher
from diffmoe_dist.parallel.compile import compile_blocks
from diffmoe_dist.parallel.grads import BUCKET_BYTES, GradReducer, is_expert_param
from diffmoe_dist.parallel.groups import ParallelDims
from diffmoe_dist.parallel.mixed_precision import accumulate_cast_gradients, cast_blocks_once, cast_groups
from diffmoe_dist.parallel.pools import DistributedPool, ReplicatedLocalPool
from diffmoe_dist.parallel.radix_select import DEFAULT_BITS


def make_pool(pool: str, dims: ParallelDims, bits_per_pass: int = DEFAULT_BITS) -> TokenPool:
    """The token pool for ``moe.pool``; pools of one rank need no collectives for selection."""
    if pool not in POOLS:
        raise ValueError(f"moe.pool={pool!r} is invalid: use one of {', '.join(POOLS)}")
    if not dims.distributed:
        return LocalPool()
    if pool == "dp":
        return DistributedPool(dims.dp_group, dims.dp_group, bits_per_pass)
    if pool == "ep" and (dims.ep_size > 1 or dims.force_distributed):
        return DistributedPool(dims.ep_group, dims.dp_group, bits_per_pass)
    return ReplicatedLocalPool(dims.dp_group)


def parallelize(
    model: nn.Module,
    dims: ParallelDims,
    moe_cfg,
    *,
    ema: nn.Module | None = None,
    activation_checkpointing: bool = False,
    compile: bool = False,
    grad_reduce=None,
) -> GradReducer | None:
    """Applies all parallelism to ``model`` (in place) and, the same way, to its EMA copy ``ema``
    (module docstring). ``moe_cfg``: the MoEConfig (``pool``). ``grad_reduce``: the
    ParallelConfig (``grad_reduce_dtype``, ``overlap_grad_reduce``, ``grad_bucket_mb``) when this
    code reduces the gradients (plain data parallelism; DeepSpeed ZeRO reduces its own): returns
    the `GradReducer` whose hooks it put on ``model``'s final parameters, else None."""
    for m in (model,) if ema is None else (model, ema):
        for layer in moe_layers(m):
            parallelize_moe_layer(layer, dims, moe_cfg.pool)
        tag_expert_params(m, dims)
        if dims.distributed:
            broadcast_replicas(m, dims)
    if not compile:
        cast_blocks_once(model)  # one weight cast per block under bf16 autocast; compiled blocks fuse theirs
    if activation_checkpointing:
        checkpoint_blocks(model)  # the trained model only: the EMA model never runs backward
    if compile:
        compile_blocks(model)  # after checkpointing, as torchtitan: the checkpointed block compiles
    if grad_reduce is None:
        return None
    # After sharding: the hooks go on the final expert Parameters (the trained model only).
    reducer = GradReducer(
        model,
        dims,
        dtype=grad_reduce.grad_reduce_dtype,
        bucket_bytes=int(grad_reduce.grad_bucket_mb * 2**20),
        overlap=grad_reduce.overlap_grad_reduce,
        contiguous=cast_groups(model),  # each block's cast parameters side by side, in cast order
    )
    accumulate_cast_gradients(model, reducer.accumulator)  # one add per block into the buckets, not one per weight
    return reducer


def tag_expert_params(model: nn.Module, dims: ParallelDims) -> None:
    """DeepSpeed's MoE convention (docs/design.md section 4): ``allreduce=False`` keeps ZeRO from
    reducing expert gradients over all DP ranks, and ``group_name`` (its MoE optimizer-group key)
    names the EDP group they are reduced over. Set again on every call (a copy drops attributes)."""
    for experts in expert_modules(model).values():
        for p in experts.parameters():
            p.allreduce = False
            p.group_name = f"ep_size_{dims.ep_size}"


def parallelize_moe_layer(layer: MoEFeedForward, dims: ParallelDims, pool: str) -> None:
    experts = layer.experts
    if experts.num_local == experts.num_experts and dims.ep_size > 1:
        experts.shard(dims.ep_rank, dims.ep_size)  # built whole (tests, tools); Trainer builds its shard only
    if (experts.num_local, experts.offset) != (len(local := dims.local_experts(experts.num_experts)), local.start):
        raise ValueError(
            f"{layer.num_experts} experts hold {experts.num_local} from offset {experts.offset}, but EP rank "
            f"{dims.ep_rank} of {dims.ep_size} owns {len(local)} from {local.start}: build the model inside "
            f"expert_shard({dims.ep_rank}, {dims.ep_size})"
        )
    if dims.ep_size > 1 or dims.force_distributed:
        layer.dispatcher = AllToAllDispatcher(dims.ep_group)
    layer.pool = make_pool(pool, dims)


def _broadcast(tensors: list[torch.Tensor], src: int, group) -> None:
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group_tensors in by_kind.values():
        bucket: list[torch.Tensor] = []
        size = 0
        for i, t in enumerate(group_tensors):
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= BUCKET_BYTES or i == len(group_tensors) - 1:
                flat = _flatten_dense_tensors(bucket)
                dist.broadcast(flat, src=src, group=group)
                for dst, value in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                    dst.copy_(value)
                bucket, size = [], 0


@torch.no_grad()
def broadcast_replicas(model: nn.Module, dims: ParallelDims) -> None:
    """Makes replicas bitwise identical: non-expert parameters and all buffers from global rank 0
    over DP, expert shards from their EDP group's first rank. A collective on every rank."""
    params = list(model.parameters())
    dense = [p.data for p in params if not is_expert_param(p)] + [b for b in model.buffers()]
    expert = [p.data for p in params if is_expert_param(p)]
    _broadcast(dense, dist.get_process_group_ranks(dims.dp_group)[0], dims.dp_group)
    if dims.edp_size > 1 or dims.force_distributed:
        _broadcast(expert, dims.edp_ranks[0], dims.edp_group)
