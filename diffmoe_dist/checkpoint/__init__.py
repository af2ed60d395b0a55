"""Checkpoints in which every rank writes only its own share, read back at any topology.

- `layout`: what a checkpoint holds (flat ranges of global tensors) and which rank writes which range;
- `io`: the atomic, verified save, and verification;
- `async_save`: the same save written beside training (the step waits for a host copy only);
- `retention`: clean-up beside a save, and deleting only this run's older checkpoints;
- `discovery`: the newest verified checkpoint of a run, or the one a path names;
- `resume`: reading ranges into the current layout (resharding), or whole into one process;
- `load_once`: the same at resume, each byte read once per job (replicas exchange their ranges);
- `ownership`: who owns a run directory (the owner lock) and what its run did (the history).

Its users import the package (``from diffmoe_dist import checkpoint as ckpt``) and call the names below.
"""

from diffmoe_dist.checkpoint.async_save import AsyncSaver
from diffmoe_dist.checkpoint.discovery import find_resumable, resolve_checkpoint
from diffmoe_dist.checkpoint.io import save, verify, verify_distributed
from diffmoe_dist.checkpoint.layout import (
    FORMAT,
    MANIFEST,
    META,
    MIN_PIECE,
    CheckpointError,
    Slot,
    module_slots,
    optimizer_slots,
    owned_ranges,
    rank_file,
    step_dir,
)
from diffmoe_dist.checkpoint.load_once import load_slots_once
from diffmoe_dist.checkpoint.resume import (
    ShardReader,
    check_keys,
    load_file,
    load_full_state_dict,
    load_model_state,
    load_slots,
    read_meta,
)

__all__ = [
    "AsyncSaver",
    "FORMAT",
    "MANIFEST",
    "META",
    "MIN_PIECE",
    "CheckpointError",
    "ShardReader",
    "Slot",
    "check_keys",
    "find_resumable",
    "load_file",
    "load_full_state_dict",
    "load_model_state",
    "load_slots",
    "load_slots_once",
    "module_slots",
    "optimizer_slots",
    "owned_ranges",
    "rank_file",
    "read_meta",
    "resolve_checkpoint",
    "save",
    "step_dir",
    "verify",
    "verify_distributed",
]
