"""The streaming loader (data.loader=stream) as the data grows: shard opens per sample, peak memory
and samples/s per rank, today's order (data.shuffle_window=0) beside the windowed one.

Shard opens per sample at the 256-GPU layout (100K shards of 1,000 samples, the config's micro-batch
of 8,192 over 256 ranks: 32 samples per rank, `--plan-workers` DataLoader workers, each with its own
LRU of open shards as data/stream.py sizes it) are counted from the order itself (`count_opens`: the
batches rank 0 reads, handed to the workers round-robin as DataLoader does); no I/O is needed to
count them, and a 100 TB data set is not needed either.

Then real reads: writes synthetic shards of the 256-GPU config's sample shape (a 4 x 32 x 32 fp32
latent, 120 x 4096 bf16 caption features and their mask: ~1 MB a sample) under a temporary
directory, once at the largest scale; the smaller scales are manifests over a prefix of the same
shards. For each scale, order and code a fresh process plays rank 0 of `--world-size` ranks (32
samples per rank per step, as the 256-GPU job's micro-batch) with `--workers` DataLoader workers and
measures, after a warm-up:

- samples/s per rank (warm page cache: the shards were just written), and samples per CPU-second
  of the rank (main process and workers: what the loader costs, whatever else loads the machine);
- peak RSS of the rank's main process and of its largest worker (getrusage; forked workers count
  the torch pages they share with the parent), and the rank's peak PSS, main process plus workers,
  sampled every 20 ms (shared pages counted once): the figure the goal is judged on;

and, beside it, what one 256-GPU training step consumes per rank: the planner's (tools/plan.py,
h100_32x8 cluster) images/s divided by the 256 ranks. Codes: ``now`` (caption features stay bf16
to the device), ``now, fp32 in workers`` (cast in the workers, as before), and with ``--before-tree
DIR`` ``before``: the package of another checkout (its decode and its cast) run by the same script.
`--indexed` also loads the 1x and 10x sets with the in-memory indexed loader for contrast. The
shards are deleted at the end.

    .venv/bin/python benchmarks/loader.py --out benchmarks/results/loader.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BIG = "configs/t2i/diffmoe-e16-256gpu.yaml"
FIELDS = {"x": "latent.npy", "text": "text.npy", "text_mask": "mask.npy"}


def make_shards(root: Path, samples: int, per_shard: int) -> None:
    import numpy as np
    import torch

    from diffmoe_dist.data.shards import write_shards

    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.normal(size=(8, 120, 4096)).astype("float32")).bfloat16()
    bank = bank.view(torch.int16).numpy().view("uint16")

    def gen():
        for i in range(samples):
            text = np.roll(bank[i % 8], i, axis=0)  # distinct bytes per sample, cheaply
            mask = np.arange(120) < 8 + i % 100
            latent = rng.normal(size=(4, 32, 32)).astype("float32")
            yield {"__key__": f"{i:08d}", "latent.npy": latent, "cls": -1, "text.npy": text, "mask.npy": mask}

    write_shards(root, gen(), per_shard, index=True, dtypes={"text.npy": "bfloat16"})


def subset(full: Path, out: Path, shards: int) -> None:
    """A shard set over the first `shards` shards of `full` (symlinks and a manifest)."""
    manifest = json.loads((full / "manifest.json").read_text())
    manifest["shards"] = manifest["shards"][:shards]
    manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
    out.mkdir(parents=True)
    for s in manifest["shards"]:
        for name in (s["name"], s["name"].replace(".tar", ".idx.npy")):
            (out / name).symlink_to(full / name)
    (out / "manifest.json").write_text(json.dumps(manifest))


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # a worker that just exited
        pass
    return 0.0


class PeakPss:
    """Samples the proportional set size of this process plus its children (the DataLoader workers)
    every 20 ms: shared pages (torch, the forked parent) count once across the rank, unlike RSS."""

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            try:
                children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
            except OSError:
                children = []
            self.peak = max(self.peak, _pss_mb(pid) + sum(_pss_mb(c) for c in children))
            self._stop.wait(0.02)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def count_opens(shards: int, per_shard: int, G: int, W: int, window: int, workers: int, steps: int) -> float:
    """Shard opens per sample of rank 0: DataLoader hands batch b to worker b % workers, and each
    worker keeps an LRU of `cache` open shards (StreamBatchLoader's default for this window)."""
    from collections import OrderedDict

    import numpy as np
    import torch

    from diffmoe_dist.data.position import GlobalPosition

    sizes = np.full(shards, per_shard)
    position = GlobalPosition(shards * per_shard, G, 0, W, 0, torch.int32, sizes, window)
    cache = max(8, -(-window // W) + 4)
    ends = np.cumsum(sizes)
    lrus = [OrderedDict() for _ in range(max(1, workers))]
    opens = samples = 0
    for b in range(steps):
        lru = lrus[b % len(lrus)]
        idx = position.rank_indices(b * G).numpy()
        for shard in np.searchsorted(ends, idx, side="right").tolist():
            if shard in lru:
                lru.move_to_end(shard)
                continue
            opens += 1
            lru[shard] = True
            if len(lru) > cache:
                lru.popitem(last=False)
        samples += len(idx)
    return opens / samples


def _cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its live children (the DataLoader workers)."""
    pid, tick = os.getpid(), os.sysconf("SC_CLK_TCK")
    try:
        pids = [pid, *(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    except OSError:
        pids = [pid]
    total = 0
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / tick


def child(path: str, loader_kind: str, workers: int, steps: int, warmup: int, window: int = 0, W: int = 256,
          per_rank: int = 32, cast: int = 0) -> dict:  # fmt: skip
    import torch

    from diffmoe_dist.data.loader import GlobalBatchLoader
    from diffmoe_dist.data.stream import StreamBatchLoader

    torch.set_num_threads(1)
    pss = PeakPss()
    G = per_rank * W  # the 256-GPU config's micro-batch over W ranks: rank 0 reads per_rank samples a step
    if loader_kind == "stream":
        # cast=1: caption features cast to fp32 in the workers (before); 0: bf16 to the device (now)
        cast_fields = ("text",) if cast else ()
        loader = StreamBatchLoader(
            path, FIELDS, G, 0, W, 0, num_workers=workers, float_fields=cast_fields, shuffle_window=window
        )
    else:
        from diffmoe_dist.data.shards import load_indexed

        data = load_indexed(path)
        tensors = {"x": data["latent"], "text": data["text"].float(), "text_mask": data["mask"]}
        del data
        loader = GlobalBatchLoader(tensors, G, 0, W, 0)
    for _ in range(warmup):
        loader.next_batch()
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    n = 0
    for _ in range(steps):
        n += len(loader.next_batch()["x"])
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    peak_pss = pss.stop()
    if loader_kind == "stream":
        loader.close()
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    worker_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "samples_per_s": n / seconds,
        "samples_per_cpu_s": n / max(cpu, 1e-9),  # the rank's main process and its workers together
        "rss_main_mb": main_mb,
        "rss_worker_mb": worker_mb if workers and loader_kind == "stream" else 0.0,
        "pss_rank_mb": peak_pss,
    }


def micro_batch_per_rank() -> int:
    """Samples rank r reads a micro-batch in the 256-GPU config (data.global_batch_size over the
    accumulation steps and 256 ranks: 32 today)."""
    from diffmoe_dist.config import load_config

    cfg = load_config(str(REPO / BIG))
    return cfg.data.global_batch_size // cfg.optim.grad_accum_steps // 256


def consumption_per_rank() -> float:
    from diffmoe_dist.config import load_config
    from diffmoe_dist.plan.cluster import load_cluster
    from diffmoe_dist.plan.cost import plan

    cluster = load_cluster(str(REPO / "tools" / "clusters" / "h100_32x8.yaml"))
    cfg = load_config(str(REPO / BIG))
    p = plan(cfg, cluster, 256, cfg.parallel.expert_parallel_size)
    return p["throughput"]["images_per_s"] / 256


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-samples", type=int, default=128, help="samples at 1x (~1 MB each)")
    p.add_argument("--scales", default="1,10,30")
    p.add_argument("--samples-per-shard", type=int, default=32)
    p.add_argument("--world-size", type=int, default=8, help="rank 0 of this many reads the real shards")
    p.add_argument("--window", type=int, default=16, help="data.shuffle_window of the real reads (shards)")
    p.add_argument("--plan-window", type=int, default=4096, help="data.shuffle_window counted at the 256-GPU layout")
    p.add_argument("--plan-workers", default="1,4,8", help="DataLoader workers counted at the 256-GPU layout")
    p.add_argument("--plan-steps", type=int, default=4000, help="micro-batches counted at the 256-GPU layout")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="timed micro-batches (32 samples each)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--indexed", action="store_true", help="also the in-memory loader at the two smallest scales")
    p.add_argument("--tmp", default=None, help="where the shards go (default: the system temp dir)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    p.add_argument(
        "--before-tree",
        default=None,
        help="a checkout of the code before (git worktree add DIR fd02681): its rows run beside today's",
    )
    p.add_argument("--child", nargs=9, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        path, kind, *numbers = args.child
        print(json.dumps(child(path, kind, *(int(v) for v in numbers))))
        return 0
    per_rank = micro_batch_per_rank()

    plan = []
    for window in (0, args.plan_window):
        for workers in (int(w) for w in args.plan_workers.split(",")):
            # today's order: ~1 open a sample from the first step; counted over 10K shards, as its 100M-sample
            # permutation alone takes minutes on a loaded 2-core machine
            steps, shards = (args.plan_steps, 100_000) if window else (400, 10_000)
            t0 = time.perf_counter()
            per_sample = count_opens(shards, 1000, per_rank * 256, 256, window, workers, steps)
            plan.append({"window": window, "workers": workers, "shards": shards, "steps": steps,
                         "opens_per_sample": per_sample})  # fmt: skip
            print(json.dumps({**plan[-1], "seconds": round(time.perf_counter() - t0, 1)}), file=sys.stderr)

    scales = [int(s) for s in args.scales.split(",")]
    per_shard = args.samples_per_shard
    shards_at = {s: max(1, s * args.base_samples // per_shard) for s in scales}
    tmp = Path(tempfile.mkdtemp(prefix="diffmoe-loader-bench-", dir=args.tmp))
    rows = []
    try:
        full = tmp / f"x{max(scales)}"
        t0 = time.perf_counter()
        make_shards(full, shards_at[max(scales)] * per_shard, per_shard)
        size_gb = sum(f.stat().st_size for f in full.iterdir()) / 1e9
        print(f"wrote {size_gb:.2f} GB of shards in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # (name, package tree, caption features cast to fp32 in the workers)
        codes = [("now", REPO, 0), ("now, fp32 in workers", REPO, 1)]
        codes += [("before", Path(args.before_tree).resolve(), 1)] if args.before_tree else []
        for scale in scales:
            path = full if scale == max(scales) else tmp / f"x{scale}"
            if scale != max(scales):
                subset(full, path, shards_at[scale])
            kinds = [("stream", 0, code) for code in codes] + [("stream", args.window, code) for code in codes]
            kinds += [("indexed", 0, codes[0])] if args.indexed and scale in sorted(scales)[:2] else []
            for kind, window, (code, tree, cast) in kinds:
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tree)}
                cmd = [sys.executable, __file__, "--child", str(path), kind, str(args.workers)]
                cmd += [str(args.steps), str(args.warmup), str(window), str(args.world_size), str(per_rank), str(cast)]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                opens = count_opens(shards_at[scale], per_shard, per_rank * args.world_size, args.world_size,
                                    window, args.workers, args.warmup + args.steps)  # fmt: skip
                rows.append(
                    {
                        "scale": scale,
                        "loader": kind if kind == "indexed" else f"{kind} window={window}",
                        "code": code,
                        "samples": shards_at[scale] * per_shard,
                        "shards": shards_at[scale],
                        "opens_per_sample": opens,
                        **result,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    need = consumption_per_rank()
    base = {}
    for r in rows:
        base.setdefault((r["loader"], r["code"]), r["pss_rank_mb"])
    print(
        f"256-GPU step consumes {need:.1f} images/s per rank (tools/plan.py, h100_32x8); goal: loader >= {3 * need:.1f}"
    )
    print(f"Shard opens per sample, rank 0 of the 256-GPU layout (100K shards x 1,000 samples, {per_rank} a step):")
    print("| data.shuffle_window | workers | shards | micro-batches | opens per sample |")
    print("|---|---|---|---|---|")
    for r in plan:
        print(f"| {r['window']} | {r['workers']} | {r['shards']:,} | {r['steps']} | {r['opens_per_sample']:.4f} |")
    print(f"Real reads: rank 0 of {args.world_size}, {args.workers} workers, {per_rank} samples a step, "
          f"{per_shard} samples a shard; load average {os.getloadavg()[0]:.1f} at the end:")  # fmt: skip
    print(
        "| scale | loader | code | samples | shards | opens per sample | samples/s per rank | samples per CPU-s "
        "| x consumption | peak RSS main MB | peak RSS worker MB | peak PSS rank MB | PSS vs 1x |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scale']}x | {r['loader']} | {r['code']} | {r['samples']} | {r['shards']} | "
            f"{r['opens_per_sample']:.3f} | {r['samples_per_s']:.0f} | {r['samples_per_cpu_s']:.0f} | "
            f"{r['samples_per_s'] / need:.1f} | {r['rss_main_mb']:.0f} | {r['rss_worker_mb']:.0f} | "
            f"{r['pss_rank_mb']:.0f} | {r['pss_rank_mb'] / base[(r['loader'], r['code'])] - 1:+.1%} |"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(
            json.dumps(
                {
                    "consumption_per_rank": need,
                    "workers": args.workers,
                    "per_rank": per_rank,
                    "load_average": os.getloadavg(),
                    "plan_opens": plan,
                    "rows": rows,
                },
                indent=2,  # fmt: skip
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
