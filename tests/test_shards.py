"""Specifications of the webdataset shards: exact round trips, manifests, rank splitting, the CLI."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HANG_TIMEOUT

from diffmoe_dist.data.digits import load_digits_split
from diffmoe_dist.data.shards import load_indexed, read_manifest, stream, write_shards

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_samples(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "__key__": f"sample-{i:05d}",
            "latent.npy": rng.normal(size=(4, 8, 8)).astype(np.float32),
            "cls": int(rng.integers(0, 1000)),
            "caption.txt": f"caption number {i} \u00e9",
            "text.npy": rng.normal(size=(5, 6)).astype(np.float32),
        }
        for i in range(n)
    ]


def keys_seen_by(shard_dir: Path, rank: int, world_size: int, monkeypatch, **kwargs) -> list[str]:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    return [row["key"] for row in stream(shard_dir, **kwargs)]


def test_round_trip_is_exact_and_ordered_by_key(tmp_path):
    samples = make_samples(23)
    shuffled = [samples[i] for i in np.random.default_rng(1).permutation(len(samples))]
    write_shards(tmp_path, shuffled, samples_per_shard=5)
    data = load_indexed(tmp_path)
    assert data["key"] == [s["__key__"] for s in samples]
    assert data["latent"].dtype == torch.float32 and data["cls"].dtype == torch.long
    assert torch.equal(data["latent"], torch.from_numpy(np.stack([s["latent.npy"] for s in samples])))
    assert torch.equal(data["cls"], torch.tensor([s["cls"] for s in samples]))
    assert torch.equal(data["text"], torch.from_numpy(np.stack([s["text.npy"] for s in samples])))
    assert data["caption"] == [s["caption.txt"] for s in samples]


def test_load_order_is_independent_of_shard_split(tmp_path):
    samples = make_samples(17)
    write_shards(tmp_path / "a", samples, samples_per_shard=3)
    write_shards(tmp_path / "b", samples[::-1], samples_per_shard=100)
    a, b = load_indexed(tmp_path / "a"), load_indexed(tmp_path / "b")
    assert a["key"] == b["key"] and torch.equal(a["latent"], b["latent"]) and torch.equal(a["cls"], b["cls"])


def test_manifest_counts_shards_samples_and_fields(tmp_path):
    manifest = write_shards(tmp_path, make_samples(23), samples_per_shard=5, prefix="part")
    assert manifest == read_manifest(tmp_path) == json.loads((tmp_path / "manifest.json").read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"part-{i:06d}.tar" for i in range(5)]
    assert [s["num_samples"] for s in manifest["shards"]] == [5, 5, 5, 5, 3]
    assert manifest["num_samples"] == 23 and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["keys"] == ["caption.txt", "cls", "latent.npy", "text.npy"]
    assert manifest["created_by"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"] + [f"part-{i:06d}.tar" for i in range(5)]


def test_equal_inputs_give_byte_identical_shards(tmp_path):
    write_shards(tmp_path / "a", make_samples(6), samples_per_shard=4)
    write_shards(tmp_path / "b", make_samples(6), samples_per_shard=4)
    for name in ("shard-000000.tar", "shard-000001.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_stream_splits_shards_across_two_ranks_covering_every_sample_once(tmp_path, monkeypatch):
    write_shards(tmp_path, make_samples(23), samples_per_shard=4)  # 6 shards
    everything = {f"sample-{i:05d}" for i in range(23)}
    for kwargs in ({}, {"shuffle_buffer": 8, "seed": 5}):
        rank0 = keys_seen_by(tmp_path, 0, 2, monkeypatch, **kwargs)
        rank1 = keys_seen_by(tmp_path, 1, 2, monkeypatch, **kwargs)
        assert len(rank0) + len(rank1) == 23
        assert set(rank0).isdisjoint(rank1) and set(rank0) | set(rank1) == everything
        assert len(rank0) == 12 and len(rank1) == 11  # shards 0, 2, 4 vs 1, 3, 5 (the last holds 3)


def test_stream_with_more_ranks_and_workers_than_shards(tmp_path, monkeypatch):
    write_shards(tmp_path, make_samples(10), samples_per_shard=4)  # 3 shards, 2 ranks x 2 workers
    seen = []
    for worker in range(2):
        monkeypatch.setenv("WORKER", str(worker))
        monkeypatch.setenv("NUM_WORKERS", "2")
        for rank in range(2):
            seen += keys_seen_by(tmp_path, rank, 2, monkeypatch)
    assert sorted(seen) == [f"sample-{i:05d}" for i in range(10)]


def test_stream_decodes_samples_and_shuffles_deterministically(tmp_path, monkeypatch):
    samples = make_samples(30)
    write_shards(tmp_path, samples, samples_per_shard=6)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    row = next(iter(stream(tmp_path)))
    assert row["key"] == "sample-00000" and row["cls"] == samples[0]["cls"]
    assert torch.equal(row["latent"], torch.from_numpy(samples[0]["latent.npy"]))
    assert row["caption"] == samples[0]["caption.txt"]

    def order(**kwargs):
        return [r["key"] for r in stream(tmp_path, shuffle_buffer=10, **kwargs)]

    assert order(seed=1) == order(seed=1)
    assert order(seed=1) != order(seed=2)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert sorted(order(seed=1)) == [s["__key__"] for s in samples]


def test_missing_manifest_error_names_the_path_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"manifest\.json.*tools/make_shards\.py"):
        load_indexed(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tools/make_shards.py"):
        stream(tmp_path / "nowhere")


def test_missing_shard_is_reported(tmp_path):
    write_shards(tmp_path, make_samples(5), samples_per_shard=2)
    (tmp_path / "shard-000001.tar").unlink()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"__key__": "has.dot"}, "__key__"),
        ({"latent.npy": np.zeros((4, 8, 8))}, "float32"),
        ({"latent.npy": np.zeros((4, 8, 9), np.float32)}, "differs"),
        ({"cls": 1.5}, "'cls' must be an int"),
        ({"Caption.txt": "x"}, "lowercase"),
    ],
)
def test_write_shards_rejects_bad_samples(tmp_path, change, match):
    samples = make_samples(3)
    samples[2] = {**samples[2], **change}
    with pytest.raises(ValueError, match=match):
        write_shards(tmp_path, samples, samples_per_shard=2)


def test_write_shards_rejects_duplicate_keys_and_existing_output(tmp_path):
    samples = make_samples(3)
    with pytest.raises(ValueError, match="appears twice"):
        write_shards(tmp_path / "dup", samples + samples[:1], samples_per_shard=2)
    write_shards(tmp_path / "ok", samples, samples_per_shard=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        write_shards(tmp_path / "ok", samples, samples_per_shard=1)
    manifest = write_shards(tmp_path / "ok", samples, samples_per_shard=2, overwrite=True)
    assert len(manifest["shards"]) == 2 and not (tmp_path / "ok" / "shard-000002.tar").exists()


def test_make_shards_cli_writes_both_digits_splits(tmp_path, capsys):
    out = tmp_path / "digits"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "tools/make_shards.py", "digits", "--out", str(out), "--samples-per-shard", "512"]
    subprocess.run(cmd, cwd=REPO_ROOT, env=env, check=True, capture_output=True)
    for split, n_shards in (("train", 4), ("heldout", 1)):
        manifest = read_manifest(out / split)
        images, labels = load_digits_split(split)
        assert manifest["num_samples"] == len(labels) and len(manifest["shards"]) == n_shards
        data = load_indexed(out / split)
        assert torch.equal(data["latent"], images) and torch.equal(data["cls"], labels)
    # A second run refuses to clobber the shards (in-process, to spare a second interpreter start).
    make_shards = runpy.run_path(str(REPO_ROOT / "tools" / "make_shards.py"))
    assert make_shards["main"](cmd[2:]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_the_full_shard_check_runs_once_per_manifest_and_a_restart_reads_the_record(tmp_path):
    from diffmoe_dist.config import ConfigError
    from diffmoe_dist.data.check import check_data_path
    from diffmoe_dist.data.manifest import VALIDATED

    write_shards(tmp_path / "train", make_samples(9), samples_per_shard=2, index=True)
    train = tmp_path / "train"
    check_data_path(str(tmp_path), rank=1, world_size=2)  # a share of the shards: proves nothing whole
    assert not (train / VALIDATED).exists()
    whole = check_data_path(str(tmp_path))  # every shard, in one process (--validate-only): recorded
    assert (train / VALIDATED).is_file() and whole == (9, [4, 8, 8])
    shard = train / "shard-000002.tar"
    os.truncate(shard, 512)
    assert check_data_path(str(tmp_path), rank=0, world_size=4) == whole  # a restart: the record, not the shards
    # ... and `--validate-only`'s restart imports neither torch nor numpy (seconds of a loaded node's CPU).
    code = "import sys; from diffmoe_dist.train.cli import main; rc = main(sys.argv[1:]); "
    code += "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))"
    argv = [
        "--validate-only",
        "--world-size=2",
        "--config",
        "configs/local/diffmoe-tiny.yaml",
        f"data.path={tmp_path}",
        "data.global_batch_size=8",
        "model.in_channels=4",
        "model.image_size=8",
        f"train.run_dir={tmp_path}/run",
    ]
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=HANG_TIMEOUT
    )
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
    manifest = json.loads((train / "manifest.json").read_text())
    (train / "manifest.json").write_text(json.dumps(manifest))  # another manifest (here: its layout)
    with pytest.raises(ConfigError, match=r"shard-000002\.tar is truncated"):
        check_data_path(str(tmp_path))
