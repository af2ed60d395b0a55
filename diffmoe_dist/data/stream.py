"""The streaming loader: the indexed loader's global batches, read from tar shards on demand.

Same order as `GlobalBatchLoader` (data/loader.py): global batch s is the slice [s G, (s+1) G) of
the concatenated seeded epoch permutations, and rank r reads only the r-th contiguous part of it.
Global sample i is the i-th sample in manifest (shard, then tar) order, which is key order for every
shard set that tools/make_shards.py writes (the manifest records "sorted_keys"), so on such data the
two loaders yield the same tensors. The state is the global sample position: a resume is exact at
any world size and EP size, and every rank gets exactly G / W samples in every step, epoch
boundaries included (a batch that crosses one takes the end of epoch e and the start of e + 1).

Memory per rank: DataLoader workers x prefetch_factor batches of G / W samples in flight, plus per
worker an LRU of `cache_shards` open shards (a file descriptor and the shard's (samples, fields, 2)
int64 offset index), plus the current epoch's permutation as int32 (4 bytes per sample, in the
main process only; the batch sampler runs there). Nothing else grows with the data: per shard the
rank keeps its name and one cumulative count.

Why not webdataset's indexed `wids` (a separate package from webdataset 1.0.2, `wids` 0.1.11):
its ShardListDataset opens every shard through its download cache, which copies the shard into a
local cache directory or, pointed at the shard itself, creates and deletes a lock file beside it
(a writable data directory, and file creates on the shared file system for every shard open);
every open scans all tar headers through an mmap; and its samplers (ShardListSampler,
ChunkedSampler, DistributedChunkedSampler) shuffle shard-locally with per-rank ranges that depend
on the world size and may differ in length. A global permutation opens a shard for almost every
sample (hit rate ~ cache size / number of shards), so the open must cost one small .npy read. We
therefore keep wids' idea (a per-shard index, map-style access, a small LRU of open shards) and let
the standard library's tarfile build the offsets (`tar_index`), once, when the shards are written.
"""

from __future__ import annotations

import atexit
import io
import os
import weakref
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np
import torch

from diffmoe_dist.data.manifest import MANIFEST, check_shards, read_manifest
from diffmoe_dist.data.position import GlobalPosition
from diffmoe_dist.data.tar_index import REMAKE, ShardError, index_path, tar_index

__all__ = ["ShardError", "ShardSamples", "StreamBatchLoader", "check_shards"]


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool, int]] = {}


