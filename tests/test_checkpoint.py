import json
import os

import pytest
import torch

from diffmoe_dist import checkpoint as ckpt


def _save(root, step, value):
    slots = [
        ckpt.Slot("model/w", torch.full((3,), float(value)), (3,)),
        ckpt.Slot("optim/exp_avg/w", torch.full((3,), float(value) / 10), (3,)),
    ]
    return ckpt.save(str(root), step, slots, {"note": value}, {"rng": torch.tensor([value])}, keep_last=2)


def test_save_is_verified_points_latest_and_keeps_last(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step, step)
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("step_")) == ["step_0000020", "step_0000030"]
    assert (tmp_path / "latest").read_text().strip() == "step_0000030"
    path = ckpt.find_resumable(str(tmp_path))
    assert path.endswith("step_0000030")
    manifest = ckpt.verify(path)
    assert set(manifest["files"]) == {"checkpoint.json", "rank00000.pt"}
    reader = ckpt.ShardReader(path)
    assert reader.meta["step"] == 30 and reader.meta["note"] == 30
    assert torch.equal(reader.read("model/w"), torch.full((3,), 30.0))
    assert torch.equal(reader.rank_state(0)["rng"], torch.tensor([30]))
    state = ckpt.load_model_state(path, "model")
    assert list(state) == ["w"] and torch.equal(state["w"], torch.full((3,), 30.0))


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
    torch.save({}, tmp_path / "step_0000020" / "rank00000.pt")
    assert ckpt.find_resumable(str(tmp_path), log=lambda m: None).endswith("step_0000010")
    assert ckpt.resolve_checkpoint(str(tmp_path)).endswith("step_0000010")
    with pytest.raises(ckpt.CheckpointError, match="no verified checkpoint"):
        ckpt.resolve_checkpoint(str(tmp_path / "nothing"))


@pytest.mark.parametrize("numel", [1, 7, ckpt.MIN_PIECE - 1, 3 * ckpt.MIN_PIECE + 5, 10 * ckpt.MIN_PIECE])
@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 8])
def test_replicas_split_a_tensor_into_disjoint_ranges_that_cover_it(numel, replicas):
    owned = []
    for index in range(replicas):
        slot = ckpt.Slot("model/x", torch.empty(numel), (numel,), 0, replicas, index)
        owned += ckpt.owned_ranges(slot)
    covered = torch.zeros(numel, dtype=torch.int32)
    for offset, n in owned:
        covered[offset : offset + n] += 1
    assert torch.equal(covered, torch.ones(numel, dtype=torch.int32))
    if numel >= replicas * ckpt.MIN_PIECE:  # big tensors: every replica writes a share
        assert len(owned) == replicas


def test_missing_piece_and_wrong_shape_are_reported_by_key(tmp_path):
    path = _save(tmp_path, 10, 1)
    meta = ckpt.read_meta(path)
    meta["files"]["rank00000.pt"] = [e for e in meta["files"]["rank00000.pt"] if e[0] != "model/w"]
    reader = ckpt.ShardReader(path, meta)
    with pytest.raises(ckpt.CheckpointError, match=r"model/w\[0:3\] is only 0/3 present"):
        reader.read("model/w")
    with pytest.raises(ckpt.CheckpointError, match=r"model/w has shape \[3\] but the model needs \[4\]"):
        ckpt.load_slots(ckpt.ShardReader(path), [ckpt.Slot("model/w", torch.empty(4), (4,))])


def test_expert_shards_are_flat_ranges_of_the_global_tensor(tmp_path):
    """Two ranks of EP=2 hold experts [0, 2) and [2, 4): each slot is a contiguous flat range."""
    from diffmoe_dist.config import ModelConfig, MoEConfig
    from diffmoe_dist.model.build import build_model
    from diffmoe_dist.model.moe.experts import expert_modules
    from diffmoe_dist.parallel.groups import ParallelDims

    torch.manual_seed(0)
    full = build_model(ModelConfig(depth=2, hidden_size=32, num_heads=4), MoEConfig("expert_choice_global", 4))
    single = ckpt.module_slots("model", full, ParallelDims.single())
    for rank in (0, 1):
        torch.manual_seed(0)
        model = build_model(ModelConfig(depth=2, hidden_size=32, num_heads=4), MoEConfig("expert_choice_global", 4))
        for m in expert_modules(model).values():
            m.shard(rank, 2)
        dims = ParallelDims(2, rank, 2, rank, (0, 1), (rank,))
        for name, slot in ckpt.module_slots("model", model, dims).items():
            assert slot.global_shape == single[name].global_shape
            flat = single[name].tensor.reshape(-1)
            assert torch.equal(slot.tensor.reshape(-1), flat[slot.start : slot.start + slot.tensor.numel()]), name
            if ".experts." in name:
                assert (slot.replicas, slot.start) == (1, rank * slot.tensor.numel())
            else:
                assert (slot.replicas, slot.replica_index) == (2, rank)
    assert json.dumps([list(s.global_shape) for s in single.values()])  # plain ints: JSON-able index
