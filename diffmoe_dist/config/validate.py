"""`validate_config`: every value checked before any process group or model is built, each bad one
reported on one line naming the field, the value and the fix. The values only: the files the run
reads (shards, a resume path) are checked by `diffmoe_dist.data.check`."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import yaml

import diffmoe_dist.config.options as options
from diffmoe_dist.config.environment import validate_environment
from diffmoe_dist.config.options import fail


def validate_config(cfg, world_size: int) -> None:
    """Raises ConfigError naming the first bad field of `cfg` (a `schema.Config`, which imports this
    module: hence no annotation) for a job of `world_size` ranks: each section's own checks in turn,
    then the ones that span sections (the parallel layout, sizes that would fail only after
    allocating) and the environment."""
    _finite(cfg)
    depth = validate_model(cfg.model)
    validate_moe(cfg.moe, depth)
    validate_objective(cfg)
    validate_parallel(cfg.parallel, cfg.moe, world_size)
    validate_data(cfg.data, world_size)
    validate_optim(cfg.optim)
    experts = cfg.moe.num_experts if cfg.moe.router != options.DENSE_ROUTER else None
    p, batch, accum = cfg.parallel.expert_parallel_size, cfg.data.global_batch_size, cfg.optim.grad_accum_steps
    if error := layout_error(world_size, p, experts, batch, accum):
        fail(*error)
    validate_train(cfg.train)
    validate_sample(cfg.sample)
    validate_checkpoint(cfg.checkpoint)
    validate_logging(cfg.logging, cfg.train.precision)
    _validate_bounds(cfg, world_size)
    validate_environment(os.environ)


# The smallest value of each count-like field and the fix, by section; each section's check reads its own.
AT_LEAST = {
    "data": {
        "shuffle_window": (0, "use 0 (one permutation of all samples) or a number of shards, e.g. 256"),
    },
    "train": {
        "max_minutes": (0, "use 0 (no limit) or a positive number of minutes"),
        "steps": (1, "use at least 1 step"),
        "seed": (0, "use a non-negative integer"),
        "threads": (0, "use 0 (cores / local processes) or a positive thread count"),
        "max_skipped_steps": (1, "use at least 1 (non-finite steps skipped in a row before the run stops)"),
    },
    "sample": {
        "num_steps": (1, "use at least 1 ODE step"),
        "every": (0, "use 0 (only at the end) or a positive number of steps"),
        "per_class": (1, "use at least 1 image per class"),
        "cfg_scale": (0, "use 1 (no guidance) or more, e.g. 2.0"),
    },
    "checkpoint": {
        "every": (0, "use 0 (only at the end) or a positive number of steps"),
        "keep_last": (1, "keep at least 1 checkpoint"),
        "every_minutes": (0, "use 0 (off) or a positive number of minutes, e.g. 20"),
    },
    "logging": {
        "log_every": (1, "use a positive number of steps, e.g. 10"),
        "routing_every": (0, "use 0 (off) or a positive number of steps"),
    },
}


def _at_least(values, section: str) -> None:
    """``AT_LEAST[section]`` on ``values``, the section's dataclass, in order."""
    for key, (least, fix) in AT_LEAST[section].items():
        if getattr(values, key) < least:
            fail(f"{section}.{key}", getattr(values, key), fix)


def _finite(cfg) -> None:
    """nan / inf pass every range check below: refused first, in every section."""
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                fail(f"{section.name}.{f.name}", value, "use a finite number")


