import pytest
import torch

from saelab.config import load_profile
from saelab.loss import sae_loss, topk_aux_loss
from saelab.recipes import (
    autograd_grads,
    default_aux_k,
    geometric_median,
    init_b_dec,
    normalise_decoder_rows,
    recipe_of,
    remove_parallel_grad,
    tied_l1_grads,
)
from saelab.sae import SAE
from saelab.train import sae_for_profile, train_sae


def grads(sae: SAE) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def test_hand_written_tied_gradients_equal_autograd():
    sae = SAE(d_in=6, d_sae=10).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    fast = tied_l1_grads(sae, x, l1_coefficient=0.3)
    fast_grads = grads(sae)
    sae.zero_grad()
    ref = autograd_grads(sae, x, l1_coefficient=0.3)
    assert torch.allclose(fast.loss, ref.loss) and torch.allclose(fast.sse, ref.sse)
    assert torch.allclose(fast.mass, ref.mass) and torch.allclose(fast.h, ref.h)
    assert torch.allclose(fast.penalty, ref.penalty)
    for name, grad in grads(sae).items():
        assert torch.allclose(fast_grads[name], grad, atol=1e-12), name


def test_autograd_loss_is_the_seed_loss():
    sae = SAE(d_in=4, d_sae=8, tied=False)
    x = torch.randn(5, 4)
    out = sae(x)
    stats = autograd_grads(sae, x, l1_coefficient=0.1)
    assert torch.allclose(stats.loss, sae_loss(x, out.x_hat, out.h, 0.1))


def test_topk_step_uses_the_same_codes_as_encode():
    sae = SAE(d_in=4, d_sae=8, tied=False, k=3)
    x = torch.randn(5, 4)
    stats = autograd_grads(sae, x, l1_coefficient=0.1)
    assert torch.equal(stats.h, sae.encode(x)) and torch.equal(stats.mass, stats.h.sum(0))
    assert stats.penalty.item() == 0.0  # no dead latents: AuxK is zero


def test_aux_loss_by_hand():
    pre = torch.tensor([[2.0, 5.0, 1.0]])  # latent 1 is live; 0 and 2 are dead
    dead = torch.tensor([True, False, True])
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    residual = torch.tensor([[3.0, 1.0]])
    # aux_k=1: the largest dead pre-activation is latent 0 (2.0) -> e_hat = [2, 0] -> errors 1, 1 -> mean 1
    assert topk_aux_loss(pre, dead, residual, W_dec, aux_k=1).item() == 1.0
    # aux_k=2: latents 0 and 2 -> e_hat = [2, 0] + [1, 1] = [3, 1] -> 0
    assert topk_aux_loss(pre, dead, residual, W_dec, aux_k=2).item() == 0.0
    assert topk_aux_loss(pre, torch.zeros(3, dtype=torch.bool), residual, W_dec, aux_k=2).item() == 0.0


def test_parallel_gradient_removed_and_rows_renormalised_by_hand():
    sae = SAE(d_in=2, d_sae=2, tied=False)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    sae.W_dec.grad = torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    remove_parallel_grad(sae)
    assert torch.equal(sae.W_dec.grad, torch.tensor([[0.0, 4.0], [5.0, 0.0]]))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    normalise_decoder_rows(sae)
    assert torch.allclose(sae.W_dec, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_geometric_median_ignores_an_outlier():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]])  # 1-D: the median is 1; the mean 33.7
    assert torch.allclose(geometric_median(points), torch.tensor([1.0, 0.0]), atol=1e-3)
    sae = SAE(2, 4)
    init_b_dec(sae, points, "mean")
    assert torch.allclose(sae.b_dec, points.mean(0))
    with pytest.raises(ValueError, match="geometric_median"):
        init_b_dec(sae, points, "median")


def test_default_aux_k_is_a_power_of_two_near_half_d_in():
    assert default_aux_k(768) == 512 and default_aux_k(64) == 32


@pytest.mark.parametrize("recipe", ["tied_l1", "l1", "topk"])
def test_one_profile_field_switches_the_recipe(recipe):
    profile = load_profile("offline", recipe=recipe, d_in=8, expansion_factor=2, topk_k=3)
    sae = sae_for_profile(profile)
    assert recipe_of(sae) == recipe and sae.d_sae == 16
    data = torch.randn(300, 8)
    train_sae(sae, data, epochs=2, batch_size=32, progress=False)
    h = sae.encode(data)
    if recipe == "l1":  # unit-norm decoder rows survive training
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(16), atol=1e-5)
    if recipe == "topk":
        assert (torch.count_nonzero(h, dim=1) <= 3).all()


def test_sae_for_profile_is_seeded_and_leaves_the_global_rng_alone():
    profile = load_profile("offline")
    before = torch.random.get_rng_state()
    assert torch.equal(sae_for_profile(profile).W_enc, sae_for_profile(profile).W_enc)
    assert torch.equal(torch.random.get_rng_state(), before)


def test_every_b_dec_init_a_profile_accepts_is_implemented():
    from saelab.config import B_DEC_INITS

    for method in B_DEC_INITS:
        sae = SAE(d_in=3, d_sae=4)
        with torch.no_grad():
            init_b_dec(sae, torch.ones(5, 3), method)
        assert torch.allclose(sae.b_dec, torch.zeros(3) if method == "zeros" else torch.ones(3), atol=1e-4)
