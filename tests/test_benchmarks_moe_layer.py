"""Smoke runs of benchmarks/moe_layer.py: every implementation (ours, dense, DeepSpeed, Megatron)
runs forward+backward at tiny sizes, the allocator setting takes effect, and the JSON holds the
numbers the table prints. Speed itself is not asserted: that needs a quiet machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import HANG_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "moe_layer.py"
TUNED = "4294967296"


def _run(tmp_path: Path, *flags: str) -> tuple[dict, str]:
    out = tmp_path / "moe_layer.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--threads", "1", *flags, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=HANG_TIMEOUT,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_run_times_all_four_layers_under_the_tuned_allocator(tmp_path):
    res, stdout = _run(tmp_path)
    assert res["malloc"] == "tuned"
    assert res["env"] == {"MALLOC_MMAP_THRESHOLD_": TUNED, "MALLOC_TRIM_THRESHOLD_": TUNED}  # re-exec worked
    assert set(res["matmul_peak_flops"]) == {"float32", "bfloat16"}
    rows = res["rows"]
    expected = {
        (config, dtype, impl)
        for config in ("D32-E4", "D64-E8")
        for dtype in ("float32", "bfloat16")
        for impl in ("ours", "dense", "deepspeed", "megatron")
    }
    assert {(r["config"], r["dtype"], r["impl"]) for r in rows} == expected
    for r in rows:
        assert "error" not in r, r
        assert r["ms_per_iter"] > 0 and r["tokens_per_s"] > 0 and r["pct_of_matmul_peak"] > 0
        assert r["minor_faults_per_iter"] >= 0 and r["repeats"] == 1
        if r["impl"] == "ours":
            assert r["vs_ours"] == 1.0
    assert "ours / peer" in stdout and "megatron" in stdout


def test_compare_malloc_runs_both_allocator_settings(tmp_path):
    flags = ("--compare-malloc", "--impls", "ours,dense", "--configs", "32x4", "--dtypes", "float32")
    res, stdout = _run(tmp_path, *flags)
    tuned, default = res["runs"]
    assert tuned["malloc"] == "tuned" and tuned["env"]["MALLOC_MMAP_THRESHOLD_"] == TUNED
    assert default["malloc"] == "default" and default["env"]["MALLOC_MMAP_THRESHOLD_"] is None
    for run in (tuned, default):
        assert [r["impl"] for r in run["rows"]] == ["ours", "dense"]
        assert all("error" not in r and "minor_faults_per_iter" in r for r in run["rows"])
    assert "malloc=tuned" in stdout and "malloc=default" in stdout
