"""Preemption: SIGTERM / SIGUSR1 / train.max_minutes stop every rank after the same step, save, exit 75,
and the resumed run is bitwise the uninterrupted one (W=4, P=2, DeepSpeed ZeRO, real gloo processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import conftest
import pytest
import torch
from conftest import HANG_TIMEOUT
from distributed import start_training_ranks, wait_all

from diffmoe_dist import checkpoint as ckpt
from diffmoe_dist.train.preemption import EXIT_REQUEUE
from diffmoe_dist.train.records import metric_series

TINY = [*conftest.TINY, "checkpoint.every=0"]
STEPS = 10  # 2N


def losses(run_dir) -> dict[int, float]:
    return metric_series(run_dir, "loss")  # one value per step: the one the run continued with


def final_state(run_dir) -> tuple[int, dict[str, torch.Tensor]]:
    """Every tensor of the run's latest checkpoint (weights, EMA, thresholds, Adam moments)."""
    path = ckpt.find_resumable(os.path.join(run_dir, "checkpoints"))
    reader = ckpt.ShardReader(path)
    return reader.meta["step"], {key: reader.read(key) for key in reader.tensors}


def logs(log_dir) -> str:
    return "\n".join(open(os.path.join(log_dir, f)).read() for f in sorted(os.listdir(log_dir)))


