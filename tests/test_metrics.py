import copy
import math
import re

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from saelab.metrics import (
    ce_loss_recovered,
    dead_fraction,
    dense_fraction,
    describe_ce,
    evaluate_sae,
    from_sums,
    fvu,
    hook_mean,
    sums_of,
)
from saelab.sae import SAE, sae_for
from saelab.sae.loss import l1_penalty, reconstruction_mse

X = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean [2, 0]; squared distances to it: 1, 1
X_HAT = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # squared errors per token: 0, 4
H = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 3.0, 0.0, 0.0]])


def by_hand(x, x_hat, h) -> dict:
    return from_sums(sums_of(x, h, (x - x_hat).pow(2).sum()))


def test_l0_mse_l1_by_hand():
    m = by_hand(X, X_HAT, H)
    assert m["l0"] == 1.5 and m["fraction_active"] == 1.5 / 4
    assert m["mse"] == 4 / (2 * 2) and m["l1"] == (2 + 1 + 3) / 2


def test_fvu_sums_numerator_and_denominator_separately():
    assert by_hand(X, X_HAT, H)["fvu"] == 4 / 2  # sum ||x - x_hat||^2 = 4, sum ||x - mean||^2 = 2
    x = torch.tensor([[0.0], [10.0]])  # per-token ratios would weight the low-norm token's error far more
    x_hat = torch.tensor([[1.0], [10.0]])
    assert by_hand(x, x_hat, H)["fvu"] == pytest.approx(1 / 50)  # per-token ratios: inf
    assert by_hand(x, x, H)["fvu"] == 0.0 and math.isnan(fvu(1.0, 0.0))  # constant x: no variance to explain


def test_normalised_mse_by_hand():
    assert by_hand(X, X_HAT, H)["normalised_mse"] == pytest.approx(4 / 10)  # sum ||x||^2 = 1 + 9


def test_density_dead_dense_by_hand():
    density = by_hand(X, X_HAT, H)["density"]
    assert density.tolist() == [0.5, 1.0, 0.0, 0.0]
    assert dead_fraction(density).item() == 0.5
    assert dense_fraction(density, threshold=0.6).item() == 0.25


def test_sums_add_up_batch_by_batch():
    halves = sums_of(X[:1], H[:1], (X - X_HAT)[:1].pow(2).sum()) + sums_of(X[1:], H[1:], (X - X_HAT)[1:].pow(2).sum())
    whole = by_hand(X, X_HAT, H)
    assert {k: v for k, v in from_sums(halves).items() if k != "density"} == \
        {k: v for k, v in whole.items() if k != "density"}


@pytest.fixture(scope="module")
def tiny_lm() -> HookedTransformer:
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=6, d_head=4, n_heads=2, d_vocab=11,
                                  act_fn="gelu", normalization_type="LN", seed=0, device="cpu")
    return HookedTransformer(cfg).eval()  # device="cpu": TransformerLens would pick CUDA where there is one


def identity_sae(d: int) -> SAE:
    """relu(x) - relu(-x) = x: the SAE reconstructs exactly."""
    sae = sae_for("standard", d, 2 * d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([torch.eye(d), -torch.eye(d)], dim=1))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.W_dec.copy_(torch.cat([torch.eye(d), -torch.eye(d)], dim=0))
    return sae


def zero_sae(d: int) -> SAE:
    sae = SAE(d, 4)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    return sae


@pytest.mark.parametrize("skip_first", [True, False])
def test_ce_loss_recovered_is_one_for_a_perfect_sae_and_zero_for_zero(tiny_lm, skip_first, device):
    """The LM on `device`, the SAEs and tokens on the CPU: CE runs where the LM is and moves the rest."""
    lm = copy.deepcopy(tiny_lm).to(device)
    tokens = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_resid_pre"
    perfect = ce_loss_recovered(lm, identity_sae(8), tokens, hook, batch_size=2, skip_first_position=skip_first)
    assert math.isclose(perfect["ce_clean"], tiny_lm(tokens, return_type="loss").item(), rel_tol=1e-5)
    assert math.isclose(perfect["ce_sae"], perfect["ce_clean"], rel_tol=1e-5)
    assert math.isclose(perfect["ce_loss_recovered"], 1.0, abs_tol=1e-3)
    assert abs(perfect["kl_sae"]) < 1e-5 and perfect["kl_zero"] > 0
    assert math.isclose(perfect["ce_loss_recovered_mean"], 1.0, abs_tol=1e-3) and abs(perfect["delta_ce"]) < 1e-4
    zero = ce_loss_recovered(lm, zero_sae(8), tokens, hook, batch_size=2, skip_first_position=skip_first)
    assert zero["ce_sae"] == zero["ce_zero"] and zero["ce_loss_recovered"] == 0.0
    assert zero["delta_ce"] == pytest.approx(zero["ce_zero"] - zero["ce_clean"])


