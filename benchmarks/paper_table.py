"""The paper's comparison (DiffMoE Tables 3 and 8) at digits scale: one command, one table.

Trains, with the same steps, global batch, schedule, data order and seed, on the embedded digits
(16x16, class-conditional, one process, the real ``Trainer``):

- ``Dense-DiT``       dense DiT-tiny, the 1x-active baseline;
- ``TC-DiT-E8``       token choice, top-1, aux loss (1x active);
- ``EC-DiT-E8``       expert choice inside each sample (1x active), with its capacity predictor trained
                      on the intra-sample masks: static and "Local Dynamic Intra-sample" inference;
- ``DiffMoE-E8``      expert choice over the batch-level global pool + capacity predictor (1x active);
- ``Dense-DiT-1.5x``  dense DiT-tiny with 1.5x the depth (the paper's Dense-DiT-XL role, 1.47x of L);
- ``Race-E8``         Expert Race (Race-DiT): the top C N entries of the pool's whole score matrix;
- ``Dense-DiT-DDPM``, ``DiffMoE-E8-DDPM``: the central pair with DDPM (``--ddpm-steps`` sampler steps).

Seven rows of the paper's table (its EC-DiT dynamic row included), Race, and the DDPM pair; two
seeds by default.

Then evaluates each with its EMA weights (CFG, ODE sampler, ``--num-samples`` images, classes in
turn): digits-FID against the held-out images (with the real-vs-real floor beside it), class
accuracy, and the achieved average capacity ``C_avg``. DiffMoE is evaluated twice, with static
(``k = C N / E``) and with dynamic (predictor + EMA thresholds) inference; EC with its in-sample
static routing. Prints the table, writes JSON (``--out``) and a PNG sample grid per row.

    .venv/bin/python benchmarks/paper_table.py --out benchmarks/results/paper_table.json  # ~45 min, 2 cores
    .venv/bin/python benchmarks/paper_table.py --seeds 0,1 --out ...                      # mean and spread
    .venv/bin/python benchmarks/paper_table.py --quick                                    # smoke run, < 1 min

The paper's ordering (ImageNet 256, 700K steps): TC < Dense-1x < EC < DiffMoE static < Dense-1.5x
< DiffMoE dynamic. At 300 CPU steps on 1.6K digits the gaps are within seed noise; the table says
how many seeds stand behind each number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

DENSE = "configs/local/dense-tiny.yaml"
MOE = "configs/local/diffmoe-tiny.yaml"
# One process holds all experts: EP 1; the pool is then the whole (one-process) batch.
MOE_COMMON = ("parallel.expert_parallel_size=1", "moe.num_experts=8", "moe.capacity=1.0")


@dataclass
class Model:
    name: str
    config: str
    overrides: tuple[str, ...]
    training: str  # the paper's "training strategy" column
    # (label of the inference strategy, DiffMoE inference mode or None)
    evals: tuple[tuple[str, str | None], ...] = (("-", None),)
    runs: list = field(default_factory=list)


def models(dense_depth_15x: int) -> list[Model]:
    return [
        Model("Dense-DiT", DENSE, (), "dense"),
        Model(
            "TC-DiT-E8",
            MOE,
            (*MOE_COMMON, "moe.router=token_choice", "moe.top_k=1"),
            "token choice (top-1, aux loss)",
            (("static (top-1)", None),),
        ),
        Model(
            "EC-DiT-E8",
            MOE,
            (*MOE_COMMON, "moe.router=expert_choice_local"),
            "expert choice, in-sample",
            # the paper's row 4: the same predictor and thresholds, trained on the intra-sample masks
            (("static (in-sample)", "static"), ("dynamic (intra-sample)", "dynamic")),
        ),
        Model(
            "DiffMoE-E8",
            MOE,
            (*MOE_COMMON, "moe.router=expert_choice_global"),
            "expert choice, global pool",
            (("static", "static"), ("dynamic", "dynamic")),
        ),
        Model("Dense-DiT-1.5x", DENSE, (f"model.depth={dense_depth_15x}",), "dense"),
        # beyond the paper: Expert Race (Race-DiT), top C N entries of the pool's score matrix
        Model("Race-E8", MOE, (*MOE_COMMON, "moe.router=expert_race"), "expert race, global pool"),
        # the central pair with DDPM (DiT's objective, as the official code trains it)
        Model("Dense-DiT-DDPM", DENSE, ("diffusion.objective=ddpm",), "dense, DDPM"),
        Model(
            "DiffMoE-E8-DDPM",
            MOE,
            (*MOE_COMMON, "moe.router=expert_choice_global", "diffusion.objective=ddpm"),
            "expert choice, global pool, DDPM",
            (("dynamic", "dynamic"),),
        ),
    ]


def _parse_args(argv=None) -> argparse.Namespace:
    from diffmoe_dist.config import SAMPLERS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 300; quick 1)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds; each model trains once per seed")
    p.add_argument("--num-samples", type=int, default=None, help="samples per evaluation (default 300; quick 10)")
    p.add_argument("--sample-steps", type=int, default=None, help="ODE steps (default 20; quick 2)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None, help="ODE sampler (default heun; quick euler)")
    p.add_argument("--ddpm-steps", type=int, default=None, help="DDPM sampler steps of 1,000 (default 100; quick 2)")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--models", default=None, help="comma list of model names to run (default: all)")
    p.add_argument("--workdir", default="runs/paper_table", help="run directories and sample grids go here")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: every model builds and trains 1 step on batches of 16, 10 samples, one-row grids",
    )
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="take (model, seed) runs already in --out (same settings) instead of training them again",
    )
    args = p.parse_args(argv)
    q = args.quick
    args.steps = args.steps or (1 if q else 300)
    args.num_samples = args.num_samples or (10 if q else 300)
    args.sampler = args.sampler or ("euler" if q else "heun")
    args.sample_steps = args.sample_steps or (2 if q else 20)
    args.ddpm_steps = args.ddpm_steps or (2 if q else 100)
    try:
        args.seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds {args.seeds!r} must be comma-separated integers, e.g. 0,1")
    if args.steps < 1 or args.num_samples < 10:
        p.error("--steps must be >= 1 and --num-samples >= 10 (FID needs a covariance)")
    if args.reuse and not args.out:
        p.error("--reuse reads the runs of an earlier --out file: pass --out as well")
    return args


SETTINGS = ("steps", "num_samples", "sample_steps", "ddpm_steps", "sampler", "cfg_scale", "quick")


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in SETTINGS}


def earlier_runs(args) -> dict:
    """{(model, seed): run} from an earlier --out file made with the same settings (--reuse)."""
    path = Path(args.out)
    if not args.reuse or not path.is_file():
        return {}
    with open(path) as f:
        old = json.load(f)
    if {k: old.get("settings", {}).get(k) for k in SETTINGS} != _settings(args):
        print(f"[paper_table] --reuse: {path} was made with other settings; training everything", flush=True)
        return {}
    return {(name, run["seed"]): run for name, runs in old["runs"].items() for run in runs}


def _ensure_digits(path: Path) -> None:
    if (path / "train").is_dir() and (path / "heldout").is_dir():
        return
    from diffmoe_dist.data.digits import write_digits_shards

    write_digits_shards(path)


def train_one(model: Model, seed: int, args, data: Path) -> dict:
    import torch

    from diffmoe_dist.config import load_config
    from diffmoe_dist.model.params import count_parameters
    from diffmoe_dist.train.trainer import Trainer

    run_dir = Path(args.workdir) / f"{model.name}-seed{seed}"
    overrides = [
        *model.overrides,
        f"train.steps={args.steps}",
        f"train.seed={seed}",
        f"train.run_dir={run_dir}",
        f"data.path={data}",
        "checkpoint.every=0",
        "sample.every=0",
        f"sample.num_steps={args.sample_steps}",
        f"sample.sampler={args.sampler}",
        f"sample.cfg_scale={args.cfg_scale}",
        "sample.per_class=4",
        "logging.wandb=disabled",
        "logging.log_every=50",
        # the smoke run: small batches and no start-up matmul timing (MFU means nothing at 1 step)
        *(("data.global_batch_size=16", "logging.mfu_peak=off") if args.quick else ()),
    ]
    cfg = load_config(REPO / model.config, overrides).validate(world_size=1)
    if run_dir.exists():  # a stale run would be resumed, not retrained
        import shutil

        shutil.rmtree(run_dir)
    trainer = Trainer(cfg, None, torch.device("cpu"))
    params = count_parameters(trainer.model, cfg.moe)
    t0 = time.time()
    from diffmoe_dist.train.preemption import SignalGuard

    with SignalGuard(ignore_after=False):  # as diffmoe-train: a signal at any point of fit() is a stop
        result = trainer.fit()
    train_s = time.time() - t0
    if result["stopped"]:  # SIGTERM / SIGUSR1 reach the trainer as a preemption: never score a half-trained model
        from diffmoe_dist.train.preemption import EXIT_REQUEUE

        print(
            f"[paper_table] {model.name} seed {seed}: {result['stopped']} at step {result['step']}; "
            f"nothing evaluated (rerun with --reuse --out to keep the finished models)",
            file=sys.stderr,
        )
        sys.exit(EXIT_REQUEUE)
    final = result["final"]
    evals = []
    for label, mode in model.evals:
        evals.append({"inference": label, "mode": mode, **evaluate(trainer.ema.model, mode, seed, args)})
        grid = run_dir / f"grid-{(mode or 'default')}.png"
        _grid(trainer.ema.model, mode, seed, args, grid)
        evals[-1]["grid"] = str(grid)
    return {
        "seed": seed,
        "params_total": params["total"],
        "params_active": params["active"],
        "params_predictor": params["predictor"],
        "train_seconds": round(train_s, 1),
        "steps_per_s": round(args.steps / train_s, 3),
        "final_loss_flow": final.get("loss_flow"),
        "evals": evals,
    }


def _steps(model, args) -> int:
    """DDPM models (their output carries the variance) sample ``--ddpm-steps`` of 1,000; flow ``--sample-steps``."""
    return args.ddpm_steps if getattr(model, "learn_sigma", False) else args.sample_steps


def _with_routing(model, mode):
    from diffmoe_dist.model.moe.layer import set_inference_routing

    if mode is not None:
        set_inference_routing(model, mode)


def evaluate(model, mode: str | None, seed: int, args) -> dict:
    import torch

    from diffmoe_dist.diffusion.sampling import CapacityMeter, sample_in_chunks
    from diffmoe_dist.eval.metrics import evaluate_images

    _with_routing(model, mode)
    labels = torch.arange(args.num_samples) % 10
    meter = CapacityMeter(model)
    t0 = time.time()
    images = sample_in_chunks(
        model, labels, chunk_size=100, first_seed=10_000 * (seed + 1),
        cfg_scale=args.cfg_scale, num_steps=_steps(model, args), sampler=args.sampler,
    )  # fmt: skip
    meter.close()
    scores = evaluate_images(images, labels)
    return {
        "digits_fid": round(scores["digits_fid"], 2),
        "class_accuracy": round(scores["class_accuracy"], 4),
        "real_vs_real_floor": round(scores["real_vs_real_floor"], 2),
        "capacity_avg": None if meter.mean is None else round(meter.mean, 3),
        "sample_seconds": round(time.time() - t0, 1),
    }


def _grid(model, mode: str | None, seed: int, args, path: Path) -> None:
    import torch

    from diffmoe_dist.diffusion.sampling import sample_images, save_grid

    _with_routing(model, mode)
    labels = torch.arange(10).repeat(1 if args.quick else 4)  # 4 rows (quick: 1), one column per class
    images = sample_images(
        model, labels, cfg_scale=args.cfg_scale, num_steps=_steps(model, args), sampler=args.sampler, seed=seed
    )
    save_grid(images, str(path), nrow=10)


def _summary(values: list[float]) -> str:
    if not values or any(v is None for v in values):
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}" if mean > 1.5 else f"{mean:.3f}"
    spread = statistics.stdev(values)
    return f"{mean:.1f} ± {spread:.1f}" if mean > 1.5 else f"{mean:.3f} ± {spread:.3f}"


def table_rows(results: list[Model]) -> list[dict]:
    rows = []
    for m in results:
        if not m.runs:
            continue
        for j, (label, _) in enumerate(m.evals):
            evs = [run["evals"][j] for run in m.runs]
            rows.append(
                {
                    "model": m.name,
                    "active_params": m.runs[0]["params_active"],
                    "training": m.training,
                    "inference": label,
                    "digits_fid": [e["digits_fid"] for e in evs],
                    "class_accuracy": [e["class_accuracy"] for e in evs],
                    "capacity_avg": [e["capacity_avg"] for e in evs],
                    "seeds": [run["seed"] for run in m.runs],
                }
            )
    return rows


def print_table(rows: list[dict], base_active: int) -> None:
    head = ["model", "act. params", "training strategy", "inference", "digits-FID", "class acc %", "C_avg", "seeds"]
    lines = []
    for r in rows:
        acc = [100 * a for a in r["class_accuracy"]]
        lines.append(
            [
                r["model"],
                f"{r['active_params'] / 1e6:.2f}M ({r['active_params'] / base_active:.2f}x)",
                r["training"],
                r["inference"],
                _summary(r["digits_fid"]),
                _summary(acc),
                _summary(r["capacity_avg"]) if r["capacity_avg"][0] is not None else "-",
                str(len(r["seeds"])),
            ]
        )
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    print("-|-".join("-" * w for w in widths))
    for x in lines:
        print(" | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)))


def ordering(rows: list[dict]) -> dict:
    """The paper's claims, checked on the mean FID of this run (lower is better)."""
    fid = {(r["model"], r["inference"]): statistics.fmean(r["digits_fid"]) for r in rows}
    get = {k[0] + (f" {k[1]}" if k[1] in ("static", "dynamic") else ""): v for k, v in fid.items()}
    out = {}
    if {"DiffMoE-E8 dynamic", "Dense-DiT"} <= get.keys():
        out["diffmoe_dynamic_beats_dense_1x"] = get["DiffMoE-E8 dynamic"] < get["Dense-DiT"]
    if {"DiffMoE-E8 dynamic", "Dense-DiT-1.5x"} <= get.keys():
        out["diffmoe_dynamic_minus_dense_1_5x_fid"] = round(get["DiffMoE-E8 dynamic"] - get["Dense-DiT-1.5x"], 2)
    if {"DiffMoE-E8 static", "EC-DiT-E8", "TC-DiT-E8"} <= get.keys():
        out["diffmoe_static_beats_ec_and_tc"] = get["DiffMoE-E8 static"] < min(get["EC-DiT-E8"], get["TC-DiT-E8"])
    out["ranking_by_fid"] = [k for k, _ in sorted(get.items(), key=lambda kv: kv[1])]
    return out


