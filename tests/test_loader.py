import pytest
import torch

from diffmoe_dist.data.loader import GlobalBatchLoader


def _data(n=50):
    return {"x": torch.arange(n).float().view(n, 1), "y": torch.arange(n)}


def _global_stream(world_size, steps, global_batch=10, seed=3):
    loaders = [GlobalBatchLoader(_data(), global_batch, r, world_size, seed) for r in range(world_size)]
    out = []
    for _ in range(steps):
        out.append(torch.cat([ld.next_batch()["y"] for ld in loaders]))
    return torch.cat(out)


def test_global_order_is_the_same_for_any_world_size():
    ref = _global_stream(1, 12)
    assert torch.equal(_global_stream(2, 12), ref)
    assert torch.equal(_global_stream(5, 12), ref)


def test_each_epoch_is_a_permutation_and_epochs_differ():
    stream = _global_stream(1, 10)  # 100 samples = 2 epochs of 50
    e0, e1 = stream[:50], stream[50:]
    assert torch.equal(e0.sort().values, torch.arange(50)) and torch.equal(e1.sort().values, torch.arange(50))
    assert not torch.equal(e0, e1)


def test_state_dict_resumes_mid_epoch_even_at_another_world_size():
    ref = _global_stream(1, 8)
    first = GlobalBatchLoader(_data(), 10, 0, 1, 3)
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    resumed = [GlobalBatchLoader(_data(), 10, r, 2, 3) for r in range(2)]
    for ld in resumed:
        ld.load_state_dict(state)
    rest = torch.cat([torch.cat([ld.next_batch()["y"] for ld in resumed]) for _ in range(5)])
    assert torch.equal(rest, ref[30:])


def test_batches_carry_matching_fields():
    ld = GlobalBatchLoader(_data(), 10, 1, 2, 0)
    b = ld.next_batch()
    assert torch.equal(b["x"].view(-1).long(), b["y"]) and len(b["y"]) == 5


SHARDS = [7, 5, 9, 3, 8, 6, 10, 4]  # uneven shards: 52 samples


def _windowed_stream(world_size, steps, window=3, global_batch=12, seed=3, start=0):
    loaders = []
    for r in range(world_size):
        ld = GlobalBatchLoader(_data(sum(SHARDS)), global_batch, r, world_size, seed, SHARDS, window)
        ld.samples_seen = start
        loaders.append(ld)
    return [torch.cat([ld.next_batch()["y"] for ld in loaders]) for _ in range(steps)]


def test_windowed_order_is_the_same_for_any_world_size_and_resumes_from_one_integer():
    ref = _windowed_stream(1, 20)  # 240 samples: 4.6 epochs, batches crossing epoch and window ends
    for W in (2, 3, 4, 6):
        assert all(torch.equal(a, b) for a, b in zip(ref, _windowed_stream(W, 20), strict=True))
    resumed = _windowed_stream(4, 13, start=7 * 12)  # a checkpoint at step 7, read back at another W
    assert all(torch.equal(a, b) for a, b in zip(ref[7:], resumed, strict=True))


def test_windowed_epochs_are_permutations_and_batches_draw_from_one_window_in_shard_order():
    n = sum(SHARDS)
    stream = torch.cat(_windowed_stream(1, 13))  # 156 samples = 3 epochs of 52
    shard_of = torch.repeat_interleave(torch.arange(len(SHARDS)), torch.tensor(SHARDS))
    for e in range(3):
        assert torch.equal(stream[e * n : (e + 1) * n].sort().values, torch.arange(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])
    batch = stream[:12]  # the first batch lies in the first window (>= 12 samples in 3 shards)
    assert len(set(shard_of[batch].tolist())) <= 3
    # sorted by shard inside the batch: each shard's samples form one run
    runs = [k for k, s in enumerate(shard_of[batch].tolist()) if k == 0 or s != shard_of[batch][k - 1]]
    assert len(runs) == len(set(shard_of[batch].tolist()))
    with pytest.raises(ValueError, match="data.shuffle_window=3"):
        GlobalBatchLoader(_data(n), 12, 0, 1, 3).load_state_dict({"num_samples": n, "samples_seen": 0, "seed": 3,
                                                                  "shuffle_window": 3})  # fmt: skip
