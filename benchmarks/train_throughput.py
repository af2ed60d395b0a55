"""Training-step throughput on CPU: images/s, tokens/s, achieved FLOP/s and MFU, with a breakdown.

Times the real ``Trainer.train_step()`` (data, forward, backward, gradient reduction, clipping,
AdamW, EMA, metrics; no copy of it here) of dense and DiffMoE models at the tiny (digits, 16x16x1, 64 tokens/image)
and S (ImageNet-256 latents, 32x32x4, 256 tokens/image) sizes, on 1 process with T threads and on
P gloo processes with T/P threads each and the same global batch (DiffMoE at P > 1 uses expert
parallel size P, pool ``dp``). Per row:

- step time: median over timed steps after warm-up (P > 1: a barrier before each step, the
  slowest rank's time); images/s and tokens/s of the global batch;
- FLOPs per step: counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` around one
  real ``train_step`` on every rank, summed over ranks (``diffmoe_dist.train.flops.flop_counter``,
  which registers torch's SDPA formulas for the CPU flash-attention ops torch 2.13 leaves out).
  It counts the matmuls that execute (linear, bmm/baddbmm, conv, SDPA; the capacity predictor's
  weight-only backward on its detached input included). Each row also carries the project's count
  from the architecture (``diffmoe_dist.train.flops``, the one the trainer's MFU and the planner
  use) and their ratio;
- MFU = achieved FLOP/s / the machine's matmul peak, measured in the same run before the models:
  the median FLOP/s of a square ``n^3`` matmul (fp32; bf16 too with ``--precision bf16``) in this
  process at 1 thread and at T threads. For P processes x T/P threads the peak is the one measured
  at the total thread count T in one process (the cores the row uses); ``peak_1thread`` x T is in
  the JSON for those who prefer the sum of per-core peaks;
- util: CPU time / (wall x threads), summed over ranks; well below 1 means the threads waited
  (for each other, for gloo, or for other processes on the cores).

Breakdown, rank 0: (1) phases of the real step, ``Trainer.train_step(timer=PhaseTimer(...))``:
data, forward, backward, optimizer (``engine.step``: the gradient reduction left after backward,
clipping, AdamW), EMA, metrics; their total is reported next to the same step's wall time measured
around the call; (2) a ``torch.profiler`` split of one real
``train_step`` into operator categories (matmul, attention, elementwise, MoE index/scatter,
copy/layout, communication, other ops, untracked Python), as fractions of the profiled step.

The benchmark re-executes itself with ``MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=4 GiB``
(glibc otherwise maps every block over 32 MB afresh and page-faults it in, docs/design.md section 4)
unless ``--default-malloc``; worker processes inherit the setting.

    .venv/bin/python benchmarks/train_throughput.py --out benchmarks/results/train_throughput.json  # ~10 min
    .venv/bin/python benchmarks/train_throughput.py --quick                                       # smoke run
    .venv/bin/python benchmarks/train_throughput.py --configs diffmoe-S --procs 1 --steps 2
    .venv/bin/python benchmarks/train_throughput.py --configs dense-S,diffmoe-S --precision bf16
    python benchmarks/train_throughput.py --device cuda --procs 1 --precision bf16 --configs dense-S,diffmoe-S

``--device cuda`` (one process, one GPU): the same rows on the GPU, timed with a CUDA synchronise around
each step, MFU against the bf16 / fp32 matmul peak measured on that GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks._table import Column, header, line, percent  # noqa: E402
from diffmoe_dist.config import Config, load_config  # noqa: E402
from diffmoe_dist.data.digits import write_digits_shards  # noqa: E402
from diffmoe_dist.parallel.spawn import run_ranks  # noqa: E402
from diffmoe_dist.train import flops  # noqa: E402
from diffmoe_dist.train.allocator import TUNED_MALLOC, ensure_malloc  # noqa: E402
from diffmoe_dist.train.metrics import PhaseTimer  # noqa: E402

CONFIGS = {
    "dense-tiny": "configs/local/dense-tiny.yaml",
    "diffmoe-tiny": "configs/local/diffmoe-tiny.yaml",
    "dense-S": "configs/c2i/dense-S.yaml",
    "diffmoe-S": "configs/c2i/diffmoe-S-E16.yaml",
}
QUICK_CONFIGS = ("dense-tiny", "diffmoe-tiny")
# Global batches that fit 2 cores in a few seconds per step: tiny as configured (128 images =
# 8192 tokens), S 16 images = 4096 tokens (the configs' 256 would take ~2 min per step here).
DEFAULT_BATCH = {"tiny": 128, "S": 16}
QUICK_BATCH = 32
PHASES = ("data", "forward", "backward", "optimizer", "ema", "metrics")  # Trainer.train_step(timer=...)
CATEGORIES = ("matmul", "attention", "elementwise", "moe_index", "copy", "comm", "other_ops", "python")


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)} (default all; quick tiny)")
    p.add_argument("--procs", default="1,2", help="comma list of process counts, e.g. 1,2")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="total threads; each of P processes gets T/P")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "config"), help="config: train.precision")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default tiny 5, S 3; quick 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default tiny 2, S 1; quick 1)")
    p.add_argument("--breakdown-steps", type=int, default=None, help="phase-timed steps (default 2; quick 1)")
    p.add_argument("--global-batch", type=int, default=None, help="images per step for every config")
    p.add_argument("--peak-size", type=int, default=None, help="square matmul size for the peak (default 2048)")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler operator split")
    p.add_argument("--quick", action="store_true", help="tiny configs, batch 32, 1 warm-up + 2 steps: a smoke run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: one process on GPU 0")
    p.add_argument(
        "--compile",
        default="config",
        choices=("config", "off", "on", "both"),
        help="train.compile per row; both: each row eager and compiled, side by side (speed-up and compile time)",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's default mmap/trim thresholds")
    p.add_argument("overrides", nargs="*", help="config overrides for every row, e.g. optim.adamw_impl=fused")
    args = p.parse_args(argv)
    args.configs = args.configs.split(",") if args.configs else list(QUICK_CONFIGS if args.quick else CONFIGS)
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; choose from {', '.join(CONFIGS)}")
    args.procs = [int(v) for v in args.procs.split(",")]
    bad = [n for n in args.procs if n < 1 or args.threads % n]
    if bad:
        p.error(f"--procs={bad} is invalid: each count must divide --threads={args.threads}")
    if args.device == "cuda" and args.procs != [1]:
        p.error(f"--procs={args.procs} is invalid with --device cuda: use --procs 1 (one GPU)")
    if args.breakdown_steps is None:
        args.breakdown_steps = 1 if args.quick else 2
    args.peak_size = args.peak_size or (1024 if args.quick else 2048)
    return args


# ---------------------------------------------------------------------------------------------
# Matmul peak and machine


def matmul_peak(dtype: torch.dtype, n: int, threads: int, device: str = "cpu") -> float:
    """Median FLOP/s of an ``n^3`` matmul at ``threads`` threads (diffmoe_dist.train.flops)."""
    return flops.matmul_peak(dtype, n, threads, device=device)


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------
# FLOPs: torch's counter (with the CPU flash-attention ops registered) and the project's count


def analytic_flops(cfg: Config, global_batch: int, procs: int) -> float:
    """Matmul FLOPs of one training step over all ranks from the architecture
    (`diffmoe_dist.train.flops`, the count the trainer's MFU and the planner use)."""
    images = global_batch // (procs * cfg.optim.grad_accum_steps)
    per_rank = flops.train_flops(cfg, images, flops.pool_ranks(cfg, procs))
    return procs * cfg.optim.grad_accum_steps * per_rank


# ---------------------------------------------------------------------------------------------
# Operator categories of a torch.profiler trace

MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "addbmm", "einsum", "conv2d", "convolution"}
MATMUL_OPS |= {"_convolution", "convolution_backward", "mkldnn_convolution", "_mkldnn_convolution"}
INDEX_OPS = {"scatter", "scatter_add", "gather", "nonzero", "topk", "sort", "argsort", "bincount", "cumsum"}
INDEX_OPS |= {"searchsorted", "kthvalue", "embedding", "embedding_dense_backward", "masked_select", "take"}
INDEX_OPS |= {"unique", "_unique2", "msort", "histc", "masked_scatter", "repeat_interleave"}
COPY_OPS = {"copy", "clone", "cat", "stack", "contiguous", "_to_copy", "to", "zeros", "zeros_like", "empty"}
COPY_OPS |= {"empty_like", "empty_strided", "fill", "zero", "ones", "ones_like", "full", "full_like", "new_zeros"}
COPY_OPS |= {"new_empty", "new_empty_strided", "new_full", "resize", "as_strided", "view", "reshape", "permute"}
COPY_OPS |= {"_reshape_alias", "transpose", "t", "expand", "unsqueeze", "squeeze", "select", "slice", "split"}
COPY_OPS |= {"unbind", "chunk", "narrow", "detach", "alias", "flatten", "unflatten", "split_with_sizes"}
COPY_OPS |= {"_unsafe_view", "lift_fresh"}
COMM_WORDS = ("gloo", "c10d", "all_reduce", "allreduce", "all_to_all", "alltoall", "all_gather", "allgather")
COMM_WORDS += ("broadcast", "barrier", "reduce_scatter", "record_param_comms")


