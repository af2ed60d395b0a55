"""`diffmoe-train --config configs/local/diffmoe-tiny.yaml [section.field=value ...]`

Runs single-process, or under torchrun / srun / mpirun with one process per device.

Exit status: 0 finished (train.steps reached); 2 bad config, or a run directory that may not be
used as asked (another live owner, another run's checkpoints, every checkpoint corrupt, a refused
config change: one line naming the choices); 3 train.max_skipped_steps non-finite steps in a row,
or a save of non-finite weights refused (one line; not requeued: train/guard.py); 75 stopped
early by SIGTERM, SIGUSR1 or train.max_minutes after saving a checkpoint ("run me again": train.resume=auto continues);
anything else is a crash (resume from the last periodic checkpoint). A signal that arrives after
the run finished or stopped (during the final save or the teardown) does not change the status.
With DIFFMOE_EXIT_STATUS_FILE set (by launchers/local.sh and mpi.sh), a stopped rank appends
"RANK 75" there and exits 0 instead, and a finished rank appends "RANK 0".

`--validate-only [--world-size N]` checks the config and the files it names, prints train.run_dir
and exits 0, or prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from diffmoe_dist.config import ConfigError, load_config
from diffmoe_dist.config.environment import validate_cuda


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="diffmoe-train", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/local/diffmoe-tiny.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as optim.lr=3e-4 model.depth=6")
    p.add_argument(
        "--validate-only",
        action="store_true",
        help="check the config and the files it names (data, resume path), then exit 0 or 2; the launchers "
        "run this once before starting any rank",
    )
    p.add_argument(
        "--world-size", type=int, default=None, help="with --validate-only: the number of ranks the job will have"
    )
    p.add_argument(
        "--no-file-checks", action="store_true", help="with --validate-only: the values only (data may be made next)"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        # Every bad value is reported before any process group or model is built. A launcher that
        # ran --validate-only already checked the files once (DIFFMOE_FILES_CHECKED=1): its ranks
        # do not walk every shard's headers again.
        if args.validate_only:  # no torch import for the values: the launchers' check is quick
            cfg = load_config(args.config, args.overrides).validate(world_size=args.world_size or 1)
            validate_cuda(cfg.parallel.device)
            if not args.no_file_checks:
                from diffmoe_dist.data.check import check_files

                check_files(cfg)
            _check_owner(cfg.train.run_dir)  # a launcher refuses a second owner before starting any rank
            print(cfg.train.run_dir)
            return 0
        from diffmoe_dist.parallel.launch import read_launch_env

        env = read_launch_env(dict(os.environ))
        cfg = load_config(args.config, args.overrides).validate(world_size=env.world_size)
        validate_cuda(cfg.parallel.device)  # before any process group: no ZeroDivisionError under torchrun
        if os.environ.get("DIFFMOE_FILES_CHECKED") != "1":
            from diffmoe_dist.data.check import check_files

            check_files(cfg, env.rank, env.world_size)  # rank r reads the headers of shards r, r + W, ...
        _check_sizes(cfg, env.world_size)  # before the lock, the process group and the model
    except ConfigError as exc:
        print(f"diffmoe-train: error: {exc}", file=sys.stderr)
        return 2
    from diffmoe_dist.train.preemption import SignalGuard

    # Signals only set the stop flag from here until the process has left (train/preemption.py).
    with SignalGuard():
        return _train(cfg, env)


def _check_owner(run_dir: str) -> None:
    """Another live owner of ``run_dir`` (train/run_dir.py) as a ConfigError; torch is imported only
    when there is a lock to judge."""
    if not os.path.exists(os.path.join(run_dir, "owner.lock")):
        return
    from diffmoe_dist.checkpoint.ownership import RunDirError, RunLock

    try:
        RunLock(run_dir).check()
    except RunDirError as exc:
        raise ConfigError(str(exc)) from None


def _check_sizes(cfg, world_size: int) -> None:
    import torch

    from diffmoe_dist.train.sizes import check_sizes, local_world_size

    on_host = cfg.parallel.device == "cpu" or (cfg.parallel.device == "auto" and not torch.cuda.is_available())
    check_sizes(cfg, world_size, local_world_size(), on_host)


def _train(cfg, env) -> int:
    # A batch log (a SLURM .out file) is block-buffered: every line of the run as it happens.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    from diffmoe_dist.train.progress import Phase, say

    startup = Phase(say if env.rank == 0 else lambda _: None, f"start-up ({env.world_size} ranks)")

    from diffmoe_dist.checkpoint import CheckpointError
    from diffmoe_dist.checkpoint.ownership import RunDirError, RunLock
    from diffmoe_dist.data.tar_index import ShardError
    from diffmoe_dist.parallel.launch import rank_device
    from diffmoe_dist.train.guard import EXIT_NON_FINITE, NonFiniteError
    from diffmoe_dist.train.trainer import Trainer

    try:
        device = rank_device(cfg.parallel.device, env)  # the one place a rank's device is chosen
    except ConfigError as exc:
        print(f"diffmoe-train: error: {exc}", file=sys.stderr)
        return 2
    try:  # another live owner (a pending requeued job, a second launch): one line before anything is built
        RunLock(cfg.train.run_dir).check()
    except RunDirError as exc:
        if env.rank == 0:
            print(f"diffmoe-train: error: {exc}", file=sys.stderr)
        return 2
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
                force_distributed=cfg.parallel.force_distributed,
                gloo_groups=os.environ.get("DIFFMOE_GLOO_GROUPS") == "1",
            )
        except ConfigError as exc:  # e.g. an EP group spread over nodes: every rank says it, exit 2
            print(f"diffmoe-train: error: {exc}", file=sys.stderr)
            return 2
    try:
        trainer = Trainer(cfg, dims, device, env.local_world_size)
        startup.end("process group, model, parallelism, optimizer, data loader")
        result = trainer.fit()
    except (RunDirError, CheckpointError, NonFiniteError, ShardError) as exc:  # ShardError: a shard went bad mid-run
        if env.rank == 0:  # every rank raised the same error; one line is enough
            print(f"diffmoe-train: error: {exc}", file=sys.stderr)
        if dims is not None:
            from diffmoe_dist.parallel.launch import destroy_distributed

            destroy_distributed()
        return 2 if isinstance(exc, RunDirError) else EXIT_NON_FINITE if isinstance(exc, NonFiniteError) else 1
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
    from diffmoe_dist.train.preemption import EXIT_REQUEUE

    # "RANK 0" (finished) or "RANK 75" (stopped) for the launcher, which keeps that status whatever
    # torchrun / mpirun make of a signal arriving in their teardown (launchers/common.sh)
    status = _requeue_status(env.rank, EXIT_REQUEUE if result.get("stopped") else 0)
    if dims is not None:
        from diffmoe_dist.parallel.launch import destroy_distributed, exit_process

        destroy_distributed(barrier=True)
        exit_process(status)  # no interpreter finalization with gloo threads still running
    return status


def _requeue_status(rank: int, status: int) -> int:
    """torchrun and mpirun turn a rank's exit 75 into 1 (and kill its peers in their teardown): under
    a launcher that names DIFFMOE_EXIT_STATUS_FILE, each rank appends its rank there and exits 0;
    the launcher exits 75 when every rank did (launchers/common.sh, diffmoe_run_keeping_status)."""
    path = os.environ.get("DIFFMOE_EXIT_STATUS_FILE")
    if not path:
        return status
    with open(path, "a") as f:  # one short line per rank: O_APPEND writes do not interleave
        f.write(f"{rank} {status}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
