"""DeepSpeed ZeRO 1 / 2 over our expert-parallel DiffMoE (real gloo, real DeepSpeed, W=4, P=2): same
training as plain data parallelism, expert groups identical to megatron-core's, gradient
accumulation, bf16 autocast, and activation checkpointing that changes no number."""

from __future__ import annotations

import re

import conftest
import numpy as np
import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import load_config
from diffmoe_dist.model.moe.layer import moe_layers

TINY = [*conftest.TINY_MODEL, "moe.num_experts=4", "data.global_batch_size=16", "logging.wandb=disabled",
        "optim.warmup_steps=2", "train.resume=never"]  # fmt: skip
STEPS = 3


def _config(digits, run_dir, world_size, extra=()):
    return load_config(
        "configs/local/diffmoe-tiny.yaml", [*TINY, f"data.path={digits}", f"train.run_dir={run_dir}", *extra]
    ).validate(world_size=world_size)


def _train(cfg, dims, steps=STEPS) -> dict:
    from diffmoe_dist.train.trainer import Trainer

    trainer = Trainer(cfg, dims, torch.device("cpu"))
    records = [trainer.train_step() for _ in range(steps)]
    state = {k: v.detach().numpy().copy() for k, v in trainer.model.state_dict().items()}  # incl. thresholds
    return {
        "loss": [r["loss"] for r in records],
        "grad_norm": [r["grad_norm"] for r in records],
        "state": state,
        "engine": type(trainer.engine).__name__,
        "overlap_comm": trainer.engine.ds.zero_overlap_comm() if hasattr(trainer.engine, "ds") else None,
    }


def _zero_runs(rank: int, world_size: int, digits: str, run_dir: str) -> dict:
    from diffmoe_dist.parallel.launch import init_distributed, read_launch_env
    from diffmoe_dist.train.deepspeed import create_deepspeed_expert_groups

    # megatron-core's groups: the ZeRO engine asserts that DeepSpeed's are the same rank sets
    dims = init_distributed(read_launch_env(), 2, "cpu", num_experts=4, use_megatron=True)
    runs = {}
    for name, extra in {
        "plain": ["train.zero_stage=0"],
        "zero1": ["train.zero_stage=1"],
        "zero2": ["train.zero_stage=2"],
        "plain-accum2": ["train.zero_stage=0", "optim.grad_accum_steps=2"],
        "zero2-accum2": ["train.zero_stage=2", "optim.grad_accum_steps=2"],
        "zero1-actckpt": ["train.zero_stage=1", "train.activation_checkpointing=true"],
        "plain-bf16": ["train.zero_stage=0", "train.precision=bf16"],
        "zero1-bf16": ["train.zero_stage=1", "train.precision=bf16"],
        "plain-bf16comm": ["train.zero_stage=0", "parallel.grad_reduce_dtype=bf16"],
        "zero2-bf16comm": ["train.zero_stage=2", "parallel.grad_reduce_dtype=bf16"],
    }.items():
        cfg = _config(digits, run_dir, world_size, ["parallel.expert_parallel_size=2", *extra])
        runs[name] = _train(cfg, dims)

    from dataclasses import replace

    wrong = replace(dims, ep_ranks=tuple(reversed(dims.ep_ranks)))
    try:
        create_deepspeed_expert_groups(wrong)
        runs["mismatch_error"] = None
    except RuntimeError as exc:
        runs["mismatch_error"] = str(exc)
    return runs


@pytest.mark.slow
def test_zero1_and_zero2_train_like_plain_data_parallelism_at_w4_ep2(digits, tmp_path):
    per_rank = run_distributed(_zero_runs, 4, digits, str(tmp_path / "run"))
    for rank, runs in enumerate(per_rank):
        assert runs["plain"]["engine"] == "PlainEngine" and runs["zero1"]["engine"] == "ZeroEngine"
        for name in ("zero1", "zero2"):
            # Same global-mean gradients (docs/design.md section 4), summed in another order: fp32 noise only.
            np.testing.assert_allclose(runs[name]["loss"], runs["plain"]["loss"], rtol=1e-5)
            np.testing.assert_allclose(runs[name]["grad_norm"], runs["plain"]["grad_norm"], rtol=1e-4)
            for key, ref in runs["plain"]["state"].items():
                np.testing.assert_allclose(runs[name]["state"][key], ref, atol=1e-6, rtol=0, err_msg=f"{name} {key}")
        np.testing.assert_allclose(runs["zero2-accum2"]["loss"], runs["plain-accum2"]["loss"], rtol=1e-5)
        for key, ref in runs["plain-accum2"]["state"].items():
            np.testing.assert_allclose(runs["zero2-accum2"]["state"][key], ref, atol=1e-6, rtol=0, err_msg=key)
        assert runs["plain-accum2"]["loss"] != runs["plain"]["loss"]  # two pools of 8 per step, not one of 16
        # Recomputing blocks in backward changes no number, and thresholds move once per step.
        assert runs["zero1-actckpt"]["loss"] == runs["zero1"]["loss"]
        for key, ref in runs["zero1"]["state"].items():
            assert np.array_equal(runs["zero1-actckpt"]["state"][key], ref), f"rank {rank} {key}"
        # bf16 autocast over fp32 master weights: both engines see the same bf16 forward
        np.testing.assert_allclose(runs["zero1-bf16"]["loss"], runs["plain-bf16"]["loss"], rtol=1e-3)
        for key, ref in runs["plain-bf16"]["state"].items():
            np.testing.assert_allclose(runs["zero1-bf16"]["state"][key], ref, atol=1e-4, rtol=0, err_msg=key)
        assert "differ from ours" in runs["mismatch_error"]
        # Buckets reduced inside backward (overlap_comm on by default), with the exactness above.
        assert runs["zero1"]["overlap_comm"] is True and runs["zero2"]["overlap_comm"] is True
        # Gradients sent in bf16 by both engines (each rank's gradient rounded once, summed in
        # another order): bf16 noise between them, and both near the fp32 run.
        np.testing.assert_allclose(runs["zero2-bf16comm"]["loss"], runs["plain-bf16comm"]["loss"], rtol=1e-3)
        for key, ref in runs["plain-bf16comm"]["state"].items():
            np.testing.assert_allclose(runs["zero2-bf16comm"]["state"][key], ref, atol=1e-4, rtol=0, err_msg=key)
        np.testing.assert_allclose(runs["plain-bf16comm"]["loss"], runs["plain"]["loss"], rtol=1e-3)


