"""The planner's cost model: per rank and per step, FLOPs, all-to-all, selection and gradient bytes,
memory, and the step time on a `Cluster` (alpha-beta collectives, diffmoe_dist.plan.cluster).

- Compute: `diffmoe_dist.train.flops` (the trainer's MFU count; MoE experts at C tokens per expert
  on average, ``imbalance`` for the slowest EP rank), plus the blocks' forward again under
  activation checkpointing, at ``rank_peak x mfu``.
- All-to-all: per MoE layer a counts exchange, dispatch (fp32 rows: the layer input is LayerNorm
  output, fp32 under autocast) and combine (compute dtype), forward and backward.
- Selection: radix select over the pool, latency-bound (see `selection_calls`).
- Gradients: dense over all DP ranks, experts over EDP, in ``parallel.grad_reduce_dtype``, in
  buckets; with ``parallel.overlap_grad_reduce`` the buckets run behind backward, where a device
  has engines to spare (GPU: NCCL beside compute; CPU: only cores no rank computes on), and what
  backward cannot cover, plus the last bucket, stays exposed. ZeRO-1/2 reduce-scatter the same
  bytes and all-gather the updated fp32 weights after the step (exposed).
- Optimizer, EMA, clipping: memory-bound, ~76 bytes touched per local parameter (Adam's 28 on the
  ZeRO shard only).
- Memory: fp32 weights, grads, Adam moments, EMA; activations counted per token from what autograd
  saves (`activation_bytes`; tests/test_plan.py checks it against saved-tensor hooks).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from diffmoe_dist.config import Config
from diffmoe_dist.config.validate import layout_error
from diffmoe_dist.model.ffn import is_moe_block
from diffmoe_dist.model.moe.routing import router_type
from diffmoe_dist.parallel.radix_select import DEFAULT_BITS, bit_widths
from diffmoe_dist.plan.cluster import Cluster, all_gather_s, all_reduce_s, all_to_all_s
from diffmoe_dist.plan.data_io import data_term, data_warning
from diffmoe_dist.train import flops as flop_count

BYTES_PER_PARAM_UPDATE = 76  # AdamW 28 + EMA 12 + clip 12 + bucket flatten/divide/copy 24
ADAM_BYTES = 28
ACTIVATION_MARGIN = 1.1  # allocator fragmentation and workspaces
# Gradient bucket bytes when parallel.grad_bucket_mb = 0: the plain engine's 32 MB on CPU, DDP's 25 MB
# on GPU; ZeRO on GPU ~2e8 elements (DeepSpeed's reduce_bucket_size).
BUCKET_MB = {"cpu": 32.0, "gpu": 25.0}
ZERO_BUCKET_ELEMENTS = 2e8


class PlanError(ValueError):
    """A layout the planner cannot price; the message names the field."""


@dataclass
class Layout:
    world: int
    nodes: int
    ranks_per_node: int
    ep: int
    edp: int
    pool: str
    pool_ranks: int
    zero: int
    grad_accum_steps: int
    activation_checkpointing: bool
    images_per_rank: int  # per micro-batch
    tokens_per_rank: int
    grad_reduce_dtype: str
    overlap_grad_reduce: bool
    threads_per_rank: int


def count_params(cfg: Config) -> dict[str, int]:
    """Exact counts from the model built on the meta device: non-expert (predictor included) and
    expert parameters (all E experts of every layer)."""
    import torch

    from diffmoe_dist.model.build import build_model
    from diffmoe_dist.model.moe.layer import moe_layers

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe, cfg.diffusion.objective)
    expert = sum(p.numel() for p in model.parameters() if getattr(p, "is_expert", False))
    predictor = sum(
        p.numel()
        for m in moe_layers(model)
        if m.capacity_predictor is not None
        for p in m.capacity_predictor.parameters()
    )
    total = sum(p.numel() for p in model.parameters())
    return {
        "total": total,
        "dense": total - expert,
        "expert": expert,
        "predictor": predictor,
        "moe_layers": len(moe_layers(model)),
    }


def activation_bytes(cfg: Config, images: int, recompute: bool = False, margin: float = ACTIVATION_MARGIN) -> float:
    """Bytes autograd keeps for backward, per rank, from what each op saves (per token of width D):
    the fp32 residual stream into each LayerNorm, the LayerNorm output (fp32 even under bf16
    autocast) that modulate saves, the matmul inputs (under autocast the bf16 copy the cast makes),
    q/k/v and the attention output (flash attention: no L x L probabilities), the FFN hidden
    (H, twice: into and out of GELU), the outputs the adaLN gates multiply. An MoE layer keeps C
    times the FFN part for its gathered rows, the fp32 router input and the capacity predictor's
    activations. Checkpointing keeps each block's fp32 input and one block's activations."""
    m, moe = cfg.model, cfg.moe
    depth, d, _ = m.resolved()
    h = m.mlp_ratio * d
    seq = m.tokens_per_image
    bf16 = cfg.train.precision == "bf16"
    lo, hi = (2, 4) if bf16 else (4, 4)  # matmul operands / outputs; residual stream and norms
    attn = 2 * hi * d + lo * (d + 3 * d + d + d + d)  # x, LN out; cast, qkv, out, reshape, proj out
    ffn = 2 * hi * d + lo * (d + 2 * h + d)  # x, LN out; cast, fc1 out, GELU out, fc2 out
    cross = 0.0
    if m.task == "t2i":
        cross = hi * d + lo * 4 * d + hi * (0 if bf16 else d)  # x; cast, q out, out, reshape
    c = router_type(moe.router).active_experts(moe) if any(is_moe_block(moe, i) for i in range(depth)) else 0.0
    c += moe.num_shared_experts  # shared experts: every token's rows, like a dense FFN of n H
    # x, LN out, router input (fp32); predictor cast, hidden, SiLU out; per row: cast, fc1 out,
    # GELU out, fc2 out; the gate's fp32 layer output; fp32 scores.
    moe_ffn = 3 * hi * d + 3 * lo * d + c * lo * (d + 2 * h + d) + hi * d + 4 * moe.num_experts
    layers = [attn + cross + (moe_ffn if is_moe_block(moe, i) else ffn) for i in range(depth)]
    per_token = depth * 4 * d + max(layers) if recompute else sum(layers)
    return per_token * images * seq * margin


def selection_calls(moe, pool_ranks: int, radix_bits: int = DEFAULT_BITS) -> list[tuple]:
    """Collectives of one MoE layer's training forward over a pool of ``pool_ranks`` ranks, as
    parallel/pools.py issues them: (op, bytes per rank). Radix select of the fp32 keys in
    ceil(32 / bits) passes, each one all-reduce of an E x 2^width int32 histogram (the first one's
    total is the pool size: no size collective), then the tie counts (one all-gather)."""
    if moe.router == "dense" or pool_ranks <= 1:
        return []
    return router_type(moe.router).selection_calls(moe, bit_widths(radix_bits))


def threshold_calls(moe, pool_ranks: int, n_moe: int, radix_bits: int = DEFAULT_BITS) -> list[tuple]:
    """Collectives of the step's threshold EMA (model/moe/collector.py): once per optimizer step,
    one radix select for all layers side by side (n_moe x E columns), and for pools smaller than
    DP (``rank`` / ``ep``) one all-reduce of every layer's quantile for the replica mean."""
    if n_moe == 0 or pool_ranks <= 1 or not router_type(moe.router).uses_predictor:
        return []
    cols = n_moe * moe.num_experts
    calls = [("all_reduce", cols * (1 << w) * 4) for w in bit_widths(radix_bits)]
    return calls + ([("all_reduce", 2 * cols * 8)] if moe.pool != "dp" else [])


