"""The per-shard tar index: where each sample's fields lie in its shard, written beside the shard.

tools/make_shards.py (through data/shards.py) writes it once with the shard; the streaming loader
(data/stream.py) reads it on every shard open, a small .npy instead of a scan of the tar headers.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: `--validate-only`'s restart path runs without numpy
    import numpy as np

REMAKE = "re-make the shard set with tools/make_shards.py"


class ShardError(ValueError):
    """A one-line message naming the shard (or manifest) and the fix."""


def index_path(shard: str | os.PathLike) -> Path:
    return Path(shard).with_suffix(".idx.npy")


def _member_key_field(name: str) -> tuple[str, str]:
    # webdataset's grouping rule: the key ends at the first "." after the last "/".
    folder, _, base = name.rpartition("/")
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field.lower()


def tar_index(fileobj, fields: list[str], name: str) -> np.ndarray:
    """(samples, fields, 2) int64: byte offset and size of each sample's fields (in `fields` order),
    samples in tar order. tarfile reads the headers only and seeks over the data."""
    import numpy as np

    column = {f: j for j, f in enumerate(fields)}
    rows: list[np.ndarray] = []
    key = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                member_key, field = _member_key_field(member.name)
                if field not in column:
                    raise ShardError(
                        f"shard {name}: member {member.name} is not one of the manifest's keys {fields}; {REMAKE}"
                    )
                if member_key != key:
                    rows.append(np.full((len(fields), 2), -1, np.int64))
                    key = member_key
                rows[-1][column[field]] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ShardError(f"shard {name} is corrupt ({type(exc).__name__}: {exc}); {REMAKE}") from None
    index = np.stack(rows) if rows else np.zeros((0, len(fields), 2), np.int64)
    if (index[..., 0] < 0).any():
        raise ShardError(f"shard {name}: a sample lacks some of the fields {fields}; {REMAKE}")
    return index
