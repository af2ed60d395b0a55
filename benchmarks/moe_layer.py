"""MoE layer forward+backward throughput on CPU at equal *active* FLOPs, one process.

Every implementation runs each token through exactly one ``D -> 4D -> D`` GELU(tanh) MLP
(``12 N D H`` matmul FLOPs per forward+backward), so tokens/s compare the layers' overheads:

- ``ours``:      ``MoEFeedForward``, router ``expert_choice_global``, C = 1, capacity predictor
                 and its loss included, training mode, ``LocalPool`` / ``LocalDispatcher``;
- ``dense``:     ``FeedForward`` of the same expert shape (the speed of light for the layer);
- ``deepspeed``: ``deepspeed.moe.layer.MoE``, top-1 gate, capacity factor 1 (``E C = N`` slots,
                 overflow dropped, empty slots computed as zero rows), ep_size 1, its l_aux in the
                 backward; 0.19.8 dispatches by gather (``_sparse_encode``), not by one-hot einsum;
- ``megatron``:  megatron-core ``MoELayer``, alltoall dispatcher, ``SequentialMLP`` experts,
                 top-1, dropless, fp32 router, aux loss 0.01 in the backward. It needs the CUDA
                 shims of ``_megatron_cpu_shims`` (stream/device stubs and two TP=1 fixes).

bf16 means parameters *and* activations in bf16 (``module.to(torch.bfloat16)``, bf16 input, no
autocast); routers that compute in fp32 (ours, DeepSpeed, Megatron with moe_router_dtype=fp32)
cast internally.

glibc malloc maps every block over 32 MB afresh (docs/design.md section 4), which costs one page
fault per 4 KB touched. The benchmark re-executes itself with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` at 4 GiB unless ``--default-malloc``; ``--compare-malloc`` runs both
settings as subprocesses. Minor page faults per iteration are reported for every row.

    .venv/bin/python benchmarks/moe_layer.py --out benchmarks/results/moe_layer.json
    .venv/bin/python benchmarks/moe_layer.py --compare-malloc --out benchmarks/results/moe_layer.json
    .venv/bin/python benchmarks/moe_layer.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from benchmarks._table import Column, header, line  # noqa: E402
from diffmoe_dist.config import MoEConfig  # noqa: E402
from diffmoe_dist.model.ffn import FeedForward  # noqa: E402
from diffmoe_dist.model.moe.collector import MoECollector  # noqa: E402
from diffmoe_dist.model.moe.layer import MoEFeedForward  # noqa: E402
from diffmoe_dist.train.allocator import TUNED_MALLOC, ensure_malloc  # noqa: E402

IMPLS = ("ours", "dense", "deepspeed", "megatron")
FULL_CONFIGS = ((384, 16), (1024, 8))  # (D, E): DiffMoE S-E16 and L-E8 widths
QUICK_CONFIGS = ((32, 4), (64, 8))
SEQ = 256  # tokens per sample; only the (B, L, D) view of the same N tokens depends on it


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=None, help="tokens per step N (default 16384; quick 512)")
    p.add_argument("--configs", default=None, help="comma list of DxE, e.g. 384x16,1024x8")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--warmup", type=int, default=None, help="default 2 (quick 1)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--budget", type=float, default=60.0, help="seconds per row before repeats are cut (min 3)")
    p.add_argument("--peak-size", type=int, default=None, help="square matmul size for the peak (default 2048)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, 1 repeat: a smoke run")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: GPU 0, no Megatron shims")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's default mmap/trim thresholds")
    p.add_argument("--compare-malloc", action="store_true", help="run tuned and default malloc as subprocesses")
    args = p.parse_args(argv)
    args.tokens = args.tokens or (512 if args.quick else 16384)
    args.warmup = 1 if args.quick and args.warmup is None else (2 if args.warmup is None else args.warmup)
    args.repeats = 1 if args.quick and args.repeats is None else (5 if args.repeats is None else args.repeats)
    args.peak_size = args.peak_size or (256 if args.quick else 2048)
    if args.configs:
        args.configs = [tuple(int(v) for v in c.lower().split("x")) for c in args.configs.split(",")]
    else:
        args.configs = list(QUICK_CONFIGS if args.quick else FULL_CONFIGS)
    args.dtypes = args.dtypes.split(",")
    args.impls = args.impls.split(",")
    unknown = [i for i in args.impls if i not in IMPLS]
    if unknown:
        p.error(f"--impls: unknown {unknown}; choose from {IMPLS}")
    if args.tokens % SEQ and args.tokens > SEQ:
        p.error(f"--tokens={args.tokens} must be a multiple of {SEQ} (the sequence length)")
    return args


# ---------------------------------------------------------------------------------------------
# Process setup: allocator, threads, a one-rank gloo group


# Where the layers run (--device); a module global, so the builders keep their signature.
DEVICE = torch.device("cpu")


def _init_single_rank_group() -> None:
    if not torch.distributed.is_initialized():
        backend = "nccl" if DEVICE.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# ---------------------------------------------------------------------------------------------
# The implementations: each builder returns (module, step) with step(x, grad_y) running one
# forward and backward, loss terms included.


@dataclass
class Shape:
    dim: int
    experts: int
    tokens: int

    @property
    def hidden(self) -> int:
        return 4 * self.dim


def _build_ours(shape: Shape, dtype):
    cfg = MoEConfig(router="expert_choice_global", num_experts=shape.experts, capacity=1.0)
    layer = MoEFeedForward(shape.dim, shape.hidden, cfg).to(DEVICE, dtype).train()
    one = torch.ones((), dtype=torch.float32, device=DEVICE)

    def step(x_ND, g_ND):
        with (moe := MoECollector()).collect(layer):
            y = layer(x_ND.view(-1, min(SEQ, shape.tokens), shape.dim))
        bce = moe.losses()["loss"]  # predictor_loss_weight * BCE
        torch.autograd.backward((y, bce), (g_ND.view_as(y), one))

    return layer, step


def _build_dense(shape: Shape, dtype):
    ffn = FeedForward(shape.dim, shape.hidden).to(DEVICE, dtype)

    def step(x_ND, g_ND):
        ffn(x_ND).backward(g_ND)

    return ffn, step


def _build_deepspeed(shape: Shape, dtype):
    # deepspeed.comm wraps an existing torch.distributed group, but building its TorchBackend
    # first JIT-compiles the shared-memory collectives (~40 s, docs/design.md section 4), useless for
    # one rank. (`import deepspeed.comm.torch as m` would bind the torch package: deepspeed.comm
    # has an attribute named torch.)
    with contextlib.redirect_stdout(sys.stderr):  # its logger prints "Setting accelerator to CPU"
        ds_torch_backend = importlib.import_module("deepspeed.comm.torch")
        ds_torch_backend.build_shm_op = lambda: None
        import deepspeed.comm as ds_comm
        from deepspeed.moe.layer import MoE

    ds_comm.init_distributed(torch.distributed.get_backend(), dist_init_required=False, verbose=False)
    with contextlib.redirect_stdout(sys.stderr):  # "creating a new group named ep_size_1"
        moe = MoE(
            shape.dim,
            FeedForward(shape.dim, shape.hidden),
            num_experts=shape.experts,
            ep_size=1,
            k=1,
            capacity_factor=1.0,
            eval_capacity_factor=1.0,
            drop_tokens=True,
        )
        moe.set_deepspeed_parallelism()
    moe = moe.to(DEVICE, dtype).train()
    one = torch.ones((), dtype=torch.float32, device=DEVICE)

    def step(x_ND, g_ND):
        y, l_aux, _ = moe(x_ND.view(-1, min(SEQ, shape.tokens), shape.dim))
        torch.autograd.backward((y, l_aux), (g_ND.view_as(y), one.to(l_aux.dtype)))

    return moe, step


class _NoStream:
    """Stands in for torch.cuda.Stream / Event: on CPU every op is already synchronous."""

    def wait_stream(self, other):
        pass

    def record_event(self, event=None):
        return self

    def synchronize(self):
        pass

    def wait(self, *args):
        pass


def _megatron_cpu_shims() -> None:
    """Patches megatron-core 0.16.1's MoELayer needs on a CPU-only torch (benchmark only):
    1. MoEAlltoAllTokenDispatcher creates a ``torch.cuda.Stream`` for its device-to-host copies;
    2. TopKRouter.gating moves its weight to ``torch.cuda.current_device()`` when it is on CPU;
    3. moe_utils references ``te_general_gemm`` that is only defined when TransformerEngine
       imports (NameError without TE);
    4. with TP = 1 ``reduce_from_tensor_model_parallel_region`` returns its input from a custom
       autograd Function, which autograd marks as a view, and the expert MLP's in-place
       ``output += bias * prob`` then raises; a one-rank all-reduce is the identity."""
    stream = _NoStream()
    torch.cuda.Stream = lambda *a, **k: stream
    torch.cuda.current_stream = lambda *a, **k: stream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.current_device = lambda: "cpu"
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    tp_layers = importlib.import_module("megatron.core.tensor_parallel.layers")
    tp_layers.reduce_from_tensor_model_parallel_region = lambda x, group=None: x


def _build_megatron(shape: Shape, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "TransformerEngine and Apex are not installed"
        if DEVICE.type == "cpu":  # on CUDA megatron-core runs as it is
            _megatron_cpu_shims()
        from megatron.core import parallel_state
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
        from megatron.core.transformer.spec_utils import build_module
        from megatron.core.transformer.transformer_config import TransformerConfig

        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
            if DEVICE.type == "cuda":
                # Its forward forks the CUDA RNG tracker's states (e.g. for dropout); unseeded, any fork
                # raises "cuda rng state expert-parallel-rng is not added".
                from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

                model_parallel_cuda_manual_seed(0)
        cfg = TransformerConfig(
            num_layers=1,
            hidden_size=shape.dim,
            num_attention_heads=1,
            ffn_hidden_size=shape.hidden,
            num_moe_experts=shape.experts,
            moe_router_topk=1,
            moe_router_pre_softmax=True,  # required for top-1
            moe_router_dtype="fp32",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,  # SequentialMLP: one MLP per expert
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=0.01,
            add_bias_linear=True,
            gated_linear_unit=False,
            activation_func=lambda t: F.gelu(t, approximate="tanh"),
            bias_activation_fusion=False,
            # On every device: the weights are drawn on the CPU, then moved. Drawn on CUDA, each expert
            # forks the CUDA RNG tracker, and the construction path would differ from the one tested here.
            use_cpu_initialization=True,
            params_dtype=dtype,
            bf16=dtype == torch.bfloat16,
        )
        spec = get_moe_module_spec(use_te=False, num_experts=shape.experts, moe_grouped_gemm=False)
        layer = build_module(spec, config=cfg).to(DEVICE, dtype).train()

    def step(x_ND, g_ND):
        # Megatron is sequence-first, (L, B, D); which token sits where does not matter here.
        # The aux loss reaches the router through an autograd hook on the output.
        y, _ = layer(x_ND.view(min(SEQ, shape.tokens), -1, shape.dim))
        y.backward(g_ND.view_as(y))

    return layer, step


BUILDERS = {"ours": _build_ours, "dense": _build_dense, "deepspeed": _build_deepspeed, "megatron": _build_megatron}


# ---------------------------------------------------------------------------------------------
# Measurement


def matmul_peak(dtype, n: int, warmup: int, repeats: int) -> float:
    """FLOP/s of an ``n x n @ n x n`` matmul, the machine's practical peak for this dtype."""
    from diffmoe_dist.train.flops import matmul_peak as timed

    return timed(dtype, n, device=DEVICE, warmup=warmup, repeats=max(repeats, 3))