# Kernel launches of one training step, eager (benchmarks/step_counts.py, torch 2.13, the 256-GPU
# structure at toy width, counted 2026-12-07: 4,453 per step with 24 blocks and 12 MoE layers; 2,079 for
# its dense twin, moe.router=dense): a block's dense work forward + backward (2,079 / 24), and what an MoE
# layer adds (routing, selection, dispatch, experts: 2,374 / 12). Compiled blocks: ASSUMED ~45 (inductor
# fuses the pointwise ops; each matmul stays one kernel, ~24 per block forward + backward); MoE layers
# stay eager (parallel/compile.py).
OPS_PER_BLOCK = {"eager": 87, "compiled": 45}
OPS_PER_MOE_LAYER = 198


def host_overhead(cfg: Config, cluster: Cluster, n_moe: int, accum: int, recompute: bool, device_s: float) -> dict:
    """Eager overhead per step: launches (``cluster.host_op_s`` each) hide behind the device's work
    unless they take longer; each host read (a dispatch's split sizes per MoE layer and pass, the
    step guard's agreement before every update, which carries the stop check (train/guard.py), the
    logged values at log steps) drains the stream and costs
    ``cluster.host_read_s`` of idle device."""
    passes = accum * (2 if recompute else 1)
    ops = passes * (cfg.model.resolved()[0] * OPS_PER_BLOCK["compiled" if cfg.train.compile else "eager"])
    ops += passes * n_moe * OPS_PER_MOE_LAYER
    reads = accum * n_moe * (2 if recompute else 1) + 1 + 1 / max(1, cfg.logging.log_every)
    launch_s, read_s = ops * cluster.host_op_s, reads * cluster.host_read_s
    return {"ops": ops, "reads": reads, "launch_s": launch_s, "read_s": read_s,
            "exposed_s": max(0.0, launch_s - device_s) + read_s}  # fmt: skip


