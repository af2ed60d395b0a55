"""The GPU suite: what the 256-GPU job runs (CUDA, NCCL, bf16, ZeRO-1, the stream loader with workers
and pinned memory), and the benchmarks, on one GPU. One test function per check: a new path (e.g.
the compiled one) is one more function, and lands in the JSON under its name.

NCCL refuses two ranks on one GPU, so training runs one rank with the NCCL process group and
``parallel.force_distributed=true``: parallelize, the dp pool (radix select), the all-to-all
dispatcher and every collective run at world size 1, and the suite checks that this equals one plain
process on the same GPU (as tests/test_device_placement.py does on CPU). Run it all with
``bash tests/gpu/run.sh``; it writes benchmarks/results/gpu_smoke.json. Skipped without CUDA;
``DIFFMOE_GPU_SUITE_DEVICE=cpu`` runs the same checks on the CPU with gloo and tiny sizes, to debug
the suite itself.
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
from conftest import TINY_MODEL

from diffmoe_dist.parallel.launch import free_port
from gpu.conftest import DEVICE, NO_GPU, ON_GPU, SKIP_REASON

pytestmark = [pytest.mark.skipif(NO_GPU, reason=SKIP_REASON), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/local/t2i-diffmoe-tiny.yaml"
# Sizes by device (the one switch): the GPU runs the sizes below; the CPU debug run, on a 2-core
# machine other sessions share, a model of depth 2 and fewer steps through the same code paths.
STEPS, EVERY = (30, 10) if ON_GPU else (6, 2)
# Subprocess limits catch hangs only. On a GPU a training run takes well under a minute and a
# benchmark a few minutes (its compile included): a hung NCCL call then fails its own check and
# leaves the rest of the ~8-minute suite its time. On the shared 2-core CPU a 4-step tiny run took over
# 30 minutes at load ~90 (measured 2026-12-07), hence an hour.
RUN_TIMEOUT, BENCH_TIMEOUT = (240, 360) if ON_GPU else (3600, 3600)
TRAIN = [
    f"parallel.device={DEVICE}",
    f"parallel.backend={'nccl' if ON_GPU else 'gloo'}",
    "parallel.force_distributed=true",
    "parallel.expert_parallel_size=1",
    "train.precision=bf16",
    "train.deterministic=true",
    "optim.adamw_impl=fused",  # the 256-GPU config's AdamW: step counts on the device, resumed bitwise
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
    TRAIN += TINY_MODEL


def _env() -> dict:
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "WANDB_MODE": "disabled",
        "DIFFMOE_NO_PROGRESS": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
    }


@pytest.fixture(scope="module")
def t2i_data(request) -> str:
    """The captioned digits shards: DIFFMOE_GPU_SUITE_DATA where they were made elsewhere (a device
    machine without the packaged text encoder: tests/gpu/prepare_device.sh), else made now by
    tests/conftest.py's fixture (tools/make_shards.py digits-t2i)."""
    return os.environ.get("DIFFMOE_GPU_SUITE_DATA") or str(request.getfixturevalue("digits_t2i"))


