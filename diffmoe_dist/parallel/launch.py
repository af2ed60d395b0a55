"""Where this process sits in the job, read from whichever launcher started it, and the process groups.

`read_launch_env()` understands, in this order of precedence:
- torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
- SLURM, but only inside an ``srun`` step with more than one task (``SLURM_PROCID``,
  ``SLURM_NTASKS``, ``SLURM_LOCALID``, ``SLURM_NODEID``). A batch shell also carries
  ``SLURM_NTASKS`` but is one process, and ``mpirun`` inside an allocation launches one SLURM task
  per node, so a disagreeing MPI world size wins. The master is the first host of the job's node
  list and the port is derived from the job id, so every task agrees without talking;
- MPI (Open MPI's ``OMPI_COMM_WORLD_*`` or MPICH/Hydra's ``PMI_*``): when ``MASTER_ADDR`` is not
  set, rank 0's host name and a free port are broadcast through mpi4py;
- otherwise a single process.

The parsing functions are pure functions of an environment dict (tests feed them dicts);
`init_distributed` then validates the layout and starts the groups.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from diffmoe_dist.parallel.groups import (
    ParallelDims,
    ParallelSetupError,
    build_parallel_dims,
    megatron_parallel_dims,
    validate_parallel,
)

LAUNCHERS = ("torchrun", "slurm", "mpi", "single")
# port = base + job id % span: distinct jobs rarely share a port, and every port stays below Linux's
# ephemeral range (net.ipv4.ip_local_port_range starts at 32768), where an outgoing connection of any
# process may already hold it.
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 17000
EPHEMERAL_PORT_START = 32768
DEFAULT_TIMEOUT_MINUTES = 10.0  # parallel.timeout_minutes: a hang at 256 GPUs costs 256 GPU-minutes a minute


def slurm_master_port(job_id: int) -> int:
    """The rendezvous port every task of a Slurm job derives from its job id without talking."""
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    node_id: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | mpi | single
    local_world_size: int = 1  # processes on this node (threads per process = cores / this)


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for name in names:
        if env.get(name, "") != "":
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"{name}={env[name]!r} is invalid: the launcher must set an integer") from None
    return default


def detect_launcher(env: Mapping[str, str]) -> str:
    if "RANK" in env and "WORLD_SIZE" in env:
        return "torchrun"
    mpi_size = _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
    slurm_tasks = _int(env, "SLURM_NTASKS", default=1)
    in_srun_step = "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
    if in_srun_step and slurm_tasks > 1 and mpi_size in (None, slurm_tasks):
        return "slurm"
    if mpi_size is not None:
        return "mpi"
    return "single"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[003-010,012],cpu1`` -> ``gpu003``.

    The fallback when ``scontrol show hostnames`` is unavailable; handles the compressed forms
    SLURM prints (one bracket group per name, zero-padded ranges).
    """
    first = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if first is None:
        raise ValueError(f"SLURM_JOB_NODELIST={nodelist!r} is invalid: expected e.g. node[01-04]")
    prefix, bracket = first.group(1), first.group(3)
    if bracket is None:
        return prefix
    return prefix + bracket.split(",")[0].split("-")[0]


def slurm_master_addr(nodelist: str, run: Callable[[list[str]], str] | None = None) -> str:
    """``scontrol show hostnames $SLURM_JOB_NODELIST | head -1``, parsed by hand without scontrol."""
    if run is None and shutil.which("scontrol"):

        def run(cmd: list[str]) -> str:
            return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout

    if run is not None:
        hosts = run(["scontrol", "show", "hostnames", nodelist]).split()
        if hosts:
            return hosts[0]
    return first_slurm_host(nodelist)


