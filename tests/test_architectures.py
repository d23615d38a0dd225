"""Each architecture by hand (2x2 weights), its loss terms and gradients, and the registry."""

import pytest
import torch

from saelab.sae import ARCHITECTURES, SAE, Losses, geometric_median, register, sae_for
from saelab.sae import base as sae_module  # the registry lives here
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.sae.loss import l0_penalty, l1_penalty, reconstruction_mse
from saelab.sae.relu import TiedSAE
from saelab.sae.topk import BatchTopKSAE, default_aux_k
from saelab.train.loop import train_sae

OPTIONS = {"topk": {"k": 2}, "batchtopk": {"k": 2}}  # the rest train with their defaults


def hand(architecture: str, **options) -> SAE:
    """d_in=2, d_sae=2: pre = x @ W_enc + b_enc; untied decoders swap the two axes."""
    sae = sae_for(architecture, 2, 2, **options)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))  # [d_in, d_sae]
        sae.b_enc.copy_(torch.tensor([0.0, 0.5]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.1]))
        if architecture != "tied":
            sae.W_dec.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # [d_sae, d_in]
    return sae


X = torch.tensor([[1.0, 1.0], [1.0, -1.0], [0.5, 0.5]])
# pre = X @ W_enc + b_enc = [[3, 0], [-1, -1], [1.5, 0.25]]


def test_tied_encodes_and_decodes_by_hand():
    out = hand("tied")(X)
    assert torch.equal(out.h, torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.5, 0.25]]))
    # x_hat row 0 = 3 * W_enc[:, 0] + b_dec = [3.1, 5.9]
    assert torch.allclose(out.x_hat[0], torch.tensor([3.1, 5.9]))


def test_tied_matches_the_seed_code():
    # the seed: x_recon = F.linear(h, encoder.weight.t(), decoder_bias), encoder = nn.Linear(d_in, d_sae)
    sae = SAE(d_in=5, d_sae=7)
    encoder = torch.nn.Linear(5, 7)
    with torch.no_grad():
        encoder.weight.copy_(sae.W_enc.t())
        encoder.bias.copy_(sae.b_enc)
    x = torch.randn(4, 5)
    expected = torch.nn.functional.linear(torch.relu(encoder(x)), encoder.weight.t(), sae.b_dec)
    assert torch.allclose(sae(x).x_hat, expected, atol=1e-6)


def test_standard_uses_its_own_decoder_by_hand():
    out = hand("standard")(X)  # x_hat row 0 = 3 * W_dec[0] + b_dec = [0.1, 2.9]
    assert torch.allclose(out.x_hat[0], torch.tensor([0.1, 2.9]))


def test_topk_keeps_the_k_largest_then_relu():
    sae = hand("topk", k=1)
    assert torch.equal(sae.encode(X), torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.5, 0.0]]))


def test_batchtopk_keeps_k_per_token_over_the_batch_then_thresholds_at_inference():
    sae = hand("batchtopk", k=1, threshold_lr=0.5)
    pre = sae.pre_activation(X)
    h = sae.activate_for_training(pre)  # 3 tokens x k=1: the 3 largest of the batch are 3, 1.5 and 0.25
    assert torch.equal(h, torch.tensor([[3.0, 0.0], [0.0, 0.0], [1.5, 0.25]]))
    assert sae.threshold.item() == 0.125  # θ moved halfway from 0 to the smallest kept activation, 0.25
    # inference: pre > θ, so 0.25 stays and nothing depends on the rest of the batch
    assert torch.equal(sae.encode(X[2:]), torch.tensor([[1.5, 0.25]]))


def test_batchtopk_threshold_stays_when_nothing_fires():
    sae = hand("batchtopk", k=1)
    sae.activate_for_training(torch.full((2, 2), -1.0))
    assert sae.threshold.item() == 0.0


def test_jumprelu_passes_only_pre_activations_above_the_threshold():
    sae = hand("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([2.0, 0.2]))
    assert torch.equal(sae.encode(X), torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 0.25]]))


def test_jumprelu_threshold_gradients_by_hand():
    """pre = 1.0 sits 0.01 above θ = 0.99, inside the kernel of width ε = 0.1:
    d h/dθ = -(θ/ε) = -9.9 (activation STE), d H(pre - θ)/dθ = -1/ε = -10 (the L0 STE)."""
    pre, threshold = torch.tensor([[1.0, 5.0]]), torch.tensor([0.99, 0.99], requires_grad=True)
    from saelab.sae.loss import jumprelu

    h = jumprelu(pre, threshold, 0.1)
    assert torch.equal(h, torch.tensor([[1.0, 5.0]]))  # the estimator's term adds nothing forward
    h.sum().backward()
    assert torch.allclose(threshold.grad, torch.tensor([-9.9, 0.0]))
    threshold.grad = None
    l0_penalty(pre, threshold, 0.1).backward()
    assert torch.allclose(threshold.grad, torch.tensor([-10.0, 0.0]))
    assert l0_penalty(pre, threshold, 0.1).item() == 2.0


