"""A store where the answer is known, to prove notebook 06's scores before they are trusted.

Six features sit on random orthonormal directions u_1..u_6 of a d_in-dimensional space (so no residual
dimension holds one alone); feature f fires, with amplitude a, exactly on token f of a 12-token
vocabulary, drawn uniformly per position, and Gaussian noise lives in the orthogonal complement of
the features' span:

    x = a * sum_f [token = f] u_f + P_perp g,   g ~ N(0, noise^2 I)

The planted SAE reads each feature exactly: h_f = ReLU(x . u_f - a/2) = a/2 on token f, 0 elsewhere.
Concepts: "feature f" (token f; f = 1..4) and "union 5|6" (token 5 or 6: a dense direction u_5 + u_6
finds it, the SAE splits it over two features). So a planted SAE must probe at AUC 1 with one
direction, simulate at correlation 1 with entropy 0; the residual basis must not; shuffled labels
must give chance.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from saelab.sae import SAE
from saelab.store import ActivationStore, StoreWriter
from saelab.studies.baselines import SAEDirections, fit_baselines

HOOK = "blocks.0.hook_resid_pre"
VOCAB = 12  # tokens 1..6 carry a feature; 0 and 7..11 carry none
FEATURES = 6
CONCEPTS: dict[str, tuple[str, str]] = {
    **{f"feature {f}": ("token", f"token {f}: feature {f} alone fires") for f in range(1, 5)},
    "union 5|6": ("class", "token 5 or 6: two features, one concept"),
}


@dataclass
class Planted:
    """A planted problem: one store, its labels, the planted SAE's directions and the true feature directions."""

    store: ActivationStore
    labels: torch.Tensor  # (rows, len(CONCEPTS)) bool
    sae: SAEDirections
    directions: torch.Tensor  # (d_in, FEATURES) orthonormal columns u_f
    profile: object  # the profile the planted run uses (d_in and notebook 06 sizes)


def labels_of(token_ids: torch.Tensor) -> torch.Tensor:
    """(rows,) token ids -> (rows, len(CONCEPTS)) bool, concepts in CONCEPTS order."""
    single = [token_ids == f for f in range(1, 5)]
    return torch.stack([*single, (token_ids == 5) | (token_ids == 6)], dim=1)


def planted_problem(directory: str | Path, profile, *, documents: int = 200, length: int = 30, d_in: int = 16,
                    amplitude: float = 4.0, noise: float = 1.0, seed: int = 0) -> Planted:
    """Write the planted store under `directory` (rows = documents x length, one context per document)
    and build its planted SAE. `profile` gives notebook 06's sizes; its d_in is set to d_in here. The store
    is made afresh each time (it is a function of the seed), replacing any earlier one there."""
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_in, FEATURES, generator=generator))  # (d_in, F) orthonormal
    rows = documents * length
    token_ids = torch.randint(0, VOCAB, (rows,), generator=generator)
    on = torch.stack([token_ids == f for f in range(1, FEATURES + 1)], dim=1).float()  # (rows, F)
    g = noise * torch.randn(rows, d_in, generator=generator)
    x = amplitude * on @ u.T + g - (g @ u) @ u.T  # noise projected off the features' span
    index = {"context": torch.arange(rows) // length, "position": torch.arange(rows) % length + 1,
             "token_id": token_ids}
    shutil.rmtree(Path(directory) / "planted", ignore_errors=True)
    writer = StoreWriter(Path(directory) / "planted", model_name="planted", hook=HOOK, d_in=d_in, dtype="float32",
                         metadata={"planted": {"seed": seed, "amplitude": amplitude, "noise": noise}})
    writer.add_shard(x, index, contexts=documents)
    store = writer.finish()
    sae = SAE(d_in, FEATURES)
    with torch.no_grad():
        sae.W_enc.copy_(u)
        sae.b_enc.fill_(-amplitude / 2)
        sae.b_dec.zero_()
    planted_profile = profile.replace(d_in=d_in, interp_random_directions=d_in, interp_ica_fit_rows=min(rows, 2_000))
    return Planted(store, labels_of(token_ids), SAEDirections("SAE planted", sae, "reads the planted features exactly"),
                   u, planted_profile)


def methods_for(planted: Planted, device="cpu") -> list:
    """The baselines fitted on the planted store (as on real activations), then the planted SAE."""
    return fit_baselines(planted.profile, planted.store, device) + [planted.sae]


def shuffled(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """The labels with rows permuted (seeded): every concept keeps its positives' count and loses its meaning."""
    return labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))]


def report(runs: dict) -> pd.DataFrame:
    """One row per (labels, method) of `probing.evaluate` runs on the planted store (runs: labels name ->
    Evaluation): mean AUC of the single features at k = 1, the union's AUC at k = 1 and k = 2 (the dense
    probe at its one k), and the mean simulation score and top-example entropy of the sampled directions."""
    rows = []
    for labels, evaluation in runs.items():
        auc = evaluation.probing.groupby(["method", "concept", "k"])["auc"].first()
        simulation = evaluation.simulation.groupby("method")[["score", "entropy"]].mean()
        for method, kind in evaluation.methods["kind"].items():
            ks = sorted(auc[method].index.get_level_values("k").unique())
            features = [auc[method, c, ks[0]] for c in CONCEPTS if c != "union 5|6"]
            rows.append({"labels": labels, "method": method, "kind": kind,
                         "features_auc_k1": sum(features) / len(features),
                         "union_auc_k1": auc[method, "union 5|6", ks[0]],
                         "union_auc_k2": auc[method, "union 5|6", ks[1] if len(ks) > 1 else ks[0]],
                         "simulation": simulation["score"].get(method, float("nan")),
                         "entropy": simulation["entropy"].get(method, float("nan"))})
    return pd.DataFrame(rows)
