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
