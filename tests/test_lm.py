import pytest
import torch
from tiny import TINY, tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)
from transformers import GPT2Config, GPT2LMHeadModel

from saelab import paths
from saelab.config import GPT2
from saelab.data import capture, lm

HOOK = "blocks.6.hook_resid_pre"


def random_hf_gpt2(vocab: int = 512, d_model: int = 32, n_ctx: int = 16) -> GPT2LMHeadModel:
    """transformers' GPT-2 with every weight random, LayerNorm scales and biases included,
    so that folding and centring have something to change."""
    config = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d_model, n_layer=8, n_head=4,
                        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name or "ln_f" in name:
                param.copy_(torch.randn_like(param) * 0.5 + (1.0 if name.endswith(".weight") else 0.0))
    return model


def hf_hidden_state_6(model: GPT2LMHeadModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[6]  # (batch, pos, d_model)


def test_saelab_capture_equals_hf_hidden_states_6(tiny, device, tolerance):
    """The acceptance test: saelab's store holds exactly HF hidden_states[6] (position 0 dropped),
    captured on `device` and compared with HF on the CPU."""
    hf = random_hf_gpt2(d_model=tiny.d_in, n_ctx=tiny.context_size)
    ids = torch.tensor(capture.load_tokens(tiny)["input_ids"])  # (contexts, pos)
    expected = hf_hidden_state_6(hf, ids)[:, 1:].reshape(-1, tiny.d_in)
    store = capture.capture_activations(tiny, lm=lm.hooked_from_hf(hf.to(device)), device=device, progress=False)
    assert store.activations().shape == expected.shape
    torch.testing.assert_close(store.activations(), expected, rtol=tolerance["rtol"], atol=1e-5 + tolerance["atol"])


def test_converted_model_lives_where_the_hf_model_lives(device, tolerance):
    """Weights and cfg.device agree (TransformerLens sends tokens to cfg.device), on every device."""
    hf = random_hf_gpt2()
    ids = torch.randint(0, 512, (2, 16))
    expected = hf_hidden_state_6(hf, ids)
    model = lm.hooked_from_hf(hf.to(device))
    assert {p.device.type for p in model.parameters()} == {torch.device(model.cfg.device).type} == {device}
    _, cache = model.run_with_cache(ids, names_filter=[HOOK], stop_at_layer=7)  # CPU ids: the model moves them
    torch.testing.assert_close(cache[HOOK].cpu(), expected, rtol=tolerance["rtol"], atol=1e-5 + tolerance["atol"])


def test_converted_model_does_not_claim_cuda_for_cpu_weights(monkeypatch):
    """Checked on a CPU-only machine: where CUDA exists, TransformerLens' config defaulted cfg.device to 'cuda'
    while the converted weights stayed on the CPU, so every forward sent the tokens to CUDA."""
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        model = lm.hooked_from_hf(random_hf_gpt2())
    assert model.cfg.device == "cpu" and {p.device.type for p in model.parameters()} == {"cpu"}
    assert model(torch.randint(0, 512, (1, 16))).shape == (1, 16, 512)


def test_capture_and_norms_refuse_a_device_the_lm_is_not_on(tiny):
    """With an LM given, capture runs where it lives; a `device` naming another is an error, and nothing is written."""
    model = lm.load_lm(tiny, "cpu")
    with pytest.raises(ValueError, match=r"the LM is on cpu but device='meta'"):
        capture.capture_activations(tiny, "train", "meta", lm=model, progress=False)
    assert not paths.store_dir(tiny).exists()
    with pytest.raises(ValueError, match=r"the LM is on cpu but device='meta'"):
        capture.norm_by_position(model, torch.zeros(1, 4, dtype=torch.int64), tiny.hook, "meta")
    assert capture.norm_by_position(model, torch.zeros(2, 4, dtype=torch.int64), tiny.hook).shape == (4, 4)


def test_centring_writing_weights_would_subtract_the_mean_over_d_model():
    """Pins the LM_SETTINGS choice: with centring, the hook is HF's residual minus its mean."""
    hf = random_hf_gpt2()
    ids = torch.randint(0, 512, (2, 16))
    expected = hf_hidden_state_6(hf, ids)
    centred = lm.hooked_from_hf(hf, settings={**lm.LM_SETTINGS, "center_writing_weights": True})
    _, cache = centred.run_with_cache(ids, names_filter=[HOOK], stop_at_layer=7)
    assert (cache[HOOK] - expected).abs().max() > 1e-2
    assert (cache[HOOK] - (expected - expected.mean(-1, keepdim=True))).abs().max() < 1e-5


def test_logits_equal_hf_with_the_chosen_settings():
    hf = random_hf_gpt2()
    ids = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert (lm.hooked_from_hf(hf)(ids) - hf(ids).logits).abs().max() < 1e-4


def test_offline_lm_is_seeded_and_has_the_profile_shape(tiny):
    first, second = lm.load_lm(tiny, "cpu"), lm.load_lm(tiny, "cpu")
    assert (first.cfg.d_model, first.cfg.n_layers, first.cfg.d_vocab) == (tiny.d_in, 8, tiny.offline_vocab_size)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                  strict=True))
    assert first.tokenizer is not None and first.tokenizer.eos_token == "<|endoftext|>"


def test_unknown_hook_lists_nearby_names(tiny):
    model = lm.load_lm(tiny, "cpu")
    with pytest.raises(ValueError, match=r"'blocks.6.hook_resid_pr' does not exist.*'blocks.6.hook_resid_pre'"):
        lm.check_hook(model, "blocks.6.hook_resid_pr")
    bad = tiny.replace(hook="blocks.6.hook_resid_prex")
    with pytest.raises(ValueError, match=r"prex' does not exist in offline-tiny \(8 layers\)"):
        capture.capture_activations(bad, lm=model, progress=False)
    assert not paths.store_dir(bad).exists()  # refused before anything was written


def test_offline_lm_before_notebook_01_says_run_it():
    with pytest.raises(FileNotFoundError, match="run notebook 01_data"):
        lm.load_lm(TINY, "cpu")


def test_gpt2_without_network_says_use_offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="(?s)'gpt2'.*SAELAB_PROFILE=offline"):
        lm.load_lm(GPT2, "cpu")


def test_offline_model_must_reach_the_hook():
    with pytest.raises(ValueError, match="offline_n_layers=6: must exceed the hook's layer 6"):
        TINY.replace(offline_n_layers=6)
