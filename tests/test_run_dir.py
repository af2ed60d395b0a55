"""A run directory belongs to one run: nothing a user trained is lost by a mistake or an accident.

Each case drives `diffmoe-train` as a user would (one process, the real CLI) into a real run
directory: a fresh run over an older run's checkpoints, a resume that falls back below corrupt
checkpoints, every checkpoint corrupt, a disk that fills during a save, a second live owner, a
stale owner, config changes on resume, and signals during the final save.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import conftest
import pytest
import torch
from conftest import HANG_TIMEOUT
from distributed import run_distributed

from diffmoe_dist import checkpoint as ckpt
from diffmoe_dist.train.records import metric_series

REPO = Path(__file__).resolve().parents[1]
TINY = [*conftest.TINY, "parallel.expert_parallel_size=1", "checkpoint.every=1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFMOE_NO_PROGRESS": "1", "PYTHONPATH": str(REPO)}


def command(digits, run_dir, *overrides, script=("-m", "diffmoe_dist.train.cli")) -> list[str]:
    return [sys.executable, *script, "--config", "configs/local/diffmoe-tiny.yaml", *TINY,
            f"data.path={digits}", f"train.run_dir={run_dir}", *overrides]  # fmt: skip


def train(digits, run_dir, *overrides, timeout=HANG_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(digits, run_dir, *overrides), env=ENV, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def error_lines(out: subprocess.CompletedProcess) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("diffmoe-train: error:")]


def steps_of(run_dir: Path) -> list[str]:
    return sorted(d for d in os.listdir(run_dir / "checkpoints") if d.startswith("step_"))


def flip_byte(step_path: Path) -> None:
    target = step_path / "rank00000.pt"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in open(run_dir / "checkpoints" / "history.jsonl")]


@pytest.fixture(scope="module")
def base_run(digits, tmp_path_factory):
    """A finished 4-step run keeping 3 checkpoints: step_2, step_3, step_4."""
    run = tmp_path_factory.mktemp("base") / "run"
    out = train(digits, run, "train.steps=4", "checkpoint.keep_last=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert steps_of(run) == ["step_0000002", "step_0000003", "step_0000004"]
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    shutil.copytree(base_run, tmp_path / "run")
    return tmp_path / "run"


def test_fresh_run_over_an_older_runs_checkpoints_is_refused_and_archive_sets_them_aside(digits, run):
    before = {p: (run / p).read_bytes() for p in ("config.yaml", "metrics.jsonl")}
    history_file = run / "checkpoints" / "history.jsonl"
    history_before = history_file.read_bytes() if history_file.is_file() else None
    out = train(digits, run, "train.steps=2", "train.resume=never", "checkpoint.keep_last=2")
    assert out.returncode == 2, out.stderr[-3000:]
    assert len(error_lines(out)) == 1 and out.stderr.strip().splitlines()[-1] == error_lines(out)[0]
    line = error_lines(out)[0]
    assert "train.resume=never" in line and "new train.run_dir" in line and "train.resume=archive" in line
    # nothing of the older run was deleted or rewritten (config.yaml included), nothing was added
    assert steps_of(run) == ["step_0000002", "step_0000003", "step_0000004"]
    assert {p: (run / p).read_bytes() for p in before} == before
    assert history_file.read_bytes() == history_before
    assert sorted(os.listdir(run)) == ["checkpoints", "config.yaml", "metrics.jsonl", "samples"]

    out = train(digits, run, "train.steps=3", "train.resume=archive", "checkpoint.keep_last=2")
    assert out.returncode == 0, out.stderr[-3000:]
    (archive,) = [p for p in (run / "checkpoints").iterdir() if p.name.startswith("archive-")]
    assert sorted(d.name for d in archive.glob("step_*")) == ["step_0000002", "step_0000003", "step_0000004"]
    assert (archive / "metrics.jsonl").read_bytes() == before["metrics.jsonl"]
    # the new run keeps its own newest two, and `auto` continues the new run, not the archived one
    assert steps_of(run) == ["step_0000002", "step_0000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert [json.loads(line)["step"] for line in open(run / "metrics.jsonl")] == [1, 2, 3]
    assert ckpt.find_resumable(str(run / "checkpoints")).endswith("step_0000003")


def test_resume_below_corrupt_newer_checkpoints_keeps_what_it_writes(digits, run):
    flip_byte(run / "checkpoints" / "step_0000004")
    flip_byte(run / "checkpoints" / "step_0000003")
    out = train(digits, run, "train.steps=3", "checkpoint.keep_last=1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and "step_0000002 at step 2" in out.stdout.replace("\n", "")
    # the checkpoint just written is kept and verified; the corrupt step_0000004 (older in this run's
    # history than the step_0000003 written now) and step_0000002 went, keep_last=1
    assert steps_of(run) == ["step_0000003"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    assert ckpt.read_meta(ckpt.find_resumable(str(run / "checkpoints"), log=print))["step"] == 3
    corrupt = [r["dir"] for r in history(run) if r["event"] == "corrupt"]
    assert corrupt == ["step_0000004", "step_0000003"]


def test_every_checkpoint_corrupt_stops_with_one_line_and_exit_2(digits, run):
    for name in steps_of(run):
        flip_byte(run / "checkpoints" / name)
    metrics = (run / "metrics.jsonl").read_bytes()
    out = train(digits, run, "train.steps=6")
    assert out.returncode == 2, out.stderr[-3000:]
    (line,) = error_lines(out)
    assert "every checkpoint" in line and "corrupt" in line and "train.resume=archive" in line, line
    assert (run / "metrics.jsonl").read_bytes() == metrics  # no silent restart from step 0
    assert steps_of(run) == ["step_0000002", "step_0000003", "step_0000004"]


def test_resume_refuses_a_changed_seed_or_shape_and_warns_and_records_a_changed_lr(digits, run):
    config = (run / "config.yaml").read_bytes()
    for change, name in (("train.seed=1", "train.seed"), ("model.hidden_size=64", "model.hidden_size")):
        out = train(digits, run, "train.steps=6", change)
        assert out.returncode == 2, out.stderr[-3000:]
        (line,) = error_lines(out)
        assert f"{name}=" in line and "step_0000004" in line and "new train.run_dir" in line, line
        assert (run / "config.yaml").read_bytes() == config  # a failing start rewrites nothing
        assert steps_of(run) == ["step_0000002", "step_0000003", "step_0000004"]

    out = train(digits, run, "train.steps=6", "optim.lr=2e-3")
    assert out.returncode == 0, out.stderr[-3000:]
    warnings = [line for line in out.stdout.splitlines() if "WARNING" in line]
    assert warnings == [
        "[diffmoe] WARNING: resuming step_0000004 with optim.lr changed: 0.001 -> 0.002 (recorded in history.jsonl)"
    ]
    changes = [r for r in history(run) if r["event"] == "config_change" and r.get("training", True)]
    assert [(r["field"], r["old"], r["new"], r["step"]) for r in changes] == [("optim.lr", 0.001, 0.002, 4)]
    lrs = metric_series(str(run), "lr")
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == lrs[6] == pytest.approx(2e-3)  # the new value is used
    assert "lr: 0.002" in (run / "config.yaml").read_text()


def _save_with_a_full_disk(rank, world_size, root):
    from diffmoe_dist.parallel import build_parallel_dims

    dims = build_parallel_dims(1, 2)
    slots = [ckpt.Slot(f"model/w{rank}", torch.full((1 << 18,), float(rank)), (1 << 18,))]
    ckpt.save(root, 1, slots, {}, {}, dims)  # a good one first
    if rank == 1:  # this rank's disk is full: writes past 64 KiB fail (EFBIG), as a full disk's do (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    try:
        ckpt.save(root, 2, slots, {}, {}, dims)
    except ckpt.CheckpointError as exc:
        return str(exc)
    return None


def test_a_failed_save_removes_its_temporary_directory_on_every_rank(tmp_path):
    root = tmp_path / "checkpoints"
    errors = run_distributed(_save_with_a_full_disk, 2, str(root))
    assert errors[0] == errors[1] and "saving step 2 failed (rank 1:" in errors[0] and "removed" in errors[0]
    assert not [d for d in os.listdir(root) if d.startswith(".tmp")]  # the disk is not kept full
    assert (root / "latest").read_text().strip() == "step_0000001"
    ckpt.verify(str(root / "step_0000001"))


def test_one_live_owner_a_second_is_refused_a_dead_ones_lock_is_taken_over(digits, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen(command(digits, run, "train.steps=100000", "checkpoint.every=5"), env=ENV, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + HANG_TIMEOUT
        while not (run / "checkpoints" / "latest").is_file():
            assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
            time.sleep(0.1)
        out = train(digits, run, "train.steps=30", "optim.lr=2e-3")
        assert out.returncode == 2, out.stderr[-3000:]
        assert json.loads((run / "owner.lock").read_text())["pid"] == first.pid
        (line,) = error_lines(out)
        assert f"pid {first.pid}" in line and "is in use" in line and "another train.run_dir" in line, line
        assert "lr: 0.002" not in (run / "config.yaml").read_text()
        assert first.poll() is None  # the owner runs on, untouched
    finally:
        first.kill()  # SIGKILL: its lock stays behind, naming a pid that is gone
        first.wait()
    assert (run / "owner.lock").is_file()
    newest = max(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    out = train(digits, run, f"train.steps={newest}")  # ends at once (a train.steps below it is refused)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"WARNING: taking over {run / 'owner.lock'}" in out.stdout and f"pid {first.pid} is gone" in out.stdout
    assert "resumed from" in out.stdout and not (run / "owner.lock").exists()  # released at exit


def test_a_lock_from_another_host_is_stale_only_after_its_heartbeat_stops(tmp_path, monkeypatch):
    from diffmoe_dist.checkpoint.ownership import RunDirError, RunLock

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    other = RunLock(str(tmp_path))
    other.acquire()
    doc = json.loads(Path(other.path).read_text())
    Path(other.path).write_text(json.dumps({**doc, "host": "elsewhere", "owner": "elsewhere pid 1"}))
    with pytest.raises(RunDirError, match="in use by elsewhere pid 1"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - 31 * 60  # DIFFMOE_LOCK_STALE_MINUTES defaults to 30
    os.utime(other.path, (old, old))
    said = []
    mine = RunLock(str(tmp_path))
    mine.acquire(said.append)
    assert "no heartbeat for 31 min" in said[0]
    assert json.loads(Path(other.path).read_text())["token"] == mine.me["token"]


def test_slurm_owners_an_earlier_restart_of_the_same_job_is_stale_and_without_squeue_the_pid_decides(
    tmp_path, monkeypatch
):
    from diffmoe_dist.checkpoint.ownership import owner_alive, owner_identity

    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    me = owner_identity()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        same_job_before = {**me, "slurm_restart": 0, "pid": sleeper.pid, "start": None}
        assert owner_alive(same_job_before, me, time.time()) == (False, "an earlier run (restart 0) of this job")
        monkeypatch.setenv("PATH", str(tmp_path))  # no squeue: another job's owner is judged by its pid
        other_job = {**me, "slurm_job_id": "40", "pid": sleeper.pid, "start": None}
        assert owner_alive(other_job, me, time.time())[0] is True
    finally:
        sleeper.kill()
        sleeper.wait()
    assert owner_alive(other_job, me, time.time()) == (False, f"pid {sleeper.pid} is gone")


def _run_with_slow_saves(digits, run, tmp_path, *overrides):
    env = {**ENV, "SLOW_SAVE_DIR": str(tmp_path), "SLOW_SAVE_SECONDS": "3"}
    cmd = command(digits, run, "checkpoint.every=0", *overrides, script=("tests/slow_save.py",))
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_save(proc, marker: Path) -> None:
    deadline = time.monotonic() + HANG_TIMEOUT
    while not marker.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)


def test_a_signal_during_the_final_save_neither_kills_it_nor_fails_a_finished_run(digits, tmp_path):
    run = tmp_path / "run"
    proc = _run_with_slow_saves(digits, run, tmp_path, "train.steps=2")
    _wait_for_save(proc, tmp_path / "saving-rank0.pid")
    proc.send_signal(signal.SIGTERM)  # a requeue or preemption arriving during the final save
    out, _ = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 0, out[-3000:]  # finished: not a crash, not "requeue me"
    assert ckpt.read_meta(ckpt.find_resumable(str(run / "checkpoints")))["step"] == 2
    assert not [d for d in os.listdir(run / "checkpoints") if d.startswith(".tmp")]


def test_a_second_signal_during_the_stop_save_still_saves_and_exits_75(digits, tmp_path):
    run = tmp_path / "run"
    proc = _run_with_slow_saves(digits, run, tmp_path, "train.steps=100000")
    while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # the time-limit warning: stop and save ...
    _wait_for_save(proc, tmp_path / "saving-rank0.pid")
    proc.send_signal(signal.SIGTERM)  # ... and the scheduler's SIGTERM arrives during that save
    out, _ = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 75, out[-3000:]
    assert "SIGUSR1: stopped at step" in out
    stopped = int(out.split("stopped at step ")[1].split(",")[0])
    assert ckpt.read_meta(ckpt.find_resumable(str(run / "checkpoints")))["step"] == stopped
    assert not [d for d in os.listdir(run / "checkpoints") if d.startswith(".tmp")]


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB file system (tmpfs; root only): one tiny checkpoint (2.6 MiB) fits, two do not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_during_a_save_fails_in_one_line_and_leaves_no_temporary_directory(digits, small_disk):
    run = small_disk / "run"
    out = train(digits, run, "train.steps=3")
    assert out.returncode == 1, out.stderr[-3000:]
    (line,) = error_lines(out)
    assert "saving step 2 failed" in line and "No space left on device" in line and "removed" in line, line
    assert not [d for d in os.listdir(run / "checkpoints") if d.startswith(".tmp")]
    assert steps_of(run) == ["step_0000001"] and ckpt.verify(str(run / "checkpoints" / "step_0000001"))
    # with space again (the disk grown), the same command continues from the last good checkpoint
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    out = train(digits, run, "train.steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "at step 1" in out.stdout and steps_of(run) == ["step_0000002", "step_0000003"]
