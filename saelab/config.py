"""Profiles: every number of a run in one frozen dataclass, composed of sections.

    profile.sae     SAEConfig: which SAE (architecture, width, the architecture's options)
    profile.train   TrainConfig: how it trains; `train_sae(sae, activations, profile.train)` takes it as it is
    the rest        the LM and hook, text data, capture, MAE, dashboards, notebooks 05-06

`gpt2` is the seed article's configuration; `quick` and `offline` are derived from it with `replace`, so a
difference between profiles is always a visible override. `Profile.replace` and `load_profile` take any field
by its own name, section fields too (`replace(lr=3e-4)` sets `train.lr`), and so does a profile JSON.
Notebooks call `load_profile(profile)` and never hard-code a number.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from saelab.paths import is_slug

# How TransformerLens processes GPT-2's weights: chosen so that blocks.L.hook_resid_pre equals Hugging
# Face's hidden_states[L] (the seed's residual stream); saelab.data.lm says why each. A store records them.
LM_SETTINGS = {"fold_ln": True, "center_writing_weights": False, "center_unembed": False,
               "fold_value_biases": True}

STORE_DTYPES = ("float16", "bfloat16", "float32")
OFFLINE_LMS = ("trained", "random")  # profile.offline_lm: saelab.data.offline_lm trains one, or seeded random weights
B_DEC_INITS = ("zeros", "mean", "geometric_median")  # saelab.sae.SAE.init_b_dec (a test keeps them equal)
LR_SCHEDULERS = ("constant", "cosineannealing")  # SAELens' lr_scheduler_name values that saelab implements
TRAIN_DTYPES = ("float32", "bfloat16")
# Old names and what replaced them, so an old profile JSON gets a message rather than "unknown field".
RENAMED = {"recipe": "architecture (tied_l1 -> 'tied', l1 -> 'standard', topk -> 'topk')",
           "l1_warmup_steps": "l1_warm_up_steps (SAELens' name)"}
# Old flat names of SAE options, migrated into the sae section under the name the architecture takes.
MOVED = {"topk_k": "k", "batchtopk_threshold_lr": "threshold_lr", "jumprelu_bandwidth": "bandwidth",
         "jumprelu_init_threshold": "init_threshold"}
OFFLINE_MODEL = "offline-tiny"  # a small GPT-2-architecture model saelab trains on the offline corpus
OFFLINE_CORPUS = "offline:installed-docs"  # dataset_id of the corpus harvested from installed docstrings
EOT = "<|endoftext|>"  # GPT-2's separator, also the offline tokenizer's; BOS of every context


def _count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), 1)
    return f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)


@dataclass(frozen=True)
class SAEConfig:
    """Which SAE: `sae_for(architecture, d_in, expansion_factor * d_in, **options_for(architecture))`.
    An architecture takes only its own options (its class's `options`); the others are ignored for it."""

    architecture: str = "tied"  # tied (the seed) | standard | topk | batchtopk | jumprelu
    expansion_factor: int = 8  # d_sae = expansion_factor * d_in (seed: 8 -> 6144)
    k: int = 32  # topk: active latents per token; batchtopk: per token on average over the batch
    aux_k: int = 0  # topk/batchtopk: dead latents in the AuxK loss; 0 = a power of two near d_in/2 (Gao: 512)
    aux_coefficient: float = 1 / 32  # topk/batchtopk: weight α of the AuxK loss (Gao et al. 2024: 1/32)
    threshold_lr: float = 0.01  # batchtopk: rate of θ's moving average (SAELens' topk_threshold_lr)
    bandwidth: float = 0.05  # jumprelu: width ε of the straight-through kernel, activation units (SAELens)
    init_threshold: float = 0.01  # jumprelu: θ at initialisation, activation units (SAELens)

    def __post_init__(self) -> None:
        # the registry (saelab.sae registers the built-ins), so a newly registered class is valid too
        from saelab.sae.base import architecture_names

        problems = []
        if self.architecture not in architecture_names():
            problems.append(f"architecture={self.architecture!r}: choose one of {architecture_names()}")
        problems += [f"{name}={getattr(self, name)!r}: must be a positive integer"
                     for name in ("expansion_factor", "k") if not _count(getattr(self, name), 1)]
        if not _count(self.aux_k, 0):
            problems.append(f"aux_k={self.aux_k!r}: must be an integer >= 0 (0 = a power of two near d_in / 2)")
        problems += [f"{name}={getattr(self, name)!r}: must be a number > 0"
                     for name in ("aux_coefficient", "threshold_lr", "bandwidth") if not getattr(self, name) > 0]
        if not self.init_threshold >= 0:
            problems.append(f"init_threshold={self.init_threshold!r}: must be a number >= 0")
        if problems:
            raise ValueError("invalid SAE settings:\n  " + "\n  ".join(problems))

    def options_for(self, architecture: str | None = None) -> dict:
        """The options `sae_for` takes for `architecture` (default: this section's), from this section."""
        from saelab.sae.base import REGISTRY

        return {name: getattr(self, name) for name in REGISTRY[architecture or self.architecture].options}

    def replace(self, **changes) -> SAEConfig:
        """A copy with some fields changed; an unknown name is an error that names the one meant."""
        return _replace(self, "SAE setting", changes)


@dataclass(frozen=True)
class TrainConfig:
    """How an SAE trains: `train_sae(sae, activations, config)` takes this as it is, or its fields as
    keywords. The defaults are the seed article's (Cunningham et al. 2023): Adam 1e-3, batch 512, 100 epochs."""

    l1_coefficient: float = 1e-3  # λ of tied and standard, against MSE averaged over batch and d_in (seed: 1e-3)
    l0_coefficient: float = 1e-3  # λ0 of jumprelu: the cost of one active latent, in units of that MSE
    lr: float = 1e-3  # Adam learning rate (seed: 1e-3, constant)
    lr_scheduler_name: str = "constant"  # constant (seed) | cosineannealing: to lr_end over the steps left
    lr_warm_up_steps: int = 0  # steps of linear warm-up from lr/steps to lr (seed: 0)
    lr_decay_steps: int = 0  # final steps of linear decay to lr_end (seed: 0)
    lr_end: float | None = None  # lr at the end of cosine annealing or decay; None = lr / 10 (SAELens)
    l1_warm_up_steps: int = 0  # the sparsity coefficient (λ or λ0) ramps linearly from 0 (seed: 0, constant)
    batch_size: int = 512  # activations per optimizer step (seed: 512)
    epochs: int = 100  # passes over the training split (seed: 100)
    val_fraction: float = 0.1  # share of activations held out for validation (seed: a split, size unstated)
    seed: int = 0  # seeds the split, shuffling and SAE initialisation (and, in a profile, the offline LM)
    b_dec_init: str = "zeros"  # zeros (the seed) | mean | geometric_median (Bricken et al. 2023) of a sample
    dead_after_tokens: int = 10_000_000  # a latent is dead after this many tokens unfired (Gao et al.: 10M),
    #                                      capped at one epoch's tokens so small datasets can have dead latents
    dtype: str = "float32"  # matmul precision: float32 (TF32 on CUDA, the seed) | bfloat16 (autocast; weights
    #                         and Adam stay float32)
    cuda_graph: bool = True  # on CUDA, replay each step as one CUDA graph (False: eager, for debugging)
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = every checkpoint_minutes instead
    checkpoint_minutes: float = 5.0  # wall-clock minutes between checkpoints (and one at the end, and on Ctrl-C)
    log_every: int = 100  # steps between wandb points and progress-bar updates (each one host sync)

    def __post_init__(self) -> None:
        problems = [f"{name}={getattr(self, name)!r}: must be an integer >= {minimum}"
                    for name, minimum in (("checkpoint_every", 0), ("log_every", 1), ("dead_after_tokens", 1),
                                          ("l1_warm_up_steps", 0), ("lr_warm_up_steps", 0), ("lr_decay_steps", 0),
                                          ("batch_size", 1), ("epochs", 1))
                    if not _count(getattr(self, name), minimum)]
        problems += [f"{name}={getattr(self, name)!r}: must be a number > 0"
                     for name in ("lr", "checkpoint_minutes") if not getattr(self, name) > 0]
        problems += [f"{name}={getattr(self, name)!r}: must be a number >= 0"
                     for name in ("l1_coefficient", "l0_coefficient") if not getattr(self, name) >= 0]
        if self.lr_end is not None and not self.lr_end >= 0:
            problems.append(f"lr_end={self.lr_end!r}: a learning rate >= 0, or None (= lr / 10)")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction={self.val_fraction}: must be strictly between 0 and 1")
        for name, valid in (("b_dec_init", B_DEC_INITS), ("lr_scheduler_name", LR_SCHEDULERS),
                            ("dtype", TRAIN_DTYPES)):
            if getattr(self, name) not in valid:
                problems.append(f"{name}={getattr(self, name)!r}: choose one of {valid}")
        if not isinstance(self.cuda_graph, bool):
            problems.append(f"cuda_graph={self.cuda_graph!r}: True or False")
        if problems:
            raise ValueError("invalid training settings:\n  " + "\n  ".join(problems))

    def replace(self, **changes) -> TrainConfig:
        """A copy with some fields changed; an unknown name is an error that names the one meant."""
        return _replace(self, "training setting", changes)


def _replace(section, what: str, changes: dict):
    valid = [f.name for f in dataclasses.fields(section)]
    unknown = [name for name in changes if name not in valid]
    if unknown:
        raise TypeError(f"unknown {what}(s) {', '.join(_did_you_mean(u, valid) for u in unknown)}; "
                        f"valid: {valid}")
    return dataclasses.replace(section, **changes)


TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))  # train_sae(**options) takes these
SAE_FIELDS = tuple(f.name for f in dataclasses.fields(SAEConfig))
SECTIONS = {"sae": SAEConfig, "train": TrainConfig}


