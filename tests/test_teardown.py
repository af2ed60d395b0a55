"""Teardown under load: short 2-rank fits back to back beside a CPU-burning process, every rank
exiting 0 (a rank that died in teardown once failed CI with SIGABRT, "terminate called without an
active exception", after fit() had written its last grid).

Both ways the project ends a rank are exercised: ``diffmoe-train`` processes started as torchrun
would (the real CLI teardown: barrier, destroy, exit without finalization) and the
``run_distributed`` helper that the module fixtures use (tests/test_tools.py's ``tiny_run``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import conftest
import pytest
from distributed import run_distributed, start_training_ranks, wait_all

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [*conftest.TINY_MODEL, "moe.num_experts=4", "parallel.expert_parallel_size=2", "data.global_batch_size=16",
        "train.steps=2", "sample.num_steps=1", "sample.per_class=1", "logging.wandb=disabled", "logging.log_every=1",
        "checkpoint.every=0", "train.resume=never"]  # fmt: skip
BUDGET_S = 30.0  # CLI fits: at least MIN_FITS, more while the budget lasts (~60 s for the module)
MIN_FITS, MAX_FITS = 2, 8


@pytest.fixture
def cpu_burner():
    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield burner
    burner.kill()
    burner.wait()


def test_back_to_back_two_rank_fits_under_load_every_rank_exits_0(digits, tmp_path, cpu_burner):
    start, fits = time.monotonic(), 0
    while fits < MIN_FITS or (fits < MAX_FITS and time.monotonic() - start < BUDGET_S):
        log_dir = tmp_path / f"logs{fits}"
        overrides = [*TINY, f"data.path={digits}", f"train.run_dir={tmp_path / f'run{fits}'}"]
        procs = start_training_ranks(2, overrides, str(log_dir), env={"DIFFMOE_NO_MEGATRON": "1"})
        codes = wait_all(procs)
        logs = [(log_dir / f"rank{r}.log").read_text() for r in range(2)]
        assert codes == [0, 0], f"fit {fits}: exit codes {codes}\n" + "\n".join(log[-1500:] for log in logs)
        assert '"step": 2' in logs[0] and not any("terminate called" in log for log in logs)
        fits += 1
    assert cpu_burner.poll() is None  # the load was there throughout


def _fit_rank(rank: int, world_size: int, digits: str, run_dir: str) -> int:
    import torch

    from diffmoe_dist.config import load_config
    from diffmoe_dist.parallel import build_parallel_dims
    from diffmoe_dist.train.trainer import Trainer

    os.environ["DIFFMOE_NO_PROGRESS"] = "1"
    overrides = [*TINY, f"data.path={digits}", f"train.run_dir={run_dir}"]
    cfg = load_config(os.path.join(REPO, "configs/local/diffmoe-tiny.yaml"), overrides).validate(world_size=2)
    return Trainer(cfg, build_parallel_dims(2, cfg.moe.num_experts), torch.device("cpu")).fit()["step"]


def test_run_distributed_fits_back_to_back_under_load_exit_0(digits, tmp_path, cpu_burner):
    # run_distributed raises DistributedTestError("a child process died") on a non-zero exit
    assert run_distributed(_fit_rank, 2, digits, str(tmp_path / "run")) == [2, 2]
