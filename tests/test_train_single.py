"""End to end, one process: train a tiny DiffMoE a few steps, resume, sample and evaluate from the CLI."""

import json
import os
import re
import subprocess
import sys

import conftest
import pytest
import torch
from conftest import HANG_TIMEOUT

from diffmoe_dist.config import load_config
from diffmoe_dist.eval import classifier as classifier_mod
from diffmoe_dist.train.records import metric_series, read_metrics
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
    return metric_series(str(run_dir), "loss")


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


STEP_LINE = re.compile(
    r"\[diffmoe\] step (\d+)/2 \| loss [\d.]+ \| lr [\d.e-]+ \| grad norm [\d.e+-]+ \| "
    r"[\d,]+ tok/s [\d.e-]+ TFLOPS/rank "
    r"MFU [\d.]+% of [\d.e-]+ TFLOPS \(fp32 matmul measured at start-up\) \| "
    r"(step [\d.e-]+ s median, [\d.e-]+ s max \(rank 0\), data [\d.]+% \| )?"  # not for a start's first step alone
    r"mem [\d.]+ GB \| elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d$"
)


def test_train_and_eval_print_step_and_phase_lines_into_a_file_and_the_clis_read_the_run(digits, tmp_path):
    # stdout to a file (no terminal) and the progress bar not switched off: plain lines, flushed
    run, log = tmp_path / "run", tmp_path / "train.out"
    env = {k: v for k, v in os.environ.items() if k != "DIFFMOE_NO_PROGRESS"}
    overrides = [*TINY, f"data.path={digits}", f"train.run_dir={run}", "train.steps=2", "checkpoint.every=3"]
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--config", "configs/local/diffmoe-tiny.yaml", *overrides]
    with open(log, "w") as out:
        subprocess.run(
            cmd, check=True, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=conftest.REPO, timeout=HANG_TIMEOUT
        )
    lines = log.read_text().splitlines()
    steps = [(int(m.group(1)), m.group(2) is not None) for m in map(STEP_LINE.match, lines) if m]
    assert steps == [(1, False), (2, True)], "\n".join(lines)  # logging.log_every=1; step times from step 2
    phases = [
        re.sub(r"done in [\d.]+ s", "done in T s", line) for line in lines if ": started" in line or ": done in" in line
    ]
    assert phases == [
        "[diffmoe] start-up (1 ranks): started",
        "[diffmoe] start-up (1 ranks): done in T s (process group, model, parallelism, optimizer, data loader)",
        "[diffmoe] checkpoint save at step 2: started",
        f"[diffmoe] checkpoint save at step 2: done in T s ({run}/checkpoints/step_0000002)",
        "[diffmoe] sample grid at step 2: started",
        f"[diffmoe] sample grid at step 2: done in T s (samples -> {run}/samples/step_0000002.png)",
    ], "\n".join(lines)
    (record,) = [r for r in read_metrics(str(run)) if r["step"] == 2]
    assert record["step_s_max_rank"] == 0 and 0 <= record["data_share"] < 1 and record["step_s_median"] > 0
    assert record["mfu_peak_source"] == "fp32 matmul measured at start-up"
    # a fresh cache: this test reads what the first classifier training says (the session has one cached)
    env = {**os.environ, "DIFFMOE_CACHE_DIR": str(tmp_path / "cache")}
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
            "-m",
            "diffmoe_dist.eval.cli",  # as diffmoe-eval
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
    # logs go to stderr: the first classifier training (fresh cache dir), before sampling, with its
    # expected time after one epoch, then the sampling with its speed
    said = [line for line in out.stderr.splitlines() if line.startswith("[diffmoe-eval]")]
    assert said[0].startswith("[diffmoe-eval] training the evaluation classifier (digits CNN, 12 epochs on ")
    assert said[0].endswith(f"then cached at {classifier_mod.cache_file(tmp_path / 'cache')}): started")
    assert re.fullmatch(r"\[diffmoe-eval\] classifier epoch 1/12 took [\d.]+ s: about \d+ s in all", said[1])
    assert re.fullmatch(r"\[diffmoe-eval\] training the evaluation classifier: done in [\d.]+ s \(.*\)", said[2])
    assert said[3] == "[diffmoe-eval] sampling 20 images (euler, 2 steps, CFG 2.0, batches of 100): started"
    assert re.fullmatch(
        r"\[diffmoe-eval\] sampled 20 images \(euler, 2 steps, CFG 2.0\) in [\d.]+ s: [\d.]+ images/s", said[4]
    )
    assert "model evaluations" in out.stderr  # the rich bar, on stderr


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
    """diffusion.objective=ddpm end to end (CI size: the loss falls, the grid is DDPM-sampled; that
    DDPM learns legible digits is tests/test_legibility.py)."""
    run = tmp_path / "ddpm"
    trainer = _train(digits, run, 10, ["diffusion.objective=ddpm", "checkpoint.every=10"])
    assert trainer.model.learn_sigma and trainer.model.final_layer.linear.out_features == 2 * 2 * 2
    losses = [json.loads(line)["loss_flow"] for line in open(run / "metrics.jsonl")]
    assert sum(losses[-3:]) / 3 < losses[0]
    assert (run / "samples" / "step_0000010.png").stat().st_size > 0
