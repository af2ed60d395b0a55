"""The typed config tree: one small dataclass per section, with the defaults every run starts from."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from diffmoe_dist.config.options import MODEL_SIZES
from diffmoe_dist.config.resume import FREE, WARN, refuse
from diffmoe_dist.config.validate import validate_config


@dataclass
class ModelConfig:
    size: str = field(default="tiny", metadata=FREE)  # resume compares the resolved depth / width / heads
    depth: int | None = None  # None: from `size`
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int = 2
    in_channels: int = 1
    image_size: int = 16  # latent / pixel side length
    num_classes: int = 10
    # label (c2i) or caption (t2i) dropout for classifier-free guidance
    class_dropout: float = field(default=0.1, metadata=WARN)
    mlp_ratio: float = 4.0
    # c2i (class labels) | t2i (captions: cross-attention to text-encoder tokens)
    task: str = field(default="c2i", metadata=refuse("model"))
    text_dim: int = 384  # t2i: text-encoder width (384 all-MiniLM-L6-v2, 4096 T5-XXL)
    text_len: int = 16  # t2i: caption tokens per sample, padded / truncated (shards store exactly this)

    def resolved(self) -> tuple[int, int, int]:
        depth, hidden, heads = MODEL_SIZES[self.size]
        # None (not 0) means "from size": an explicit 0 is refused by validate(), not replaced.
        pick = lambda mine, default: default if mine is None else mine  # noqa: E731
        return (pick(self.depth, depth), pick(self.hidden_size, hidden), pick(self.num_heads, heads))

    @property
    def tokens_per_image(self) -> int:
        """Image tokens (patches) per sample: ``(image_size / patch_size)^2``."""
        return (self.image_size // self.patch_size) ** 2


@dataclass
class MoEConfig:
    # dense | expert_choice_global (DiffMoE) | expert_choice_local | token_choice | expert_race
    router: str = field(default="dense", metadata=refuse("router"))
    num_experts: int = field(default=16, metadata=refuse("expert count"))
    capacity: float = 1.0  # C
    top_k: int = 1  # token_choice only
    # block i is MoE iff i % interleave == interleave - 1
    interleave: int = field(default=2, metadata=refuse("MoE placement"))
    predictor_loss_weight: float = 1.0
    aux_loss_weight: float = 0.01
    threshold_momentum: float = 0.95
    pool: str = "dp"  # rank | ep | dp
    inference: str = field(default="dynamic", metadata=FREE)  # dynamic | static | interval
    gamma: float = field(default=0.5, metadata=FREE)  # interval-mode threshold on sigmoid(predictor logit)
    num_shared_experts: int = 0  # dense experts (full-size MLPs) every token passes through, beside the routed ones
    # exact (row counts read on the host) | padded (blocks of the capacity bound, no read)
    dispatch: str = field(default="exact", metadata=FREE)
    # Training capacity schedule (official code): C = E up to step capacity_full_steps, then linear to
    # `capacity` at step capacity_decay_steps, then fixed. 0 and 0: no schedule.
    capacity_full_steps: int = 0
    capacity_decay_steps: int = 0


@dataclass
class ParallelConfig:
    expert_parallel_size: int = 1
    backend: str = "auto"  # auto | gloo | nccl
    device: str = "auto"  # auto | cpu | cuda
    # A rank stuck in a collective this long raises (NCCL's watchdog) instead of idling the whole job.
    timeout_minutes: float = 10.0
    # The distributed path (process group, parallelize, pool, all-to-all, collectives) at world size 1.
    force_distributed: bool = False
    grad_reduce_dtype: str = (
        "fp32"  # fp32 | bf16: the dtype DP / EDP gradient reduction travels in (master weights fp32)
    )
    # Reduce gradient buckets during backward (plain engine) / DeepSpeed ZeRO's overlap_comm; false: after it.
    overlap_grad_reduce: bool = True
    grad_bucket_mb: float = 0.0  # gradient bucket size in MB; 0 = chosen by device


@dataclass
class DataConfig:
    path: str = "data/digits"  # directory made by tools/make_shards.py (train/ and heldout/)
    global_batch_size: int = 128
    loader: str = "indexed"  # indexed (in memory, exact resume) | stream (webdataset streaming)
    num_workers: int = field(default=0, metadata=FREE)
    # Shards whose samples are shuffled together (data/position.py): 0 = one permutation of all
    # samples (a shard open per streamed sample); W_s > 0 = shards permuted, samples within windows.
    shuffle_window: int = 0
    text_encoder: str = "minilm"  # t2i: "minilm" (packaged all-MiniLM-L6-v2) or a local HF model directory


@dataclass
class DiffusionConfig:
    objective: str = "flow"  # flow (rectified flow, v) | ddpm (DiT's: 1,000 steps, eps and learned variance)
    same_t_per_batch: bool = False  # one noise level t per rank's batch (official code's same_t_per_batch)


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
    steps: int = field(default=1000, metadata=FREE)
    seed: int = field(default=0, metadata=refuse("seed (the data order and the noise follow it)"))
    run_dir: str = field(default="runs/default", metadata=FREE)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay min(ema_decay, (1+step)/(10+step)) so short runs get a useful EMA
    threads: int = field(default=0, metadata=FREE)  # torch threads per process; 0 = cores / local processes
    max_minutes: float = field(default=0.0, metadata=FREE)  # 0 = no limit
    resume: str = field(default="auto", metadata=FREE)  # auto | never | path to a checkpoint directory
    # Bitwise-reproducible steps (and so exact resume): with 2+ threads some CPU kernels reduce in
    # a run-dependent order (measured: weights drifted by 1e-10 between identical runs).
    deterministic: bool = True
    # 0: plain data parallelism (bucketed all-reduce, replicated AdamW states); 1 / 2: DeepSpeed ZeRO
    # stage 1 / 2 (optimizer states / and gradients partitioned, experts over their EDP group).
    zero_stage: int = field(default=0, metadata=FREE)
    # DeepSpeed JSON; "" = configs/deepspeed/zero{zero_stage}.json
    deepspeed_config: str = field(default="", metadata=FREE)
    activation_checkpointing: bool = field(default=False, metadata=FREE)  # recompute each DiT block in backward
    # torch.compile each DiT block (MoE layers stay eager): parallel/compile.py
    compile: bool = field(default=False, metadata=FREE)
    max_skipped_steps: int = 10  # non-finite steps skipped in a row before the run stops (train/guard.py)


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
    every_minutes: float = 0.0  # also save when this many minutes passed since the last save; 0 = off
    # Write, fsync, verify and rename beside training (checkpoint/async_save.py); the step waits only
    # for the copy to host memory. false: the step waits for the whole save.
    async_save: bool = True


@dataclass
class LoggingConfig:
    log_every: int = 10
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "diffmoe-dist"
    routing_every: int = 0
    # Per-rank peak that MFU is measured against: measure (a matmul timed at start-up), off (no MFU),
    # TFLOPS per rank (e.g. "989"), or a cluster YAML (tools/clusters/*.yaml: its peak for train.precision).
    mfu_peak: str = "measure"


@dataclass
class Config:
    # metadata: what a changed field means on resume, for the fields of a section that declare none
    # (config/resume.py)
    model: ModelConfig = field(default_factory=ModelConfig, metadata=refuse("model shape"))
    moe: MoEConfig = field(default_factory=MoEConfig, metadata=WARN)
    parallel: ParallelConfig = field(default_factory=ParallelConfig, metadata=FREE)  # resharded on load
    data: DataConfig = field(default_factory=DataConfig, metadata=WARN)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig, metadata=WARN)
    optim: OptimConfig = field(default_factory=OptimConfig, metadata=WARN)
    train: TrainConfig = field(default_factory=TrainConfig, metadata=WARN)
    sample: SampleConfig = field(default_factory=SampleConfig, metadata=FREE)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig, metadata=FREE)
    logging: LoggingConfig = field(default_factory=LoggingConfig, metadata=FREE)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self, world_size: int | None = None) -> Config:
        """Raises ConfigError naming the first bad field; returns self so calls can chain. The values
        only: the files the run reads (shards, a resume path) are checked by
        `diffmoe_dist.data.check.check_files`, which the CLI runs before any process group starts."""
        validate_config(self, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
        return self
