"""Device placement on machines without a GPU: what a CUDA + NCCL run needs, checked on CPU.

- Two gloo ranks train (EP 2, pool dp, telemetry, checkpoints, a resume, a sample grid) with every
  collective audited (tests/device_audit.py): each tensor handed to one is on its group's
  communication device and was placed there on purpose, never made on the default device or copied
  to the host (on CUDA both would be host tensors, which NCCL refuses).
- Noise generators live on the device they draw on: the code that draws checks it.
- In a subprocess, the forward, the loss and the logging code run on fake tensors of a second device
  ("accel", a Python-registered stand-in for CUDA: FakeTensorMode on "cuda" cannot even take a view
  on a CPU-only build), where any mix with a host tensor raises `FakeTensorDeviceMismatchError`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
import torch
from conftest import HANG_TIMEOUT
from device_audit import CollectiveAudit
from distributed import run_distributed

from diffmoe_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
TINY = [*conftest.TINY_MODEL, "moe.num_experts=4", "data.global_batch_size=8", "logging.wandb=disabled",
        "logging.routing_every=1", "sample.num_steps=2", "sample.per_class=1", "checkpoint.every=1"]  # fmt: skip


def _audited_training(rank, world_size, digits, run_dir):
    from diffmoe_dist.parallel.launch import init_distributed, read_launch_env
    from diffmoe_dist.train.trainer import Trainer

    overrides = [*TINY, f"data.path={digits}", f"train.run_dir={run_dir}", "parallel.expert_parallel_size=2"]
    dims = init_distributed(read_launch_env(), 2, "cpu", num_experts=4, use_megatron=False)
    with CollectiveAudit() as audit:
        cfg = load_config("configs/local/diffmoe-tiny.yaml", [*overrides, "train.steps=2"]).validate(world_size)
        trainer = Trainer(cfg, dims, torch.device("cpu"))
        assert trainer.noise_gen.device == trainer.device
        trainer.fit()  # 2 steps: telemetry, stop flag, checkpoints, the final sample grid
        cfg = load_config("configs/local/diffmoe-tiny.yaml", [*overrides, "train.steps=3"]).validate(world_size)
        Trainer(cfg, dims, torch.device("cpu")).fit()  # resumes (verified by all ranks), one more step
    return sorted(audit.ops()), len(audit.records), audit.errors


@pytest.mark.slow
def test_every_collective_gets_a_tensor_placed_on_its_groups_device(digits, tmp_path):
    results = run_distributed(_audited_training, 2, digits, str(tmp_path / "run"))
    for rank, (_, _, errors) in enumerate(results):
        assert not errors, f"rank {rank}:\n" + "\n".join(errors)
    ops, calls, _ = results[0]
    # The audit saw the whole class: selection (all_reduce, all_gather), dispatch (all_to_all_single),
    # replica sync (broadcast), losses / stop flag / telemetry (all_reduce), grid (all_gather),
    # checkpoint verdicts and index (object collectives).
    for op in ("all_reduce", "all_gather", "all_to_all_single", "broadcast", "all_gather_object"):
        assert op in ops, (op, ops)
    assert calls > 50


def test_noise_is_drawn_by_a_generator_on_the_same_device():
    from diffmoe_dist.diffusion.flow import flow_targets

    x = torch.zeros(2, 1, 4, 4, device="meta")  # any device other than the generator's
    with pytest.raises(ValueError, match="cpu generator cannot draw on meta"):
        flow_targets(x, torch.Generator(device="cpu"))
    x_t, t, v = flow_targets(torch.zeros(2, 1, 4, 4), torch.Generator(device="cpu").manual_seed(0))
    assert x_t.device == t.device == v.device == torch.device("cpu")


FAKE_CHILD = r"""
TINY_MODEL = __TINY_MODEL__  # conftest.TINY_MODEL, filled in by the test
import types
import torch
import torch.utils.backend_registration as registration
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorDeviceMismatchError, FakeTensorMode

from diffmoe_dist.config import load_config
from diffmoe_dist.diffusion.sampling import sample_images
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.train.guard import StepGuard
from diffmoe_dist.parallel.groups import ParallelDims
from diffmoe_dist.train.engine import _Engine
from diffmoe_dist.train.trainer import Trainer

backend = types.ModuleType("accel")
backend.is_available, backend.device_count, backend.current_device = (lambda: True), (lambda: 1), (lambda: 0)
backend.get_amp_supported_dtype = lambda: [torch.bfloat16]  # autocast(enabled=False) still asks; fp32 runs here
registration._setup_privateuseone_for_python_backend("accel", backend_module=backend)
accel = torch.device("accel", 0)
mode = FakeTensorMode(allow_non_fake_inputs=True)