@pytest.mark.parametrize(
    "overrides, zero",
    [
        ([], {"overlap_comm": True, "reduce_bucket_size": 5_000_000, "allgather_bucket_size": 5_000_000}),
        (
            ["parallel.overlap_grad_reduce=false", "parallel.grad_bucket_mb=8"],
            {"overlap_comm": False, "reduce_bucket_size": 2**21, "allgather_bucket_size": 2**21},
        ),
    ],
)
def test_ds_config_takes_gradient_communication_from_the_yaml(overrides, zero):
    from diffmoe_dist.parallel.groups import ParallelDims
    from diffmoe_dist.train.engine import _ds_config

    overrides = ["train.zero_stage=2", "parallel.expert_parallel_size=1", *overrides]
    cfg = load_config("configs/local/diffmoe-tiny.yaml", overrides)
    ds = _ds_config(cfg.validate(world_size=1), ParallelDims.single())
    assert {k: ds["zero_optimization"][k] for k in zero} == zero  # CPU: small buckets (page faults)
    assert ds["communication_data_type"] == "fp32"


def test_ds_config_refuses_a_json_that_sets_what_the_yaml_owns(tmp_path):
    import json

    from diffmoe_dist.config import ConfigError
    from diffmoe_dist.parallel.groups import ParallelDims
    from diffmoe_dist.train.engine import _ds_config

    doc = json.load(open("configs/deepspeed/zero2.json"))
    doc["zero_optimization"]["overlap_comm"] = False
    path = tmp_path / "zero2.json"
    path.write_text(json.dumps(doc))
    overrides = ["train.zero_stage=2", f"train.deepspeed_config={path}", "parallel.expert_parallel_size=1"]
    cfg = load_config("configs/local/diffmoe-tiny.yaml", overrides).validate(world_size=1)
    message = "sets zero_optimization.overlap_comm: remove it, parallel.overlap_grad_reduce in the YAML sets it"
    with pytest.raises(ConfigError, match=message):
        _ds_config(cfg, ParallelDims.single())


def test_activation_checkpointing_recomputes_without_updating_thresholds_twice(digits, tmp_path):
    from diffmoe_dist.train.trainer import Trainer

    results = []
    for ac in ("false", "true"):
        cfg = _config(digits, tmp_path, 1, [f"train.activation_checkpointing={ac}", "parallel.expert_parallel_size=1"])
        trainer = Trainer(cfg, None, torch.device("cpu"))
        calls = []
        for layer in moe_layers(trainer.model):
            predictor = layer.capacity_predictor
            original = predictor.update_threshold

            def counted(*args, _original=original, _calls=calls, **kwargs):
                _calls.append(1)
                return _original(*args, **kwargs)

            predictor.update_threshold = counted
        losses = [trainer.train_step()["loss"] for _ in range(2)]
        results.append((losses, len(calls), {k: v.clone() for k, v in trainer.model.state_dict().items()}))
    (loss_off, calls_off, state_off), (loss_on, calls_on, state_on) = results
    assert calls_off == 2 * len(moe_layers(trainer.model))
    # thresholds move at the step (model/moe/collector.py), and the recompute in backward records nothing
    assert calls_on == calls_off
    assert loss_on == loss_off
    for key in state_off:
        assert torch.equal(state_on[key], state_off[key]), key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.zero_stage=3"], "train.zero_stage=3 is invalid: use 0 (plain data parallelism), 1 or 2"),
        (["train.zero_stage=1", "train.deepspeed_config=nope.json"], "train.deepspeed_config='nope.json' is invalid"),
        (
            ["train.zero_stage=2", "train.deepspeed_config=configs/deepspeed/zero1.json"],
            "train.zero_stage=2 is invalid: configs/deepspeed/zero1.json sets zero_optimization.stage=1",
        ),
        (["optim.grad_accum_steps=3"], "optim.grad_accum_steps=3 is invalid: world size 4 x accumulation steps"),
    ],
)
def test_zero_and_accumulation_config_errors_name_the_field(overrides, message):
    from diffmoe_dist.config import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("configs/local/diffmoe-tiny.yaml", overrides).validate(world_size=4)
