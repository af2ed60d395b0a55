"""End to end, one process: train a tiny DiffMoE a few steps, resume, sample and evaluate from the CLI."""

import json
import os
import re
import subprocess
import sys

import conftest
import pytest
import torch

from diffmoe_dist.config import load_config
from diffmoe_dist.train.trainer import Trainer

TINY = [*conftest.TINY, "parallel.expert_parallel_size=1"]


def _train(digits, run_dir, steps, extra=()):
    cfg = load_config(
        "configs/local/diffmoe-tiny.yaml",
        [
            *TINY,
            f"data.path={digits}",
            f"train.run_dir={run_dir}",
            f"train.steps={steps}",
            "checkpoint.every=3",
            *extra,
        ],
    ).validate(world_size=1)
    trainer = Trainer(cfg, None, torch.device("cpu"))
    trainer.fit()
    return trainer


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_training_writes_metrics_checkpoints_samples_and_config(digits, tmp_path):
    run = tmp_path / "run"
    _train(digits, run, 4)
    assert (run / "config.yaml").is_file()
    assert (run / "samples" / "step_0000004.png").stat().st_size > 0
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss_flow", "loss_predictor", "loss_aux", "grad_norm", "capacity_avg", "images_per_s"):
        assert all(key in r for r in records)
    assert all(r["loss_predictor"] > 0 for r in records)


def test_resume_continues_bitwise_like_an_uninterrupted_run(digits, tmp_path):
    full = _train(digits, tmp_path / "full", 6)
    _train(digits, tmp_path / "split", 3)
    resumed = _train(digits, tmp_path / "split", 6)
    assert _losses(tmp_path / "full") == _losses(tmp_path / "split")
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(full.ema.model.state_dict().values(), resumed.ema.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_foreach_adamw_trains_bitwise_like_the_per_parameter_loop(digits, tmp_path):
    # optim.adamw_impl=foreach (the default) must not change a single bit of what the loop, torch's
    # CPU default and the kernel earlier runs used, computes: results stay reproducible across it.
    loop = _train(digits, tmp_path / "loop", 3, ["optim.adamw_impl=loop"])
    foreach = _train(digits, tmp_path / "foreach", 3)
    assert loop.optimizer.defaults["foreach"] is False and foreach.optimizer.defaults["foreach"] is True
    assert _losses(tmp_path / "loop") == _losses(tmp_path / "foreach")
    for (name, a), b in zip(loop.model.state_dict().items(), foreach.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_sample_and_eval_clis_read_the_run(digits, tmp_path):
    run = tmp_path / "run"
    _train(digits, run, 2)
    env = dict(os.environ)  # DIFFMOE_CACHE_DIR: the session's classifier (conftest.py)
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from diffmoe_dist.eval.cli import sample_main; sample_main()",
            "--ckpt",
            str(run),
            "--classes",
            "3,7",
            "--per-class",
            "2",
            "--steps",
            "2",
            "--routing",
            "static",
            "--out",
            str(tmp_path / "g.png"),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    assert json.loads(out.stdout)["capacity_avg"] == pytest.approx(1.0)
    assert (tmp_path / "g.png").stat().st_size > 0
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from diffmoe_dist.eval.cli import eval_main; eval_main()",
            "--ckpt",
            str(run),
            "--num-samples",
            "20",
            "--steps",
            "2",
            "--routing",
            "dynamic",
        ],
        check=True,
        capture_output=True,
        text=True,
        env={**env, "DIFFMOE_NO_PROGRESS": "0"},  # the progress bar must not reach stdout either
    )
    result = json.loads(out.stdout)  # the JSON alone on stdout: `diffmoe-eval ... | tee eval.json` parses
    assert 0.0 <= result["class_accuracy"] <= 1.0 and result["digits_fid"] > 0 and result["capacity_avg"] > 0
    # logs go to stderr: the first classifier training (fresh cache dir) and the sampling speed
    assert "trained digits classifier in" in out.stderr
    assert "sampling 20 images" in out.stderr and "model evaluations" in out.stderr
    assert re.search(r"sampled 20 images \(euler, 2 steps, CFG 2.0\) in [\d.]+ s: [\d.]+ images/s", out.stderr)


def test_train_cli_rejects_bad_values_before_starting(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffmoe_dist.train.cli",
            "--config",
            "configs/local/diffmoe-tiny.yaml",
            "moe.pool=node",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("diffmoe-train: error: moe.pool='node' is invalid")


def test_ddpm_objective_trains_and_samples(digits, tmp_path):
    """diffusion.objective=ddpm end to end (CI size: the loss falls, the grid is DDPM-sampled; the
    legibility run is benchmarks/paper_table.py's DDPM pair)."""
    run = tmp_path / "ddpm"
    trainer = _train(digits, run, 10, ["diffusion.objective=ddpm", "checkpoint.every=10"])
    assert trainer.model.learn_sigma and trainer.model.final_layer.linear.out_features == 2 * 2 * 2
    losses = [json.loads(line)["loss_flow"] for line in open(run / "metrics.jsonl")]
    assert sum(losses[-3:]) / 3 < losses[0]
    assert (run / "samples" / "step_0000010.png").stat().st_size > 0
