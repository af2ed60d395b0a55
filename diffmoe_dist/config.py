"""One typed config tree: YAML files plus dotted command-line overrides, validated up front.

`load_config("configs/local/diffmoe-tiny.yaml", ["model.depth=6", "optim.lr=3e-4"])` returns a
`Config`; `validate()` raises `ConfigError` with one line naming the field, the value and the fix,
before any process group or model is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Paper sizes (DiT, Table 4 of Peebles & Xie; DiffMoE Table 1 uses the same backbones).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (depth, hidden_size, num_heads)
    "tiny": (6, 192, 6),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

ROUTERS = ("dense", "expert_choice_global", "expert_choice_local", "token_choice")
POOLS = ("rank", "ep", "dp")
INFERENCE_MODES = ("dynamic", "static", "interval")
TASKS = ("c2i", "t2i")


ADAMW_IMPLS = ("foreach", "fused", "loop")


class ConfigError(ValueError):
    """A bad config value: the message names the field, the value and the fix, on one line."""


@dataclass
class ModelConfig:
    size: str = "tiny"
    depth: int | None = None  # None: from `size`
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int = 2
    in_channels: int = 1
    image_size: int = 16  # latent / pixel side length
    num_classes: int = 10
    class_dropout: float = 0.1  # label (c2i) or caption (t2i) dropout for classifier-free guidance
    mlp_ratio: float = 4.0
    task: str = "c2i"  # c2i (class labels) | t2i (captions: cross-attention to text-encoder tokens)
    text_dim: int = 384  # t2i: text-encoder width (384 all-MiniLM-L6-v2, 4096 T5-XXL)
    text_len: int = 16  # t2i: caption tokens per sample, padded / truncated (shards store exactly this)

    def resolved(self) -> tuple[int, int, int]:
        depth, hidden, heads = MODEL_SIZES[self.size]
        # None (not 0) means "from size": an explicit 0 is refused by validate(), not replaced.
        pick = lambda mine, default: default if mine is None else mine  # noqa: E731
        return (pick(self.depth, depth), pick(self.hidden_size, hidden), pick(self.num_heads, heads))


@dataclass
class MoEConfig:
    router: str = "dense"  # dense | expert_choice_global (DiffMoE) | expert_choice_local (EC) | token_choice (TC)
    num_experts: int = 16
    capacity: float = 1.0  # C
    top_k: int = 1  # token_choice only
    interleave: int = 2  # block i is MoE iff i % interleave == interleave - 1
    predictor_loss_weight: float = 1.0
    aux_loss_weight: float = 0.01
    threshold_momentum: float = 0.95
    pool: str = "dp"  # rank | ep | dp
    inference: str = "dynamic"  # dynamic | static | interval
    gamma: float = 0.5  # interval-mode threshold on sigmoid(predictor logit)


@dataclass
class ParallelConfig:
    expert_parallel_size: int = 1
    backend: str = "auto"  # auto | gloo | nccl
    device: str = "auto"  # auto | cpu | cuda
    # A rank stuck in a collective this long raises (NCCL's watchdog) instead of idling the whole job.
    timeout_minutes: float = 10.0
    # The distributed path (process group, parallelize, pool, all-to-all, collectives) at world size 1.
    force_distributed: bool = False
    grad_reduce_dtype: str = "fp32"  # fp32 | bf16: the dtype gradients travel in (master weights stay fp32)
    overlap_grad_reduce: bool = True  # reduce gradient buckets during backward (ZeRO: overlap_comm)
    grad_bucket_mb: float = 0.0  # gradient bucket size in MB; 0 = chosen by device


@dataclass
class DataConfig:
    dataset: str = "digits"
    path: str = "data/digits"  # directory made by tools/make_shards.py (train/ and heldout/)
    global_batch_size: int = 128
    loader: str = "indexed"  # indexed (in memory, exact resume) | stream (webdataset streaming)
    num_workers: int = 0
    shuffle_buffer: int = 1000
    text_encoder: str = "minilm"  # t2i: "minilm" (packaged all-MiniLM-L6-v2) or a local HF model directory


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    warmup_steps: int = 50
    grad_clip: float = 1.0  # 0 disables
    grad_accum_steps: int = 1  # micro-batches per optimizer step (the global batch is split into them)
    # torch AdamW kernel: foreach (multi-tensor; bitwise equal to the per-parameter loop, which torch
    # picks on CPU by default), fused (one pass over param, grad and moments; differs in the last
    # bits), or loop. On CPU the optimizer touches every expert every step (benchmarks/train_throughput.py).
    adamw_impl: str = "foreach"


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    run_dir: str = "runs/default"
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+step)/(10+step)) so short runs get a useful EMA
    threads: int = 0  # torch threads per process; 0 = cores / local processes
    max_minutes: float = 0.0  # 0 = no limit
    resume: str = "auto"  # auto | never | path to a checkpoint directory
    # Bitwise-reproducible steps (and so exact resume): with 2+ threads some CPU kernels reduce in
    # a run-dependent order (measured: weights drifted by 1e-10 between identical runs).
    deterministic: bool = True
    # 0: plain data parallelism (bucketed all-reduce, replicated AdamW states); 1 / 2: DeepSpeed ZeRO
    # stage 1 / 2 (optimizer states / and gradients partitioned, experts over their EDP group).
    zero_stage: int = 0
    deepspeed_config: str = ""  # DeepSpeed JSON; "" = configs/deepspeed/zero{zero_stage}.json
    activation_checkpointing: bool = False  # recompute each DiT block in backward


@dataclass
class SampleConfig:
    every: int = 0  # steps between sample grids; 0 = only at the end
    cfg_scale: float = 2.0
    num_steps: int = 50
    sampler: str = "euler"  # euler | heun
    per_class: int = 4
    vae: str = ""  # latent shards: decode grids with this AutoencoderKL dir ("" = the one the shards record)


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; 0 = only at the end
    keep_last: int = 2


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "diffmoe-dist"
    routing_every: int = 0
    # MFU's per-rank peak: measure (a matmul timed at start-up) | off | TFLOPS per rank | cluster YAML
    mfu_peak: str = "measure"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(
        self, world_size: int | None = None, *, files: bool = False, files_share: tuple[int, int] = (0, 1)
    ) -> Config:
        """Raises ConfigError naming the first bad field; returns self so calls can chain.
        ``files``: also check what the run reads from disk (`check_files`): the CLI does, before any
        process group starts (``files_share=(r, W)``: rank r reads the headers of shards r, r + W, ...);
        tests that build a Config for a fake data path do not."""
        _validate(self, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
        if files:
            check_files(self, *files_share)
        return self


def _fail(name: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid: {fix}")


def _validate(cfg: Config, world_size: int) -> None:
    m, moe, par, data, opt, tr = cfg.model, cfg.moe, cfg.parallel, cfg.data, cfg.optim, cfg.train
    for section in dataclasses.fields(cfg):  # nan / inf pass every range check below: refuse them first
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                _fail(f"{section.name}.{f.name}", value, "use a finite number")
    if m.size not in MODEL_SIZES:
        _fail("model.size", m.size, f"use one of {', '.join(MODEL_SIZES)}")
    for name in ("depth", "hidden_size", "num_heads"):
        if getattr(m, name) is not None and getattr(m, name) < 1:
            _fail(f"model.{name}", getattr(m, name), f"use a positive integer, or leave it unset (model.size={m.size})")
    depth, hidden, heads = m.resolved()
    if hidden % heads:
        _fail("model.num_heads", heads, f"must divide model.hidden_size={hidden}")
    for name in ("image_size", "in_channels", "num_classes"):
        if getattr(m, name) < 1:
            _fail(f"model.{name}", getattr(m, name), "use a positive integer")
    if m.patch_size < 1 or m.image_size % m.patch_size:
        _fail("model.patch_size", m.patch_size, f"must divide model.image_size={m.image_size}")
    if m.mlp_ratio <= 0 or int(hidden * m.mlp_ratio) < 1:
        _fail("model.mlp_ratio", m.mlp_ratio, "use a positive FFN width ratio, e.g. 4.0")
    if not 0.0 <= m.class_dropout < 1.0:
        _fail("model.class_dropout", m.class_dropout, "use a probability in [0, 1)")
    if m.task not in TASKS:
        _fail("model.task", m.task, f"use one of {', '.join(TASKS)}")
    if m.task == "t2i" and m.text_dim < 1:
        _fail("model.text_dim", m.text_dim, "use the text encoder's width, e.g. 384 (MiniLM) or 4096 (T5-XXL)")
    if m.task == "t2i" and m.text_len < 2:
        _fail("model.text_len", m.text_len, "use at least 2 caption tokens, e.g. 16 for digits, 120 for T5")
    if moe.router not in ROUTERS:
        _fail("moe.router", moe.router, f"use one of {', '.join(ROUTERS)}")
    if moe.router != "dense":
        if moe.num_experts < 2:
            _fail("moe.num_experts", moe.num_experts, "use at least 2 experts, or moe.router=dense")
        if not 0.0 < moe.capacity <= moe.num_experts:
            _fail("moe.capacity", moe.capacity, f"use a capacity in (0, moe.num_experts={moe.num_experts}]")
        if moe.interleave < 1:
            _fail("moe.interleave", moe.interleave, "use 1 (every block) or 2 (every other block)")
        if moe.interleave > depth:  # block i is MoE iff i % interleave == interleave - 1
            _fail("moe.interleave", moe.interleave, f"leaves no MoE block in model.depth={depth}: use at most {depth}")
        if moe.router == "token_choice" and not 1 <= moe.top_k <= moe.num_experts:
            _fail("moe.top_k", moe.top_k, f"use 1..moe.num_experts={moe.num_experts}")
    if moe.pool not in POOLS:
        _fail("moe.pool", moe.pool, f"use one of {', '.join(POOLS)}")
    if moe.inference not in INFERENCE_MODES:
        _fail("moe.inference", moe.inference, f"use one of {', '.join(INFERENCE_MODES)}")
    if not 0.0 < moe.gamma < 1.0:
        _fail("moe.gamma", moe.gamma, "use a threshold strictly between 0 and 1")
    if not 0.0 <= moe.threshold_momentum < 1.0:
        _fail("moe.threshold_momentum", moe.threshold_momentum, "use a value in [0, 1), e.g. 0.95")
    if moe.predictor_loss_weight < 0:
        _fail("moe.predictor_loss_weight", moe.predictor_loss_weight, "use a non-negative weight")
    if moe.aux_loss_weight < 0:
        _fail("moe.aux_loss_weight", moe.aux_loss_weight, "use a non-negative weight, e.g. 0.01")
    p = par.expert_parallel_size
    if p < 1:
        _fail("parallel.expert_parallel_size", p, "use a positive integer")
    if p > 1 and moe.router == "dense":
        _fail("parallel.expert_parallel_size", p, "expert parallelism needs experts: set moe.router or use 1")
    if moe.router != "dense" and moe.num_experts % p:
        _fail("parallel.expert_parallel_size", p, f"must divide moe.num_experts={moe.num_experts}")
    if world_size % p:
        _fail("parallel.expert_parallel_size", p, f"must divide the world size {world_size}")
    if par.backend not in ("auto", "gloo", "nccl"):
        _fail("parallel.backend", par.backend, "use auto, gloo or nccl")
    if par.device not in ("auto", "cpu", "cuda"):
        _fail("parallel.device", par.device, "use auto, cpu or cuda")
    if not 0 < par.timeout_minutes <= 24 * 60:
        _fail("parallel.timeout_minutes", par.timeout_minutes, "use a positive number of minutes, e.g. 10")
    if data.global_batch_size < 1 or data.global_batch_size % world_size:
        _fail("data.global_batch_size", data.global_batch_size, f"use a multiple of the world size {world_size}")
    if data.loader not in ("indexed", "stream"):
        _fail("data.loader", data.loader, "use indexed or stream")
    if data.num_workers < 0:
        _fail("data.num_workers", data.num_workers, "use 0 (load in the training process) or more workers")
    if data.shuffle_buffer < 1:
        _fail("data.shuffle_buffer", data.shuffle_buffer, "use at least 1 sample (1: no shuffling)")
    if opt.lr <= 0:
        _fail("optim.lr", opt.lr, "use a positive learning rate such as 1e-4")
    if opt.weight_decay < 0:
        _fail("optim.weight_decay", opt.weight_decay, "use 0 (none) or a positive decay such as 0.01")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(opt, name) < 1.0:
            _fail(f"optim.{name}", getattr(opt, name), "use a value in [0, 1), e.g. beta1=0.9 beta2=0.999")
    if opt.eps <= 0:
        _fail("optim.eps", opt.eps, "use a small positive number such as 1e-8")
    if opt.warmup_steps < 0:
        _fail("optim.warmup_steps", opt.warmup_steps, "use 0 or more steps")
    if opt.grad_clip < 0:
        _fail("optim.grad_clip", opt.grad_clip, "use 0 to disable or a positive norm")
    if opt.adamw_impl not in ADAMW_IMPLS:
        _fail("optim.adamw_impl", opt.adamw_impl, f"choose one of {', '.join(ADAMW_IMPLS)}")
    if opt.grad_accum_steps < 1:
        _fail("optim.grad_accum_steps", opt.grad_accum_steps, "use 1 or more micro-batches per step")
    if data.global_batch_size % (world_size * opt.grad_accum_steps):
        _fail(
            "optim.grad_accum_steps",
            opt.grad_accum_steps,
            f"world size {world_size} x accumulation steps must divide data.global_batch_size={data.global_batch_size}",
        )
    if tr.zero_stage not in (0, 1, 2):
        _fail("train.zero_stage", tr.zero_stage, "use 0 (plain data parallelism), 1 or 2 (ZeRO; MoE refuses 3)")
    if tr.zero_stage > 0:
        _validate_deepspeed_json(tr)
    if tr.max_minutes < 0:
        _fail("train.max_minutes", tr.max_minutes, "use 0 (no limit) or a positive number of minutes")
    if tr.steps < 1:
        _fail("train.steps", tr.steps, "use at least 1 step")
    if tr.seed < 0:
        _fail("train.seed", tr.seed, "use a non-negative integer")
    if tr.threads < 0:
        _fail("train.threads", tr.threads, "use 0 (cores / local processes) or a positive thread count")
    if not tr.run_dir:
        _fail("train.run_dir", tr.run_dir, "name a directory, e.g. runs/my-run")
    if tr.precision not in ("fp32", "bf16"):
        _fail("train.precision", tr.precision, "use fp32 or bf16")
    if not 0.0 <= tr.ema_decay < 1.0:
        _fail("train.ema_decay", tr.ema_decay, "use a decay in [0, 1), e.g. 0.9999 (0.999 for short runs)")
    if cfg.sample.sampler not in ("euler", "heun"):
        _fail("sample.sampler", cfg.sample.sampler, "use euler or heun")
    if cfg.sample.num_steps < 1:
        _fail("sample.num_steps", cfg.sample.num_steps, "use at least 1 ODE step")
    if cfg.sample.every < 0:
        _fail("sample.every", cfg.sample.every, "use 0 (only at the end) or a positive number of steps")
    if cfg.sample.per_class < 1:
        _fail("sample.per_class", cfg.sample.per_class, "use at least 1 image per class")
    if cfg.sample.cfg_scale < 0:
        _fail("sample.cfg_scale", cfg.sample.cfg_scale, "use 1 (no guidance) or more, e.g. 2.0")
    if cfg.checkpoint.every < 0:
        _fail("checkpoint.every", cfg.checkpoint.every, "use 0 (only at the end) or a positive number of steps")
    if cfg.checkpoint.keep_last < 1:
        _fail("checkpoint.keep_last", cfg.checkpoint.keep_last, "keep at least 1 checkpoint")
    if cfg.logging.log_every < 1:
        _fail("logging.log_every", cfg.logging.log_every, "use a positive number of steps, e.g. 10")
    if cfg.logging.routing_every < 0:
        _fail("logging.routing_every", cfg.logging.routing_every, "use 0 (off) or a positive number of steps")
    if cfg.logging.wandb not in ("offline", "online", "disabled"):
        _fail("logging.wandb", cfg.logging.wandb, "use offline, online or disabled")
    _validate_mfu_peak(cfg.logging.mfu_peak)
    if par.grad_reduce_dtype not in ("fp32", "bf16"):
        _fail("parallel.grad_reduce_dtype", par.grad_reduce_dtype, "use fp32 or bf16")
    if par.grad_bucket_mb < 0:
        _fail("parallel.grad_bucket_mb", par.grad_bucket_mb, "use 0 (chosen by device) or a size in MB")
    if not tr.resume:
        _fail("train.resume", tr.resume, "use auto, never, or a run / checkpoint directory")


def _validate_mfu_peak(value: str) -> None:
    value = str(value)
    if value in ("measure", "off") or value.endswith((".yaml", ".yml")):
        return
    try:
        ok = float(value) > 0
    except ValueError:
        ok = False
    if not ok:
        _fail("logging.mfu_peak", value, "use measure, off, a peak in TFLOPS per rank (e.g. 989) or a cluster YAML")


def deepspeed_config_path(train: TrainConfig) -> str:
    """``train.deepspeed_config``, else the checkout's ``configs/deepspeed/zero{train.zero_stage}.json``."""
    default = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / f"zero{train.zero_stage}.json"
    return train.deepspeed_config or str(default)


