"""The training loop: composes config, model, parallelism, data, optimizer, EMA, checkpoints, metrics."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from diffmoe_dist import checkpoint as ckpt
from diffmoe_dist.checkpoint.identity import data_manifest_hash
from diffmoe_dist.config import Config
from diffmoe_dist.data.loader import to_device
from diffmoe_dist.data.position import GlobalPosition
from diffmoe_dist.diffusion.ema import EMA
from diffmoe_dist.diffusion.objective import training_loss, training_targets
from diffmoe_dist.diffusion.sampling import sample_images, save_grid
from diffmoe_dist.model.build import build_model
from diffmoe_dist.model.moe.collector import MoECollector
from diffmoe_dist.model.moe.experts import expert_shard
from diffmoe_dist.model.moe.layer import schedule_capacity
from diffmoe_dist.parallel.groups import ParallelDims, comm_device
from diffmoe_dist.parallel.parallelize import parallelize
from diffmoe_dist.train.engine import build_engine, uses_deepspeed
from diffmoe_dist.train.guard import StepGuard, check_state_finite
from diffmoe_dist.train.metrics import MetricsLogger, PhaseTimer, StepMetrics, Throughput, progress_info, untimed_lap
from diffmoe_dist.train.preemption import EXIT_REQUEUE, StopRequest
from diffmoe_dist.train.progress import Phase, say
from diffmoe_dist.train.run_dir import RunDirError, RunOwner, begin, plan_start
from diffmoe_dist.train.sizes import rank_threads
from diffmoe_dist.train.telemetry import RoutingTelemetry


class Trainer:
    def __init__(self, cfg: Config, dims: ParallelDims | None, device: torch.device, local_world_size: int = 1):
        self.cfg, self.device = cfg, device
        self.dims = dims if dims is not None else ParallelDims.single()
        self.rank0 = self.dims.rank == 0
        torch.set_num_threads(rank_threads(cfg, local_world_size))
        if cfg.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        # Only this rank's experts are ever allocated (each initialised from (seed, layer, global
        # expert index), so the weights do not depend on the EP size), and the EMA copies that shard.
        with expert_shard(self.dims.ep_rank, self.dims.ep_size):
            self.model = build_model(cfg.model, cfg.moe, cfg.diffusion.objective).to(device)
        self.ema = EMA(self.model, cfg.train.ema_decay, cfg.train.ema_warmup)
        self.moe = MoECollector()  # what the MoE forwards hand the step (losses, threshold inputs)
        # Everything parallel, the same way on the model and its EMA (parallel/parallelize.py):
        # expert shards and tags, dispatchers, pools, the replica broadcast, activation checkpointing.
        reducer = parallelize(
            self.model,
            self.dims,
            cfg.moe,
            ema=self.ema.model,
            activation_checkpointing=cfg.train.activation_checkpointing,
            compile=cfg.train.compile,
            grad_reduce=None if uses_deepspeed(cfg, self.dims) else cfg.parallel,  # ZeRO reduces its own
        )
        # On the device it draws on (flow_targets checks): a CPU generator cannot draw CUDA noise.
        self.noise_gen = torch.Generator(device=device)
        self._seed_streams(0)
        # Plain data parallelism (train.zero_stage 0) or DeepSpeed ZeRO 1 / 2: optimizer, scheduler,
        # gradient reduction, clipping and accumulation (train/engine.py).
        self.engine = build_engine(self.model, cfg, self.dims, reducer, print if self.rank0 else lambda _: None)
        self.optimizer, self.scheduler = self.engine.base_optimizer, self.engine.scheduler
        self.loader = self._build_loader()
        self.guard = StepGuard(self.dims, cfg.train.max_skipped_steps, print if self.rank0 else lambda _: None)
        self.step = 0
        self.run_dir = cfg.train.run_dir
        self.ckpt_root = os.path.join(self.run_dir, "checkpoints")
        self.run_id = self.run_plan = None  # set by maybe_resume (train/run_dir.py)
        self.saver = ckpt.AsyncSaver(self.dims)  # checkpoint.async_save: written beside training

    def _build_loader(self) -> GlobalPosition:
        from diffmoe_dist.data.loader import build_loader

        return build_loader(self.cfg, self.dims.rank, self.dims.world_size, self.device)

    # ---- checkpoints -------------------------------------------------------------------------
    def _slots(self) -> list[ckpt.Slot]:
        """Everything this rank holds, placed in global tensors (checkpoint/)."""
        model = ckpt.module_slots("model", self.model, self.dims)
        ema = ckpt.module_slots("ema", self.ema.model, self.dims)
        return [*model.values(), *ema.values(), *ckpt.optimizer_slots(self.engine.state_fragments(), model)]

    def save(self, blocking: bool = True) -> str:
        """Collective. Each rank writes its own share; nothing is gathered but the index. Waits for
        the save in flight; ``blocking=False``: returns once the share is copied to host memory."""
        t0 = time.time()
        check_state_finite({"model": self.model, "EMA": self.ema.model}, self.dims, self.step)  # train/guard.py
        meta = {
            "config": self.cfg.to_dict(),
            "ep_size": self.dims.ep_size,
            "zero_stage": self.engine.zero_stage,
            "ema_num_updates": self.ema.num_updates,
            "optimizer_steps": self.engine.optimizer_steps(),
            "loader": self.loader.state_dict(),
            "device_type": self.device.type,  # RNG states are per device type
            "data_manifest_sha256": data_manifest_hash(self.cfg.data.path),  # checkpoint/identity.py
        }
        rank_state = {"rng_torch": torch.get_rng_state(), "rng_noise": self.noise_gen.get_state()}
        if self.device.type == "cuda":  # label / caption dropout draws from the CUDA default generator
            rank_state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        log = say if self.rank0 else lambda _: None
        phase = Phase(log, f"checkpoint save at step {self.step}")
        path = self.saver.save(
            self.ckpt_root, self.step, self._slots(), meta, rank_state, self.cfg.checkpoint.keep_last, self.run_id,
            log, blocking,
        )  # fmt: skip
        self.last_save_seconds = time.time() - t0  # what the step waited
        phase.end(path if blocking else f"{path}, written in the background")
        self._saved_step = self.step
        return path

    def maybe_resume(self, log) -> None:
        """``train.resume``: ``auto`` (the run's newest verified checkpoint), ``never``, or a path.
        Any world size, EP size and ZeRO stage can load any checkpoint of the same model; RNG states
        are restored only on the topology that wrote them (elsewhere the streams are reseeded from
        the step, and the data continues from the global sample position either way). The decision
        and its checks (run_dir.plan_start: run identity, corrupt checkpoints, config changes) come
        first and write nothing; `fit` records them once the load succeeded."""
        t0 = time.time()
        self.run_plan = plan_start(self.cfg, self.ckpt_root, self.dims, log)
        self.run_id, path = self.run_plan.run_id, self.run_plan.path
        if path is None:
            return
        log(f"[diffmoe] resume from {path}: started")
        reader = ckpt.ShardReader(path)
        meta = reader.meta
        model = ckpt.module_slots("model", self.model, self.dims)
        ema = ckpt.module_slots("ema", self.ema.model, self.dims)
        ckpt.check_keys(reader, "model", model)
        ckpt.check_keys(reader, "ema", ema)
        slots = [*model.values(), *ema.values()]
        if any(k.startswith("optim/") for k in reader.tensors):  # none before the first step
            self.engine.ensure_optimizer_state()
            slots += ckpt.optimizer_slots(self.engine.state_fragments(), model)
        ckpt.load_slots_once(reader, slots, self.dims)  # each byte read once per job
        self.engine.after_load()
        self.step = self._saved_step = int(meta["step"])
        self.engine.set_optimizer_steps(int(meta["optimizer_steps"]))
        self.engine.set_schedule_step(self.step)
        self.ema.num_updates = int(meta["ema_num_updates"])
        try:
            self.loader.load_state_dict(meta["loader"])
        except ValueError as exc:  # another data set: another data order
            raise RunDirError(f"{path}: {exc}") from None
        same_topology = meta["world_size"] == self.dims.world_size and meta["ep_size"] == self.dims.ep_size
        if same_topology and meta.get("device_type", "cpu") == self.device.type:
            mine = reader.rank_state(self.dims.rank)
            torch.set_rng_state(mine["rng_torch"])
            self.noise_gen.set_state(mine["rng_noise"])
            if "rng_cuda" in mine:
                torch.cuda.set_rng_state(mine["rng_cuda"], self.device)
        else:
            self._seed_streams(self.step)
        self.last_load_seconds = time.time() - t0
        where = f"world size {meta['world_size']}, EP {meta['ep_size']}"
        note = "" if same_topology else f" (written at {where}: resharded)"
        log(f"[diffmoe] resumed from {path} at step {self.step}{note}: done in {self.last_load_seconds:.1f} s")

    def _seed_streams(self, step: int) -> None:
        """This rank's streams for t, noise and label dropout (torch's global one and ``noise_gen``;
        ranks draw different noise) from (seed, step, rank): at the start, and on a resume whose
        saved streams belong to another topology."""
        seed = self.cfg.train.seed + 1_000_003 * step
        torch.manual_seed(seed * 7919 + self.dims.rank + 1)
        self.noise_gen.manual_seed(seed * 104729 + self.dims.rank)

    # ---- one step ----------------------------------------------------------------------------
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's forward: the loss to backpropagate, and its logged parts
        ``[loss, loss_flow, predictor_bce, aux_loss]`` (fp32, detached, on the run's device).
        The MoE layers hand their losses and the step's threshold inputs to ``self.moe`` while it
        is open; backward (and an activation-checkpointing recompute in it) runs outside."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16")
        x = batch.pop("x").to(self.device, non_blocking=True)
        cond = to_device(batch, self.device)  # y, or text (cast to fp32 there) and text_mask
        x_t, t, v_target = training_targets(self.cfg.diffusion, x, self.noise_gen)  # diffusion.objective
        with self.moe.collect(self.model), autocast:
            v_pred = self.engine.forward(x_t, t, **cond)
        loss_flow = training_loss(self.cfg.diffusion, v_pred, v_target)
        moe = self.moe.losses()
        # moe["loss"] = sum over layers of predictor_loss_weight * BCE + weighted TC aux loss
        loss = self.guard.fold_loss(loss_flow + moe["loss"], self.step + 1)  # NaN everywhere if not finite
        return loss, torch.stack([loss, loss_flow, moe["predictor_bce"], moe["aux_loss"]]).detach().float()

    def _global_means(self, parts_sum: torch.Tensor) -> torch.Tensor:
        """Logged losses as global means over the data-parallel batch and the micro-batches (one
        tiny all-reduce on the DP group's device), so a run's curve does not depend on the world size."""
        parts = parts_sum / self.cfg.optim.grad_accum_steps
        if self.dims.distributed:
            parts = parts.to(comm_device(self.dims.dp_group))
            dist.all_reduce(parts, group=self.dims.dp_group)
            parts /= self.dims.world_size
        return parts

    def train_step(self, timer: PhaseTimer | None = None) -> dict[str, float]:
        """One optimizer step. ``timer`` (benchmarks): charges the phases data, forward, backward,
        optimizer (engine.step: gradient reduction left after backward, clipping, AdamW), ema and
        metrics, with a device synchronise at each boundary; None costs nothing."""
        lap = timer.lap if timer is not None else untimed_lap
        lap(None)
        self.guard.begin(self.noise_gen, self.device)
        self.engine.zero_grad()
        self.moe.clear()
        schedule_capacity(self.model, self.cfg.moe, self.step)  # moe.capacity_full/decay_steps; no-op without
        parts = torch.zeros(4, device=self.device)
        for _ in range(self.cfg.optim.grad_accum_steps):
            batch = self.loader.next_batch()
            lap("data")
            loss, micro_parts = self._forward_loss(batch)
            lap("forward")
            self.engine.backward(loss)  # / grad_accum_steps inside
            parts += micro_parts
            lap("backward")
        grad_norm = self.engine.step(self.guard.decide)  # a tensor (plain engine) or a float (DeepSpeed)
        if self.guard.skipped:  # not finite: nothing changed but the data position (train/guard.py)
            self.guard.after_skip(self.step + 1)
            return {"skipped": 1.0}
        self.guard.after_apply()
        # The threshold EMA, once per applied optimizer step over the step's whole pool (all
        # micro-batches). Called here, not from an optimizer step pre-hook: DeepSpeed ZeRO steps its
        # base optimizer once per parameter group, which would update twice.
        self.moe.update_thresholds()
        lap("optimizer")
        self.ema.update(self.model)
        self.step += 1
        lap("ema")
        # The step's one host read (losses, C_avg and the gradient norm together; float64 holds them
        # exactly), deferred to the first look at the values: the loop looks at log steps only.
        logged = torch.cat([self._global_means(parts).double(), self.moe.capacity_avg().reshape(1).to(parts.device)])
        names, host = ["loss", "loss_flow", "loss_predictor", "loss_aux", "capacity_avg"], {}
        if torch.is_tensor(grad_norm):
            logged = torch.cat([logged, grad_norm.detach().double().reshape(1).to(logged.device)])
            names.append("grad_norm")
        else:
            host["grad_norm"] = float(grad_norm)
        host["lr"] = self.scheduler.get_last_lr()[0]
        metrics = StepMetrics(logged, names, host, order=[*names[:4], "grad_norm", "lr", "capacity_avg"])
        lap("metrics")
        return metrics

    # ---- samples -----------------------------------------------------------------------------
    def sample_grid(self, path: str) -> None:
        """Collective: each rank samples an equal share of the class grid; rank 0 writes it.
        Text-to-image grids have one column per held-out caption (one per digit), listed in a .txt."""
        s, nc = self.cfg.sample, self.cfg.model.num_classes
        model = self.ema.model
        if self.cfg.model.task == "t2i":
            from diffmoe_dist.data.captions import grid_prompts
            from diffmoe_dist.model.text import PromptConditioned

            prompts = grid_prompts(self.cfg.data.path, nc)
            model, nc = PromptConditioned(model, prompts["text"], prompts["mask"]), len(prompts["caption"])
            if self.rank0:
                with open(os.path.splitext(path)[0] + ".txt", "w") as f:
                    f.write("".join(f"column {i}: {c}\n" for i, c in enumerate(prompts["caption"])))
        labels = torch.arange(nc).repeat_interleave(s.per_class)
        W = self.dims.world_size
        # Padded cyclically to a multiple of W, which may exceed the grid (32 images on 256 ranks); the gathered
        # images are cut back to the grid below.
        labels = labels[torch.arange(math.ceil(len(labels) / W) * W) % len(labels)]
        mine = labels.view(W, -1)[self.dims.rank]
        imgs = sample_images(
            model,
            mine,
            cfg_scale=s.cfg_scale,
            num_steps=s.num_steps,
            sampler=s.sampler,
            seed=self.cfg.train.seed + 1000 * self.dims.rank,
            device=self.device,
        )
        if self.dims.distributed:  # gathered where the DP group communicates (NCCL: CUDA), then to the host
            imgs = imgs.to(comm_device(self.dims.dp_group)).contiguous()
            parts = [torch.empty_like(imgs) for _ in range(W)]
            dist.all_gather(parts, imgs, group=self.dims.dp_group)
            imgs = torch.cat(parts)
        imgs = imgs.cpu()
        if self.rank0:
            imgs = self._decode(imgs[: nc * s.per_class])  # latent shards: pixels through their VAE
            # rows = classes: transpose (class, k) -> (k, class) so each column is one class
            grid = imgs.view(nc, s.per_class, *imgs.shape[1:]).transpose(0, 1).reshape(-1, *imgs.shape[1:])
            save_grid(grid, path, nrow=nc)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not hasattr(self, "_decoder"):
            from diffmoe_dist.data.decode import build_decoder

            self._decoder = build_decoder(self.cfg.data.path, self.cfg.sample.vae, self.device)
        return latents if self._decoder is None else self._decoder(latents)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Collective. Takes the run directory (one live owner: train/run_dir.py), decides and checks
        the resume, and only then writes into it; raises RunDirError (one line) when it may not."""
        say = print if self.rank0 else lambda _: None
        self._owner = RunOwner.take(self.run_dir, self.dims, say)
        failed = True
        try:
            self._saved_step = None
            self.maybe_resume(say)
            if self.rank0:
                begin(self.run_plan, self.cfg, self.run_dir, self.ckpt_root, say)
            failed = False
            result = self._fit()
            if result["stopped"] and self._owner.lock is not None:  # requeued under SLURM: still ours
                self._owner.lock.keep_for_requeue()
            return result
        finally:
            self._owner.release(failed=failed)

    def _fit(self) -> dict:
        cfg = self.cfg
        logger = MetricsLogger(
            self.run_dir, self.rank0, cfg.logging.wandb, cfg.logging.wandb_project, cfg.to_dict(), cfg.train.steps,
            self.run_id,
        )  # fmt: skip
        logger.advance_to(self.step)
        stop = StopRequest(  # SIGTERM / SIGUSR1 / time limit; every_minutes and unreadable data ride along
            self.dims,
            cfg.train.max_minutes,
            save_due=lambda: self.rank0 and self.saver.minutes_due(cfg.checkpoint.every_minutes),
            data_error=lambda: self.loader.error,  # the next step's batch is unreadable (data/stream.py)
        )
        self.guard.stop = stop  # the guard's flags ride on the stop flag's all-reduce
        telemetry = RoutingTelemetry(
            self.model, cfg.logging.routing_every, self.run_dir, self.dims, self.step + 1, collector=self.moe
        )
        throughput = Throughput(cfg, self.dims, self.device)  # tokens/s, TFLOPS, MFU, peak memory
        t_start = time.time()
        last = {}
        window_t, window_steps = time.time(), 0
        self.loader.prefetch()  # the first step's batches: a bad shard is agreed on like one mid-run
        stopped = stop.agree_on_data()
        while self.step < cfg.train.steps and not stopped:
            last = self.train_step(throughput.clock)  # host clock reads only: data share, per-rank step time
            self._owner.heartbeat()
            if self.guard.skipped:  # same step again with the next batch (nothing to log or save)
                if stopped := stop.should_stop():
                    break
                continue
            telemetry.after_step(self.step)  # routing.jsonl every logging.routing_every steps
            window_steps += 1
            if self.step % cfg.logging.log_every == 0 or self.step == cfg.train.steps:
                dt = time.time() - window_t
                last["steps_per_s"] = window_steps / max(dt, 1e-9)
                last["images_per_s"] = last["steps_per_s"] * cfg.data.global_batch_size
                last["epoch"] = self.loader.epoch
                last.update(throughput.measure(window_steps, dt))  # collective: peak memory per rank
                logger.log(self.step, last)
                window_t, window_steps = time.time(), 0
            logger.advance_to(self.step, progress_info(last) if last.read else None)  # no host read
            if cfg.sample.every and self.step % cfg.sample.every == 0 and self.step < cfg.train.steps:
                self._write_samples(logger)
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < cfg.train.steps:
                self.save(blocking=not cfg.checkpoint.async_save)
            # collective: all ranks stop after the same step (and agree whether checkpoint.every_minutes is due)
            stopped = stop.should_stop()
            if stop.save_due and not stopped and self._saved_step != self.step and self.step < cfg.train.steps:
                self.save(blocking=not cfg.checkpoint.async_save)
            if stopped and self.step < cfg.train.steps:
                break
            stopped = None
        # Signals stay caught through the final save and the samples (and, under diffmoe-train's
        # SignalGuard, until the process ends): a late one can neither kill a save nor change the outcome.
        if self._saved_step != self.step:
            self.save()  # waits for a save in flight first
        self.saver.wait()
        stop.raise_data_error(self.step)
        if stopped:
            logger.print(
                f"[diffmoe] {stopped}: stopped at step {self.step}, checkpoint saved; exit {EXIT_REQUEUE} (requeue)"
            )
        else:
            self._write_samples(logger)
        stop.close()
        logger.close()
        return {"final": last, "seconds": time.time() - t_start, "step": self.step, "stopped": stopped}

    def _write_samples(self, logger: MetricsLogger) -> None:
        path = os.path.join(self.run_dir, "samples", f"step_{self.step:07d}.png")
        if self.rank0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        phase = Phase(logger.print, f"sample grid at step {self.step}")
        self.sample_grid(path)
        prompts = os.path.splitext(path)[0] + ".txt"  # t2i: the columns' captions
        caption = Path(prompts).read_text() if self.rank0 and os.path.isfile(prompts) else None
        logger.log_image(self.step, "samples", path, caption)
        phase.end(f"samples -> {path}")
