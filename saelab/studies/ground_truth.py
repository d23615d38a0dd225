"""Notebook 05's sweep: train each SAE architecture on synthetic superposition data and score recovery.

    data = make_synthetic(8192, d=32, n_features=64, mean_active=3)
    results = sweep(data, knobs={"l1_coefficient": (1e-3, 1e-2), "l0_coefficient": (1e-3,), "k": (2, 4)},
                    dict_sizes=(64, 128))
    plots.sweep_figure(results, profile)       # saelab.plots: MMCS and L0 against each sparsity knob

Each architecture is swept over its own sparsity knob, read off the class rather than its name: `k`
when it is one of its options (topk, batchtopk), else the coefficient its loss takes (tied and
standard: λ = l1_coefficient; jumprelu: λ0 = l0_coefficient).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm  # text bars: a saved notebook keeps their last line (tqdm.auto widgets stay at "0%")

from saelab.metrics import evaluate
from saelab.paths import replace_atomically
from saelab.sae import REGISTRY, SAE, architecture_names, sae_for
from saelab.studies.synthetic import SyntheticData, recovery_scores
from saelab.train.loop import train_sae

KNOB_LABELS = {"l1_coefficient": "λ", "l0_coefficient": "λ0", "k": "k"}


def knob_of(architecture: str) -> str:
    """The setting a sweep varies for this architecture: "k", "l1_coefficient" or "l0_coefficient"."""
    if architecture not in REGISTRY:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {architecture_names()}")
    cls = REGISTRY[architecture]
    return "k" if "k" in cls.options else cls.sparsity_setting


def sweep_sae(architecture: str, d_in: int, d_sae: int, knob: float) -> tuple[SAE, dict]:
    """The SAE for one sweep point and the training options that go with it (its coefficient, if any)."""
    if knob_of(architecture) == "k":
        return sae_for(architecture, d_in, d_sae, k=int(knob)), {}
    return sae_for(architecture, d_in, d_sae), {knob_of(architecture): float(knob)}


def profile_knobs(profile) -> dict[str, tuple[float, ...]]:
    """The knob values a profile sweeps (its synth_* fields), keyed as `sweep` takes them."""
    return {"l1_coefficient": profile.synth_l1_coefficients, "l0_coefficient": profile.synth_l0_coefficients,
            "k": profile.synth_topk_ks}


def fit_and_score(data: SyntheticData, architecture: str, d_sae: int, knob: float, *, seed: int = 0,
                  device: str | None = None, **train_kwargs) -> dict:
    """Train one SAE on data.activations; its decoder rows against data.features, plus L0 and FVU."""
    torch.manual_seed(seed)  # same initialisation for every point of the sweep
    sae, options = sweep_sae(architecture, data.activations.shape[1], d_sae, knob)
    train_sae(sae, data.activations, seed=seed, device=device, progress=False, **options, **train_kwargs)
    fit = evaluate(sae, data.activations)
    return {"architecture": architecture, "d_sae": d_sae, "knob": KNOB_LABELS[knob_of(architecture)],
            "knob_value": knob, **recovery_scores(data.features, sae.decoder_weight), "l0": fit["l0"],
            "fvu": fit["fvu"]}


def sweep(data: SyntheticData, *, knobs: dict[str, tuple[float, ...]], dict_sizes: tuple[int, ...],
          architectures: tuple[str, ...] | None = None, epochs: int = 20, lr: float = 3e-3, batch_size: int = 256,
          seed: int = 0, device: str | None = None, progress: bool = True,
          csv_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every architecture (default: all registered) x dictionary size x value of its knob (`knobs` maps
    "l1_coefficient", "l0_coefficient" and "k" to the values to try); one row per SAE with its scores.

    Columns: architecture, d_sae, knob ("λ", "λ0" or "k"), knob_value, mmcs (true -> learned),
    mmcs_learned (learned -> true), hungarian, recovered (share of true features at cos > 0.9), l0, fvu.
    With csv_path, each finished SAE's row is saved there at once (with the settings it was trained
    with), and points already there with the same settings and data are not trained again: an
    interrupted sweep resumes where it stopped.
    """
    architectures = architectures or architecture_names()
    points = [(a, d_sae, value) for a in architectures for d_sae in dict_sizes for value in knobs.get(knob_of(a), ())]
    if not points:
        raise ValueError("the sweep is empty: give at least one dictionary size and values for the knobs "
                         f"{sorted({knob_of(a) for a in architectures})}")
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "data": fingerprint(data)}
    saved = _read_rows(csv_path)
    rows = []
    for architecture, d_sae, knob in tqdm(points, desc="SAEs", disable=not progress):
        key = {"architecture": architecture, "d_sae": d_sae, "knob_value": float(knob), **settings}
        done = next((row for row in saved if all(row.get(k) == v for k, v in key.items())), None)
        if done is None:
            done = {**fit_and_score(data, architecture, d_sae, knob, seed=seed, device=device, epochs=epochs,
                                    lr=lr, batch_size=batch_size), **settings}
            saved.append(done)
            if csv_path is not None:
                _write_rows(csv_path, saved)
        rows.append({k: v for k, v in done.items() if k not in settings})
    return pd.DataFrame(rows)


def fingerprint(data: SyntheticData) -> str:
    """A short hash of the activations: a resumed sweep must be on the very same data."""
    return hashlib.sha256(data.activations.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _read_rows(csv_path) -> list[dict]:
    if csv_path is None or not Path(csv_path).is_file():
        return []
    try:
        return pd.read_csv(csv_path, dtype={"data": str}).to_dict("records")
    except (ValueError, pd.errors.ParserError) as err:
        raise ValueError(f"cannot read the sweep results {csv_path} ({err}); delete it to rerun the sweep "
                         "from scratch") from err


def _write_rows(csv_path, rows: list[dict]) -> None:
    """The whole file rewritten via a temp file + rename: a kill leaves the old or the new file, never half."""
    path = Path(csv_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda tmp: pd.DataFrame(rows).to_csv(tmp, index=False))


def best_per_architecture(results: pd.DataFrame, by: str = "mmcs") -> pd.DataFrame:
    """The row with the highest `by` for each architecture: the settings where recovery works best."""
    return results.loc[results.groupby("architecture", sort=False)[by].idxmax()].reset_index(drop=True)
