"""Mistakes refused on one line before anything is built or written: config types and YAML, sizes
that would allocate, data the model cannot read, environment variables, and checkpoints that are not
this run's (issue 25, docs/operations.md "Refused at start")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import conftest
import pytest
from conftest import HANG_TIMEOUT

from diffmoe_dist.checkpoint.identity import check_identity, data_manifest_hash
from diffmoe_dist.checkpoint.ownership import RunDirError, RunHistory
from diffmoe_dist.checkpoint.retention import retain
from diffmoe_dist.config import ConfigError, load_config
from diffmoe_dist.data.check import check_files

TINY_YAML = "configs/local/diffmoe-tiny.yaml"


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  run_dir: [runs/a, runs/b]\n", "train.run_dir=['runs/a', 'runs/b'] is invalid: use one string"),
        ("data:\n  path: {a: 1}\n", "data.path={'a': 1} is invalid: use one string, not a mapping"),
        ("train:\n  steps: 3\ntrain:\n  seed: 1\n", "'train' appears twice at line 3"),
        ("optim: {lr: 1.0e-3, lr: 1.0e-4}\n", "'lr' appears twice"),
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
    ],
)
def test_yaml_types_duplicates_and_empty_files_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError) as exc:
        load_config(_yaml(tmp_path, text))
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["train.seed=10000000000000000"], "train.seed"),
        (["train.threads=100000"], "train.threads"),
        (["data.num_workers=5000"], "data.num_workers"),
        (["sample.per_class=10000000"], "sample.per_class"),
        (["moe.capacity=1e-300"], "moe.capacity"),
        (["train.max_skipped_steps=0"], "train.max_skipped_steps"),
    ],
)
def test_sizes_that_would_allocate_or_crash_are_refused_by_value(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(TINY_YAML, [*conftest.TINY, *overrides]).validate(world_size=2)


@pytest.mark.parametrize("name, value", [("DIFFMOE_LOCK_STALE_MINUTES", "abc"), ("DIFFMOE_INJECT_NAN", "x@1")])
def test_environment_variables_are_checked_like_values(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_config(TINY_YAML, conftest.TINY).validate(world_size=2)


def test_data_that_the_model_cannot_read_is_refused_before_the_build(digits, digits_t2i):
    def refused(path, *overrides) -> str:
        with pytest.raises(ConfigError) as exc:
            check_files(load_config(TINY_YAML, [*conftest.TINY, f"data.path={path}", *overrides]).validate(2))
        assert "\n" not in str(exc.value)
        return str(exc.value)

    assert "data.global_batch_size" in refused(digits, "data.global_batch_size=1000000000000")
    assert "model.image_size" in refused(digits, "model.image_size=32")
    assert "text.npy" in refused(digits, "model.task=t2i")  # class-conditional shards for a t2i run
    assert "model.text_dim" in refused(digits_t2i, "model.task=t2i", "model.text_dim=512")
    assert "data.text_encoder" in refused(digits_t2i, "model.task=t2i", "data.text_encoder=/nowhere/t5")


def test_a_model_too_large_for_the_host_is_refused_before_it_allocates():
    from diffmoe_dist.train.sizes import check_sizes

    cfg = load_config(TINY_YAML, ["model.size=XL", "moe.num_experts=64"]).validate(world_size=2)
    with pytest.raises(ConfigError, match="GiB per rank"):
        check_sizes(cfg, 1, 1, on_host=True)
    check_sizes(load_config(TINY_YAML, conftest.TINY).validate(world_size=2), 1, 1, on_host=True)


def test_the_cli_refuses_a_huge_batch_before_writing_anything(digits, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "diffmoe_dist.train.cli", "--config", TINY_YAML, *conftest.TINY]
    cmd += [f"data.path={digits}", f"train.run_dir={run}", "data.global_batch_size=1000000000000"]
    cmd += ["parallel.expert_parallel_size=1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=conftest.REPO, timeout=HANG_TIMEOUT)
    assert out.returncode == 2 and "data.global_batch_size" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not run.exists()


# ---- resume identity -------------------------------------------------------------------------
def _checkpoint(root, name: str, step: int, run_id: str, world_size: int = 1, **meta) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    for r in range(world_size):
        open(os.path.join(path, f"rank{r:05d}.pt"), "w").close()
    with open(os.path.join(path, "checkpoint.json"), "w") as f:
        json.dump({"step": step, "run_id": run_id, "world_size": world_size, **meta}, f)
    return path


def test_resume_refuses_what_is_not_this_runs_checkpoint(tmp_path, digits):
    root = str(tmp_path / "checkpoints")
    history = RunHistory(root)
    history.append("start", run_id="mine")
    cfg = load_config(TINY_YAML, [*conftest.TINY, f"data.path={digits}", "train.steps=20"])
    logs: list[str] = []

    def check(path, steps=20, inside=True):
        cfg.train.steps = steps
        meta = json.load(open(os.path.join(path, "checkpoint.json")))
        check_identity(cfg, path, meta, history, inside, logs.append)

    good = _checkpoint(root, "step_0000006", 6, "mine", data_manifest_sha256=data_manifest_hash(digits))
    check(good)
    assert logs == []
    for path, message in [
        (_checkpoint(root, "step_0000014", 6, "mine"), "holds step 6, not the step its name says"),
        (_checkpoint(root, "step_0000007", 7, "theirs"), "belongs to run theirs"),
        (_checkpoint(root, "step_0000008", 8, "mine", world_size=4), "says world size 4 but holds 1 rank files"),
    ]:
        if "world size" in message:
            os.remove(os.path.join(path, "rank00003.pt"))
            os.remove(os.path.join(path, "rank00002.pt"))
            os.remove(os.path.join(path, "rank00001.pt"))
        with pytest.raises(RunDirError, match=message):
            check(path)
    check(os.path.join(root, "step_0000007"), inside=False)  # train.resume=PATH elsewhere: a new run from it
    with pytest.raises(RunDirError, match="train.steps=5 is below step 6"):
        check(good, steps=5)
    changed = _checkpoint(root, "step_0000009", 9, "mine", data_manifest_sha256="0" * 64)
    check(changed)
    assert len(logs) == 1 and f"data.path={digits}" in logs[0]


def test_retention_deletes_by_the_run_id_inside_not_by_name(tmp_path):
    root = str(tmp_path)
    history = RunHistory(root)
    history.append("start", run_id="mine")
    for step in (1, 2, 3):
        history.append("save", run_id="mine", dir=f"step_{step:07d}")
    _checkpoint(root, "step_0000001", 1, "theirs")  # another run's, under a name this run once used
    _checkpoint(root, "step_0000002", 2, "mine")
    _checkpoint(root, "step_0000003", 3, "mine")
    for name in os.listdir(root):
        if name.startswith("step_"):
            open(os.path.join(root, name, "manifest.json"), "w").close()
    retain(root, 1, history, "mine", "step_0000003")
    assert sorted(d for d in os.listdir(root) if d.startswith("step_")) == ["step_0000001", "step_0000003"]
