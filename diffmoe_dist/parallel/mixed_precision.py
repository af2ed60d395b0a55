"""One cast per block of the weights autocast would cast one by one (FSDP's ``param_dtype`` policy).

Under bf16 autocast every ``nn.Linear`` casts its fp32 weight and bias to bf16 in forward, and its
backward casts both gradients back to fp32: four kernels per linear per step, a quarter of a
step's kernels at the 256-GPU structure (benchmarks/step_counts.py). `cast_blocks_once` makes that
two per block and direction: the block's linear parameters are concatenated and cast in one go
(cat + cast), the block runs on bf16 views of the result, and backward assembles their gradients
into one tensor and casts it back once. The same roundings as autocast's own casts (fp32 -> bf16
of each weight, bf16 -> fp32 of each gradient, both exact per element), so a step's numbers are
bitwise unchanged; the gradients still arrive per block, so the reduction keeps overlapping
backward. Only ``nn.Linear`` parameters are cast: the router's weight is used in fp32
(model/moe/routers.py) and LayerNorm's affine runs in fp32 under autocast.

Applied by `parallelize` to the trained model's blocks, inside activation checkpointing (the
recompute casts again). Not with ``train.compile``: inductor fuses those casts into the kernels
that use them. Outside autocast (fp32 runs, evaluation) a block runs unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.stateless import _reparametrize_module

LOW_PRECISION = (torch.bfloat16, torch.float16)


def linear_param_names(block: nn.Module) -> list[str]:
    """Names (in ``block``) of the trainable fp32 parameters of its ``nn.Linear`` modules."""
    names = []
    for prefix, module in block.named_modules():
        if type(module) is nn.Linear:
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad and p.dtype == torch.float32:
                    names.append(f"{prefix}.{name}" if prefix else name)
    return names


def cast_once(params: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """``[p.to(dtype) for p in params]`` in two kernels (cat, cast), differentiable: backward
    concatenates the gradients and casts them back in two kernels as well."""
    flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
    return [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in params]), params)]


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
