"""Notebook 03's comparison: every architecture trained on the same activations to convergence, at matched
L0, and measured the same way.

    matched = match_l0(profile, train_x)                  # each architecture's sparsity setting for the target L0
    table = compare_architectures(profile, train_x, heldout_x, lm, tokens, matched)   # one row per architecture
    print(describe_architectures(table, profile))         # the table in words

Architectures are compared at one L0 (`profile.target_l0`), as SAEBench and Gao et al. 2024 compare
them: at unequal L0 the sparser one looks worse at reconstruction for that reason alone. TopK and
BatchTopK take it as k; the others (λ of tied and standard, λ0 of jumprelu) get a short search on the
training activations (`search_coefficient`, by validation L0: held-out data is never used to choose),
its result cached in the run folder. The profile's own architecture
is its main run (folder "sae"); each other one is a resumable run in the folder named after it
(paths.sae_dir(profile, "topk"), ...), all other settings equal.
Units: FVU and explained variance as fractions (their usual unit); every other share in percent.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable

import pandas as pd
import torch

from saelab import paths
from saelab.config import TRAINING_FIELDS
from saelab.metrics import ILL_CONDITIONED_GAP, ce_loss_recovered, evaluate_sae, hook_mean
from saelab.sae import REGISTRY, architecture_names
from saelab.train.loop import train_profile

L0_TOLERANCE = 0.15  # matched: every architecture's L0 within ±15% of the target
SEARCH_TOLERANCE = 0.08  # a probe this close ends the search (its run is the comparison's: well inside ±15%)
SEARCH_PROBES = 6  # probes at most per architecture
CONVERGED_CHANGE = 0.02  # converged: L0 and FVU move by less than 2% over the last 20% of steps
SEARCH_FILE = "l0_search.json"  # in paths.run_dir(profile): the search's result, reused by a rerun


def run_name(profile, architecture: str) -> str:
    return "sae" if architecture == profile.sae.architecture else architecture


def sparsity_field(architecture: str) -> str | None:
    """The profile field that sets an architecture's L0: k (architectures with a k), else the
    coefficient its loss takes (l1_coefficient, l0_coefficient); None when it has neither."""
    cls = REGISTRY[architecture]
    return "k" if "k" in cls.options else cls.sparsity_setting


def probe_l0(profile, activations: torch.Tensor, architecture: str, value: float, progress: bool = False) -> float:
    """Validation L0 (the training split's held-out 10%) of `architecture` trained with its sparsity
    coefficient at `value` and every other setting of the profile, in its comparison run folder (a run
    there is replaced): the probe at the chosen value is the comparison's run, not trained twice.
    Probes run the whole schedule: an L1 or L0 penalty keeps sparsifying as training goes on (measured
    offline: a quarter-length run gave L0 31 where the full run ended at 17), so a short probe misleads."""
    p = profile.replace(architecture=architecture, **{sparsity_field(architecture): value})
    history = train_profile(p, activations, run_name(profile, architecture), overwrite=True, progress=progress).history
    return float(history["val_l0"].iloc[-1])


def next_probe(probes: list[tuple[float, float]], target: float, slope: float = -0.7) -> float:
    """The next coefficient to try, from (coefficient, L0) probes, L0 falling as the coefficient grows:
    a power law L0 ~ c^slope through two probes in log-log space—the closest pair on either side of the
    target once the probes bracket it (kept within the middle half of that bracket), else the two nearest
    the target—or `slope` (measured offline for the L1 SAEs: about -0.7) from a single probe; each step
    outside a bracket at most 10x."""
    above = [p for p in probes if p[1] > target]  # too dense: the coefficient must grow
    below = [p for p in probes if p[1] < target]
    if above and below:
        pair = [max(above, key=lambda p: p[0]), min(below, key=lambda p: p[0])]
    else:
        pair = sorted(probes, key=lambda p: abs(math.log(p[1] / target)))[:2]
    (c1, l1), *rest = pair
    if rest and rest[0][0] != c1 and rest[0][1] != l1:
        measured = (math.log(rest[0][1]) - math.log(l1)) / (math.log(rest[0][0]) - math.log(c1))
        slope = measured if measured < -0.05 else slope  # noise can flatten or flip it: keep the guess then
    step = (math.log(target) - math.log(l1)) / slope
    if above and below:  # inside the bracket, away from its ends: a curved L0(c) cannot stall the search
        low, high = math.log(pair[0][0]), math.log(pair[1][0])
        guess = min(max(math.log(c1) + step, low + 0.25 * (high - low)), high - 0.25 * (high - low))
        return math.exp(guess)
    return c1 * math.exp(max(-math.log(10), min(math.log(10), step)))


def search_coefficient(profile, activations: torch.Tensor, architecture: str, target: float,
                       probes: int = SEARCH_PROBES, progress: bool = False,
                       probe: Callable[[float], float] | None = None) -> dict:
    """The sparsity coefficient of `architecture` whose run reaches validation L0 = target within
    SEARCH_TOLERANCE, starting from the profile's value; the run at that value is left in its folder.
    Returns {"field", "value", "l0" (its run's), "probes": [[coefficient, L0], ...]}; when no probe gets
    that close, the closest one (trained again, so that its run is the one in the folder), with a warning.
    `probe(value) -> L0` replaces `probe_l0` (e.g. runs kept in memory rather than in the run folder)."""
    field = sparsity_field(architecture)
    probe = probe or (lambda value: probe_l0(profile, activations, architecture, value, progress))
    value, tried = float(getattr(profile, field)), []
    for _ in range(probes):
        tried.append((value, probe(value)))
        if progress:
            print(f"  {architecture} {field}={value:.4g}: L0 {tried[-1][1]:.1f}", flush=True)
        if abs(tried[-1][1] / target - 1) <= SEARCH_TOLERANCE:
            break
        value = next_probe(tried, target)
    best = min(tried, key=lambda p: abs(math.log(p[1] / target)))
    if best != tried[-1]:
        probe(best[0])
    if abs(best[1] / target - 1) > SEARCH_TOLERANCE:
        warnings.warn(f"{architecture}: no {field} within {SEARCH_TOLERANCE:.0%} of L0 {target} after {len(tried)} "
                      f"probes; using {best[0]:.4g} (L0 {best[1]:.1f}). Widen the search (probes=) or set {field} "
                      "nearer in the profile.", stacklevel=2)
    return {"field": field, "value": best[0], "l0": best[1], "probes": [list(p) for p in tried]}


def search_settings(profile, activations: torch.Tensor, architecture: str) -> dict:
    """What a cached search result must match to be reused: target, training settings, data."""
    return {"target_l0": profile.target_l0, "architecture": architecture, "d_sae": profile.d_sae,
            "start": getattr(profile, sparsity_field(architecture)),
            **{f: getattr(profile, f) for f in TRAINING_FIELDS if f not in ("l1_coefficient", "l0_coefficient")},
            **{f: getattr(profile.sae, f) for f in REGISTRY[architecture].options},
            "rows": activations.shape[0],
            "checksum": activations[:: max(1, activations.shape[0] // 1024)].double().sum().item()}


def match_l0(profile, activations: torch.Tensor, architectures: tuple[str, ...] | None = None,
             progress: bool = True) -> dict[str, dict]:
    """{architecture: profile overrides} that put each architecture (default: all registered) at
    profile.target_l0: {"k": round(target)} for those with a k, a searched λ or λ0 for the others.
    target_l0 = 0: no overrides (each keeps the profile's setting). Searches are cached in
    paths.run_dir(profile)/l0_search.json with the settings and data they were made with; a rerun with
    the same ones reads them instead of training again."""
    architectures = architectures or architecture_names()
    if not profile.target_l0:
        return {a: {} for a in architectures}
    path = paths.run_dir(profile) / SEARCH_FILE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    out = {}
    for architecture in architectures:
        field = sparsity_field(architecture)
        if field == "k":
            out[architecture] = {"k": max(1, round(profile.target_l0))}
            continue
        settings = search_settings(profile, activations, architecture)
        if cache.get(architecture, {}).get("settings") != settings:
            if progress:
                print(f"searching {field} of {architecture} for L0 {profile.target_l0:g} ...", flush=True)
            cache[architecture] = {"settings": settings, **search_coefficient(
                profile, activations, architecture, profile.target_l0, progress=progress)}
            path.parent.mkdir(parents=True, exist_ok=True)
            paths.write_json_atomically(path, cache)
        out[architecture] = {field: cache[architecture]["value"]}
    return out


def search_table(profile) -> pd.DataFrame:
    """The cached search as a table: one row per probe (architecture, field, value, l0, chosen)."""
    path = paths.run_dir(profile) / SEARCH_FILE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    return pd.DataFrame([{"architecture": a, "field": r["field"], "value": v, "probe_l0": l0,
                          "chosen": v == r["value"]} for a, r in cache.items() for v, l0 in r["probes"]])


def matched_profile(profile, matched: dict[str, dict], architecture: str | None = None):
    """The profile for one architecture (default: the profile's own) with its matched sparsity setting."""
    architecture = architecture or profile.sae.architecture
    return profile.replace(architecture=architecture, **matched.get(architecture, {}))


def convergence(history: pd.DataFrame, last: float = 0.2) -> dict[str, float | bool]:
    """How much validation L0 and FVU moved over the last `last` of the steps: relative change (%) from the
    last epoch at or before (1 - last) of the steps to the final epoch; converged when both are below
    CONVERGED_CHANGE. With one epoch there is nothing to compare: NaN, not converged."""
    steps = history["step"].to_numpy()
    before = history[steps <= (1 - last) * steps[-1]]
    if before.empty:
        return {"l0_change_pct": float("nan"), "fvu_change_pct": float("nan"), "converged": False}
    start, end = before.iloc[-1], history.iloc[-1]
    change = {f"{m}_change_pct": 100 * abs(end[f"val_{m}"] / start[f"val_{m}"] - 1) for m in ("l0", "fvu")}
    return {**change, "converged": bool(max(change.values()) < 100 * CONVERGED_CHANGE)}


def quality(sae, eval_activations: torch.Tensor, lm, tokens: torch.Tensor, profile,
            mean: torch.Tensor | None = None) -> dict[str, float]:
    """One SAE on held-out activations and tokens: L0, FVU, explained variance (1 - FVU), CE loss recovered
    (%) against the zero- and the mean-ablation floor, ΔCE and KL to the clean predictions (nats per token),
    the zero-ablation gap (nats), dead and dense (firing on > 10% of tokens) latents (%)."""
    m = evaluate_sae(sae, eval_activations)
    ce = ce_loss_recovered(lm, sae, tokens, profile.hook, skip_first_position=profile.exclude_first_position,
                           mean=mean)
    return {"l0": m["l0"], "fvu": m["fvu"], "explained_variance": 1 - m["fvu"],
            "ce_loss_recovered_pct": 100 * ce["ce_loss_recovered"],
            "ce_loss_recovered_mean_pct": 100 * ce["ce_loss_recovered_mean"], "delta_ce": ce["delta_ce"],
            "kl_sae": ce["kl_sae"], "ablation_gap": ce["ce_zero"] - ce["ce_clean"],
            "mean_ablation_gap": ce["ce_mean"] - ce["ce_clean"], "dead_pct": 100 * m["dead_fraction"],
            "dense_pct": 100 * m["dense_fraction"]}


def compare_architectures(profile, train_activations: torch.Tensor, eval_activations: torch.Tensor, lm,
                          tokens: torch.Tensor, matched: dict[str, dict] | None = None,
                          architectures: tuple[str, ...] | None = None, progress: bool = True,
                          store=None) -> pd.DataFrame:
    """Train (or reuse) one SAE per architecture (default: all registered) with its `matched` setting
    (from `match_l0`; None = the profile's), measure each with `quality`, and say whether it converged
    (`convergence` of its history) and how far its L0 is from the target (l0_off_target_pct). `store`: the
    ActivationStore train_activations came from, recorded in each SAE (train_profile)."""
    mean = hook_mean(lm, tokens, profile.hook, skip_first_position=profile.exclude_first_position)
    rows = []
    for architecture in architectures or architecture_names():
        name = run_name(profile, architecture)
        result = train_profile(matched_profile(profile, matched or {}, architecture), train_activations, name,
                               progress=progress, store=store)
        field = sparsity_field(architecture)
        rows.append({"architecture": architecture, "run": name, "setting": field,
                     "value": (matched or {}).get(architecture, {}).get(field, getattr(profile, field)),
                     **quality(result.sae, eval_activations, lm, tokens, profile, mean),
                     **convergence(result.history)})
    table = pd.DataFrame(rows).set_index("architecture")
    if profile.target_l0:
        table.insert(table.columns.get_loc("l0") + 1, "l0_off_target_pct", 100 * (table.l0 / profile.target_l0 - 1))
    return table


def describe_architectures(table: pd.DataFrame, profile) -> str:
    """The comparison in plain words, from the numbers in `table` (one line per architecture)."""
    d_sae = profile.d_sae
    lines = [f"{name}: L0 {row.l0:.1f} of {d_sae} latents per token ({row.l0 / d_sae:.1%}), FVU {row.fvu:.3f}, "
             f"CE loss recovered {row.ce_loss_recovered_pct:.1f}% (zero-ablation floor; "
             f"{row.ce_loss_recovered_mean_pct:.1f}% against the mean-ablation floor), ΔCE {row.delta_ce:.3f} nats, "
             f"dead {row.dead_pct:.1f}%, dense {row.dense_pct:.1f}%"
             for name, row in table.iterrows()]
    if "l0_off_target_pct" in table:
        off = table.l0_off_target_pct.abs()
        lines.append(f"Matched L0: every architecture within {off.max():.1f}% of the target {profile.target_l0:g} "
                     f"(allowed: ±{L0_TOLERANCE:.0%})." if off.max() <= 100 * L0_TOLERANCE else
                     f"NOT matched: {', '.join(off[off > 100 * L0_TOLERANCE].index)} more than "
                     f"±{L0_TOLERANCE:.0%} from the target L0 {profile.target_l0:g}; their FVU is not comparable.")
        best = table.fvu.idxmin()
        lines.append(f"At matched L0, {best} reconstructs best (FVU {table.fvu[best]:.3f}).")
    if "converged" in table:
        late = table.index[~table.converged.astype(bool)].tolist()
        lines.append("Converged: L0 and FVU moved by less than 2% over the last 20% of steps for every architecture."
                     if not late else f"NOT converged (L0 or FVU still moved by 2% or more over the last 20% of "
                     f"steps): {', '.join(late)}; train longer (epochs) before reading the comparison.")
    if (table["ablation_gap"] < ILL_CONDITIONED_GAP).any():
        lines.append(f"Zeroing the residual stream raises CE by only {table['ablation_gap'].min():.3f} nats here, "
                     "so CE loss recovered is ill-conditioned (it can exceed 100%); compare FVU and KL instead.")
    if profile.is_offline:
        lines.append("OFFLINE PROFILE: not GPT-2; these numbers describe the offline model's activations.")
    return "\n".join(lines)


def readme_rows(table: pd.DataFrame) -> dict[str, str]:
    """Each architecture's row of `compare_architectures` as the README's table quotes it (markdown), keyed by
    architecture: notebook 03 records them (`workbook.record`), so `make workbook` says when the README is stale."""
    knob = {"l1_coefficient": "λ {:.3f}", "l0_coefficient": "λ0 {:.3f}", "k": "k {:.0f}"}
    return {row.architecture: f"| {row.architecture} | {knob[row.setting].format(row.value)} | {row.l0:.1f} | "
            f"{row.fvu:.3f} | {row.ce_loss_recovered_pct:.1f}% / {row.ce_loss_recovered_mean_pct:.1f}% | "
            f"{row.delta_ce:.3f} | {row.dead_pct:.1f}% | {row.dense_pct:.1f}% |"
            for row in (table if "architecture" in table.columns else table.reset_index()).itertuples()}