def time_impl(name: str, shape: Shape, dtype, warmup: int, repeats: int, budget_s: float) -> dict:
    """Samples of one forward+backward (grads set to None before each, as a training step does).
    A row whose first iteration shows that warmup + repeats would overrun ``budget_s`` runs
    1 warmup and as many repeats as fit, at least 3, so a slow peer cannot stall the run."""
    from diffmoe_dist.train.flops import synchronize

    torch.manual_seed(0)
    module, step = BUILDERS[name](shape, dtype)
    x_ND = torch.randn(shape.tokens, shape.dim).to(DEVICE, dtype).requires_grad_()
    g_ND = torch.randn(shape.tokens, shape.dim).to(DEVICE, dtype)

    def one_iteration():
        module.zero_grad(set_to_none=True)
        x_ND.grad = None
        step(x_ND, g_ND)
        synchronize(DEVICE)  # kernels are asynchronous: time what ran, not what launched

    start = time.perf_counter()
    one_iteration()
    first = time.perf_counter() - start
    if first * (warmup + repeats) > budget_s and repeats > 3:
        warmup, repeats = 1, max(3, min(repeats, int(budget_s / first) - 1))
    for _ in range(warmup - 1):
        one_iteration()
    wall, cpu, faults = [], [], []
    for _ in range(repeats):
        f0, c0, w0 = _minor_faults(), time.process_time(), time.perf_counter()
        one_iteration()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
        faults.append(_minor_faults() - f0)
    return {"seconds": wall, "cpu_seconds": cpu, "minor_faults": faults, "warmup": max(warmup, 1), "repeats": repeats}


