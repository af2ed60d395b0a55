"""The global sample position and the order it walks: the whole state of either loader.

The global sample order is a pure function of (seed, epoch, global sample index): epoch e is a
seeded order of the dataset, epochs are concatenated into one stream, global batch s is the slice
[s*G, (s+1)*G) of that stream, and rank r takes the r-th contiguous part of it. Four ranks and two
ranks therefore see the same global sequence, and the loader state is one integer. Both loaders
build on `GlobalPosition`: data/loader.py's `GlobalBatchLoader` (in memory) and data/stream.py's
`StreamBatchLoader` (from the shards).

Two orders (``data.shuffle_window``):
- 0: a permutation of all samples per epoch (`epoch_permutation`): nearly every sample read from the
  streaming loader is a shard open (hit rate ~ open shards / all shards), and the permutation costs
  4 bytes per sample in memory.
- W_s > 0 (`WindowedOrder`): the epoch permutes the shards, cuts that shard order into windows of
  W_s consecutive shards, and permutes the samples inside each window; each global batch (a slice of
  that stream) is then sorted by its samples' place in the window's shard order. Sorting inside a
  batch changes no gradient (a batch is a mean), but makes rank r's contiguous part come from the
  same ~W_s / W shards step after step while the window lasts: a rank opens about W_s / W + 2
  shards per window and reads ~W_s * S / W samples (S samples per shard) from them. Memory: the
  shard order and per-window counts (O(shards)) and one window's permutation (W_s * S int32).
  The randomness given up: a batch draws from W_s shards instead of all, and two samples of one
  shard meet in the same window (they are never further apart than a window's samples). Shards
  written in key order hold neighbouring keys (one source, one crawl): the larger W_s, the closer a
  batch is to a uniform draw; W_s >= G / S makes every batch span at least as many shards as it has
  S-sample groups. The samples of each global batch are identical at every world size, EP size and
  accumulation split (sorting happens inside the loader batch, which is a slice of the same stream).
"""

from __future__ import annotations

import numpy as np
import torch


def epoch_permutation(num_samples: int, seed: int, epoch: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    # randperm draws the same permutation for int32 and int64 (checked up to 3M samples): int32 halves
    # the streaming loader's one per-sample array.
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=g, dtype=dtype)


def _generator(*words: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(words)).generate_state(1, np.uint64)[0] >> 1))


class WindowedOrder:
    """Epoch e: shard order pi_e (a seeded permutation of the shards); the shards' samples laid out in
    that order form the epoch's "concatenation" c in [0, N); window w covers shards pi_e[w W_s, (w+1) W_s)
    and the stream position p inside it is c = start_w + perm_{e,w}[p - start_w]. `sort_key` of a
    stream position is e N + c: in shard order, and inside a shard in sample order."""

    def __init__(self, shard_sizes, window: int, seed: int):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.sizes)])  # global index of each shard's first sample
        self.num_samples = int(self.first[-1])
        self.window, self.seed = int(window), int(seed)
        self._epoch_cache: tuple | None = None
        self._window_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard order, start of each shard in the concatenation (+ N), start of each window (+ N))."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = torch.randperm(len(self.sizes), generator=_generator(self.seed, epoch, 1)).numpy()
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])])
            windows = starts[np.arange(0, len(order), self.window).tolist() + [len(order)]]
            self._epoch_cache = (epoch, order, starts, windows)
        return self._epoch_cache[1:]

    def _window_perm(self, epoch: int, w: int, size: int) -> torch.Tensor:
        if (epoch, w) not in self._window_cache:
            if len(self._window_cache) >= 2:  # the current window and the next (a batch may span both)
                self._window_cache.pop(next(iter(self._window_cache)))
            perm = torch.randperm(size, generator=_generator(self.seed, epoch, 2, w), dtype=torch.int32)
            self._window_cache[(epoch, w)] = perm
        return self._window_cache[(epoch, w)]

    def concat_positions(self, epoch: int, offset: int, count: int) -> np.ndarray:
        """c of the stream positions [offset, offset + count) of one epoch."""
        _, _, windows = self._epoch(epoch)
        out, pos, end = [], offset, offset + count
        while pos < end:
            w = int(np.searchsorted(windows, pos, side="right")) - 1
            lo, hi = int(windows[w]), int(windows[w + 1])
            take = min(end, hi) - pos
            perm = self._window_perm(epoch, w, hi - lo)
            out.append(lo + perm[pos - lo : pos - lo + take].numpy().astype(np.int64))
            pos += take
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def samples(self, epoch: int, concat: np.ndarray) -> np.ndarray:
        """Global sample indices (manifest order) of concatenation positions c of epoch e."""
        order, starts, _ = self._epoch(epoch)
        k = np.searchsorted(starts, concat, side="right") - 1
        return self.first[order[k]] + (concat - starts[k])