def op_category(name: str) -> str:
    low = name.lower()
    if any(w in low for w in COMM_WORDS):
        return "comm"
    if not name.startswith("aten::"):
        return "other_ops"  # autograd node wrappers, Optimizer.step records and the like
    op = name[len("aten::") :]
    base = op.rstrip("_") if op.endswith("_") and not op.startswith("_") else op
    if base in MATMUL_OPS:
        return "matmul"
    if "scaled_dot_product" in op or "attention" in op:
        return "attention"
    if base.startswith("index") or base.startswith("_index") or base in INDEX_OPS:
        return "moe_index"
    if base in COPY_OPS:
        return "copy"
    return "elementwise"  # pointwise math, norms, softmax, activations, reductions, AdamW, EMA lerp


def profile_split(run_step) -> dict:
    """Runs ``run_step`` once under torch.profiler; returns the fraction of its wall time per
    category. Self times of the ops on the step's own thread are disjoint and add up to the step,
    the step's own self time being Python and framework work outside any op ("python"). gloo runs
    collectives on its own threads while the caller blocks outside any op (the caller's c10d ops
    only enqueue them): the duration of those events, at most the untracked time, is moved from
    "python" to "comm" (an upper bound of the waiting: a gloo event may also overlap compute)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("bench::train_step"):
            run_step()
    events = list(prof.events())
    step = next(e for e in events if e.name == "bench::train_step")
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    gloo_s = 0.0
    for e in events:
        if e is step:
            continue
        if e.thread == step.thread:
            seconds[op_category(e.name)] += e.self_cpu_time_total / 1e6
        elif op_category(e.name) == "comm" and e.cpu_parent is None:
            gloo_s += e.cpu_time_total / 1e6
    wall = step.cpu_time_total / 1e6
    untracked = max(0.0, wall - sum(seconds.values()))
    seconds["comm"] += min(gloo_s, untracked)
    seconds["python"] = untracked - min(gloo_s, untracked)
    total = sum(seconds.values())  # = wall, up to the profiler's microsecond rounding
    return {"step_s": wall, "fractions": {k: v / total for k, v in seconds.items()}}


# ---------------------------------------------------------------------------------------------
# One row: P processes running Trainer.train_step


@dataclass
class RowSpec:
    name: str
    config_path: str
    overrides: list[str]
    procs: int
    threads: int  # per process
    warmup: int
    steps: int
    breakdown_steps: int
    profile: bool
    global_batch: int
    extra: dict = field(default_factory=dict)
    device: str = "cpu"


def _sum_over_ranks(values: list[float], distributed: bool, op=None) -> list[float]:
    if not distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def _measure(rank: int, world_size: int, spec: RowSpec) -> dict:
    from diffmoe_dist.train.trainer import Trainer

    distributed = spec.procs > 1
    cfg = load_config(spec.config_path, spec.overrides).validate(world_size=spec.procs)
    dims = None
    if distributed:
        from diffmoe_dist.parallel.groups import build_parallel_dims

        dims = build_parallel_dims(cfg.parallel.expert_parallel_size, cfg.moe.num_experts)
    if spec.device == "cuda":
        torch.cuda.set_device(0)
    trainer = Trainer(cfg, dims, torch.device(spec.device), local_world_size=spec.procs)

    def barrier() -> None:
        flops.synchronize(torch.device(spec.device))  # kernels are asynchronous: time what ran, not what launched
        if distributed:
            dist.barrier()

    first_step_s = None  # the first step's wall time: with train.compile it holds the compilation
    for i in range(spec.warmup):
        w0 = time.perf_counter()
        trainer.train_step()
        if i == 0:
            flops.synchronize(torch.device(spec.device))
            first_step_s = time.perf_counter() - w0
    wall, cpu, losses, grad_norms = [], [], [], []
    for _ in range(spec.steps):
        barrier()
        c0, w0 = time.process_time(), time.perf_counter()
        metrics = trainer.train_step()
        losses.append(metrics["loss"])  # the step's one host read, which also brings the gradient norm
        grad_norms.append(metrics["grad_norm"])
        flops.synchronize(torch.device(spec.device))
        w, c = time.perf_counter() - w0, time.process_time() - c0
        w_max = _sum_over_ranks([w], distributed, dist.ReduceOp.MAX if distributed else None)[0]
        wall.append(w_max)
        cpu.append(_sum_over_ranks([c], distributed)[0])
    # Counted on every rank (each computes its own share: its micro-batch, its experts), summed.
    with flops.flop_counter() as counter:
        trainer.train_step()
    counted = int(_sum_over_ranks([float(counter.get_total_flops())], distributed)[0])
    phases, phase_walls = [], []
    for _ in range(spec.breakdown_steps):
        barrier()
        timer = PhaseTimer(spec.device)
        w0 = time.perf_counter()
        trainer.train_step(timer=timer)
        flops.synchronize(torch.device(spec.device))
        phase_walls.append(time.perf_counter() - w0)
        phases.append(timer.seconds)
    profile = None
    if spec.profile:
        barrier()
        profile = profile_split(trainer.train_step)
    out = {
        "rank": rank,
        "seconds": wall,
        "cpu_seconds": cpu,
        "loss": losses,
        "grad_norm": grad_norms,
        "flops_counted": counted,
        "flops_analytic": analytic_flops(cfg, spec.global_batch, spec.procs),
        "phases_s": {p: statistics.median(s.get(p, 0.0) for s in phases) for p in PHASES} if phases else None,
        "phase_step_wall_s": statistics.median(phase_walls) if phase_walls else None,
        "profile": profile,
        "ep_size": trainer.dims.ep_size,
        "threads_set": torch.get_num_threads(),
        "engine": type(trainer.engine).__name__,
        "deterministic": cfg.train.deterministic,
        "compile": cfg.train.compile,
        "first_step_s": first_step_s,
    }
    return out


def run_row(spec: RowSpec) -> dict:
    """Spawns ``spec.procs`` fresh processes (also for one: every row starts from the same clean
    state: thread pool, allocator, no earlier model in memory); returns rank 0's measurements."""
    return run_ranks(_measure, spec.procs, spec, threads=spec.threads, init_process_group=spec.procs > 1)[0]


