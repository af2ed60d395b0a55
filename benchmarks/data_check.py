"""`diffmoe-train --validate-only` on a shard set of the 256-GPU job's size: first run and restart.

Writes a synthetic manifest of ``--shards`` shards (100K by default: the 100M-sample plan at ~1K
samples a shard) whose files are all the same tiny valid tar (the check reads one 512-byte header
and one stat per shard, whatever the shard's size; hard links of one file), then times, as the launchers run it (a fresh
process: Python start, config, imports, the check):

- ``first``: no record: every shard's header and size is checked, and the record is written;
- ``restart``: the record matches the manifest's sha256: the per-shard walk is skipped;
- ``changed``: the manifest changed (one shard renamed): the whole set is checked again.

Warm page cache (the files were just written): a cold parallel file system makes ``first`` and
``changed`` slower (one metadata operation and one small read per shard), not ``restart``.

    .venv/bin/python benchmarks/data_check.py --out benchmarks/results/data_check.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_set(root: Path, shards: int) -> None:
    import numpy as np
    import webdataset as wds

    stream = io.BytesIO()
    with wds.TarWriter(stream, mtime=0.0) as writer:
        writer.write({"__key__": "k", "latent.npy": np.zeros((1, 16, 16), np.float32), "cls": 0})
    data = stream.getvalue()
    train = root / "train"
    train.mkdir(parents=True)
    entries = []
    for i in range(shards):  # hard links: 100K directory entries in seconds, each a valid tar
        source = train / f".one-{i // 50_000}.tar"  # ext4 allows 65,000 links to a file
        if i % 50_000 == 0:
            source.write_bytes(data)
        name = f"shard-{i:06d}.tar"
        os.link(source, train / name)
        entries.append({"name": name, "num_samples": 1000, "bytes": len(data)})
    manifest = {"format_version": 1, "shards": entries, "num_samples": 1000 * shards, "latent_shape": [1, 16, 16],
                "keys": ["cls", "latent.npy"], "created_by": "benchmarks/data_check.py"}  # fmt: skip
    (train / "manifest.json").write_text(json.dumps(manifest, indent=1))


def validate(root: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `--validate-only` process: on a loaded machine the CPU time
    is the figure that carries over."""
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--validate-only", "--world-size", "256"]
    cmd += ["--config", "configs/local/diffmoe-tiny.yaml", f"data.path={root}", "data.global_batch_size=8192"]
    t0, cpu0 = time.perf_counter(), _children_cpu()
    out = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    if out.returncode:
        raise SystemExit(f"--validate-only failed: {out.stderr.strip()}")
    return seconds, cpu


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=100_000)
    p.add_argument("--tmp", default=None, help="where the shards go (default: the system temp dir)")
    p.add_argument("--out", default=None, help="write the results JSON here")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="diffmoe-data-check-", dir=args.tmp))
    try:
        t0 = time.perf_counter()
        make_set(root, args.shards)
        print(f"wrote {args.shards} shards in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        row = {"shards": args.shards, "first_s": validate(root), "restart_s": validate(root)}
        manifest_path = root / "train" / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        last = manifest["shards"][-1]["name"]
        os.rename(root / "train" / last, root / "train" / ("x" + last))
        manifest["shards"][-1]["name"] = "x" + last
        manifest_path.write_text(json.dumps(manifest, indent=1))
        row["changed_s"] = validate(root)
        row["restart_after_change_s"] = validate(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("wall s (CPU s) of one --validate-only process:")
    print("| shards | first run | restart | manifest changed | restart after it |")
    print("|---|---|---|---|---|")
    cells = [
        f"{row[k][0]:.1f} ({row[k][1]:.1f})" for k in ("first_s", "restart_s", "changed_s", "restart_after_change_s")
    ]
    print(f"| {row['shards']:,} | " + " | ".join(cells) + " |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(row, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
