"""`diffmoe-sample` and `diffmoe-eval`: sample from a checkpoint's EMA weights, and score samples."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

from diffmoe_dist import checkpoint as ckpt
from diffmoe_dist.config import INFERENCE_MODES, SAMPLERS, config_from_dict
from diffmoe_dist.data.text_encoders import prompt_model
from diffmoe_dist.diffusion.sampling import CapacityMeter, sample_in_chunks, save_grid
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.layer import set_inference_routing
from diffmoe_dist.model.moe.routing import has_predictor


def load_model(path: str, use_ema: bool = True) -> tuple[torch.nn.Module, object, str]:
    step_path = ckpt.resolve_checkpoint(path)
    ckpt.verify(step_path)
    cfg = config_from_dict(ckpt.read_meta(step_path)["config"])
    model = build_model(cfg.model, cfg.moe, cfg.diffusion.objective)
    # Assembles every rank's pieces (experts at their global indices) for this one process.
    ckpt.load_full_state_dict(model, ckpt.load_model_state(step_path, "ema" if use_ema else "model"))
    return model.eval(), cfg, step_path


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint step directory")
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=50, help="ODE steps")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler")
    p.add_argument("--routing", choices=INFERENCE_MODES, default=None, help="DiffMoE inference mode (default: config)")
    p.add_argument("--gamma", type=float, default=None, help="interval-mode threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--vae", default="", help="decode latents with this AutoencoderKL dir (default: the shards' VAE)")


def _prepare(args) -> tuple[torch.nn.Module, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, cfg, _ = load_model(args.ckpt, use_ema=not args.no_ema)
    if args.routing or args.gamma is not None:
        set_inference_routing(model, args.routing or cfg.moe.inference, args.gamma)
    args.cfg = cfg
    return model, cfg


def _sample_batched(
    model, labels: torch.Tensor, args, per_step: list | None = None
) -> tuple[torch.Tensor, float | None]:
    meter = CapacityMeter(model)
    evals = args.steps * (2 if args.sampler == "heun" else 1)  # velocity evaluations per batch
    chunks = len(labels.split(args.batch_size))
    print(
        f"[diffmoe-eval] sampling {len(labels)} images ({args.sampler}, {args.steps} steps, CFG {args.cfg_scale}, "
        f"batches of {args.batch_size}): started",
        file=sys.stderr,
        flush=True,
    )
    t0 = time.perf_counter()
    with _progress(f"sampling {len(labels)} images", chunks * evals) as advance:
        images = sample_in_chunks(
            model, labels, chunk_size=args.batch_size, first_seed=args.seed, on_evaluation=advance,
            cfg_scale=args.cfg_scale, num_steps=args.steps, sampler=args.sampler,
        )  # fmt: skip
    seconds = time.perf_counter() - t0
    print(
        f"[diffmoe-eval] sampled {len(labels)} images ({args.sampler}, {args.steps} steps, CFG {args.cfg_scale}) "
        f"in {seconds:.1f} s: {len(labels) / max(seconds, 1e-9):.2f} images/s",
        file=sys.stderr,
        flush=True,
    )
    meter.close()
    if per_step is not None and meter.values:  # C_avg per ODE step (routing telemetry at evaluation)
        from diffmoe_dist.model.moe.layer import moe_layers
        from diffmoe_dist.train.telemetry import capacity_per_step

        evals = 2 if args.sampler == "heun" else 1
        per_step.extend(capacity_per_step(meter.values, len(moe_layers(model)), args.steps, evals))
    # Latent shards (made with a VAE): pixels through that VAE (or --vae); the digits are pixels already.
    from diffmoe_dist.data.decode import build_decoder

    decoder = build_decoder(args.cfg.data.path, args.vae or args.cfg.sample.vae)
    return (images if decoder is None else decoder(images)), meter.mean


@contextlib.contextmanager
def _progress(description: str, total: int):
    """A rich progress bar on stderr (stdout carries the JSON alone); off with DIFFMOE_NO_PROGRESS=1.
    Yields the function that advances it by one velocity evaluation."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("model evaluations"),
        TimeRemainingColumn(),
        console=Console(file=sys.stderr),
        disable=os.environ.get("DIFFMOE_NO_PROGRESS") == "1",
    )
    task = progress.add_task(description, total=total)
    with progress:
        yield lambda: progress.advance(task)


