"""What the run finds around it, checked like config values (one line naming the fix, exit 2):
the environment variables the project reads, and a torch build that can run on the device asked
for (or on the GPUs a job was given)."""

from __future__ import annotations

import math
import os
import re

import diffmoe_dist.config.options as options
from diffmoe_dist.config.options import fail


def validate_environment(env) -> None:
    """The environment variables the project reads, checked like config values (one line, exit 2)."""
    stale = env.get("DIFFMOE_LOCK_STALE_MINUTES")
    if stale:
        try:
            minutes = float(stale)
        except ValueError:
            minutes = float("nan")
        if not (math.isfinite(minutes) and minutes > 0):
            raise options.ConfigError(
                f"DIFFMOE_LOCK_STALE_MINUTES={stale!r} is invalid: use a positive number of minutes (default 30)"
            )
    inject = env.get("DIFFMOE_INJECT_NAN")
    if inject and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*)*(@\d+)?", inject):
        raise options.ConfigError(f"DIFFMOE_INJECT_NAN={inject!r} is invalid: use STEP[,STEP...][@RANK], e.g. 3 or 3@1")


# CUDA builds of torch 2.13.0 we support, and the oldest Linux driver each one's toolkit asks for
# (requirements-cuda.txt and container/ install them; docs/operations.md, "Install on a GPU cluster" has the table).
CUDA_DRIVERS = {"12.6": "560.28.03", "12.8": "570.26", "13.0": "580.65.06"}
CUDA_FIX = "install a CUDA build of torch (pip install -r requirements-cuda.txt, or run in the container/ image)"
# What Slurm sets in a job (or step) that was given GPUs; "NoDevFiles" / "none": given none.
GPU_JOB_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")


def gpus_expected(env) -> str | None:
    """``NAME=value`` of the first variable in ``env`` saying that this job was given GPUs, else None."""
    for name in GPU_JOB_VARIABLES:
        value = env.get(name, "").strip()
        if value not in ("", "-1", "none", "NoDevFiles") and not (name == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"{name}={value}"
    return None


def validate_cuda(device: str, env=None) -> None:
    """``parallel.device=cuda``, or ``auto`` in a job that was given GPUs (`gpus_expected`), needs a
    torch that can run on them: else one ConfigError naming what was found (torch.__version__,
    torch.version.cuda, torch.cuda.is_available()) and the fix, before any process group starts.
    Imports torch only then: the values-only check of the launchers stays quick."""
    env = os.environ if env is None else env
    given = gpus_expected(env) if device == "auto" else None
    if device == "cpu" or (device == "auto" and given is None):
        return
    import torch

    found = (
        f"torch {torch.__version__} (torch.version.cuda={torch.version.cuda}, "
        f"torch.cuda.is_available()={torch.cuda.is_available()})"
    )
    why = f"this job was given GPUs ({given}) but " if given else ""
    if torch.version.cuda is None:
        fail("parallel.device", device, f"{why}{found} is a CPU build: {CUDA_FIX}, or set parallel.device=cpu")
    if not torch.cuda.is_available():
        needs = CUDA_DRIVERS.get(".".join(torch.version.cuda.split(".")[:2]), "its release's")
        visible = env.get("CUDA_VISIBLE_DEVICES")
        fail(
            "parallel.device",
            device,
            f"{why}{found} sees no usable GPU"
            + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
            + f": run on a node with GPUs (--gpus-per-node), or use an NVIDIA driver >= {needs} (what CUDA "
            f"{torch.version.cuda} needs; nvidia-smi shows yours) or the build for your driver (requirements-cuda.txt)",
        )