# ---------------------------------------------------------------------------------------------
# Data for the runs


def _tiny_data(tmp: Path) -> str:
    """The digits shards of the tiny configs: data/digits when it exists, else made into ``tmp``
    by the package's `write_digits_shards` (as tools/make_shards.py and the tests do)."""
    repo_digits = REPO / "data" / "digits"
    if (repo_digits / "train" / "manifest.json").is_file():
        return str(repo_digits)
    out = tmp / "digits"
    if not (out / "train" / "manifest.json").is_file():
        write_digits_shards(out)
    return str(out)


def _synthetic_latents(tmp: Path, cfg: Config, num_samples: int) -> str:
    """Random latents of the config's shape (ImageNet latents are not here; throughput does not
    depend on the values), written with the project's shard writer."""
    from diffmoe_dist.data.shards import write_shards

    m = cfg.model
    shape = (m.in_channels, m.image_size, m.image_size)
    out = tmp / f"latents-{'x'.join(map(str, shape))}-{m.num_classes}"
    if (out / "train" / "manifest.json").is_file():
        return str(out)
    rng = np.random.default_rng(0)
    samples = (
        {
            "__key__": f"train-{i:06d}",
            "latent.npy": rng.standard_normal(shape, dtype=np.float32),
            "cls": int(rng.integers(m.num_classes)),
        }
        for i in range(num_samples)
    )
    write_shards(out / "train", samples, samples_per_shard=64, created_by="benchmarks/train_throughput.py")
    return str(out)


