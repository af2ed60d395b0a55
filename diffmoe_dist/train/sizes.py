"""Sizes refused before anything allocates: `check_sizes` runs in diffmoe-train after the config's
values and files are checked and before the lock, the process group or the model (one line, exit 2).

The model's parameters are counted on the meta device (model/params.py) and set against this
node's available host memory per local rank: each rank holds its dense parameters and its 1/EP of
the experts, in fp32, at least 4 times (weights, EMA, gradients, AdamW's two moments, these
partitioned under ZeRO: 12 + 8 / W bytes). A run that cannot fit is refused by name instead of
growing until the kernel kills it. Only where the weights live on the host (``parallel.device``
cpu, or auto without CUDA)."""

from __future__ import annotations

import os

from diffmoe_dist.config import Config
from diffmoe_dist.config.options import ConfigError


def available_host_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def bytes_per_rank(cfg: Config, world_size: int) -> int:
    from diffmoe_dist.model.params import dense_and_expert_counts

    dense, expert = dense_and_expert_counts(cfg.model, cfg.moe)
    local = dense + expert // max(1, cfg.parallel.expert_parallel_size)
    per_param = 12 + 8 / (world_size if cfg.train.zero_stage > 0 and world_size > 1 else 1)
    return int(local * per_param)


def check_sizes(cfg: Config, world_size: int, local_world_size: int, on_host: bool) -> None:
    if not on_host:
        return
    need, have = bytes_per_rank(cfg, world_size), available_host_bytes()
    if have is not None and need * local_world_size > have:
        m = cfg.model
        raise ConfigError(
            f"model.size={m.size} (hidden {m.resolved()[1]}, {m.num_classes} classes, "
            f"moe.num_experts={cfg.moe.num_experts}) needs at least {need / 2**30:.1f} GiB per rank for weights, "
            f"EMA, gradients and AdamW, but this node has {have / 2**30:.1f} GiB available for "
            f"{local_world_size} rank(s): use a smaller model, parallel.expert_parallel_size or more nodes"
        )


def local_world_size(env=os.environ) -> int:
    text = env.get("LOCAL_WORLD_SIZE", "1")
    return int(text) if text.isdigit() and int(text) > 0 else 1


def rank_threads(cfg: Config, local_world_size: int) -> int:
    """train.threads, else OMP_NUM_THREADS (set by our launchers and torchrun), else cores divided by
    the processes on this node, so torchrun, srun and mpirun runs compute with the same thread count."""
    if cfg.train.threads > 0:
        return cfg.train.threads
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    return max(1, (os.cpu_count() or 1) // max(1, local_world_size))
