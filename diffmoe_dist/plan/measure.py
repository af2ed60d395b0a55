"""Measured runs for checking the planner: train a config for a few steps under torchrun on this
machine and read the step time from the run's metrics.jsonl (logged every step)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

from diffmoe_dist.train.allocator import TUNED_MALLOC
from diffmoe_dist.train.records import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {
    "OMP_NUM_THREADS": "1",
    **TUNED_MALLOC,
    "WANDB_MODE": "disabled",
    "DIFFMOE_NO_PROGRESS": "1",
}


def torchrun(nproc: int) -> list[str]:
    exe = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return [exe, "--standalone", f"--nproc-per-node={nproc}"]


def digits_path(cfg_path: str, overrides: list[str], tmp: str) -> str | None:
    """The config's data.path if it holds shards; else fresh digits shards in ``tmp``."""
    from diffmoe_dist.config import load_config

    path = load_config(cfg_path, overrides).data.path
    path = path if os.path.isabs(path) else os.path.join(REPO, path)
    if os.path.isdir(os.path.join(path, "train")):
        return None
    out = os.path.join(tmp, "digits")
    if not os.path.isdir(os.path.join(out, "train")):
        from diffmoe_dist.data.digits import write_digits_shards

        write_digits_shards(out)
    return out


def measure_step(
    config: str, overrides: list[str], world: int, steps: int, warmup: int, data_dir: str | None = None
) -> dict:
    """Trains ``steps`` steps with ``world`` ranks (one thread each); returns the median step time
    after ``warmup`` steps, its minimum, and the run's wall time."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        data = data_dir or digits_path(config, overrides, tmp)
        cmd = torchrun(world) + [
            "-m", "diffmoe_dist.train.cli", "--config", config, *overrides,
            f"train.run_dir={run_dir}", f"train.steps={steps}", "train.resume=never", "logging.log_every=1",
            "logging.wandb=disabled", "logging.mfu_peak=off", "checkpoint.every=0", "sample.every=0",
            "sample.num_steps=1", "sample.per_class=1",
        ] + ([f"data.path={data}"] if data else [])  # fmt: skip
        t0 = time.time()
        proc = subprocess.run(cmd, env={**os.environ, **ENV}, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"training failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        records = read_metrics(run_dir)
    times = sorted(1.0 / r["steps_per_s"] for r in records if r["step"] > warmup)
    if not times:
        raise RuntimeError(f"no steps after the {warmup} warm-up steps: raise the step count")
    return {"step_s": times[len(times) // 2], "step_s_min": times[0], "steps": len(times), "wall_s": time.time() - t0}
