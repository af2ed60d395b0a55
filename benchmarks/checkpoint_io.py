"""Checkpoint save and load times: each rank writes its own share (checkpoint/).

Spawns W gloo processes (4 by default) that build the trainer at expert-parallel size P with
DeepSpeed ZeRO-1 (``--zero 0`` for plain data parallelism), take one step on the digits data, then
time, for each model size:

- ``save``: `Trainer.save` (pieces, sha256, index, manifest, rename, `latest`), max over ranks;
- ``async block``: `Trainer.save(blocking=False)` (checkpoint.async_save): what the training step
  waits for, the copy of the rank's share to host memory; ``async rest``: the write that then runs
  beside training (`AsyncSaver.wait` right after, with no step to overlap);
- ``load``: `Trainer.maybe_resume` into a fresh trainer at the same topology (checksums shared out
  over the ranks, memory-mapped reads of the needed ranges), max over ranks;
- ``reshard``: the same at W/2 ranks and P=1 (``--no-reshard`` skips it);
- ``1-proc``: `checkpoint.load_model_state` of the EMA in one process, as diffmoe-sample does;
- the checkpoint's size on disk and the largest rank file.

    .venv/bin/python benchmarks/checkpoint_io.py --out benchmarks/results/checkpoint_io.json
    .venv/bin/python benchmarks/checkpoint_io.py --sizes tiny     # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

SIZES = {  # name: (depth, width, heads, experts)
    "tiny": (6, 192, 6, 8),  # configs/local/diffmoe-tiny.yaml
    "S": (12, 384, 6, 16),  # DiffMoE-S-E16's backbone (configs/c2i/diffmoe-S-E16.yaml)
}


def _max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _trainer(args, size: str, run_dir: str, ep_size: int, resume: str):
    from diffmoe_dist.config import load_config
    from diffmoe_dist.parallel import build_parallel_dims
    from diffmoe_dist.train.trainer import Trainer

    depth, width, heads, experts = SIZES[size]
    cfg = load_config(
        "configs/local/diffmoe-tiny.yaml",
        [
            f"model.depth={depth}",
            f"model.hidden_size={width}",
            f"model.num_heads={heads}",
            f"moe.num_experts={experts}",
            f"parallel.expert_parallel_size={ep_size}",
            f"data.path={args.data}",
            f"data.global_batch_size={args.batch}",
            f"train.zero_stage={args.zero}",
            f"train.run_dir={run_dir}",
            f"train.resume={resume}",
            "logging.wandb=disabled",
        ],
    ).validate(world_size=dist.get_world_size())
    return Trainer(cfg, build_parallel_dims(ep_size, experts), torch.device("cpu"))


def _save_and_load(rank: int, world_size: int, args, phase: str, size: str, run_dir: str, ep_size: int) -> dict:
    out = {}
    if phase == "save":
        trainer = _trainer(args, size, run_dir, ep_size, "never")
        trainer.train_step()
        dist.barrier()
        t0 = time.perf_counter()
        trainer.save()  # the whole save: what every save cost the step before checkpoint.async_save
        out["save_s"] = _max(time.perf_counter() - t0)
        trainer.train_step()
        dist.barrier()
        t0 = time.perf_counter()
        trainer.save(blocking=False)  # what the step waits for now: the copy to host memory
        out["async_block_s"] = _max(time.perf_counter() - t0)
        t0 = time.perf_counter()
        trainer.saver.wait()  # the rest, which ran beside training (here: nothing else to do)
        out["async_rest_s"] = _max(time.perf_counter() - t0)
        out["params"] = sum(p.numel() for p in trainer.model.parameters())
    else:
        trainer = _trainer(args, size, run_dir, ep_size, "auto")
        dist.barrier()
        t0 = time.perf_counter()
        trainer.maybe_resume(lambda m: None)
        out["load_s"] = _max(time.perf_counter() - t0)
        assert trainer.step == 2
    return out


def _spawn(args, phase: str, size: str, run_dir: str, world_size: int, ep_size: int) -> dict:
    """Rank 0's figures (each already the max over ranks)."""
    from diffmoe_dist.parallel.spawn import run_ranks

    return run_ranks(_save_and_load, world_size, args, phase, size, run_dir, ep_size)[0]


def measure(args, size: str) -> dict:
    from diffmoe_dist import checkpoint as ckpt

    run_dir = tempfile.mkdtemp(prefix=f"ckpt-io-{size}-", dir=args.tmp)
    try:
        row = {"size": size, "world_size": args.world_size, "ep_size": args.ep_size, "zero_stage": args.zero}
        row.update(_spawn(args, "save", size, run_dir, args.world_size, args.ep_size))
        row.update(_spawn(args, "load", size, run_dir, args.world_size, args.ep_size))
        if args.reshard:
            row["reshard_s"] = _spawn(args, "load", size, run_dir, args.world_size // 2, 1)["load_s"]
        path = ckpt.find_resumable(os.path.join(run_dir, "checkpoints"))
        files = [os.path.join(path, f) for f in os.listdir(path)]
        row["bytes"] = sum(os.path.getsize(f) for f in files)
        row["largest_rank_file_bytes"] = max(os.path.getsize(f) for f in files if f.endswith(".pt"))
        t0 = time.perf_counter()
        ckpt.verify(path)
        ckpt.load_model_state(path, "ema")
        row["one_process_s"] = time.perf_counter() - t0
        return row
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'size':>5} {'params':>12} {'W':>2} {'P':>2} {'ZeRO':>4} {'MiB':>8} {'max rank MiB':>12} "
        f"{'save s':>7} {'async block s':>13} {'async rest s':>12} {'load s':>7} {'reshard s':>9} {'1-proc s':>8}"
    )
    for r in rows:
        print(
            f"{r['size']:>5} {r['params']:>12,} {r['world_size']:>2} {r['ep_size']:>2} {r['zero_stage']:>4} "
            f"{r['bytes'] / 2**20:>8.1f} {r['largest_rank_file_bytes'] / 2**20:>12.1f} {r['save_s']:>7.2f} "
            f"{r['async_block_s']:>13.3f} {r['async_rest_s']:>12.2f} "
            f"{r['load_s']:>7.2f} {r.get('reshard_s', float('nan')):>9.2f} {r['one_process_s']:>8.2f}"
        )
    print("params: one rank's (local experts only); MiB: whole checkpoint (model, EMA, Adam moments)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: s.split(","), default=["tiny", "S"])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--ep-size", type=int, default=2)
    p.add_argument("--zero", type=int, default=1, choices=[0, 1, 2])
    p.add_argument("--batch", type=int, default=16, help="global batch of the one training step")
    p.add_argument("--data", default="data/digits")
    p.add_argument("--tmp", default=None, help="where checkpoints are written (default: the system temp dir)")
    p.add_argument("--no-reshard", dest="reshard", action="store_false")
    p.add_argument("--out", default=None, help="JSON file")
    args = p.parse_args()
    if not os.path.isdir(os.path.join(args.data, "train")):
        from diffmoe_dist.data.digits import write_digits_shards

        write_digits_shards(args.data)
    rows = [measure(args, size) for size in args.sizes]
    print_table(rows)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
