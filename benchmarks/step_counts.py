"""Counts what one training step launches: aten ops (each a kernel launch on a GPU), host reads (each a
point where the GPU drains) and collectives, for the 256-GPU model's structure at toy width.

The structure of configs/t2i/diffmoe-e16-256gpu.yaml (text-to-image, depth 24, MoE on the 12 odd
blocks, E16, pool dp, bf16 autocast, fp32 gradient reduction) at width 32, on one process that takes
the forced-distributed path (``parallel.force_distributed``: every collective of a multi-rank run,
over a gloo group of one). The real ``Trainer.train_step`` runs (no copy of it here), on synthetic
batches (a count does not depend on the values). Counted, per phase (forward, backward, after):

- aten ops: every op that reaches the dispatcher below autograd (``TorchDispatchMode``);
- host reads: ``aten::_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``), ``aten::nonzero`` (its
  output size) and ``Tensor.tolist`` calls (on CPU no aten op; on CUDA a device-to-host copy that
  waits), each with the caller's line;
- collectives: calls of the ``torch.distributed`` functions.

The eager path is counted (``train.compile=false``; the config's compiled blocks fuse further, which
a dispatcher-level count cannot see). A step that is not a log step (``logging.log_every``) and not a
stop-check step is counted, and one that is, separately. The JSON keeps the figures of the tree it
ran on; run it on two trees to compare (docs/performance.md "What one training step launches" has
the before / after table).

    python benchmarks/step_counts.py --out benchmarks/results/step_counts.json
    python benchmarks/step_counts.py --tokens 2048   # fewer tokens per rank: same op counts, faster
    python benchmarks/step_counts.py moe.dispatch=padded   # the MoE layers' dispatch without a host read
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffmoe_dist.config import load_config  # noqa: E402
from diffmoe_dist.parallel.groups import count_collectives  # noqa: E402

CONFIG = "configs/t2i/diffmoe-e16-256gpu.yaml"
# Ops whose result the host must see: a scalar read, or an output sized by the data (nonzero: on CUDA
# it copies the count to the host and waits, as .item() does).
HOST_READ_OPS = ("_local_scalar_dense", "nonzero")
# Ops that only make a new view of the same storage: no kernel on a GPU (counted, reported apart).
VIEW_OPS = {"view", "_unsafe_view", "detach", "t", "transpose", "permute", "unsqueeze", "squeeze", "expand", "slice"}
VIEW_OPS |= {"select", "alias", "as_strided", "split", "split_with_sizes", "unbind", "chunk", "narrow", "reshape"}
VIEW_OPS |= {"_reshape_alias", "unflatten", "flatten", "view_as", "lift_fresh", "expand_as"}


class Counter(TorchDispatchMode):
    """aten ops by name, host reads with the caller's file:line, collectives by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()
        self.reads: collections.Counter = collections.Counter()
        self.collectives: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        if name in HOST_READ_OPS:
            self.reads[_caller()] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """The innermost frame inside diffmoe_dist (where the read is asked for)."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if "diffmoe_dist" in path:
            return f"{path.split('diffmoe_dist/')[-1]}:{frame.f_lineno}"
        frame = frame.f_back
    return "other"


class _Patched:
    """Counts ``Tensor.tolist`` (host read) and the torch.distributed collectives into a `Counter`."""

    def __init__(self, counter: Counter):
        self.counter = counter

    def __enter__(self):
        c, tolist = self.counter, torch.Tensor.tolist

        def counted_tolist(t):
            c.reads[_caller()] += 1
            return tolist(t)

        self._tolist, torch.Tensor.tolist = tolist, counted_tolist
        self._collectives = count_collectives(c.collectives)
        self._collectives.__enter__()
        return self

    def __exit__(self, *exc):
        self._collectives.__exit__(*exc)
        torch.Tensor.tolist = self._tolist


class SyntheticBatches:
    """Random text-to-image batches of the config's shapes (the loader's interface the step uses)."""

    epoch = 0

    def __init__(self, cfg, images: int, device: torch.device):
        m, self.images, self.device = cfg.model, images, device
        self.shape = (m.in_channels, m.image_size, m.image_size)
        self.text_shape = (m.text_len, m.text_dim)
        g = torch.Generator().manual_seed(0)
        self.batch = {
            "x": torch.randn(images, *self.shape, generator=g),
            "text": torch.randn(images, *self.text_shape, generator=g).to(_text_dtype()),
            "text_mask": torch.arange(m.text_len).expand(images, -1) < m.text_len // 2,
        }

    def next_batch(self) -> dict:
        return dict(self.batch)


def _text_dtype() -> torch.dtype:
    from diffmoe_dist.data import captions

    return getattr(captions, "TEXT_DTYPE", torch.float32)


def build_trainer(args, run_dir: str):
    from diffmoe_dist.parallel.launch import LaunchEnv, init_distributed
    from diffmoe_dist.train.trainer import Trainer

    images = max(1, args.tokens // 256)
    overrides = [
        "model.hidden_size=32",
        "model.num_heads=2",
        "model.text_dim=32",
        "model.text_len=16",
        f"data.global_batch_size={images}",
        "data.path=unused",
        "data.num_workers=0",
        "parallel.expert_parallel_size=1",
        "parallel.backend=gloo",
        "parallel.device=cpu",
        "parallel.force_distributed=true",
        "parallel.grad_bucket_mb=4",
        f"train.run_dir={run_dir}",
        "train.threads=1",
        f"logging.log_every={args.log_every}",
        "logging.wandb=disabled",
        # The eager path: under the counting TorchDispatchMode dynamo runs nothing compiled anyway, and
        # eager blocks take the one-cast-per-block path (parallel/mixed_precision.py) that compiled ones leave
        # to inductor. Pass train.compile=true to count the eager ops of blocks built for compiling.
        "train.compile=false",
        *args.overrides,
    ]
    cfg = load_config(str(REPO / CONFIG), overrides)
    env = LaunchEnv(
        rank=0, world_size=1, local_rank=0, node_id=0, master_addr="127.0.0.1", master_port=0, launcher="single"
    )
    dims = init_distributed(
        env, 1, "cpu", num_experts=cfg.moe.num_experts, backend="gloo", use_megatron=False, force_distributed=True
    )

    class CountedTrainer(Trainer):
        def _build_loader(self):
            return SyntheticBatches(self.cfg, images, self.device)

    return CountedTrainer(cfg, dims, torch.device("cpu")), cfg, images


def count_step(trainer, log_step: bool) -> dict:
    """One ``train_step`` (plus the loop's per-step stop check), phases split by hooks on the model."""
    from diffmoe_dist.train.preemption import StopRequest

    counter = Counter()
    phase = {"name": "forward"}
    per_phase = {}
    snap = {"ops": 0, "reads": 0, "collectives": 0, "by_op": collections.Counter()}

    def close(name: str) -> None:
        now = {
            "ops": sum(counter.ops.values()),
            "reads": sum(counter.reads.values()),
            "collectives": sum(counter.collectives.values()),
        }
        per_phase[name] = {k: now[k] - snap[k] for k in now}
        per_phase[name]["top_ops"] = dict((counter.ops - snap["by_op"]).most_common(12))
        snap.update(now, by_op=collections.Counter(counter.ops))

    model = trainer.model

    def after_forward(module, inputs, output):
        close("forward")
        phase["name"] = "backward"
        output.register_hook(lambda g: None)
        return output

    def before_backward_done():
        close("backward")
        phase["name"] = "after"

    h1 = model.register_forward_hook(after_forward)
    # The end of backward: the first parameter's gradient (the patch embedding) comes last.
    first = next(p for p in model.parameters() if p.requires_grad)
    h2 = first.register_post_accumulate_grad_hook(lambda p: before_backward_done())
    trainer.step = (trainer.cfg.logging.log_every - 1) if log_step else 0
    # A plain step is no stop-check step (the check's cadence, train/preemption.py); the log step is.
    stop = StopRequest(trainer.dims, 0.0, **({"check_every": 1} if log_step else {}))
    try:
        with _Patched(counter), counter:
            metrics = trainer.train_step()
            if log_step:
                metrics.get("loss")
            stop.should_stop()
        close("after")
    finally:
        h1.remove()
        h2.remove()
        stop.close()
    total_reads = sum(counter.reads.values())
    return {
        "ops": sum(counter.ops.values()),
        "kernel_ops": sum(n for op, n in counter.ops.items() if op not in VIEW_OPS),
        "host_reads": total_reads,
        "collectives": sum(counter.collectives.values()),
        "phases": per_phase,
        "host_reads_by_line": dict(counter.reads.most_common()),
        "collectives_by_name": dict(counter.collectives),
        "top_ops": dict(counter.ops.most_common(25)),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="image tokens per rank (256 per image)")
    p.add_argument("--log-every", type=int, default=50, help="logging.log_every of the counted run")
    p.add_argument("--out", default=None, help="write the JSON here")
    p.add_argument("--label", default="", help="a name for this tree in the JSON (e.g. before / after)")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.compile=true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, cfg, images = build_trainer(args, tmp)
        try:
            trainer.train_step()  # warm-up: lazily built state (optimizer moments, buckets)
            rows = {"step": count_step(trainer, log_step=False), "log_step": count_step(trainer, log_step=True)}
        except Exception:
            traceback.print_exc()
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    result = {
        "label": args.label,
        "config": CONFIG,
        "overrides": args.overrides,
        "images_per_rank": images,
        "tokens_per_rank": images * 256,
        "torch": torch.__version__,
        **rows,
    }
    head = ("ops", "kernels", "fwd", "bwd", "after", "reads", "coll")
    print(f"{'':10} " + " ".join(f"{h:>7}" for h in head))
    for name, r in rows.items():
        ph = r["phases"]
        cells = (r["ops"], r["kernel_ops"], *(ph[p]["ops"] for p in ("forward", "backward", "after")))
        print(f"{name:10} " + " ".join(f"{c:7d}" for c in (*cells, r["host_reads"], r["collectives"])))
    for line, n in rows["step"]["host_reads_by_line"].items():
        print(f"  host reads {n:4d}  {line}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
