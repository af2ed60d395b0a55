"""Specifications of the streaming loader (data/stream.py): the indexed loader's global batches from
tar shards, resumable at any world size, equal per-rank counts at epoch boundaries, one-line shard
errors before any process group, bf16 text, and the 256-GPU twin config end to end (VAE-decoded grids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import HANG_TIMEOUT
from distributed import run_distributed, start_training_ranks, wait_all

from diffmoe_dist import checkpoint as ckpt
from diffmoe_dist.config import load_config
from diffmoe_dist.data.digits import load_digits_split, write_digits_shards
from diffmoe_dist.data.loader import GlobalBatchLoader, to_device
from diffmoe_dist.data.shards import load_indexed, write_shards
from diffmoe_dist.data.stream import ShardError, StreamBatchLoader, check_shards

REPO_ROOT = Path(__file__).resolve().parents[1]
DIGITS_FIELDS = {"x": "latent.npy", "y": "cls"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits in 7 indexed shards, as `tools/make_shards.py digits` writes them."""
    root = tmp_path_factory.mktemp("digits")
    write_digits_shards(root)
    return root


def _indexed(digits, G, rank, W, seed=3):
    data = load_indexed(digits / "train")
    return GlobalBatchLoader({"x": data["latent"], "y": data["cls"]}, G, rank, W, seed)


def _stream(path, G, rank, W, seed=3, **kw):
    return StreamBatchLoader(path, DIGITS_FIELDS, G, rank, W, seed, **kw)


