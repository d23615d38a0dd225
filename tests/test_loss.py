import torch

from saelab.sae.loss import decoder_weighted_l1_penalty, l1_penalty, reconstruction_mse, sae_loss

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


def test_decoder_weighted_l1_by_hand():
    W_dec = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.5]])  # row norms 5, 1, 0.5
    # rows: 1*5 + 2*0.5 = 6 and 3*0.5 = 1.5 -> mean 3.75
    assert decoder_weighted_l1_penalty(H, W_dec).item() == 3.75


def test_decoder_weighted_l1_equals_l1_for_unit_norm_rows():
    # the untied architectures hold decoder rows at unit norm, so their plain L1 is SAELens' weighted one
    W_dec = torch.nn.functional.normalize(torch.randn(3, 2), dim=1)
    assert torch.isclose(decoder_weighted_l1_penalty(H, W_dec), l1_penalty(H))


def test_total_loss_is_mse_plus_lambda_l1():
    assert torch.isclose(sae_loss(X, X_HAT, H, l1_coefficient=0.1), torch.tensor(5 / 4 + 0.3))


def test_saelens_scale_is_d_in_times_ours():
    # SAELens: sum over d_in, mean over batch. Same optimum with coefficient d_in * λ.
    d_in, lam = X.shape[1], 0.1
    saelens = (X_HAT - X).pow(2).sum(-1).mean() + d_in * lam * l1_penalty(H)
    assert torch.isclose(saelens, d_in * sae_loss(X, X_HAT, H, lam))
