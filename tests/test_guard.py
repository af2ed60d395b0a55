"""The non-finite step guard (train/guard.py) on real gloo ranks, plain and DeepSpeed ZeRO: a NaN in
one rank's loss skips the step on every rank, and the run ends bitwise equal to one whose data never
held that batch; too many skips in a row stop the run; a save refuses non-finite weights."""

from __future__ import annotations

import os

import conftest
import numpy as np
import pytest
import torch
from distributed import run_distributed

from diffmoe_dist.config import ConfigError, load_config
from diffmoe_dist.train.guard import INJECT_ENV, NonFiniteError, parse_injection

TINY = [*conftest.TINY, "moe.router=expert_choice_global", "logging.wandb=disabled", "train.resume=never"]


def _state(trainer) -> dict:
    out = {f"model/{k}": v for k, v in trainer.model.state_dict().items()}  # incl. thresholds
    out.update({f"ema/{k}": v for k, v in trainer.ema.model.state_dict().items()})
    for i, frag in enumerate(trainer.engine.state_fragments()):
        out.update({f"optim/{frag.name}/{i}/{k}": v for k, v in frag.tensors.items()})
    out = {k: v.detach().clone().numpy() for k, v in out.items()}
    out["scalars"] = (
        trainer.step,
        trainer.ema.num_updates,
        trainer.engine.optimizer_steps(),
        trainer.scheduler.get_last_lr()[0],
        trainer.loader.state_dict()["samples_seen"],
    )
    out["rng"] = (torch.get_rng_state().numpy(), trainer.noise_gen.get_state().numpy())
    return out


def _guard_runs(rank: int, world_size: int, digits: str, run_dir: str) -> dict:
    from diffmoe_dist.parallel.launch import init_distributed, read_launch_env
    from diffmoe_dist.train.trainer import Trainer

    dims = init_distributed(read_launch_env(), 2, "cpu", num_experts=4, use_megatron=False)
    out = {}
    for name in ("plain", "zero2"):
        stage = "0" if name == "plain" else "2"
        extra = [f"data.path={digits}", f"train.run_dir={run_dir}", "parallel.expert_parallel_size=2"]
        cfg = load_config("configs/local/diffmoe-tiny.yaml", [*TINY, *extra, f"train.zero_stage={stage}"])
        cfg.validate(world_size=world_size)
        os.environ[INJECT_ENV] = "2@1"  # rank 1's loss at step 2 only: rank 0 learns it from the reduction
        poisoned = Trainer(cfg, dims, torch.device("cpu"))
        del os.environ[INJECT_ENV]
        records = [poisoned.train_step() for _ in range(4)]  # step 1, step 2 skipped, steps 2 and 3
        reference = Trainer(cfg, dims, torch.device("cpu"))
        reference.train_step()
        reference.loader.next_batch()  # the same batch, never trained on
        reference.train_step()
        reference.train_step()
        out[name] = {"records": records, "poisoned": _state(poisoned), "reference": _state(reference)}
    # train.max_skipped_steps in a row end the run with one line
    cfg = load_config(
        "configs/local/diffmoe-tiny.yaml",
        [
            *TINY,
            f"data.path={digits}",
            f"train.run_dir={run_dir}",
            "train.max_skipped_steps=2",
            "parallel.expert_parallel_size=2",
        ],
    ).validate(world_size=world_size)
    os.environ[INJECT_ENV] = "2,2"  # twice in a row
    trainer = Trainer(cfg, dims, torch.device("cpu"))
    del os.environ[INJECT_ENV]
    trainer.train_step()
    trainer.train_step()
    try:
        trainer.train_step()
        out["max_skipped"] = None
    except NonFiniteError as exc:
        out["max_skipped"] = str(exc)
    # A save refuses non-finite weights (one rank's expert is enough), on every rank, writing nothing.
    if rank == 1:
        with torch.no_grad():
            next(trainer.model.parameters()).view(-1)[0] = float("inf")
    try:
        trainer.save()
        out["save"] = None
    except NonFiniteError as exc:
        out["save"] = str(exc)
    out["written"] = os.path.exists(os.path.join(run_dir, "checkpoints"))
    return out


@pytest.mark.slow
def test_a_nan_on_one_rank_skips_the_step_and_ends_bitwise_equal_to_a_run_without_that_batch(digits, tmp_path):
    per_rank = run_distributed(_guard_runs, 2, digits, str(tmp_path / "run"))
    for rank, out in enumerate(per_rank):
        for name in ("plain", "zero2"):
            records = out[name]["records"]
            assert records[1] == {"skipped": 1.0}, (rank, name, records)
            assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in (records[0], *records[2:]))
            poisoned, reference = out[name]["poisoned"], out[name]["reference"]
            assert poisoned.keys() == reference.keys()
            assert poisoned["scalars"] == reference["scalars"], name  # step, EMA updates, AdamW steps, lr, data
            assert poisoned["scalars"][0] == 3 and poisoned["scalars"][2] == 3
            for key in poisoned:
                if key not in ("scalars", "rng"):
                    assert np.array_equal(poisoned[key], reference[key]), f"rank {rank} {name} {key}"
            for a, b in zip(poisoned["rng"], reference["rng"]):
                assert np.array_equal(a, b), f"rank {rank} {name}: RNG streams"
        assert (
            "2 steps in a row were not finite" in out["max_skipped"]
            and "train.max_skipped_steps=2" in out["max_skipped"]
        )
        assert "weights are not finite: not saved" in out["save"] and not out["written"]


def test_the_injection_variable_is_checked():
    assert parse_injection("5,3@1") == ([3, 5], 1)
    for bad in ("x", "0", "3@-1", ""):
        with pytest.raises(ConfigError, match=INJECT_ENV):
            parse_injection(bad)
