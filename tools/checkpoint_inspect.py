"""Inspect a diffmoe-train checkpoint: verify it, show what it holds and who wrote what.

    python tools/checkpoint_inspect.py runs/diffmoe-tiny                 # newest verified checkpoint
    python tools/checkpoint_inspect.py runs/diffmoe-tiny/checkpoints/step_0000300 --tensors
    python tools/checkpoint_inspect.py RUN --export ema.pt                # one-process EMA state dict

Prints the step, the topology that wrote it (world size, EP size, ZeRO stage), the scalars, one
line per file (size, pieces, share of the elements) and optionally every tensor with its global
shape and how many pieces it is split into. Checksums are verified first; a bad file is named.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import Counter

from diffmoe_dist import checkpoint as ckpt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="run directory, checkpoints directory or step directory")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--export", metavar="FILE", help="write the full EMA state dict (torch.save) for other tools")
    p.add_argument("--which", choices=["ema", "model"], default="ema", help="what --export writes")
    args = p.parse_args(argv)
    try:
        path = ckpt.resolve_checkpoint(args.path)
        manifest = ckpt.verify(path)
    except ckpt.CheckpointError as exc:
        print(f"checkpoint_inspect: error: {exc}", file=sys.stderr)
        return 1
    meta = ckpt.read_meta(path)
    print(f"{path}: verified {len(manifest['files'])} files")
    print(
        f"step {meta['step']}, written by world size {meta['world_size']}, EP {meta['ep_size']}, "
        f"ZeRO stage {meta['zero_stage']}; EMA updates {meta['ema_num_updates']}, optimizer steps "
        f"{meta['optimizer_steps']}, samples seen {meta['loader']['samples_seen']}"
    )
    numel = {k: math.prod(v["shape"]) for k, v in meta["tensors"].items()}
    total = sum(numel.values())
    print(f"{len(numel)} tensors, {total:,} elements")
    for fname, entries in sorted(meta["files"].items()):
        mine = sum(n for _, _, n in entries)
        size = os.path.getsize(os.path.join(path, fname))
        print(f"  {fname}: {size / 2**20:8.1f} MiB, {len(entries):5d} pieces, {mine / total:6.1%} of the elements")
    if args.tensors:
        pieces = Counter(key for entries in meta["files"].values() for key, _, _ in entries)
        for key, spec in meta["tensors"].items():
            print(f"  {key:70s} {str(spec['shape']):20s} {spec['dtype']:9s} {pieces[key]:4d} piece(s)")
    if args.export:
        import torch

        torch.save(ckpt.load_model_state(path, args.which), args.export)
        print(f"{args.which} state dict -> {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