def build_specs(args: argparse.Namespace, tmp: Path) -> list[RowSpec]:
    specs = []
    for name in args.configs:
        path = str(REPO / CONFIGS[name])
        cfg = load_config(path)
        size = "tiny" if cfg.model.size == "tiny" else "S"
        batch = args.global_batch or (QUICK_BATCH if args.quick else DEFAULT_BATCH[size])
        if size == "tiny":
            data = _tiny_data(tmp)
        else:
            data = _synthetic_latents(tmp, cfg, num_samples=max(64, 2 * batch))
        warmup = args.warmup if args.warmup is not None else (1 if args.quick or size == "S" else 2)
        steps = args.steps if args.steps is not None else (2 if args.quick else (5 if size == "tiny" else 3))
        precision = cfg.train.precision if args.precision == "config" else args.precision
        compiles = {"config": [None], "off": [False], "on": [True], "both": [False, True]}[args.compile]
        for procs, compiled in ((p, c) for p in args.procs for c in compiles):
            moe = cfg.moe.router != "dense"
            ep = procs if moe and cfg.moe.num_experts % procs == 0 else 1
            threads = args.threads // procs
            overrides = [
                f"data.path={data}",
                "data.loader=indexed",  # the trainer loads shards whole either way
                f"data.global_batch_size={batch}",
                f"train.run_dir={tmp / f'run-{name}-{procs}-{compiled}'}",
                *([] if compiled is None else [f"train.compile={str(compiled).lower()}"]),
                f"train.precision={precision}",
                f"train.threads={threads}",
                f"train.steps={warmup + steps + args.breakdown_steps + 10}",
                "train.resume=never",
                "logging.wandb=disabled",
                "checkpoint.every=0",
                "sample.every=0",
                f"parallel.expert_parallel_size={ep}",
                *args.overrides,
            ]
            specs.append(
                RowSpec(
                    name=name,
                    config_path=path,
                    overrides=overrides,
                    procs=procs,
                    threads=threads,
                    warmup=warmup,
                    steps=steps,
                    breakdown_steps=args.breakdown_steps,
                    profile=not args.no_profile,
                    global_batch=batch,
                    extra={"precision": precision, "tokens_per_image": cfg.model.tokens_per_image},
                    device=args.device,
                )
            )
    return specs