def _slurm_local_world_size(env: Mapping[str, str]) -> int:
    per_node = _int(env, "SLURM_NTASKS_PER_NODE")
    if per_node is not None:
        return per_node
    # SLURM_TASKS_PER_NODE looks like "4(x2),3": the first entry is this job's typical node.
    match = re.match(r"(\d+)", env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")))
    return int(match.group(1)) if match else 1


def read_launch_env(
    env: Mapping[str, str] | None = None,
    *,
    run: Callable[[list[str]], str] | None = None,
    mpi_bcast: Callable[[Any], Any] | None = None,
) -> LaunchEnv:
    """Parses the launcher's variables. ``run`` replaces ``scontrol`` and ``mpi_bcast`` replaces
    ``mpi4py``'s ``COMM_WORLD.bcast(obj, root=0)`` (tests pass fakes)."""
    env = os.environ if env is None else env
    launcher = detect_launcher(env)
    if launcher == "torchrun":
        rank, world_size = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", default=0)
        local_world_size = _int(env, "LOCAL_WORLD_SIZE", default=1)
        node_id = _int(env, "GROUP_RANK", default=rank // max(local_world_size, 1))
        addr, port = env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", default=29500)
    elif launcher == "slurm":
        rank, world_size = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local_rank, node_id = _int(env, "SLURM_LOCALID", default=0), _int(env, "SLURM_NODEID", default=0)
        local_world_size = _slurm_local_world_size(env)
        job_id = _int(env, "SLURM_JOB_ID", "SLURM_JOBID", default=0)
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        addr = env.get("MASTER_ADDR") or (slurm_master_addr(nodelist, run) if nodelist else "127.0.0.1")
        port = _int(env, "MASTER_PORT", default=slurm_master_port(job_id))
    elif launcher == "mpi":
        rank, world_size = (
            _int(env, "OMPI_COMM_WORLD_RANK", "PMI_RANK"),
            _int(env, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"),
        )
        local_rank = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", default=0)
        local_world_size = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMI_LOCAL_SIZE", default=1)
        node_id = rank // max(local_world_size, 1)  # MPI exposes no node id; assumes by-slot mapping
        if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
            addr, port = env["MASTER_ADDR"], _int(env, "MASTER_PORT")
        else:
            addr, port = _mpi_master(rank, mpi_bcast)
    else:
        rank, world_size, local_rank, node_id, local_world_size = 0, 1, 0, 0, 1
        addr, port = "127.0.0.1", _int(env, "MASTER_PORT", default=0)  # 0: a free port at init
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid for world_size={world_size} ({launcher}): check the launcher")
    return LaunchEnv(rank, world_size, local_rank, node_id, addr, port, launcher, local_world_size)


def _mpi_master(rank: int, mpi_bcast: Callable[[Any], Any] | None) -> tuple[str, int]:
    if mpi_bcast is None:
        from mpi4py import MPI

        def mpi_bcast(obj: Any) -> Any:
            return MPI.COMM_WORLD.bcast(obj, root=0)

    mine = (socket.gethostname(), free_port()) if rank == 0 else None
    addr, port = mpi_bcast(mine)
    return addr, int(port)


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on every interface of this host now: all stay bound until the
    last is picked, so they differ. Free until another process binds them; the rendezvous port of a
    process group, and the test and benchmark harnesses' ports, come from here."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def cuda_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """Which of the ``visible`` CUDA devices (``torch.cuda.device_count()``, after CUDA_VISIBLE_DEVICES)
    this rank takes. Either each task sees every GPU of its node (torchrun; srun without GPU binding)
    and takes its local rank's, or it sees only its own (srun --gpus-per-task=1 / --gpu-bind=single:1,
    one GPU per container: fewer visible than local ranks) and takes the first it sees."""
    if visible < 1:
        raise ParallelSetupError(
            f"parallel.device=cuda: local rank {local_rank} sees no CUDA device (CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): give the job GPUs (--gpus-per-node), or parallel.device=cpu"
        )
    return local_rank if local_world_size <= visible and local_rank < visible else 0


def resolve_device(
    device: str | torch.device, local_rank: int, local_world_size: int = 1, visible: int | None = None
) -> torch.device:
    """``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` -> this rank's device (`cuda_index` picks N)."""
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        visible = torch.cuda.device_count() if visible is None else visible
        device = torch.device("cuda", cuda_index(local_rank, local_world_size, visible))
    return device


def rank_device(device: str, env: LaunchEnv) -> torch.device:
    """This rank's device, chosen once at launch (the trainer, `init_distributed` and every library
    use it): on CUDA it is made current, so NCCL, DeepSpeed and megatron-core agree with us."""
    device = resolve_device(device, env.local_rank, env.local_world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(
    env: LaunchEnv,
    expert_parallel_size: int = 1,
    device: str | torch.device = "auto",
    *,
    num_experts: int | None = None,
    backend: str = "auto",
    use_megatron: bool = True,
    timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
    force_distributed: bool = False,
    gloo_groups: bool = False,
) -> ParallelDims:
    """Validates the layout, starts the default group (nccl on CUDA, else gloo), checks that every
    EP group lives on one host, starts the EP / EDP groups, and returns this rank's `ParallelDims`.

    With ``use_megatron`` the groups come from megatron-core's ``initialize_model_parallel`` (so
    its ``dist_checkpointing`` sees them); otherwise from `build_parallel_dims`, same rank sets.
    ``gloo_groups``: megatron-core's gloo groups beside NCCL ones (off: nothing here uses them, and
    on a multi-homed node gloo picks an interface by host name and can hang at start-up; who needs
    them sets ``GLOO_SOCKET_IFNAME``). ``force_distributed``: the distributed path at any world size.
    """
    validate_parallel(env.world_size, num_experts, expert_parallel_size)
    # DeepSpeed asserts LOCAL_RANK (torchrun's) or Open MPI's variable; srun and MPICH set others.
    # Assigned, not defaulted: a LOCAL_RANK inherited from a parent process would be another's.
    os.environ["LOCAL_RANK"] = str(env.local_rank)
    device = resolve_device(device, env.local_rank, env.local_world_size)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(minutes=timeout_minutes)
    if not dist.is_initialized():
        port = env.master_port or free_port()
        dist.init_process_group(
            backend,
            init_method=f"tcp://{env.master_addr}:{port}",
            rank=env.rank,
            world_size=env.world_size,
            timeout=timeout,
        )
    check_ep_hosts(env, expert_parallel_size)
    if not use_megatron:
        dims = build_parallel_dims(expert_parallel_size, num_experts)
        return dataclasses.replace(dims, force_distributed=force_distributed)
    import warnings

    with warnings.catch_warnings():  # "Transformer Engine and Apex are not installed": expected here
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state as mpu

    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(
            expert_model_parallel_size=expert_parallel_size,
            distributed_timeout_minutes=max(1, round(timeout_minutes)),
            create_gloo_process_groups=gloo_groups and backend != "gloo",  # on gloo they would duplicate ours
        )
    return dataclasses.replace(megatron_parallel_dims(), force_distributed=force_distributed)


def node_key(env: LaunchEnv) -> str:
    """What identifies this rank's host: Slurm's node id under srun (tasks of a loopback or container
    cluster may share a host name), else the host name."""
    return f"slurm node {env.node_id}" if env.launcher == "slurm" else socket.gethostname()


def ep_hosts_error(hosts: list[str], ep_size: int) -> str | None:
    """The one-line error when an EP group (consecutive ranks, Megatron's layout) spans hosts, else
    None. ``hosts[r]``: rank r's `node_key`."""
    from diffmoe_dist.parallel.groups import expert_parallel_ranks

    for ranks in expert_parallel_ranks(len(hosts), ep_size):
        where = sorted({hosts[r] for r in ranks})
        if len(where) > 1:
            return (
                f"parallel.expert_parallel_size={ep_size}: EP group ranks {ranks[0]}-{ranks[-1]} span {len(where)} "
                f"hosts ({', '.join(where[:4])}), so every all-to-all would cross the inter-node fabric: place "
                "consecutive ranks on one node (srun --distribution=block, the launchers' default; "
                "SLURM_DISTRIBUTION=block) or use an expert_parallel_size that divides the tasks per node"
            )
    return None


def check_ep_hosts(env: LaunchEnv, ep_size: int) -> None:
    """Collective over the default group: raises `ParallelSetupError` on every rank alike when an EP
    group spans hosts (docs/design.md section 2: all-to-alls stay inside a node)."""
    if ep_size <= 1 or env.world_size <= 1:
        return
    hosts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, node_key(env))
    error = ep_hosts_error(hosts, ep_size)
    if error:
        raise ParallelSetupError(error)


def destroy_distributed(barrier: bool = False) -> None:
    """Tears down Megatron's state (if any) and the default group; safe to call when neither exists.
    ``barrier`` (every rank calls it after its last collective): no rank destroys its groups, and
    rank 0 the rendezvous store, while a peer is still inside a collective or a store call."""
    if barrier and dist.is_initialized():
        dist.barrier()
    mpu = sys.modules.get("megatron.core.parallel_state")  # never import Megatron (~6 s) just to tear down
    if mpu is not None and mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # groups held only by reference cycles (model -> pool -> group) go now, not at exit


def exit_process(status: int) -> NoReturn:
    """Ends a rank after `destroy_distributed`, skipping interpreter finalization.

    Measured (torch 2.13, gloo): once ``torch._dynamo`` is imported (``torch.optim`` does it on the
    first step), ``destroy_process_group`` no longer frees the default group: its native threads
    (two ``pt_gloo_runloop``, a ``gloo_tcp_loop``, rank 0's ``pt_tcpstore_uv``) keep running, with
    ten references held outside Python's reach. Finalization and C++ static destructors then tear
    them down in no fixed order while they run, the likely source of the rare SIGABRT "terminate
    called without an active exception" seen after a finished fit on a loaded machine. Everything
    of value is on disk by now (checkpoints fsynced, metrics closed, wandb finished): flush the
    streams and leave without running any destructor.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)
