"""First contact with a GPU node, checked on this CPU machine (torch 2.13.0+cpu):
- ``parallel.device=cuda`` (or ``auto`` in a job that was given GPUs) without a usable CUDA build is one
  line and exit 2, from ``--validate-only`` and from the trainer, before any process group starts;
- each rank's device is chosen once, at launch, and is right under any GPU binding: every GPU of the
  node visible to every task (torchrun, plain srun) or one per task (srun --gpus-per-task=1,
  --gpu-bind=single:1, one GPU per container). The binding is simulated by the variables the launchers
  set and the device count the CUDA runtime reports for them (CUDA_VISIBLE_DEVICES' entries).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HANG_TIMEOUT

from diffmoe_dist.config import ConfigError
from diffmoe_dist.config.environment import gpus_expected, validate_cuda
from diffmoe_dist.parallel.launch import ParallelSetupError, cuda_index, read_launch_env, resolve_device
from diffmoe_dist.train import cli

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", "configs/local/diffmoe-tiny.yaml", "parallel.expert_parallel_size=1"]
NO_CUDA = torch.version.cuda is None or not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="checks the refusal on a machine without a usable CUDA")


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


@needs_no_cuda
def test_validate_only_refuses_cuda_without_a_cuda_build_in_one_line(capsys, monkeypatch):
    for name in ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main([*CONFIG, "parallel.device=cuda", "--validate-only", "--no-file-checks"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("diffmoe-train: error: parallel.device='cuda' is invalid: ")
    for found in (f"torch {torch.__version__}", f"torch.version.cuda={torch.version.cuda}", "is_available()=False"):
        assert found in line, line
    assert "requirements-cuda.txt" in line and "parallel.device=cpu" in line
    # auto on a machine that was given no GPU still runs on the CPU; in a job given GPUs it is refused
    assert cli.main([*CONFIG, "--validate-only", "--no-file-checks"]) == 0
    monkeypatch.setenv("SLURM_JOB_GPUS", "0,1,2,3")
    assert cli.main([*CONFIG, "--validate-only", "--no-file-checks"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "parallel.device='auto' is invalid: this job was given GPUs (SLURM_JOB_GPUS=0,1,2,3)" in line, line


@needs_no_cuda
def test_trainer_under_torchrun_refuses_cuda_in_one_line_before_any_process_group():
    # Before: ZeroDivisionError (local_rank % device_count()) under torchrun, an AttributeError
    # traceback as one process. Rank 0 of 2 would wait for rank 1 at the rendezvous: exit 2 proves
    # that no process group was started.
    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    env.update(LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1", DIFFMOE_FILES_CHECKED="1")
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", *CONFIG, "parallel.device=cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=HANG_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "parallel.device='cuda' is invalid" in _one_error_line(proc.stderr)


@needs_no_cuda
@pytest.mark.parametrize("gpus, device", [({"SLURM_JOB_GPUS": "0,1,2,3"}, "auto"), ({}, "cuda")])
def test_gpu_job_launcher_refuses_a_cpu_build_in_one_line_before_any_rank(gpus, device, tmp_path):
    # The sbatch script's first config check (diffmoe-train --validate-only) on the batch node.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "CUDA_VISIBLE"))}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="4", CONFIG="configs/local/diffmoe-tiny.yaml", RUNS=str(tmp_path))
    cmd = ["bash", str(REPO / "launchers/t2i_256gpu.sh"), f"parallel.device={device}"]
    proc = subprocess.run(cmd, env={**env, **gpus}, cwd=REPO, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc.stderr)
    assert f"parallel.device='{device}' is invalid" in line and "is a CPU build" in line, line
    assert not list(tmp_path.iterdir())  # no run directory, no rank


def test_a_job_given_gpus_is_told_by_slurm_or_cuda_visible_devices():
    assert gpus_expected({}) is None
    for empty in ({"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}, {"SLURM_GPUS_ON_NODE": "0"}):
        assert gpus_expected(empty) is None, empty
    assert gpus_expected({"SLURM_JOB_GPUS": "NoDevFiles"}) is None
    assert gpus_expected({"SLURM_STEP_GPUS": "2"}) == "SLURM_STEP_GPUS=2"
    assert gpus_expected({"SLURM_GPUS_ON_NODE": "8"}) == "SLURM_GPUS_ON_NODE=8"
    validate_cuda("cpu", {"SLURM_JOB_GPUS": "0"})  # an explicit cpu run is never refused
    validate_cuda("auto", {})
    if NO_CUDA:
        with pytest.raises(ConfigError, match=r"^parallel.device='cuda' is invalid: .*torch.version.cuda"):
            validate_cuda("cuda", {})


def _slurm_task(proc_id: int, tasks_per_node: int, nodes: int, gpus_seen: str) -> dict:
    """What srun gives task `proc_id` of a block-distributed step, and what CUDA_VISIBLE_DEVICES its
    GPU binding leaves it."""
    return {
        "SLURM_PROCID": str(proc_id),
        "SLURM_NTASKS": str(tasks_per_node * nodes),
        "SLURM_LOCALID": str(proc_id % tasks_per_node),
        "SLURM_NODEID": str(proc_id // tasks_per_node),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "gpu[001-002]",
        "MASTER_ADDR": "gpu001",
        "CUDA_VISIBLE_DEVICES": gpus_seen,
    }


def _device_of(env: dict) -> torch.device:
    """The device `rank_device` picks for this task: the launch variables it reads, and the count
    ``torch.cuda.device_count()`` reports under this CUDA_VISIBLE_DEVICES (its entries)."""
    launch = read_launch_env(env)
    visible = len([d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d])
    return resolve_device("cuda", launch.local_rank, launch.local_world_size, visible)


def test_one_gpu_per_task_binding_gives_every_rank_the_one_gpu_it_sees():
    # srun --gpus-per-task=1 / --gpu-bind=single:1 on 2 nodes x 8 GPUs: task i sees only GPU i % 8,
    # as cuda:0. Before, ranks 1-7 of each node asked for cuda:<local rank> and failed.
    for rank in range(16):
        env = _slurm_task(rank, 8, 2, gpus_seen=str(rank % 8))
        assert _device_of(env) == torch.device("cuda", 0), rank


def test_every_gpu_visible_gives_each_local_rank_its_own():
    # srun without binding (each task sees the node's 8 GPUs) and torchrun: rank r of a node takes GPU r.
    for rank in range(16):
        assert _device_of(_slurm_task(rank, 8, 2, gpus_seen="0,1,2,3,4,5,6,7")) == torch.device("cuda", rank % 8)
        torchrun = {"RANK": str(rank), "WORLD_SIZE": "16", "LOCAL_RANK": str(rank % 8), "LOCAL_WORLD_SIZE": "8"}
        assert _device_of({**torchrun, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}) == torch.device("cuda", rank % 8)


def test_two_gpus_per_task_and_one_gpu_per_container():
    # --gpus-per-task=2: 4 tasks of a node each see their pair, and take the first of it.
    for rank in range(4):
        assert _device_of(_slurm_task(rank, 4, 1, gpus_seen=f"{2 * rank},{2 * rank + 1}")) == torch.device("cuda", 0)
    # A container runtime exposing one GPU per task: no CUDA_VISIBLE_DEVICES, one device counted.
    launch = read_launch_env({"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "5", "LOCAL_WORLD_SIZE": "8"})
    assert resolve_device("cuda", launch.local_rank, launch.local_world_size, visible=1) == torch.device("cuda", 0)
    assert resolve_device("cuda:3", 5, 8, visible=1) == torch.device("cuda", 3)  # an explicit index is kept
    assert resolve_device("cpu", 5, 8, visible=0) == torch.device("cpu")


def test_no_visible_gpu_is_one_line_naming_the_fix():
    assert cuda_index(0, 1, 1) == 0 and cuda_index(3, 4, 8) == 3 and cuda_index(3, 1, 2) == 0
    with pytest.raises(ParallelSetupError, match=r"local rank 2 sees no CUDA device .*--gpus-per-node"):
        cuda_index(2, 8, 0)


def test_deepspeed_is_given_the_rank_device_not_cuda_local_rank():
    # ZeRO under srun --gpus-per-task=1: local rank 3 sees its one GPU as cuda:0, and DeepSpeed's engine
    # would call set_device(int(LOCAL_RANK)) = 3 ("invalid device ordinal") unless told the device.
    import inspect

    from deepspeed.runtime.engine import DeepSpeedEngine

    from diffmoe_dist.train.deepspeed import engine_args

    env = _slurm_task(3, 8, 1, gpus_seen="3")
    args = engine_args(_device_of(env))
    assert args.device_rank == 0 and read_launch_env(env).local_rank == 3
    assert engine_args(_device_of(_slurm_task(3, 8, 1, gpus_seen="0,1,2,3,4,5,6,7"))).device_rank == 3
    assert engine_args(torch.device("cpu")) is None  # DeepSpeed's CPU accelerator has no device to set
    # The pinned DeepSpeed (requirements.txt) takes device_rank over LOCAL_RANK when args carries it.
    assert "args.device_rank" in inspect.getsource(DeepSpeedEngine._set_distributed_vars)
