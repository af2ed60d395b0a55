"""`diffmoe-train --config configs/local/diffmoe-tiny.yaml [section.field=value ...]`

Runs single-process, or under torchrun / srun / mpirun with one process per device.

Exit status: 0 finished (train.steps reached); 2 bad config, or a run directory that may not be
used as asked (another live owner, another run's checkpoints, every checkpoint corrupt, a refused
config change: one line naming the choices); 75 stopped early by SIGTERM, SIGUSR1 or
train.max_minutes after saving a checkpoint ("run me again": train.resume=auto continues);
anything else is a crash (resume from the last periodic checkpoint). A signal that arrives after
the run finished or stopped (during the final save or the teardown) does not change the status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffmoe_dist.config import ConfigError, load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffmoe-train", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/local/diffmoe-tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 model.depth=6")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from diffmoe_dist.parallel.launch import read_launch_env

    env = read_launch_env(dict(os.environ))
    try:
        # Every bad value is reported before any process group or model is built.
        cfg = load_config(args.config, args.overrides).validate(world_size=env.world_size)
    except ConfigError as exc:
        print(f"diffmoe-train: error: {exc}", file=sys.stderr)
        return 2
    from diffmoe_dist.data.stream import ShardError, check_shards

    try:  # a missing or damaged shard, before any process group: each rank reads 1/W of the headers
        check_shards(cfg.data.path, env.rank, env.world_size)
    except ShardError as exc:
        print(f"diffmoe-train: error: data.path: {exc}", file=sys.stderr)
        return 2
    from diffmoe_dist.train.preemption import SignalGuard

    # Signals only set the stop flag from here until the process has left (train/preemption.py).
    with SignalGuard():
        return _train(cfg, env)


def _train(cfg, env) -> int:
    import torch

    from diffmoe_dist.train.checkpoint import CheckpointError
    from diffmoe_dist.train.ownership import RunDirError
    from diffmoe_dist.train.trainer import Trainer

    device = torch.device(
        "cuda"
        if cfg.parallel.device == "cuda" or (cfg.parallel.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    dims = None
    distributed = env.world_size > 1 or cfg.parallel.force_distributed
    if distributed:
        from diffmoe_dist.parallel.launch import init_distributed

        try:
            dims = init_distributed(
                env,
                cfg.parallel.expert_parallel_size,
                device,
                num_experts=cfg.moe.num_experts,
                backend=cfg.parallel.backend,
                # Groups come from megatron-core's initialize_model_parallel (Megatron layout, the contract
                # of this project); DIFFMOE_NO_MEGATRON=1 builds the same rank sets without its ~4 CPU-s import.
                use_megatron=os.environ.get("DIFFMOE_NO_MEGATRON") != "1",
                timeout_minutes=cfg.parallel.timeout_minutes,
                force_collectives=cfg.parallel.force_distributed,
                gloo_groups=os.environ.get("DIFFMOE_GLOO_GROUPS") == "1",
            )
        except ConfigError as exc:  # e.g. an EP group spread over nodes: every rank says it, exit 2
            print(f"diffmoe-train: error: {exc}", file=sys.stderr)
            return 2
    if device.type == "cuda":
        torch.cuda.set_device(env.local_rank)
    try:
        result = Trainer(cfg, dims, device, env.local_world_size).fit()
    except (RunDirError, CheckpointError) as exc:
        if env.rank == 0:  # every rank raised the same error; one line is enough
            print(f"diffmoe-train: error: {exc}", file=sys.stderr)
        if dims is not None:
            from diffmoe_dist.parallel.launch import destroy_distributed

            destroy_distributed()
        return 2 if isinstance(exc, RunDirError) else 1
    if env.rank == 0:
        print(
            json.dumps(
                {
                    "run_dir": cfg.train.run_dir,
                    "step": result["step"],
                    "seconds": round(result["seconds"], 1),
                    "loss": result["final"].get("loss"),
                    "stopped": result.get("stopped"),
                }
            )
        )
    if distributed:
        from diffmoe_dist.parallel.launch import destroy_distributed

        destroy_distributed()
    if result.get("stopped"):
        from diffmoe_dist.train.preemption import EXIT_REQUEUE

        return EXIT_REQUEUE
    return 0


if __name__ == "__main__":
    sys.exit(main())
