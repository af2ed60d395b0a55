"""DiffMoE's interval search (paper Table 10) on a trained checkpoint: FID against achieved capacity.

    python tools/capacity_sweep.py --ckpt runs/main --out runs/main/capacity_sweep
    python tools/capacity_sweep.py --ckpt RUN --gammas 0.2,0.4,0.6 --features inception.pt --num-samples 1000

For each gamma, every expert of every MoE layer takes the tokens whose predicted probability
``sigmoid(pred)`` exceeds gamma (``interval`` mode); ``dynamic`` uses the learned per-expert
thresholds tau_E instead, and ``static`` the training capacity C. Each setting samples the same
labels from the same noise (so differences come from routing alone) and reports the achieved
``C_avg`` (mean over layers and sampling steps), C_avg per sampling step, the digits-FID (or the
Frechet distance in a TorchScript feature space with ``--features``) and class accuracy. The best
gamma is the lowest FID with ``C_avg <= 1`` (no more compute than the dense model). Writes
``capacity_sweep.json`` and ``capacity_sweep.png`` (FID against C_avg).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from diffmoe_dist.config import SAMPLERS
from diffmoe_dist.diffusion.sampling import CapacityMeter, sample_images
from diffmoe_dist.eval.cli import load_model
from diffmoe_dist.eval.metrics import evaluate_images
from diffmoe_dist.model.moe.layer import moe_layers, set_inference_routing
from diffmoe_dist.model.moe.routing import has_predictor
from diffmoe_dist.train.telemetry import capacity_per_step

DEFAULT_GAMMAS = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9"


def sample_with_capacity(model, labels: torch.Tensor, args) -> tuple[torch.Tensor, float, list[float]]:
    """Images for ``labels`` in batches, with C_avg overall and per ODE step."""
    meter = CapacityMeter(model)
    out = [
        sample_images(
            model, chunk, cfg_scale=args.cfg_scale, num_steps=args.steps, sampler=args.sampler, seed=args.seed + i
        )
        for i, chunk in enumerate(labels.split(args.batch_size))
    ]
    meter.close()
    per_step = capacity_per_step(meter.values, len(moe_layers(model)), args.steps, 2 if args.sampler == "heun" else 1)
    return torch.cat(out), meter.mean, per_step


def _conditioning(model, cfg, num_samples: int):
    """(model seen as class-conditional, sampler labels, digit labels for class accuracy)."""
    if cfg.model.task != "t2i":
        labels = torch.arange(num_samples) % cfg.model.num_classes
        return model, labels, labels
    from diffmoe_dist.data.captions import heldout_prompts
    from diffmoe_dist.data.text_encoders import prompt_model

    captions, digits = heldout_prompts(num_samples)
    unique = sorted(set(captions))
    index = torch.tensor([unique.index(c) for c in captions])
    return prompt_model(model, cfg, unique), index, digits


def best_gamma(runs: list[dict], max_capacity: float = 1.0) -> dict | None:
    """The interval run with the lowest FID among those with ``C_avg <= max_capacity``."""
    ok = [r for r in runs if r["mode"] == "interval" and r["capacity_avg"] <= max_capacity + 1e-9]
    return min(ok, key=lambda r: r["fid"]) if ok else None


def sweep(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, step_path = load_model(args.ckpt)
    if not has_predictor(cfg.moe):
        raise SystemExit(
            f"capacity_sweep: {step_path} has moe.router={cfg.moe.router}: the sweep needs a router with a "
            "capacity predictor and thresholds (expert_choice_global or expert_choice_local)"
        )
    sampler_model, labels, digits = _conditioning(model, cfg, args.num_samples)
    extractor = classifier = None
    if args.features:  # the user's feature space; the digits classifier's accuracy would mean nothing
        from diffmoe_dist.eval.fid import TorchScriptFeatures

        extractor, digits = TorchScriptFeatures(args.features), None
    else:
        from diffmoe_dist.eval.classifier import load_or_train_classifier

        classifier = load_or_train_classifier()  # once, not per setting
    settings = [("static", None), ("dynamic", None)] + [("interval", g) for g in args.gammas]
    runs, floor = [], None
    for mode, gamma in settings:
        set_inference_routing(model, mode, gamma)
        images, c_avg, per_step = sample_with_capacity(sampler_model, labels, args)
        scores = evaluate_images(images, digits, extractor=extractor, classifier=classifier, with_floor=floor is None)
        floor = scores["real_vs_real_floor"] if floor is None else floor
        features = scores["features"]
        run = {
            "mode": mode,
            "gamma": gamma,
            "capacity_avg": c_avg,
            "capacity_per_step": per_step,
            "fid": scores["digits_fid"],
            "class_accuracy": scores["class_accuracy"],
        }
        runs.append(run)
        g = "" if gamma is None else f" gamma={gamma:g}"
        acc = "" if run["class_accuracy"] is None else f"  acc {run['class_accuracy']:.3f}"
        print(f"{mode:>8}{g:<12} C_avg {c_avg:6.3f}  FID {run['fid']:8.2f}{acc}", flush=True)
    best = best_gamma(runs, args.max_capacity)
    return {
        "ckpt": step_path,
        "task": cfg.model.task,
        "features": features,
        "num_samples": args.num_samples,
        "steps": args.steps,
        "sampler": args.sampler,
        "cfg_scale": args.cfg_scale,
        "max_capacity": args.max_capacity,
        "real_vs_real_floor": floor,
        "runs": runs,
        "best": best,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    interval = sorted((r for r in result["runs"] if r["mode"] == "interval"), key=lambda r: r["capacity_avg"])
    if interval:
        ax.plot([r["capacity_avg"] for r in interval], [r["fid"] for r in interval], "o-", label="interval (gamma)")
        for r in interval:
            ax.annotate(f"{r['gamma']:g}", (r["capacity_avg"], r["fid"]), textcoords="offset points", xytext=(4, 4))
    for mode, marker in (("dynamic", "*"), ("static", "s")):
        for r in (r for r in result["runs"] if r["mode"] == mode):
            ax.plot(r["capacity_avg"], r["fid"], marker, markersize=12 if marker == "*" else 8, label=mode)
    best = result.get("best")
    if best:
        ax.plot(
            best["capacity_avg"],
            best["fid"],
            "o",
            markersize=14,
            mfc="none",
            mec="red",
            label=f"best gamma {best['gamma']:g}",
        )
    ax.axvline(result["max_capacity"], color="gray", ls=":", lw=1)
    if result.get("real_vs_real_floor") is not None:
        ax.axhline(result["real_vs_real_floor"], color="green", ls="--", lw=1, label="real-vs-real floor")
    ax.set_xlabel("achieved capacity C_avg")
    ax.set_ylabel(f"FID ({result['features']}, {result['num_samples']} samples)")
    ax.set_title(f"capacity sweep: {os.path.basename(result['ckpt'])}, {result['sampler']}-{result['steps']}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint step directory")
    p.add_argument("--gammas", default=DEFAULT_GAMMAS, help=f"interval thresholds (default {DEFAULT_GAMMAS})")
    p.add_argument("--num-samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=25, help="ODE steps")
    p.add_argument("--sampler", choices=SAMPLERS, default="heun")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--features", default=None, help="TorchScript feature extractor (default: digits CNN)")
    p.add_argument("--max-capacity", type=float, default=1.0, help="best gamma: lowest FID with C_avg <= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default: RUN/capacity_sweep)")
    args = p.parse_args(argv)
    try:
        args.gammas = [float(g) for g in args.gammas.split(",")]
    except ValueError:
        p.error(f"--gammas {args.gammas!r} must be comma-separated numbers in (0, 1)")
    if any(not 0.0 < g < 1.0 for g in args.gammas):
        p.error(f"--gammas {args.gammas} must lie strictly between 0 and 1")
    result = sweep(args)
    out = args.out or os.path.join(
        args.ckpt if os.path.isdir(os.path.join(args.ckpt, "checkpoints")) else ".", "capacity_sweep"
    )
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "capacity_sweep.json"), "w") as f:
        json.dump(result, f, indent=2)
    plot(result, os.path.join(out, "capacity_sweep.png"))
    best = result["best"]
    if best:
        print(f"best gamma {best['gamma']:g}: C_avg {best['capacity_avg']:.3f}, FID {best['fid']:.2f}")
    else:
        print(f"no gamma reached C_avg <= {args.max_capacity}: widen --gammas upwards")
    print(f"wrote {out}/capacity_sweep.json and capacity_sweep.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