def validate_model(m) -> int:
    """``model.*``; returns the resolved depth (the MoE checks place blocks in it)."""
    if m.size not in options.MODEL_SIZES:
        fail("model.size", m.size, f"use one of {', '.join(options.MODEL_SIZES)}")
    for name in ("depth", "hidden_size", "num_heads"):
        if getattr(m, name) is not None and getattr(m, name) < 1:
            fail(f"model.{name}", getattr(m, name), f"use a positive integer, or leave it unset (model.size={m.size})")
    depth, hidden, heads = m.resolved()
    if hidden % heads:
        fail("model.num_heads", heads, f"must divide model.hidden_size={hidden}")
    for name in ("image_size", "in_channels", "num_classes"):
        if getattr(m, name) < 1:
            fail(f"model.{name}", getattr(m, name), "use a positive integer")
    if m.patch_size < 1 or m.image_size % m.patch_size:
        fail("model.patch_size", m.patch_size, f"must divide model.image_size={m.image_size}")
    if m.mlp_ratio <= 0 or int(hidden * m.mlp_ratio) < 1:
        fail("model.mlp_ratio", m.mlp_ratio, "use a positive FFN width ratio, e.g. 4.0")
    if not 0.0 <= m.class_dropout < 1.0:
        fail("model.class_dropout", m.class_dropout, "use a probability in [0, 1)")
    if m.task not in options.TASKS:
        fail("model.task", m.task, f"use one of {', '.join(options.TASKS)}")
    if m.task == "t2i" and m.text_dim < 1:
        fail("model.text_dim", m.text_dim, "use the text encoder's width, e.g. 384 (MiniLM) or 4096 (T5-XXL)")
    if m.task == "t2i" and m.text_len < 2:
        fail("model.text_len", m.text_len, "use at least 2 caption tokens, e.g. 16 for digits, 120 for T5")
    return depth


def validate_moe(moe, depth: int) -> None:
    """``moe.*`` for a model of ``depth`` blocks."""
    if moe.router not in options.ROUTER_CHOICES:
        fail("moe.router", moe.router, f"use one of {', '.join(options.ROUTER_CHOICES)}")
    if moe.router != options.DENSE_ROUTER:
        if moe.num_experts < 2:
            fail("moe.num_experts", moe.num_experts, "use at least 2 experts, or moe.router=dense")
        if not 0.0 < moe.capacity <= moe.num_experts:
            fail("moe.capacity", moe.capacity, f"use a capacity in (0, moe.num_experts={moe.num_experts}]")
        if moe.interleave < 1:
            fail("moe.interleave", moe.interleave, "use 1 (every block) or 2 (every other block)")
        if moe.interleave > depth:  # block i is MoE iff i % interleave == interleave - 1
            fail("moe.interleave", moe.interleave, f"leaves no MoE block in model.depth={depth}: use at most {depth}")
        if moe.router == "token_choice" and not 1 <= moe.top_k <= moe.num_experts:
            fail("moe.top_k", moe.top_k, f"use 1..moe.num_experts={moe.num_experts}")
    if moe.pool not in options.POOLS:
        fail("moe.pool", moe.pool, f"use one of {', '.join(options.POOLS)}")
    _validate_dispatch(moe)
    if moe.inference not in options.INFERENCE_MODES:
        fail("moe.inference", moe.inference, f"use one of {', '.join(options.INFERENCE_MODES)}")
    if not 0.0 < moe.gamma < 1.0:
        fail("moe.gamma", moe.gamma, "use a threshold strictly between 0 and 1")
    if not 0.0 <= moe.threshold_momentum < 1.0:
        fail("moe.threshold_momentum", moe.threshold_momentum, "use a value in [0, 1), e.g. 0.95")
    if moe.predictor_loss_weight < 0:
        fail("moe.predictor_loss_weight", moe.predictor_loss_weight, "use a non-negative weight")
    validate_moe_extras(moe)
    if moe.aux_loss_weight < 0:
        fail("moe.aux_loss_weight", moe.aux_loss_weight, "use a non-negative weight, e.g. 0.01")


