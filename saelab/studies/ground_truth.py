"""Notebook 05's sweep: train each SAE architecture on synthetic superposition data and score recovery.

    data = make_synthetic(8192, d=32, n_features=64, mean_active=3)
    results = sweep(data, knobs={"l1_coefficient": (1e-3, 1e-2), "l0_coefficient": (1e-3,), "k": (2, 4)},
                    dict_sizes=(64, 128), seeds=(0, 1))
    report = user_choice(results, target_l0=4, features=data.features)  # chosen as a user must, oracle beside
    plots.sweep_figure(results, profile)       # saelab.plots: MMCS and L0 against each sparsity knob

Each SAE trains on the first 80% of the samples; its L0 and FVU are measured on the last 20% (held
out), which is all a user has to choose an SAE by: the true features only grade the choice.

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
from saelab.studies.synthetic import SyntheticData, random_directions, recovery_scores
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


HELD_OUT = 0.2  # share of the synthetic samples kept out of training: the user's yardstick (held-out L0, FVU)


def held_out_split(n_samples: int, fraction: float = HELD_OUT) -> tuple[slice, slice]:
    """(train rows, held-out rows) of the synthetic samples: the last `fraction` held out. The samples are
    i.i.d., so a block is as random as a shuffle."""
    n_held_out = max(1, round(fraction * n_samples)) if n_samples > 1 else 0
    return slice(0, n_samples - n_held_out), slice(n_samples - n_held_out, n_samples)


def fit_and_score(data: SyntheticData, architecture: str, d_sae: int, knob: float, *, seed: int = 0,
                  device: str | None = None, **train_kwargs) -> dict:
    """Train one SAE on the training rows of data.activations (`held_out_split`); its decoder rows against
    data.features, plus its L0 and FVU on the held-out rows (all rows when there is only one)."""
    torch.manual_seed(seed)  # the seed sets the SAE's initialisation (and train_sae's shuffling)
    sae, options = sweep_sae(architecture, data.activations.shape[1], d_sae, knob)
    train, held_out = held_out_split(data.activations.shape[0])
    train_sae(sae, data.activations[train], seed=seed, device=device, progress=False, **options, **train_kwargs)
    fit = evaluate(sae, data.activations[held_out] if held_out.stop > held_out.start else data.activations)
    return {"architecture": architecture, "d_sae": d_sae, "knob": KNOB_LABELS[knob_of(architecture)],
            "knob_value": knob, "seed": seed, **recovery_scores(data.features, sae.decoder_weight), "l0": fit["l0"],
            "fvu": fit["fvu"]}


def sweep(data: SyntheticData, *, knobs: dict[str, tuple[float, ...]], dict_sizes: tuple[int, ...],
          architectures: tuple[str, ...] | None = None, epochs: int = 20, lr: float = 3e-3, batch_size: int = 256,
          seeds: tuple[int, ...] = (0,), device: str | None = None, progress: bool = True,
          csv_path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Every architecture (default: all registered) x dictionary size x value of its knob (`knobs` maps
    "l1_coefficient", "l0_coefficient" and "k" to the values to try) x seed; one row per SAE with its scores.

    Columns: architecture, d_sae, knob ("λ", "λ0" or "k"), knob_value, seed, mmcs (true -> learned),
    mmcs_learned (learned -> true), hungarian, recovered (share of true features at |cos| > 0.9), and the
    held-out l0 and fvu (`fit_and_score`).
    With csv_path, each finished SAE's row is saved there at once (with the settings it was trained
    with), and points already there with the same settings and data are not trained again: an
    interrupted sweep resumes where it stopped.
    """
    architectures = architectures or architecture_names()
    points = [(a, d_sae, value, seed) for a in architectures for d_sae in dict_sizes
              for value in knobs.get(knob_of(a), ()) for seed in seeds]
    if not points:
        raise ValueError("the sweep is empty: give at least one dictionary size and values for the knobs "
                         f"{sorted({knob_of(a) for a in architectures})}")
    settings = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "held_out": HELD_OUT, "data": fingerprint(data)}
    saved = _read_rows(csv_path)
    rows = []
    for architecture, d_sae, knob, seed in tqdm(points, desc="SAEs", disable=not progress):
        key = {"architecture": architecture, "d_sae": d_sae, "knob_value": float(knob), "seed": seed, **settings}
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


SCORES = ("mmcs", "mmcs_learned", "hungarian", "recovered", "l0", "fvu")


