"""What DeepSpeed's engine needs from us, through its private API (pinned in requirements.txt):
a marker that turns on its MoE paths, the module it wraps, its expert groups checked against
ours, and its logging and JIT build quieted. Used by `engine.ZeroEngine`; every function imports
DeepSpeed itself (seconds), so importing this module costs nothing."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging

import torch
import torch.nn as nn

from diffmoe_dist.parallel.groups import ParallelDims, expert_data_parallel_ranks, expert_parallel_ranks


@functools.cache
def _moe_marker_class():
    """A placeholder whose only job is to be an instance of `deepspeed.moe.layer.MoE`: the engine
    enables its MoE paths (expert groups in ZeRO, ``has_moe_layers``) only when it finds one, and
    ZeRO-2's backward fails in ``average_tensor`` without them (docs/design.md section 4). No
    parameters, never called. Built lazily: importing DeepSpeed takes seconds."""
    from deepspeed.moe.layer import MoE

    class DeepSpeedMoEMarker(MoE):
        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)  # MoE.__init__ would build experts and a gate
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # groups are created (and checked) before deepspeed.initialize

        def forward(self, *args, **kwargs):
            raise RuntimeError("DeepSpeedMoEMarker is a marker for the DeepSpeed engine; it computes nothing")

    return DeepSpeedMoEMarker


class EngineModule(nn.Module):
    """What DeepSpeed wraps: the DiT plus the MoE marker. Parameters are the DiT's, named ``dit.*``."""

    def __init__(self, dit: nn.Module, num_experts: int, ep_size: int):
        super().__init__()
        self.dit = dit
        self.moe_marker = _moe_marker_class()(num_experts, ep_size)

    def forward(self, *args, **kwargs):
        return self.dit(*args, **kwargs)


def engine_args(device: torch.device) -> argparse.Namespace | None:
    """``deepspeed.initialize(args=...)`` that keeps DeepSpeed on this rank's device (`launch.rank_device`).
    Without it the engine calls ``set_device(int(LOCAL_RANK))``: under one-GPU-per-task binding
    (``srun --gpus-per-task=1``, one GPU per container) local rank 3 sees one GPU, as cuda:0, and
    that call fails with "invalid device ordinal". Its ``device_rank`` argument wins over LOCAL_RANK.
    On the CPU there is nothing to choose."""
    return argparse.Namespace(device_rank=device.index) if device.type == "cuda" else None


def quiet_deepspeed() -> None:
    """DeepSpeed at warning level, and without the shared-memory op it would JIT-build."""
    import deepspeed

    # not `import deepspeed.comm.torch as m`: the package's `torch` attribute is the torch module
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    deepspeed.utils.logger.setLevel(logging.WARNING)
    # DeepSpeed's torch backend JIT-builds its shared-memory all-reduce (~40 s, and a C++ toolchain)
    # the first time it wraps a process group, even one we created; gloo does every collective here.
    ds_torch_comm.build_shm_op = lambda: None


def create_deepspeed_expert_groups(dims: ParallelDims) -> str:
    """DeepSpeed's EP / EDP groups (``ep_size_P``), checked to be the same rank sets as ours
    (and so megatron-core's). A collective: every rank calls it. Returns the group name."""
    from deepspeed.utils import groups

    name = f"ep_size_{dims.ep_size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(dims.ep_size)
    ep = tuple(groups._get_expert_parallel_group_ranks(name))
    edp = tuple(groups._get_expert_data_parallel_group_ranks(name))
    expect_ep = next(r for r in expert_parallel_ranks(dims.world_size, dims.ep_size) if dims.rank in r)
    expect_edp = next(r for r in expert_data_parallel_ranks(dims.world_size, dims.ep_size) if dims.rank in r)
    if ep != tuple(expect_ep) or edp != tuple(expect_edp) or ep != dims.ep_ranks or edp != dims.edp_ranks:
        raise RuntimeError(
            f"rank {dims.rank}: DeepSpeed's expert groups EP {list(ep)} / EDP {list(edp)} differ from ours "
            f"EP {list(dims.ep_ranks)} / EDP {list(dims.edp_ranks)}: expert gradients would be reduced over "
            "the wrong ranks"
        )
    return name