class GlobalPosition:
    """The global sample position and the order it walks: the whole state of either loader.
    ``shard_sizes`` and ``shuffle_window`` > 0 select the windowed order (module docstring)."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        perm_dtype: torch.dtype = torch.int64,
        shard_sizes=None,
        shuffle_window: int = 0,
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
        self.error: str | None = None  # the next step's batch cannot be read (data/stream.py): a stop reason
        self.shuffle_window = int(shuffle_window)
        self._windowed = None
        if self.shuffle_window > 0:
            if shard_sizes is None or int(np.sum(shard_sizes)) != num_samples:
                raise ValueError("data.shuffle_window > 0 needs the shards' sample counts (the manifest)")
            self._shard_sizes = shard_sizes
        self._perm_dtype = perm_dtype
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if (self.seed, epoch) not in self._perm_cache:
            self._perm_cache = {}  # one epoch at a time
            self._perm_cache[(self.seed, epoch)] = epoch_permutation(
                self.num_samples, self.seed, epoch, self._perm_dtype
            )
        return self._perm_cache[(self.seed, epoch)]

    def _order(self) -> WindowedOrder:
        if self._windowed is None or self._windowed.seed != self.seed:
            self._windowed = WindowedOrder(self._shard_sizes, self.shuffle_window, self.seed)
        return self._windowed

    def global_indices(self, start: int, count: int) -> torch.Tensor:
        """Sample indices of the stream positions [start, start + count), in stream order."""
        if self.shuffle_window > 0:
            return torch.from_numpy(self._windowed_samples(start, count)[1])
        out, pos = [], start
        while count > 0:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count, self.num_samples - offset)
            out.append(self._perm(epoch)[offset : offset + take])
            pos, count = pos + take, count - take
        return torch.cat(out)

    def _windowed_samples(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(sort keys e N + c, sample indices) of the stream positions [start, start + count)."""
        order, keys, samples, pos = self._order(), [], [], start
        while count > 0:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count, self.num_samples - offset)
            concat = order.concat_positions(epoch, offset, take)
            keys.append(epoch * self.num_samples + concat)
            samples.append(order.samples(epoch, concat))
            pos, count = pos + take, count - take
        return np.concatenate(keys), np.concatenate(samples)

    def rank_indices(self, batch_start: int) -> torch.Tensor:
        """This rank's sample indices of the global batch at stream position ``batch_start``."""
        lo = self.rank * self.local_batch_size
        if self.shuffle_window <= 0:
            return self.global_indices(batch_start + lo, self.local_batch_size)
        keys, samples = self._windowed_samples(batch_start, self.global_batch_size)
        mine = np.argsort(keys, kind="stable")[lo : lo + self.local_batch_size]
        return torch.from_numpy(samples[mine])

    @property
    def epoch(self) -> int:
        return self.samples_seen // self.num_samples

    def state_dict(self) -> dict:
        state = {"samples_seen": self.samples_seen, "seed": self.seed, "num_samples": self.num_samples}
        if self.shuffle_window > 0:  # absent: the full permutation (checkpoints from before the field)
            state["shuffle_window"] = self.shuffle_window
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["num_samples"] != self.num_samples:
            raise ValueError(
                f"checkpoint loader state has {state['num_samples']} samples but the dataset has {self.num_samples}: "
                "resume with the same data.path"
            )
        if int(state.get("shuffle_window", 0)) != self.shuffle_window:
            raise ValueError(
                f"checkpoint loader state walks data.shuffle_window={state.get('shuffle_window', 0)}, this run "
                f"{self.shuffle_window}: resume with data.shuffle_window={state.get('shuffle_window', 0)} "
                "(another window is another order: the position would skip and repeat samples)"
            )
        self.samples_seen = int(state["samples_seen"])
        self.seed = int(state["seed"])