def per_setting(results: pd.DataFrame) -> pd.DataFrame:
    """One row per architecture x d_sae x knob value: each score's mean over seeds, plus `<score>_sd`
    (standard deviation over seeds; 0 with one seed) for mmcs and recovered, and the number of seeds."""
    keys = ["architecture", "d_sae", "knob", "knob_value"]
    grouped = results.groupby(keys, sort=False)
    out = grouped[list(SCORES)].mean()
    for score in ("mmcs", "recovered"):
        out[f"{score}_sd"] = grouped[score].std(ddof=1).fillna(0.0) if "seed" in results else 0.0
    out["seeds"] = grouped.size()
    return out.reset_index()


def best_per_architecture(results: pd.DataFrame, by: str = "mmcs") -> pd.DataFrame:
    """THE ORACLE: the setting (mean over seeds) with the highest `by` for each architecture. `by`="mmcs"
    grades with the true features, which no user has: show it beside `user_choice`, labelled as such."""
    settings = per_setting(results)
    return settings.loc[settings.groupby("architecture", sort=False)[by].idxmax()].reset_index(drop=True)


def user_choice(results: pd.DataFrame, target_l0: float, tolerance: float = 0.15) -> pd.DataFrame:
    """The setting a user would pick per architecture, without the true features: the lowest held-out FVU
    (mean over seeds) among the settings whose held-out L0 is at most target_l0 (+ tolerance: the
    matched-L0 band of notebook 03); when none is that sparse, the sparsest. One row per architecture,
    with every score of that setting."""
    settings = per_setting(results)
    chosen = []
    for _, group in settings.groupby("architecture", sort=False):
        sparse = group[group.l0 <= target_l0 * (1 + tolerance)]
        chosen.append(sparse.fvu.idxmin() if len(sparse) else group.l0.idxmin())
    return settings.loc[chosen].reset_index(drop=True)


def chance_scores(features: torch.Tensor, d_sae: int, seeds: tuple[int, ...] = (0,)) -> dict[str, float]:
    """Recovery scores of d_sae random unit directions (as many as the dictionary has: more candidates give
    every true feature a closer best match), averaged over `seeds`."""
    scores = [recovery_scores(features, random_directions(d_sae, features.shape[1], 10_000 + int(seed)))
              for seed in seeds]
    return {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}


def report(results: pd.DataFrame, features: torch.Tensor, target_l0: float) -> pd.DataFrame:
    """Notebook 05's table, one row per architecture: the user's choice (`user_choice`) and its scores
    (mmcs and recovered: mean and sd over seeds; held-out l0 and fvu), the oracle's best setting and MMCS
    beside it (`oracle_*`), and chance at the chosen dictionary size (`chance_mmcs`, `chance_recovered`)."""
    chosen, oracle = user_choice(results, target_l0), best_per_architecture(results).set_index("architecture")
    seeds = tuple(int(s) for s in sorted(results["seed"].unique())) if "seed" in results else (0,)
    rows = []
    for _, row in chosen.iterrows():
        chance = chance_scores(features, int(row.d_sae), seeds)
        best = oracle.loc[row.architecture]
        rows.append({"architecture": row.architecture, "d_sae": int(row.d_sae), "knob": row.knob,
                     "knob_value": row.knob_value, "l0": row.l0, "fvu": row.fvu, "mmcs": row.mmcs,
                     "mmcs_sd": row.mmcs_sd, "recovered": row.recovered, "recovered_sd": row.recovered_sd,
                     "seeds": int(row.seeds), "oracle_d_sae": int(best.d_sae), "oracle_knob_value": best.knob_value,
                     "oracle_mmcs": best.mmcs, "chance_mmcs": chance["mmcs"], "chance_recovered": chance["recovered"]})
    return pd.DataFrame(rows).set_index("architecture")


def readme_line(report_table: pd.DataFrame) -> str:
    """`report`'s table in the words the README quotes (notebook 05 records it with `workbook.record`): each
    architecture's chosen MMCS (share recovered; the oracle's best MMCS), then chance at the dictionary's size."""
    parts = [f"{name} {r.mmcs:.3f} ({r.recovered:.0%}; oracle {r.oracle_mmcs:.3f})"
             for name, r in report_table.iterrows()]
    first = report_table.iloc[0]
    return (", ".join(parts) + f". Chance, {int(first.d_sae)} random directions: {first.chance_mmcs:.3f} "
            f"({first.chance_recovered:.0%})")
