"""The language model, loaded one way for every notebook: a TransformerLens `HookedTransformer`.

Weight processing (`saelab.config.LM_SETTINGS`) is chosen so that `blocks.L.hook_resid_pre` is exactly
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
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from saelab import paths
from saelab.config import LM_SETTINGS, Profile, default_device
from saelab.data import offline_lm
from saelab.devices import device_of

if TYPE_CHECKING:
    import pandas as pd


def load_lm(profile: Profile, device: str | None = None, tokenizer=None, progress: bool = True):
    """gpt2/quick: pretrained weights from the hub (or its cache), or from a local folder when
    profile.model_name is one (`local_model_folder`: written by transformers' `save_pretrained`, no hub);
    offline: the small GPT-2 saelab trains on the offline corpus (`saelab.data.offline_lm`: trained on
    first use, then loaded from runs/<profile>/lm/), or seeded random weights when profile.offline_lm == "random".

    The offline tokenizer is the one notebook 01 trained (runs/<profile>/tokens/tokenizer/).
    """
    from transformer_lens import HookedTransformer

    device = device or default_device()
    if profile.is_offline:
        tokenizer = tokenizer or _offline_tokenizer(profile)
        hf_model = (random_gpt2(profile) if profile.offline_lm == "random"
                    else offline_lm.load_or_train(profile, tokenizer, device, progress))
        model = hooked_from_hf(hf_model.cpu(), tokenizer)
        model.cfg.model_name = profile.model_name
    elif (folder := local_model_folder(profile.model_name)) is not None:
        from transformers import AutoTokenizer

        model = hooked_from_hf(load_local_gpt2(folder), tokenizer or AutoTokenizer.from_pretrained(str(folder)))
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
    return model.to(device, print_details=False).eval()  # no "Moving model to device" line


def local_model_folder(model_name: str) -> Path | None:
    """model_name as a local folder (config.json + weights, as `save_pretrained` writes them), or None for
    a hub name. A folder that exists but is not a model is an error that says what it needs."""
    path = Path(model_name).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json: save a GPT-2 model there with "
                                "transformers' model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
    return path


def load_local_gpt2(folder: Path):
    """A transformers GPT-2 from a local folder, in float32 on the CPU; never reaches the hub."""
    from transformers import AutoConfig, GPT2LMHeadModel

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if config.model_type != "gpt2":
        raise ValueError(f"model folder {folder} holds a {config.model_type!r} model; saelab loads GPT-2-architecture "
                         "folders (model_type 'gpt2'), whose residual stream TransformerLens' conversion keeps exact")
    return GPT2LMHeadModel.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32).eval()


def _offline_tokenizer(profile: Profile):
    from transformers import AutoTokenizer

    path = paths.tokens_dir(profile) / "tokenizer"  # written by saelab.data.tokens.load_tokenizer
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no offline tokenizer at {path}; run notebook 01_data "
                                "(saelab.data.tokens.build_tokens(profile)) first")
    return AutoTokenizer.from_pretrained(str(path))


def random_gpt2(profile: Profile):
    """A transformers GPT-2 of the offline shape with seeded random weights (GPT-2's own init).
    The cross-implementation tests use it (profile.offline_lm = "random")."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(profile.seed)
    return GPT2LMHeadModel(offline_lm.gpt2_config(profile)).eval()


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
        default_prepend_bos=False,  # contexts from saelab.data.tokens already start with BOS
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


# ---------------------------------------------------------------- what the model is and how good it is

UNIGRAM_RATIO_BAR = 0.75  # held-out CE at most this share of the unigram baseline's
ABLATION_GAP_BAR = 1.0  # nats: zeroing the hook must cost at least this, or CE loss recovered means little


def weights_origin(profile: Profile) -> str:
    if not profile.is_offline and local_model_folder(profile.model_name) is not None:
        return f"local folder {profile.model_name} (transformers save_pretrained)"
    if not profile.is_offline:
        return "pretrained (Hugging Face hub)"
    if profile.offline_lm == "random":
        return f"seeded random (GPT-2's init, seed {profile.seed}), not trained"
    return "trained by saelab on the offline corpus (Python docstrings), not GPT-2"


def training_record(profile: Profile) -> dict | None:
    """The saved record (settings, history, held-out numbers) of the offline model saelab trained for
    this profile, or None (GPT-2, random weights, or not trained yet)."""
    if not profile.is_offline or profile.offline_lm != "trained":
        return None
    directory, _ = offline_lm.model_dir(profile, _offline_tokenizer(profile))
    try:
        return {**offline_lm.read_record(directory), "directory": str(directory.relative_to(paths.root()))}
    except offline_lm.InvalidSavedModel:
        return None


def model_card(profile: Profile, model) -> pd.Series:
    """One column about the language model: where its weights come from, its shape, and for the
    offline model, how saelab trained it and where it is saved."""
    import pandas as pd

    c = model.cfg
    card = {"model": c.model_name, "weights": weights_origin(profile), "layers": c.n_layers, "d_model": c.d_model,
            "heads": c.n_heads, "vocabulary": c.d_vocab, "context (tokens)": c.n_ctx,
            "parameters (non-embedding)": f"{c.n_params:,}", "hook": profile.hook}
    record = training_record(profile)
    if record:
        done, steps = record["training"], record["settings"]["offline_lm_steps"]
        passes = done["tokens_seen"] / (done["train_contexts"] * c.n_ctx)
        card |= {"trained on": f"{done['documents']:,} documents = {done['train_contexts']:,} contexts "
                               "(the held-out 'mae' documents excluded)",
                 "training": f"{steps:,} steps, {done['tokens_seen']:,} tokens ({passes:.1f} passes)",
                 "trained in": f"{done['seconds']:.0f} s on {done['device']}, {done['threads']} CPU thread(s)",
                 "held-out CE (nats/token)": round(record["held_out_ce"], 3),
                 "unigram baseline CE": round(record["unigram_ce"], 3),
                 "saved in": record["directory"]}
    return pd.Series(card, name="language model")


def training_history(profile: Profile) -> pd.DataFrame | None:
    """The offline model's training curve (step, tokens, train_loss, held_out_loss), or None."""
    import pandas as pd

    record = training_record(profile)
    return pd.DataFrame(record["history"]) if record else None


@torch.no_grad()
def ablation_ce(model, tokens: torch.Tensor, hook: str, skip_first_position: bool = True,
                batch_size: int = 16) -> dict[str, float]:
    """Next-token CE (nats/token, every predicted token of tokens (contexts, pos)) clean and with `hook`
    zero-ablated; position 0 keeps its activation when skip_first_position, as metrics.ce_loss_recovered."""
    start, device = int(skip_first_position), next(model.parameters()).device

    def zero(act, hook):  # act (batch, pos, d_model)
        act[:, start:] = 0.0
        return act

    sums, n = {"ce": 0.0, "ce_zero_ablated": 0.0}, 0
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        targets = batch[:, 1:, None]  # (batch, pos - 1, 1)
        for name, logits in (("ce", model(batch)), ("ce_zero_ablated", model.run_with_hooks(
                batch, fwd_hooks=[(hook, zero)]))):
            sums[name] -= logits[:, :-1].log_softmax(-1).gather(-1, targets).sum().item()
        n += targets.numel()
    return {name: total / n for name, total in sums.items()}


def measure_lm(model, profile: Profile) -> pd.Series:
    """On the held-out "mae" contexts (the first ce_eval_contexts, as notebook 03): the model's CE, the
    unigram baseline's (fitted on the offline model's training text, else on the "train" split), and CE
    with the hook zero-ablated."""
    import pandas as pd

    from saelab.data.tokens import load_tokens

    held_out = load_tokens(profile, "mae")
    tokens = torch.tensor(held_out.select(range(min(profile.ce_eval_contexts, len(held_out))))["input_ids"])
    ce = ablation_ce(model, tokens.long(), profile.hook, profile.exclude_first_position)
    record = training_record(profile)
    unigram = record["unigram_ce"] if record else offline_lm.unigram_cross_entropy(
        torch.tensor(load_tokens(profile, "train")["input_ids"])[:, 1:].long(), tokens[:, 1:].long(), model.cfg.d_vocab)
    return pd.Series({"ce": ce["ce"], "unigram_ce": unigram, "ce_over_unigram": ce["ce"] / unigram,
                      "ce_zero_ablated": ce["ce_zero_ablated"], "ablation_gap": ce["ce_zero_ablated"] - ce["ce"]},
                     name=f"{model.cfg.model_name}, held-out")


def describe_lm(measured: pd.Series) -> str:
    """The two numbers that make the SAE's analysis meaningful, against their bars, in words."""
    ratio, gap = measured["ce_over_unigram"], measured["ablation_gap"]
    context = (f"meets the bar <= {UNIGRAM_RATIO_BAR}: the model uses context, not just token frequencies"
               if ratio <= UNIGRAM_RATIO_BAR else f"MISSES the bar <= {UNIGRAM_RATIO_BAR}: little more than "
               "token frequencies")
    ablation = (f"meets the bar >= {ABLATION_GAP_BAR:g}: CE loss recovered (notebook 03) has a real range"
                if gap >= ABLATION_GAP_BAR else f"MISSES the bar >= {ABLATION_GAP_BAR:g}: CE loss recovered "
                "would divide by almost nothing")
    return (f"Held-out CE {measured['ce']:.3f} nats/token = {ratio:.2f} x the unigram baseline's "
            f"{measured['unigram_ce']:.3f} ({context}).\n"
            f"Zero-ablating the hook raises CE by {gap:.2f} nats ({ablation}).")


def init_std(profile: Profile) -> float:
    """The weight std the profile's language model was initialised with: offline_lm.INIT_STD for the
    offline model saelab trains, GPT-2's 0.02 otherwise (the random offline model, GPT-2 itself)."""
    return offline_lm.INIT_STD if profile.is_offline and profile.offline_lm == "trained" else 0.02


def at_initialisation(model, seed: int = 0, std: float = 0.02):
    """A seeded random-weight GPT-2 of `model`'s shape, with its tokenizer, on its device: the same
    pipeline run on it shows what training adds (notebook 04). With the seed and init std the model was
    built with (`init_std(profile)`, profile.seed), it is that model at step 0: the offline model saelab
    trains starts from exactly these weights (offline_lm.initial_model)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.cfg
    config = GPT2Config(vocab_size=c.d_vocab, n_positions=c.n_ctx, n_embd=c.d_model, n_layer=c.n_layers,
                        n_head=c.n_heads, n_inner=c.d_mlp, activation_function=c.act_fn, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=std)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        twin = hooked_from_hf(GPT2LMHeadModel(config).eval(), model.tokenizer)
    twin.cfg.model_name = f"{c.model_name} (random weights)"
    return twin.to(next(model.parameters()).device, print_details=False)
