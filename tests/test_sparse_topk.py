"""The k-sparse architectures' sparse step: its pieces by hand, and the whole step against the dense
reference (`loss` under autograd) in float64, for every k-sparse architecture, with and without dead
latents (AuxK), on the CPU's kernels and on the capturable (CUDA) ones, which run on the CPU too."""

import pytest
import torch

from saelab.sae import REGISTRY, sae_for
from saelab.sae.loss import dead_topk
from saelab.sae.topk import Codes, TopKSAE, entry_dots, per_token_codes, rows_gradient, sparse_decode
from saelab.train.loop import train_sae

K_SPARSE = [name for name, cls in REGISTRY.items() if issubclass(cls, TopKSAE)]
F64 = torch.float64


def test_every_k_sparse_architecture_is_covered():
    assert {"topk", "batchtopk"} <= set(K_SPARSE)


def test_sparse_decode_sums_the_kept_decoder_rows_by_hand():
    W_dec = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # [d_sae, d_in]
    # token 0 keeps latents 2 (2.0) and 0 (0.5); token 1 keeps nothing; token 2 keeps latent 1 (3.0)
    codes = Codes(rows=torch.tensor([0, 0, 2]), cols=torch.tensor([2, 0, 1]), values=torch.tensor([2.0, 0.5, 3.0]),
                  offsets=torch.tensor([0, 2, 2]))
    out = sparse_decode(codes, codes.values, W_dec)
    assert torch.equal(out, torch.tensor([[2.5, 2.0], [0.0, 0.0], [0.0, 3.0]]))
    grad = torch.tensor([[1.0, 2.0], [5.0, 5.0], [-1.0, 4.0]])
    # d out / d weight_i = grad[token] . W_dec[latent]: [1 + 2, 1, 4]
    assert torch.equal(entry_dots(grad, codes.rows, W_dec, codes), torch.tensor([3.0, 1.0, 4.0]))


@pytest.mark.parametrize("capturable", [False, True])
def test_rows_gradient_is_the_sparse_transpose_product_by_hand(capturable):
    dense = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # (bags, d)
    cols, bags, weights = torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1]), torch.tensor([2.0, 3.0, -1.0])
    out = rows_gradient(3, cols, weights, dense, bags, capturable)
    # row 0: 3 * dense[0]; row 1: 2 * dense[0] - dense[1]; row 2: nothing
    assert torch.equal(out, torch.tensor([[3.0, 6.0], [-1.0, 0.0], [0.0, 0.0]]))


@pytest.mark.parametrize("capturable", [False, True])
def test_dead_topk_finds_each_tokens_largest_dead_pre_activations(capturable):
    pre = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 4.0, -1.0, 6.0]])
    dead = torch.tensor([False, True, True, True])
    values, latents, factor = dead_topk(pre, dead, 2, capturable)
    kept = {(row, int(latent), float(v)) for row in range(2) for latent, v in zip(latents[row], values[row],
                                                                                     strict=True) if v > -1e30}
    assert kept == {(0, 2, 3.0), (0, 3, 2.0), (1, 3, 6.0), (1, 1, 4.0)}  # latent 0 is live: never chosen
    assert float(factor) == 1.0
    none_dead = torch.zeros(4, dtype=torch.bool)
    if capturable:  # no host sync: everything masked and a factor of 0 instead of None
        values, _, factor = dead_topk(pre, none_dead, 2, capturable)
        assert torch.isinf(values).all() and float(factor) == 0.0
    else:
        assert dead_topk(pre, none_dead, 2, capturable) is None


def test_per_token_codes_lists_entries_in_token_order():
    codes = per_token_codes(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5, 6], [7, 8]]))
    assert codes.rows.tolist() == [0, 0, 1, 1] and codes.cols.tolist() == [5, 6, 7, 8]
    assert codes.offsets.tolist() == [0, 2]


def dead_latents(pattern: str, d_sae: int, aux_k: int) -> torch.Tensor:
    dead = torch.zeros(d_sae, dtype=torch.bool)
    count = {"none": 0, "fewer than aux_k": aux_k // 2, "more than aux_k": 3 * aux_k}[pattern]
    dead[torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))[:count]] = True
    return dead


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("dead", ["none", "fewer than aux_k", "more than aux_k"])
@pytest.mark.parametrize("architecture", K_SPARSE)
def test_the_sparse_step_equals_the_dense_reference_in_float64(architecture, dead, capturable):
    torch.manual_seed(0)
    sae = sae_for(architecture, 6, 40, k=3, aux_k=4).double()
    with torch.no_grad():
        sae.b_enc.normal_()  # some pre-activations negative among the kept: ReLU's gradient matters
    x, dead = torch.randn(10, 6, dtype=F64), dead_latents(dead, 40, 4)
    buffers = {n: b.clone() for n, b in sae.named_buffers()}
    fast = sae._sparse_grads(x, dead, capturable)
    fast_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    fast_buffers = {n: b.clone() for n, b in sae.named_buffers()}
    sae.zero_grad()
    for n, b in sae.named_buffers():
        b.copy_(buffers[n])
    sae.sparse_backward = False
    ref = sae.backward(x, torch.tensor(0.0, dtype=F64), dead, F64)  # autograd through `loss`
    assert ref.h.shape == (10, 40) and fast.h.shape == (10 * 3,)  # the sparse step never forms (batch, d_sae)
    assert (ref.aux > 0) == dead.any()
    for name in ("total", "mse", "aux", "mass"):
        assert torch.allclose(getattr(fast, name), getattr(ref, name), rtol=1e-12, atol=1e-14), name
    assert torch.count_nonzero(fast.h) == torch.count_nonzero(ref.h)  # the L0 the loop logs
    for name, p in sae.named_parameters():
        assert torch.allclose(fast_grads[name], p.grad, rtol=1e-10, atol=1e-13), name
    for name, b in sae.named_buffers():  # BatchTopK's θ moves alike
        assert torch.equal(fast_buffers[name], b), name


@pytest.mark.parametrize("architecture", K_SPARSE)
def test_training_takes_the_sparse_step_and_follows_the_dense_one(architecture):
    torch.manual_seed(0)
    data = torch.randn(256, 8) * 2
    runs = {}
    for sparse in (True, False):
        sae = sae_for(architecture, 8, 32, k=3)
        sae.sparse_backward = sparse
        with torch.random.fork_rng():
            torch.manual_seed(1)
            sae.load_state_dict(sae_for(architecture, 8, 32, k=3).state_dict())
        runs[sparse] = train_sae(sae, data, epochs=2, batch_size=32, progress=False, dead_after_tokens=64)
    for (name, a), b in zip(runs[True].sae.state_dict().items(), runs[False].sae.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-5), name
    assert runs[True].history["dead_fraction"].tolist() == runs[False].history["dead_fraction"].tolist()


def test_the_sparse_step_falls_back_to_the_dense_reference_where_it_does_not_apply():
    sae = sae_for("topk", 4, 8, k=2, apply_b_dec_to_input=True)
    losses = sae.backward(torch.randn(5, 4), torch.tensor(0.0), torch.zeros(8, dtype=torch.bool))
    assert losses.h.shape == (5, 8)  # autograd's path: SAELens' apply_b_dec_to_input is not in the sparse one
