"""saelab: sparse autoencoders on GPT-2's residual stream, as a notebook workbook.

    import saelab
    profile = saelab.load_profile()              # gpt2 | quick | offline, with a banner
    sae = saelab.SAE(d_in=768, d_sae=6144)       # tied ReLU SAE, as the seed article
    sae = saelab.sae_for("topk", 768, 6144, k=32)  # or any of saelab.ARCHITECTURES
    result = saelab.train_sae(sae, activations)  # activations: (rows, d_in) tensor
    sae.save("my_sae")                           # cfg.json + sae_weights.safetensors (SAELens layout)
    saelab.top_examples(55, "runs/offline")      # a feature's top examples in context, in one line

Importing saelab loads nothing heavy: names are resolved on first use.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "Profile": "saelab.config",
    "load_profile": "saelab.config",
    "PROFILES": "saelab.config",
    "SAE": "saelab.sae",
    "sae_for": "saelab.sae",
    "ARCHITECTURES": "saelab.sae",
    "train_sae": "saelab.train.loop",
    "train_profile": "saelab.train.loop",
    "sae_for_profile": "saelab.train.loop",
    "ActivationStore": "saelab.store",
    "StoreWriter": "saelab.store",
    "max_activating": "saelab.features.analysis",
    "load_sae": "saelab.features.analysis",
    "write_dashboards": "saelab.features.dashboards",
    "FeatureExplorer": "saelab.features.cards",
    "feature_card": "saelab.features.cards",
    "top_examples": "saelab.adhoc",
    "explore": "saelab.adhoc",
    "save_figure": "saelab.plots",
    "build_tokens": "saelab.data.tokens",
    "load_tokens": "saelab.data.tokens",
    "load_tokenizer": "saelab.data.tokens",
    "load_lm": "saelab.data.lm",
    "capture_activations": "saelab.data.capture",
    "open_store": "saelab.data.capture",
    "make_synthetic": "saelab.studies.synthetic",
    "recovery_scores": "saelab.studies.synthetic",
}

__all__ = [*_PUBLIC, "paths"]


def __dir__() -> list[str]:
    """The public names, for tab completion and `dir(saelab)`; resolving them stays lazy."""
    return sorted({*__all__, "__version__"})


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    if name == "paths":
        return import_module("saelab.paths")
    raise AttributeError(f"module 'saelab' has no attribute {name!r}")