# ---------------------------------------------------------------------------------------------
# The run


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    precisions = ["fp32"] + (["bf16"] if args.precision in ("bf16", "config") else [])
    thread_counts = sorted({1, *(args.threads // p * p for p in args.procs), args.threads})
    # Before any model: the peak of this machine now, under the same load as the rows below.
    peaks = {
        prec: {t: matmul_peak(dtypes[prec], args.peak_size, t, device=args.device) for t in thread_counts}
        for prec in precisions
    }
    print(
        f"matmul peak (GFLOP/s, n={args.peak_size}): "
        + "; ".join(f"{p} " + ", ".join(f"{t} thr {v / 1e9:.0f}" for t, v in d.items()) for p, d in peaks.items()),
        file=sys.stderr,
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="train_throughput-") as tmp:
        for spec in build_specs(args, Path(tmp)):
            precision = spec.extra["precision"]
            row = {
                "config": spec.name,
                "config_path": os.path.relpath(spec.config_path, REPO),
                "procs": spec.procs,
                "threads": spec.threads,
                "precision": precision,
                "global_batch": spec.global_batch,
                "tokens_per_image": spec.extra["tokens_per_image"],
                "warmup": spec.warmup,
                "steps": spec.steps,
                "compile_requested": args.compile,
            }
            t0 = time.perf_counter()
            try:
                m = run_row(spec)
            except Exception as exc:  # one failing row is reported, the others still run
                print(str(exc), file=sys.stderr)
                row["error"] = (str(exc).strip().splitlines() or ["?"])[-1][:200]
                rows.append(row)
                continue
            sec = statistics.median(m["seconds"])
            total_threads = spec.procs * spec.threads
            peak = peaks["bf16" if precision == "bf16" else "fp32"][total_threads]
            achieved = m["flops_counted"] / sec
            row.update(
                ep_size=m["ep_size"],
                engine=m["engine"],
                deterministic=m["deterministic"],
                step_s=sec,
                step_s_all=m["seconds"],
                images_per_s=spec.global_batch / sec,
                tokens_per_s=spec.global_batch * spec.extra["tokens_per_image"] / sec,
                flops_per_step=m["flops_counted"],
                flops_per_image=m["flops_counted"] / spec.global_batch,
                flops_analytic=m["flops_analytic"],
                flops_counted_over_analytic=m["flops_counted"] / m["flops_analytic"],
                achieved_flops=achieved,
                peak_flops=peak,
                peak_1thread_x_threads=peaks["bf16" if precision == "bf16" else "fp32"][1] * total_threads,
                mfu=achieved / peak,
                cpu_utilisation=statistics.median(c / w for c, w in zip(m["cpu_seconds"], m["seconds"]))
                / total_threads,
                loss=m["loss"],
                grad_norm=m["grad_norm"],
                compile=m["compile"],
                first_step_s=m["first_step_s"],
                seconds_in_row=time.perf_counter() - t0,
            )
            if m["phases_s"] is not None:
                total = sum(m["phases_s"].values())
                row["breakdown_s"] = m["phases_s"]
                row["breakdown_total_s"] = total
                row["breakdown_fractions"] = {p: s / total for p, s in m["phases_s"].items()}
                row["breakdown_step_wall_s"] = m["phase_step_wall_s"]
            if m["profile"] is not None:
                row["profile_step_s"] = m["profile"]["step_s"]
                row["profile_fractions"] = m["profile"]["fractions"]
            rows.append(row)
            print(_format_row(row), file=sys.stderr, flush=True)
    return {
        "benchmark": "train_throughput",
        "machine": machine_info(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "malloc": "default" if args.default_malloc else "tuned",
        "env": {k: os.environ.get(k) for k in TUNED_MALLOC},
        "threads": args.threads,
        "quick": args.quick,
        "overrides": args.overrides,
        "peak_matmul_size": args.peak_size,
        "matmul_peak_flops": {p: {str(t): v for t, v in d.items()} for p, d in peaks.items()},
        "peak_choice": "MFU divides by the square-matmul FLOP/s measured in one process at the row's total threads",
        "flops_note": "executed matmul FLOPs counted by FlopCounterMode around one train_step, summed over ranks",
        "rows": rows,
    }


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    Column("config", "<13", lambda r: r["config"] + ("+compile" if r.get("compile") else "")),
    Column("P", ">2", "procs"),
    Column("thr", ">3", "threads"),
    Column("prec", "<5", "precision"),
    Column("batch", ">5", "global_batch"),
    Column("step s", ">8.3f", "step_s"),
    Column("img/s", ">8.1f", "images_per_s"),
    Column("tok/s", ">9.0f", "tokens_per_s"),
    Column("GFLOP/st", ">9.1f", lambda r: r["flops_per_step"] / 1e9),
    Column("GFLOP/img", ">9.3f", lambda r: r["flops_per_image"] / 1e9),
    Column("GFLOP/s", ">8.1f", lambda r: r["achieved_flops"] / 1e9),
    Column("MFU", ">6", percent("mfu")),
    Column("util", ">5.2f", "cpu_utilisation"),
)
ROW = (Column("config", "<13", "config"), Column("P", ">2", "procs"))
BREAKDOWN = (
    *ROW,
    *(Column(p[:8], ">8", percent("breakdown_fractions", p)) for p in PHASES),
    Column("phases s", ">8.3f", "breakdown_total_s"),
    Column("wall s", ">7.3f", "breakdown_step_wall_s"),
)
PROFILE = (
    *ROW,
    *(Column(c[:9], ">9", percent("profile_fractions", c)) for c in CATEGORIES),
    Column("prof s", ">7.3f", "profile_step_s"),
)
BREAKDOWNS = (  # (title, the rows' key, columns)
    (
        "Where the time goes, rank 0: phases of the step (% of the phase-timed step; phases s vs its wall s)",
        "breakdown_fractions",
        BREAKDOWN,
    ),
    (
        "Operator categories, rank 0, one profiled step (% of its wall time; python = outside any op)",
        "profile_fractions",
        PROFILE,
    ),
)


def _format_row(r: dict) -> str:
    return line(r, COLUMNS, keys=5)


def print_report(res: dict) -> None:
    peaks = "; ".join(
        f"{p}: " + ", ".join(f"{t} thr {v / 1e9:.0f}" for t, v in d.items())
        for p, d in res["matmul_peak_flops"].items()
    )
    m = res["machine"]
    print(
        f"Training step throughput, {m['cpu_count']} cores, torch {m['torch']}, malloc {res['malloc']}"
        f"{', overrides ' + ' '.join(res['overrides']) if res['overrides'] else ''}; "
        f"matmul peak GFLOP/s (n={res['peak_matmul_size']}): {peaks}\n"
        "(step s = median over timed steps, slowest rank; GFLOP = matmul FLOPs counted by FlopCounterMode;\n"
        " MFU = GFLOP/s / peak at the row's total threads; util = CPU time / (wall x threads))"
    )
    print(header(COLUMNS))
    for r in res["rows"]:
        print(_format_row(r))
    rows = [r for r in res["rows"] if "error" not in r]
    for title, key, columns in BREAKDOWNS:
        if any(key in r for r in rows):
            print(f"\n{title}")
            print(header(columns))
            for r in rows:
                if key in r:
                    print(line(r, columns))
    checks = ", ".join(f"{r['config']} P{r['procs']} {r['flops_counted_over_analytic']:.4f}" for r in rows)
    if checks:
        print(f"\nFLOPs counted / analytic: {checks}")
    for r in rows:  # --compile both: the compiled row after its eager twin
        eager = [e for e in rows if (e["config"], e["procs"], e["compile"]) == (r["config"], r["procs"], False)]
        if r["compile"] and eager:
            e = eager[0]
            print(
                f"compile {r['config']} P{r['procs']}: steps/s compiled / eager {e['step_s'] / r['step_s']:.2f}x "
                f"({r['step_s']:.3f} s vs {e['step_s']:.3f} s per step); first step {r['first_step_s']:.1f} s "
                f"compiled vs {e['first_step_s']:.1f} s eager "
                f"(compilation ~{r['first_step_s'] - e['first_step_s']:.0f} s)"
            )
    target = [r for r in rows if r["config"] == "diffmoe-S" and r["procs"] == 1]
    for r in target:
        verdict = "met" if r["mfu"] >= 0.5 else "below target"
        print(f"DiffMoE S-E16, 1 process: MFU {100 * r['mfu']:.1f}% of the measured peak (target >= 50%: {verdict})")
        if r["mfu"] < 0.5 and "profile_fractions" in r:
            top = sorted(r["profile_fractions"].items(), key=lambda kv: -kv[1])[:4]
            print("  largest shares: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in top))


def _write(out: str | None, payload: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=2))
        print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    ensure_malloc(tuned=not args.default_malloc)
    results = run(args)
    print_report(results)
    _write(args.out, results)


if __name__ == "__main__":
    main()
