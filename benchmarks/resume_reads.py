"""Bytes read per node at resume, at the 256-GPU job's layout: W ranks as nodes of 8, EP 8 inside a
node, ZeRO-0, on the scale twin's threaded process group (tests/scale_twin.py: real collectives,
real checkpoint files). The state is the 256-GPU model's (1.07B dense and 3.63B expert parameters
over 16 experts; model, EMA and both Adam moments in fp32) at 1/``--scale`` of its size
(tests/resume_reads.py); each figure times the scale is the full model's, 75.2 GB a checkpoint.

For each W, the resume as it was (every rank reads all it holds) and as it is (`load_slots_once`:
each rank reads the ranges it owns, the replicas exchange them): bytes read per node (mean and
largest), the most times one byte was read inside a node and in the job, and bitwise equality of
the loaded state.

    python benchmarks/resume_reads.py [--world-sizes 16,256] [--out benchmarks/results/resume_reads.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (REPO, os.path.join(REPO, "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

from resume_reads import per_node, save_and_count  # noqa: E402
from scale_twin import run_threaded  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world-sizes", default="16,256")
    ap.add_argument("--scale", type=int, default=65_536, help="the 256-GPU model's state divided by this")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "resume_reads.json"))
    args = ap.parse_args(argv)
    rows = []
    for W in (int(w) for w in args.world_sizes.split(",")):
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="resume_reads_") as root:
            results = run_threaded(save_and_count, W, 8, root, args.scale)
        row = {"world_size": W, "nodes": W // 8, "ep_size": 8, "seconds": round(time.time() - t0, 1)}
        for how in ("before", "now"):
            counts = per_node(results, how, args.scale)
            nodes = counts.pop("bytes_per_node")
            row[how] = {
                **counts,
                "bitwise": all(r[how]["bitwise"] for r in results),
                "bytes_per_node_mean": sum(nodes) / len(nodes),
                "bytes_per_node_max": max(nodes),
                "bytes_per_job": sum(nodes),
                "full_model_gb_per_node_mean": sum(nodes) / len(nodes) * args.scale / 1e9,
                "full_model_gb_per_node_max": max(nodes) * args.scale / 1e9,
                "full_model_gb_per_job": sum(nodes) * args.scale / 1e9,
            }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    result = {"scale": args.scale, "rows": rows, "load_average": os.getloadavg()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"Bytes read per node at resume (nodes of 8, EP 8, ZeRO-0; the 256-GPU model's state / {args.scale:,}):")
    print("| W | nodes | load | bytes per node, mean (max) | per job | each byte read, in a node / in the job "
          "| full model: GB per node, mean (max) | full model: GB per job | bitwise |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for how in ("before", "now"):
            c = r[how]
            print(
                f"| {r['world_size']} | {r['nodes']} | {how} | {c['bytes_per_node_mean']:,.0f} "
                f"({c['bytes_per_node_max']:,}) | {c['bytes_per_job']:,} | at most "
                f"{c['most_reads_of_a_byte_in_a_node']} / {c['least_reads_of_a_byte_in_the_job']}-"
                f"{c['most_reads_of_a_byte_in_the_job']} | {c['full_model_gb_per_node_mean']:.2f} "
                f"({c['full_model_gb_per_node_max']:.2f}) | {c['full_model_gb_per_job']:.1f} | {c['bitwise']} |"
            )
    return 0 if all(r[h]["bitwise"] for r in rows for h in ("before", "now")) else 1


if __name__ == "__main__":
    raise SystemExit(main())
