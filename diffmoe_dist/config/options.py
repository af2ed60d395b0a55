"""The values a config field may take, each list declared once, and the one error type.

Model, parallel and eval code import these lists from `diffmoe_dist.config` rather than keeping
copies of their own (a second copy kept equal by a comment drifts: `ROUTERS` once did).
"""

from __future__ import annotations

from typing import Any

# Paper sizes (DiT, Table 4 of Peebles & Xie; DiffMoE Table 1 uses the same backbones).
MODEL_SIZES: dict[str, tuple[int, int, int]] = {
    # name: (depth, hidden_size, num_heads)
    "tiny": (6, 192, 6),
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

TASKS = ("c2i", "t2i")
DENSE_ROUTER = "dense"  # no MoE layer: every block's FFN is the dense MLP
ROUTERS = ("expert_choice_global", "expert_choice_local", "token_choice", "expert_race")  # an MoE layer's routers
ROUTER_CHOICES = (DENSE_ROUTER, *ROUTERS)  # what moe.router takes
POOLS = ("rank", "ep", "dp")
DISPATCHES = ("exact", "padded")  # moe.dispatch (model/moe/dispatch.py)
# Routers whose training selection bounds an expert's rows per rank on the host (moe.dispatch=padded);
# their router classes define `padded_rows` (tests/test_config.py checks the two agree).
PADDED_ROUTERS = ("expert_choice_global", "expert_choice_local")
INFERENCE_MODES = ("dynamic", "static", "interval")
BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("auto", "cpu", "cuda")
GRAD_REDUCE_DTYPES = ("fp32", "bf16")
LOADERS = ("indexed", "stream")
ADAMW_IMPLS = ("foreach", "fused", "loop")
PRECISIONS = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2)
SAMPLERS = ("euler", "heun")
OBJECTIVES = ("flow", "ddpm")  # diffusion.objective
WANDB_MODES = ("offline", "online", "disabled")
MFU_PEAK_WORDS = ("measure", "off")  # logging.mfu_peak also takes TFLOPS per rank or a cluster YAML
RESUME_WORDS = ("auto", "never", "archive")  # train.resume also takes a run / checkpoint directory


class ConfigError(ValueError):
    """A bad config value: the message names the field, the value and the fix, on one line."""


def fail(name: str, value: Any, fix: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid: {fix}")