@dataclass(frozen=True)
class Profile:
    """One run's configuration. Field comments give the unit and the seed's value."""

    name: str  # shown in every banner, figure title and file the run writes

    # --- language model and hook
    model_name: str = "gpt2"  # TransformerLens name or a local GPT-2 folder; "offline-tiny" = GPT-2 trained here
    hook: str = "blocks.6.hook_resid_pre"  # seed "layer 6" = HF hidden_states[6]
    d_in: int = 768  # width of the hooked residual stream (GPT-2 small: 768)

    # --- text data
    dataset_id: str = "Skylion007/openwebtext"  # HF dataset id, or a local .jsonl/.json/.parquet/.txt file
    # The hub's parquet export of the dataset: `datasets` 4+ refuses the repo's loading script,
    # the export loads without one. None = the default branch (for datasets already in parquet).
    dataset_revision: str | None = "refs/convert/parquet"
    dataset_split: str = "train"  # split streamed from dataset_id
    text_column: str = "text"  # column holding each document's text (OpenWebText: "text")
    n_texts: int = 20_000  # documents tokenized for SAE training (seed: 20,000)
    context_size: int = 128  # tokens per context (seed max_length: 128)
    exclude_first_position: bool = True  # drop position 0 (BOS): its residual norm is an outlier
    # Keep at most context_size - 1 tokens per document, as the seed (max_length=128), so n_texts
    # documents give about n_texts contexts; False packs whole documents (many more contexts).
    truncate_documents: bool = True

    # --- activation capture
    capture_batch_size: int = 32  # contexts per LM forward pass (seed mae_batch_size: 32)
    store_dtype: str = "float16"  # dtype of activation shards on disk: float16 | bfloat16 | float32
    shard_rows: int = 65_536  # activations per shard file (~96 MiB at d_in 768, fp16)

    # --- offline model and tokenizer (model_name "offline-tiny" only; d_model = d_in)
    offline_vocab_size: int = 4_096  # BPE vocabulary trained at run time on the offline corpus
    offline_n_layers: int = 8  # must exceed the hook's layer (blocks.6 needs >= 7)
    offline_n_heads: int = 4  # d_head = d_in / offline_n_heads
    # "trained": saelab trains it once on the offline corpus (minus the held-out "mae" documents) when
    # notebook 02 first loads it, saved in runs/<profile>/lm/ (saelab.data.offline_lm); "random": seeded random
    # weights (GPT-2's init), no training: the unit tests' model (tests/tiny.py: capture and
    # cross-implementation checks need a model, not a trained one)
    offline_lm: str = "trained"
    # Sized by measurement on a shared 2-core CPU (d_in 64, 8 layers, vocabulary 1,024): 800 steps of 16
    # contexts (~0.8M tokens, ~1.7 passes over the corpus) take ~85 s and reach ~0.70x the unigram CE;
    # 600 steps reached 0.72, batch 8 or 32 and lr 5e-3 or 2e-2 did worse for the same tokens.
    offline_lm_steps: int = 800  # optimizer steps of that training
    offline_lm_batch_size: int = 16  # contexts of context_size tokens per step
    offline_lm_lr: float = 1e-2  # AdamW peak learning rate: linear warm-up (5% of steps), cosine decay to 10%
    offline_lm_texts: int = 0  # corpus documents it trains on (0 = all but the held-out "mae" ones)
    offline_lm_eval_every: int = 50  # steps between held-out evaluations (the points of its training curve)
    # CPU threads while it trains (0 = every core). 1: on 2 cores, 2 threads were no faster at this size and
    # 10x slower while the other core was busy (measured); torch_threads applies again afterwards
    offline_lm_threads: int = 1

    # --- the SAE and its training: sections of their own (saelab.sae, saelab.train.loop)
    sae: SAEConfig = SAEConfig()
    train: TrainConfig = TrainConfig()
    # Notebook 03 compares the architectures at this L0 (latents per token): k = target_l0 for topk and
    # batchtopk, λ / λ0 searched for the others (saelab.train.comparison.match_l0). 0 = no search: each
    # architecture keeps the profile's λ, λ0 and k (the seed's tied SAE: λ = 1e-3 as published)
    target_l0: float = 0.0
    ce_eval_contexts: int = 256  # held-out "mae" contexts for CE loss recovered in notebook 03
    torch_threads: int = 0  # intra-op CPU threads `apply_threads` sets in notebooks 02-05 (0 = torch's default)

    # --- max-activating examples (MAE)
    mae_texts: int = 5_000  # held-out texts scanned for MAE (seed: 5,000)
    mae_top_k: int = 5  # examples kept per feature (seed: 5)
    mae_top_features: int = 20  # features in the summary table, by total activation (seed: 20)

    # --- shareable results (notebook 04). Not in the seed.
    dashboard_features: int = 100  # features with a dashboard page, the top ones by total activation (0 = none)
    # A SAELens-format SAE folder (cfg.json + sae_weights.safetensors, e.g. written by SAELens'
    # `save_model`) that notebook 04 analyses instead of notebook 03's SAE; it must read this profile's
    # hook (d_in and cfg's metadata.hook_name are checked). None = runs/<profile>/sae/sae.
    sae_path: str | None = None

    # --- synthetic ground truth (notebook 05), after Sharkey, Braun & Millidge 2022. Not in the seed:
    # known features in superposition, to check that the architectures recover them. The sweep trains every
    # architecture at every dictionary size and sparsity knob: len(ratios) * (2·len(λs) + 2·len(ks) + len(λ0s)).
    synth_d: int = 256  # dimensions the features are squeezed into (Sharkey et al.: 256)
    synth_features: int = 512  # true features, more than synth_d: superposition (Sharkey et al.: 512)
    synth_mean_active: float = 5.0  # true features firing per sample, on average (Sharkey et al.: ~5)
    synth_samples: int = 200_000  # synthetic activations trained on
    synth_dict_ratios: tuple[float, ...] = (1.0, 2.0)  # SAE widths swept, as d_sae / synth_features
    # λ swept for tied and standard. Our MSE is averaged over d, so a feature's activation shrinks by
    # about λ·d/2: the useful λ scales like 1/synth_d (at d=256 tied did best near 3e-4).
    synth_l1_coefficients: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    synth_topk_ks: tuple[int, ...] = (2, 4, 8, 16, 32)  # k swept for topk and batchtopk (the data: ~synth_mean_active)
    synth_l0_coefficients: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4)  # λ0 swept for jumprelu
    synth_epochs: int = 20  # passes over the synthetic activations per SAE
    synth_lr: float = 3e-3  # Adam lr for the sweep (higher than the seed's 1e-3: short runs)
    synth_seeds: tuple[int, ...] = (0, 1, 2)  # SAE initialisations trained per sweep point: the spread they give
    # The user's budget: each architecture's reported point is its lowest held-out FVU among points with held-out
    # L0 at most this (+15%), chosen without the true features (notebook 05); the oracle's best is shown beside
    synth_target_l0: float = 8.0

    # --- interpretability against baselines (notebook 06, saelab.studies.baselines and saelab.studies.probing). Not in
    # the seed: Cunningham et al. 2023 (§3) compare SAE features with the residual basis, random directions,
    # PCA and ICA on the same activations. Here the scores need no LM judge: SAEBench-style k-sparse probing
    # of token concepts (directions and probes fitted on training documents, AUC on held-out documents of
    # the train and mae stores pooled) and simulation scoring of randomly sampled directions.
    interp_random_directions: int = 0  # random unit directions; 0 = d_sae (as many candidates as the SAE has)
    interp_ica_components: int = 0  # FastICA components; 0 = d_in (a full unmixing, as PCA's d_in components)
    interp_ica_fit_rows: int = 100_000  # training rows FastICA fits on, a seeded sample (gpt2: ~4% of 2.5M rows)
    interp_ica_max_iter: int = 200  # FastICA iterations at most (scikit-learn's default); unconverged is reported
    interp_top_examples: int = 20  # top held-out examples per direction whose token ids give its entropy
    interp_top_directions: int = 100  # directions per method sampled at random among live ones for simulation scoring
    interp_ks: tuple[int, ...] = (1, 2, 5, 20)  # k of the k-sparse probes (SAEBench's k_values include 1, 2, 5, 20)
    interp_held_out_share: float = 0.2  # share of the documents (train and mae stores pooled) held out for scoring
    interp_probe_rows: int = 2_000  # probe training rows per class, balanced (SAEBench: 4,000 in all)
    interp_min_positives: int = 50  # a concept is scored only with this many positives in each split
    interp_document_groups: int = 100  # held-out documents are resampled in this many seeded groups (fewer = faster)
    interp_chunk_rows: int = 4_096  # activation rows encoded at once (gpt2: 4096 x 6144 x 4 B = 100 MB per SAE)
    interp_bootstrap: int = 1_000  # bootstrap resamples behind each 95% confidence interval

    def __post_init__(self) -> None:
        for name in ("synth_dict_ratios", "synth_l1_coefficients", "synth_topk_ks", "synth_l0_coefficients",
                     "synth_seeds", "interp_ks"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # JSON gives lists; keep tuples
        for name, section in SECTIONS.items():  # JSON gives dicts; a section validates itself
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, section(**getattr(self, name)))
            elif not isinstance(getattr(self, name), section):
                raise TypeError(f"{name}={getattr(self, name)!r}: a {section.__name__} (or a dict of its fields)")
        problems = []
        if not is_slug(self.name):  # it becomes the folder runs/<name>, and profile JSON files are shared
            problems.append(f"name={self.name!r}: use a plain name (letters, digits, '.', '_', '-', starting with a "
                            "letter or digit; no '/', no '..', not empty): it becomes the folder runs/<name>")
        if not self.hook.startswith("blocks.") or not self.hook.split(".")[1].isdigit():
            problems.append(f"hook={self.hook!r}: use a TransformerLens name like 'blocks.6.hook_resid_pre'")
        if self.store_dtype not in STORE_DTYPES:
            problems.append(f"store_dtype={self.store_dtype!r}: choose one of {STORE_DTYPES}")
        positive = ("d_in", "n_texts", "context_size", "capture_batch_size", "shard_rows", "ce_eval_contexts",
                    "mae_texts", "mae_top_k", "mae_top_features", "offline_vocab_size", "offline_n_layers",
                    "offline_n_heads", "synth_d", "synth_features", "synth_samples", "synth_epochs")
        problems += [f"{f}={getattr(self, f)}: must be a positive integer"
                     for f in positive if not _count(getattr(self, f), 1)]
        if not _count(self.dashboard_features, 0):
            problems.append(f"dashboard_features={self.dashboard_features!r}: an integer >= 0 (0 = no dashboards)")
        if self.sae_path is not None and not isinstance(self.sae_path, str):
            problems.append(f"sae_path={self.sae_path!r}: a folder path as a string, or None for notebook 03's SAE")
        if not (isinstance(self.target_l0, (int, float)) and self.target_l0 >= 0):
            problems.append(f"target_l0={self.target_l0!r}: latents per token to match (> 0), or 0 for no search")
        if not _count(self.torch_threads, 0):
            problems.append(f"torch_threads={self.torch_threads}: 0 (torch's default) or a positive thread count")
        problems += self._synthetic_problems() + self._interpretability_problems() + self._offline_lm_problems()
        if self.context_size < 2 and self.exclude_first_position:
            problems.append("context_size must be >= 2 when exclude_first_position is set")
        if self.is_offline and not problems and self.offline_n_layers <= self.layer:
            problems.append(f"offline_n_layers={self.offline_n_layers}: must exceed the hook's layer {self.layer}")
        if self.is_offline and self.d_in % max(self.offline_n_heads, 1):
            problems.append(f"d_in={self.d_in} must be divisible by offline_n_heads={self.offline_n_heads}")
        if problems:
            raise ValueError(f"invalid profile {self.name!r}:\n  " + "\n  ".join(problems))

    def _synthetic_problems(self) -> list[str]:
        problems = []
        if not (self.synth_dict_ratios and all(r > 0 for r in self.synth_dict_ratios)):
            problems.append(f"synth_dict_ratios={self.synth_dict_ratios}: need one or more positive ratios")
        for name in ("synth_l1_coefficients", "synth_l0_coefficients"):
            if not all(lam >= 0 for lam in getattr(self, name)):
                problems.append(f"{name}={getattr(self, name)}: each coefficient must be >= 0")
        widest_k_allowed = min(round(r * self.synth_features) for r in self.synth_dict_ratios or (1,))
        if not all(isinstance(k, int) and 0 < k <= widest_k_allowed for k in self.synth_topk_ks):
            problems.append(f"synth_topk_ks={self.synth_topk_ks}: each k must be an integer in 1..{widest_k_allowed} "
                            "(the narrowest swept dictionary)")
        if not (self.synth_mean_active > 0 and self.synth_lr > 0 and self.synth_target_l0 > 0):
            problems.append("synth_mean_active, synth_lr and synth_target_l0 must be > 0")
        if not (self.synth_seeds and all(isinstance(seed, int) and seed >= 0 for seed in self.synth_seeds)):
            problems.append(f"synth_seeds={self.synth_seeds}: one or more seeds (integers >= 0)")
        return problems

    def _interpretability_problems(self) -> list[str]:
        """Notebook 06's counts: field -> (smallest value, what the value means)."""
        rules = {"interp_random_directions": (0, "random directions, 0 = d_sae"),
                 "interp_ica_components": (0, "ICA components, 0 = d_in"),
                 "interp_ica_fit_rows": (1, "rows FastICA fits on"), "interp_ica_max_iter": (1, "FastICA iterations"),
                 "interp_top_examples": (2, "examples per direction; an entropy needs at least 2"),
                 "interp_top_directions": (1, "directions per method"), "interp_chunk_rows": (1, "rows per chunk"),
                 "interp_bootstrap": (1, "bootstrap resamples"), "interp_probe_rows": (1, "probe rows per class"),
                 "interp_min_positives": (1, "positives per split"), "interp_document_groups": (2, "document groups")}
        problems = [f"{name}={getattr(self, name)!r}: an integer >= {minimum} ({meaning})"
                    for name, (minimum, meaning) in rules.items()
                    if not _count(getattr(self, name), minimum)]
        if not (self.interp_ks and all(isinstance(k, int) and k >= 1 for k in self.interp_ks)):
            problems.append(f"interp_ks={self.interp_ks!r}: one or more integers >= 1 (directions per sparse probe)")
        if not 0 < self.interp_held_out_share < 1:
            problems.append(f"interp_held_out_share={self.interp_held_out_share!r}: a share of the documents, "
                            "strictly between 0 and 1 (e.g. 0.2)")
        return problems

    def _offline_lm_problems(self) -> list[str]:
        def count(name: str, minimum: int) -> bool:
            return _count(getattr(self, name), minimum)

        problems = [f"{name}={getattr(self, name)!r}: must be a positive integer" for name in
                    ("offline_lm_steps", "offline_lm_batch_size", "offline_lm_eval_every") if not count(name, 1)]
        problems += [f"{name}={getattr(self, name)!r}: an integer >= 0 (0 = {meaning})" for name, meaning in
                     (("offline_lm_texts", "every document"), ("offline_lm_threads", "every core"))
                     if not count(name, 0)]
        if self.offline_lm not in OFFLINE_LMS:
            problems.append(f"offline_lm={self.offline_lm!r}: choose one of {OFFLINE_LMS}")
        if not self.offline_lm_lr > 0:
            problems.append(f"offline_lm_lr={self.offline_lm_lr}: must be > 0")
        return problems

    @property
    def d_sae(self) -> int:
        return self.sae.expansion_factor * self.d_in

    @property
    def seed(self) -> int:
        """The run's seed (`train.seed`): the split, shuffling, SAE initialisation and the offline LM."""
        return self.train.seed

    def __getattr__(self, name: str):
        # A section's field read by its own name (profile.lr is profile.train.lr), as replace() and a
        # profile JSON also take them: code and notebooks written before the sections keep working.
        if name in TRAINING_FIELDS:
            return getattr(self.train, name)
        if name in SAE_FIELDS or name in MOVED:
            return getattr(self.sae, MOVED.get(name, name))
        raise AttributeError(f"'Profile' has no field {name!r}" + (
            f"; did you mean {close[0]!r}?" if (close := difflib.get_close_matches(name, field_names(), 1)) else ""))

    @property
    def layer(self) -> int:
        """The block index in the hook name: blocks.6.hook_resid_pre -> 6."""
        return int(self.hook.split(".")[1])

    @property
    def is_offline(self) -> bool:
        return self.model_name == OFFLINE_MODEL

    def to_dict(self) -> dict:
        """Every field; the sections as nested dicts ({"sae": {...}, "train": {...}})."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, values: dict) -> Profile:
        """A profile from `to_dict`'s form; a section's field may also stand at the top by its own name
        (a flat profile JSON from before the sections, or a hand-written one): it goes to its section."""
        if "name" not in values:
            raise ValueError("a profile needs a name (it becomes its runs/ and figures/ folder)")
        return Profile(name=values["name"])._with({k: v for k, v in values.items() if k != "name"})

    @classmethod
    def from_json(cls, text: str) -> Profile:
        return cls.from_dict(json.loads(text))

    def replace(self, **overrides) -> Profile:
        """A copy with some fields changed, section fields by their own names too (replace(lr=3e-4,
        architecture="topk") sets train.lr and sae.architecture); an unknown name says which was meant."""
        return self._with(overrides)

    def _with(self, values: dict) -> Profile:
        values = dict(values)
        renamed = [f"{old} is now {RENAMED[old]}" for old in sorted(set(values) & set(RENAMED))]
        if renamed:
            raise ValueError("renamed profile field(s): " + "; ".join(renamed))
        top = {f.name for f in dataclasses.fields(Profile)}
        unknown = [n for n in values if n not in top and n not in TRAINING_FIELDS and n not in SAE_FIELDS
                   and n not in MOVED]
        if unknown:
            hints = [_did_you_mean(u, field_names()) for u in unknown]
            listing = "" if all("did you mean" in h for h in hints) else \
                f"; valid fields: {field_names()}"
            raise ValueError(f"unknown profile field(s) {', '.join(hints)}{listing}")
        sections = {}
        for name, section in (("sae", self.sae), ("train", self.train)):
            given = values.pop(name, None)
            if isinstance(given, dict):
                section = section.replace(**given)
            elif given is not None:
                section = given
            sections[name] = section
        flat = {n: values.pop(n) for n in list(values) if n in TRAINING_FIELDS}
        sections["train"] = sections["train"].replace(**flat) if flat else sections["train"]
        flat = {MOVED.get(n, n): values.pop(n) for n in list(values) if n in SAE_FIELDS or n in MOVED}
        sections["sae"] = sections["sae"].replace(**flat) if flat else sections["sae"]
        return dataclasses.replace(self, **values, **sections)

    def banner(self, device: str | None = None) -> str:
        device = device or default_device()
        sae = (f"the SAE in {self.sae_path} (sae_path; notebook 03 trains its own, not analysed)" if self.sae_path
               else f"SAE {self.d_in}->{self.d_sae} ({self.sae.architecture}), {self.train.epochs} epochs")
        lines = [f"saelab profile {self.name!r} on {describe_device(device)}: {self.model_name} {self.hook}, "
                 f"{self.n_texts:,} texts x {self.context_size} tokens, {sae}"]
        if self.is_offline:
            lines.append(f"OFFLINE PROFILE: {self.offline_lm_description} on a locally built corpus. "
                         "Its features are NOT GPT-2 features; use it to learn the workbook and check the "
                         "pipeline, not to interpret GPT-2.")
        return "\n".join(lines)

    @property
    def offline_lm_description(self) -> str:
        """What the offline model is, for banners and figure notes."""
        return ("a small random-weight model" if self.offline_lm == "random"
                else "a small model trained on Python docstrings")

    def __repr__(self) -> str:
        return self.banner()


def field_names() -> list[str]:
    """Every name a profile takes: its own fields, then its sections' fields (as replace() takes them)."""
    return [f.name for f in dataclasses.fields(Profile)] + list(SAE_FIELDS) + list(TRAINING_FIELDS)