def main(argv=None) -> int:
    args = _parse_args(argv)
    from diffmoe_dist.train.allocator import ensure_malloc

    ensure_malloc()  # what run.sh and the launchers set: measure the process they start
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from diffmoe_dist.config import MODEL_SIZES

    depth = MODEL_SIZES["tiny"][0]
    chosen = models(dense_depth_15x=(3 * depth) // 2)
    if args.models:
        names = args.models.split(",")
        unknown = sorted(set(names) - {m.name for m in chosen})
        if unknown:
            print(f"--models: unknown {unknown}; choose from {[m.name for m in chosen]}", file=sys.stderr)
            return 2
        chosen = [m for m in chosen if m.name in names]
    data = REPO / "data" / "digits"
    _ensure_digits(data)
    t_all = time.time()
    reuse = earlier_runs(args)
    for m in chosen:
        for seed in args.seed_list:
            t0 = time.time()
            if (m.name, seed) in reuse:
                m.runs.append(reuse[(m.name, seed)])
                print(f"[paper_table] {m.name} seed {seed}: reused from {args.out}", flush=True)
                continue
            run = train_one(m, seed, args, data)
            m.runs.append(run)
            ev = ", ".join(
                f"{e['inference']}: FID {e['digits_fid']} acc {100 * e['class_accuracy']:.1f}%" for e in run["evals"]
            )
            print(
                f"[paper_table] {m.name} seed {seed}: {run['steps_per_s']} steps/s, {time.time() - t0:.0f} s; {ev}",
                flush=True,
            )
            # After every finished run, so that an interrupted table resumes with --reuse.
            write_out(args, chosen, time.time() - t_all, torch.__version__)
    rows = table_rows(chosen)
    base = next((r["active_params"] for r in rows if r["model"] == "Dense-DiT"), rows[0]["active_params"])
    print()
    print_table(rows, base)
    print("\n" + json.dumps(ordering(rows)))
    seconds = time.time() - t_all
    print(f"[paper_table] total {seconds / 60:.1f} min")
    write_out(args, chosen, seconds, torch.__version__)
    if args.out:
        print(f"[paper_table] wrote {args.out}")
    return 0


def write_out(args, chosen: list[Model], seconds: float, torch_version: str) -> None:
    """Atomically (re)writes --out with every finished run so far (the chosen models only)."""
    if not args.out:
        return
    rows = table_rows(chosen)
    out = {
        "benchmark": "paper_table",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "cores": os.cpu_count(),
            "torch": torch_version,
            "python": platform.python_version(),
        },
        "settings": {**_settings(args), "seed_list": args.seed_list},
        "rows": rows,
        "ordering": ordering(rows),
        "runs": {m.name: m.runs for m in chosen if m.runs},
        "total_seconds": round(seconds, 1),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{args.out}.tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=1)
    os.replace(tmp, args.out)


if __name__ == "__main__":
    sys.exit(main())