def validate_parallel(par, moe, world_size: int) -> None:
    """``parallel.*``; the expert-parallel size against the experts and the world size."""
    p = par.expert_parallel_size
    if p < 1:
        fail("parallel.expert_parallel_size", p, "use a positive integer")
    if p > 1 and moe.router == options.DENSE_ROUTER:
        fail("parallel.expert_parallel_size", p, "expert parallelism needs experts: set moe.router or use 1")
    if error := layout_error(world_size, p, moe.num_experts if moe.router != options.DENSE_ROUTER else None):
        fail(*error)
    if par.backend not in options.BACKENDS:
        fail("parallel.backend", par.backend, "use auto, gloo or nccl")
    if par.device not in options.DEVICES:
        fail("parallel.device", par.device, "use auto, cpu or cuda")
    if not 0 < par.timeout_minutes <= 24 * 60:
        fail("parallel.timeout_minutes", par.timeout_minutes, "use a positive number of minutes, e.g. 10")
    if par.grad_reduce_dtype not in options.GRAD_REDUCE_DTYPES:
        fail("parallel.grad_reduce_dtype", par.grad_reduce_dtype, "use fp32 or bf16")
    if par.grad_bucket_mb < 0:
        fail("parallel.grad_bucket_mb", par.grad_bucket_mb, "use 0 (chosen by device) or a positive size in MB")


def validate_data(data, world_size: int) -> None:
    """``data.*`` (the values: the shards themselves are checked by `diffmoe_dist.data.check`)."""
    if data.global_batch_size < 1:
        fail("data.global_batch_size", data.global_batch_size, f"use a multiple of the world size {world_size}")
    if data.loader not in options.LOADERS:
        fail("data.loader", data.loader, "use indexed or stream")
    if data.num_workers < 0:
        fail("data.num_workers", data.num_workers, "use 0 (load in the training process) or more workers")
    _at_least(data, "data")


def validate_optim(opt) -> None:
    if opt.lr <= 0:
        fail("optim.lr", opt.lr, "use a positive learning rate such as 1e-4")
    if opt.weight_decay < 0:
        fail("optim.weight_decay", opt.weight_decay, "use 0 (none) or a positive decay such as 0.01")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(opt, name) < 1.0:
            fail(f"optim.{name}", getattr(opt, name), "use a value in [0, 1), e.g. beta1=0.9 beta2=0.999")
    if opt.eps <= 0:
        fail("optim.eps", opt.eps, "use a small positive number such as 1e-8")
    if opt.warmup_steps < 0:
        fail("optim.warmup_steps", opt.warmup_steps, "use 0 or more steps")
    if opt.grad_clip < 0:
        fail("optim.grad_clip", opt.grad_clip, "use 0 to disable or a positive norm")
    if opt.adamw_impl not in options.ADAMW_IMPLS:
        fail("optim.adamw_impl", opt.adamw_impl, f"choose one of {', '.join(options.ADAMW_IMPLS)}")
    if opt.grad_accum_steps < 1:
        fail("optim.grad_accum_steps", opt.grad_accum_steps, "use 1 or more micro-batches per step")


def validate_train(tr) -> None:
    if tr.zero_stage not in options.ZERO_STAGES:
        fail("train.zero_stage", tr.zero_stage, "use 0 (plain data parallelism), 1 or 2 (ZeRO; MoE refuses 3)")
    if tr.zero_stage > 0:
        _validate_deepspeed_json(tr)
    if not tr.run_dir:
        fail("train.run_dir", tr.run_dir, "name a directory, e.g. runs/my-run")
    if tr.precision not in options.PRECISIONS:
        fail("train.precision", tr.precision, "use fp32 or bf16")
    if not 0.0 <= tr.ema_decay < 1.0:
        fail("train.ema_decay", tr.ema_decay, "use a decay in [0, 1), e.g. 0.9999 (0.999 for short runs)")
    _at_least(tr, "train")
    if not tr.resume:
        fail("train.resume", tr.resume, "use auto, never, or a run / checkpoint directory")


def validate_sample(sample) -> None:
    if sample.sampler not in options.SAMPLERS:
        fail("sample.sampler", sample.sampler, "use euler or heun")
    _at_least(sample, "sample")


def validate_checkpoint(ckpt) -> None:
    _at_least(ckpt, "checkpoint")


def validate_logging(log, precision: str) -> None:
    """``logging.*``; a cluster YAML as ``mfu_peak`` must give ``train.precision``'s peak."""
    _at_least(log, "logging")
    if log.wandb not in options.WANDB_MODES:
        fail("logging.wandb", log.wandb, "use offline, online or disabled")
    _validate_mfu_peak(log.mfu_peak, precision)


