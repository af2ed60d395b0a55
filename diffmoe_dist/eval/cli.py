"""`diffmoe-sample` and `diffmoe-eval`: sample from a checkpoint's EMA weights, and score samples."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from diffmoe_dist.config import INFERENCE_MODES, config_from_dict
from diffmoe_dist.eval.sampling import CapacityMeter, sample_images, save_grid
from diffmoe_dist.model.dit import build_model
from diffmoe_dist.model.moe.layer import set_inference_routing
from diffmoe_dist.train import checkpoint as ckpt


def load_model(path: str, use_ema: bool = True) -> tuple[torch.nn.Module, object, str]:
    step_path = ckpt.resolve_checkpoint(path)
    ckpt.verify(step_path)
    shared = ckpt.load_file(step_path, "model.pt")
    cfg = config_from_dict(shared["config"])
    model = build_model(cfg.model, cfg.moe)
    ckpt.load_full_state_dict(model, shared["ema" if use_ema else "model"])
    return model.eval(), cfg, step_path


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint step directory")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=50, help="ODE steps")
    p.add_argument("--sampler", choices=["euler", "heun"], default="euler")
    p.add_argument("--routing", choices=INFERENCE_MODES, default=None, help="DiffMoE inference mode (default: config)")
    p.add_argument("--gamma", type=float, default=None, help="interval-mode threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--threads", type=int, default=0)


def _prepare(args) -> tuple[torch.nn.Module, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, _ = load_model(args.ckpt, use_ema=not args.no_ema)
    if args.routing or args.gamma is not None:
        set_inference_routing(model, args.routing or cfg.moe.inference, args.gamma)
    return model, cfg


def _sample_batched(model, labels: torch.Tensor, args) -> tuple[torch.Tensor, float | None]:
    meter = CapacityMeter(model)
    out = []
    for i, chunk in enumerate(labels.split(args.batch_size)):
        out.append(
            sample_images(
                model,
                chunk,
                cfg_scale=args.cfg_scale,
                num_steps=args.steps,
                sampler=args.sampler,
                seed=args.seed + i,
            )
        )
    meter.close()
    return torch.cat(out), meter.mean


def sample_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffmoe-sample", description="Sample a class grid from a checkpoint.")
    _common_args(p)
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--per-class", type=int, default=8)
    p.add_argument("--out", default="grid.png")
    args = p.parse_args(argv)
    model, cfg = _prepare(args)
    try:
        classes = [int(c) for c in args.classes.split(",")]
    except ValueError:
        print(
            f"diffmoe-sample: error: --classes {args.classes!r} must be comma-separated integers",
            file=sys.stderr,
        )
        return 2
    if any(not 0 <= c < cfg.model.num_classes for c in classes):
        print(f"diffmoe-sample: error: --classes must lie in 0..{cfg.model.num_classes - 1}", file=sys.stderr)
        return 2
    labels = torch.tensor(classes).repeat_interleave(args.per_class)
    images, c_avg = _sample_batched(model, labels, args)
    grid = images.view(len(classes), args.per_class, *images.shape[1:]).transpose(0, 1).reshape(-1, *images.shape[1:])
    save_grid(grid, args.out, nrow=len(classes))
    print(json.dumps({"out": args.out, "num_images": len(labels), "capacity_avg": c_avg}))
    return 0


def eval_main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffmoe-eval", description="digits-FID and class accuracy of samples.")
    _common_args(p)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument(
        "--features",
        default=None,
        help="TorchScript feature extractor file (e.g. Inception); default: digits CNN",
    )
    args = p.parse_args(argv)
    model, cfg = _prepare(args)
    from diffmoe_dist.eval.metrics import evaluate_images

    labels = torch.arange(args.num_samples) % cfg.model.num_classes
    images, c_avg = _sample_batched(model, labels, args)
    extractor = None
    if args.features:
        from diffmoe_dist.eval.fid import TorchScriptFeatures

        extractor = TorchScriptFeatures(args.features)
    result = evaluate_images(images, labels, extractor=extractor)
    result.update(
        {
            "capacity_avg": c_avg,
            "cfg_scale": args.cfg_scale,
            "steps": args.steps,
            "sampler": args.sampler,
            "routing": args.routing or (cfg.moe.inference if cfg.moe.router == "expert_choice_global" else None),
        }
    )
    print(json.dumps(result))
    return 0