def train(run_dir: Path, data: str, steps: int, resume: str = "never", extra=(), plain: bool = False) -> dict:
    """One rank of diffmoe-train as torchrun would start it (RANK=0, WORLD_SIZE=1): the NCCL group
    is initialised because force_distributed asks for the distributed path. ``plain``: one ordinary
    process instead (no launcher variables, no process group). ``extra``: overrides after TRAIN's."""
    env = {**_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    overrides = [*TRAIN, f"data.path={data}", f"train.run_dir={run_dir}", f"train.steps={steps}"]
    overrides += [f"train.resume={resume}", *extra]
    if plain:
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(name)
        overrides.append("parallel.force_distributed=false")
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--config", CONFIG, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"run_dir"')][-1])
    result["log"] = proc.stdout + proc.stderr
    return result


def final_state(run_dir: Path) -> dict:
    from diffmoe_dist import checkpoint as ckpt

    root = run_dir / "checkpoints"
    path = str(root / (root / "latest").read_text().strip())
    meta = ckpt.read_meta(path)
    return {"step": meta["step"], "meta": meta, **{w: ckpt.load_model_state(path, w) for w in ("model", "ema")}}


@pytest.fixture(scope="module")
def uninterrupted(t2i_data, tmp_path_factory) -> dict:
    run_dir = tmp_path_factory.mktemp("gpu-run") / "uninterrupted"
    result = train(run_dir, t2i_data, STEPS)
    return {"dir": run_dir, "result": result}


def test_nccl_forced_distributed_bf16_training_with_checkpoints(uninterrupted, smoke_numbers, figure):
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
    smoke_numbers["telemetry"] = {k: last.get(k) for k in keys}
    figure(f"{STEPS} steps bf16, final loss", f"{result['loss']:.4f}")
    figure("wall s (start-up, steps, checkpoints, samples)", f"{result['seconds']:.1f}")
    figure("step s median (trainer telemetry)", f"{last['step_s_median']:.4f}")
    figure(
        "peak memory GB (allocated / reserved)",
        f"{last['peak_memory_gb_max']:.3f} / "
        + (f"{last['reserved_memory_gb_max']:.3f}" if ON_GPU else "n/a (CUDA only)"),
    )


def test_resume_finishes_bitwise_equal_to_an_uninterrupted_run(uninterrupted, t2i_data, tmp_path, figure):
    run_dir = tmp_path / "resumed"
    train(run_dir, t2i_data, STEPS - EVERY)  # stops (and saves) one checkpoint interval early
    resumed = train(run_dir, t2i_data, STEPS, resume="auto")
    assert f"resumed from {run_dir}/checkpoints/step_{STEPS - EVERY:07d}" in resumed["log"], resumed["log"][-2000:]
    a, b = final_state(uninterrupted["dir"]), final_state(run_dir)
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema"):
        differ = [k for k in a[part] if not torch.equal(a[part][k], b[part][k])]
        assert not differ, f"{part}: {len(differ)} tensors differ, e.g. {differ[:3]}"
    figure(
        f"resumed at step {STEPS - EVERY} vs uninterrupted", f"bitwise equal ({len(a['model'])} model + EMA tensors)"
    )


# Equality checks: short fp32 runs logging every step, so a wrong batch or a wrong gradient shows in
# the losses at once; kernels that sum in another order (another dispatch, ZeRO's flat partitions)
# differ by rounding only.
EQ_STEPS = 4
EQ = ["train.precision=fp32", "logging.log_every=1", f"checkpoint.every={EQ_STEPS}", "sample.every=0"]


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r["loss"] for r in records if "loss" in r}
    assert sorted(by_step) == list(range(1, EQ_STEPS + 1)), sorted(by_step)
    return [by_step[step] for step in sorted(by_step)]


