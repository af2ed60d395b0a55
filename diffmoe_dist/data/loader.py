"""Deterministic, topology-free batches.

The global sample order is a pure function of (seed, epoch, global sample index): epoch e is a
seeded permutation of the dataset, epochs are concatenated into one stream, global batch s is the
slice [s*G, (s+1)*G) of that stream, and rank r takes the r-th contiguous part of it. Four ranks
and two ranks therefore see the same global sequence, and the loader state is one integer.
`GlobalBatchLoader` holds the dataset in memory (data.loader=indexed); data/stream.py's
`StreamBatchLoader` reads the same batches from the shards (data.loader=stream).
"""

from __future__ import annotations

import os

import torch

from diffmoe_dist.data.position import GlobalPosition


class GlobalBatchLoader(GlobalPosition):
    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shard_sizes=None,
        shuffle_window: int = 0,
        lanes: int | None = None,
    ):
        sizes = {len(v) for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"dataset tensors disagree on length: {sizes}")
        super().__init__(
            sizes.pop(),
            global_batch_size,
            rank,
            world_size,
            seed,
            shard_sizes=shard_sizes,
            shuffle_window=shuffle_window,
            lanes=lanes,
        )
        self.tensors = tensors

    def next_batch(self) -> dict[str, torch.Tensor]:
        idx = self.rank_indices(self.samples_seen)
        self.samples_seen += self.global_batch_size
        return {k: v[idx] for k, v in self.tensors.items()}


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A batch on the run's device, floating fields in fp32. The stream loader hands caption
    features in the shards' dtype (bf16 for the 256-GPU data: half the bytes of fp32 through the
    workers' shared memory, the pinning and the host-to-device copy) and they are cast here, after
    the copy; bf16 -> fp32 is exact, so the model sees the values a host-side cast gave."""
    out = {}
    for k, v in batch.items():
        v = v.to(device, non_blocking=True)
        out[k] = v.float() if v.is_floating_point() and v.dtype != torch.float32 else v
    return out


def build_loader(cfg, rank: int, world_size: int, device: torch.device) -> GlobalPosition:
    """The training loader of `cfg.data.loader`: batches keyed by the model's forward arguments (x,
    and y or text + text_mask). One loader batch is one micro-batch of the global batch
    (optim.grad_accum_steps of them per step); its state, the global sample position, does not
    depend on the split."""
    train = os.path.join(cfg.data.path, "train")
    micro_batch = cfg.data.global_batch_size // cfg.optim.grad_accum_steps
    t2i = cfg.model.task == "t2i"
    if cfg.data.loader == "stream":
        from diffmoe_dist.data.stream import StreamBatchLoader

        # A missing field (t2i shards without caption embeddings) is a ShardError naming it.
        fields = {"x": "latent.npy", **({"text": "text.npy", "text_mask": "mask.npy"} if t2i else {"y": "cls"})}
        loader = StreamBatchLoader(
            train,
            fields,
            micro_batch,
            rank,
            world_size,
            cfg.train.seed,
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            bool_fields=("text_mask",) if t2i else (),
            shuffle_window=cfg.data.shuffle_window,
            batches_per_step=cfg.optim.grad_accum_steps,
            lanes=cfg.data.global_batch_size,
        )
        if t2i:  # the indexed path's shape and encoder checks, on one sample
            from diffmoe_dist.data.captions import text_tensors

            first = loader.first_sample()
            text_tensors({"text": first["text"][None], "mask": first["text_mask"][None]}, cfg, cfg.data.path)
        return loader
    from diffmoe_dist.data.shards import load_indexed

    data = load_indexed(train)
    if t2i:
        from diffmoe_dist.data.captions import text_tensors

        # Keys are the model's forward kwargs (text, text_mask); class labels stay out of the
        # batch, which the loop hands to the model whole (the evaluator reads them from shards).
        tensors = {"x": data["latent"], **text_tensors(data, cfg, cfg.data.path)}
    else:
        tensors = {"x": data["latent"], "y": data["cls"]}
    sizes = None
    if cfg.data.shuffle_window > 0:  # the windowed order walks shards: their sample counts
        from diffmoe_dist.data.shards import read_manifest

        sizes = [s["num_samples"] for s in read_manifest(train, check_files=False)["shards"]]
    return GlobalBatchLoader(
        tensors,
        micro_batch,
        rank,
        world_size,
        cfg.train.seed,
        sizes,
        cfg.data.shuffle_window,
        cfg.data.global_batch_size,
    )
