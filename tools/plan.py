"""Plan a layout before paying for it: per step and per GPU, FLOPs, all-to-all and selection bytes,
memory, and step time from an alpha-beta model of a cluster.

    python tools/plan.py --config configs/t2i/diffmoe-e16-256gpu.yaml --cluster tools/clusters/h100_32x8.yaml
    python tools/plan.py --config configs/local/diffmoe-tiny.yaml --cluster tools/clusters/cpu_local.yaml --measure
    python tools/plan.py --calibrate tools/clusters/cpu_local.yaml --nproc 4     # measure this machine

The model, per rank (B images, L tokens each, N = B L tokens, width D, E experts, capacity C):
- FLOPs: forward of attention (+ cross-attention for t2i), dense FFNs, MoE experts at C N tokens
  (the expected load; ``--imbalance`` scales it for the slowest EP rank, see routing.jsonl), router,
  capacity predictor, adaLN and embedders; training = 3x forward (the predictor 2x: its input is
  detached, so backward computes no input gradient). Compute time = FLOPs / (peak * mfu * share),
  where ``share`` < 1 when more ranks than cores share a CPU node.
- All-to-all: 2 forward (dispatch, combine) + 2 backward per MoE layer, C N rows of D values each,
  (P - 1) / P of them off-rank; dispatch rows are fp32 (the layer input is LayerNorm output, fp32
  even under bf16 autocast), combine rows in the compute dtype. Time alpha + bytes / bandwidth of
  the link the EP group spans (NVLink inside a node, the NIC share of one GPU across nodes).
- Selection (radix select over the token pool, DESIGN.md section 2): per MoE layer, ``passes``
  all-reduces of an E x 2^b int32 histogram for the top-k and as many for the predictor quantile,
  one pool-size all-reduce, one tie all-gather, one threshold all-reduce: latency-bound.
- Gradients: ring (or tree, whichever is faster) all-reduce of fp32 non-expert grads over all W
  ranks and expert grads over the W / P expert-data-parallel replicas, in 32 MB buckets; ZeRO-1/2
  move the same bytes (reduce-scatter + all-gather) but shard optimizer state (and grads).
- Optimizer, EMA, clipping: memory-bound, ~76 bytes touched per local parameter.
- Memory: fp32 weights, grads, Adam moments and EMA (the trainer's layout), ZeRO sharding, and
  activations from Korthikanti et al.'s per-layer count adapted to DiT blocks and MoE buffers.
- ``optim.grad_accum_steps`` micro-batches each pay compute, all-to-all and selection; gradients
  are reduced once per step. ``train.activation_checkpointing`` re-runs each block's forward in
  backward (4x forward FLOPs, a third all-to-all per direction, the top-k selection again) and
  keeps only block inputs. ``train.zero_stage`` is the default for ``--zero``.
No overlap of communication with compute (the trainer reduces gradients after backward).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import yaml

BUCKET_BYTES = 32 * 1024 * 1024  # diffmoe_dist.parallel.grads.BUCKET_BYTES
RADIX_BITS = 8  # DistributedPool's default bits per pass
BYTES_PER_PARAM_UPDATE = 76  # AdamW 28 + EMA 12 + clip 12 + bucket flatten/divide/copy 24
ACTIVATION_MARGIN = 1.1  # allocator fragmentation and workspaces
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_CONFIG = os.path.join(REPO, "configs", "local", "diffmoe-tiny.yaml")


# ---- cluster ------------------------------------------------------------------------------------
@dataclass
class Link:
    bandwidth: float  # bytes/s per rank, one direction
    latency: float  # seconds per collective step (alpha)


@dataclass
class Cluster:
    name: str
    nodes: int
    devices_per_node: int  # GPUs, or CPU cores for a CPU "cluster"
    ranks_per_node: int  # processes per node; > devices on an oversubscribed CPU node
    peak_flops: dict[str, float]  # per device, by precision (fp32, bf16)
    mfu: float  # assumed achieved fraction of peak for the model's compute
    memory_bytes: float  # per device (CPU: per node)
    memory_bandwidth: float  # bytes/s per device (CPU: one core's, like peak_flops)
    intra_node: Link
    inter_node: Link | None = None
    kind: str = "gpu"
    notes: str = ""

    @property
    def share(self) -> float:
        """Fraction of a device one rank gets: < 1 when ranks outnumber cores on a CPU node."""
        return min(1.0, self.devices_per_node / self.ranks_per_node)


def load_cluster(path: str) -> Cluster:
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    try:
        devices = raw.get("gpus_per_node") or raw.get("cores_per_node") or raw["devices_per_node"]
        peak = raw["peak_flops"]
        peak = {k: float(v) for k, v in peak.items()} if isinstance(peak, dict) else {"bf16": float(peak)}
        inter = raw.get("inter_node")
        cluster = Cluster(
            name=raw.get("name", os.path.splitext(os.path.basename(path))[0]),
            nodes=int(raw.get("nodes", 1)),
            devices_per_node=int(devices),
            ranks_per_node=int(raw.get("ranks_per_node", devices)),
            peak_flops=peak,
            mfu=float(raw.get("mfu", 0.4)),
            memory_bytes=float(raw["memory_bytes"]),
            memory_bandwidth=float(raw["memory_bandwidth"]),
            intra_node=Link(float(raw["intra_node"]["bandwidth"]), float(raw["intra_node"]["latency"])),
            inter_node=Link(float(inter["bandwidth"]), float(inter["latency"])) if inter else None,
            kind=raw.get("kind", "gpu"),
            notes=raw.get("notes", ""),
        )
    except KeyError as exc:
        raise SystemExit(
            f"plan: cluster file {path} lacks {exc.args[0]!r}: see tools/clusters/h100_32x8.yaml for the fields"
        ) from None
    if cluster.nodes > 1 and cluster.inter_node is None:
        raise SystemExit(f"plan: cluster file {path} has nodes={cluster.nodes} but no inter_node link")
    return cluster


# ---- collectives (alpha-beta) -------------------------------------------------------------------
def _link(cluster: Cluster, spans_nodes: bool) -> Link:
    return cluster.inter_node if spans_nodes and cluster.inter_node is not None else cluster.intra_node


def all_reduce_s(cluster: Cluster, nbytes: float, n: int, spans_nodes: bool) -> float:
    """Ring 2(n-1) alpha + 2 (n-1)/n S / bw, or a (double binary) tree 2 log2(n) alpha + 2 S / bw."""
    if n <= 1:
        return 0.0
    link = _link(cluster, spans_nodes)
    ring = 2 * (n - 1) * link.latency + 2 * (n - 1) / n * nbytes / link.bandwidth
    tree = 2 * math.ceil(math.log2(n)) * link.latency + 2 * nbytes / link.bandwidth
    return min(ring, tree)


def all_gather_s(cluster: Cluster, nbytes_per_rank: float, n: int, spans_nodes: bool) -> float:
    if n <= 1:
        return 0.0
    link = _link(cluster, spans_nodes)
    return math.ceil(math.log2(n)) * link.latency + (n - 1) * nbytes_per_rank / link.bandwidth


def all_to_all_s(cluster: Cluster, offrank_bytes: float, p: int) -> float:
    """One all-to-all of ``offrank_bytes`` leaving each of ``p`` ranks (consecutive ranks): peers in
    the node over NVLink, the rest through this GPU's share of the node's NICs, in parallel."""
    if p <= 1:
        return 0.0
    rpn = cluster.ranks_per_node
    if p <= rpn or cluster.inter_node is None:
        return cluster.intra_node.latency + offrank_bytes / cluster.intra_node.bandwidth
    per_peer = offrank_bytes / (p - 1)
    intra = (rpn - 1) * per_peer / cluster.intra_node.bandwidth
    inter = (p - rpn) * per_peer / cluster.inter_node.bandwidth
    return cluster.inter_node.latency + max(intra, inter)


# ---- the model ---------------------------------------------------------------------------------
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


def count_params(cfg) -> dict[str, int]:
    """Exact counts from the model built on the meta device: non-expert (predictor included) and
    expert parameters (all E experts of every layer)."""
    import torch

    from diffmoe_dist.model.build import build_model
    from diffmoe_dist.model.moe.layer import moe_layers

    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
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


def forward_flops(cfg, images: int, imbalance: float = 1.0) -> dict[str, float]:
    """Forward FLOPs of one rank's micro-batch (2 per multiply-add), by component."""
    from diffmoe_dist.model.ffn import is_moe_block

    m, moe = cfg.model, cfg.moe
    depth, d, heads = m.resolved()
    h = int(d * m.mlp_ratio)
    seq = (m.image_size // m.patch_size) ** 2
    n = images * seq
    patch = m.patch_size**2 * m.in_channels
    n_moe = sum(is_moe_block(moe, i) for i in range(depth))
    n_dense = depth - n_moe
    e = moe.num_experts
    ffn = 4 * n * d * h
    if moe.router == "token_choice":
        active = moe.top_k
    else:
        active = moe.capacity
    out = {
        "attention": depth * 8 * n * d * d,  # qkv and output projections
        "attention_scores": depth * 4 * n * seq * d,  # Q K^T and P V
        "cross_attention": 0.0,
        "cross_attention_scores": 0.0,
        "ffn_dense": n_dense * ffn,
        "moe_experts": n_moe * active * ffn * imbalance,
        "router": n_moe * 2 * n * d * e,
        "predictor": n_moe * 2 * n * (d * d + d * e) if moe.router == "expert_choice_global" else 0.0,
        "adaln": depth * 12 * images * d * d + 4 * images * d * d,
        "embed": 2 * n * patch * d * 2 + 2 * images * (256 * d + d * d),
    }
    if m.task == "t2i":
        t, dt = m.text_len, m.text_dim
        out["cross_attention"] = depth * (4 * n * d * d + 4 * images * t * d * d)
        out["cross_attention_scores"] = depth * 4 * n * t * d
        out["embed"] += 2 * images * t * (dt * d + d * d) + 2 * images * (dt * d + d * d)
    return out


def activation_bytes(cfg, cluster: Cluster, images: int, recompute: bool = False) -> float:
    """Activations kept for backward, per rank. Korthikanti et al. (2022) count, per transformer
    layer and token, 34 D bytes at 2-byte activations (attention 11, MLP 19, norms 4) plus the
    attention probabilities 5 heads L bytes unless fused attention recomputes them. DiT adds the
    modulate/gate products (~6 D more); an MoE layer keeps C times the MLP part, its dispatch
    buffers (rows gathered, received, regrouped and their outputs: ~6 C D values) and the router
    and predictor activations."""
    from diffmoe_dist.model.ffn import is_moe_block

    m, moe = cfg.model, cfg.moe
    depth, d, heads = m.resolved()
    seq = (m.image_size // m.patch_size) ** 2
    n = images * seq
    scale = (2 if cfg.train.precision == "bf16" else 4) / 2  # the counts assume 2-byte activations
    fused = cluster.kind == "gpu"  # flash / memory-efficient SDPA on GPU; the math kernel on CPU
    per_token = {"attn": 11 * d + (0 if fused else 5 * heads * seq * 2), "mlp": 19 * d, "norm": 4 * d, "dit": 6 * d}
    if m.task == "t2i":
        per_token["cross"] = 11 * d + (0 if fused else 5 * heads * m.text_len * 2)
    layers = []
    for i in range(depth):
        layer = sum(v for k, v in per_token.items() if k != "mlp")
        if is_moe_block(moe, i):
            c = moe.top_k if moe.router == "token_choice" else moe.capacity
            layer += c * per_token["mlp"] + 6 * c * d * 2 + 2 * moe.num_experts * 4 + 2 * d * 2
        else:
            layer += per_token["mlp"]
        layers.append(layer * scale)
    # Activation checkpointing keeps each block's fp32 input and one block's activations at a time.
    per_token_total = depth * 4 * d + max(layers) if recompute else sum(layers)
    return per_token_total * n * ACTIVATION_MARGIN


def plan(
    cfg,
    cluster: Cluster,
    world: int,
    ep: int,
    zero: int | None = None,
    imbalance: float = 1.0,
    mfu: float | None = None,
) -> dict:
    """The per-rank, per-step estimate for ``cfg`` on ``world`` ranks of ``cluster`` at EP size ``ep``
    (``zero``: ZeRO stage, default ``train.zero_stage``). ``optim.grad_accum_steps`` micro-batches
    each pay compute, all-to-all and selection; gradients are reduced once per step.
    ``train.activation_checkpointing`` adds a forward (and its all-to-alls and top-k selection,
    not the threshold update) in backward and keeps only block inputs."""
    m, moe = cfg.model, cfg.moe
    d = m.resolved()[1]
    zero = cfg.train.zero_stage if zero is None else zero
    accum = cfg.optim.grad_accum_steps
    recompute = cfg.train.activation_checkpointing
    warnings: list[str] = []
    nodes = max(1, math.ceil(world / cluster.ranks_per_node))
    if nodes > cluster.nodes:
        warnings.append(
            f"world size {world} needs {nodes} nodes of {cluster.ranks_per_node} ranks; the cluster has {cluster.nodes}"
        )
    if world % ep:
        raise SystemExit(f"plan: expert_parallel_size={ep} must divide the world size {world}")
    if moe.router != "dense" and moe.num_experts % ep:
        raise SystemExit(f"plan: expert_parallel_size={ep} must divide moe.num_experts={moe.num_experts}")
    if cfg.data.global_batch_size % (world * accum):
        raise SystemExit(
            f"plan: data.global_batch_size={cfg.data.global_batch_size} must be a multiple of the world size "
            f"{world} x optim.grad_accum_steps={accum}"
        )
    images = cfg.data.global_batch_size // (world * accum)  # per micro-batch
    seq = (m.image_size // m.patch_size) ** 2
    n = images * seq
    pool_ranks = {"dp": world, "ep": ep, "rank": 1}[moe.pool]
    layout = Layout(
        world, nodes, cluster.ranks_per_node, ep, world // ep, moe.pool, pool_ranks, zero, accum, recompute, images, n
    )
    rpn = cluster.ranks_per_node
    spans = {"ep": ep > rpn, "edp": world // ep > 1 and world > rpn, "dp": world > rpn}
    spans["pool"] = pool_ranks > rpn if moe.pool != "dp" else spans["dp"]
    if ep > rpn:
        warnings.append(
            f"EP group of {ep} ranks spans nodes ({rpn} ranks per node): its all-to-alls cross the inter-node fabric"
        )

    params = count_params(cfg)
    n_moe = params["moe_layers"]
    expert_local = params["expert"] // ep
    local_params = params["dense"] + expert_local

    # ---- compute
    fwd = forward_flops(cfg, images, imbalance)
    passes_fwd = 2 if recompute else 1
    train_mult = {k: (1.0 + passes_fwd if k == "predictor" else 2.0 + passes_fwd) for k in fwd}
    train_flops = accum * sum(train_mult[k] * v for k, v in fwd.items())
    precision = "bf16" if cfg.train.precision == "bf16" else "fp32"
    peak = cluster.peak_flops.get(precision) or next(iter(cluster.peak_flops.values()))
    mfu = mfu if mfu is not None else cluster.mfu
    compute_s = train_flops / (peak * mfu * cluster.share)

    # ---- all-to-all (EP)
    c = moe.top_k if moe.router == "token_choice" else moe.capacity
    rows = c * n * imbalance
    combine_elt = 2 if precision == "bf16" else 4
    a2a_bytes = a2a_s = 0.0
    if ep > 1 and moe.router != "dense":
        off = rows * (ep - 1) / ep * d
        calls = passes_fwd + 1  # forward (and its recompute) + backward, for dispatch and for combine
        a2a_bytes = accum * n_moe * calls * off * (4 + combine_elt)  # dispatch rows fp32, combine compute dtype
        counts = ep * (moe.num_experts // ep) * 8
        a2a_s = (
            accum
            * n_moe
            * (
                calls * all_to_all_s(cluster, off * 4, ep)
                + calls * all_to_all_s(cluster, off * combine_elt, ep)
                + passes_fwd * all_to_all_s(cluster, counts, ep)
            )
        )

    # ---- selection (radix select over the pool)
    sel_bytes = sel_s = 0.0
    sel_collectives = 0
    e = moe.num_experts
    if moe.router == "expert_choice_global" and world > 1:
        passes = math.ceil(32 / RADIX_BITS)
        hist = e * (1 << RADIX_BITS) * 4
        if pool_ranks > 1:
            # per forward: pool size, top-k passes, tie all-gather; once: the predictor quantile's passes
            topk_s = (
                passes * all_reduce_s(cluster, hist, pool_ranks, spans["pool"])
                + all_reduce_s(cluster, 8, pool_ranks, spans["pool"])
                + all_gather_s(cluster, e * 8, pool_ranks, spans["pool"])
            )
            quantile_s = passes * all_reduce_s(cluster, hist, pool_ranks, spans["pool"])
            sel_bytes += accum * n_moe * (passes_fwd * (passes * hist + 8 + e * 8 * pool_ranks) + passes * hist)
            sel_s += accum * n_moe * (passes_fwd * topk_s + quantile_s)
            sel_collectives += accum * n_moe * (passes_fwd * (passes + 2) + passes)
        sel_bytes += accum * n_moe * e * 4
        sel_s += accum * n_moe * all_reduce_s(cluster, e * 4, world, spans["dp"])  # threshold replica mean
        sel_collectives += accum * n_moe

    # ---- gradients
    grad_dense = params["dense"] * 4
    grad_expert = expert_local * 4
    grad_s = 0.0
    if world > 1:
        for nbytes, ranks, span in ((grad_dense, world, spans["dp"]), (grad_expert, world // ep, spans["edp"])):
            if ranks > 1 and nbytes:
                buckets = math.ceil(nbytes / BUCKET_BYTES)
                grad_s += buckets * all_reduce_s(cluster, nbytes / buckets, ranks, span)
        # has-grad flags and logged losses over DP, the expert grad-norm over EP
        grad_s += 2 * all_reduce_s(cluster, 4 * 64, world, spans["dp"]) + all_reduce_s(cluster, 8, ep, spans["ep"])

    # ---- optimizer, EMA, clipping
    update_params = local_params
    if zero >= 1:  # Adam's 28 bytes per parameter only on this rank's shard
        update_params = (
            local_params * (BYTES_PER_PARAM_UPDATE - 28) / BYTES_PER_PARAM_UPDATE
            + (params["dense"] / world + expert_local / (world // ep)) * 28 / BYTES_PER_PARAM_UPDATE
        )
    optimizer_s = update_params * BYTES_PER_PARAM_UPDATE / (cluster.memory_bandwidth * cluster.share)

    # ---- memory
    dense_shard = params["dense"] / world
    expert_shard = expert_local / (world // ep)
    weights = local_params * 4
    ema = local_params * 4
    grads = (dense_shard + expert_shard) * 4 if zero >= 2 else local_params * 4
    optimizer = (dense_shard + expert_shard) * 8 if zero >= 1 else local_params * 8
    acts = activation_bytes(cfg, cluster, images, recompute)
    mem_total = weights + ema + grads + optimizer + acts
    capacity = cluster.memory_bytes / (cluster.ranks_per_node if cluster.kind == "cpu" else 1)
    if mem_total > 0.9 * capacity:
        warnings.append(
            f"does not fit: {mem_total / 1e9:.1f} GB per rank of {capacity / 1e9:.1f} GB "
            f"(try zero=1/2, a smaller global batch, more ranks, or activation checkpointing)"
        )

    step_s = compute_s + a2a_s + sel_s + grad_s + optimizer_s
    expert_s = compute_s * 3 * fwd["moe_experts"] / train_flops  # the work the all-to-alls feed
    if a2a_s > 0.3 * step_s or (a2a_s > expert_s > 0):
        warnings.append(
            f"all-to-all dominates: {_ms(a2a_s)} per step ({a2a_s / step_s:.0%} of it) against {_ms(expert_s)} "
            "of expert compute: keep EP inside a node, or lower P or C"
        )
    if sel_s > 0.1 * step_s:
        warnings.append(f"selection latency is {sel_s / step_s:.0%} of the step: consider moe.pool=ep or fewer passes")
    if grad_s > 0.3 * step_s:
        warnings.append(
            f"gradient all-reduce is {grad_s / step_s:.0%} of the step: more images per rank, bf16 "
            "gradients or overlapping the reduction with backward would hide it"
        )

    images_per_s = cfg.data.global_batch_size / step_s
    return {
        "config": {
            "model": asdict(m),
            "moe": asdict(moe),
            "precision": cfg.train.precision,
            "global_batch_size": cfg.data.global_batch_size,
        },
        "cluster": {"name": cluster.name, "kind": cluster.kind, "peak_flops": peak, "mfu": mfu, "share": cluster.share},
        "layout": asdict(layout),
        "params": {**params, "expert_per_rank": expert_local, "per_rank": local_params},
        "flops": {
            "forward": fwd,
            "train_per_rank": train_flops,
            "train_per_step": train_flops * world,
        },
        "comm": {
            "a2a_bytes": a2a_bytes,
            "selection_bytes": sel_bytes,
            "selection_collectives": sel_collectives,
            "grad_bytes": grad_dense + grad_expert,
        },
        "memory": {
            "weights": weights,
            "grads": grads,
            "optimizer": optimizer,
            "ema": ema,
            "activations": acts,
            "total": mem_total,
            "capacity": capacity,
        },
        "time": {
            "compute_s": compute_s,
            "a2a_s": a2a_s,
            "selection_s": sel_s,
            "grad_allreduce_s": grad_s,
            "optimizer_s": optimizer_s,
            "step_s": step_s,
        },
        "throughput": {
            "images_per_s": images_per_s,
            "tokens_per_s_per_rank": n / step_s,
            "tflops_per_rank": train_flops / step_s / 1e12,
            "mfu": train_flops / step_s / peak,
        },
        "warnings": warnings,
    }


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f} ms"


# ---- printing ----------------------------------------------------------------------------------
def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def _t(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def print_plan(p: dict) -> None:
    lay, par, fl, co, mem, t, th = (p[k] for k in ("layout", "params", "flops", "comm", "memory", "time", "throughput"))
    cl = p["cluster"]
    print(
        f"layout: {lay['world']} ranks = {lay['nodes']} node(s) x {lay['ranks_per_node']}, "
        f"EP {lay['ep']} x EDP {lay['edp']}, "
        f"pool {lay['pool']} ({lay['pool_ranks']} ranks), ZeRO-{lay['zero']}, "
        f"{lay['grad_accum_steps']} micro-batch(es) of {lay['images_per_rank']} images = {lay['tokens_per_rank']} "
        f"tokens per rank" + (", activation checkpointing" if lay["activation_checkpointing"] else "")
    )
    print(
        f"params: total {par['total'] / 1e6:,.1f}M (experts {par['expert'] / 1e6:,.1f}M, predictor "
        f"{par['predictor'] / 1e6:,.1f}M), per rank {par['per_rank'] / 1e6:,.1f}M"
    )
    print(
        f"\nper step, per rank ({cl['name']}: peak {cl['peak_flops'] / 1e12:g} TFLOP/s x mfu {cl['mfu']:g} "
        f"x share {cl['share']:g})"
    )
    rows = [("FLOPs (fwd+bwd)", f"{fl['train_per_rank'] / 1e12:.3f} TFLOP", _t(t["compute_s"]))]
    for k, v in fl["forward"].items():
        if v:
            rows.append((f"  fwd {k}", f"{v / 1e9:.2f} GFLOP", ""))
    rows += [
        ("all-to-all", _gb(co["a2a_bytes"]), _t(t["a2a_s"])),
        (
            "selection",
            f"{co['selection_bytes'] / 1e3:.1f} KB / {co['selection_collectives']} calls",
            _t(t["selection_s"]),
        ),
        ("grad all-reduce", _gb(co["grad_bytes"]), _t(t["grad_allreduce_s"])),
        ("optimizer+EMA", "", _t(t["optimizer_s"])),
        ("step", "", _t(t["step_s"])),
    ]
    for name, amount, time_ in rows:
        print(f"  {name:<28} {amount:>28} {time_:>12}")
    print(
        f"  => {th['images_per_s']:.1f} images/s, {th['tokens_per_s_per_rank']:,.0f} tokens/s per rank, "
        f"{th['tflops_per_rank']:.2f} TFLOP/s per rank (MFU {th['mfu']:.1%})"
    )
    print(
        "\nmemory per rank: "
        + ", ".join(f"{k} {_gb(mem[k])}" for k in ("weights", "grads", "optimizer", "ema", "activations"))
    )
    print(f"  total {_gb(mem['total'])} of {_gb(mem['capacity'])}")
    for w in p["warnings"]:
        print(f"WARNING: {w}")


# ---- measuring this machine --------------------------------------------------------------------
def measure_matmul(dtype_name: str = "fp32", n: int = 1024, seconds: float = 1.5) -> float:
    """FLOP/s of one thread on an n x n x n matmul."""
    import torch

    torch.set_num_threads(1)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def measure_memory_bandwidth(mb: int = 256) -> float:
    import torch

    x = torch.ones(mb * (1 << 20) // 4)
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = max(best, 2 * x.numel() * 4 / (time.perf_counter() - t0))
    return best


def measure_mfu(config: str, nproc: int, peak: float, reps: int = 4) -> float:
    """Achieved fraction of ``peak`` (one thread) for fwd+bwd of the config's *dense* twin on one
    rank's micro-batch: what small GEMMs, LayerNorm, softmax and GELU leave of the matmul peak on
    this CPU. MoE routing, dispatch and communication are not in it (the planner models those)."""
    import torch

    from diffmoe_dist.config import load_config
    from diffmoe_dist.model.build import build_model

    torch.set_num_threads(1)
    cfg = load_config(config, ["moe.router=dense"])
    images = cfg.data.global_batch_size // nproc
    model = build_model(cfg.model, cfg.moe)
    x = torch.randn(images, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    t, y = torch.rand(images), torch.randint(0, cfg.model.num_classes, (images,))
    best = float("inf")
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        model(x, t, y).square().mean().backward()
        best = min(best, time.perf_counter() - t0)
    flops = 3 * sum(forward_flops(cfg, images).values())
    return flops / best / peak


def _torchrun(nproc: int) -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe, "--standalone", f"--nproc-per-node={nproc}"]


def _env() -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MALLOC_MMAP_THRESHOLD_": "4294967296",
        "MALLOC_TRIM_THRESHOLD_": "4294967296",
        "WANDB_MODE": "disabled",
        "DIFFMOE_NO_PROGRESS": "1",
    }


def calibrate(out: str, nproc: int, ep: int, sizes: str, config: str) -> None:
    """Writes a cluster file for this machine: matmul peak per core, memory bandwidth, and gloo's
    all-to-all alpha and bandwidth from tools/a2a_bench.py with ``nproc`` ranks at EP size ``ep``."""
    import torch

    cores = os.cpu_count() or 1
    fp32, bf16 = measure_matmul("fp32"), measure_matmul("bf16")
    mem_bw = measure_memory_bandwidth()
    mfu = measure_mfu(config, nproc, fp32)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = _torchrun(nproc) + [
            os.path.join(REPO, "tools", "a2a_bench.py"),
            "--sizes",
            sizes,
            "--ep-sizes",
            str(ep),
            "--dtype",
            "fp32",
            "--out",
            tmp,
        ]
        subprocess.run(cmd, check=True, env=_env(), cwd=REPO)
        with open(os.path.join(tmp, "a2a_bench.json")) as f:
            bench = json.load(f)
    fit = next(f for f in bench["fits"] if f["ep_size"] == ep)
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 16e9
    doc = {
        "name": "cpu_local",
        "kind": "cpu",
        "nodes": 1,
        "cores_per_node": cores,
        "ranks_per_node": nproc,
        "peak_flops": {"fp32": float(f"{fp32:.4g}"), "bf16": float(f"{bf16:.4g}")},
        "mfu": round(mfu, 3),
        "memory_bytes": float(mem),
        "memory_bandwidth": float(f"{mem_bw:.4g}"),
        "intra_node": {"bandwidth": float(f"{fit['bandwidth']:.4g}"), "latency": float(f"{fit['alpha_s']:.4g}")},
    }
    header = (
        f"# This machine, measured by `python tools/plan.py --calibrate {out} --nproc {nproc}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} (torch {torch.__version__}).\n"
        "# peak_flops: one thread (= one core) on a 1024^3 matmul; memory_bandwidth: a 256 MB copy, one thread.\n"
        f"# intra_node: gloo all_to_all_single fit time = latency + off-rank bytes / bandwidth, {nproc} ranks on\n"
        f"# {cores} cores at EP {ep} (tools/a2a_bench.py), so core sharing is inside the numbers.\n"
        f"# mfu: fraction of the fp32 peak reached by fwd+bwd of the dense twin of {os.path.relpath(config, REPO)}\n"
        "# on one rank's micro-batch, one thread (small GEMMs, LayerNorm, softmax, GELU); MoE routing and\n"
        "# communication are excluded (the planner models them).\n"
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        f.write(header + yaml.safe_dump(doc, sort_keys=False))
    print(f"wrote {out}:\n" + yaml.safe_dump(doc, sort_keys=False))


def measure(config: str, overrides: list[str], world: int, steps: int, warmup: int) -> dict:
    """Trains ``steps`` steps of the config under torchrun with ``world`` ranks; returns the median
    step time after ``warmup`` steps (from metrics.jsonl, logged every step)."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        data = _digits_path(config, overrides, tmp)
        cmd = (
            _torchrun(world)
            + [
                "-m",
                "diffmoe_dist.train.cli",
                "--config",
                config,
                *overrides,
                f"train.run_dir={run_dir}",
                f"train.steps={steps}",
                "train.resume=never",
                "logging.log_every=1",
                "logging.wandb=disabled",
                "checkpoint.every=0",
                "sample.every=0",
                "sample.num_steps=1",
                "sample.per_class=1",
            ]
            + ([f"data.path={data}"] if data else [])
        )
        t0 = time.time()
        proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"plan --measure: training failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    times = sorted(1.0 / r["steps_per_s"] for r in records if r["step"] > warmup)
    if not times:
        raise SystemExit(f"plan --measure: no steps after the {warmup} warm-up steps; raise --measure-steps")
    return {"step_s": times[len(times) // 2], "step_s_min": times[0], "steps": len(times), "wall_s": time.time() - t0}


def _digits_path(config: str, overrides: list[str], tmp: str) -> str | None:
    """The config's data.path if it exists; else fresh digits shards in ``tmp``."""
    from diffmoe_dist.config import load_config

    path = load_config(config, overrides).data.path
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    if os.path.isdir(os.path.join(path, "train")):
        return None
    out = os.path.join(tmp, "digits")
    subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "make_shards.py"), "digits", "--out", out],
        check=True,
        capture_output=True,
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="training config YAML")
    p.add_argument("--cluster", help="cluster YAML (tools/clusters/)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--world", type=int, default=None, help="ranks (default: the cluster's nodes x ranks per node)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: the config's)")
    p.add_argument(
        "--zero",
        type=int,
        choices=(0, 1, 2),
        default=None,
        help="ZeRO stage (DeepSpeed): shard optimizer state (1) and grads (2); default train.zero_stage",
    )
    p.add_argument(
        "--imbalance", type=float, default=1.0, help="slowest EP rank's load / mean (routing.jsonl ep_imbalance)"
    )
    p.add_argument("--mfu", type=float, default=None, help="override the cluster's assumed MFU")
    p.add_argument("--json", default=None, help="write the plan (and measurement) here")
    p.add_argument("--measure", action="store_true", help="also train the config locally under torchrun and compare")
    p.add_argument("--measure-steps", type=int, default=12)
    p.add_argument("--measure-warmup", type=int, default=4)
    p.add_argument("--calibrate", metavar="OUT", default=None, help="measure this machine into a cluster YAML")
    p.add_argument("--nproc", type=int, default=4, help="--calibrate: ranks for the all-to-all bench")
    p.add_argument("--calibrate-ep", type=int, default=2)
    p.add_argument("--calibrate-sizes", default="64K,256K,1M,4M")
    args = p.parse_args(argv)
    if args.calibrate:
        calibrate(args.calibrate, args.nproc, args.calibrate_ep, args.calibrate_sizes, args.config or LOCAL_CONFIG)
        return 0
    if not args.config or not args.cluster:
        p.error("--config and --cluster are required (or --calibrate OUT)")
    from diffmoe_dist.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2
    cluster = load_cluster(args.cluster)
    world = args.world or cluster.nodes * cluster.ranks_per_node
    ep = args.ep or cfg.parallel.expert_parallel_size
    try:
        cfg.validate(world_size=world)
    except ConfigError as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2
    result = plan(cfg, cluster, world, ep, args.zero, args.imbalance, args.mfu)
    print(f"plan: {args.config} on {args.cluster}")
    print_plan(result)
    if args.measure:
        overrides = [*args.overrides, f"parallel.expert_parallel_size={ep}"]
        load = os.getloadavg()[0]
        print(f"\nmeasuring: {world} ranks under torchrun, {args.measure_steps} steps ...", flush=True)
        measured = measure(args.config, overrides, world, args.measure_steps, args.measure_warmup)
        measured["load_avg_before"] = load
        predicted = result["time"]["step_s"]
        ratio = predicted / measured["step_s"]
        result["measured"] = {**measured, "predicted_step_s": predicted, "ratio": ratio}
        print(
            f"step time: predicted {predicted:.3f} s, measured {measured['step_s']:.3f} s (median of "
            f"{measured['steps']}, min {measured['step_s_min']:.3f} s): predicted/measured = {ratio:.2f}"
        )
        cores = os.cpu_count() or 1
        if load > 0.5 * cores:  # the 1-minute load average before our ranks started: other work
            print(
                f"WARNING: load average {load:.1f} on {cores} cores before measuring: other processes took "
                "cores the plan gives to these ranks, so the measured step is inflated; re-measure on a quiet machine"
            )
        if not 1 / 1.5 <= ratio <= 1.5:
            print("WARNING: prediction and measurement differ by more than 1.5x")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
