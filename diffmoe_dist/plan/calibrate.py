"""Describe this CPU machine for the planner from microbenchmarks, never from training steps:

- per rank count W, W gloo processes side by side (one thread each, as torchrun runs them): the
  fp32 / bf16 matmul FLOPs one rank does per CPU-second while all W multiply at once, times the
  share of a core a rank gets, ``min(1, cores / W)`` (4 ranks on 2 cores: half a core each); CPU
  time, not wall time, so other processes loading the cores do not enter the description; and
  gloo's all-reduce and all-to-all on loopback, fitted as ``time = alpha + bytes / bandwidth``;
- one process, one thread, in CPU seconds: a core's matmul peak, the fraction of it that fwd + bwd
  of the config's *dense* twin reaches on one rank's micro-batch (small GEMMs, LayerNorm, softmax,
  GELU), and the memory bandwidth of a large copy (the optimizer's bound).

The result is a cluster YAML (`diffmoe_dist.plan.cluster.load_cluster`).
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import torch.distributed as dist
import yaml

from diffmoe_dist.parallel.spawn import run_ranks
from diffmoe_dist.train import flops

SIZES = (256 * 1024, 4 * 1024 * 1024, 16 * 1024 * 1024)  # bytes per rank


def _fit(points: list[tuple[float, float]]) -> dict[str, float]:
    """Least squares ``t = alpha + x / bandwidth`` over (bytes, seconds)."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / max(sum((x - mx) ** 2 for x, _ in points), 1e-30)
    slope = max(slope, 1e-11)  # noise can flatten the fit: cap the bandwidth at 100 GB/s
    return {"bandwidth": float(f"{1 / slope:.4g}"), "latency": float(f"{max(my - slope * mx, 1e-6):.4g}")}


