import json

import pytest
import torch

from saelab.sae import SAE


def hand_sae(tied: bool, k: int | None = None) -> SAE:
    """d_in=2, d_sae=2 with weights small enough to check by hand."""
    sae = SAE(d_in=2, d_sae=2, tied=tied, k=k)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5]]))  # [d_in, d_sae]
        sae.b_enc.copy_(torch.tensor([0.0, 0.5]))
        sae.b_dec.copy_(torch.tensor([0.1, -0.1]))
        if not tied:
            sae.W_dec.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # [d_sae, d_in]
    return sae


X = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
# pre = X @ W_enc + b_enc = [[3, 0], [-1, -1]]  ->  h = relu(pre) = [[3, 0], [0, 0]]
H = torch.tensor([[3.0, 0.0], [0.0, 0.0]])


def test_encode_by_hand():
    assert torch.equal(hand_sae(tied=True).encode(X), H)


def test_tied_decoder_is_encoder_transpose_by_hand():
    # x_hat = h @ W_enc^T + b_dec: row 0 = 3 * [1, 2] + [0.1, -0.1]
    out = hand_sae(tied=True)(X)
    assert torch.allclose(out.x_hat, torch.tensor([[3.1, 5.9], [0.1, -0.1]]))
    assert torch.equal(out.h, H)


def test_tied_matches_the_seed_code():
    # the seed: x_recon = F.linear(h, encoder.weight.t(), decoder_bias), encoder = nn.Linear(d_in, d_sae)
    sae = SAE(d_in=5, d_sae=7, tied=True)
    encoder = torch.nn.Linear(5, 7)
    with torch.no_grad():
        encoder.weight.copy_(sae.W_enc.t())
        encoder.bias.copy_(sae.b_enc)
    x = torch.randn(4, 5)
    h = torch.relu(encoder(x))
    expected = torch.nn.functional.linear(h, encoder.weight.t(), sae.b_dec)
    assert torch.allclose(sae(x).x_hat, expected, atol=1e-6)


def test_untied_uses_its_own_decoder_by_hand():
    out = hand_sae(tied=False)(X)
    # x_hat row 0 = 3 * W_dec[0] + b_dec = [0.1, 2.9]
    assert torch.allclose(out.x_hat, torch.tensor([[0.1, 2.9], [0.1, -0.1]]))


def test_tied_has_no_separate_decoder_parameter():
    assert {n for n, _ in SAE(3, 6, tied=True).named_parameters()} == {"W_enc", "b_enc", "b_dec"}
    assert {n for n, _ in SAE(3, 6, tied=False).named_parameters()} == {"W_enc", "b_enc", "b_dec", "W_dec"}


def test_topk_keeps_k_largest_then_relu():
    sae = SAE(d_in=3, d_sae=3, k=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(3))
        sae.b_enc.zero_()
    h = sae.encode(torch.tensor([[3.0, -1.0, 2.0], [-5.0, -1.0, -2.0]]))
    assert torch.equal(h, torch.tensor([[3.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


def test_wrong_width_input_is_a_clear_error():
    with pytest.raises(ValueError, match="3 features but the SAE expects d_in=2"):
        hand_sae(tied=True)(torch.zeros(1, 3))


@pytest.mark.parametrize("tied", [True, False])
def test_parameters_are_contiguous_new_and_loaded(tmp_path, tied):
    """Fused Adam pairs parameter and (contiguous, restored) state memory element by element."""
    sae = SAE(d_in=3, d_sae=5, tied=tied)
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    assert all(p.is_contiguous() for model in (sae, loaded) for p in model.parameters())
    if not tied:
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(5))  # unit rows along W_enc's columns
        assert torch.allclose(sae.W_dec * sae.W_enc.t().norm(dim=1, keepdim=True), sae.W_enc.t())


@pytest.mark.parametrize("tied, k", [(True, None), (False, None), (False, 2)])
def test_save_load_round_trip(tmp_path, tied, k):
    sae = SAE(d_in=4, d_sae=8, tied=tied, k=k, metadata={"hook_name": "blocks.6.hook_resid_pre"})
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    x = torch.randn(5, 4)
    assert (loaded.tied, loaded.k, loaded.metadata) == (tied, k, sae.metadata)
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    assert not list((tmp_path / "sae").glob("*.tmp"))


@pytest.mark.parametrize("tied, k", [(True, None), (False, None), (False, 3)])
def test_saved_folder_loads_in_saelens_with_identical_reconstruction(tmp_path, tied, k):
    sae_lens = pytest.importorskip("sae_lens")
    sae = SAE(d_in=6, d_sae=12, tied=tied, k=k)
    with torch.no_grad():
        sae.b_dec.normal_()  # a nonzero b_dec checks that SAELens does not subtract it from the input
    sae.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    x = torch.randn(10, 6)
    assert torch.allclose(theirs(x), sae(x).x_hat, atol=1e-5)
    assert torch.allclose(theirs.encode(x), sae(x).h, atol=1e-5)


def test_missing_file_names_what_an_sae_folder_holds(tmp_path):
    SAE(2, 4).save(tmp_path)
    (tmp_path / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors is missing"):
        SAE.load(tmp_path)


def test_truncated_weights_are_a_clear_error(tmp_path):
    SAE(2, 4).save(tmp_path)
    weights = tmp_path / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SAE.load(tmp_path)


def test_pickle_file_is_refused_not_unpickled(tmp_path):
    SAE(2, 4).save(tmp_path)
    torch.save({"W_enc": torch.zeros(2, 4)}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        SAE.load(tmp_path)


def test_shape_mismatch_with_cfg_is_a_clear_error(tmp_path):
    SAE(2, 4).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["d_sae"] = 5
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match cfg.json"):
        SAE.load(tmp_path)


def test_missing_key_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file
    SAE(2, 4).save(tmp_path)
    save_file({"W_enc": torch.zeros(2, 4)}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"lacks \['W_dec', 'b_dec', 'b_enc'\]"):
        SAE.load(tmp_path)


@pytest.mark.parametrize("kwargs", [{"d_in": 0, "d_sae": 4}, {"d_in": 2, "d_sae": 4, "k": 5}])
def test_bad_construction_arguments(kwargs):
    with pytest.raises(ValueError):
        SAE(**kwargs)
