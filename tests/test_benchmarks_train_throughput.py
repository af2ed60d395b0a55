"""Smoke run of benchmarks/train_throughput.py --quick: the real training step of dense-tiny and
DiffMoE-tiny on 1 and 2 gloo processes is timed, its FLOPs are counted, MFU is reported against a
matmul peak measured in the same run, and the breakdowns account for the whole step. The FLOP
counter is checked against a count derived here, independently, from the DiT-tiny architecture.
Speed itself is not asserted: that needs a quiet machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "train_throughput.py"
TUNED = "4294967296"


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("train_throughput") / "train_throughput.json"
    env = {**os.environ, "WANDB_MODE": "disabled", "DIFFMOE_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def dense_tiny_step_flops(batch: int) -> int:
    """Matmul FLOPs of one dense DiT-tiny training step on 16x16x1 digits (depth 6, D 192, H 768,
    patch 2 -> L 64 tokens per image, C 1 channel), written out layer by layer: ``2 m k n`` per
    forward matmul; backward adds the weight gradient everywhere and the input gradient where the
    input needs one (not for the patch conv on the noisy image, nor for the first timestep linear
    on the sinusoidal features); attention ``4 B L^2 D`` forward, ``10 B L^2 D`` backward (the CPU
    flash kernel recomputes the scores)."""
    depth, D, H, L, C, patch_area, freq = 6, 192, 768, 64, 1, 4, 256
    N = batch * L
    fwd_bwd_full = 3  # forward + input grad + weight grad
    flops = 2 * (2 * N * (C * patch_area) * D)  # patch embedding conv: forward + weight grad
    flops += 2 * (2 * batch * freq * D) + fwd_bwd_full * (2 * batch * D * D)  # timestep MLP
    per_block = fwd_bwd_full * 2 * batch * D * (6 * D)  # adaLN modulation, one row per image
    per_block += fwd_bwd_full * 2 * N * D * (3 * D + D)  # qkv and output projection
    per_block += (4 + 10) * batch * L * L * D  # attention
    per_block += fwd_bwd_full * 2 * N * (D * H + H * D)  # FFN
    flops += depth * per_block
    flops += fwd_bwd_full * (2 * batch * D * (2 * D) + 2 * N * D * (patch_area * C))  # final layer
    return flops


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
        assert r["step_s"] > 0 and r["images_per_s"] > 0 and r["tokens_per_s"] == pytest.approx(64 * r["images_per_s"])
        assert r["flops_per_step"] > 0 and r["flops_per_image"] * r["global_batch"] == pytest.approx(
            r["flops_per_step"]
        )
        assert r["achieved_flops"] == pytest.approx(r["flops_per_step"] / r["step_s"])
        assert r["peak_flops"] == peaks["2"]  # P x T = 2 threads in every row
        assert 0 < r["mfu"] < 1.5
        assert 0 < r["cpu_utilisation"] <= 1.2
        expected_ep = 2 if (r["config"], r["procs"]) == ("diffmoe-tiny", 2) else 1
        assert r["ep_size"] == expected_ep
    assert "MFU" in stdout and "Where the time goes" in stdout and "Operator categories" in stdout


def test_breakdowns_account_for_the_whole_step(quick):
    res, _ = quick
    for r in res["rows"]:
        phases, ops = r["breakdown_fractions"], r["profile_fractions"]
        assert set(phases) == {"data", "forward", "backward", "grad_reduce", "clip", "optimizer", "ema", "metrics"}
        assert sum(phases.values()) == pytest.approx(1.0, abs=1e-6)
        assert min(phases.values()) >= 0 and phases["forward"] > 0 and phases["backward"] > 0
        assert sum(ops.values()) == pytest.approx(1.0, abs=1e-3)
        assert min(ops.values()) >= 0 and ops["matmul"] > 0
        if r["procs"] == 1:
            assert phases["grad_reduce"] < 0.01  # nothing to reduce on one process
        if r["config"] == "diffmoe-tiny" and r["procs"] == 1:
            assert ops["moe_index"] > 0  # dispatch: index_select / index_add / nonzero / topk


def test_flop_counter_matches_the_architecture(quick):
    res, _ = quick
    rows = {(r["config"], r["procs"]): r for r in res["rows"]}
    for procs in (1, 2):
        dense = rows[("dense-tiny", procs)]
        # Summed over ranks, 2 processes execute the same matmuls as one process on the whole batch.
        assert dense["flops_per_step"] == pytest.approx(dense_tiny_step_flops(dense["global_batch"]), rel=1e-3)
        assert dense["flops_counted_over_analytic"] == pytest.approx(1.0, rel=1e-3)
        # DiffMoE at C = 1 computes E * floor(N / E) expert rows (= N here) plus router and predictor.
        moe = rows[("diffmoe-tiny", procs)]
        assert moe["flops_counted_over_analytic"] == pytest.approx(1.0, rel=1e-3)
        assert 1.0 < moe["flops_per_step"] / dense["flops_per_step"] < 1.1
