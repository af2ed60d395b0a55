"""The 256-GPU job's scale twin, the long part (issue 21): configs/t2i/diffmoe-e16-256gpu.yaml at
W=256 (32 nodes x 8, EP 8, EDP 32, pool dp) at tiny widths, every rank a thread of one threaded
process group running the real trainer (tests/scale_twin.py). Runs, each recorded with its outcome:

- ``steps``: 4 steps with a grid and a save every 2 (the config's schedule, compressed), counting
  per step by group (DP, EP, EDP) the collectives and bytes each rank sends, and per rank the aten
  ops and host reads (.item / .tolist / scalar conversions) of its first step, on ranks 0, 7, 8, 255;
- ``grad_accum``: 2 steps with optim.grad_accum_steps=2;
- ``resume``: rank 255 alone is signalled after step 2: all 256 stop there and save; a new twin
  resumes at W=256 and finishes step 4 bitwise equal to ``steps`` (weights, EMA, buffers, losses);
- ``reshard_W``: the step-2 checkpoint loaded at W = 128, 64 (EP 8) and 512 (64 nodes): the loaded
  weights equal the W=256 ones (dense on every rank, each expert shard by its global index), then
  a step runs;
- ``planner``: diffmoe_dist/plan/cost.py's per-step collectives and bytes per group for the same
  layout, and their ratio to the counts (goal: within 10%).

    python benchmarks/scale_twin.py [--world-size 256] [--out benchmarks/results/scale_twin.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.join(REPO, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
from scale_twin import run_threaded, train_rank, twin_config, twin_trainer  # noqa: E402

EP = 8


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _planned(cfg, world: int) -> dict:
    """The planner's per-step, per-rank collectives and bytes by group, read from `plan()`."""
    from diffmoe_dist.plan.cluster import load_cluster
    from diffmoe_dist.plan.cost import plan, selection_calls, threshold_calls

    p = plan(cfg, load_cluster(os.path.join(REPO, "tools", "clusters", "h100_32x8.yaml")), world)
    n_moe, accum = p["params"]["moe_layers"], cfg.optim.grad_accum_steps
    elt = 2 if cfg.parallel.grad_reduce_dtype == "bf16" else 4
    bucket = p["comm"]["grad_bucket_bytes"]
    dense_b, expert_b = p["params"]["dense"] * elt, p["params"]["expert_per_rank"] * elt
    pool = world  # pool dp
    sel = selection_calls(cfg.moe, pool)
    tau = threshold_calls(cfg.moe, pool, n_moe)
    calls = 2  # forward + backward (no activation checkpointing in this config)
    return {
        "dp": {
            "collectives": accum * n_moe * len(sel) + len(tau) + 1 + math.ceil(dense_b / bucket),  # + logged losses
            "bytes": p["comm"]["selection_bytes"] + 16 + dense_b,
        },
        "ep": {
            "collectives": accum * n_moe * (2 * calls + calls - 1) + 1,  # + the expert grad norm's all-reduce
            "bytes": p["comm"]["a2a_bytes"],
        },
        "edp": {"collectives": math.ceil(expert_b / bucket), "bytes": expert_b},
    }


def _by_group(comm: dict) -> dict:
    out = {}
    for (group, key), v in comm.items():
        if key in ("collectives", "bytes"):
            out.setdefault(group, {})[key] = v
    return out


