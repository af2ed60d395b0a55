"""Smoke run of benchmarks/paper_table.py --quick: the nine models (the paper's seven rows, Race and
the DDPM pair) build and train with the real trainer on the digits (one step each, batches of 16),
at the active-parameter ratios the paper's table needs, and every evaluation row (DiffMoE and EC-DiT
static and dynamic, TC, both dense models, Race, DDPM) lands in the table and the JSON with a sample
grid. Quality itself is not asserted: one step teaches nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "paper_table.py"


@pytest.mark.slow
def test_quick_table_has_every_model_and_inference_strategy(tmp_path):
    out = tmp_path / "paper_table.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "DIFFMOE_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--seeds",
            "0",
            "--workdir",
            str(tmp_path / "runs"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads(out.read_text())
    rows = {(r["model"], r["inference"]): r for r in res["rows"]}
    assert list(rows) == [
        ("Dense-DiT", "-"),
        ("TC-DiT-E8", "static (top-1)"),
        ("EC-DiT-E8", "static (in-sample)"),
        ("EC-DiT-E8", "dynamic (intra-sample)"),
        ("DiffMoE-E8", "static"),
        ("DiffMoE-E8", "dynamic"),
        ("Dense-DiT-1.5x", "-"),
        ("Race-E8", "-"),
        ("Dense-DiT-DDPM", "-"),
        ("DiffMoE-E8-DDPM", "dynamic"),
    ]
    dense = rows[("Dense-DiT", "-")]["active_params"]
    for key in [
        ("TC-DiT-E8", "static (top-1)"),
        ("EC-DiT-E8", "static (in-sample)"),
        ("DiffMoE-E8", "static"),
        ("Race-E8", "-"),
    ]:
        # Equal active parameters: the MoE models differ from dense only by their routers (E x D each).
        assert abs(rows[key]["active_params"] / dense - 1) < 0.01, key
    assert 1.4 < rows[("Dense-DiT-1.5x", "-")]["active_params"] / dense < 1.6
    # Static expert choice fills every expert to k = C N / E exactly: C_avg = C = 1.
    assert rows[("DiffMoE-E8", "static")]["capacity_avg"] == [1.0]
    assert rows[("EC-DiT-E8", "static (in-sample)")]["capacity_avg"] == [1.0]
    assert rows[("Dense-DiT", "-")]["capacity_avg"] == [None]
    for r in res["rows"]:
        assert len(r["digits_fid"]) == 1 and r["digits_fid"][0] > 0
        assert 0.0 <= r["class_accuracy"][0] <= 1.0
    for runs in res["runs"].values():
        for run in runs:
            assert run["steps_per_s"] > 0
            for ev in run["evals"]:
                assert Path(ev["grid"]).is_file()
    assert {"ranking_by_fid", "diffmoe_dynamic_beats_dense_1x"} <= res["ordering"].keys()
    assert "training strategy" in proc.stdout and "DiffMoE-E8" in proc.stdout

    # --reuse takes finished (model, seed) runs from the --out file instead of training them again.
    again = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--seeds",
            "0",
            "--reuse",
            "--models",
            "Dense-DiT,DiffMoE-E8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        cwd=REPO,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.count("reused from") == 2
    reused = json.loads(out.read_text())
    assert reused["runs"]["DiffMoE-E8"] == res["runs"]["DiffMoE-E8"]
    assert [r["model"] for r in reused["rows"]] == ["Dense-DiT", "DiffMoE-E8", "DiffMoE-E8"]


@pytest.mark.slow
def test_sigterm_stops_the_table_without_scoring_a_half_trained_model(tmp_path):
    # The trainer treats SIGTERM as a preemption (checkpoint, stop): the table must not then
    # evaluate the half-trained model as if it were a result, and must say so with exit 75.
    out, runs = tmp_path / "table.json", tmp_path / "runs"
    env = {**os.environ, "WANDB_MODE": "disabled", "DIFFMOE_NO_PROGRESS": "1"}
    cmd = [sys.executable, str(SCRIPT), "--quick", "--steps", "200", "--models", "Dense-DiT"]
    proc = subprocess.Popen(
        [*cmd, "--workdir", str(runs), "--out", str(out)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    config = runs / "Dense-DiT-seed0" / "config.yaml"  # written when fit() starts
    deadline = time.time() + HANG_TIMEOUT
    while not config.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert config.exists(), "the training run never started"
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=HANG_TIMEOUT)
    assert proc.returncode == 75, stdout[-2000:] + stderr[-2000:]
    assert "nothing evaluated" in stderr
    assert not out.exists()  # no finished run: nothing to write