def run(args: argparse.Namespace) -> dict:
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(0)
    torch.set_num_threads(args.threads)
    _init_single_rank_group()
    malloc = "default" if args.default_malloc else "tuned"
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    peaks = {d: matmul_peak(dtypes[d], args.peak_size, args.warmup, args.repeats) for d in args.dtypes}
    rows = []
    for dim, experts in args.configs:
        shape = Shape(dim, experts, args.tokens)
        flops = 12 * shape.tokens * shape.dim * shape.hidden  # fwd + bwd of one D->H->D MLP per token
        for dname in args.dtypes:
            for impl in args.impls:
                row = {
                    "config": f"D{dim}-E{experts}",
                    "dim": dim,
                    "experts": experts,
                    "tokens": shape.tokens,
                    "dtype": dname,
                    "impl": impl,
                    "malloc": malloc,
                    "threads": args.threads,
                }
                try:
                    m = time_impl(impl, shape, dtypes[dname], args.warmup, args.repeats, args.budget)
                except Exception as exc:  # a peer that cannot run here is reported, not fatal
                    traceback.print_exc()
                    row["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    rows.append(row)
                    continue
                sec = statistics.median(m["seconds"])
                row.update(
                    ms_per_iter=1e3 * sec,
                    ms_all=[1e3 * s for s in m["seconds"]],
                    warmup=m["warmup"],
                    repeats=m["repeats"],
                    # CPU time over wall time x threads: well below 1 means the threads waited
                    # (other processes on the cores), so the row's timing is not trustworthy.
                    cpu_utilisation=statistics.median(m["cpu_seconds"]) / sec / args.threads,
                    tokens_per_s=shape.tokens / sec,
                    pct_of_matmul_peak=100 * flops / sec / peaks[dname],
                    minor_faults_per_iter=statistics.median(m["minor_faults"]),
                )
                rows.append(row)
                print(_format_row(row), file=sys.stderr, flush=True)
    _add_ratios(rows)
    return {
        "benchmark": "moe_layer",
        "malloc": malloc,
        "env": {k: os.environ.get(k) for k in TUNED_MALLOC},
        "threads": args.threads,
        "tokens": args.tokens,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "bf16_mode": "params and activations in bf16 (module.to(bfloat16)), no autocast",
        "matmul_peak_flops": peaks,
        "peak_matmul_size": args.peak_size,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "rows": rows,
    }


def _add_ratios(rows: list[dict]) -> None:
    ours = {(r["config"], r["dtype"], r["malloc"]): r for r in rows if r["impl"] == "ours" and "error" not in r}
    for r in rows:
        ref = ours.get((r["config"], r["dtype"], r["malloc"]))
        if ref is not None and "error" not in r:
            r["vs_ours"] = r["tokens_per_s"] / ref["tokens_per_s"]


# ---------------------------------------------------------------------------------------------
# Output

COLUMNS = (
    Column("config", "<11", "config"),
    Column("dtype", "<8", "dtype"),
    Column("malloc", "<7", "malloc"),
    Column("impl", "<9", "impl"),
    Column("ms/iter", ">9.1f", "ms_per_iter"),
    Column("tokens/s", ">10.0f", "tokens_per_s"),
    Column("vs ours", ">7", lambda r: f"{r['vs_ours']:.2f}x" if "vs_ours" in r else "-"),
    Column("%peak", ">6", lambda r: f"{r['pct_of_matmul_peak']:.1f}%"),
    Column("faults/it", ">10.0f", "minor_faults_per_iter"),
    Column("n", ">2", "repeats"),
    Column("util", ">5.2f", "cpu_utilisation"),
)


def _format_row(r: dict) -> str:
    return line(r, COLUMNS, keys=4)


def print_report(results: list[dict]) -> None:
    print(
        "MoE layer fwd+bwd, one process, equal active FLOPs "
        "(vs ours = impl tokens/s / ours tokens/s; %peak = 12 N D H / time / square-matmul peak;\n"
        " n = timed repeats; util = CPU time / (wall x threads), well below 1 on a shared machine)"
    )
    for res in results:
        peaks = ", ".join(f"{d} {p / 1e9:.0f} GFLOP/s" for d, p in res["matmul_peak_flops"].items())
        print(
            f"\nmalloc={res['malloc']}  threads={res['threads']}  tokens={res['tokens']}  "
            f"warmup={res['warmup']} repeats={res['repeats']} (median)  matmul peak: {peaks}"
        )
        print(header(COLUMNS))
        for r in res["rows"]:
            print(_format_row(r))
    print()
    for res in results:
        by_key = {(r["config"], r["dtype"], r["impl"]): r for r in res["rows"] if "error" not in r}
        for config, dtype in dict.fromkeys((r["config"], r["dtype"]) for r in res["rows"]):
            ours = by_key.get((config, dtype, "ours"))
            if ours is None:
                continue
            parts = [
                f"{impl} {ours['tokens_per_s'] / by_key[(config, dtype, impl)]['tokens_per_s']:.2f}x"
                for impl in IMPLS[1:]
                if (config, dtype, impl) in by_key
            ]
            print(f"ours / peer, {res['malloc']} malloc, {config} {dtype}: " + ", ".join(parts))


def _write(out: str | None, payload: dict) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(payload, indent=2))
        print(f"wrote {out}")


def compare_malloc(args: argparse.Namespace, argv: list[str]) -> None:
    """Run this benchmark twice in fresh processes, tuned then default malloc, one report."""
    base = [a for a in argv if a not in ("--compare-malloc", "--default-malloc")]
    if "--out" in base:
        i = base.index("--out")
        del base[i : i + 2]
    base = [a for a in base if not a.startswith("--out=")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for flag in ([], ["--default-malloc"]):
            out = Path(tmp) / f"run{len(results)}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *base, *flag, "--out", str(out)]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            results.append(json.loads(out.read_text()))
    print_report(results)
    _write(args.out, {"benchmark": "moe_layer", "runs": results})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = _parse_args(argv)
    if args.compare_malloc:
        compare_malloc(args, argv)
        return
    ensure_malloc(tuned=not args.default_malloc)
    results = run(args)
    print_report([results])
    _write(args.out, results)


if __name__ == "__main__":
    main()
