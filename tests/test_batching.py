import pytest
import torch

from saelab.train.batching import (
    check_activations,
    device_batches,
    epoch_order,
    to_training_device,
    train_val_split,
)


def rows(n: int, d: int = 3) -> torch.Tensor:
    """Row i is filled with the value i, so a batch tells which rows it holds."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).clone()


def test_every_row_exactly_once_per_epoch_in_a_shuffled_order():
    rows = torch.arange(103)
    for epoch in (1, 2):
        order = epoch_order(rows, seed=0, epoch=epoch)
        assert sorted(order.tolist()) == list(range(103)) and order.tolist() != list(range(103))
    assert not torch.equal(epoch_order(rows, 0, 1), epoch_order(rows, 0, 2))  # a new order each epoch


def test_same_seed_and_epoch_same_order_and_only_the_given_rows():
    chosen = torch.tensor([7, 3, 11, 0, 5])
    assert torch.equal(epoch_order(chosen, 3, 1), epoch_order(chosen, 3, 1))
    assert sorted(epoch_order(chosen, 3, 1).tolist()) == [0, 3, 5, 7, 11]


@pytest.mark.parametrize("prefetch", [False, True])
def test_device_batches_are_the_order_in_batches_from_any_start(prefetch):
    data = rows(53).half()  # a store dtype: batches come out float32
    order = epoch_order(torch.arange(53), seed=0, epoch=1)
    batches = list(device_batches(data, order, 8, torch.device("cpu"), start=2, chunk_rows=16, prefetch=prefetch))
    assert [b.shape[0] for b in batches] == [8, 8, 8, 8, 5] and batches[0].dtype == torch.float32
    assert torch.cat([b[:, 0] for b in batches]).tolist() == order[16:].float().tolist()


def test_split_is_disjoint_complete_sized_and_seeded_row_indices():
    split = train_val_split(100, val_fraction=0.1, seed=0)
    train, val = split.train.tolist(), split.val.tolist()
    assert split.train.dtype == torch.int64 and len(val) == 10 and len(train) == 90
    assert sorted(train + val) == list(range(100))
    assert torch.equal(train_val_split(100, 0.1, seed=0).val, split.val)
    assert not torch.equal(train_val_split(100, 0.1, seed=1).val, split.val)


def test_tiny_split_keeps_one_row_each_side():
    split = train_val_split(2, val_fraction=0.01)
    assert (split.train.shape[0], split.val.shape[0]) == (1, 1)


def test_float32_data_on_cpu_is_not_copied_for_training():
    data = rows(10)
    assert to_training_device(data, "cpu") is data


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(0, 4), "empty"),
    (torch.zeros(4), "2-D tensor"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "1 activation rows contain NaN"),
    (torch.zeros(3, 2, dtype=torch.int64), "floating point"),
])
def test_bad_activations_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        check_activations(bad)


def test_nan_check_works_chunk_by_chunk(monkeypatch):
    """isfinite over all rows at once would allocate temporaries larger than the data itself."""
    import saelab.train.batching as batching

    sizes, isfinite = [], torch.isfinite
    monkeypatch.setattr(batching, "CHECK_ROWS", 4)
    monkeypatch.setattr(torch, "isfinite", lambda t: sizes.append(t.shape[0]) or isfinite(t))
    data = rows(10)
    check_activations(data)
    data[9, 1] = float("inf")
    with pytest.raises(ValueError, match="1 activation rows"):
        check_activations(data)
    assert sizes and max(sizes) <= 4
