"""Does the planner predict measured runs? CPU, gloo, W = 2 and 4 ranks (one thread each; 4 ranks
oversubscribe a 2-core machine), gradient reduction overlapped with backward and not.

1. Per W, right before its runs, describe this machine from microbenchmarks only
   (diffmoe_dist/plan/calibrate.py): one core's matmul peak, the dense twin's compute efficiency
   on W's micro-batch, and with W processes side by side, the matmul FLOP/s one rank sustains and
   gloo's all-reduce / all-to-all fits on loopback. No training step goes into the description:
   the comparison below cannot be a fit of itself.
2. Train the config for a few steps at (W, overlap) under torchrun and take the median step.
3. Print predicted / measured per row, with the plan's breakdown. Goal: within 1.3x.

    python benchmarks/plan_check.py --out benchmarks/results/plan_check.json     # ~5 min here
    python benchmarks/plan_check.py --cluster tools/clusters/cpu_local.yaml      # reuse a description

``parallel.overlap_grad_reduce`` is passed to the trainer in both settings; where the trainer has no
overlapped reducer yet the two measured rows run the same code and only the plan differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from diffmoe_dist.config import load_config  # noqa: E402
from diffmoe_dist.plan.calibrate import calibrate, write_cluster  # noqa: E402
from diffmoe_dist.plan.cluster import load_cluster  # noqa: E402
from diffmoe_dist.plan.cost import plan  # noqa: E402
from diffmoe_dist.plan.measure import digits_path, measure_step  # noqa: E402

CONFIG = os.path.join(REPO, "configs", "local", "diffmoe-tiny.yaml")
GOAL = 1.3


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--ranks", default="2,4")
    p.add_argument("--ep", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--cluster", default=None, help="a cluster YAML to use instead of calibrating now")
    p.add_argument("--out", default=None, help="JSON results")
    p.add_argument("overrides", nargs="*", help="config overrides for every run, e.g. data.global_batch_size=64")
    args = p.parse_args(argv)
    ranks = tuple(int(r) for r in args.ranks.split(","))
    cfg = load_config(args.config, args.overrides)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        data = digits_path(args.config, args.overrides, tmp)
        rows, descriptions = [], {}
        for w in ranks:
            # Described right before its runs: other processes on a shared machine change the share
            # of the cores a rank gets from minute to minute, for the microbenchmarks and the steps alike.
            if args.cluster:
                path = args.cluster
            else:
                t0 = time.time()
                doc = calibrate(cfg, (w,), images=cfg.data.global_batch_size // w, log=_log)
                path = os.path.join(tmp, f"cpu_local_w{w}.yaml")
                write_cluster(doc, path, "python benchmarks/plan_check.py")
                _log(f"described {w} ranks in {time.time() - t0:.0f} s")
            descriptions[w] = open(path).read()
            cluster = load_cluster(path)
            for overlap in (False, True):
                over = [*args.overrides, f"parallel.expert_parallel_size={args.ep}"]
                over.append(f"parallel.overlap_grad_reduce={str(overlap).lower()}")
                predicted = plan(load_config(args.config, over), cluster, w)
                m = measure_step(args.config, over, w, args.steps, args.warmup, data_dir=data)
                t = predicted["time"]
                row = {
                    "world": w,
                    "overlap": overlap,
                    "predicted_s": t["step_s"],
                    "measured_s": m["step_s"],
                    "measured_min_s": m["step_s_min"],
                    "ratio": t["step_s"] / m["step_s"],
                    "ratio_min": t["step_s"] / m["step_s_min"],
                    "load_after": os.getloadavg()[0],
                    "breakdown_s": t,
                }
                rows.append(row)
                _log(
                    f"W={w} overlap={overlap}: predicted {t['step_s']:.3f} s, measured {m['step_s']:.3f} s "
                    f"(min {m['step_s_min']:.3f}): ratio {row['ratio']:.2f} (to the min {row['ratio_min']:.2f})"
                )
    print(
        f"\nPlanner vs measured CPU steps ({os.path.relpath(args.config, REPO)}, EP {args.ep}, load {load:.1f} before)"
    )
    head = (
        f"{'W':>2} {'overlap':>7} {'predicted s':>11} {'median s':>8} {'min s':>6} {'pred/median':>11} {'pred/min':>8}"
    )
    print(head + "  compute  a2a  select  grads  optim")
    for r in rows:
        t = r["breakdown_s"]
        print(
            f"{r['world']:>2} {str(r['overlap']):>7} {r['predicted_s']:>11.3f} {r['measured_s']:>8.3f}"
            f" {r['measured_min_s']:>6.3f} {r['ratio']:>11.2f} {r['ratio_min']:>8.2f}  {t['compute_s']:.3f}"
            f"  {t['a2a_s']:.3f}  {t['selection_s']:.3f}  {t['grad_exposed_s']:.3f}  {t['optimizer_s']:.3f}"
        )
    for key, name in (("ratio", "median"), ("ratio_min", "fastest")):
        worst = max(max(r[key], 1 / r[key]) for r in rows)
        print(
            f"worst ratio to the {name} step {worst:.2f}x (goal: within {GOAL}x): "
            + ("met" if worst <= GOAL else "NOT met")
        )
    print(
        "(on cores other processes share, the fastest step is the least disturbed one, as the microbenchmarks'\n"
        " best windows are; on quiet cores the two columns agree)"
    )
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "cluster_yaml": descriptions, "load_before": load}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
