import os

import pytest
import torch

from diffmoe_dist.train import checkpoint as ckpt


def _save(root, step, value):
    return ckpt.save_checkpoint(
        str(root), step, 0, 1, {"w": torch.full((3,), float(value))}, {"opt": torch.tensor([value])}, keep_last=2
    )


def test_save_is_verified_points_latest_and_keeps_last(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step, step)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_0000020", "step_0000030"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000030"
    path = ckpt.find_resumable(str(tmp_path))
    assert path.endswith("step_0000030")
    manifest = ckpt.verify(path)
    assert set(manifest["files"]) == {"model.pt", "rank00000.pt"}
    assert torch.equal(ckpt.load_file(path, "model.pt")["w"], torch.full((3,), 30.0))


def test_flipped_byte_is_named_and_previous_checkpoint_is_used(tmp_path):
    _save(tmp_path, 10, 1)
    bad = _save(tmp_path, 20, 2)
    target = os.path.join(bad, "rank00000.pt")
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(target, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="rank00000.pt is corrupted"):
        ckpt.verify(bad)
    messages = []
    path = ckpt.find_resumable(str(tmp_path), log=messages.append)
    assert path.endswith("step_0000010")
    assert any("rank00000.pt" in m and "WARNING" in m for m in messages)


def test_partial_checkpoint_without_manifest_is_skipped(tmp_path):
    _save(tmp_path, 10, 1)
    os.makedirs(tmp_path / "step_0000020")
    torch.save({}, tmp_path / "step_0000020" / "model.pt")
    assert ckpt.find_resumable(str(tmp_path), log=lambda m: None).endswith("step_0000010")
    assert ckpt.resolve_checkpoint(str(tmp_path)).endswith("step_0000010")
    with pytest.raises(ckpt.CheckpointError, match="no verified checkpoint"):
        ckpt.resolve_checkpoint(str(tmp_path / "nothing"))