def _validate_deepspeed_json(train: TrainConfig) -> None:
    import json

    path = deepspeed_config_path(train)
    if not os.path.isfile(path):
        _fail("train.deepspeed_config", path, "pass an existing DeepSpeed JSON, e.g. configs/deepspeed/zero1.json")
    try:
        with open(path) as f:
            stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
    except ValueError as exc:
        _fail("train.deepspeed_config", path, f"the file is not valid JSON ({exc})")
    if stage != train.zero_stage:
        _fail("train.zero_stage", train.zero_stage, f"{path} sets zero_optimization.stage={stage}: make them agree")


def check_files(cfg: Config, rank: int = 0, world_size: int = 1) -> None:
    """What the run will read, checked before anything starts: a ``train.resume`` path and the
    training shards (`check_shards`). (The text encoder is only loaded to sample: not checked.)"""
    tr = cfg.train
    if tr.resume not in ("auto", "never", "archive"):
        if not os.path.exists(tr.resume):
            _fail("train.resume", tr.resume, "does not exist: use auto, never, or a run / checkpoint directory")
        if not os.path.isdir(tr.resume):
            _fail("train.resume", tr.resume, "is not a directory: pass a run directory or its step_* directories")
    check_shards(cfg.data.path, rank, world_size)


_SHARDS_HINT = "make the shards with `python tools/make_shards.py digits --out DIR`, or pass data.path=DIR"