def _global_batches(loaders, steps):
    out = []
    for _ in range(steps):
        parts = [ld.next_batch() for ld in loaders]
        out.append({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    return out


def test_stream_yields_the_indexed_loaders_global_batches_across_epochs(digits):
    # 1617 samples, G = 96: 40 steps cross two epoch boundaries, mid-batch.
    ref = _global_batches([_indexed(digits, 96, 0, 1)], 40)
    for W, workers in ((1, 0), (2, 2), (4, 0)):
        loaders = [_stream(digits / "train", 96, r, W, num_workers=workers) for r in range(W)]
        got = _global_batches(loaders, 40)
        assert loaders[0].epoch == 2
        for a, b in zip(ref, got, strict=True):
            assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
        for ld in loaders:
            ld.close()
    # ... and the order is a permutation of every sample, epoch by epoch, not the shard order
    ys = torch.cat([b["y"] for b in ref])
    n = len(load_digits_split("train")[1])
    assert not torch.equal(ys[:n], load_digits_split("train")[1])


def test_resume_from_four_ranks_into_two_continues_the_same_global_sequence(digits):
    ref = _global_batches([_indexed(digits, 64, 0, 1, seed=7)], 30)
    four = [_stream(digits / "train", 64, r, 4, seed=7, num_workers=1 if r == 0 else 0) for r in range(4)]
    first = _global_batches(four, 23)  # past the first epoch boundary (1617 / 64 = 25.3 steps) soon after
    states = [ld.state_dict() for ld in four]
    assert all(s == states[0] for s in states)
    for ld in four:
        ld.close()
    two = [_stream(digits / "train", 64, r, 2, seed=0, num_workers=2) for r in range(2)]
    for ld in two:
        ld.load_state_dict(states[0])  # the seed comes from the checkpoint too
    rest = _global_batches(two, 7)
    for a, b in zip(ref, first + rest, strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["y"], b["y"])
    assert two[0].epoch == 1
    for ld in two:
        ld.close()
    with pytest.raises(ValueError, match="same data.path"):
        _stream(digits / "train", 64, 0, 2).load_state_dict({**states[0], "num_samples": 5})


TINY = [*conftest.TINY_MODEL, "moe.num_experts=4", "parallel.expert_parallel_size=1", "data.global_batch_size=32",
        "train.threads=1", "train.deterministic=true"]  # fmt: skip


def test_a_twenty_step_run_is_bitwise_identical_with_either_loader(digits, tmp_path):
    from diffmoe_dist.train.trainer import Trainer

    def run(*over):
        cfg = load_config("configs/local/diffmoe-tiny.yaml", [*TINY, f"data.path={digits}", *over])
        trainer = Trainer(cfg.validate(world_size=1), None, torch.device("cpu"))
        losses = [trainer.train_step()["loss"] for _ in range(20)]
        return losses, trainer.model.state_dict(), trainer.loader.state_dict()

    losses, weights, state = run("data.loader=indexed")
    s_losses, s_weights, s_state = run("data.loader=stream", "data.num_workers=2")
    assert s_losses == losses and s_state == state
    assert weights.keys() == s_weights.keys() and all(torch.equal(weights[k], s_weights[k]) for k in weights)


def _stream_trainer(digits, run_dir, world_size, resume):
    from diffmoe_dist.train.trainer import Trainer

    over = [*TINY, f"data.path={digits}", f"train.run_dir={run_dir}", "data.loader=stream", "data.num_workers=1"]
    cfg = load_config("configs/local/diffmoe-tiny.yaml", [*over, f"train.resume={resume}"]).validate(world_size)
    dims = None
    if world_size > 1:
        from diffmoe_dist.parallel.launch import init_distributed, read_launch_env

        dims = init_distributed(read_launch_env(), 1, "cpu", num_experts=4, use_megatron=False)
    return Trainer(cfg, dims, torch.device("cpu"))


def _train_and_save(rank, world_size, digits, run_dir):
    trainer = _stream_trainer(digits, run_dir, world_size, "never")
    batches = [trainer.loader.next_batch()["y"].tolist() for _ in range(3)]  # plain lists cross processes
    trainer.step = 3  # the loader state is what this test follows; the weights are test_resume_distributed's
    trainer.save()
    trainer.loader.close()
    return batches


@pytest.mark.slow
def test_a_trainer_checkpoint_at_two_ranks_resumes_the_stream_at_one(digits, tmp_path):
    ref = _global_batches([_indexed(digits, 32, 0, 1, seed=0)], 5)
    parts = run_distributed(_train_and_save, 2, str(digits), str(tmp_path))
    for s in range(3):
        assert parts[0][s] + parts[1][s] == ref[s]["y"].tolist()
    trainer = _stream_trainer(digits, tmp_path, 1, "auto")
    trainer.maybe_resume(lambda m: None)
    assert trainer.step == 3 and trainer.loader.samples_seen == 3 * 32
    for s in (3, 4):
        assert torch.equal(trainer.loader.next_batch()["y"], ref[s]["y"])
    trainer.loader.close()


def _count_steps(rank, world_size, path, steps):
    """Each rank draws its batches and all-reduces its sample count every step, as training would."""
    import torch.distributed as dist

    loader = _stream(path, 6, rank, world_size, num_workers=1)
    sizes = []
    for _ in range(steps):
        count = torch.tensor([len(loader.next_batch()["y"])])
        dist.all_reduce(count)
        sizes.append(int(count))
    loader.close()
    return sizes, loader.epoch


@pytest.mark.slow
def test_ranks_never_differ_in_step_count_at_the_epoch_boundary(tmp_path):
    rng = np.random.default_rng(0)
    samples = [
        {"__key__": f"k{i:03d}", "latent.npy": rng.normal(size=(1, 2, 2)).astype("float32"), "cls": i}
        for i in range(23)
    ]
    write_shards(tmp_path, samples, samples_per_shard=4)  # 6 shards, no index: header scans
    # 23 samples, 2 ranks x 3: webdataset's shard split gave 12 vs 11; here every step has 3 + 3,
    # through 3 epoch boundaries, and no rank stops while the other waits in the collective.
    results = run_distributed(_count_steps, 2, str(tmp_path), 12)
    assert results[0] == results[1] == ([6] * 12, 3)


def test_workers_outlive_the_stop_signals_that_reach_the_whole_job(digits):
    import signal
    import time

    loader = _stream(digits / "train", 64, 0, 1, num_workers=2)
    ref = _global_batches([_indexed(digits, 64, 0, 1)], 6)
    assert torch.equal(loader.next_batch()["y"], ref[0]["y"])
    for worker in loader._batches._workers:  # as Slurm signals every process of the step
        os.kill(worker.pid, signal.SIGTERM)
        os.kill(worker.pid, signal.SIGUSR1)
    time.sleep(0.5)
    for s in range(1, 6):
        assert torch.equal(loader.next_batch()["y"], ref[s]["y"])
    loader.close()
    # ... and a process that exits without closing its loader still exits (multiprocessing's exit
    # hook SIGTERMs daemonic workers and joins them: ignored, that join would never return).
    code = ("import sys; sys.path.insert(0, 'tests'); from test_stream import _stream as s; "
            "s(sys.argv[1], 8, 0, 1, num_workers=2).next_batch()")  # fmt: skip
    subprocess.run([sys.executable, "-c", code, str(digits / "train")], cwd=REPO_ROOT, check=True, timeout=HANG_TIMEOUT)


def test_a_process_that_drops_a_stream_trainer_unclosed_still_exits():
    # Found by the suite itself: after the 20-step test's dropped Trainer, pytest finished and then
    # waited forever in multiprocessing's exit hook, joining workers that ignore its SIGTERM.
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "twenty_step_run"]
    res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def test_bf16_text_is_stored_as_bits_and_read_without_a_float_copy(tmp_path):
    rng = np.random.default_rng(1)
    text = torch.from_numpy(rng.normal(size=(5, 3, 4)).astype("float32")) * 1e3  # beyond fp16's precision
    bits = text.bfloat16().view(torch.int16).numpy().view("uint16")
    samples = [
        {"__key__": f"k{i}", "latent.npy": np.zeros((1, 2, 2), "float32"), "cls": i, "text.npy": bits[i]}
        for i in range(5)
    ]
    write_shards(tmp_path, samples, samples_per_shard=2, index=True, dtypes={"text.npy": "bfloat16"})
    data = load_indexed(tmp_path)
    assert data["text"].dtype == torch.bfloat16 and torch.equal(data["text"], text.bfloat16())
    loader = StreamBatchLoader(tmp_path, {"text": "text.npy"}, 5, 0, 1, 0, num_workers=1)
    assert loader.first_sample()["text"].dtype == torch.bfloat16
    batch = loader.next_batch()
    order = loader.global_indices(0, 5).long()
    assert torch.equal(batch["text"], text.bfloat16()[order])  # bf16 through the workers' shared memory
    loader.close()
    # The model's input: cast to fp32 on the device (to_device, as the trainer does), bitwise what the
    # workers' fp32 cast (float_fields, before) handed over.
    before = StreamBatchLoader(tmp_path, {"text": "text.npy"}, 5, 0, 1, 0, num_workers=1, float_fields=("text",))
    old = before.next_batch()["text"]
    before.close()
    new = to_device(batch, torch.device("cpu"))["text"]
    assert old.dtype == new.dtype == torch.float32 and torch.equal(old.view(torch.int32), new.view(torch.int32))


def test_a_missing_or_corrupt_shard_is_one_line_naming_it(digits, tmp_path):
    check_shards(digits)  # the data root: train/ and heldout/
    bad = tmp_path / "data"
    write_digits_shards(bad)
    check_shards(bad)
    shard = bad / "train" / "shard-000003.tar"
    original = shard.read_bytes()

    shard.write_bytes(original[:-700])  # truncated
    with pytest.raises(ShardError, match=r"^shard .*shard-000003\.tar is truncated or corrupt") as info:
        check_shards(bad)
    assert "\n" not in str(info.value)
    shard.write_bytes(b"\x01" * len(original))  # same size, garbage header
    with pytest.raises(ShardError, match=r"shard-000003\.tar is not a tar file: its first header is unreadable"):
        check_shards(bad)
    # Rank 1 of 2 reads the headers of shards 1, 3, 5 only; rank 0 does not open shard 3.
    check_shards(bad / "train", rank=0, world_size=2)
    with pytest.raises(ShardError, match="shard-000003"):
        check_shards(bad / "train", rank=1, world_size=2)
    shard.unlink()
    with pytest.raises(ShardError, match=r"^shard .*shard-000003\.tar is missing \(listed in .*manifest\.json\)"):
        check_shards(bad)
    check_shards(bad, rank=0, world_size=2)  # another rank's shard

    # The train CLI says so in one line, exit 2, before any process group (nothing listens on the
    # master port: a rank that tried to join would hang, not exit).
    env = {**os.environ, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="9", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--config", "configs/local/diffmoe-tiny.yaml"]
    out = subprocess.run(
        [*cmd, f"data.path={bad}"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("diffmoe-train: error: data.path=") and "shard-000003.tar" in lines[0]
    )

    # A shard damaged inside, past what the cheap check reads, is named by the loader.
    shard.write_bytes(original[:512] + b"\xff" * (len(original) - 512))
    (bad / "train" / "shard-000003.idx.npy").unlink()
    loader = _stream(bad / "train", 1617, 0, 1)
    with pytest.raises(ShardError, match=r"shard .*shard-000003\.tar"):
        loader.next_batch()


@pytest.mark.slow
def test_a_shard_that_goes_bad_mid_run_stops_every_rank_after_a_save_with_one_line(digits, tmp_path):
    import shutil
    import time

    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(digits, data)
    over = [*TINY, f"data.path={data}", f"train.run_dir={run}", "data.loader=stream", "data.num_workers=1",
            "train.steps=100000", "checkpoint.every=0", "logging.wandb=disabled",
            "data.shuffle_window=2"]  # fmt: skip  # windows of 2 shards: each rank reads one of them a step
    procs = start_training_ranks(2, over, str(tmp_path / "log"))
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + HANG_TIMEOUT
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    originals = {shard: shard.read_bytes() for shard in (data / "train").glob("*.tar")}
    for shard in originals:  # the file server loses them: every read comes back short
        os.truncate(shard, 0)
    codes = wait_all(procs)  # never a hang: every rank learns it in the stop check
    stopped = _one_shard_error(tmp_path / "log", codes)
    latest = ckpt.find_resumable(str(run / "checkpoints"))
    assert ckpt.read_meta(latest)["step"] == stopped >= 2 and ckpt.verify(latest)

    # A shard that only rank 1 reads in the resumed run's first step, damaged past what the start-up
    # check reads (same size, first header intact): rank 1 cannot read its first batches while rank 0
    # can. Both agree before the first step, with the workers and without, and stop as above.
    for shard, original in originals.items():
        shard.write_bytes(original)
    position = ckpt.read_meta(latest)["loader"]["samples_seen"]
    cfg = load_config("configs/local/diffmoe-tiny.yaml", over)
    loaders = [_stream(data / "train", 16, r, 2, cfg.train.seed, shuffle_window=2) for r in (0, 1)]
    first = [set(_shards_of(loader, position)) for loader in loaders]
    bad = data / "train" / sorted(first[1] - first[0])[0]
    bad.write_bytes(originals[bad][:512] + b"\xff" * (len(originals[bad]) - 512))
    for workers in (1, 0):
        log = tmp_path / f"log-first-{workers}"
        procs = start_training_ranks(2, [*over, f"data.num_workers={workers}"], str(log))
        codes = wait_all(procs)
        assert _one_shard_error(log, codes, bad.name) == stopped
        assert ckpt.find_resumable(str(run / "checkpoints")) == latest  # nothing trained, nothing new saved


def _shards_of(loader, position: int) -> list[str]:
    """The shards this rank reads for the global batch at stream position ``position``."""
    indices = loader.rank_indices(position).numpy()
    return [loader.dataset.names[n] for n in np.searchsorted(loader.dataset.ends, indices, side="right")]


def _one_shard_error(log_dir: Path, codes: list[int], shard: str = ".tar") -> int:
    """Both ranks exit 1 and rank 0 says one line naming the shard; returns the step it stopped at."""
    logs = {r: (log_dir / f"rank{r}.log").read_text() for r in range(2)}
    assert codes == [1, 1], logs
    errors = [line for line in logs[0].splitlines() if line.startswith("diffmoe-train: error:")]
    assert len(errors) == 1 and "shard " in errors[0] and shard in errors[0], logs[0]
    return int(errors[0].split("stopped at step ")[1].split(",")[0])


# ---- the 256-GPU twin, end to end ----------------------------------------------------------------
def _captioned_images(root: Path, n: int) -> None:
    from PIL import Image

    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[..., i % 3] = rng.integers(100, 256, size=(16, 16))  # red, green or blue noise
        Image.fromarray(pixels).save(root / f"img_{i:02d}.png")
        (root / f"img_{i:02d}.txt").write_text(f"a {['red', 'green', 'blue'][i % 3]} picture, number {i}\n")


@pytest.mark.slow
def test_the_256gpu_twin_trains_on_two_ranks_with_vae_decoded_grids_in_png_and_wandb(tmp_path):
    from PIL import Image

    cfg = load_config("configs/local/t2i-256gpu-twin.yaml")
    big = load_config("configs/t2i/diffmoe-e16-256gpu.yaml")
    same = ("model.task", "model.in_channels", "data.loader", "moe.pool", "moe.router", "train.precision")
    for name in same:
        section, field = name.split(".")
        assert getattr(getattr(cfg, section), field) == getattr(getattr(big, section), field), name
    assert cfg.parallel.expert_parallel_size == 2 and cfg.data.num_workers > 0

    conftest.tiny_vae(tmp_path / "vae")
    _captioned_images(tmp_path / "src", 24)
    data = tmp_path / "data"
    make = [
        sys.executable,
        "tools/make_shards.py",
        "images",
        "--src",
        str(tmp_path / "src"),
        "--vae",
        str(tmp_path / "vae"),
    ]
    make += [
        "--image-size",
        "16",
        "--max-length",
        "8",
        "--text-dtype",
        "bf16",
        "--samples-per-shard",
        "5",
        "--workers",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*make, "--out", str(data)], cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    manifest = json.loads((data / "train" / "manifest.json").read_text())
    assert manifest["vae"] == {"path": str((tmp_path / "vae").resolve()), "scaling_factor": 0.5, "shift_factor": 0.0}
    assert manifest["dtypes"] == {"text.npy": "bfloat16"} and manifest["latent_shape"] == [4, 8, 8]

    run = tmp_path / "run"
    over = [f"data.path={data}", f"train.run_dir={run}"]
    wandb_env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "DIFFMOE_NO_MEGATRON": "1",
    }
    procs = start_training_ranks(
        2, over, str(tmp_path / "logs"), config="configs/local/t2i-256gpu-twin.yaml", env=wandb_env
    )
    codes = wait_all(procs)
    logs = "".join((tmp_path / "logs" / f"rank{r}.log").read_text() for r in range(2))
    assert codes == [0, 0], logs[-3000:]

    grid = Image.open(run / "samples" / "step_0000002.png")
    # 4 prompts x 1 image of 16 x 16 pixels (decoded from 4 x 8 x 8 latents), upscaled x4, RGB
    assert grid.mode == "RGB" and grid.size == ((4 * 17 + 1) * 4, (1 * 17 + 1) * 4)
    pixels = np.asarray(grid)[4:-4, 4:-4]
    assert pixels.std() > 1.0  # an image, not a blank
    columns = (run / "samples" / "step_0000002.txt").read_text().splitlines()
    assert len(columns) == 4 and all("picture" in c for c in columns)
    media = sorted((run / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))
    assert len(media) == 2, sorted(p.name for p in (run / "wandb").rglob("*"))[:40]  # step 2 and the end
    summary = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in summary] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in summary)

    # diffmoe-sample decodes through the recorded VAE too (and through --vae when given)
    from diffmoe_dist.eval.cli import sample_main

    out, other = tmp_path / "sample.png", tmp_path / "other.png"
    args = ["--ckpt", str(run), "--prompt", "a red picture", "--per-class", "2", "--steps", "2"]
    assert sample_main([*args, "--out", str(out)]) == 0
    assert Image.open(out).mode == "RGB" and Image.open(out).size == ((17 + 1) * 4, (2 * 17 + 1) * 4)
    conftest.tiny_vae(tmp_path / "other-vae", seed=1)  # same latents, another decoder: other pixels
    assert sample_main([*args, "--out", str(other), "--vae", str(tmp_path / "other-vae")]) == 0
    a, b = np.asarray(Image.open(out)), np.asarray(Image.open(other))
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_windowed_stream_equals_the_indexed_loader_and_opens_a_shard_per_many_samples(digits):
    # 7 shards of <= 256 samples, windows of 3 shards: the same batches from both loaders at any W
    from diffmoe_dist.data.shards import read_manifest

    sizes = [s["num_samples"] for s in read_manifest(digits / "train")["shards"]]
    data = load_indexed(digits / "train")
    ref = _global_batches([GlobalBatchLoader({"x": data["latent"], "y": data["cls"]}, 64, 0, 1, 5, sizes, 3)], 30)
    for W, workers in ((1, 0), (4, 2)):
        loaders = [_stream(digits / "train", 64, r, W, seed=5, num_workers=workers, shuffle_window=3) for r in range(W)]
        got = _global_batches(loaders, 30)  # past the epoch boundary (1617 samples)
        assert all(torch.equal(a["y"], b["y"]) and torch.equal(a["x"], b["x"]) for a, b in zip(ref, got, strict=True))
        for ld in loaders:
            ld.close()
    # rank 0 of 4, in-process: today's order opens a shard for most samples, the windowed order rarely
    for window, most in ((0, None), (3, 0.1)):
        ld = _stream(digits / "train", 64, 0, 4, seed=5, shuffle_window=window, cache_shards=2)
        for _ in range(50):
            ld.next_batch()
        per_sample = ld.dataset.opens / (50 * 16)
        if most is None:
            assert per_sample > 0.5
        else:
            assert per_sample < most
