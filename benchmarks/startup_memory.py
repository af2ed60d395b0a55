"""Peak host memory of one rank building its model and EMA: the old full build against the shard build.

One expert-parallel rank (``--ep-rank`` of ``--ep-size``) builds the config's model and its EMA copy
on the CPU, without a process group, the two ways:

- ``full`` (before): every rank built the whole model (all E experts of every MoE layer), deep-copied
  it into the EMA, and only then kept its own experts (``experts.shard``, as ``parallelize`` still
  does for a model built whole);
- ``shard`` (after, the trainer's way): the model is built inside ``expert_shard(ep_rank, ep_size)``,
  which allocates only the rank's ``E / P`` experts (each initialised from (seed, layer, global
  expert index), so the weights equal the full build's at those indices), and the EMA copies that.

Each build runs in a fresh subprocess; ``peak`` is its ``ru_maxrss`` (the kernel's high-water mark
of resident memory, interpreter and torch included), ``own`` the bytes of the rank's weights plus
EMA once built. The ratio that matters is ``peak / own`` (goal: at most 1.3).

A full build of the 256-GPU config is 4.67B fp32 parameters, twice (model and EMA): ~37 GB, more
than a 24 GiB machine has. ``--full-limit-gb`` (default 8) refuses to run a build whose analytic
peak (``base + 2 x full model bytes``) exceeds it and reports that estimate instead, marked
``estimated``; ``--depth`` runs a smaller model of the same width and experts, where both builds
are measured and the estimate can be checked against the measurement.

    .venv/bin/python benchmarks/startup_memory.py --out benchmarks/results/startup_memory.json
    .venv/bin/python benchmarks/startup_memory.py --depth 2          # both builds measured, ~1.5 GB each
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONFIG = "configs/t2i/diffmoe-e16-256gpu.yaml"


def _bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def child(mode: str, config: str, overrides: list[str], ep_rank: int, ep_size: int) -> dict:
    """One build in this process; returns its measurements."""
    import torch

    from diffmoe_dist.config import load_config
    from diffmoe_dist.diffusion.ema import EMA
    from diffmoe_dist.model.build import build_model
    from diffmoe_dist.model.moe.experts import expert_shard
    from diffmoe_dist.model.moe.layer import moe_layers

    cfg = load_config(config, overrides)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    base_kb = _rss_kb()
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    if mode == "shard":
        with expert_shard(ep_rank, ep_size):
            model = build_model(cfg.model, cfg.moe)
        ema = EMA(model, cfg.train.ema_decay)
    else:  # the old Trainer: whole model, whole EMA copy, then each keeps its shard
        model = build_model(cfg.model, cfg.moe)
        full_bytes = _bytes(model)
        ema = EMA(model, cfg.train.ema_decay)
        for m in (model, ema.model):
            for layer in moe_layers(m):
                layer.experts.shard(ep_rank, ep_size)
    seconds = time.perf_counter() - t0
    own = _bytes(model) + _bytes(ema.model)
    out = {
        "mode": mode,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "base_bytes": base_kb * 1024,
        "own_bytes": own,
        "params_local": sum(p.numel() for p in model.parameters()),
        "seconds": round(seconds, 1),
    }
    if mode == "full":
        out["full_model_bytes"] = full_bytes
    return out


def full_model_bytes(config: str, overrides: list[str]) -> int:
    """Bytes of the whole fp32 model (parameters and buffers), counted on the meta device."""
    import torch

    from diffmoe_dist.config import load_config
    from diffmoe_dist.model.build import build_model

    cfg = load_config(config, overrides)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    return _bytes(model)


def run_child(mode: str, args, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--config", args.config, "--ep-rank", str(args.ep_rank)]
    cmd += ["--ep-size", str(args.ep_size), *[f"--set={o}" for o in overrides]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} build failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--ep-rank", type=int, default=0)
    p.add_argument("--ep-size", type=int, default=8)
    p.add_argument("--depth", type=int, default=0, help="model.depth override (0: the config's)")
    p.add_argument("--full-limit-gb", type=float, default=8.0, help="largest analytic full-build peak to run")
    p.add_argument("--set", action="append", default=[], help="extra dotted override (repeatable)")
    p.add_argument("--out", default="")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    overrides = [*args.set, *([f"model.depth={args.depth}"] if args.depth else [])]
    if args.child:
        print(json.dumps(child(args.child, args.config, args.set, args.ep_rank, args.ep_size)))
        return

    shard = run_child("shard", args, overrides)
    full_bytes = full_model_bytes(args.config, overrides)
    estimate = shard["base_bytes"] + 2 * full_bytes  # model and EMA copy, both whole, before sharding
    if estimate <= args.full_limit_gb * 1e9:
        full = run_child("full", args, overrides)
        full["estimated"] = False
    else:
        full = {"mode": "full", "peak_bytes": estimate, "own_bytes": shard["own_bytes"], "estimated": True}
    full["estimate_bytes"] = estimate
    rows = [full, shard]
    gb = 1e9
    print(f"{args.config} {' '.join(overrides)}  EP rank {args.ep_rank} of {args.ep_size}, fp32, model + EMA")
    print(f"whole model {full_bytes / gb:.2f} GB; this rank's weights + EMA {shard['own_bytes'] / gb:.2f} GB")
    print(f"{'build':<8}{'peak RSS GB':>12}{'own GB':>9}{'peak/own':>10}{'seconds':>9}  note")
    for r in rows:
        note = "estimated: base + 2 x whole model" if r.get("estimated") else "measured (ru_maxrss)"
        secs = f"{r['seconds']:>9.1f}" if "seconds" in r else f"{'-':>9}"
        print(f"{r['mode']:<8}{r['peak_bytes'] / gb:>12.2f}{r['own_bytes'] / gb:>9.2f}"
              f"{r['peak_bytes'] / r['own_bytes']:>10.2f}{secs}  {note}")  # fmt: skip
    print(f"shard / full peak: {shard['peak_bytes'] / full['peak_bytes']:.3f}; goal peak/own <= 1.3: "
          f"{'met' if shard['peak_bytes'] <= 1.3 * shard['own_bytes'] else 'NOT met'}")  # fmt: skip
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        doc = {
            "config": args.config,
            "overrides": overrides,
            "ep_rank": args.ep_rank,
            "ep_size": args.ep_size,
            "whole_model_bytes": full_bytes,
            "rows": rows,
            "date": time.strftime("%Y-%m-%d"),
        }
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
