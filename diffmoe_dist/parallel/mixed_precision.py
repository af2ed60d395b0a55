"""One cast per block of the weights autocast would cast one by one (FSDP's ``param_dtype`` policy).

Under bf16 autocast every ``nn.Linear`` casts its fp32 weight and bias to bf16 in forward, and its
backward casts both gradients back to fp32: four kernels per linear per step, a quarter of a
step's kernels at the 256-GPU structure (benchmarks/step_counts.py). `cast_blocks_once` makes that
two per block and direction: the block's linear parameters are concatenated and cast in one go
(cat + cast), the block runs on bf16 views of the result, and backward assembles their gradients
into one tensor and casts it back once. The same roundings as autocast's own casts (fp32 -> bf16
of each weight, bf16 -> fp32 of each gradient, both exact per element), so a step's numbers are
bitwise unchanged; the gradients still arrive per block, so the reduction keeps overlapping
backward. Only the parameters of ``nn.Linear`` and of the experts (`StackedExperts`, every expert takes
part in every forward, an empty one with zero rows) are cast: the router's weight is used in fp32
(model/moe/routers.py) and LayerNorm's affine runs in fp32 under autocast.

Applied by `parallelize` to the trained model's blocks, inside activation checkpointing (the
recompute casts again). Not with ``train.compile``: inductor fuses those casts into the kernels
that use them. Outside autocast (fp32 runs, evaluation) a block runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module

from diffmoe_dist.model.moe.experts import StackedExperts

LOW_PRECISION = (torch.bfloat16, torch.float16)


def linear_param_names(block: nn.Module) -> list[str]:
    """Names (in ``block``) of the trainable fp32 parameters of its ``nn.Linear`` and expert modules."""
    names = []
    for prefix, module in block.named_modules():
        if type(module) in (nn.Linear, StackedExperts):  # the experts' baddbmm / grouped GEMM: autocast casts
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad and p.dtype == torch.float32:
                    names.append(f"{prefix}.{name}" if prefix else name)
    return names


class _CastOnce(torch.autograd.Function):
    """``[p.to(dtype) for p in params]`` in two kernels (cat, cast); backward concatenates the
    gradients that arrived and casts them back in two kernels as well. A parameter whose copy got
    no gradient gets None (not zeros), as with autocast's own casts: AdamW skips such a parameter."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.shapes, ctx.dtype = [p.shape for p in params], params[0].dtype
        flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
        return tuple(v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in params]), params))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        present = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if present:
            flat = torch.cat([grads[i].reshape(-1) for i in present]).to(ctx.dtype)
            for i, g in zip(present, flat.split([grads[i].numel() for i in present])):
                out[i] = g.view(ctx.shapes[i])
        return (None, *out)


def cast_once(params: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``[p.to(dtype) for p in params]`` in two kernels, differentiable (`_CastOnce`)."""
    return list(_CastOnce.apply(dtype, *params))


def cast_blocks_once(model: nn.Module) -> int:
    """Patches each block of ``model.blocks`` to run on one-cast bf16 copies of its linear weights
    under low-precision autocast (module docstring). Returns the number of blocks patched."""
    blocks = getattr(model, "blocks", [])
    for block in blocks:
        inner, names = block.forward, linear_param_names(block)

        def forward(*args, _inner=inner, _block=block, _names=names, **kwargs):
            device_type = args[0].device.type if args and isinstance(args[0], torch.Tensor) else "cpu"
            dtype = torch.get_autocast_dtype(device_type)
            if not (_names and torch.is_autocast_enabled(device_type) and dtype in LOW_PRECISION):
                return _inner(*args, **kwargs)
            params = [_block.get_parameter(n) for n in _names]  # looked up each call: a shard may replace them
            with _reparametrize_module(_block, dict(zip(_names, cast_once(params, dtype)))):
                return _inner(*args, **kwargs)

        block.forward = forward
    return len(blocks)