MAX_SEED = 2**32 - 1  # the streams are seeded with seed * 104729 + rank (and + 1_000_003 * step): int64 room
MAX_GRID_IMAGES = 10_000  # sample grids are sampled and held in memory at once


def _validate_bounds(cfg, world_size: int) -> None:
    """Sizes that would fail only after allocating (or crash a library): refused by value here."""
    tr, data, moe, m = cfg.train, cfg.data, cfg.moe, cfg.model
    cores = os.cpu_count() or 1
    if tr.seed > MAX_SEED:
        fail("train.seed", tr.seed, f"use 0..{MAX_SEED}")
    # Oversubscription is legal (slow); thousands of threads or workers per process crash or exhaust memory.
    if tr.threads > 4 * cores:
        fail("train.threads", tr.threads, f"use at most {4 * cores} (4 per core here; 0: cores / local ranks)")
    if data.num_workers > max(16, 4 * cores):
        fail("data.num_workers", data.num_workers, f"use at most {max(16, 4 * cores)} (4 per core here)")
    images = m.num_classes * cfg.sample.per_class
    if images > MAX_GRID_IMAGES:
        fail("sample.per_class", cfg.sample.per_class, f"{m.num_classes} classes x it must stay <= {MAX_GRID_IMAGES}")
    if moe.router not in ("expert_choice_global", "expert_choice_local"):
        return
    # k = floor(C N / E) tokens per expert (model/moe/pool.py): 0 would make every MoE layer take no token.
    seq = (m.image_size // m.patch_size) ** 2
    micro = data.global_batch_size // (world_size * cfg.optim.grad_accum_steps)
    ranks = {"rank": 1, "ep": cfg.parallel.expert_parallel_size, "dp": world_size}[moe.pool]
    tokens = seq if moe.router == "expert_choice_local" else seq * micro * ranks
    if math.floor(moe.capacity * tokens / moe.num_experts + 1e-9) < 1:
        fail(
            "moe.capacity",
            moe.capacity,
            f"gives k = floor(C x {tokens} tokens / {moe.num_experts} experts) = 0: every MoE layer would take no "
            f"token; use at least {moe.num_experts / tokens:.3g}",
        )


def _validate_dispatch(moe) -> None:
    if moe.dispatch not in options.DISPATCHES:
        fail("moe.dispatch", moe.dispatch, f"use one of {', '.join(options.DISPATCHES)}")
    if moe.dispatch == "padded" and moe.router not in options.PADDED_ROUTERS:
        fail(
            "moe.dispatch",
            moe.dispatch,
            f"moe.router={moe.router} bounds no expert's rows per rank below all of its tokens (padding would "
            f"send up to E / capacity times the rows): use moe.dispatch=exact, or a router of {options.PADDED_ROUTERS}",
        )


def divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def layout_error(
    world_size: int, ep_size: int, num_experts: int | None, global_batch: int | None = None, accum: int = 1
) -> tuple[str, int, str] | None:
    """The one check of a parallel layout (config validation, process-group setup and the planner
    call it): EP divides the experts and the world size, and the world size x accumulation steps
    divide the global batch. ``(field, value, fix)`` of the first problem, or None."""
    field = "parallel.expert_parallel_size"
    if num_experts is not None and num_experts % ep_size:
        return field, ep_size, f"must divide moe.num_experts={num_experts} (use one of {divisors(num_experts)})"
    if world_size % ep_size:
        return field, ep_size, f"must divide the world size {world_size} (use one of {divisors(world_size)})"
    if global_batch is not None and global_batch % world_size:
        return "data.global_batch_size", global_batch, f"use a multiple of the world size {world_size}"
    if global_batch is not None and global_batch % (world_size * accum):
        fix = f"world size {world_size} x accumulation steps must divide data.global_batch_size={global_batch}"
        return "optim.grad_accum_steps", accum, fix
    return None


def deepspeed_config_path(train) -> str:
    """``train.deepspeed_config``, else the checkout's ``configs/deepspeed/zero{train.zero_stage}.json``."""
    default = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / f"zero{train.zero_stage}.json"
    return train.deepspeed_config or str(default)


def _validate_deepspeed_json(train) -> None:
    path = deepspeed_config_path(train)
    if not os.path.isfile(path):
        fail("train.deepspeed_config", path, "pass an existing DeepSpeed JSON, e.g. configs/deepspeed/zero1.json")
    try:
        with open(path) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
    except ValueError as exc:
        fail("train.deepspeed_config", path, f"the file is not valid JSON ({exc})")
    if stage != train.zero_stage:
        fail("train.zero_stage", train.zero_stage, f"{path} sets zero_optimization.stage={stage}: make them agree")


_MFU_PEAK_FIX = "use measure, off, TFLOPS per rank (e.g. 989) or a cluster YAML such as tools/clusters/h100_32x8.yaml"


def _validate_mfu_peak(value: str, precision: str) -> None:
    """measure | off | TFLOPS per rank | a cluster YAML whose ``peak_flops`` (a number, or one per
    precision, per device) gives `precision`'s peak (tools/clusters/*.yaml)."""
    name = "logging.mfu_peak"
    if value in options.MFU_PEAK_WORDS:
        return
    try:
        tflops = float(value)
    except ValueError:
        tflops = None
    if tflops is not None:
        if not (math.isfinite(tflops) and tflops > 0):
            fail(name, value, f"a peak must be a positive number of TFLOPS: {_MFU_PEAK_FIX}")
        return
    cluster_peak_flops(value, precision)


def cluster_peak_flops(path: str, precision: str) -> float:
    """A cluster YAML's (tools/clusters/*.yaml) per-device ``peak_flops`` for ``precision`` in
    FLOP/s, for ``logging.mfu_peak``; a one-line ConfigError naming the field when it has none."""
    name = "logging.mfu_peak"
    if not os.path.isfile(path):
        what = "the file does not exist" if path.endswith((".yaml", ".yml")) else "not a known value"
        fail(name, path, f"{what}: {_MFU_PEAK_FIX}")
    try:
        with open(path) as f:
            peak = yaml.safe_load(f).get("peak_flops")
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        fail(name, path, f"the file is not a cluster YAML mapping: {_MFU_PEAK_FIX}")
    peak = peak.get(precision) if isinstance(peak, dict) else peak
    if isinstance(peak, bool) or not isinstance(peak, (int, float, str)):
        peak = None
    try:
        flops = float(peak) if peak is not None else 0.0
    except ValueError:  # YAML 1.1 reads 989e12 as a string: float() parses it
        flops = 0.0
    if not flops > 0:
        fail(name, path, f"the file gives no positive peak_flops for train.precision={precision}: add one")
    return flops


def validate_moe_extras(moe) -> None:
    """Shared experts and the training capacity schedule (issue 26)."""
    if moe.num_shared_experts < 0:
        fail("moe.num_shared_experts", moe.num_shared_experts, "use 0 (none) or a positive count of dense experts")
    full, end = moe.capacity_full_steps, moe.capacity_decay_steps
    if full < 0 or end < 0 or (end and end <= full) or (full and not end):
        fail(
            "moe.capacity_decay_steps",
            end,
            f"use 0 with moe.capacity_full_steps=0 (no schedule), or a step after moe.capacity_full_steps={full}",
        )
    if end and moe.router == options.DENSE_ROUTER:
        fail("moe.capacity_decay_steps", end, "a capacity schedule needs an MoE router")


def validate_objective(cfg) -> None:
    objective = cfg.diffusion.objective
    if objective not in options.OBJECTIVES:
        fail("diffusion.objective", objective, f"use one of {', '.join(options.OBJECTIVES)}")
    if objective == "ddpm" and cfg.model.task != "c2i":
        fail("diffusion.objective", objective, "DDPM is built for class-conditional models: use model.task=c2i or flow")