def check_shards(path: str, rank: int = 0, world_size: int = 1) -> None:
    """``path/train``: a manifest listing at least one sample, and every listed shard a tar of the
    size the manifest records."""
    import json

    train = os.path.join(path, "train")
    if not os.path.isdir(path):
        _fail("data.path", path, f"the directory does not exist: {_SHARDS_HINT}")
    manifest_path = os.path.join(train, "manifest.json")
    if not os.path.isfile(manifest_path):
        what = "has no train/" if not os.path.isdir(train) else "has no train/manifest.json"
        _fail("data.path", path, f"{what}: {_SHARDS_HINT}")
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        shards = [s["name"] for s in manifest["shards"]]
        num_samples = int(manifest["num_samples"])
    except (ValueError, KeyError, TypeError) as exc:
        _fail("data.path", path, f"{manifest_path} is not a shard manifest ({exc!r}): {_SHARDS_HINT}")
    if not shards or num_samples < 1:
        _fail("data.path", path, f"{manifest_path} lists no samples: {_SHARDS_HINT}")
    # Shard by shard: the one check the stream loader also relies on (data/stream.py), one stat and
    # one header read per shard, each rank a 1/W share. Imported here, not at the top: config sits
    # above every other package.
    from diffmoe_dist.data.stream import ShardError
    from diffmoe_dist.data.stream import check_shards as check_each_shard

    try:
        check_each_shard(path, rank, world_size)  # train/ and heldout/
    except ShardError as exc:
        raise ConfigError(f"data.path={path!r} is invalid: {exc}") from None


