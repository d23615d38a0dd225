import torch

from saelab.sae.loss import l1_penalty, reconstruction_mse

X = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_HAT = torch.tensor([[1.0, 0.0], [3.0, 5.0]])  # squared errors: 0, 4, 0, 1
H = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 3.0]])  # L1 per row: 3, 3


def test_mse_averages_over_batch_and_dimensions():
    assert reconstruction_mse(X, X_HAT).item() == 5 / 4


def test_mse_equals_torch_mse_loss_default():
    # Cunningham et al.'s normalisation, which the seed's λ = 1e-3 is defined against
    assert torch.equal(reconstruction_mse(X, X_HAT), torch.nn.functional.mse_loss(X_HAT, X))


def test_l1_sums_features_and_averages_batch():
    assert l1_penalty(H).item() == 3.0
    assert l1_penalty(-H).item() == 3.0


def test_saelens_scale_is_d_in_times_ours():
    # SAELens: sum over d_in, mean over batch, L1 weighted by ||W_dec[f]|| (1 for unit-norm rows).
    # Same optimum with coefficient d_in * λ.
    d_in, lam = X.shape[1], 0.1
    W_dec = torch.nn.functional.normalize(torch.randn(3, 2), dim=1)
    saelens = (X_HAT - X).pow(2).sum(-1).mean() + d_in * lam * (H.abs() * W_dec.norm(dim=1)).sum(-1).mean()
    ours = reconstruction_mse(X, X_HAT) + lam * l1_penalty(H)
    assert torch.isclose(saelens, d_in * ours)
