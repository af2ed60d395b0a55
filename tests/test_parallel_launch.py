"""Launch environments (torchrun, SLURM, MPI, single), layout validation, and the process groups."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from conftest import HANG_TIMEOUT
from distributed import run_distributed

from diffmoe_dist.parallel import (
    LaunchEnv,
    ParallelSetupError,
    build_parallel_dims,
    destroy_distributed,
    expert_data_parallel_ranks,
    expert_parallel_ranks,
    init_distributed,
    read_launch_env,
    validate_parallel,
)
from diffmoe_dist.parallel.launch import (
    EPHEMERAL_PORT_START,
    detect_launcher,
    ep_hosts_error,
    first_slurm_host,
    slurm_master_port,
)

REPO = Path(__file__).resolve().parents[1]


def test_torchrun_env_is_read_first():
    env = {
        "RANK": "5",
        "WORLD_SIZE": "8",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29400",
        # a torchrun inside an srun step: torchrun's own variables win
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_ID": "0",
    }
    assert read_launch_env(env) == LaunchEnv(5, 8, 1, 1, "10.0.0.1", 29400, "torchrun", 4)


def test_slurm_srun_step_derives_master_from_nodelist_and_port_from_job_id():
    env = {
        "SLURM_PROCID": "6",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "2",
        "SLURM_NODEID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[007-008]",
        "SLURM_TASKS_PER_NODE": "4(x2)",
    }
    calls = []

    def fake_scontrol(cmd):
        calls.append(cmd)
        return "gpu007\ngpu008\n"

    got = read_launch_env(env, run=fake_scontrol)
    assert got == LaunchEnv(6, 8, 2, 1, "gpu007", 15000 + 123456 % 17000, "slurm", 4)
    assert calls == [["scontrol", "show", "hostnames", "gpu[007-008]"]]
    # MASTER_ADDR / MASTER_PORT set by the batch script override the derived ones
    got = read_launch_env({**env, "MASTER_ADDR": "head", "MASTER_PORT": "20001"}, run=fake_scontrol)
    assert (got.master_addr, got.master_port) == ("head", 20001)


def test_slurm_batch_shell_and_single_task_steps_are_single_process():
    batch_shell = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NODELIST": "n[1-2]",
    }
    assert read_launch_env(batch_shell).launcher == "single"
    one_task = {**batch_shell, "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"}
    assert read_launch_env(one_task) == LaunchEnv(0, 1, 0, 0, "127.0.0.1", 0, "single", 1)


def test_first_slurm_host_parses_compressed_nodelists():
    assert first_slurm_host("gpu[003-010,012],cpu1") == "gpu003"
    assert first_slurm_host("node7,node9") == "node7"
    assert first_slurm_host("a-b[1,4]") == "a-b1"


def test_mpi_env_reads_open_mpi_and_pmi_and_broadcasts_the_master():
    env = {
        "OMPI_COMM_WORLD_RANK": "3",
        "OMPI_COMM_WORLD_SIZE": "4",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
    }
    sent = []

    def fake_bcast(obj):
        sent.append(obj)
        return ("host0", 23456)

    assert read_launch_env(env, mpi_bcast=fake_bcast) == LaunchEnv(3, 4, 1, 1, "host0", 23456, "mpi", 2)
    assert sent == [None]  # only rank 0 contributes
    pmi = {"PMI_RANK": "0", "PMI_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert read_launch_env(pmi, mpi_bcast=None) == LaunchEnv(0, 2, 0, 0, "h", 1234, "mpi", 1)
    # mpirun inside an allocation: one SLURM task per node, the MPI world is the truth
    under_slurm = {**env, "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "1"}
    assert detect_launcher(under_slurm) == "mpi"


def test_bad_launcher_values_fail_with_the_variable_name():
    with pytest.raises(ValueError, match="WORLD_SIZE='four'"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "four"})
    with pytest.raises(ValueError, match="rank=4 is invalid for world_size=4"):
        read_launch_env({"RANK": "4", "WORLD_SIZE": "4"})


@pytest.mark.parametrize(
    "world_size,num_experts,ep_size,message",
    [
        (
            4,
            6,
            4,
            "parallel.expert_parallel_size=4 is invalid: must divide moe.num_experts=6 (use one of 1, 2, 3, 6)",
        ),
        (
            6,
            8,
            4,
            "parallel.expert_parallel_size=4 is invalid: must divide the world size 6 (use one of 1, 2, 3, 6)",
        ),
        (4, 8, 0, "parallel.expert_parallel_size=0 is invalid: use a positive integer such as 1"),
    ],
)
def test_impossible_layouts_fail_fast_with_one_line(world_size, num_experts, ep_size, message):
    with pytest.raises(ParallelSetupError) as info:
        validate_parallel(world_size, num_experts, ep_size)
    assert str(info.value) == message and "\n" not in message
    # init_distributed validates before any process group exists
    env = LaunchEnv(0, world_size, 0, 0, "127.0.0.1", 1, "torchrun")
    with pytest.raises(ParallelSetupError):
        init_distributed(env, ep_size, "cpu", num_experts=num_experts)
    assert not dist.is_initialized()


def test_single_process_init_starts_a_one_rank_group_on_a_free_port():
    env = read_launch_env({})
    assert env.launcher == "single" and env.master_port == 0
    try:
        dims = init_distributed(env, 1, "cpu", num_experts=4, use_megatron=False)
        assert (dims.world_size, dims.rank, dims.ep_size, dims.ep_ranks, dims.edp_ranks) == (
            1,
            0,
            1,
            (0,),
            (0,),
        )
        assert dist.get_backend() == "gloo"
    finally:
        destroy_distributed()
    assert not dist.is_initialized()


def test_layout_is_megatrons_consecutive_ep_strided_edp():
    assert expert_parallel_ranks(8, 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert expert_data_parallel_ranks(8, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _groups_match_megatron(rank: int, world_size: int, ep_size: int) -> tuple:
    env = read_launch_env()
    assert env.launcher == "torchrun" and env.rank == rank
    ours = build_parallel_dims(ep_size, num_experts=8)
    mega = init_distributed(env, ep_size, "cpu", num_experts=8, use_megatron=True)
    fields = ("world_size", "rank", "ep_size", "ep_rank", "ep_ranks", "edp_ranks", "edp_size", "edp_rank")
    assert [getattr(ours, f) for f in fields] == [getattr(mega, f) for f in fields]
    assert dist.get_process_group_ranks(mega.dp_group) == list(range(world_size))
    # Larger layouts without more processes: Megatron's own rank generator for its expert groups.
    from megatron.core.parallel_state import RankGenerator

    for w, p in ((8, 2), (8, 4), (16, 4), (12, 3)):
        gen = RankGenerator(tp=1, ep=p, dp=w // p, pp=1, cp=1, order="tp-cp-ep-dp-pp")
        assert gen.get_ranks("ep") == expert_parallel_ranks(w, p)
        assert gen.get_ranks("dp") == expert_data_parallel_ranks(w, p)
    return mega.ep_ranks, mega.edp_ranks


@pytest.mark.slow
def test_init_distributed_builds_megatron_groups_equal_to_ours():
    # 2 processes: importing megatron-core costs ~6 s of CPU per process
    assert run_distributed(_groups_match_megatron, 2, 2) == [((0, 1), (0,)), ((0, 1), (1,))]


MPI_SCRIPT = """
import torch.distributed as dist
from diffmoe_dist.parallel import destroy_distributed, init_distributed, read_launch_env
env = read_launch_env()
dims = init_distributed(env, 2, "cpu", num_experts=4, use_megatron=False)
print("RESULT", env.launcher, env.rank, env.world_size, dims.ep_rank, dims.edp_ranks, flush=True)
destroy_distributed()
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("mpirun", path=str(Path(sys.executable).parent)) is None, reason="no mpirun")
def test_mpirun_launch_broadcasts_master_and_builds_groups():
    mpirun = shutil.which("mpirun", path=str(Path(sys.executable).parent))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-n", "2", sys.executable, "-c", MPI_SCRIPT]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = sorted(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    assert lines == ["RESULT mpi 0 2 0 (0,)", "RESULT mpi 1 2 1 (1,)"]


def test_slurm_master_port_stays_below_the_ephemeral_range():
    # Every job id maps to a port in [1024, 32768): Linux hands out 32768+ to outgoing connections.
    ports = {slurm_master_port(job) for job in range(0, 200_000, 7)}
    assert min(ports) >= 1024 and max(ports) < EPHEMERAL_PORT_START
    assert slurm_master_port(16_999) == 31_999 and slurm_master_port(17_000) == 15_000  # the top, then wraps
    assert len(ports) > 10_000  # spread: distinct jobs rarely collide


def test_ep_group_spanning_hosts_is_refused_in_one_line():
    block = ["n0", "n0", "n1", "n1"]
    cyclic = ["n0", "n1", "n0", "n1"]
    assert ep_hosts_error(block, 2) is None and ep_hosts_error(cyclic, 1) is None
    error = ep_hosts_error(cyclic, 2)
    assert error is not None and "\n" not in error
    assert error.startswith("parallel.expert_parallel_size=2: EP group ranks 0-1 span 2 hosts (n0, n1)")
    assert "--distribution=block" in error
    assert ep_hosts_error(block, 4) is not None  # a group larger than a node never fits