@pytest.mark.parametrize("augmented", [True, False])
def test_hand_written_tied_gradients_equal_autograd(augmented):
    sae = SAE(d_in=6, d_sae=10).double()
    x, coefficient = torch.randn(9, 6, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    fast = sae._exact_grads(x, coefficient, augmented=augmented)
    fast_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    ref = SAE.backward(sae, x, coefficient, torch.zeros(10, dtype=torch.bool), dtype=torch.float64)
    for name in ("total", "mse", "sparsity", "mass", "h"):
        assert torch.allclose(getattr(fast, name), getattr(ref, name)), name
    for name, p in sae.named_parameters():
        assert torch.allclose(fast_grads[name], p.grad, atol=1e-12), name


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_loss_is_its_named_terms(architecture):
    sae = sae_for(architecture, 4, 8, **OPTIONS.get(architecture, {}))
    x = torch.randn(6, 4)
    losses = sae.loss(x, torch.tensor(0.1), torch.ones(8, dtype=torch.bool))
    assert isinstance(losses, Losses)
    assert torch.allclose(losses.total, losses.mse + 0.1 * losses.sparsity + losses.aux)
    assert torch.equal(losses.mass, losses.h.sum(0)) and (losses.h >= 0).all()
    losses.total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in sae.parameters())


def test_the_l1_architectures_train_on_the_seed_loss():
    sae = sae_for("standard", 4, 8)
    x = torch.randn(5, 4)
    losses = sae.loss(x, torch.tensor(0.1), torch.zeros(8, dtype=torch.bool))
    out = sae(x)
    assert torch.allclose(losses.total, reconstruction_mse(x, out.x_hat) + 0.1 * l1_penalty(out.h))


def test_unit_norm_decoder_constraint_by_hand():
    sae = hand("standard")
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    sae.W_dec.grad = torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    sae.constrain_grads()  # the component along each (unit) row is removed
    assert torch.equal(sae.W_dec.grad, torch.tensor([[0.0, 4.0], [5.0, 0.0]]))
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    sae.constrain_weights()
    assert torch.allclose(sae.W_dec, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))


def test_jumprelu_thresholds_stay_non_negative():
    sae = hand("jumprelu")
    with torch.no_grad():
        sae.threshold.copy_(torch.tensor([-0.5, 0.3]))
    sae.constrain_weights()
    assert torch.equal(sae.threshold.detach(), torch.tensor([0.0, 0.3]))


def test_sae_with_no_architecture_is_the_seeds_tied_one():
    assert type(SAE(3, 6)) is TiedSAE
    assert {n for n, _ in SAE(3, 6).named_parameters()} == {"W_enc", "b_enc", "b_dec"}


@pytest.mark.parametrize("call, message", [
    (lambda: sae_for("gated", 2, 4), "unknown architecture 'gated'; choose one of"),
    (lambda: sae_for("jumprelu", 2, 4, k=3), r"jumprelu takes the options \['bandwidth', 'init_threshold'\]; "
                                               r"'k' belongs to \['topk', 'batchtopk'\]"),
    (lambda: sae_for("topk", 2, 4, k=5), "k=5 must be an integer between 1 and d_sae=4"),
    (lambda: sae_for("tied", 0, 4), "d_in and d_sae must be positive"),
    (lambda: sae_for("jumprelu", 2, 4, bandwidth=0.0), "bandwidth=0.0 must be > 0"),
])
def test_bad_construction_says_what_is_valid(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_new_architecture_is_one_class(monkeypatch):
    """Registered by name, it trains in the one loop and saves and loads, with nothing else changed."""
    monkeypatch.setattr(sae_module, "REGISTRY", dict(sae_module.REGISTRY))

    @register("abs")
    class AbsSAE(sae_module.REGISTRY["standard"]):
        def encode(self, x):
            return self.pre_activation(x).abs()

        def loss(self, x, sparsity_coefficient, dead):
            h = self.encode(x)
            mse = reconstruction_mse(x, self.decode(h))
            return Losses(mse, mse, mse.new_zeros(()), mse.new_zeros(()), h.detach(), h.detach().sum(0))

    sae = sae_for("abs", 4, 8)
    before = reconstruction_mse(torch.ones(1, 4), sae(torch.ones(1, 4)).x_hat).item()
    train_sae(sae, torch.ones(64, 4), epochs=20, batch_size=16, progress=False, lr=1e-2)
    assert reconstruction_mse(torch.ones(1, 4), sae(torch.ones(1, 4)).x_hat).item() < before / 10


def test_default_aux_k_is_a_power_of_two_near_half_d_in():
    assert default_aux_k(768) == 512 and default_aux_k(64) == 32


def test_geometric_median_ignores_an_outlier():
    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [100.0, 0.0]])  # 1-D: the median is 1; the mean 33.7
    assert torch.allclose(geometric_median(points), torch.tensor([1.0, 0.0]), atol=1e-3)
    sae = SAE(2, 4)
    sae.init_b_dec(points, "mean")
    assert torch.allclose(sae.b_dec, points.mean(0))
    with pytest.raises(ValueError, match="geometric_median"):
        sae.init_b_dec(points, "median")


def test_every_b_dec_init_a_profile_accepts_is_implemented():
    from saelab.config import B_DEC_INITS

    for method in B_DEC_INITS:
        sae = SAE(d_in=3, d_sae=4)
        sae.init_b_dec(torch.ones(5, 3), method)
        assert torch.allclose(sae.b_dec, torch.zeros(3) if method == "zeros" else torch.ones(3), atol=1e-4)


def test_batchtopk_threshold_keeps_float64_through_moves():
    sae = BatchTopKSAE(2, 4, k=1).float()
    assert sae.threshold.dtype == torch.float64


def test_jumprelu_threshold_is_a_parameter_adam_trains():
    assert "threshold" in dict(JumpReLUSAE(2, 4).named_parameters())