def sample_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="diffmoe-sample", description="Sample a class grid (or, text-to-image, a prompt grid) from a checkpoint."
    )
    _common_args(p)
    p.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--prompt", action="append", default=None, help="text-to-image caption; repeat for more columns")
    p.add_argument("--per-class", type=int, default=8, help="images per class (or per --prompt)")
    p.add_argument("--out", default="grid.png")
    args = p.parse_args(argv)
    model, cfg = _prepare(args)
    if cfg.model.task == "t2i" or args.prompt:
        if cfg.model.task != "t2i" or not args.prompt:
            fix = "pass --prompt TEXT (repeatable)" if cfg.model.task == "t2i" else "use --classes"
            print(f"diffmoe-sample: error: the checkpoint has model.task={cfg.model.task}: {fix}", file=sys.stderr)
            return 2
        labels = torch.arange(len(args.prompt)).repeat_interleave(args.per_class)
        images, c_avg = _sample_batched(prompt_model(model, cfg, args.prompt), labels, args)
        grid = images.view(len(args.prompt), args.per_class, *images.shape[1:]).transpose(0, 1)
        save_grid(grid.reshape(-1, *images.shape[1:]), args.out, nrow=len(args.prompt))
        print(json.dumps({"out": args.out, "num_images": len(labels), "capacity_avg": c_avg, "prompts": args.prompt}))
        return 0
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
    p = argparse.ArgumentParser(
        prog="diffmoe-eval", description="digits-FID and class (text-to-image: prompt) accuracy of samples."
    )
    _common_args(p)
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument(
        "--features",
        default=None,
        help="TorchScript feature extractor file (e.g. Inception); default: digits CNN",
    )
    args = p.parse_args(argv)
    # stdout carries the JSON alone (`diffmoe-eval ... | tee eval.json` must parse): whatever a
    # library or the classifier's first training prints goes to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        result = _evaluate(args)
    print(json.dumps(result))
    return 0


def _evaluate(args) -> dict:
    model, cfg = _prepare(args)
    from diffmoe_dist.eval.classifier import load_or_train_classifier
    from diffmoe_dist.eval.metrics import evaluate_images

    # First, so that a first use says it trains the classifier (and for how long) before sampling.
    classifier = load_or_train_classifier()

    per_step: list[float] = []

    if cfg.model.task == "t2i":
        # Prompts in held-out phrasings (never trained on), ten digits in turn; the classifier's
        # agreement with the prompted digit is the prompt accuracy.
        from diffmoe_dist.data.captions import heldout_prompts

        captions, labels = heldout_prompts(args.num_samples)
        unique = sorted(set(captions))
        index = torch.tensor([unique.index(c) for c in captions])
        images, c_avg = _sample_batched(prompt_model(model, cfg, unique), index, args, per_step)
    else:
        labels = torch.arange(args.num_samples) % cfg.model.num_classes
        images, c_avg = _sample_batched(model, labels, args, per_step)
    extractor = None
    if args.features:
        from diffmoe_dist.eval.fid import TorchScriptFeatures

        extractor = TorchScriptFeatures(args.features)
    result = evaluate_images(images, labels, extractor=extractor, classifier=classifier)
    if cfg.model.task == "t2i":
        result["prompt_accuracy"] = result.pop("class_accuracy")
        result["prompts"] = "held-out phrasings"
    result.update(
        {
            "capacity_avg": c_avg,
            "capacity_per_step": per_step or None,
            "cfg_scale": args.cfg_scale,
            "steps": args.steps,
            "sampler": args.sampler,
            "routing": args.routing or (cfg.moe.inference if has_predictor(cfg.moe) else None),
        }
    )
    return result


def main(argv=None) -> int:
    """``python -m diffmoe_dist.eval.cli [eval|sample] ARGS``: diffmoe-eval (the default) or diffmoe-sample."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("eval", "sample"):
        return (sample_main if argv[0] == "sample" else eval_main)(argv[1:])
    return eval_main(argv)


if __name__ == "__main__":
    sys.exit(main())
