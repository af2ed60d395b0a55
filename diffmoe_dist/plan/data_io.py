"""The planner's data term: the file-system traffic a layout's step needs, against what the cluster
file says its file system gives one job (``file_system: {read_bandwidth, metadata_ops}``).

- Bytes: every image of the global batch is read once per step: G x the bytes of one stored sample
  (the fp32 latent, plus for text-to-image the bf16 caption features and their mask, as
  tools/make_shards.py stores them).
- Opens: shard opens per sample of the streaming loader's order (data/position.py). Today's order
  (``data.shuffle_window=0``) permutes all samples: with shards >> open shards, every sample is an
  open (1.0). The windowed order: per window a rank reads W_s S / W samples from the same ~W_s / W
  shards (plus one at a lane edge), each DataLoader worker opening them once (workers do not share
  file descriptors): ``workers (ceil(W_s / W) + 1) W / (W_s S)``, which benchmarks/loader.py counts
  against the real order (S = ``samples_per_shard``, the file's or 1,000).
- The step is data-bound when reading its batch at those rates takes longer than computing it:
  the loader prefetches, so only the excess is lost, but no prefetch depth hides a deficit.
"""

from __future__ import annotations

import math

from diffmoe_dist.config import Config


def sample_bytes(cfg: Config) -> int:
    m = cfg.model
    latent = m.in_channels * m.image_size * m.image_size * 4
    return latent + (m.text_len * m.text_dim * 2 + m.text_len if m.task == "t2i" else 8)


def opens_per_sample(cfg: Config, world: int, samples_per_shard: int) -> float:
    window, workers = cfg.data.shuffle_window, max(1, cfg.data.num_workers)
    if cfg.data.loader != "stream":
        return 0.0  # indexed: read whole at start-up
    if window <= 0:
        return 1.0
    return min(1.0, workers * (math.ceil(window / world) + 1) * world / (window * samples_per_shard))


def data_term(cfg: Config, file_system: dict | None, world: int, step_s: float) -> dict:
    """Bytes and opens per second the step needs, the file system's, and whether data bounds the step."""
    per_sample = sample_bytes(cfg)
    shard_samples = int((file_system or {}).get("samples_per_shard", 1000))
    opens = opens_per_sample(cfg, world, shard_samples)
    images_per_s = cfg.data.global_batch_size / step_s
    out = {
        "sample_bytes": per_sample,
        "opens_per_sample": opens,
        "bytes_per_s": images_per_s * per_sample,
        "opens_per_s": images_per_s * opens,
        "data_step_s": None,
        "bound": None,
    }
    if file_system:
        read_s = cfg.data.global_batch_size * per_sample / float(file_system["read_bandwidth"])
        open_s = cfg.data.global_batch_size * opens / float(file_system["metadata_ops"])
        out.update(read_bandwidth=float(file_system["read_bandwidth"]), metadata_ops=float(file_system["metadata_ops"]))
        out["data_step_s"] = max(read_s, open_s)
        out["bound"] = "data" if out["data_step_s"] > step_s else "compute"
        out["limit"] = "metadata (shard opens)" if open_s > read_s else "read bandwidth"
    return out


def data_warning(term: dict) -> str | None:
    if term.get("bound") != "data":
        return None
    return (
        f"data, not compute, bounds the step: {term['data_step_s']:.2f} s to read a batch ({term['limit']}): "
        f"{term['bytes_per_s'] / 1e9:.1f} GB/s of {term['read_bandwidth'] / 1e9:.0f} and "
        f"{term['opens_per_s']:,.0f} opens/s of {term['metadata_ops']:,.0f}: raise data.shuffle_window "
        "(fewer opens) or lower the sample size"
    )