GPT2 = Profile(name="gpt2")

# GPT-2 and OpenWebText on a laptop CPU in minutes: fewer texts, fewer epochs.
QUICK = GPT2.replace(
    name="quick", n_texts=2_000, epochs=5, mae_texts=500, capture_batch_size=16,
    synth_samples=50_000, synth_epochs=10, synth_l1_coefficients=(1e-4, 3e-4, 1e-3), synth_topk_ks=(4, 8, 16),
)

# No network: a 64-wide random GPT-2-architecture model, corpus and tokenizer built from
# what is installed. Sized so every notebook runs in CI in seconds.
OFFLINE = GPT2.replace(
    name="offline", model_name=OFFLINE_MODEL, dataset_id=OFFLINE_CORPUS, dataset_revision=None,
    d_in=64, n_texts=400, context_size=64, capture_batch_size=16, shard_rows=4_096,
    # 1,024 BPE tokens: the ~375k-token corpus sees each token often enough for a small model to learn it
    # (at 4,096 even a bigram model is only 0.82x the unigram CE, and the model trains ~20% slower)
    offline_vocab_size=1_024,
    store_dtype="float32", batch_size=256, mae_texts=100,
    # Trained to convergence: 30 epochs (~2,700 steps), lr 2e-3 annealed to 0 by a cosine; measured on a
    # shared 2-core CPU, L0 and FVU then move by < 1% over the last 20% of steps (5 epochs left L0 falling).
    epochs=30, lr=2e-3, lr_scheduler_name="cosineannealing", lr_end=0.0,
    # Every architecture at L0 32 (notebook 03 searches λ and λ0 for it, k = 32). The trained model's residual
    # stream (norm ~42) wants a larger λ than the seed's 1e-3; the search starts from these values, near
    # where it ended on this corpus. JumpReLU's thresholds move at most ~lr per Adam step, so they start
    # near where they should end (θ 2).
    target_l0=32.0, l1_coefficient=3e-2, l0_coefficient=3e-2, bandwidth=2.0, init_threshold=2.0,
    dashboard_features=12,  # committed under figures/offline/dashboards: a dozen pages show the format
    # The offline model and SAE are tiny (width 64): intra-op threads cost more than they give there
    # (measured on a shared 2-core CPU: 2 threads made notebook 03's training and CE evaluation 5-10x slower).
    torch_threads=1,
    # notebook 05 in seconds: 64 features in 32 dims, 12 small SAEs of 2x width (the λ scale follows 1/synth_d)
    synth_d=32, synth_features=64, synth_mean_active=3.0, synth_samples=8_192, synth_epochs=40,
    synth_lr=1e-2, synth_dict_ratios=(2.0,), synth_l1_coefficients=(3e-3, 1e-2, 3e-2), synth_topk_ks=(2, 4),
    synth_l0_coefficients=(1e-3, 3e-3), synth_seeds=(0, 1), synth_target_l0=4.0,
    # notebook 06 in seconds: FastICA on 10k of the ~25k training rows; 50 sampled directions per method.
    # Half the ~500 documents held out: each of most concepts then has its 50 held-out positives.
    interp_ica_fit_rows=10_000, interp_top_directions=50, interp_held_out_share=0.5,
)

