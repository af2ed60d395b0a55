"""Each diffusion objective trains the digits config to legible samples.

One process, the real ``Trainer.fit()`` on the digits shards (DiffMoE, expert choice over the batch's
token pool, capacity predictor), then ``diffmoe-eval`` on the run directory: 50 samples of the EMA
weights (five a class) with the objective's own sampler (flow: Euler ODE, 10 steps; DDPM: DiT's
ancestral sampler on 25 of 1,000 steps), CFG 2, dynamic routing, and the project's digits classifier
reads the class of each. Chance is 10%; the bar is half.

The model is the digits config at a size two cores train in about a minute (patch 4: 16 tokens an
image; 4 blocks of width 96; 4 experts; batches of 64; lr 1e-2). Measured with this test at seeds
0 / 1 / 2 on 2 quiet cores (2026-12-07; about 65 s for both objectives, 400 s with two busy loops
beside it): flow 86% / 86% / 90% class accuracy after 200 steps, DDPM 84% / 82% / 80% after 600. In
the one-thread sweep that chose the steps (the notes of issue 26), DDPM stood at 48-58% after 400
steps and 66-80% after 500. DDPM gets 3x flow's steps: its epsilon loss weighs a step's image error
by the step's signal-to-noise ratio, so it learns the noisy steps, where a digit's class is decided,
last (docs/notes/issue-26.md shows it on the paper table's checkpoints).
"""

from __future__ import annotations

import json

import pytest
import torch

from diffmoe_dist.config import load_config
from diffmoe_dist.eval.cli import eval_main
from diffmoe_dist.train.trainer import Trainer

SMALL = [
    "model.patch_size=4",
    "model.depth=4",
    "model.hidden_size=96",
    "model.num_heads=4",
    "moe.num_experts=4",
    "parallel.expert_parallel_size=1",
    "data.global_batch_size=64",
    "optim.lr=1e-2",
    "optim.warmup_steps=10",
    "logging.wandb=disabled",
    "logging.mfu_peak=off",
    "logging.log_every=100",
    "checkpoint.every=0",
    "sample.every=0",
    "sample.num_steps=2",
    "sample.per_class=1",
]


@pytest.mark.slow
@pytest.mark.parametrize(("objective", "steps", "sampler_steps"), [("flow", 200, 10), ("ddpm", 600, 25)])
def test_each_objective_trains_the_digits_config_to_legible_samples(
    objective, steps, sampler_steps, digits, tmp_path, capsys
):
    run = tmp_path / objective
    overrides = [
        *SMALL,
        f"diffusion.objective={objective}",
        f"data.path={digits}",
        f"train.run_dir={run}",
        f"train.steps={steps}",
        "train.seed=0",
    ]
    cfg = load_config("configs/local/diffmoe-tiny.yaml", overrides).validate(world_size=1)
    result = Trainer(cfg, None, torch.device("cpu")).fit()
    assert result["step"] == steps and not result["stopped"]

    capsys.readouterr()
    assert eval_main(["--ckpt", str(run), "--num-samples", "50", "--steps", str(sampler_steps), "--seed", "0"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["routing"] == "dynamic" and 0 < scores["capacity_avg"] < cfg.moe.num_experts
    assert scores["class_accuracy"] >= 0.5, (objective, scores)