def _npy(data: memoryview) -> torch.Tensor:
    """A .npy member as a tensor over ``data`` itself: np.load copied the bytes once more and parsed
    the header (ast.literal_eval) for every sample, 2/3 of a ~1 MB sample's CPU time. Each distinct
    header (one per field of a shard set) is parsed once, by numpy's own reader, and cached."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not a .npy array (bad magic string)")
    width = 2 if data[6] == 1 else 4  # format 1.0: 2-byte header length, 2.0 / 3.0: 4 bytes
    start = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    key = bytes(data[:start])
    if key not in _NPY_HEADERS:
        f = io.BytesIO(key)
        read = np.lib.format.read_array_header_1_0 if np.lib.format.read_magic(f) == (1, 0) else None
        shape, fortran, dtype = (read or np.lib.format.read_array_header_2_0)(f)
        if dtype.hasobject:
            raise ValueError("object arrays are refused (allow_pickle=False)")
        _NPY_HEADERS[key] = (dtype, shape, fortran, int(np.prod(shape, dtype=np.int64)))
    dtype, shape, fortran, count = _NPY_HEADERS[key]
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"{len(data) - start} data bytes for shape {shape} of {dtype}")
    array = np.frombuffer(data, dtype, count, offset=start)
    return torch.from_numpy(array.reshape(shape[::-1]).T if fortran else array.reshape(shape))


def _decode_field(field: str, data: memoryview, bf16: bool):
    if field.endswith(".npy"):
        array = _npy(data)
        return array.view(torch.bfloat16) if bf16 else array
    data = bytes(data)
    if field == "cls":
        return torch.tensor(int(data), dtype=torch.long)
    if field.endswith(".txt"):
        return data.decode("utf-8")
    return data


class ShardSamples(torch.utils.data.Dataset):
    """Map-style: sample i (manifest order) -> {name: decoded field} for `fields` {name: tar field}."""

    def __init__(self, shard_dir: str | os.PathLike, fields: dict[str, str], cache_shards: int = 8):
        self.dir = Path(shard_dir)
        manifest = read_manifest(self.dir, check_files=False)  # a missing shard is named when opened
        self.names = [s["name"] for s in manifest["shards"]]
        self.ends = np.cumsum([s["num_samples"] for s in manifest["shards"]]).astype(np.int64)
        self.column = {f: j for j, f in enumerate(manifest["keys"])}
        missing = [f for f in fields.values() if f not in self.column]
        if missing:
            raise ShardError(
                f"{self.dir / MANIFEST}: the shards have no field {missing[0]!r} (they hold {manifest['keys']}): "
                "make them with a tools/make_shards.py subcommand that writes it (text-to-image: digits-t2i, images)"
            )
        self.keys = list(manifest["keys"])
        self.bf16 = {f for f, d in manifest.get("dtypes", {}).items() if d == "bfloat16"}
        self.fields = dict(fields)
        self.sorted_keys = manifest.get("sorted_keys")
        self.cache_shards = cache_shards
        self._open: OrderedDict[int, tuple[int, np.ndarray]] = OrderedDict()
        self.opens = 0  # shard opens in this process (benchmarks/loader.py: opens per sample)

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _shard(self, n: int) -> tuple[int, np.ndarray]:
        if n in self._open:
            self._open.move_to_end(n)
            return self._open[n]
        path = self.dir / self.names[n]
        self.opens += 1
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise ShardError(f"shard {path} cannot be opened ({exc.strerror}); {REMAKE}") from None
        idx = index_path(path)
        if idx.is_file():
            index = np.load(idx, allow_pickle=False)
        else:  # shards written without an index: scan the headers once per open
            with os.fdopen(os.dup(fd), "rb") as f:
                index = tar_index(f, self.keys, str(path))
        count = int(self.ends[n] - (self.ends[n - 1] if n else 0))
        if len(index) != count:
            os.close(fd)
            raise ShardError(f"shard {path} holds {len(index)} samples, the manifest lists {count}; {REMAKE}")
        self._open[n] = (fd, index)
        if len(self._open) > self.cache_shards:
            os.close(self._open.popitem(last=False)[1][0])
        return fd, index

    def __getitem__(self, i: int) -> dict:
        n = int(np.searchsorted(self.ends, i, side="right"))
        inner = int(i - (self.ends[n - 1] if n else 0))
        fd, index = self._shard(n)
        out = {}
        for name, field in self.fields.items():
            offset, size = (int(v) for v in index[inner, self.column[field]])
            data = memoryview(np.empty(size, np.uint8))  # not zeroed; the decoded tensor shares it
            try:
                got = os.preadv(fd, [data], offset)
            except OSError as exc:  # EIO from a failing disk or file server
                raise ShardError(
                    f"shard {self.dir / self.names[n]} cannot be read ({exc.strerror}); {REMAKE}"
                ) from None
            if got != size:
                raise ShardError(f"shard {self.dir / self.names[n]} is truncated at sample {inner}; {REMAKE}")
            try:
                out[name] = _decode_field(field, data, field in self.bf16)
            except ValueError as exc:
                raise ShardError(
                    f"shard {self.dir / self.names[n]}: sample {inner} {field} is corrupt ({exc}); {REMAKE}"
                ) from None
        return out

    def close(self) -> None:
        while self._open:
            os.close(self._open.popitem()[1][0])

    def __getstate__(self):  # never hand open descriptors to another process
        return {**self.__dict__, "_open": OrderedDict()}


class _Collate:
    """Casts per sample, then torch's default_collate, which in a worker stacks straight into the
    shared memory the batch travels in: the rank's main process allocates nothing per batch."""

    def __init__(self, float_fields: tuple[str, ...], bool_fields: tuple[str, ...]):
        self.float_fields, self.bool_fields = float_fields, bool_fields

    def __call__(self, samples: list[dict]) -> dict:
        for s in samples:
            for k in self.float_fields:
                s[k] = s[k].float()
            for k in self.bool_fields:
                s[k] = s[k].bool()
        return torch.utils.data.default_collate(samples)


def _close_at_exit(ref: weakref.ref) -> None:
    loader = ref()
    if loader is not None:
        loader.close()
    # Workers of an iterator that outlived its loader's weakref (a dropped Trainer whose reference
    # cycle gc has not collected) ignore the SIGTERM multiprocessing's exit hook sends before it
    # joins them forever. That hook terminates every daemonic child anyway (DataLoader workers are
    # daemonic; a started Process no longer knows its target): do it with SIGKILL, which they cannot
    # ignore. Workers only read shards.
    import multiprocessing

    for proc in multiprocessing.active_children():
        if proc.daemon:
            proc.kill()
            proc.join(5)