class SameDeviceCat(torch.overrides.TorchFunctionMode):
    # Fake tensors let a 0-d host tensor join any op, as CUDA does for arithmetic, but CUDA's cat and
    # stack refuse one ("Expected all tensors to be on the same device"): hold them to that.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.cat, torch.stack):
            devices = {str(t.device) for t in args[0]}
            assert len(devices) == 1, f"torch.{func.__name__} of tensors on {sorted(devices)}"
        return func(*args, **(kwargs or {}))


with mode:  # the check is live: a host tensor beside an accel one raises
    try:
        torch.ones(3, device=accel) + torch.ones(3)
        raise SystemExit("FakeTensorMode did not refuse a cpu + accel mix")
    except FakeTensorDeviceMismatchError:
        pass

CONFIGS = [("configs/local/dense-tiny.yaml", []), ("configs/local/t2i-diffmoe-tiny.yaml", ["moe.router=dense"])]
for config, extra in CONFIGS:
    cfg = load_config(config, [*TINY_MODEL, *extra])
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    model._apply(lambda t: FakeTensor(mode, t, accel))
    engine = types.SimpleNamespace(forward=model)
    # The trainer's own methods on the state they read (no process group, no optimizer: a backward
    # on fake tensors aborts a CPU-only build).
    run = types.SimpleNamespace(cfg=cfg, device=accel, noise_gen=None, engine=engine, model=model,
                                dims=ParallelDims.single(), moe=MoECollector(),
                                guard=StepGuard(ParallelDims.single(), cfg.train.max_skipped_steps), step=0)
    B, m = 4, cfg.model
    batch = {"x": torch.randn(B, m.in_channels, m.image_size, m.image_size)}  # host tensors, as the loader's
    if m.task == "t2i":
        batch.update(text=torch.randn(B, m.text_len, m.text_dim), text_mask=torch.ones(B, m.text_len, dtype=torch.bool))
    else:
        batch["y"] = torch.randint(0, m.num_classes, (B,))
    batch = {k: mode.from_tensor(v) for k, v in batch.items()}  # fake host tensors: .to(accel) moves them
    with mode, SameDeviceCat():
        loss, parts = Trainer._forward_loss(run, batch)
        logged = Trainer._global_means(run, parts)
        assert loss.device == parts.device == logged.device == accel, (loss.device, parts.device, logged.device)
        assert parts.shape == (4,) and parts.dtype == torch.float32
        if m.task == "c2i":
            labels = torch.arange(2)
            imgs = sample_images(model, labels, cfg_scale=2.0, num_steps=2, sampler="heun", seed=0, device=accel)
            assert imgs.device == accel, imgs.device
    print("fake-accel ok", config)
"""


def test_forward_loss_and_logging_stay_on_a_non_host_device():
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_CHILD.replace("__TINY_MODEL__", repr(conftest.TINY_MODEL))],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert proc.stdout.count("fake-accel ok") == 2, proc.stdout


def _forced_distributed_steps(rank, world_size, digits, run_dir):
    from diffmoe_dist.parallel.launch import init_distributed, read_launch_env
    from diffmoe_dist.train.trainer import Trainer

    overrides = [*TINY, f"data.path={digits}", f"train.run_dir={run_dir}", "parallel.expert_parallel_size=1"]
    cfg = load_config("configs/local/diffmoe-tiny.yaml", overrides)
    losses = {}
    single = Trainer(cfg.validate(1), None, torch.device("cpu"))
    losses["single"] = [single.train_step()["loss"] for _ in range(3)]
    dims = init_distributed(read_launch_env(), 1, "cpu", num_experts=4, use_megatron=False, force_distributed=True)
    with CollectiveAudit() as audit:
        forced = Trainer(cfg.validate(1), dims, torch.device("cpu"))
        losses["forced"] = [forced.train_step()["loss"] for _ in range(3)]
    layer = next(m for m in forced.model.modules() if hasattr(m, "dispatcher"))
    return losses, sorted(audit.ops()), audit.errors, type(layer.dispatcher).__name__, type(layer.pool).__name__


@pytest.mark.slow
def test_distributed_path_forced_at_world_size_1_matches_one_process(digits, tmp_path):
    # How one GPU tests the NCCL path (tests/gpu/): parallelize, the dp pool, the all-to-all and
    # every collective run at world size 1, and give what one process gives.
    [(losses, ops, errors, dispatcher, pool)] = run_distributed(
        _forced_distributed_steps, 1, digits, str(tmp_path / "run")
    )
    assert (dispatcher, pool) == ("AllToAllDispatcher", "DistributedPool")
    for op in ("all_reduce", "all_gather_single", "all_to_all_single", "broadcast"):
        assert op in ops, (op, ops)
    assert not errors, errors
    torch.testing.assert_close(losses["forced"], losses["single"], rtol=1e-5, atol=1e-6)
