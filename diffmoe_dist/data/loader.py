"""Deterministic, topology-free batches.

The global sample order is a pure function of (seed, epoch, global sample index): epoch e is a
seeded permutation of the dataset, epochs are concatenated into one stream, global batch s is the
slice [s*G, (s+1)*G) of that stream, and rank r takes the r-th contiguous part of it. Four ranks
and two ranks therefore see the same global sequence, and the loader state is one integer.
"""

from __future__ import annotations

import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g)


class GlobalBatchLoader:
    def __init__(self, tensors: dict[str, torch.Tensor], global_batch_size: int, rank: int, world_size: int, seed: int):
        sizes = {len(v) for v in tensors.values()}
        if len(sizes) != 1:
            raise ValueError(f"dataset tensors disagree on length: {sizes}")
        self.tensors = tensors
        self.num_samples = sizes.pop()
        if global_batch_size % world_size:
            raise ValueError(
                f"data.global_batch_size={global_batch_size} must be a multiple of the world size {world_size}"
            )
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.samples_seen = 0  # global position in the stream: the whole loader state
        self._perm_cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: epoch_permutation(self.num_samples, self.seed, epoch)}
        return self._perm_cache[epoch]

    def global_indices(self, start: int, count: int) -> torch.Tensor:
        out, pos = [], start
        while count > 0:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count, self.num_samples - offset)
            out.append(self._perm(epoch)[offset : offset + take])
            pos, count = pos + take, count - take
        return torch.cat(out)

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.num_samples

    def next_batch(self) -> dict[str, torch.Tensor]:
        start = self.samples_seen + self.rank * self.local_batch_size
        idx = self.global_indices(start, self.local_batch_size)
        self.samples_seen += self.global_batch_size
        return {k: v[idx] for k, v in self.tensors.items()}

    def state_dict(self) -> dict:
        return {"samples_seen": self.samples_seen, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"checkpoint loader state has {state['num_samples']} samples but the dataset has {self.num_samples}: "
                "resume with the same data.path"
            )
        self.samples_seen = int(state["samples_seen"])
        self.seed = int(state["seed"])
