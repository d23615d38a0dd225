"""Notebook 05's sweep: train each SAE recipe on synthetic superposition data and score recovery.

    data = make_synthetic(8192, d=32, n_features=64, mean_active=3)
    results = sweep(data, l1_coefficients=(1e-3, 1e-2), ks=(2, 4), dict_sizes=(64, 128))
    plots.sweep_figure(results, profile)       # saelab.plots: MMCS and L0 against λ (or k) per recipe

The recipe is carried by the SAE, as in `saelab.train`: tied_l1 = SAE(tied=True) (the seed),
l1 = SAE(tied=False), topk = SAE(tied=False, k=k) trained with λ = 0.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm  # text bars: a saved notebook keeps their last line (tqdm.auto widgets stay at "0%")

from saelab.config import RECIPES
from saelab.loop import evaluate
from saelab.paths import replace_atomically
from saelab.sae import SAE
from saelab.synthetic import SyntheticData, recovery_scores
from saelab.train import train_sae


def recipe_sae(recipe: str, d_in: int, d_sae: int, knob: float) -> tuple[SAE, float]:
    """The SAE for one sweep point and the λ to train it with; knob is λ (L1 recipes) or k (topk)."""
    if recipe == "tied_l1":
        return SAE(d_in, d_sae, tied=True), float(knob)
    if recipe == "l1":
        return SAE(d_in, d_sae, tied=False), float(knob)
    if recipe == "topk":
        return SAE(d_in, d_sae, tied=False, k=int(knob)), 0.0  # TopK sets sparsity itself: no L1
    raise ValueError(f"unknown recipe {recipe!r}; choose one of {RECIPES}")


def fit_and_score(data: SyntheticData, recipe: str, d_sae: int, knob: float, *, seed: int = 0,
                  device: str | None = None, **train_kwargs) -> dict:
    """Train one SAE on data.activations; its decoder rows against data.features, plus L0 and FVU."""
    torch.manual_seed(seed)  # same initialisation for every point of the sweep
    d_in = data.activations.shape[1]
    sae, l1_coefficient = recipe_sae(recipe, d_in, d_sae, knob)
    train_sae(sae, data.activations, l1_coefficient=l1_coefficient, seed=seed, device=device,
              progress=False, **train_kwargs)
    fit = evaluate(sae, data.activations, l1_coefficient)
    return {"recipe": recipe, "d_sae": d_sae, "knob": "k" if recipe == "topk" else "λ", "knob_value": knob,
            **recovery_scores(data.features, sae.decoder_weight),
            "l0": fit["l0"], "fvu": fit["fvu"]}


def sweep(data: SyntheticData, *, l1_coefficients: tuple[float, ...], ks: tuple[int, ...],
          dict_sizes: tuple[int, ...], recipes: tuple[str, ...] = RECIPES, epochs: int = 20, lr: float = 3e-3,
          batch_size: int = 256, seed: int = 0, device: str | None = None, progress: bool = True,
          csv_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every recipe x dictionary size x sparsity knob; one row per SAE with its recovery scores.

    Columns: recipe, d_sae, knob ("λ" or "k"), knob_value, mmcs (true -> learned), mmcs_learned
    (learned -> true), hungarian, recovered (share of true features at cos > 0.9), l0, fvu.
    With csv_path, each finished SAE's row is saved there at once (with the settings it was trained
    with), and points already there with the same settings and data are not trained again: an
    interrupted sweep resumes where it stopped.
    """
    unknown = set(recipes) - set(RECIPES)
    if unknown:
        raise ValueError(f"unknown recipe(s) {sorted(unknown)}; choose from {RECIPES}")
    points = [(recipe, d_sae, knob) for recipe in recipes for d_sae in dict_sizes
              for knob in (ks if recipe == "topk" else l1_coefficients)]
    if not points:
        raise ValueError("the sweep is empty: give at least one dictionary size and one λ or k")
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed, "data": fingerprint(data)}
    saved = _read_rows(csv_path)
    rows = []
    for recipe, d_sae, knob in tqdm(points, desc="SAEs", disable=not progress):
        key = {"recipe": recipe, "d_sae": d_sae, "knob_value": float(knob), **settings}
        done = next((row for row in saved if all(row.get(k) == v for k, v in key.items())), None)
        if done is None:
            done = {**fit_and_score(data, recipe, d_sae, knob, seed=seed, device=device, epochs=epochs, lr=lr,
                                    batch_size=batch_size), **settings}
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


def best_per_recipe(results: pd.DataFrame, by: str = "mmcs") -> pd.DataFrame:
    """The row with the highest `by` for each recipe: the settings where recovery works best."""
    return results.loc[results.groupby("recipe", sort=False)[by].idxmax()].reset_index(drop=True)
