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
(model/moe/routers.py) and LayerNorm's affine runs in fp32 under autocast; those pass through the
same node uncast, so that a block's whole gradient is one tensor. The linears every block runs on a
block-independent input (adaLN on c, the caption keys/values: `DiTBase.shared_linears`, run stacked
before the blocks) are cast in one node of the model's own.

With the `GradReducer` (plain data parallelism) the parameters' ``.grad`` are views of its flat
buckets, each node's parameters laid out side by side in its order (`cast_groups`), and the node's
backward adds its one gradient tensor into them (`accumulate_cast_gradients`): one ``add_`` per node
(per bucket it straddles) instead of a cast back and autograd's ``add_`` per parameter, the same fp32
sums (a bf16 gradient upcast exactly, then added). Elsewhere (DeepSpeed, whose hooks must see each
gradient; a ``.grad`` that is not a bucket view; a parameter without a gradient) autograd
accumulates them one by one as before.

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
    """``[p.to(dtype) for p in params[:n_cast]]`` in two kernels (cat, cast), the other ``params``
    passed through as they are; backward concatenates the cast ones' gradients that arrived and casts
    them back in two kernels as well. A parameter whose copy got no gradient gets None (not zeros), as
    with autocast's own casts: AdamW skips such a parameter."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, accumulate, n_cast: int, *params: torch.Tensor):
        ctx.set_materialize_grads(False)
        ctx.shapes, ctx.dtype, ctx.accumulate = [p.shape for p in params], params[0].dtype, accumulate
        ctx.n_cast = n_cast
        cast, keep = params[:n_cast], params[n_cast:]
        flat = torch.cat([p.reshape(-1) for p in cast]).to(dtype)
        views = [v.view(p.shape) for v, p in zip(flat.split([p.numel() for p in cast]), cast)]
        return tuple(views + [p.view_as(p) for p in keep])

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        present = [i for i, g in enumerate(grads) if g is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if len(present) == len(grads) and ctx.accumulate is not None:
            # one tensor (fp32 if any passed-through gradient is: the bf16 ones upcast exactly)
            if ctx.accumulate(torch.cat([g.reshape(-1) for g in grads])):
                return (None, None, None, *out)  # added into the parameters' .grad: nothing left to accumulate
        cast = [i for i in present if i < ctx.n_cast]
        if cast:
            flat = torch.cat([grads[i].reshape(-1) for i in cast]).to(ctx.dtype)
            for i, g in zip(cast, flat.split([grads[i].numel() for i in cast])):
                out[i] = g.view(ctx.shapes[i])
        for i in present[len(cast) :]:
            out[i] = grads[i]
        return (None, None, None, *out)


def cast_once(
    params: list[torch.Tensor], dtype: torch.dtype, accumulate=None, keep: list[torch.Tensor] = ()
) -> list[torch.Tensor]:
    """``[p.to(dtype) for p in params]`` in two kernels, differentiable (`_CastOnce`), then ``keep``
    as they are (their gradients join the one backward tensor). ``accumulate`` (optional): called in
    backward with the gradients of all of them concatenated, in that order (when every one got a
    gradient); it adds them into the parameters' ``.grad`` itself and returns True (autograd then
    accumulates nothing more), or returns False (autograd accumulates them one by one)."""
    return list(_CastOnce.apply(dtype, accumulate, len(params), *params, *keep))


def cast_blocks_once(model: nn.Module) -> int:
    """Patches each block of ``model.blocks`` to run on one-cast bf16 copies of its linear weights
    under low-precision autocast (module docstring). Returns the number of blocks patched."""
    blocks = getattr(model, "blocks", [])
    # The blocks' linears that run stacked before the blocks (model/layers.py `DiTBase.block_inputs`): cast
    # there, in one node of the model's own.
    shared = {id(p) for m in getattr(model, "shared_linears", list)() for p in m.parameters()}
    if shared:
        names = [n for n, p in model.named_parameters() if id(p) in shared]
        model.block_inputs = _cast_forward(model, model.block_inputs, names, [])
    for block in blocks:
        names = [n for n in linear_param_names(block) if id(block.get_parameter(n)) not in shared]
        # The block's other fp32 parameters (LayerNorm affine, the router's weight) pass through the same
        # node uncast, so that the whole block's gradient is one tensor (`accumulate_cast_gradients`).
        keep = [n for n, p in block.named_parameters() if p.requires_grad and p.dtype == torch.float32]
        keep = [n for n in keep if n not in set(names) and id(block.get_parameter(n)) not in shared]
        block.forward = _cast_forward(block, block.forward, names, keep)
    return len(blocks)


def _cast_forward(module: nn.Module, inner, names: list[str], keep: list[str]):
    """``inner`` (a method of ``module``) run on one-cast copies of the parameters ``names`` (and
    ``keep`` passed through) under low-precision autocast."""
    module._cast_names, module._cast_accumulate = names + keep, None  # cast_groups, accumulate_cast_gradients

    def forward(*args, **kwargs):
        device_type = args[0].device.type if args and isinstance(args[0], torch.Tensor) else "cpu"
        dtype = torch.get_autocast_dtype(device_type)
        if not (names and torch.is_autocast_enabled(device_type) and dtype in LOW_PRECISION):
            return inner(*args, **kwargs)
        get = module.get_parameter  # looked up each call: a shard may replace them
        copies = cast_once([get(n) for n in names], dtype, module._cast_accumulate, [get(n) for n in keep])
        with _reparametrize_module(module, dict(zip(names + keep, copies))):
            return inner(*args, **kwargs)

    return forward


def _cast_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_cast_names")]  # through checkpoint / compile wrappers


def cast_groups(model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of each patched block's one cast node, in its order (the order of their
    gradients in the block's one backward tensor): the cast ones, then those passed through."""
    return [[block.get_parameter(n) for n in block._cast_names] for block in _cast_blocks(model)]


def accumulate_cast_gradients(model: nn.Module, accumulator) -> int:
    """Lets each patched block's cast add its gradients into ``.grad`` itself, in one op per
    contiguous region instead of one per parameter: ``accumulator(params)`` returns the `cast_once`
    ``accumulate`` callable for those parameters, or None (then autograd accumulates them).
    The `GradReducer` gives one when the parameters' ``.grad`` are contiguous views of its buckets
    (`GradReducer.accumulator`). Returns the number of blocks that got one."""
    n = 0
    for block, params in zip(_cast_blocks(model), cast_groups(model)):
        block._cast_accumulate = accumulator(params) if params else None
        n += block._cast_accumulate is not None
    return n
