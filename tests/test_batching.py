import pytest
import torch

from saelab.batching import check_activations, sequential_batches, shuffled_batches, train_val_split


def rows(n: int, d: int = 3) -> torch.Tensor:
    """Row i is filled with the value i, so a batch tells which rows it holds."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, d).clone()


def test_every_row_exactly_once_per_epoch():
    data = rows(103)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        seen = torch.cat([b[:, 0] for b in shuffled_batches(data, 10, generator=generator)])
        assert sorted(seen.tolist()) == list(range(103))


def test_batches_are_shuffled_and_sized():
    batches = list(shuffled_batches(rows(100), 32, generator=torch.Generator().manual_seed(1)))
    assert [b.shape[0] for b in batches] == [32, 32, 32, 4]
    assert torch.cat([b[:, 0] for b in batches]).tolist() != list(range(100))


def test_drop_last_drops_the_short_batch():
    assert [b.shape[0] for b in shuffled_batches(rows(100), 32, drop_last=True)] == [32, 32, 32]


def test_same_seed_same_order():
    a = [b[:, 0] for b in shuffled_batches(rows(50), 8, generator=torch.Generator().manual_seed(3))]
    b = [b[:, 0] for b in shuffled_batches(rows(50), 8, generator=torch.Generator().manual_seed(3))]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_split_is_disjoint_complete_and_sized():
    split = train_val_split(rows(100), val_fraction=0.1, seed=0)
    train, val = split.train[:, 0].tolist(), split.val[:, 0].tolist()
    assert len(val) == 10 and len(train) == 90
    assert sorted(train + val) == list(range(100))


def test_tiny_split_keeps_one_row_each_side():
    split = train_val_split(rows(2), val_fraction=0.01)
    assert (split.train.shape[0], split.val.shape[0]) == (1, 1)


def test_sequential_batches_keep_order():
    assert torch.cat([b[:, 0] for b in sequential_batches(rows(7), 3)]).tolist() == list(range(7))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(0, 4), "empty"),
    (torch.zeros(4), "2-D tensor"),
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), "1 activation rows contain NaN"),
    (torch.zeros(3, 2, dtype=torch.int64), "floating point"),
])
def test_bad_activations_are_clear_errors(bad, message):
    with pytest.raises(ValueError, match=message):
        check_activations(bad)
