"""Parallelism applied from outside the model: launch env, process groups, distributed token pools,
expert-parallel dispatch, gradient reduction, activation checkpointing, and `parallelize` that ties
them to a built model and its EMA."""

from diffmoe_dist.parallel.activation_checkpoint import checkpoint_blocks
from diffmoe_dist.parallel.all_to_all import AllToAllDispatcher
from diffmoe_dist.parallel.grads import (
    clip_grad_norm_,
    grad_norm,
    is_expert_param,
    reduce_gradients,
    split_params,
)
from diffmoe_dist.parallel.groups import (
    ParallelDims,
    ParallelSetupError,
    build_parallel_dims,
    expert_data_parallel_ranks,
    expert_parallel_ranks,
    megatron_parallel_dims,
    validate_parallel,
)
from diffmoe_dist.parallel.launch import LaunchEnv, destroy_distributed, init_distributed, read_launch_env
from diffmoe_dist.parallel.parallelize import broadcast_replicas, make_pool, parallelize, tag_expert_params
from diffmoe_dist.parallel.pools import DistributedPool, ReplicatedLocalPool

__all__ = [
    "AllToAllDispatcher",
    "DistributedPool",
    "LaunchEnv",
    "ParallelDims",
    "ParallelSetupError",
    "ReplicatedLocalPool",
    "broadcast_replicas",
    "build_parallel_dims",
    "checkpoint_blocks",
    "clip_grad_norm_",
    "destroy_distributed",
    "expert_data_parallel_ranks",
    "expert_parallel_ranks",
    "grad_norm",
    "init_distributed",
    "is_expert_param",
    "make_pool",
    "megatron_parallel_dims",
    "parallelize",
    "read_launch_env",
    "reduce_gradients",
    "split_params",
    "tag_expert_params",
    "validate_parallel",
]
