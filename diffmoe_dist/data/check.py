"""What a run will read from disk, checked before any process group starts: a ``train.resume``
path and the training shards. Bad files are a `ConfigError` on one line naming the field (the CLI
prints it and exits 2), like a bad value from `Config.validate`, which checks the values only.

`diffmoe-train` runs `check_files` after `validate` (and `--validate-only` does, unless
``--no-file-checks``); rank r of W checks the headers of shards r, r + W, ... only.

The full shard check runs once per shard set: a check of every shard in one process (the launchers'
``--validate-only`` on the batch node) records the manifest's sha256 in ``manifest.validated.json``
beside it (`data.manifest.record_validated`); later starts (every requeue) find the record, hash the
manifest and skip the per-shard walk, so a restart costs one manifest read whatever the number of
shards. A changed manifest (re-made or extended shards) has another hash: checked again. A shard
damaged after its check is named by the loader when it is read (data/stream.py: every rank stops
and saves, then one line, exit 1).
"""

from __future__ import annotations

import json
import os

from diffmoe_dist.config import RESUME_WORDS, Config, ConfigError
from diffmoe_dist.config.options import fail
from diffmoe_dist.data.manifest import check_shards as check_each_shard
from diffmoe_dist.data.manifest import manifest_digest, record_validated, validated
from diffmoe_dist.data.tar_index import ShardError


def check_files(cfg: Config, rank: int = 0, world_size: int = 1) -> None:
    """What the run will read, checked before anything starts: a ``train.resume`` path and the
    training shards (`check_data_path`). (The text encoder is only loaded to sample: not checked.)"""
    tr = cfg.train
    if tr.resume not in RESUME_WORDS:
        if not os.path.exists(tr.resume):
            fail("train.resume", tr.resume, "does not exist: use auto, never, or a run / checkpoint directory")
        if not os.path.isdir(tr.resume):
            fail("train.resume", tr.resume, "is not a directory: pass a run directory or its step_* directories")
    num_samples, latent_shape = check_data_path(cfg.data.path, rank, world_size, cfg.model.task)
    if cfg.data.global_batch_size > num_samples:
        fail("data.global_batch_size", cfg.data.global_batch_size, f"data.path holds {num_samples} samples: use fewer")
    check_data_fits_model(cfg, latent_shape)


def check_data_fits_model(cfg: Config, latent_shape) -> None:
    """The shards' latent shape against the model, and for text-to-image their caption embeddings
    against model.text_len / text_dim and data.text_encoder (`data.captions.text_tensors`, on the
    first sample): the loader's checks, here before the model is built."""
    m = cfg.model
    if latent_shape is not None and list(latent_shape) != [m.in_channels, m.image_size, m.image_size]:
        fail(
            "model.image_size",
            m.image_size,
            f"data.path={cfg.data.path} holds latents of shape {list(latent_shape)}: set model.in_channels="
            f"{latent_shape[0]} model.image_size={latent_shape[-1]}",
        )
    if m.task != "t2i":
        return
    from diffmoe_dist.data.captions import text_tensors
    from diffmoe_dist.data.stream import ShardSamples

    try:
        first = ShardSamples(os.path.join(cfg.data.path, "train"), {"text": "text.npy", "mask": "mask.npy"})[0]
        text_tensors({"text": first["text"][None], "mask": first["mask"][None]}, cfg, cfg.data.path)
    except (ShardError, ValueError) as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None


_SHARDS_HINTS = {  # the recipe for the config's task: a text-to-image run needs caption embeddings
    "c2i": "make the shards with `python tools/make_shards.py digits --out DIR`, or pass data.path=DIR",
    "t2i": "make the shards with `python tools/make_shards.py images --src IMAGES --vae VAE_DIR --out DIR` "
    "(`digits-t2i` for the captioned digits), or pass data.path=DIR",
}


def check_data_path(path: str, rank: int = 0, world_size: int = 1, task: str = "c2i") -> tuple[int, list | None]:
    """``path/train``: a manifest listing at least one sample, and every listed shard a tar of the
    size the manifest records. Returns (samples, latent shape or None)."""
    hint = _SHARDS_HINTS[task]
    train = os.path.join(path, "train")
    if not os.path.isdir(path):
        fail("data.path", path, f"the directory does not exist: {hint}")
    manifest_path = os.path.join(train, "manifest.json")
    if not os.path.isfile(manifest_path):
        what = "has no train/" if not os.path.isdir(train) else "has no train/manifest.json"
        fail("data.path", path, f"{what}: {hint}")
    train_digest = manifest_digest(train)
    record = validated(train, train_digest)
    if record is not None and "num_samples" in record:  # checked whole before: its summary, no 8 MB parse
        num_samples, latent_shape = int(record["num_samples"]), record.get("latent_shape")
    else:
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
            shards = [s["name"] for s in manifest["shards"]]
            num_samples, latent_shape = int(manifest["num_samples"]), manifest.get("latent_shape")
        except (ValueError, KeyError, TypeError) as exc:
            fail("data.path", path, f"{manifest_path} is not a shard manifest ({exc!r}): {hint}")
        if not shards or num_samples < 1:
            fail("data.path", path, f"{manifest_path} lists no samples: {hint}")
    # Shard by shard: the one check the stream loader also relies on (data/stream.py), one stat and
    # one header read per shard, each rank a 1/W share; skipped for a manifest already checked whole.
    for split in ("train", "heldout"):
        shard_dir = os.path.join(path, split)
        if not os.path.isfile(os.path.join(shard_dir, "manifest.json")):
            continue
        digest = train_digest if split == "train" else manifest_digest(shard_dir)
        if validated(shard_dir, digest):
            continue
        try:
            check_each_shard(shard_dir, rank, world_size)
        except ShardError as exc:
            raise ConfigError(f"data.path={path!r} is invalid: {exc}") from None
        if world_size == 1:  # every shard was checked here: record it for the next start
            record_validated(shard_dir, digest)
    return num_samples, latent_shape
