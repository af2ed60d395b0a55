"""Gradient reduction and clipping for DP x EP without DDP, matching one process on the global batch.

Each rank's loss is the mean over its own tokens, so the global-mean loss is ``L = (1/W) sum_r L_r``.
- Non-expert parameters are replicated on all W ranks: all-reduce SUM over the DP group, / W.
- Expert parameters: backward through the all-to-all already brings every rank of the EP group
  its experts' gradient from all of the group's tokens; summing over the EDP group (the replicas of
  the shard) then covers all W ranks' losses, / W. This is what DeepSpeed ZeRO does with our
  expert tags (DESIGN.md section 4): it divides every gradient by the full DP size and reduces
  expert gradients over EDP.
This assumes equal token counts per rank (equal local batches); the trainer enforces that.

Gradients travel in flat buckets (few, large gloo calls instead of one per tensor).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from diffmoe_dist.parallel.groups import ParallelDims, comm_device

BUCKET_BYTES = 32 * 1024 * 1024


def is_expert_param(p: torch.Tensor) -> bool:
    """Expert shards carry DeepSpeed's tags (``allreduce=False``; ours also ``is_expert=True``)."""
    return getattr(p, "is_expert", False) or getattr(p, "allreduce", True) is False


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(non-expert, expert) trainable parameters, in the model's (rank-independent) order."""
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if is_expert_param(p) else dense).append(p)
    return dense, expert


def _buckets(tensors: list[torch.Tensor], bucket_bytes: int) -> Iterable[list[torch.Tensor]]:
    by_kind: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for group in by_kind.values():
        bucket, size = [], 0
        for t in group:
            bucket.append(t)
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


def _all_reduce_mean(tensors: list[torch.Tensor], group, divisor: int, bucket_bytes: int) -> None:
    for bucket in _buckets(tensors, bucket_bytes):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.div_(divisor)
        for t, reduced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            t.copy_(reduced)


@torch.no_grad()
def reduce_gradients(model: nn.Module, dims: ParallelDims, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Turns each rank's gradients of its local-mean loss into the gradients of the global-mean loss
    (identical on all replicas). Call after ``backward`` and before clipping / the optimizer step."""
    if not dims.distributed:
        return
    dense, expert = split_params(model)
    # A parameter without a gradient on some rank (unused there) joins with zeros, so every rank
    # reduces the same buckets; it keeps ``grad=None`` only where no rank produced a gradient.
    params = dense + expert
    has_grad = torch.tensor(
        [p.grad is not None for p in params], dtype=torch.int32, device=comm_device(dims.dp_group)
    )
    dist.all_reduce(has_grad, group=dims.dp_group)
    for p, flag in zip(params, has_grad.tolist()):
        if flag and p.grad is None:
            p.grad = torch.zeros_like(p)
    dense = [p.grad for p in dense if p.grad is not None]
    expert = [p.grad for p in expert if p.grad is not None]
    _all_reduce_mean(dense, dims.dp_group, dims.world_size, bucket_bytes)
    if dims.edp_size > 1 or dims.force_collectives:
        _all_reduce_mean(expert, dims.edp_group, dims.world_size, bucket_bytes)
    else:  # every rank holds its own experts (P = W): nothing to sum, only the 1/W
        for g in expert:
            g.div_(dims.world_size)


@torch.no_grad()
def grad_norm(model: nn.Module, dims: ParallelDims) -> torch.Tensor:
    """The L2 norm of the whole (unsharded) model's gradient, identical on every rank, after
    `reduce_gradients`: non-expert grads are replicated, and each EP group holds every expert
    exactly once, so the expert part is summed over the EP group only."""
    dense, expert = split_params(model)
    device = next(model.parameters()).device

    def sq(params: list[nn.Parameter]) -> torch.Tensor:
        grads = [p.grad.detach().float() for p in params if p.grad is not None]
        return (
            torch.stack([g.square().sum() for g in grads]).sum() if grads else torch.zeros((), device=device)
        )

    expert_sq = sq(expert).reshape(1)
    if dims.ep_size > 1 or dims.force_collectives:
        dist.all_reduce(expert_sq, group=dims.ep_group)
    return (sq(dense) + expert_sq[0]).sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a sharded model: every rank scales by the same
    factor, computed from the full model's norm. Returns that norm (before clipping)."""
    total = grad_norm(model, dims)
    if max_norm > 0:
        # No host read of the norm (a sync per step on CUDA): a non-finite norm scales by 1.
        scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
        scale = torch.where(torch.isfinite(total), scale, torch.ones_like(scale))
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device))
    return total
