"""WebDataset tar shards of latents plus a manifest.json that says what is in them.

A sample is {"__key__": str, "latent.npy": float32 (C, H, W), "cls": int, ...extras} where extras
are further fields such as "caption.txt" (str), "text.npy" / "mask.npy" (arrays) or any field
webdataset can encode. Small datasets load whole into memory (`load_indexed`, ordered by key, so
the order never depends on how the shards were split); large ones go through data/stream.py, which
reads the same global batches from the shards (`stream` below is webdataset's shard-split pipeline,
which gives ranks unequal counts and has no state: not used for training).
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from diffmoe_dist.data.manifest import MAKE_SHARDS_HINT, MANIFEST, _atomic_write_bytes, read_manifest

FORMAT_VERSION = 1
# webdataset groups tar members into samples by splitting the member name at the first "." after
# the last "/", and lower-cases the field: keys must therefore contain no "." and fields be lowercase.
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")
_FIELD_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)*$")


def _shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def _validate_sample(sample: dict, seen_keys: set[str], fields: list[str] | None, latent_shape) -> dict:
    key = sample.get("__key__")
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"sample __key__={key!r} must be a non-empty str of [A-Za-z0-9_-/] (webdataset splits at '.')")
    if key in seen_keys:
        raise ValueError(f"sample __key__={key!r} appears twice; keys must be unique across the dataset")
    latent = sample.get("latent.npy")
    if not isinstance(latent, np.ndarray) or latent.dtype != np.float32 or latent.ndim != 3:
        desc = f"{latent.dtype} {latent.shape}" if isinstance(latent, np.ndarray) else type(latent).__name__
        raise ValueError(f"sample {key!r}: 'latent.npy' must be a float32 np.ndarray (C, H, W), got {desc}")
    if latent_shape is not None and tuple(latent.shape) != tuple(latent_shape):
        raise ValueError(f"sample {key!r}: latent shape {latent.shape} differs from the first sample's {latent_shape}")
    cls = sample.get("cls")
    if isinstance(cls, (bool, np.bool_)) or not isinstance(cls, (int, np.integer)):
        raise ValueError(f"sample {key!r}: 'cls' must be an int, got {type(cls).__name__}")
    sample_fields = sorted(k for k in sample if k != "__key__")
    for field in sample_fields:
        if not _FIELD_RE.match(field):
            raise ValueError(f"sample {key!r}: field {field!r} must be lowercase [a-z0-9_] with '.' extensions")
    if fields is not None and sample_fields != fields:
        raise ValueError(f"sample {key!r} has fields {sample_fields}, the first sample had {fields}")
    out = dict(sample)
    out["cls"] = int(cls)
    out["latent.npy"] = np.ascontiguousarray(latent)
    return out


def write_shards(
    out_dir: str | os.PathLike,
    samples: Iterable[dict],
    samples_per_shard: int,
    prefix: str = "shard",
    created_by: str = "diffmoe_dist.data.shards.write_shards",
    overwrite: bool = False,
    index: bool = False,
    dtypes: dict[str, str] | None = None,
    meta: dict | None = None,
) -> dict:
    """Writes `samples` into `out_dir/{prefix}-{i:06d}.tar` and `out_dir/manifest.json`; returns it.

    Each shard and the manifest are written to a temporary name and renamed, and the manifest last:
    a directory with a manifest is complete. Tar headers carry mtime 0, so equal inputs give
    byte-identical shards.

    index: also write `{prefix}-{i:06d}.idx.npy` beside each shard, the byte offsets of its fields
    (data/stream.py reads a sample with one pread per field instead of scanning the tar headers).
    dtypes: field -> stored dtype the .npy cannot say, recorded in the manifest ({"text.npy":
    "bfloat16"}: the array holds bf16 bit patterns as uint16). meta: more manifest entries ({"vae": ...}).
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard={samples_per_shard} must be >= 1")
    if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
        raise ValueError(f"prefix={prefix!r} must be [A-Za-z0-9_-]")
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    old_manifest = None
    if manifest_path.exists():
        if not overwrite:
            raise FileExistsError(f"{manifest_path} exists; pass overwrite=True (--overwrite) to replace the shards")
        old_manifest = read_manifest(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    shards: list[dict] = []
    seen_keys: set[str] = set()
    fields = latent_shape = None
    buffer: list[dict] = []

    def flush() -> None:
        name = _shard_name(prefix, len(shards))
        stream = io.BytesIO()
        with wds.TarWriter(stream, mtime=0.0) as writer:
            for sample in buffer:
                writer.write(sample)
        data = stream.getvalue()
        _atomic_write_bytes(out_dir / name, data)
        if index:
            from diffmoe_dist.data.tar_index import index_path, tar_index

            index_bytes = io.BytesIO()
            np.save(index_bytes, tar_index(io.BytesIO(data), fields, name))
            _atomic_write_bytes(index_path(out_dir / name), index_bytes.getvalue())
        shards.append({"name": name, "num_samples": len(buffer), "bytes": len(data)})
        buffer.clear()

    sorted_keys, last_key = True, ""
    for sample in samples:
        sample = _validate_sample(sample, seen_keys, fields, latent_shape)
        sorted_keys, last_key = sorted_keys and sample["__key__"] > last_key, sample["__key__"]
        seen_keys.add(sample["__key__"])
        if fields is None:
            fields = sorted(k for k in sample if k != "__key__")
            latent_shape = list(sample["latent.npy"].shape)
        buffer.append(sample)
        if len(buffer) == samples_per_shard:
            flush()
    if buffer:
        flush()
    if not shards:
        raise ValueError(f"write_shards got no samples for {out_dir}")

    manifest = {
        "format_version": FORMAT_VERSION,
        "shards": shards,
        "num_samples": len(seen_keys),
        "latent_shape": latent_shape,
        "keys": fields,
        "created_by": created_by,
        # data/stream.py indexes samples in shard order; equal to load_indexed's key order when True
        "sorted_keys": sorted_keys,
        **({"dtypes": dict(dtypes)} if dtypes else {}),
        **(meta or {}),
    }
    _atomic_write_bytes(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode())
    if old_manifest is not None:
        current = {s["name"] for s in shards}
        for stale in old_manifest["shards"]:
            if stale["name"] not in current:
                (out_dir / stale["name"]).unlink(missing_ok=True)
                (out_dir / stale["name"]).with_suffix(".idx.npy").unlink(missing_ok=True)
    return manifest


def shard_urls(shard_dir: str | os.PathLike) -> list[str]:
    shard_dir = Path(shard_dir)
    return [str(shard_dir / s["name"]) for s in read_manifest(shard_dir)["shards"]]


def _decode(sample: dict) -> dict:
    """webdataset's decoded sample -> {"key", "latent" (C, H, W) tensor, "cls", extras by stem}."""
    out = {"key": sample["__key__"]}
    for field, value in sample.items():
        if field.startswith("__"):
            continue
        name = field.split(".")[0]
        out[name] = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
    return out


def _identity(src: Iterator) -> Iterator:
    yield from src


def load_indexed(shard_dir: str | os.PathLike) -> dict:
    """Reads every shard into memory: {"latent": float (N, C, H, W), "cls": long (N,), "key": [N]}
    plus extras ("text": stacked tensor for text.npy, "caption": list of str for caption.txt, ...),
    all ordered by key. Every rank gets the whole dataset (no node splitting)."""
    manifest = read_manifest(shard_dir)
    dataset = wds.WebDataset(
        shard_urls(shard_dir), shardshuffle=False, nodesplitter=_identity, workersplitter=_identity
    ).decode()
    rows = sorted((_decode(s) for s in dataset), key=lambda row: row["key"])
    if len(rows) != manifest["num_samples"]:
        raise ValueError(
            f"{shard_dir}: read {len(rows)} samples but the manifest lists {manifest['num_samples']}; "
            f"the shards are damaged or stale: {MAKE_SHARDS_HINT}"
        )
    out: dict = {"key": [row["key"] for row in rows]}
    for name in rows[0]:
        if name == "key":
            continue
        values = [row[name] for row in rows]
        if name == "cls":
            out[name] = torch.tensor(values, dtype=torch.long)
        elif torch.is_tensor(values[0]) and all(v.shape == values[0].shape for v in values):
            out[name] = torch.stack(values)
        else:
            out[name] = values
    for field, dtype in manifest.get("dtypes", {}).items():  # bf16 stored as its uint16 bit patterns
        name = field.split(".")[0]
        if dtype == "bfloat16" and torch.is_tensor(out.get(name)):
            out[name] = out[name].view(torch.bfloat16)
    if list(out["latent"].shape[1:]) != list(manifest["latent_shape"]):
        raise ValueError(f"{shard_dir}: latents {tuple(out['latent'].shape)} disagree with the manifest")
    return out


def stream(
    dir_or_urls: str | os.PathLike | list[str],
    shuffle_buffer: int = 0,
    seed: int = 0,
    epoch: int = 0,
) -> wds.WebDataset:
    """A webdataset pipeline of decoded samples (as `load_indexed` rows) for data beyond memory.

    Shards are split across ranks (RANK/WORLD_SIZE or torch.distributed) and then DataLoader
    workers; with shuffle_buffer > 0 each rank shuffles its shards and its samples, deterministically
    from (seed, epoch). Pass the epoch explicitly: DataLoader workers iterate copies of the pipeline,
    so webdataset's own per-pass counter does not advance there. Compose `.batched(B)` or wrap the
    pipeline in a DataLoader.
    """
    if isinstance(dir_or_urls, (str, os.PathLike)) and Path(dir_or_urls).is_dir():
        urls: str | list[str] = shard_urls(dir_or_urls)
    elif isinstance(dir_or_urls, (str, os.PathLike)):
        if not str(dir_or_urls).endswith(".tar") and "{" not in str(dir_or_urls):
            raise FileNotFoundError(f"shard directory {dir_or_urls} does not exist; {MAKE_SHARDS_HINT}")
        urls = str(dir_or_urls)
    else:
        urls = [str(u) for u in dir_or_urls]
        if not urls:
            raise ValueError("stream got an empty list of shard urls")
    shuffle = shuffle_buffer > 0
    pass_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    dataset = wds.WebDataset(
        urls,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,  # more ranks x workers than shards leaves some of them without data
        shardshuffle=(len(urls) if isinstance(urls, list) else 100) if shuffle else False,
        detshuffle=True,
        seed=pass_seed,
    )
    if shuffle:
        dataset = dataset.compose(wds.filters.detshuffle(shuffle_buffer, initial=shuffle_buffer, seed=pass_seed))
    return dataset.decode().map(_decode)