def test_an_sae_that_outputs_the_mean_sits_on_the_mean_ablation_floor(tiny_lm):
    """x_hat = b_dec = the hook's mean over the evaluated positions: CE_sae is CE_mean, recovered_mean 0."""
    tokens = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(2))
    hook = "blocks.1.hook_resid_pre"
    mean = hook_mean(tiny_lm, tokens, hook, batch_size=2)
    _, cache = tiny_lm.run_with_cache(tokens, names_filter=[hook])
    assert torch.allclose(mean, cache[hook][:, 1:].reshape(-1, 8).mean(0), atol=1e-5)
    sae = zero_sae(8)
    with torch.no_grad():
        sae.b_dec.copy_(mean)
    ce = ce_loss_recovered(tiny_lm, sae, tokens, hook, batch_size=2)
    assert ce["ce_sae"] == pytest.approx(ce["ce_mean"], rel=1e-6) and abs(ce["ce_loss_recovered_mean"]) < 1e-4
    assert ce["kl_sae"] == pytest.approx(ce["kl_mean"], rel=1e-5) and ce["ce_mean"] != ce["ce_zero"]


def test_ce_loss_recovered_on_device_equals_cpu_and_leaves_the_sae_where_it_was(tiny_lm, device, tolerance):
    tokens = torch.randint(0, 11, (5, 6), generator=torch.Generator().manual_seed(1))
    hook, sae = "blocks.1.hook_resid_pre", SAE(8, 16)
    expected = ce_loss_recovered(tiny_lm, sae, tokens, hook, batch_size=2)
    result = ce_loss_recovered(copy.deepcopy(tiny_lm).to(device), sae, tokens, hook, batch_size=2)
    assert {p.device.type for p in sae.parameters()} == {"cpu"}  # a copy went to the LM's device, not the SAE
    measured = [k for k in expected if k != "ce_loss_recovered"]  # the ratio amplifies noise when CE_zero ~ CE_clean
    torch.testing.assert_close(torch.tensor([result[k] for k in measured]),
                               torch.tensor([expected[k] for k in measured]), **tolerance)
    assert expected["kl_sae"] > 0.01  # a random SAE changes the predictions: the comparison is not vacuous


def test_evaluate_sae_runs_where_the_sae_lives(device, tolerance):
    sae, x = SAE(4, 6), torch.randn(10, 4) + 1  # activations on the CPU, the SAE on `device`
    expected = evaluate_sae(sae, x, batch_size=3)
    result = evaluate_sae(copy.deepcopy(sae).to(device), x, batch_size=3)
    assert result.keys() == expected.keys() and result["density"].device.type == "cpu"
    for name, value in expected.items():
        torch.testing.assert_close(torch.as_tensor(result[name]), torch.as_tensor(value), **tolerance, msg=name)


def test_evaluate_sae_in_batches_equals_the_one_batch_formulas():
    sae = SAE(4, 6)
    x = torch.randn(10, 4) + 2
    out = sae(x)
    density = torch.count_nonzero(out.h, dim=0).double() / 10
    whole = {"l0": density.sum(), "fvu": (x - out.x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum(),
             "normalised_mse": (x - out.x_hat).pow(2).sum() / x.pow(2).sum(),
             "dead_fraction": dead_fraction(density), "dense_fraction": dense_fraction(density),
             "mse": reconstruction_mse(x, out.x_hat), "l1": l1_penalty(out.h), "fraction_active": density.sum() / 6}
    batched = evaluate_sae(sae, x, batch_size=3)
    for name, value in whole.items():
        assert batched[name] == pytest.approx(value.item(), rel=1e-5), name
    assert torch.allclose(batched["density"], density)


@pytest.mark.parametrize("ce, says", [
    ({"ce_clean": 5.0, "ce_zero": 5.01, "ce_sae": 4.963, "ce_loss_recovered": 4.7}, "only 0.010 nats.*470%"),
    ({"ce_clean": 3.0, "ce_zero": 10.0, "ce_sae": 2.3, "ce_loss_recovered": 1.1}, "110% is outside.*below the clean"),
    ({"ce_clean": 3.0, "ce_zero": 10.0, "ce_sae": 3.7, "ce_loss_recovered": 0.9},
     "^CE loss recovered 90.0% against the zero-ablation floor: the SAE adds ΔCE = 0.700 nats.*7.000"),
    ({"ce_clean": 3.0, "ce_zero": 10.0, "ce_mean": 5.0, "ce_sae": 3.7, "ce_loss_recovered": 0.9,
      "ce_loss_recovered_mean": 0.65, "kl_sae": 0.25}, "mean-ablation floor \\(\\+2.000 nats\\) it recovers 65.0%; KL"),
])
def test_ce_description_carries_its_caveat_when_the_ratio_misleads(ce, says):
    assert re.search(says, describe_ce(ce))
    assert describe_ce(ce).startswith("Caveat") == ("outside" in says or "only" in says)


def test_evaluate_sae_on_given_rows_equals_evaluating_those_rows():
    sae = SAE(4, 6)
    x = torch.randn(10, 4)
    rows = torch.tensor([8, 2, 5, 3])
    on_rows, copied = evaluate_sae(sae, x, batch_size=3, rows=rows), evaluate_sae(sae, x[rows])
    for name in ("l0", "fvu", "mse", "l1", "dead_fraction"):
        assert on_rows[name] == pytest.approx(copied[name], rel=1e-9), name


def test_a_sparse_steps_kept_values_give_the_same_l0_mse_and_fvu():
    dense = by_hand(X, X_HAT, H)
    kept = from_sums(sums_of(X, H[H != 0], (X - X_HAT).pow(2).sum()))  # (nnz,) as TopK's sparse step returns
    assert kept == {k: dense[k] for k in ("l0", "mse", "l1", "fvu", "normalised_mse")}
