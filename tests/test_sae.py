"""SAE files: saelab's save/load for every architecture, SAELens reading ours, saelab reading SAELens'."""

import json

import pytest
import torch

from saelab.sae import ARCHITECTURES, SAE, sae_for

OPTIONS = {"topk": {"k": 3}, "batchtopk": {"k": 3}}


def trained_looking(architecture: str, d_in: int = 6, d_sae: int = 12) -> SAE:
    """Random weights plus the state training would have changed (b_dec, thresholds)."""
    sae = sae_for(architecture, d_in, d_sae, metadata={"hook_name": "blocks.6.hook_resid_pre"},
                  **OPTIONS.get(architecture, {}))
    with torch.no_grad():
        sae.b_dec.normal_()  # a nonzero b_dec checks that SAELens does not subtract it from the input
        if architecture == "jumprelu":
            sae.threshold.uniform_(0.0, 0.5)
        if architecture == "batchtopk":
            sae.threshold.fill_(0.123456789012345)  # float64 digits that float32 would lose
    return sae


def test_wrong_width_input_is_a_clear_error():
    with pytest.raises(ValueError, match="3 features but the SAE expects d_in=2"):
        SAE(2, 4)(torch.zeros(1, 3))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_load_round_trip(tmp_path, architecture):
    sae = trained_looking(architecture)
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    x = torch.randn(5, 6)
    assert type(loaded) is type(sae) and loaded.metadata == sae.metadata
    assert loaded.option_values() == sae.option_values()
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), loaded.state_dict().values(), strict=True))
    assert torch.equal(loaded(x).x_hat, sae(x).x_hat)
    assert not list((tmp_path / "sae").glob("*.tmp"))
    assert all(p.is_contiguous() for p in loaded.parameters())  # fused Adam pairs memory element by element


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_saved_folder_loads_in_saelens_with_identical_outputs(tmp_path, architecture):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_looking(architecture)
    sae.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    expected = {"tied": "standard", "standard": "standard", "topk": "topk", "batchtopk": "jumprelu",
                "jumprelu": "jumprelu"}[architecture]
    assert theirs.cfg.architecture() == expected
    x = torch.randn(10, 6) * 2
    assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-5)
    assert torch.allclose(theirs(x), sae(x).x_hat, atol=1e-5)


def saelens_folder(tmp_path, architecture: str, apply_b_dec_to_input: bool):
    """A folder written by SAELens itself, with random weights."""
    import sae_lens

    config_class, sae_class = {
        "standard": (sae_lens.StandardSAEConfig, sae_lens.StandardSAE),
        "topk": (sae_lens.TopKSAEConfig, sae_lens.TopKSAE),
        "jumprelu": (sae_lens.JumpReLUSAEConfig, sae_lens.JumpReLUSAE),
    }[architecture]
    extra = {"k": 3} if architecture == "topk" else {}
    theirs = sae_class(config_class(d_in=6, d_sae=12, apply_b_dec_to_input=apply_b_dec_to_input, **extra))
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_()
        if architecture == "jumprelu":
            theirs.threshold.uniform_(0.0, 0.5)
    theirs.save_model(tmp_path / "theirs")
    return theirs, tmp_path / "theirs"


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_a_folder_written_by_saelens_loads_with_identical_outputs(tmp_path, architecture, apply_b_dec_to_input):
    pytest.importorskip("sae_lens")
    theirs, folder = saelens_folder(tmp_path, architecture, apply_b_dec_to_input)
    ours = SAE.load(folder)
    assert ours.architecture == architecture and ours.apply_b_dec_to_input == apply_b_dec_to_input
    x = torch.randn(10, 6)
    assert torch.allclose(ours.encode(x), theirs.encode(x), atol=1e-5)
    assert torch.allclose(ours(x).x_hat, theirs(x), atol=1e-5)


def test_a_saelens_architecture_saelab_lacks_names_what_it_loads(tmp_path):
    SAE(2, 4).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["saelab"]
    cfg["architecture"] = "gated"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="architecture 'gated' is not one saelab implements.*'standard', 'topk'"):
        SAE.load(tmp_path)


def test_unsupported_saelens_options_are_refused(tmp_path):
    SAE(2, 4).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["saelab"]
    cfg["normalize_activations"] = "expected_average_only_in"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="normalize_activations='expected_average_only_in' is not supported"):
        SAE.load(tmp_path)


def test_a_format_1_folder_still_loads(tmp_path):
    sae = trained_looking("tied")
    sae.save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["saelab"] = {"format_version": 1, "tied": True}  # what saelab wrote before architectures had names
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert SAE.load(tmp_path).architecture == "tied"


def test_a_tied_folder_whose_decoder_is_not_the_transpose_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    SAE(2, 4).save(tmp_path)
    tensors = load_file(tmp_path / "sae_weights.safetensors")
    tensors["W_dec"] = tensors["W_dec"] + 1
    save_file(tensors, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match="W_dec != W_enc"):
        SAE.load(tmp_path)


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
    sae_for("jumprelu", 2, 4).save(tmp_path)
    save_file({"W_enc": torch.zeros(2, 4)}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"lacks \['W_dec', 'b_dec', 'b_enc', 'threshold'\]"):
        SAE.load(tmp_path)


def test_old_signature_says_what_to_call():
    with pytest.raises(TypeError, match="sae_for"):
        SAE(2, 4, tied=False)
