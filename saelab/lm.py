"""The language model, loaded one way for every notebook: a TransformerLens `HookedTransformer`.

Weight processing (`LM_SETTINGS`) is chosen so that `blocks.L.hook_resid_pre` is exactly
Hugging Face's `hidden_states[L]`, the residual stream the seed article trained on:
- fold_ln=True folds LayerNorm scales into the next linear layer: the residual stream is unchanged.
- center_writing_weights=False: centring W_E, W_pos, W_O and W_out would subtract each residual
  vector's mean over d_model (harmless for the LM, which re-centres in LayerNorm, but not the
  activations the seed used). tests/test_lm.py pins this against transformers' GPT-2.
- center_unembed=False keeps logits equal to Hugging Face's (softmax would not care either way).
- fold_value_biases=True moves b_V into b_O: attention outputs, hence the residual, are unchanged.
"""

from __future__ import annotations

import difflib

import torch

from saelab import paths
from saelab.config import Profile, default_device
from saelab.devices import device_of

LM_SETTINGS = {"fold_ln": True, "center_writing_weights": False, "center_unembed": False,
               "fold_value_biases": True}


def load_lm(profile: Profile, device: str | None = None, tokenizer=None):
    """gpt2/quick: pretrained weights from the hub (or its cache); offline: a seeded random GPT-2.

    The offline tokenizer is the one notebook 01 trained (runs/<profile>/tokens/tokenizer/).
    """
    from transformer_lens import HookedTransformer

    device = device or default_device()
    if profile.is_offline:
        model = hooked_from_hf(random_gpt2(profile), tokenizer or _offline_tokenizer(profile))
        model.cfg.model_name = profile.model_name
    else:
        try:
            model = HookedTransformer.from_pretrained(profile.model_name, device="cpu", tokenizer=tokenizer,
                                                      **LM_SETTINGS)
        except OSError as err:
            raise OSError(f"cannot load {profile.model_name!r} from the Hugging Face hub or its cache ({err}); "
                          "on a machine without the hub use SAELAB_PROFILE=offline") from err
    check_hook(model, profile.hook)
    if model.cfg.d_model != profile.d_in:
        raise ValueError(f"{profile.model_name} has d_model={model.cfg.d_model}, profile says d_in={profile.d_in}; "
                         "set d_in to the model's width")
    return model.to(device).eval()


def _offline_tokenizer(profile: Profile):
    from transformers import AutoTokenizer

    path = paths.tokens_dir(profile) / "tokenizer"  # written by saelab.data.load_tokenizer
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no offline tokenizer at {path}; run notebook 01_data "
                                "(saelab.data.build_tokens(profile)) first")
    return AutoTokenizer.from_pretrained(str(path))


def random_gpt2(profile: Profile):
    """A transformers GPT-2 of the offline shape with seeded random weights (GPT-2's own init)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=profile.offline_vocab_size, n_positions=profile.context_size,
                        n_embd=profile.d_in, n_layer=profile.offline_n_layers, n_head=profile.offline_n_heads,
                        n_inner=4 * profile.d_in, activation_function="gelu_new",
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(profile.seed)
    return GPT2LMHeadModel(config).eval()


def hooked_from_hf(hf_model, tokenizer=None, settings: dict | None = None):
    """Any transformers GPT2LMHeadModel as a HookedTransformer, via TransformerLens' own conversion.

    The result lives where `hf_model` lives, and its `cfg.device` says so (TransformerLens sends
    tokens to cfg.device, which otherwise defaults to CUDA whenever a GPU exists).
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=c.n_inner or 4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn=c.activation_function,
        normalization_type="LN", eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
        default_prepend_bos=False,  # contexts from saelab.data already start with BOS
        device=str(device_of(hf_model)))
    model = HookedTransformer(cfg, tokenizer=tokenizer)  # built on cfg.device
    model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg), **(settings or LM_SETTINGS))
    return model.eval()


def check_hook(model, hook: str) -> None:
    """An unknown hook name is an error that lists the nearest valid names."""
    if hook not in model.hook_dict:
        near = difflib.get_close_matches(hook, list(model.hook_dict), n=5, cutoff=0.5)
        raise ValueError(f"hook {hook!r} does not exist in {model.cfg.model_name} "
                         f"({model.cfg.n_layers} layers); nearest valid names: {near}")
