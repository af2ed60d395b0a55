"""Smoke run of benchmarks/train_throughput.py --quick: the real training step of dense-tiny and
DiffMoE-tiny on 1 and 2 gloo processes is timed, its FLOPs are counted, MFU is reported against a
matmul peak measured in the same run, and the phase timer of the real step accounts for that
step's wall time. Checks are against independent references: torch's FlopCounterMode (inside the
benchmark) against the project's FLOP count (diffmoe_dist.train.flops), the step wall clock against
the timer's phases, and physical bounds (no row beats the measured matmul peak by more than
noise). Speed itself is not asserted: that needs a quiet machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"
TUNED = "4294967296"
CORE_BOUND = 384e9


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("train_throughput") / "train_throughput.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "DIFFMOE_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_run_reports_throughput_and_mfu_for_each_config_and_process_count(quick):
    res, stdout = quick
    assert res["env"] == {"MALLOC_MMAP_THRESHOLD_": TUNED, "MALLOC_TRIM_THRESHOLD_": TUNED}  # re-exec worked
    assert {"platform", "torch", "cpu_count", "date"} <= set(res["machine"])
    peaks = res["matmul_peak_flops"]["fp32"]
    assert set(peaks) == {"1", "2"} and all(v > 0 for v in peaks.values())
    rows = res["rows"]
    assert {(r["config"], r["procs"]) for r in rows} == {(c, p) for c in ("dense-tiny", "diffmoe-tiny") for p in (1, 2)}
    for r in rows:
        assert "error" not in r, r
        assert r["procs"] * r["threads"] == 2 and r["precision"] == "fp32" and r["tokens_per_image"] == 64
        assert r["steps"] == 2 and len(r["step_s_all"]) == 2
        assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["flops_per_step"] > 0
        # A physical bound (not the in-run peak, which other processes on the cores can depress):
        # a core does at most 2 FMA units x 16 fp32 lanes x 2 FLOPs at <= 6 GHz = 384 GFLOP/s.
        assert r["flops_per_step"] / r["step_s"] < r["procs"] * r["threads"] * CORE_BOUND
        assert r["peak_flops"] == peaks["2"]  # P x T = 2 threads in every row
        assert r["mfu"] > 0
        assert 0 < r["cpu_utilisation"] <= 1.2
        expected_ep = 2 if (r["config"], r["procs"]) == ("diffmoe-tiny", 2) else 1
        assert r["ep_size"] == expected_ep
    assert "MFU" in stdout and "Where the time goes" in stdout and "Operator categories" in stdout


def test_phase_timer_of_the_real_step_accounts_for_its_wall_time(quick):
    res, _ = quick
    for r in res["rows"]:
        phases, ops = r["breakdown_fractions"], r["profile_fractions"]
        assert set(phases) == {"data", "forward", "backward", "optimizer", "ema", "metrics"}
        assert min(phases.values()) >= 0 and phases["forward"] > 0 and phases["backward"] > 0
        # The phases tile Trainer.train_step: their total is the step's wall time measured around the
        # call (up to the call overhead outside the first and after the last lap).
        assert 0.9 * r["breakdown_step_wall_s"] <= r["breakdown_total_s"] <= r["breakdown_step_wall_s"]
        assert sum(ops.values()) == pytest.approx(1.0, abs=1e-3)
        assert min(ops.values()) >= 0 and ops["matmul"] > 0
        if r["config"] == "diffmoe-tiny" and r["procs"] == 1:
            assert ops["moe_index"] > 0  # dispatch: index_select / index_add / nonzero / topk


def test_flop_counter_matches_the_project_flop_count(quick):
    res, _ = quick
    rows = {(r["config"], r["procs"]): r for r in res["rows"]}
    for procs in (1, 2):
        dense = rows[("dense-tiny", procs)]
        # Summed over ranks, 2 processes execute the same matmuls as one process on the whole batch.
        assert dense["flops_per_step"] == rows[("dense-tiny", 1)]["flops_per_step"]
        assert dense["flops_counted_over_analytic"] == pytest.approx(1.0, rel=1e-6)
        # DiffMoE at C = 1 computes E * floor(N / E) expert rows (= N here) plus router and predictor.
        moe = rows[("diffmoe-tiny", procs)]
        assert moe["flops_counted_over_analytic"] == pytest.approx(1.0, rel=1e-6)
        assert 1.0 < moe["flops_per_step"] / dense["flops_per_step"] < 1.1
