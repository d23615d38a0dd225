"""Notebook 03's comparison: every architecture trained on the same activations, measured the same way.

    table = compare_architectures(profile, train_x, heldout_x, lm, tokens)   # one row per architecture
    print(describe_architectures(table, profile))                            # the table in words

The profile's own architecture is its main run (folder "sae"); each other one is a resumable run in
the folder named after it (paths.sae_dir(profile, "topk"), ...), all other settings equal.
Units: FVU and explained variance as fractions (their usual unit); every other share in percent.
"""

from __future__ import annotations

import pandas as pd
import torch

from saelab.metrics import ILL_CONDITIONED_GAP, ce_loss_recovered, evaluate_sae
from saelab.sae import architecture_names
from saelab.train.loop import train_profile


def run_name(profile, architecture: str) -> str:
    return "sae" if architecture == profile.sae.architecture else architecture


def quality(sae, eval_activations: torch.Tensor, lm, tokens: torch.Tensor, profile) -> dict[str, float]:
    """One SAE on held-out activations and tokens: L0, FVU, explained variance (1 - FVU), CE loss recovered
    (%), KL (nats per token), the zero-ablation gap (nats), dead and dense latents (%)."""
    m = evaluate_sae(sae, eval_activations)
    ce = ce_loss_recovered(lm, sae, tokens, profile.hook, skip_first_position=profile.exclude_first_position)
    return {"l0": m["l0"], "fvu": m["fvu"], "explained_variance": 1 - m["fvu"],
            "ce_loss_recovered_pct": 100 * ce["ce_loss_recovered"], "kl_sae": ce["kl_sae"],
            "ablation_gap": ce["ce_zero"] - ce["ce_clean"], "dead_pct": 100 * m["dead_fraction"],
            "dense_pct": 100 * m["dense_fraction"]}


def compare_architectures(profile, train_activations: torch.Tensor, eval_activations: torch.Tensor, lm,
                          tokens: torch.Tensor, architectures: tuple[str, ...] | None = None,
                          progress: bool = True) -> pd.DataFrame:
    """Train (or reuse) one SAE per architecture (default: all registered) and measure each with `quality`."""
    rows = []
    for architecture in architectures or architecture_names():
        name = run_name(profile, architecture)
        sae = train_profile(profile.replace(architecture=architecture), train_activations, name,
                            progress=progress).sae
        rows.append({"architecture": architecture, "run": name,
                     **quality(sae, eval_activations, lm, tokens, profile)})
    return pd.DataFrame(rows).set_index("architecture")


def describe_architectures(table: pd.DataFrame, profile) -> str:
    """The comparison in plain words, from the numbers in `table` (one line per architecture)."""
    d_sae = profile.d_sae
    lines = [f"{name}: L0 {row.l0:.1f} of {d_sae} latents per token ({row.l0 / d_sae:.1%}), FVU {row.fvu:.3f}, "
             f"CE loss recovered {row.ce_loss_recovered_pct:.1f}%, dead {row.dead_pct:.1f}%"
             for name, row in table.iterrows()]
    if "tied" in table.index and len(table) > 1:
        seed, others = table.loc["tied"], table.drop(index="tied")
        better = others[(others.l0 < seed.l0) & (others.fvu <= seed.fvu)].index.tolist()
        lines.append(f"The seed's tied SAE uses {seed.l0 / d_sae:.1%} of its latents per token (the seed article "
                     "reported ~12.5%). "
                     + (f"{', '.join(better)} reconstruct at least as well with fewer active latents."
                        if better else "No other architecture here is both sparser and at least as accurate."))
    if (table["ablation_gap"] < ILL_CONDITIONED_GAP).any():
        lines.append(f"Zeroing the residual stream raises CE by only {table['ablation_gap'].min():.3f} nats here, "
                     "so CE loss recovered is ill-conditioned (it can exceed 100%); compare FVU and KL instead.")
    if profile.is_offline:
        lines.append("OFFLINE PROFILE: not GPT-2; these numbers describe the offline model's activations.")
    return "\n".join(lines)
