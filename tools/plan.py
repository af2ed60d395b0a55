"""Plan a layout before paying for it: per step and per rank, FLOPs, all-to-all, selection and
gradient bytes, memory, and step time from an alpha-beta model of a cluster (diffmoe_dist/plan/).

    python tools/plan.py --config configs/t2i/diffmoe-e16-256gpu.yaml --cluster tools/clusters/h100_32x8.yaml
    python tools/plan.py --config configs/t2i/diffmoe-e16-256gpu.yaml --cluster tools/clusters/h100_32x8.yaml \
        --recommend
    python tools/plan.py --config configs/local/diffmoe-tiny.yaml --cluster tools/clusters/cpu_local.yaml \
        --world 2 --measure
    python tools/plan.py --calibrate tools/clusters/cpu_local.yaml --ranks 2,4     # describe this machine

The cost model (diffmoe_dist/plan/cost.py), the cluster and its collectives (cluster.py), the
microbenchmarks that describe a CPU machine (calibrate.py) and the layout search (search.py) live
in the package; benchmarks/plan_check.py compares the plan with measured CPU runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, REPO)

from diffmoe_dist.config import ConfigError, load_config  # noqa: E402
from diffmoe_dist.plan.calibrate import calibrate, write_cluster  # noqa: E402
from diffmoe_dist.plan.cluster import ClusterError, load_cluster  # noqa: E402
from diffmoe_dist.plan.cost import PlanError, plan  # noqa: E402
from diffmoe_dist.plan.measure import measure_step  # noqa: E402
from diffmoe_dist.plan.search import recommend  # noqa: E402

LOCAL_CONFIG = os.path.join(REPO, "configs", "local", "diffmoe-tiny.yaml")


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB" if x >= 1e8 else f"{x / 1e6:.2f} MB"


def _t(x: float) -> str:
    return f"{x * 1e3:.1f} ms" if x < 10 else f"{x:.1f} s"


def print_plan(p: dict) -> None:
    lay, par, fl, co, mem, t, th = (p[k] for k in ("layout", "params", "flops", "comm", "memory", "time", "throughput"))
    cl = p["cluster"]
    print(
        f"layout: {lay['world']} ranks = {lay['nodes']} node(s) x {lay['ranks_per_node']}, EP {lay['ep']} x EDP "
        f"{lay['edp']}, pool {lay['pool']} ({lay['pool_ranks']} ranks), ZeRO-{lay['zero']}, {lay['grad_accum_steps']} "
        f"micro-batch(es) of {lay['images_per_rank']} images = {lay['tokens_per_rank']} tokens per rank, gradients "
        f"{lay['grad_reduce_dtype']}{' overlapped with backward' if lay['overlap_grad_reduce'] else ' after backward'}"
        + (", activation checkpointing" if lay["activation_checkpointing"] else "")
    )
    print(
        f"params: total {par['total'] / 1e6:,.1f}M (experts {par['expert'] / 1e6:,.1f}M, predictor "
        f"{par['predictor'] / 1e6:,.1f}M), per rank {par['per_rank'] / 1e6:,.1f}M"
    )
    print(
        f"\nper step, per rank ({cl['name']}: peak {cl['peak_flops'] / 1e12:g} TFLOP/s per rank x compute "
        f"efficiency {cl['compute_efficiency']:g})"
    )
    rows = [
        ("forward", f"{fl['executed_per_rank'] / 1e12:.3f} TFLOP fwd+bwd", _t(t["forward_s"])),
        ("backward", "", _t(t["backward_s"])),
        ("all-to-all", _gb(co["a2a_bytes"]), _t(t["a2a_s"])),
        (
            "selection",
            f"{co['selection_bytes'] / 1e3:.1f} KB / {co['selection_collectives']} calls",
            _t(t["selection_s"]),
        ),
        (
            "grad reduction (exposed)",
            f"{_gb(co['grad_bytes'])}, {_t(t['grad_reduce_s'])} in all",
            _t(t["grad_exposed_s"]),
        ),
        ("ZeRO weight all-gather", "", _t(t["param_gather_s"])),
        ("small all-reduces", "", _t(t["misc_s"])),
        ("optimizer+EMA+clip", "", _t(t["optimizer_s"])),
        (
            "host (exposed)",
            f"{p['host']['ops']:,.0f} launches, {p['host']['reads']:.1f} reads",
            _t(t["host_exposed_s"]),
        ),
        ("step", "", _t(t["step_s"])),
    ]
    for name, amount, time_ in rows:
        print(f"  {name:<26} {amount:>34} {time_:>10}")
    print(
        f"  => {th['images_per_s']:.1f} images/s, {th['tokens_per_s_per_rank']:,.0f} tokens/s per rank, "
        f"{th['tflops_per_rank']:.2f} TFLOP/s per rank (MFU {th['mfu']:.1%})"
    )
    print(
        "\nmemory per rank: "
        + ", ".join(f"{k} {_gb(mem[k])}" for k in ("weights", "grads", "optimizer", "ema", "activations"))
        + f", autocast weight copies {_gb(mem['weight_casts'])}"
    )
    print(f"  total {_gb(mem['total'])} of {_gb(mem['capacity'])}")
    d = p["data"]
    print(
        f"\ndata: {d['sample_bytes'] / 1e6:.2f} MB a sample, {d['opens_per_sample']:.4f} shard opens a sample: "
        f"{d['bytes_per_s'] / 1e9:.2f} GB/s and {d['opens_per_s']:,.0f} opens/s at this step time"
        + (
            f"; the file system reads a batch in {_t(d['data_step_s'])} ({d['limit']}): {d['bound']}-bound"
            if d["bound"]
            else " (no file_system in the cluster file)"
        )
    )
    for w in p["warnings"]:
        print(f"WARNING: {w}")


def print_recommendation(ranked: list, top: int = 8) -> None:
    print(f"\nlayouts that fit, best planned MFU first ({len(ranked)} fit):")
    print(f"  {'img/rank':>8} {'ZeRO':>4} {'EP':>3} {'grads':>5} {'bucket':>7} {'step':>9} {'MFU':>6} {'memory':>9}")
    for cand, p in ranked[:top]:
        print(
            f"  {cand['images_per_rank']:>8} {cand['zero']:>4} {cand['ep']:>3} {cand['grad_reduce_dtype']:>5} "
            f"{cand['grad_bucket_mb']:>5g}MB {_t(p['time']['step_s']):>9} {p['throughput']['mfu']:>6.1%} "
            f"{_gb(p['memory']['total']):>9}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="training config YAML")
    p.add_argument("--cluster", help="cluster YAML (tools/clusters/)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.add_argument("--world", type=int, default=None, help="ranks (default: GPU nodes x GPUs; CPU: 2)")
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: the config's)")
    p.add_argument("--zero", type=int, choices=(0, 1, 2), default=None, help="ZeRO stage (default train.zero_stage)")
    p.add_argument("--imbalance", type=float, default=1.0, help="slowest EP rank's load / mean (routing.jsonl)")
    p.add_argument("--efficiency", type=float, default=None, help="override the cluster's compute efficiency")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    p.add_argument("--radix-bits", type=int, default=11, help="selection: bits per radix pass (the code's 11)")
    p.add_argument("--recommend", action="store_true", help="also search images per rank, ZeRO, EP, grads, buckets")
    p.add_argument("--images", default="8,16,32", help="--recommend: images per rank to try")
    p.add_argument("--json", default=None, help="write the plan (and measurement) here")
    p.add_argument("--measure", action="store_true", help="also train the config here under torchrun and compare")
    p.add_argument("--measure-steps", type=int, default=10)
    p.add_argument("--measure-warmup", type=int, default=3)
    p.add_argument("--calibrate", metavar="OUT", default=None, help="measure this machine into a cluster YAML")
    p.add_argument("--ranks", default="2,4", help="--calibrate: rank counts to measure side by side")
    args = p.parse_args(argv)
    try:
        if args.calibrate:
            cfg = load_config(args.config or LOCAL_CONFIG, args.overrides)
            ranks = tuple(int(r) for r in args.ranks.split(","))
            doc = calibrate(cfg, ranks)
            write_cluster(doc, args.calibrate, "python tools/plan.py " + " ".join(argv or sys.argv[1:]))
            print(f"wrote {args.calibrate}")
            return 0
        if not args.config or not args.cluster:
            p.error("--config and --cluster are required (or --calibrate OUT)")
        cfg = load_config(args.config, args.overrides)
        cluster = load_cluster(args.cluster)
        world = args.world or (cluster.nodes * cluster.devices_per_node if cluster.kind == "gpu" else 2)
        ep = args.ep or cfg.parallel.expert_parallel_size
        cfg.validate(world_size=world)
        kw = {"radix_bits": args.radix_bits}
        result = plan(cfg, cluster, world, ep, args.zero, args.imbalance, args.efficiency, args.threads, **kw)
    except (ConfigError, ClusterError, PlanError) as exc:
        print(f"plan: error: {exc}", file=sys.stderr)
        return 2
    print(f"plan: {args.config} on {args.cluster}")
    print_plan(result)
    if args.recommend:
        ranked = recommend(cfg, cluster, world, tuple(int(i) for i in args.images.split(",")), **kw)
        print_recommendation(ranked)
        if ranked:
            result["recommended"] = {"layout": ranked[0][0], "plan": ranked[0][1]}
            print("\nrecommended:")
            print_plan(ranked[0][1])
    if args.measure:
        overrides = [*args.overrides, f"parallel.expert_parallel_size={ep}"]
        print(f"\nmeasuring: {world} ranks under torchrun, {args.measure_steps} steps ...", flush=True)
        measured = measure_step(args.config, overrides, world, args.measure_steps, args.measure_warmup)
        predicted = result["time"]["step_s"]
        ratio = predicted / measured["step_s"]
        result["measured"] = {**measured, "predicted_step_s": predicted, "ratio": ratio}
        print(
            f"step time: predicted {predicted:.3f} s, measured {measured['step_s']:.3f} s (median of "
            f"{measured['steps']}, min {measured['step_s_min']:.3f} s): predicted/measured = {ratio:.2f}"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
