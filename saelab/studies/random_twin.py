"""The same pipeline on a random-weight twin of the language model, in memory (notebook 04).

Are the SAE's top features about text because the model learned text, or would any network's
residual stream give the same? `random_twin_alignment` answers cheaply: the model at initialisation
(`lm.at_initialisation`: its shape, seed, init std and tokenizer, so the very weights training started
from) reads the same contexts; its activations stay in memory (the
held-out ones pass through a temporary store, so that `analysis.max_activating` picks the examples
exactly as notebook 04 does); an SAE of the profile's architecture is trained on them with `train_sae`, at
notebook 03's L0 (`twin_sae`); and its top features get the same token purity and position spread as the
real model's.
"""

from __future__ import annotations

import tempfile

import pandas as pd
import torch

from saelab.config import Profile
from saelab.data.capture import row_index
from saelab.data.lm import at_initialisation, init_std
from saelab.data.tokens import load_tokens
from saelab.features.analysis import max_activating, text_alignment, top_features
from saelab.metrics import evaluate_sae
from saelab.store import StoreWriter
from saelab.train import comparison
from saelab.train.loop import sae_for_profile, train_sae


@torch.inference_mode()
def capture_in_memory(model, tokens: torch.Tensor, hook: str, skip_first_position: bool = True,
                      batch_size: int = 32) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(rows, d_model) float32 activations of `hook` over tokens (contexts, pos) and their per-row index
    (context, position, token_id), rows in the order notebook 02's capture stores them."""
    layer, device = int(hook.split(".")[1]), next(model.parameters()).device
    parts = []
    for first in range(0, len(tokens), batch_size):
        ids = tokens[first:first + batch_size]  # (batch, pos)
        _, cache = model.run_with_cache(ids.to(device), names_filter=[hook], stop_at_layer=layer + 1)
        acts = cache[hook][:, 1 if skip_first_position else 0:].float().cpu()  # (batch, stored pos, d_model)
        parts.append((acts.reshape(-1, acts.shape[-1]), row_index(ids, first, skip_first_position)))
    index = {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
    return torch.cat([p[0] for p in parts]), index


def twin_sae(profile: Profile, activations: torch.Tensor, device):
    """An SAE of the profile's architecture and training settings, trained in memory on `activations`, at
    the profile's target L0 when it sets one (k = target, or λ / λ0 searched as notebook 03 does, probes
    kept in memory): the twin's SAE is compared at the L0 of notebook 03's. -> (sae, search result or None)"""
    field = comparison.sparsity_field(profile.sae.architecture)
    if not profile.target_l0:
        return _train(profile, activations, device)[0], None
    if field == "k":
        return _train(profile.replace(k=max(1, round(profile.target_l0))), activations, device)[0], None
    trained = {}

    def probe(value: float) -> float:  # the search's probe, kept in memory (notebook 03's run folders stay)
        trained[value], l0 = _train(profile.replace(**{field: value}), activations, device)
        return l0

    search = comparison.search_coefficient(profile, activations, profile.sae.architecture, profile.target_l0,
                                           probe=probe)
    return trained[search["value"]], search


def _train(profile: Profile, activations: torch.Tensor, device) -> tuple:
    """A fresh SAE for the profile trained on `activations`, and its last validation L0."""
    sae = sae_for_profile(profile, device)
    history = train_sae(sae, activations, profile.train, progress=False).history
    return sae, float(history["val_l0"].iloc[-1])


def random_twin_alignment(profile: Profile, lm, max_contexts: int = 1024, tokenizer=None) -> pd.DataFrame:
    """`analysis.text_alignment` of the top `mae_top_features` features of an SAE trained (the profile's
    architecture and training settings, at its target L0: `twin_sae`; on activations rescaled to `lm`'s RMS
    norm) on the random twin of `lm`: the model `lm` was trained from, at step 0 (`lm.at_initialisation`
    with profile.seed and the init std `lm.init_std(profile)`; same tokenizer), over the first
    `max_contexts` contexts of the "train" split (offline: all of them); examples from the held-out "mae"
    split, as notebook 04. The table's `attrs` report the twin SAE: "l0" and "fvu" on the held-out
    activations, "target_l0", and "search" (its λ / λ0 search, or None).
    Runs where `lm` lives."""
    twin, device = at_initialisation(lm, seed=profile.seed, std=init_std(profile)), next(lm.parameters()).device
    contexts = {split: load_tokens(profile, split) for split in ("train", "mae")}
    ids = {split: torch.tensor(rows.select(range(min(max_contexts, len(rows))))["input_ids"], dtype=torch.int64)
           for split, rows in contexts.items()}
    activations, _ = capture_in_memory(twin, ids["train"], profile.hook, profile.exclude_first_position)
    # a random model's residual stream is far smaller than a trained one's: rescale it to the trained
    # model's RMS norm on the same contexts, so the profile's λ puts the same pressure on both SAEs
    trained, _ = capture_in_memory(lm, ids["train"], profile.hook, profile.exclude_first_position)
    scale = (trained.pow(2).sum(1).mean() / activations.pow(2).sum(1).mean()).sqrt()
    activations = activations * scale
    sae, search = twin_sae(profile, activations, device)
    held_out, index = capture_in_memory(twin, ids["mae"], profile.hook, profile.exclude_first_position)
    held_out = held_out * scale
    with tempfile.TemporaryDirectory() as folder:  # max_activating reads a store: a temporary one
        writer = StoreWriter(folder, model_name=twin.cfg.model_name, hook=profile.hook, d_in=held_out.shape[1],
                             dtype="float32")
        writer.add_shard(held_out, index, contexts=len(ids["mae"]))
        mae = max_activating(sae, writer.finish(), profile.mae_top_k, device=device, progress=False)
    top = top_features(mae.stats, "total_activation", profile.mae_top_features)
    table = text_alignment(mae, top.index, tokenizer)
    fit = evaluate_sae(sae, held_out)
    table.attrs.update({"l0": fit["l0"], "fvu": fit["fvu"], "target_l0": profile.target_l0, "search": search})
    return table
