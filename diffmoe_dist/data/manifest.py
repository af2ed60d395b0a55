"""A shard set's manifest (``manifest.json``, written last by data/shards.py), the cheap per-shard
check, and the record that a manifest's shards passed it (``manifest.validated.json``). Torch-free:
``diffmoe-train --validate-only`` runs it on the batch node before every (re)start.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

from diffmoe_dist.data.tar_index import REMAKE, ShardError, index_path

MANIFEST = "manifest.json"
VALIDATED = "manifest.validated.json"
MAKE_SHARDS_HINT = "run `python tools/make_shards.py digits --out DIR` (or its other subcommands) first"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(shard_dir: str | os.PathLike, check_files: bool = True) -> dict:
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"no shard manifest at {path}; {MAKE_SHARDS_HINT}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"shard manifest {path} is not valid JSON ({exc}); {MAKE_SHARDS_HINT}") from exc
    for field in ("shards", "num_samples", "latent_shape", "keys"):
        if field not in manifest:
            raise ValueError(f"shard manifest {path} lacks {field!r}; {MAKE_SHARDS_HINT}")
    # check_files=False: data/stream.py checks 1/W of the shards per rank (one stat each per job).
    missing = [s["name"] for s in manifest["shards"] if check_files and not (shard_dir / s["name"]).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) listed in {path} are missing, e.g. {missing[0]}")
    return manifest


def manifest_digest(shard_dir: str | os.PathLike) -> str:
    import hashlib

    return hashlib.sha256((Path(shard_dir) / MANIFEST).read_bytes()).hexdigest()


def validated(shard_dir: str | os.PathLike, digest: str) -> dict | None:
    """The record that every shard of the manifest with sha256 ``digest`` passed the full check
    (data/check.py), or None. It carries the manifest's ``num_samples`` and ``latent_shape``: a
    restart reads them here instead of parsing the manifest (100K shards: 8 MB of JSON)."""
    try:
        record = json.loads((Path(shard_dir) / VALIDATED).read_text())
    except (OSError, ValueError):
        return None
    # The directory too: a copy of the set (to scratch, another file system) may have copied badly.
    where = os.path.realpath(shard_dir)
    ok = isinstance(record, dict) and record.get("manifest_sha256") == digest and record.get("dir") == where
    return record if ok else None


def record_validated(shard_dir: str | os.PathLike, digest: str) -> None:
    """Records beside the manifest that all its shards passed; a read-only data directory keeps none."""
    import time

    manifest = read_manifest(shard_dir, check_files=False)

    record = {
        "manifest_sha256": digest,
        "dir": os.path.realpath(shard_dir),
        "checked": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "num_samples": int(manifest["num_samples"]),
        "latent_shape": manifest.get("latent_shape"),
    }
    try:
        _atomic_write_bytes(Path(shard_dir) / VALIDATED, (json.dumps(record) + "\n").encode())
    except OSError:
        pass


def check_shards(path: str | os.PathLike, rank: int = 0, world_size: int = 1) -> None:
    """Cheap checks before any process group starts: the manifest parses, every shard it lists is on
    disk with the recorded size (a multiple of 512 bytes, the tar block), its first tar header is
    valid, and its offset index (if any) has the manifest's sample count. `path` is a shard directory
    or a data root with train/ (and heldout/). Rank r checks shards r, r + W, ... only: the whole job
    touches each shard once (100K shards are not 100K stats per rank on a shared file system).
    Raises ShardError, one line naming the shard."""
    root = Path(path)
    dirs = [root] if (root / MANIFEST).is_file() else [d for d in (root / "train", root / "heldout") if d.is_dir()]
    if not dirs:
        dirs = [root / "train"]
    for shard_dir in dirs:
        try:
            manifest = read_manifest(shard_dir, check_files=False)
        except (FileNotFoundError, ValueError) as exc:
            raise ShardError(str(exc)) from None
        for n, entry in enumerate(manifest["shards"]):
            if n % world_size != rank:
                continue
            shard = shard_dir / entry["name"]
            if not shard.is_file():
                raise ShardError(f"shard {shard} is missing (listed in {shard_dir / MANIFEST}); {REMAKE}")
            with open(shard, "rb") as f:
                header = f.read(512)
            try:
                tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
            except tarfile.HeaderError as exc:
                raise ShardError(
                    f"shard {shard} is not a tar file: its first header is unreadable ({exc}); {REMAKE}"
                ) from None
            # The recorded size catches a cut anywhere, even on a 512-byte block edge, at one stat
            # per shard (walking every member's header would be one read per sample).
            size = shard.stat().st_size
            expected = entry.get("bytes")
            if size % 512 or (expected is not None and size != expected):
                want = f"{expected} bytes" if expected is not None else "a multiple of 512 bytes"
                raise ShardError(
                    f"shard {shard} is truncated or corrupt: {size} bytes, the manifest expects {want}; {REMAKE}"
                )
            idx = index_path(shard)
            if idx.is_file():
                import numpy as np  # here only: a restart (the record) needs no numpy

                shape = np.load(idx, mmap_mode="r", allow_pickle=False).shape
                if shape[0] != entry["num_samples"]:
                    raise ShardError(
                        f"index {idx} lists {shape[0]} samples, the manifest {entry['num_samples']}; {REMAKE}"
                    )