# What `make test` runs the notebooks with: the offline pipeline at a smaller setting, so the tests stay fast
# while `make workbook` (profile offline) trains for real. Same data, model and hook; shorter training
# (L0 still matched by the search, not converged: notebook 03 says so) and a smaller notebook 05.
OFFLINE_TEST = OFFLINE.replace(
    name="offline-test", epochs=5, lr=4e-3,
    synth_samples=4_096, synth_epochs=20, synth_seeds=(0, 1),
)

PROFILES: dict[str, Profile] = {p.name: p for p in (GPT2, QUICK, OFFLINE, OFFLINE_TEST)}


def default_device() -> str:
    import torch  # deferred: importing saelab must stay cheap

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def describe_device(device: str) -> str:
    """The machine behind a device name, for banners and figure titles: 'cpu (2-core CPU)',
    'cuda (NVIDIA H100 80GB HBM3)'. Published numbers say which machine made them."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    if device == "cpu":
        return f"cpu ({os.cpu_count()}-core CPU)"
    return device


def apply_threads(profile: Profile) -> int:
    """Set torch's intra-op CPU threads to profile.torch_threads (0 leaves torch's default, all cores);
    returns the count in use. Notebooks 02-05 call it right after load_profile."""
    import torch  # deferred: importing saelab must stay cheap

    if profile.torch_threads > 0:
        torch.set_num_threads(profile.torch_threads)
    return torch.get_num_threads()


def gpt2_is_cached() -> bool:
    """True when the local Hugging Face cache already holds GPT-2's config."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return isinstance(try_to_load_from_cache("gpt2", "config.json"), str)