def train(run_dir, log_dir, extra=(), world_size=4, signal_after=None, signal_ranks=(), sig=None):
    procs = start_training_ranks(world_size, [*TINY, f"train.run_dir={run_dir}", *extra], str(log_dir))
    if signal_after is not None:
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.monotonic() + HANG_TIMEOUT
        while not (os.path.isfile(metrics) and len(open(metrics).readlines()) >= signal_after):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        for r in signal_ranks:
            procs[r].send_signal(sig)
    return wait_all(procs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, signal_ranks",
    [(1, (2,)), (2, (0, 1, 2, 3))],
    ids=["zero1-sigterm-one-rank", "zero2-sigterm-all-ranks"],
)
def test_resume_after_sigterm_is_bitwise_identical(digits, tmp_path, stage, signal_ranks):
    common = [f"data.path={digits}", "parallel.expert_parallel_size=2", f"train.zero_stage={stage}"]
    ref, split = tmp_path / "ref", tmp_path / "split"
    assert train(ref, tmp_path / "log-ref", [*common, f"train.steps={STEPS}"]) == [0] * 4

    codes = train(
        split,
        tmp_path / "log-1",
        [*common, f"train.steps={STEPS}"],
        signal_after=2,
        signal_ranks=signal_ranks,
        sig=signal.SIGTERM,
    )
    assert codes == [EXIT_REQUEUE] * 4, logs(tmp_path / "log-1")
    stopped_at, _ = final_state(split)
    assert 2 <= stopped_at < STEPS
    assert "SIGTERM: stopped at step" in logs(tmp_path / "log-1")

    assert train(split, tmp_path / "log-2", [*common, f"train.steps={STEPS}"]) == [0] * 4
    assert "resumed from" in logs(tmp_path / "log-2")
    assert losses(split) == losses(ref)
    ref_step, ref_state = final_state(ref)
    split_step, split_state = final_state(split)
    assert ref_step == split_step == STEPS
    assert ref_state.keys() == split_state.keys()
    assert any(k.startswith("optim/exp_avg_sq/") for k in ref_state)
    differ = [k for k in ref_state if not torch.equal(ref_state[k], split_state[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_sigusr1_and_time_limit_stop_single_process_with_exit_75(digits, tmp_path):
    run = tmp_path / "run"
    common = [
        *TINY,
        f"data.path={digits}",
        f"train.run_dir={run}",
        "train.steps=200",
        "parallel.expert_parallel_size=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFMOE_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--config", "configs/local/diffmoe-tiny.yaml"]
    proc = subprocess.Popen([*cmd, *common], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == EXIT_REQUEUE, out
    assert "SIGUSR1: stopped at step" in out
    stopped_at = ckpt.read_meta(ckpt.find_resumable(str(run / "checkpoints")))["step"]
    assert 1 <= stopped_at < 200

    # ~0.6 s: the run stops (and saves) as soon as the next step would cross the limit
    out = subprocess.run(
        [*cmd, *common, "train.max_minutes=0.01"], env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert out.returncode == EXIT_REQUEUE, out.stdout + out.stderr
    assert "time limit (train.max_minutes)" in out.stdout
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped_at:07d}'}" in out.stdout.replace("\n", "")
    assert ckpt.read_meta(ckpt.find_resumable(str(run / "checkpoints")))["step"] > stopped_at


def test_stop_flag_is_read_every_check_every_steps_and_a_signal_waits_for_the_next_check():
    from diffmoe_dist.parallel.groups import ParallelDims
    from diffmoe_dist.train.preemption import CHECK_EVERY, StopRequest

    stop = StopRequest(ParallelDims.single())
    try:
        stop._handle(signal.SIGTERM, None)  # as the handler would on a signal
        answers = [stop.should_stop() for _ in range(2 * CHECK_EVERY)]
    finally:
        stop.close()
    assert CHECK_EVERY > 1
    assert answers == ([None] * (CHECK_EVERY - 1) + ["SIGTERM"]) * 2


def test_step_metrics_read_the_device_once_and_only_when_looked_at():
    from diffmoe_dist.train.metrics import StepMetrics

    reads = []

    class Counted(torch.Tensor):
        def tolist(self):
            reads.append(1)
            return super().tolist()

    values = torch.tensor([1.5, 2.0], dtype=torch.float64).as_subclass(Counted)
    m = StepMetrics(values, ["loss", "grad_norm"], {"lr": 0.1}, order=["loss", "grad_norm", "lr"])
    m["steps_per_s"] = 3.0  # setting a value reads nothing
    assert not m.read and reads == []
    assert m["loss"] == 1.5 and dict(m) == {"loss": 1.5, "grad_norm": 2.0, "lr": 0.1, "steps_per_s": 3.0}
    assert m.read and reads == [1]


@pytest.mark.slow
def test_training_goes_on_during_an_async_save_and_sigterm_waits_for_it_then_saves_the_stop_step(digits, tmp_path):
    # The write of step 2's checkpoint hangs (a slow file system) until `release` exists.
    run, release = tmp_path / "run", tmp_path / "release"
    env = {"SLOW_SAVE_DIR": str(tmp_path), "SLOW_SAVE_STEP": "2", "SLOW_SAVE_UNTIL": str(release)}
    # keep_last: a SIGTERM that lands while step 4's save waits for step 2's is agreed at step 5 (the
    # step guard agrees before each update), whose save would otherwise retire step 2
    extra = [f"data.path={digits}", "parallel.expert_parallel_size=2", "train.steps=100000", "checkpoint.every=2",
             "checkpoint.keep_last=100"]  # fmt: skip
    procs = start_training_ranks(
        2, [*TINY, f"train.run_dir={run}", *extra], str(tmp_path / "log"), env=env, script=("tests/slow_save.py",)
    )
    try:
        deadline = time.monotonic() + HANG_TIMEOUT
        while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(tmp_path / "log")
            time.sleep(0.05)
        # step 3 trained while both ranks' files of step 2 were still being written
        assert all((tmp_path / f"saving-rank{r}.pid").is_file() for r in range(2))
        assert not (run / "checkpoints" / "step_0000002").exists()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        time.sleep(2)
        assert all(p.poll() is None for p in procs), "a stop must wait for the save in flight"
        release.touch()
        codes = wait_all(procs)
    finally:
        release.touch()
        for p in procs:
            p.kill() if p.poll() is None else None
    assert codes == [EXIT_REQUEUE] * 2, logs(tmp_path / "log")
    stopped = int(logs(tmp_path / "log").split("SIGTERM: stopped at step ")[1].split(",")[0])
    assert stopped >= 3
    ckpt.verify(str(run / "checkpoints" / "step_0000002"))
    latest = ckpt.find_resumable(str(run / "checkpoints"))
    assert ckpt.read_meta(latest)["step"] == stopped and ckpt.verify(latest)
    assert not [d for d in os.listdir(run / "checkpoints") if d.startswith(".tmp")]