def _timed(fn, iters: int) -> float:
    times = []
    for _ in range(iters + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def _per_cpu_second(dtype: torch.dtype, n: int = 512, seconds: float = 2.0) -> float:
    """Matmul FLOPs per CPU-second of this rank while every rank multiplies at once: what a core
    does for one rank with the others beside it (shared caches, memory), free of how the scheduler
    splits the cores (other processes' load, or more ranks than cores: the planner applies the
    share ``min(1, cores / (ranks x threads))`` itself)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.rand(n, n, generator=gen).to(dtype) for _ in range(2))
    out = torch.empty(n, n, dtype=dtype)
    torch.mm(a, b, out=out)
    if dist.is_initialized():
        dist.barrier()
    done, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b, out=out)
        done += 1
    return 2 * n**3 * done / max(time.process_time() - c0, 1e-9)


def _side_by_side_rank(rank: int, world: int, sizes, iters: int) -> dict:
    peak = torch.tensor([_per_cpu_second(torch.float32), _per_cpu_second(torch.bfloat16)], dtype=torch.float64)
    dist.all_reduce(peak)  # the mean rank: every rank computes in the trainer
    share = min(1.0, (os.cpu_count() or 1) / world)  # one thread per rank
    ar, a2a = [], []
    for nbytes in sizes:
        x = torch.ones(nbytes // 4)
        ar.append((nbytes, _timed(lambda x=x: dist.all_reduce(x), iters)))
        out = torch.empty_like(x[: x.numel() // world * world])
        inp = x[: out.numel()]
        a2a.append(
            (
                inp.numel() * 4 * (world - 1) / world,
                _timed(lambda i=inp, o=out: dist.all_to_all_single(o, i), iters),
            )
        )
    return {
        "rank_peak_flops": {
            "fp32": float(f"{peak[0] / world * share:.4g}"),
            "bf16": float(f"{peak[1] / world * share:.4g}"),
        },
        "collectives": {"all_reduce": _fit(ar), "all_to_all": _fit(a2a)},
    }


def side_by_side(world: int, sizes=SIZES, iters: int = 5) -> dict:
    """Matmul peak per rank and gloo's fits with ``world`` processes running at once (rank 0's
    figures: the peak is the mean over ranks)."""
    return run_ranks(_side_by_side_rank, world, sizes, iters)[0]


def memory_bandwidth(mb: int = 256) -> float:
    x = torch.ones(mb * (1 << 20) // 4)
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = max(best, 2 * x.numel() * 4 / (time.perf_counter() - t0))
    return best


def compute_efficiency(cfg, images: int, peak: float, reps: int = 3) -> float:
    """Fraction of ``peak`` (one thread) reached by fwd + bwd of the config's dense twin on
    ``images`` images, one thread: what small GEMMs and the elementwise work leave of the matmul
    peak. MoE routing, dispatch and communication are not in it (the planner prices those)."""
    import copy

    from diffmoe_dist.model.build import build_model

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    dense = copy.deepcopy(cfg)
    dense.moe.router = "dense"
    m = dense.model
    model = build_model(m, dense.moe).train()
    x = torch.randn(images, m.in_channels, m.image_size, m.image_size)
    cond = {"y": torch.randint(0, m.num_classes, (images,))}
    if m.task == "t2i":
        cond = {"text": torch.randn(images, m.text_len, m.text_dim), "text_mask": torch.ones(images, m.text_len).bool()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    best = float("inf")
    for _ in range(reps + 1):  # CPU seconds, as the peak: other processes on the cores do not enter
        t0 = time.process_time()
        with autocast:
            out = model(x, torch.rand(images), **cond)
        out.float().square().mean().backward()
        best = min(best, time.process_time() - t0)
    torch.set_num_threads(before)
    return flops.train_flops(dense, images) / best / peak


def calibrate(cfg, ranks=(2, 4), images: int | None = None, log=print) -> dict:
    """The cluster description of this machine (a dict in the cluster YAML's fields)."""
    cores = os.cpu_count() or 1
    prec = "bf16" if cfg.train.precision == "bf16" else "fp32"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    core_peak = {"fp32": _per_cpu_second(torch.float32, 1024), "bf16": _per_cpu_second(torch.bfloat16, 1024)}
    torch.set_num_threads(before)
    images = images or max(1, cfg.data.global_batch_size // max(ranks))
    eff = compute_efficiency(cfg, images, core_peak[prec])
    log(f"calibrate: core peak fp32 {core_peak['fp32'] / 1e9:.1f} GFLOP/s, dense-twin efficiency {eff:.3f}")
    per_ranks = {}
    for w in ranks:
        per_ranks[w] = side_by_side(w)
        log(f"calibrate: {w} ranks side by side: {per_ranks[w]}")
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        mem = 16e9
    return {
        "name": "cpu_local",
        "kind": "cpu",
        "nodes": 1,
        "cores_per_node": cores,
        "peak_flops": {k: float(f"{v:.4g}") for k, v in core_peak.items()},
        "compute_efficiency": round(eff, 3),
        "memory_bytes": float(mem),
        "memory_bandwidth": float(f"{memory_bandwidth():.4g}"),
        "intra_node": dict(per_ranks[min(ranks)]["collectives"]["all_to_all"]),
        "rank_peak_flops": {w: r["rank_peak_flops"] for w, r in per_ranks.items()},
        "collectives": {w: r["collectives"] for w, r in per_ranks.items()},
    }


def write_cluster(doc: dict, path: str, command: str) -> None:
    header = (
        f"# This machine, measured by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} (torch {torch.__version__}).\n"
        "# Microbenchmarks only (diffmoe_dist/plan/calibrate.py), never training steps, in CPU seconds so\n"
        "# that other processes on the cores stay out: peak_flops is one core's 1024^3 matmul; per rank count\n"
        "# W, with W gloo processes (one thread each) running at once, rank_peak_flops is one rank's matmul\n"
        "# FLOPs per CPU-second times its core share min(1, cores / W), and collectives gloo's all_reduce /\n"
        "# all_to_all_single on loopback fitted as time = latency + bytes / bandwidth (wall clock);\n"
        "# compute_efficiency is fwd+bwd of the config's dense twin (one process, one thread) / peak.\n"
    )
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(header + yaml.safe_dump(doc, sort_keys=False))