def _did_you_mean(name: str, known, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    listed = f"known are {', '.join(known)}"
    return f"did you mean {prefix}{close[0]}? ({listed})" if close else listed


def _yaml_load(text_or_file, origin: str) -> Any:
    """yaml.safe_load with its errors as one line: a syntax error's position, or a refused tag."""
    try:
        return yaml.safe_load(text_or_file)
    except yaml.constructor.ConstructorError as exc:
        tag = next(iter(str(exc.problem).split("'")[1:2]), exc.problem)
        where = f" at line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError(
            f"{origin}: the YAML tag {tag!r}{where} is refused (configs are plain YAML: numbers, strings, lists, maps)"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{origin} is not valid YAML{where}: {problem}") from None


def _coerce(name: str, text: str, current: Any, annotation: Any) -> Any:
    """Parses an override string with YAML and checks it against the field's type."""
    value = _yaml_load(text, name)
    kinds = str(annotation)
    if isinstance(current, bool) or kinds == "bool":
        if not isinstance(value, bool):
            _fail(name, text, "use true or false")
        return value
    if "int" in kinds and "float" not in kinds:
        if value is None and "None" in kinds:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(name, text, "use an integer")
        return value
    if "float" in kinds:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" as a string; Python's float() does not
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(name, text, "use a number")
        return float(value)
    return text if value is None or not isinstance(value, str) else value


def _apply(section_obj: Any, section: str, values: dict[str, Any], origin: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, raw in values.items():
        name = f"{section}.{key}"
        if key not in fields:
            hint = _did_you_mean(key, fields, section + ".")
            raise ConfigError(f"{name} (from {origin}) is not a config field: {hint}")
        current = getattr(section_obj, key)
        value = _coerce(name, raw if isinstance(raw, str) else yaml.safe_dump(raw), current, fields[key].type)
        setattr(section_obj, key, value)


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    cfg = Config()
    sections = {f.name for f in dataclasses.fields(cfg)}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"--config {str(path)!r} does not exist: pass a YAML file such as configs/local/diffmoe-tiny.yaml"
            )
        with open(path) as f:
            data = _yaml_load(f, f"--config {str(path)!r}") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config {str(path)!r} is not a YAML mapping of sections (model:, moe:, optim:, ...)")
        for section, values in data.items():
            if section not in sections:
                raise ConfigError(
                    f"{section} (in {path}) is not a config section: {_did_you_mean(str(section), sorted(sections))}"
                )
            if values is not None and not isinstance(values, dict):
                raise ConfigError(f"{section} (in {path}) must map field names to values")
            _apply(getattr(cfg, section), section, values or {}, str(path))
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is malformed: write section.field=value, e.g. optim.lr=3e-4")
        key, text = item.split("=", 1)
        section, fname = key.split(".", 1)
        if section not in sections:
            raise ConfigError(f"override {item!r} names no config section: {_did_you_mean(section, sorted(sections))}")
        _apply(getattr(cfg, section), section, {fname: text}, "command line")
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuilds a Config from `Config.to_dict()` output (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    for section, values in data.items():
        _apply(getattr(cfg, section), section, values, "checkpoint")
    return cfg


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, path)
