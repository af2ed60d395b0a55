"""FLOPs of a training step and the matmul peak they are measured against: one count shared by the
trainer's MFU line, the planner (`diffmoe_dist.plan`) and the benchmarks.

The count is of the matmuls that execute (``2 m k n`` each; elementwise work, norms and softmax are
not counted), as `torch.utils.flop_counter.FlopCounterMode` sees them on a real forward + backward
(tests/test_flops.py checks it against the counter, not against these formulas). Backward computes
the weight gradient of every linear (``2 m k n``) and the input gradient (another ``2 m k n``) only
where the input requires grad: not for the patch conv on the noisy image, the first timestep linear
on the sinusoidal features, nor the capacity predictor's first linear on its detached input (the
caption projections do get one: the learned null caption makes their input a parameter's function).
Attention: ``4 B L S D`` forward (``Q K^T`` and ``P V``), ``10 B L S D`` backward (the flash kernels
recompute ``Q K^T``: 5 matmuls).

MoE layers count their *active* FLOPs: the experts compute ``M`` rows, the selected (token, expert)
pairs, on average ``C`` per token (expert choice: ``E * floor(C N_pool / E)`` per pool; token
choice: ``top_k`` per token). ``imbalance`` scales them for the slowest EP rank (the planner).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from diffmoe_dist.config import Config
from diffmoe_dist.model.ffn import is_moe_block
from diffmoe_dist.model.moe.routing import router_type

FREQUENCY_SIZE = 256  # TimestepEmbedder's sinusoidal features


def _linear(rows: float, k: int, n: int, input_grad: bool = True) -> tuple[float, float]:
    """(forward, backward) FLOPs of ``rows x k @ k x n``."""
    f = 2.0 * rows * k * n
    return f, (2 * f if input_grad else f)


def _attention(batch: float, q_len: int, kv_len: int, dim: int) -> tuple[float, float]:
    f = 4.0 * batch * q_len * kv_len * dim
    return f, 2.5 * f


def expert_rows(cfg: Config, images: int, pool_ranks: int = 1) -> float:
    """Selected (token, expert) pairs one rank's experts compute per micro-batch, averaged over
    ranks: ``pool_ranks`` ranks share one token pool (``moe.pool``: dp = W, ep = P, rank = 1)."""
    m, moe = cfg.model, cfg.moe
    return router_type(moe.router).expert_rows(moe, images, m.tokens_per_image, pool_ranks)


def step_flops(cfg: Config, images: int, pool_ranks: int = 1, imbalance: float = 1.0) -> dict[str, tuple[float, float]]:
    """(forward, backward) matmul FLOPs of one rank's micro-batch of ``images`` in training, by
    component. Activation checkpointing re-runs the blocks' forward in backward: add
    ``forward`` of every component but ``embed`` (the planner does; MFU does not count it)."""
    m, moe = cfg.model, cfg.moe
    depth, d, _ = m.resolved()
    h = int(d * m.mlp_ratio)
    seq = m.tokens_per_image
    b, n, e = images, images * seq, moe.num_experts
    patch = m.patch_size**2 * m.in_channels
    out: dict[str, list[float]] = {}

    def add(name: str, fb: tuple[float, float], times: float = 1.0) -> None:
        acc = out.setdefault(name, [0.0, 0.0])
        acc[0] += times * fb[0]
        acc[1] += times * fb[1]

    add("embed", _linear(n, patch, d, input_grad=False))  # patch conv on the noisy image
    add("embed", _linear(b, FREQUENCY_SIZE, d, input_grad=False))
    add("embed", _linear(b, d, d))
    if m.task == "t2i":
        t, dt = m.text_len, m.text_dim
        grad = m.class_dropout > 0  # torch.where with the learned null caption
        add("embed", _linear(b * t, dt, d, grad))  # token_proj
        add("embed", _linear(b * t, d, d))
        add("embed", _linear(b, dt, d, grad))  # pooled_proj
        add("embed", _linear(b, d, d))
    add("adaln", _linear(b, d, 6 * d), depth)
    add("attention", _linear(n, d, 3 * d), depth)
    add("attention", _linear(n, d, d), depth)
    add("attention_scores", _attention(b, seq, seq, d), depth)
    if m.task == "t2i":
        add("cross_attention", _linear(n, d, d), depth)  # q
        add("cross_attention", _linear(b * m.text_len, d, 2 * d), depth)  # kv
        add("cross_attention", _linear(n, d, d), depth)  # proj
        add("cross_attention_scores", _attention(b, seq, m.text_len, d), depth)
    n_moe = sum(is_moe_block(moe, i) for i in range(depth))
    add("ffn_dense", _linear(n, d, h), depth - n_moe)
    add("ffn_dense", _linear(n, h, d), depth - n_moe)
    if n_moe:
        rows = expert_rows(cfg, images, pool_ranks) * imbalance
        add("router", _linear(n, d, e), n_moe)
        if router_type(moe.router).uses_predictor:
            add("predictor", _linear(n, d, d, input_grad=False), n_moe)  # x.detach()
            add("predictor", _linear(n, d, e), n_moe)
        add("moe_experts", _linear(rows, d, h), n_moe)
        add("moe_experts", _linear(rows, h, d), n_moe)
        if moe.num_shared_experts:  # every token, n H hidden units
            add("moe_shared", _linear(n, d, moe.num_shared_experts * h), n_moe)
            add("moe_shared", _linear(n, moe.num_shared_experts * h, d), n_moe)
    add("final", _linear(b, d, 2 * d))
    add("final", _linear(n, d, patch))
    return {k: (v[0], v[1]) for k, v in out.items()}


def train_flops(cfg: Config, images: int, pool_ranks: int = 1) -> float:
    """Model FLOPs (forward + backward, no recompute) of one rank's micro-batch: MFU's numerator."""
    return sum(f + b for f, b in step_flops(cfg, images, pool_ranks).values())


def pool_ranks(cfg: Config, world_size: int) -> int:
    """Ranks that share one token pool (``moe.pool``)."""
    return {"dp": world_size, "ep": cfg.parallel.expert_parallel_size, "rank": 1}.get(cfg.moe.pool, 1)


def step_model_flops(cfg: Config, world_size: int) -> float:
    """Model FLOPs per rank of one optimizer step (all micro-batches) at ``world_size`` ranks."""
    accum = cfg.optim.grad_accum_steps
    images = cfg.data.global_batch_size // (world_size * accum)
    return accum * train_flops(cfg, images, pool_ranks(cfg, world_size))


def tokens_per_step(cfg: Config) -> int:
    """Image tokens of one global batch."""
    return cfg.data.global_batch_size * cfg.model.tokens_per_image


# ---- the peak ---------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_op(fn, device: torch.device, warmup: int, repeats: int, before=None) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn()`` after ``warmup`` untimed ones, the
    device synchronised around each (kernels are asynchronous: time what ran); ``before()`` runs
    untimed ahead of every call (e.g. a barrier, so ranks start together)."""
    times = []
    for i in range(warmup + repeats):
        if before is not None:
            before()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def matmul_peak(
    dtype: torch.dtype = torch.float32,
    n: int | None = None,
    threads: int | None = None,
    device: str | torch.device = "cpu",
    warmup: int = 2,
    repeats: int = 7,
    best: bool = False,
) -> float:
    """Median FLOP/s of ``torch.mm`` of two ``n x n`` matrices (default n: 1024 on CPU, 8192 on
    CUDA), at ``threads`` CPU threads (default: the current setting, restored afterwards).
    ``best``: the fastest repeat instead, the figure to take on cores other processes share."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)  # never the global stream: the trainer times this after a resume
        a, b = (torch.rand(n, n, generator=gen).to(device, dtype) for _ in range(2))
        out = torch.empty(n, n, dtype=dtype, device=device)
        times = time_op(lambda: torch.mm(a, b, out=out), device, warmup, repeats)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / (min(times) if best else statistics.median(times))


def flop_counter():
    """`FlopCounterMode` that also counts what torch 2.13 has no formula for: the CPU flash-attention
    ops (``_scaled_dot_product_flash_attention_for_cpu[_backward]``, torch's own SDPA formulas) and
    the experts' ``_grouped_mm``."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    def cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    def grouped_mm(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        # The experts' grouped GEMM (model/moe/experts.py), forward and backward:
        # 3d x 2d splits B's columns by group (M K N_total); the 2d x 3d, 2d x 2d (weight grads) and
        # 3d x 3d forms multiply every row of A by B's last dimension.
        if len(a_shape) == 3 and len(b_shape) == 2:
            return 2 * a_shape[1] * a_shape[2] * b_shape[1]
        return 2 * math.prod(a_shape) * b_shape[-1]

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_sdpa_backward,
        aten._grouped_mm: grouped_mm,
    }
    return fc.FlopCounterMode(display=False, custom_mapping=mapping)