def hub_is_reachable(timeout_s: float = 2.0) -> bool:
    """A TCP probe of the hub, bounded by timeout_s even when DNS hangs."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout_s).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result and result[0])


def detect_profile_name() -> str:
    """gpt2 on CUDA / quick elsewhere when GPT-2 can be had (cache or hub), else offline."""
    if gpt2_is_cached() or hub_is_reachable():
        return "gpt2" if default_device() == "cuda" else "quick"
    return "offline"


def load_profile(profile: str | Profile | None = None, /, **overrides) -> Profile:
    """The profile to run: `profile` (a name, a path to a JSON file written by `Profile.to_json`, or a
    Profile) -> else $SAELAB_PROFILE -> else auto-detection (a banner-worthy choice: gpt2 on CUDA and
    quick elsewhere when GPT-2 can be had, else offline). `overrides` replace single fields, `name`
    included: load_profile("gpt2", name="gpt2-local", dataset_id="/data/owt.jsonl")."""
    if isinstance(profile, Profile):
        pass
    else:
        name = profile or os.environ.get("SAELAB_PROFILE") or detect_profile_name()
        if name in PROFILES:
            profile = PROFILES[name]
        elif name.endswith(".json") and Path(name).is_file():
            profile = Profile.from_json(Path(name).read_text())
        else:
            raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)} "
                             "(or a path to a profile .json), e.g. SAELAB_PROFILE=offline")
    return profile.replace(**overrides) if overrides else profile
