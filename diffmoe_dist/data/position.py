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
- W_s > 0 (`WindowedOrder`): the epoch permutes the shards and cuts that shard order into windows
  of W_s consecutive shards. A window's samples are dealt into G lanes (G = data.global_batch_size):
  lane j is the j-th contiguous chunk of the window's samples (~W_s / G shards' worth, in shard
  order), read in a seeded random order; the window's stream is lane 0's first sample, lane 1's
  first, ..., lane G-1's first, then every lane's second, and so on. A global batch is one such row:
  one random sample from every lane, i.e. G / W_s from each of the window's shards (stratified).
  Rank r's contiguous part of every batch is always the same ~G / W lanes, so for the whole window
  it reads the same ~W_s / W + 1 shards: per window a rank opens each of them once per DataLoader
  worker and reads W_s S / W samples (S samples a shard): about ``workers (1 / S + W / (W_s S))``
  opens a sample. Memory: the shard order (O(shards)) and one window's lane orders (W_s S int32).
  The randomness given up: a batch draws from W_s shards, not all (shards written in key order
  hold neighbouring keys, one source or crawl: the larger W_s, the closer to a uniform draw), and a
  sample's neighbours in the stream come from the same window. The samples of each global batch
  are identical at every world size, EP size and accumulation split.
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
    that order form the epoch's "concatenation" c in [0, N). Window w covers shards pi_e[w W_s, (w+1) W_s)
    (N_w samples) and lays them out in ``lanes`` lanes (the global batch size G): lane j holds the
    j-th contiguous chunk of the window's concatenation, ~N_w / G samples, in a seeded random order.
    Window offset o = t G + j is lane j's t-th sample. A global batch is one row of the lanes (shifted
    by the window's start), so rank r's contiguous share always reads the same lanes, hence the same
    ~W_s / W shards, for the whole window, at every world size."""

    def __init__(self, shard_sizes, window: int, seed: int, lanes: int):
        self.sizes = np.asarray(shard_sizes, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.sizes)])  # global index of each shard's first sample
        self.num_samples = int(self.first[-1])
        self.window, self.seed, self.lanes = int(window), int(seed), int(lanes)
        self._epoch_cache: tuple | None = None
        self._window_cache: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard order, start of each shard in the concatenation (+ N), start of each window (+ N))."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            order = torch.randperm(len(self.sizes), generator=_generator(self.seed, epoch, 1)).numpy()
            starts = np.concatenate([[0], np.cumsum(self.sizes[order])])
            windows = starts[np.arange(0, len(order), self.window).tolist() + [len(order)]]
            self._epoch_cache = (epoch, order, starts, windows)
        return self._epoch_cache[1:]

    def _lanes(self, epoch: int, w: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        """(start of each lane in the window, (lanes, rows) int32: lane j's t-th sample's place in its chunk)."""
        if (epoch, w) not in self._window_cache:
            if len(self._window_cache) >= 2:  # the current window and the next (a batch may span both)
                self._window_cache.pop(next(iter(self._window_cache)))
            lanes = min(self.lanes, size)
            rows = -(-size // lanes)
            length = np.full(lanes, rows, dtype=np.int64)
            length[size - (rows - 1) * lanes :] -= 1  # the last row is partial
            start = np.concatenate([[0], np.cumsum(length)[:-1]])
            keys = torch.rand(lanes, rows, generator=_generator(self.seed, epoch, 2, w))
            keys[torch.arange(rows)[None, :] >= torch.from_numpy(length)[:, None]] = 2.0  # padding sorts last
            self._window_cache[(epoch, w)] = (start, keys.argsort(dim=1).to(torch.int32).numpy())
        return self._window_cache[(epoch, w)]

    def concat_positions(self, epoch: int, offset: int, count: int) -> np.ndarray:
        """c of the stream positions [offset, offset + count) of one epoch."""
        _, _, windows = self._epoch(epoch)
        out, pos, end = [], offset, offset + count
        while pos < end:
            w = int(np.searchsorted(windows, pos, side="right")) - 1
            lo, hi = int(windows[w]), int(windows[w + 1])
            take = min(end, hi) - pos
            start, perm = self._lanes(epoch, w, hi - lo)
            rows, lanes = np.divmod(np.arange(pos - lo, pos - lo + take), len(start))
            out.append(lo + start[lanes] + perm[lanes, rows])
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
        lanes: int | None = None,
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
        # The windowed order's lanes: the optimizer step's global batch (data.global_batch_size), not
        # the micro-batch this position walks in, so the order does not depend on the accumulation split.
        self._lanes = int(lanes or global_batch_size)
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
            self._windowed = WindowedOrder(self._shard_sizes, self.shuffle_window, self.seed, self._lanes)
        return self._windowed

    def global_indices(self, start: int, count: int) -> torch.Tensor:
        """Sample indices of the stream positions [start, start + count), in stream order."""
        if self.shuffle_window > 0:
            return torch.from_numpy(self._windowed_samples(start, count))
        out, pos = [], start
        while count > 0:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count, self.num_samples - offset)
            out.append(self._perm(epoch)[offset : offset + take])
            pos, count = pos + take, count - take
        return torch.cat(out)

    def _windowed_samples(self, start: int, count: int) -> np.ndarray:
        order, samples, pos = self._order(), [], start
        while count > 0:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(count, self.num_samples - offset)
            samples.append(order.samples(epoch, order.concat_positions(epoch, offset, take)))
            pos, count = pos + take, count - take
        return np.concatenate(samples)

    def prefetch(self) -> None:
        """Reads the next step's batches ahead (data/stream.py); in memory there is nothing to read."""

    def rank_indices(self, batch_start: int) -> torch.Tensor:
        """This rank's sample indices of the global batch at stream position ``batch_start``."""
        return self.global_indices(batch_start + self.rank * self.local_batch_size, self.local_batch_size)

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
