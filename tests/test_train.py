import pytest
import torch

from saelab.sae import SAE
from saelab.train import evaluate, train_sae


def low_rank_data(n: int = 2048, d_in: int = 8) -> torch.Tensor:
    """Sparse non-negative combinations of 4 directions: an SAE can reconstruct these well."""
    directions = torch.randn(4, d_in)
    codes = torch.rand(n, 4) * (torch.rand(n, 4) < 0.3)
    return codes @ directions


def test_training_lowers_validation_loss():
    data = low_rank_data()
    sae = SAE(d_in=8, d_sae=16)
    before = evaluate(sae, data, l1_coefficient=1e-3)["loss"]
    result = train_sae(sae, data, epochs=5, batch_size=64, progress=False)
    assert result.sae is sae
    assert list(result.history["epoch"]) == [1, 2, 3, 4, 5]
    assert result.history["val_loss"].iloc[-1] < 0.5 * before


def test_same_seed_same_sae():
    data = low_rank_data()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(train_sae(SAE(8, 16), data, epochs=2, batch_size=64, progress=False).sae)
    assert torch.equal(runs[0].W_enc, runs[1].W_enc)


def test_evaluate_by_hand():
    sae = SAE(d_in=2, d_sae=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # h = [[1, 0], [0, 0]] -> x_hat = h
    metrics = evaluate(sae, x, l1_coefficient=0.5, batch_size=1)
    assert metrics["mse"] == 0.25  # one squared error of 1 over 4 entries
    assert metrics["l1"] == 0.5 and metrics["l0"] == 0.5 and metrics["fraction_active"] == 0.25
    assert metrics["loss"] == 0.25 + 0.5 * 0.5


def test_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="d_in=3 but the SAE expects 8"):
        train_sae(SAE(8, 16), torch.randn(10, 3), epochs=1, progress=False)


def test_nan_activations_are_refused():
    data = low_rank_data()
    data[5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_sae(SAE(8, 16), data, epochs=1, progress=False)
