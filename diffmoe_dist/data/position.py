"""The global sample position and the order it walks: the whole state of either loader.

The global sample order is a pure function of (seed, epoch, global sample index): epoch e is a
seeded permutation of the dataset, epochs are concatenated into one stream, global batch s is the
slice [s*G, (s+1)*G) of that stream, and rank r takes the r-th contiguous part of it. Four ranks
and two ranks therefore see the same global sequence, and the loader state is one integer. Both
loaders build on `GlobalPosition`: data/loader.py's `GlobalBatchLoader` (in memory) and
data/stream.py's `StreamBatchLoader` (from the shards).
"""

from __future__ import annotations

import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    # randperm draws the same permutation for int32 and int64 (checked up to 3M samples): int32 halves
    # the streaming loader's one per-sample array.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g, dtype=dtype)


class GlobalPosition:
    """The global sample position and the order it walks: the whole state of either loader."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        perm_dtype: torch.dtype = torch.int64,
    ):
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        if global_batch_size % world_size:
            raise ValueError(
                f"data.global_batch_size={global_batch_size} must be a multiple of the world size {world_size}"
            )
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank = rank
        self.seed = seed
        self.samples_seen = 0  # global position in the stream: the whole loader state
        self._perm_dtype = perm_dtype
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if (self.seed, epoch) not in self._perm_cache:
            self._perm_cache = {}  # one epoch at a time
            self._perm_cache[(self.seed, epoch)] = epoch_permutation(
                self.num_samples, self.seed, epoch, self._perm_dtype
            )
        return self._perm_cache[(self.seed, epoch)]

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