def plan(
    cfg: Config,
    cluster: Cluster,
    world: int,
    ep: int | None = None,
    zero: int | None = None,
    imbalance: float = 1.0,
    efficiency: float | None = None,
    threads: int = 1,
    overlap: bool | None = None,
    grad_dtype: str | None = None,
    radix_bits: int = DEFAULT_BITS,
) -> dict:
    """The per-rank, per-step estimate for ``cfg`` on ``world`` ranks of ``cluster``. Defaults come
    from the config: EP ``parallel.expert_parallel_size``, ZeRO ``train.zero_stage``, overlap
    ``parallel.overlap_grad_reduce``, ``parallel.grad_reduce_dtype``. ``threads``: CPU threads per
    rank (torchrun's default 1). ``efficiency``: overrides the cluster's compute efficiency.
    ``radix_bits``: the selection's digit width (`selection_calls`, `threshold_calls`)."""
    m, moe = cfg.model, cfg.moe
    d = m.resolved()[1]
    ep = ep or cfg.parallel.expert_parallel_size
    zero = cfg.train.zero_stage if zero is None else zero
    overlap = cfg.parallel.overlap_grad_reduce if overlap is None else overlap
    grad_dtype = grad_dtype or cfg.parallel.grad_reduce_dtype
    accum, recompute = cfg.optim.grad_accum_steps, cfg.train.activation_checkpointing
    warnings: list[str] = []
    rpn = cluster.ranks_per_node(world)
    nodes = math.ceil(world / rpn)
    if nodes > cluster.nodes:
        warnings.append(f"world size {world} needs {nodes} nodes of {rpn} ranks; the cluster has {cluster.nodes}")
    experts = moe.num_experts if moe.router != "dense" else None
    if error := layout_error(world, ep, experts, cfg.data.global_batch_size, accum):
        name, value, fix = error
        raise PlanError(f"{name}={value!r} is invalid: {fix}")
    images = cfg.data.global_batch_size // (world * accum)
    n = images * m.tokens_per_image
    pool_ranks = flop_count.pool_ranks(cfg, world)
    layout = Layout(
        world, nodes, rpn, ep, world // ep, moe.pool, pool_ranks, zero, accum, recompute, images, n,
        grad_dtype, overlap, threads,
    )  # fmt: skip
    if ep > rpn:
        warnings.append(f"EP group of {ep} ranks spans nodes ({rpn} ranks per node): its all-to-alls cross the fabric")
    ep_per_node, edp_per_node = min(ep, rpn), max(1, rpn // ep)  # EP consecutive, EDP strided

    params = count_params(cfg)
    n_moe = params["moe_layers"]
    expert_local = params["expert"] // ep
    local_params = params["dense"] + expert_local

    # ---- compute
    by_part = flop_count.step_flops(cfg, images, pool_ranks, imbalance)
    fwd_flops = accum * sum(f for f, _ in by_part.values())
    bwd_flops = accum * sum(b for _, b in by_part.values())
    if recompute:
        bwd_flops += accum * sum(f for k, (f, _) in by_part.items() if k not in ("embed", "final"))
    precision = "bf16" if cfg.train.precision == "bf16" else "fp32"
    peak = cluster.rank_peak(precision, rpn, threads)
    eff = cluster.compute_efficiency if efficiency is None else efficiency
    fwd_s, bwd_s = fwd_flops / (peak * eff), bwd_flops / (peak * eff)
    model_flops = accum * flop_count.train_flops(cfg, images, pool_ranks)

    # ---- all-to-all (EP): counts, dispatch (fp32 rows) and combine (compute dtype)
    rows = flop_count.expert_rows(cfg, images, pool_ranks) * imbalance if n_moe else 0.0
    combine_elt = 2 if precision == "bf16" else 4
    a2a_bytes = a2a_s = 0.0
    if ep > 1 and n_moe:
        off = rows * (ep - 1) / ep * d
        calls = (2 if recompute else 1) + 1  # forward (and its recompute) + backward
        a2a_bytes = accum * n_moe * calls * off * (4 + combine_elt)
        one = lambda b: all_to_all_s(cluster, b, ep, ep_per_node)  # noqa: E731
        counts = one(ep * (moe.num_experts // ep) * 8)
        a2a_s = accum * n_moe * (calls * (one(off * 4) + one(off * combine_elt)) + (calls - 1) * counts)

    # ---- selection: latency-bound collectives over the pool
    # (the recompute of activation checkpointing re-runs the forward's selection, not the threshold's)
    sel = selection_calls(moe, pool_ranks, radix_bits)
    tau = threshold_calls(moe, pool_ranks, n_moe, radix_bits)
    per_node_pool = min(pool_ranks, rpn)
    price = {"all_reduce": all_reduce_s, "all_gather": all_gather_s}

    def cost(calls):
        return sum(price[op](cluster, b, pool_ranks, per_node_pool) for op, b in calls)

    sel_s = accum * n_moe * cost(sel) * (2 if recompute else 1) + cost(tau)
    sel_bytes = accum * n_moe * sum(b for _, b in sel) + sum(b for _, b in tau)

    # ---- gradients
    elt = 2 if grad_dtype == "bf16" else 4
    mb = cfg.parallel.grad_bucket_mb
    if mb <= 0:
        mb = ZERO_BUCKET_ELEMENTS * elt / 2**20 if zero >= 1 and cluster.kind == "gpu" else BUCKET_MB[cluster.kind]
    bucket = mb * 2**20
    grad_s = last_bucket_s = 0.0
    groups = ((params["dense"] * elt, world, rpn), (expert_local * elt, world // ep, edp_per_node))
    for nbytes, ranks, per_node in groups:
        if ranks > 1 and nbytes:
            buckets = math.ceil(nbytes / bucket)
            one = all_reduce_s(cluster, nbytes / buckets, ranks, per_node)
            grad_s += buckets * one
            last_bucket_s = max(last_bucket_s, one)
    grad_exposed_s = grad_s
    if overlap and grad_s:
        # Backward after the first bucket's gradients are ready can cover the reduction, where the
        # device has an engine to spare: GPUs (NCCL beside compute), CPUs with idle cores only.
        spare = 1.0 if cluster.kind == "gpu" else max(0.0, 1 - world * threads / cluster.devices_per_node)
        cover = bwd_s * (1 - min(1.0, bucket / max(local_params * elt, 1))) * spare
        grad_exposed_s = max(min(grad_s, last_bucket_s), grad_s - cover)
    param_gather_s = 0.0
    if zero >= 1 and world > 1:  # the updated fp32 weights, all-gathered from their ZeRO shards
        param_gather_s = all_gather_s(cluster, params["dense"] * 4 / world, world, rpn)
        if world // ep > 1:
            param_gather_s += all_gather_s(cluster, expert_local * 4 / (world // ep), world // ep, edp_per_node)
    misc_s = 0.0
    if world > 1:  # logged losses over DP, the expert grad-norm over EP (the step's small all-reduces)
        misc_s = all_reduce_s(cluster, 16, world, rpn) + all_reduce_s(cluster, 4, ep, ep_per_node)

    # ---- optimizer, EMA, clipping (memory-bound)
    dense_shard, expert_shard = params["dense"] / world, expert_local / max(1, world // ep)
    adam_params = dense_shard + expert_shard if zero >= 1 else local_params
    update_bytes = local_params * (BYTES_PER_PARAM_UPDATE - ADAM_BYTES) + adam_params * ADAM_BYTES
    cores = cluster.devices_per_node / rpn if cluster.kind == "cpu" else 1.0
    optimizer_s = update_bytes / (cluster.memory_bandwidth * min(float(threads), cores))

    # ---- memory
    weights = ema = local_params * 4
    grads = (dense_shard + expert_shard) * 4 if zero >= 2 else local_params * 4
    optimizer = adam_params * 8
    acts = activation_bytes(cfg, images, recompute)
    weight_casts = local_params * 2 if precision == "bf16" else 0  # autocast's bf16 weight copies, saved
    mem_total = weights + ema + grads + optimizer + acts + weight_casts
    capacity = cluster.memory_bytes / (rpn if cluster.kind == "cpu" else 1)
    if mem_total > 0.9 * capacity:
        warnings.append(
            f"does not fit: {mem_total / 1e9:.1f} GB per rank of {capacity / 1e9:.1f} GB (try zero=1/2, fewer "
            "images per rank, more ranks, or activation checkpointing)"
        )

    compute_s = fwd_s + bwd_s
    grad_bytes = (params["dense"] + expert_local) * elt
    device_s = compute_s + a2a_s + sel_s + grad_exposed_s + param_gather_s + misc_s + optimizer_s
    host = host_overhead(cfg, cluster, n_moe, accum, recompute, device_s)
    step_s = device_s + host["exposed_s"]
    expert_s = (fwd_s + bwd_s) * accum * sum(by_part.get("moe_experts", (0, 0))) / max(fwd_flops + bwd_flops, 1)
    if a2a_s > 0.3 * step_s or a2a_s > expert_s > 0:
        warnings.append(
            f"all-to-all dominates: {a2a_s * 1e3:.1f} ms per step ({a2a_s / step_s:.0%}) against "
            f"{expert_s * 1e3:.1f} ms of expert compute: keep EP inside a node, or lower P or C"
        )
    data = data_term(cfg, cluster.file_system, world, step_s)  # file-system bytes and opens per second
    if data_warning(data):
        warnings.append(data_warning(data))
    if sel_s > 0.1 * step_s:
        warnings.append(f"selection latency is {sel_s / step_s:.0%} of the step: fewer collectives per layer help")
    if grad_exposed_s > 0.3 * step_s:
        warnings.append(
            f"exposed gradient reduction is {grad_exposed_s / step_s:.0%} of the step: more images per rank, "
            "bf16 gradients or overlap with backward would hide it"
        )
    return {
        "config": {"model": asdict(m), "moe": asdict(moe), "precision": cfg.train.precision,
                   "global_batch_size": cfg.data.global_batch_size},
        "cluster": {"name": cluster.name, "kind": cluster.kind, "peak_flops": peak, "compute_efficiency": eff},
        "layout": asdict(layout),
        "params": {**params, "expert_per_rank": expert_local, "per_rank": local_params},
        "flops": {"by_part": by_part, "executed_per_rank": fwd_flops + bwd_flops, "model_per_rank": model_flops},
        "comm": {"a2a_bytes": a2a_bytes, "selection_bytes": sel_bytes, "grad_bytes": grad_bytes,
                 "selection_collectives": accum * n_moe * len(sel) + len(tau), "grad_bucket_bytes": bucket},
        "memory": {"weights": weights, "grads": grads, "optimizer": optimizer, "ema": ema, "activations": acts,
                   "weight_casts": weight_casts, "total": mem_total, "capacity": capacity},
        "time": {"forward_s": fwd_s, "backward_s": bwd_s, "compute_s": compute_s, "a2a_s": a2a_s,
                 "selection_s": sel_s, "grad_reduce_s": grad_s, "grad_exposed_s": grad_exposed_s,
                 "param_gather_s": param_gather_s, "misc_s": misc_s, "optimizer_s": optimizer_s,
                 "host_exposed_s": host["exposed_s"], "step_s": step_s},
        "host": host,
        "throughput": {"images_per_s": cfg.data.global_batch_size / step_s, "tokens_per_s_per_rank": accum * n / step_s,
                       "tflops_per_rank": model_flops / step_s / 1e12, "mfu": model_flops / step_s / peak},
        "data": data,
        "warnings": warnings,
    }  # fmt: skip