def assert_same_training(a: Path, b: Path, rtol: float, atol: float, figure) -> None:
    """Per-step losses within ``rtol`` and final weights within ``atol``; the largest differences
    found go to the table."""
    la, lb = losses(a), losses(b)
    torch.testing.assert_close(lb, la, rtol=rtol, atol=0.0)
    sa, sb = final_state(a), final_state(b)
    assert sa["step"] == sb["step"] == EQ_STEPS
    for key, ref in sa["model"].items():
        torch.testing.assert_close(sb["model"][key], ref, rtol=0.0, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
    loss_diff = max(abs(x - y) / abs(x) for x, y in zip(la, lb, strict=True))
    weight_diff = max((sb["model"][k].double() - v.double()).abs().max().item() for k, v in sa["model"].items())
    figure(f"{EQ_STEPS} fp32 steps: max relative loss difference (bound {rtol:g})", f"{loss_diff:.2e}")
    figure(f"max weight difference (bound {atol:g})", f"{weight_diff:.2e}")


@pytest.fixture(scope="module")
def forced_fp32(t2i_data, tmp_path_factory) -> Path:
    """The reference of the equality checks: forced distributed (NCCL), indexed loader, ZeRO-0."""
    run_dir = tmp_path_factory.mktemp("gpu-eq") / "forced"
    train(run_dir, t2i_data, EQ_STEPS, extra=EQ)
    return run_dir


def test_forced_distributed_run_equals_one_plain_process(forced_fp32, t2i_data, tmp_path, smoke_numbers, figure):
    # The distributed path (NCCL group, dp pool by radix select, all-to-all dispatch) against the
    # plain one (local top-k, local gather) on the same device: same selections, same gradients.
    plain = tmp_path / "plain"
    train(plain, t2i_data, EQ_STEPS, extra=EQ, plain=True)
    assert_same_training(forced_fp32, plain, rtol=1e-4, atol=1e-4, figure=figure)
    smoke_numbers["forced_vs_plain_losses"] = {"forced": losses(forced_fp32), "plain": losses(plain)}


def test_stream_loader_with_workers_and_pinned_memory_feeds_the_same_batches(forced_fp32, t2i_data, tmp_path, figure):
    # What the 256-GPU config reads with: tar shards streamed by 2 DataLoader workers into pinned
    # host memory (on CUDA), copied without blocking. Same global batches as the indexed loader.
    stream = tmp_path / "stream"
    result = train(stream, t2i_data, EQ_STEPS, extra=[*EQ, "data.loader=stream", "data.num_workers=2"])
    assert result["step"] == EQ_STEPS
    assert_same_training(forced_fp32, stream, rtol=1e-5, atol=1e-6, figure=figure)


def test_zero1_on_the_forced_distributed_group_trains_like_plain_data_parallelism(
    forced_fp32, t2i_data, tmp_path, figure
):
    # DeepSpeed ZeRO-1 (configs/deepspeed/zero1.json) on the NCCL group: optimizer states partitioned
    # (over one rank here), the same global-mean gradients summed in another order.
    zero = tmp_path / "zero1"
    train(zero, t2i_data, EQ_STEPS, extra=[*EQ, "train.zero_stage=1"])
    assert final_state(zero)["meta"]["zero_stage"] == 1  # the engine that ran, as its checkpoint says
    assert_same_training(forced_fp32, zero, rtol=1e-4, atol=1e-4, figure=figure)


def _benchmark(script: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=_env(), timeout=BENCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


# On a GPU the matmul peak is taken at n = 8192 (flops.matmul_peak's CUDA default): a 2048 square
# is too small to reach an H100's peak, and a layer could then seem to run above "the peak". On the
# CPU a 256 square: the debug run needs a number, not a good one (below).
PEAK = ["--peak-size", "8192" if ON_GPU else "256"]
# The share of that peak is a physical bound on a GPU the suite has to itself. On a shared CPU the
# peak is timed under other processes' load (measured in a CPU debug run: 0.18 GFLOP/s, and a layer
# "at 950%"), so there the bounds are only finite and positive.
PEAK_SHARE_BOUND = 1.0 if ON_GPU else math.inf


def test_moe_layer_against_dense_deepspeed_and_megatron(tmp_path, smoke_numbers, figure):
    # The paper's S (D 384, E 16) and L (D 1024, E 16) widths, bf16, at equal active FLOPs.
    sizes = ["--configs", "384x16,1024x16", "--tokens", "16384"] if ON_GPU else ["--quick", "--threads", "1"]
    res = _benchmark("moe_layer.py", ["--device", DEVICE, "--dtypes", "bfloat16", *sizes, *PEAK], tmp_path / "moe.json")
    errors = {f"{r['impl']} {r['config']}": r["error"] for r in res["rows"] if "error" in r}
    keys = ("ms_per_iter", "tokens_per_s", "vs_ours", "pct_of_matmul_peak")
    table = {f"{r['config']} {r['impl']}": {k: r.get(k) for k in keys} for r in res["rows"] if "error" not in r}
    smoke_numbers["moe_layer"] = {"rows": table, "errors": errors, "matmul_peak_flops": res["matmul_peak_flops"]}
    assert not errors, errors
    assert {r["impl"] for r in res["rows"]} == {"ours", "dense", "deepspeed", "megatron"}
    for name, row in table.items():  # inside physical bounds, not only "no error"
        assert all(_finite_positive(row[k]) for k in keys), (name, row)
        assert row["pct_of_matmul_peak"] < 100 * PEAK_SHARE_BOUND, (name, row)  # none outruns the matmul peak
        assert 0.01 < row["vs_ours"] < 100, (name, row)  # ours / peer tokens/s: a sane ratio
    figure("bf16 matmul peak TFLOP/s (measured)", f"{res['matmul_peak_flops']['bfloat16'] / 1e12:.1f}")
    for name, row in table.items():
        figure(
            f"{name}: ms/iter, tokens/s, % of peak, tokens/s vs ours",
            f"{row['ms_per_iter']:.2f}, {row['tokens_per_s']:.3g}, {row['pct_of_matmul_peak']:.1f}%, "
            f"{row['vs_ours']:.2f}x",
        )


# train_throughput.py, run once eagerly (the MFU check) and once compiled (the compile check, same
# arguments). GPU: the S configs at the configs' global batch of 256 images (65,536 tokens: a batch
# that keeps an H100 busy, so MFU means something); only DiffMoE compiled, the model the 256-GPU job
# compiles. CPU: the tiny DiffMoE, one thread, the benchmark's quick sizes.
if ON_GPU:
    THROUGHPUT = ["--device", "cuda", "--procs", "1", "--precision", "bf16", "--global-batch", "256"]
    THROUGHPUT += ["--steps", "5", "--warmup", "2", "--no-profile", *PEAK]
    EAGER_CONFIGS, COMPILED_CONFIG = "dense-S,diffmoe-S", "diffmoe-S"
else:
    THROUGHPUT = ["--quick", "--procs", "1", "--threads", "1", "--precision", "bf16", "--no-profile", *PEAK]
    EAGER_CONFIGS = COMPILED_CONFIG = "diffmoe-tiny"


@pytest.fixture(scope="module")
def eager_throughput(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("throughput") / "eager.json"
    return _benchmark("train_throughput.py", [*THROUGHPUT, "--configs", EAGER_CONFIGS], out)


def test_train_throughput_and_mfu_against_the_measured_bf16_peak(eager_throughput, smoke_numbers, figure):
    res = eager_throughput
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
    assert [r["config"] for r in rows] == EAGER_CONFIGS.split(","), rows
    for r in rows:
        assert all(_finite_positive(r[k]) for k in ("images_per_s", "tokens_per_s", "mfu")), r
        assert r["mfu"] < PEAK_SHARE_BOUND, r  # below 100% of the peak measured on the same device, same run
        figure(
            f"{r['config']} bf16, batch {r['global_batch']}: step s, images/s, tokens/s, MFU",
            f"{r['step_s']:.4f}, {r['images_per_s']:.1f}, {r['tokens_per_s']:.3g}, {100 * r['mfu']:.1f}%",
        )


def test_compiled_blocks_against_eager_side_by_side(eager_throughput, tmp_path, smoke_numbers, figure):
    # train.compile (parallel/compile.py) on the same row as the eager run: steps/s ratio, the first
    # (compiling) step apart, and the losses and gradient norms of the timed steps, which start from
    # the same weights and data: the forward and the backward of the compiled blocks.
    args = [*THROUGHPUT, "--configs", COMPILED_CONFIG, "train.compile=true"]
    compiled = _benchmark("train_throughput.py", args, tmp_path / "compiled.json")["rows"]
    eager = [r for r in eager_throughput["rows"] if r["config"] == COMPILED_CONFIG]
    assert len(eager) == len(compiled) == 1, (eager, compiled)
    eager, compiled = eager[0], compiled[0]
    assert "error" not in eager and "error" not in compiled, (eager.get("error"), compiled.get("error"))
    assert compiled["compile"] and not eager["compile"]
    ratio = compiled["images_per_s"] / eager["images_per_s"]
    smoke_numbers["compile"] = {
        "config": COMPILED_CONFIG,
        "steps_per_s_ratio": ratio,
        "first_step_s": {"eager": eager["first_step_s"], "compiled": compiled["first_step_s"]},
        "loss": {"eager": eager["loss"], "compiled": compiled["loss"]},
        "grad_norm": {"eager": eager["grad_norm"], "compiled": compiled["grad_norm"]},
    }
    assert _finite_positive(ratio), ratio
    # bf16 autocast: inductor keeps some intermediates in fp32 that eager rounds to bf16, so the two
    # agree to bf16's rounding, not bitwise; a wrong graph (a missing term, a wrong gradient) is off
    # by far more than 5%.
    diffs = {}
    for key in ("loss", "grad_norm"):
        for a, b in zip(eager[key], compiled[key], strict=True):
            assert math.isfinite(b) and abs(a - b) <= 5e-2 * abs(a), (key, eager[key], compiled[key])
        diffs[key] = max(abs(a - b) / abs(a) for a, b in zip(eager[key], compiled[key], strict=True))
    figure(f"{COMPILED_CONFIG}: compiled / eager steps/s", f"{ratio:.2f}x")
    figure(
        "first step s, eager / compiled (compilation)", f"{eager['first_step_s']:.1f} / {compiled['first_step_s']:.1f}"
    )
    figure("max relative difference, loss / grad norm (bound 5e-2)", f"{diffs['loss']:.1e} / {diffs['grad_norm']:.1e}")
