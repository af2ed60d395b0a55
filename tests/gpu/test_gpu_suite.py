"""The GPU suite: the CUDA + NCCL path of the trainer and the benchmarks on one GPU.

NCCL refuses two ranks on one GPU, so training runs one rank with the NCCL process group and
``parallel.force_distributed=true``: parallelize, the dp pool (radix select), the all-to-all
dispatcher and every collective run at world size 1 (tests/test_device_placement.py checks on CPU
that this path equals one plain process). Run it all with ``bash tests/gpu/run.sh``; it writes
benchmarks/results/gpu_smoke.json. Skipped without CUDA; ``DIFFMOE_GPU_SUITE_DEVICE=cpu`` runs the
same checks on the CPU with gloo and tiny sizes, to debug the suite itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmoe_dist.parallel.launch import free_port
from gpu.conftest import DEVICE, NO_GPU, ON_GPU, SKIP_REASON

pytestmark = [pytest.mark.skipif(NO_GPU, reason=SKIP_REASON), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/local/t2i-diffmoe-tiny.yaml"
STEPS, EVERY = (30, 10) if ON_GPU else (6, 2)
TRAIN = [
    f"parallel.device={DEVICE}",
    f"parallel.backend={'nccl' if ON_GPU else 'gloo'}",
    "parallel.force_distributed=true",
    "parallel.expert_parallel_size=1",
    "train.precision=bf16",
    "train.deterministic=true",
    f"checkpoint.every={EVERY}",
    "checkpoint.keep_last=5",
    "data.global_batch_size=32",
    "logging.wandb=disabled",
    "logging.log_every=5",
    "logging.routing_every=5",
    "sample.num_steps=2",
    "sample.per_class=1",
]
if not ON_GPU:
    TRAIN += ["model.depth=2", "model.hidden_size=48", "model.num_heads=4"]


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "WANDB_MODE": "disabled",
        "DIFFMOE_NO_PROGRESS": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


@pytest.fixture(scope="module")
def t2i_data(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("digits-t2i")
    cmd = [sys.executable, str(REPO / "tools/make_shards.py"), "digits-t2i", "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, cwd=REPO, env=_env(), timeout=600)
    return str(out)


def train(run_dir: Path, data: str, steps: int, resume: str = "never") -> dict:
    """One rank of diffmoe-train as torchrun would start it (RANK=0, WORLD_SIZE=1): the NCCL group
    is initialised because force_distributed asks for the distributed path."""
    env = {**_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    overrides = [*TRAIN, f"data.path={data}", f"train.run_dir={run_dir}", f"train.steps={steps}"]
    overrides.append(f"train.resume={resume}")
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--config", CONFIG, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"run_dir"')][-1])
    result["log"] = proc.stdout + proc.stderr
    return result


def final_state(run_dir: Path) -> dict:
    from diffmoe_dist import checkpoint as ckpt

    root = run_dir / "checkpoints"
    path = str(root / (root / "latest").read_text().strip())
    return {"step": ckpt.read_meta(path)["step"], **{w: ckpt.load_model_state(path, w) for w in ("model", "ema")}}


@pytest.fixture(scope="module")
def uninterrupted(t2i_data, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("gpu-run") / "uninterrupted"
    result = train(run_dir, t2i_data, STEPS)
    return {"dir": run_dir, "result": result}


def test_nccl_forced_distributed_bf16_training_with_checkpoints(uninterrupted, smoke_numbers):
    run_dir, result = uninterrupted["dir"], uninterrupted["result"]
    assert result["step"] == STEPS and math.isfinite(result["loss"]), result
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps[-1] == f"step_{STEPS:07d}" and len(steps) == STEPS // EVERY, steps
    assert (run_dir / "routing.jsonl").is_file()  # telemetry's all-reduce ran on the comm device
    assert list((run_dir / "samples").glob("*.png"))  # the sample grid's all-gather too
    smoke_numbers["train"] = {"steps": STEPS, "loss": result["loss"], "seconds": result["seconds"]}
    from diffmoe_dist.train.records import read_metrics

    last = read_metrics(str(run_dir))[-1]  # the operator telemetry (reserved memory and retries: CUDA only)
    keys = ["step_s_median", "step_s_max", "data_share", "peak_memory_gb_max", "mfu", "mfu_peak_source"]
    if ON_GPU:
        assert last["reserved_memory_gb_max"] >= last["peak_memory_gb_max"] > 0 <= last["alloc_retries_max"], last
        keys += ["reserved_memory_gb_max", "alloc_retries_max"]
    smoke_numbers["telemetry"] = {k: last[k] for k in keys}


def test_resume_finishes_bitwise_equal_to_an_uninterrupted_run(uninterrupted, t2i_data, tmp_path):
    run_dir = tmp_path / "resumed"
    train(run_dir, t2i_data, STEPS - EVERY)  # stops (and saves) one checkpoint interval early
    resumed = train(run_dir, t2i_data, STEPS, resume="auto")
    assert f"resumed from {run_dir}/checkpoints/step_{STEPS - EVERY:07d}" in resumed["log"], resumed["log"][-2000:]
    a, b = final_state(uninterrupted["dir"]), final_state(run_dir)
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def _benchmark(script: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_moe_layer_against_dense_deepspeed_and_megatron(tmp_path, smoke_numbers):
    # The paper's S (D 384, E 16) and L (D 1024, E 16) widths, bf16, at equal active FLOPs.
    sizes = ["--configs", "384x16,1024x16", "--tokens", "16384"] if ON_GPU else ["--quick"]
    res = _benchmark("moe_layer.py", ["--device", DEVICE, "--dtypes", "bfloat16", *sizes], tmp_path / "moe.json")
    errors = {f"{r['impl']} {r['config']}": r["error"] for r in res["rows"] if "error" in r}
    keys = ("ms_per_iter", "tokens_per_s", "vs_ours", "pct_of_matmul_peak")
    table = {f"{r['config']} {r['impl']}": {k: r.get(k) for k in keys} for r in res["rows"] if "error" not in r}
    smoke_numbers["moe_layer"] = {"rows": table, "errors": errors, "matmul_peak_flops": res["matmul_peak_flops"]}
    assert not errors, errors
    assert {r["impl"] for r in res["rows"]} == {"ours", "dense", "deepspeed", "megatron"}


def test_train_throughput_and_mfu_against_the_measured_bf16_peak(tmp_path, smoke_numbers):
    if ON_GPU:
        args = ["--device", "cuda", "--procs", "1", "--precision", "bf16", "--configs", "dense-S,diffmoe-S"]
        args += ["--steps", "5", "--warmup", "2", "--no-profile"]
    else:
        args = ["--quick", "--procs", "1", "--precision", "bf16", "--no-profile"]
    res = _benchmark("train_throughput.py", args, tmp_path / "throughput.json")
    rows = res["rows"]
    errors = [r["error"] for r in rows if "error" in r]
    smoke_numbers["train_throughput"] = {
        "rows": [
            {k: r.get(k) for k in ("config", "precision", "images_per_s", "tokens_per_s", "mfu", "step_s", "error")}
            for r in rows
        ],
        "matmul_peak_flops": res["matmul_peak_flops"],
    }
    assert not errors, errors
    assert all(0 < r["mfu"] < 1.5 for r in rows), [r["mfu"] for r in rows]


def test_compiled_blocks_against_eager_side_by_side(tmp_path, smoke_numbers):
    # train.compile (parallel/compile.py): the same rows eager and compiled, steps/s ratio, the first
    # (compiling) step apart, and the losses of the two runs, which start from the same weights and data.
    if ON_GPU:
        args = ["--device", "cuda", "--procs", "1", "--precision", "bf16", "--configs", "dense-S,diffmoe-S"]
        args += ["--steps", "5", "--warmup", "2", "--no-profile"]
    else:
        args = ["--quick", "--procs", "1", "--precision", "fp32", "--no-profile"]
    runs = {
        mode: _benchmark(
            "train_throughput.py", [*args, f"train.compile={mode == 'compiled'}"], tmp_path / f"{mode}.json"
        )
        for mode in ("eager", "compiled")
    }
    table = []
    for eager, compiled in zip(runs["eager"]["rows"], runs["compiled"]["rows"], strict=True):
        assert "error" not in eager and "error" not in compiled, (eager.get("error"), compiled.get("error"))
        assert compiled["compile"] and not eager["compile"]
        table.append(
            {
                "config": eager["config"],
                "steps_per_s_ratio": compiled["images_per_s"] / eager["images_per_s"],
                "first_step_s": {"eager": eager["first_step_s"], "compiled": compiled["first_step_s"]},
                "loss": {"eager": eager["loss"], "compiled": compiled["loss"]},
            }
        )
        # Same weights, data and noise: losses agree within the precision's rounding (bf16 on GPU).
        tol = 5e-2 if ON_GPU else 1e-3
        for a, b in zip(eager["loss"], compiled["loss"], strict=True):
            assert abs(a - b) <= tol * max(abs(a), 1e-6), (eager["config"], a, b)
    smoke_numbers["compile"] = table