def _ignore_stop_signals(worker_id: int) -> None:
    """SIGTERM / SIGUSR1 (preemption, Slurm's time-limit warning) reach every process of the job
    step, workers included: a worker that died of one would fail the rank's next batch before the
    trainer stops at the step boundary and saves (train/preemption.py). The rank shuts its workers
    down itself (`close`, also at exit), and SIGKILL still ends them."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _one_line(exc: Exception) -> str:
    """A ShardError's line, also out of DataLoader's re-raise ("Caught ShardError in DataLoader worker
    process 0. Original Traceback ... ShardError: shard ... is truncated ...")."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    if len(lines) > 1 and ": " in last:
        last = last.split(": ", 1)[1]
    return last if isinstance(exc, ShardError) else f"reading the shards failed: {type(exc).__name__}: {last}"


class _RankBatches:
    """The batch sampler (runs in the rank's main process): this rank's indices of global batches
    start, start + G, ... forever."""

    def __init__(self, position: GlobalPosition, start: int):
        self.position, self.start = position, start

    def __iter__(self):
        p, pos = self.position, self.start
        while True:
            yield p.rank_indices(pos).tolist()
            pos += p.global_batch_size


class StreamBatchLoader(GlobalPosition):
    """`GlobalBatchLoader`'s interface (next_batch, epoch, state_dict, load_state_dict) over shards
    read by DataLoader worker processes. Fields keep the shards' dtype (bf16 caption features: half
    the bytes through shared memory and pinning; the trainer casts on the device, data/loader.py
    `to_device`); `float_fields` are cast to float32 in the workers instead (benchmarks/loader.py
    compares), `bool_fields` to bool."""

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        fields: dict[str, str],
        global_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        num_workers: int = 0,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        float_fields: tuple[str, ...] = (),
        bool_fields: tuple[str, ...] = (),
        cache_shards: int = 0,
        shuffle_window: int = 0,
        batches_per_step: int = 1,
        lanes: int | None = None,
    ):
        if cache_shards <= 0:  # the windowed order reads ~W_s / W shards per rank and window (data/position.py)
            cache_shards = max(8, -(-shuffle_window // world_size) + 4)
        self.dataset = ShardSamples(shard_dir, fields, cache_shards)
        sizes = np.diff(self.dataset.ends, prepend=0)
        super().__init__(
            len(self.dataset), global_batch_size, rank, world_size, seed, torch.int32, sizes, shuffle_window, lanes
        )
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.float_fields, self.bool_fields = float_fields, bool_fields
        self.batches_per_step = batches_per_step
        self._batches = None
        self._ahead: deque = deque()

    def _start(self) -> None:
        # Before multiprocessing's own exit hook (registered earlier, so run later), which would
        # SIGTERM the workers, which ignore it, and join them forever.
        atexit.register(_close_at_exit, weakref.ref(self))
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_sampler=_RankBatches(self, self.samples_seen),
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor if self.num_workers else None,
            pin_memory=self.pin_memory,
            collate_fn=_Collate(self.float_fields, self.bool_fields),
            worker_init_fn=_ignore_stop_signals,
            # Its own generator: creating an iterator draws a worker base seed, which from the global
            # RNG would shift the training noise and label dropout (runs would differ by loader).
            generator=torch.Generator().manual_seed(self.seed),
        )
        self._batches = iter(loader)

    def prefetch(self) -> None:
        """Takes the next step's batches (eagerly, or from the workers) unless they are here: a shard
        that cannot be read becomes `self.error` (one line naming it) instead of an exception. The
        trainer calls it before the first step and shares the error with every rank (the stop
        agreement), as it does after every step, so all stop and save instead of one rank raising
        while the others wait in a collective."""
        if self._batches is None:
            self._start()
        if self._ahead or self.error is not None:
            return
        try:
            self._ahead.extend(next(self._batches) for _ in range(self.batches_per_step))
        except Exception as exc:  # noqa: BLE001 - a worker's error comes back re-raised, its traceback in the text
            self._ahead.clear()
            self.error = _one_line(exc)

    def next_batch(self) -> dict:
        """The next micro-batch. The last one of a step also prefetches the next step's batches. A
        caller that did not agree on `self.error` first gets it raised as ShardError."""
        self.prefetch()
        if not self._ahead:
            raise ShardError(self.error)
        batch = self._ahead.popleft()
        self.samples_seen += self.global_batch_size
        if not self._ahead:
            self.prefetch()
        return batch

    def first_sample(self) -> dict:
        return self.dataset[0]

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.close()  # the prefetched batches belong to the old position
        self._ahead.clear()
        self.error = None

    def close(self) -> None:
        batches, self._batches = getattr(self, "_batches", None), None
        shutdown = getattr(batches, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()
