"""Batch-invariant kernels: a row's result depends on that row alone, bit for bit, whatever the batch.

The dp pool's exactness (one process on the concatenated batch) needs every number a selection
compares to have the same bits whichever rank, batch size or position computed it: the router's
scores (`routers.router_logits`) and the capacity predictor's probabilities (predictor.py), which
dynamic and interval inference count against a threshold and the training step's threshold EMA
takes a quantile of. Two things break it on CPU (measured, torch 2.13.0+cpu, 1-3 threads):

- a matrix product's rounding depends on its number of rows M: ``x @ W^T`` of one row (a rank of
  the pool holding one token, a sample run alone) differs from the same row inside a larger product,
  for every width tried (D 48-1152, outputs 4-1152, fp32 and bf16 autocast). Hence products over
  fixed blocks of `BLOCK_ROWS` rows, the last one zero-padded: every row goes through a product of
  one shape (`blocks`, `blocked_linear`);
- ``torch.sigmoid`` and SiLU round differently in the vectorised loop and in its scalar remainder,
  so an element's bits depend on where it falls in the flat tensor and in each thread's chunk (4-5%
  of single elements differed from the same element inside a long tensor). ``exp`` goes through the
  vectorised kernel for every element (tail included), and negation, ``1 +`` and division are
  correctly rounded IEEE operations: `sigmoid` and `silu` built from them are invariant (0 of 3,000
  single elements and sub-ranges differed) and within one ulp of torch's.

A compiled region would lose all of this (inductor fuses and vectorises its own way): the MoE layers
stay eager under ``train.compile`` (parallel/compile.py). On GPUs cuBLAS picks its kernel from the
batch count too; the fixed block shape there is not yet measured (docs/design.md section 9).
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK_ROWS = 128


def blocks(x_ND: Tensor) -> Tensor:
    """``x_ND`` as ``(G, BLOCK_ROWS, D)`` blocks, the last zero-padded (rows past N are padding)."""
    n, d = x_ND.shape
    pad = -n % BLOCK_ROWS
    if pad:
        x_ND = torch.cat([x_ND, x_ND.new_zeros(pad, d)])
    return x_ND.view(-1, BLOCK_ROWS, d)


def rows(x_GBO: Tensor, n: int) -> Tensor:
    """The first ``n`` rows of blocked ``x_GBO`` as ``(n, O)``: the padding dropped."""
    return x_GBO.reshape(-1, x_GBO.shape[-1])[:n]


class _BlockedLinear(torch.autograd.Function):
    """Forward: one ``baddbmm`` over the blocks, the weight broadcast (each batch entry the same
    fixed-shape product). Backward: plain matrix products over all rows, since gradients are
    reduced across ranks anyway, and autograd through the broadcast would materialise a ``(G, O, D)``
    weight gradient before summing it."""

    @staticmethod
    def forward(ctx, x_GBD: Tensor, weight_OD: Tensor, bias_O: Tensor | None) -> Tensor:
        g, b, d = x_GBD.shape
        w_GDO = weight_OD.T.unsqueeze(0).expand(g, d, -1)
        if bias_O is None:
            out_GBO = torch.bmm(x_GBD, w_GDO)
        else:
            out_GBO = torch.baddbmm(bias_O.view(1, 1, -1).expand(g, b, -1), x_GBD, w_GDO)
        ctx.save_for_backward(x_GBD, weight_OD)
        ctx.compute_dtype = out_GBO.dtype  # bf16 under autocast
        ctx.bias_dtype = None if bias_O is None else bias_O.dtype
        return out_GBO

    @staticmethod
    def backward(ctx, grad_GBO: Tensor):
        x_GBD, weight_OD = ctx.saved_tensors
        dtype = ctx.compute_dtype
        grad_MO = grad_GBO.reshape(-1, grad_GBO.shape[-1]).to(dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_MO @ weight_OD.to(dtype)).view(x_GBD.shape).to(x_GBD.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_MO.T @ x_GBD.reshape(-1, x_GBD.shape[-1]).to(dtype)).to(weight_OD.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_b = grad_MO.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_w, grad_b


def blocked_linear(x_GBD: Tensor, weight_OD: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """``x W^T + b`` on `blocks` (``(G, BLOCK_ROWS, D)`` -> ``(G, BLOCK_ROWS, O)``), batch invariant."""
    return _BlockedLinear.apply(x_GBD, weight_OD, bias_O)


def sigmoid(x: Tensor) -> Tensor:
    """``1 / (1 + exp(-x))``, elementwise with the same bits at any position (module docstring).
    For detached inputs (the predictor's probabilities): its gradient would be NaN for x < -88."""
    return 1.0 / (1.0 + torch.exp(-x))


class _SiLU(torch.autograd.Function):
    """Forward ``x / (1 + exp(-x))``; backward torch's own SiLU derivative (autograd through the
    formula would give NaN where ``exp(-x)`` overflows, x < -88)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x / (1.0 + torch.exp(-x))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad, x)


def silu(x: Tensor) -> Tensor:
    """``x sigmoid(x)``, position invariant like `sigmoid`, with SiLU's gradient."""
    return _SiLU.apply(x)