def _reshard_rank(dims, cfg, saved: dict) -> int:
    """Loads the step-2 checkpoint at another W and checks the weights against the W=256 ranks'."""
    trainer = twin_trainer(dims, cfg)
    assert trainer.step == 2, trainer.step
    mine = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    mine.update({f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()})
    ref = saved[dims.ep_rank]  # rank ep_rank of W=256 holds the same expert shard (EP 8 either way)
    bad = [k for k in ref if not torch.equal(mine[k], ref[k])]
    assert not bad, f"rank {dims.rank}: {bad[:3]} differ after the resharded load"
    metrics = trainer.train_step()
    assert math.isfinite(metrics["loss"])
    return trainer.step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-size", type=int, default=256)
    ap.add_argument("--data", default=None, help="digits-t2i shards (made in a temporary directory if absent)")
    ap.add_argument("--global-batch", type=int, default=512, help="2 images per rank at W=256")
    ap.add_argument("--reshard", default="128,64,512")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "scale_twin.json"))
    args = ap.parse_args(argv)
    W, G = args.world_size, args.global_batch
    tmp = tempfile.mkdtemp(prefix="scale_twin_")
    data = args.data or os.path.join(tmp, "digits-t2i")
    if not args.data:
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_shards.py"), "digits-t2i", "--out", data],
                       check=True, capture_output=True)  # fmt: skip
    tests, result = {}, {"world_size": W, "ep_size": EP, "nodes": W // 8, "edp_size": W // EP, "global_batch": G}

    def write() -> None:  # after every part: a run cut short still records what it finished
        result["tests"] = tests
        result["passed"] = bool(tests) and all(t["outcome"] == "passed" for t in tests.values())
        result["machine"] = f"{os.cpu_count()} CPU cores, torch {torch.__version__}, threaded process group"
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)

    def run(name, fn):
        t0 = time.time()
        try:
            value = fn()
            tests[name] = {"outcome": "passed", "seconds": round(time.time() - t0, 1)}
            return value
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the others still run
            tests[name] = {"outcome": "failed", "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
            print(f"{name}: FAILED {exc}", flush=True)
            return None
        finally:
            print(f"{name}: {tests[name]['outcome']} ({time.time() - t0:.0f} s)", flush=True)
            write()

    sched = [
        "train.steps=4",
        "sample.every=2",
        "checkpoint.every=2",
        "logging.routing_every=2",
        f"data.global_batch_size={G}",
    ]
    full_dir = os.path.join(tmp, "full")
    cfg = twin_config(data, full_dir, W, *sched)
    full = run("steps", lambda: run_threaded(train_rank, W, EP, cfg, (0, 7, 8, W - 1)))
    if full:
        counts = {r: full[r]["counts"] for r in (0, 7, 8, W - 1)}
        one = counts[W - 1]
        measured = _by_group(one["comm"])
        planned = _planned(cfg, W)
        ratio = {g: {k: planned[g][k] / measured[g][k] for k in ("collectives", "bytes")} for g in planned}
        result["counts"] = {
            "per_group": measured,
            "per_rank": {str(r): {"aten_ops": c["aten_ops"], "host_reads": c["host_reads"],
                                  "comm": {f"{g}.{k}": v for (g, k), v in c["comm"].items()}}
                         for r, c in counts.items()},
        }  # fmt: skip
        result["planner"] = {"per_group": planned, "ratio_planned_to_counted": ratio}
        within = all(abs(v - 1) <= 0.10 for g in ratio.values() for v in g.values())
        tests["planner_within_10pct"] = {"outcome": "passed" if within else "failed", "ratio": ratio}
        tests["steps"]["losses"] = [m["loss"] for m in full[0]["metrics"]]
        tests["steps"]["grids"] = full[0]["grids"]
        write()

    cfg_acc = twin_config(data, os.path.join(tmp, "accum"), W, "train.steps=2", "sample.every=0",
                          "checkpoint.every=0", "optim.grad_accum_steps=2", f"data.global_batch_size={G}")  # fmt: skip
    accum = run("grad_accum", lambda: run_threaded(train_rank, W, EP, cfg_acc))
    if accum:
        assert len({r["metrics"][-1]["loss"] for r in accum}) == 1

    part_dir = os.path.join(tmp, "part")
    cfg_part = twin_config(data, part_dir, W, *sched)

    def resume():
        first = run_threaded(train_rank, W, EP, cfg_part, (), (W - 1, 2))
        assert {r["stopped"] for r in first} == {"SIGTERM"} and {r["step"] for r in first} == {2}, "stop agreement"
        shutil.copytree(os.path.join(part_dir, "checkpoints"), os.path.join(tmp, "step2"))
        second = run_threaded(train_rank, W, EP, cfg_part)
        assert full is not None
        for r in range(W):
            assert _equal(second[r]["weights"], full[r]["weights"]), f"rank {r}: resumed != uninterrupted"
        assert [m["loss"] for m in second[0]["metrics"]] == [m["loss"] for m in full[0]["metrics"][2:]]
        return first

    first = run("resume", resume)
    if first:
        saved = {r: first[r]["weights"] for r in range(EP)}
        for w in [int(x) for x in args.reshard.split(",") if x]:
            d = os.path.join(tmp, f"reshard{w}")
            os.makedirs(d)
            shutil.copytree(os.path.join(tmp, "step2"), os.path.join(d, "checkpoints"))
            cfg_w = twin_config(data, d, w, "train.steps=4", f"data.global_batch_size={G}")
            run(f"reshard_{w}", lambda cfg_w=cfg_w, w=w: run_threaded(_reshard_rank, w, EP, cfg_w, saved))

    write()
    print(json.dumps({k: v for k, v in result.items() if k != "counts"}, indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
