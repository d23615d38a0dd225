"""Are SAE features more interpretable than other directions? Two scores no LM judge is needed for.

1-sparse probing (after Gurnee et al. 2023, "Finding Neurons in a Haystack"): for each concept of
`saelab.studies.concepts` and each method, the ONE direction whose activation best separates the concept's
tokens from the rest on the training store is picked, by d' = (mu_1 - mu_0) / sqrt(var_1 + var_0)
from streamed sums (so every direction is scored in one pass, O(concepts x directions) memory); its
ROC AUC is then measured on the held-out "mae" store, where it was not chosen. 0.5 = chance, 1 = a
perfect detector.

Token concentration: each direction's top-k held-out examples (activation > 0), streamed as in
notebook 04's `max_activating`; the entropy of their token ids in bits (0 = always the same token,
log2 k = k different tokens), over each method's top-N directions by activity (total positive activation).

Memory is bounded by the chunk, the concepts and the directions, never tokens x directions: per
method, (concepts, directions) sums, (k, directions) running top-k, and the chosen directions' held-out
activations (held-out tokens, concepts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars: a saved notebook keeps their last line (tqdm.auto widgets stay at "0%")

from saelab.store import ActivationStore
from saelab.studies.concepts import concept_table

PROBING_COLUMNS = ["method", "concept", "direction", "label", "train_separation", "auc"]
CONCENTRATION_COLUMNS = ["method", "rank", "direction", "label", "activity", "entropy", "token_ids"]


@dataclass
class Comparison:
    probing: pd.DataFrame  # one row per (method, scored concept): PROBING_COLUMNS
    concentration: pd.DataFrame  # one row per (method, scored direction), most active first: CONCENTRATION_COLUMNS
    concepts: pd.DataFrame  # concepts.concept_table: positives per split, `skipped` = why a concept was not scored
    methods: pd.DataFrame  # method -> kind ("baseline" | "SAE"), directions, note


def _chunks(store: ActivationStore, labels: torch.Tensor, device, chunk_rows: int, desc: str, progress: bool):
    """(x (rows, d_in) float32 on device, y (rows, C) float32 on device, first row) over the store."""
    if len(labels) != store.n_rows:
        raise ValueError(f"{len(labels)} label rows for a store of {store.n_rows} rows; build them from this store")
    first = 0
    for shard in tqdm(store.iter_shards(), total=len(store.shard_paths()), desc=desc, disable=not progress):
        for start in range(0, shard["activations"].shape[0], chunk_rows):
            x = shard["activations"][start:start + chunk_rows].to(device, torch.float32)
            yield x, labels[first:first + len(x)].to(device, torch.float32), first
            first += len(x)


def separation(s1, q1, n1, s, q, n) -> torch.Tensor:
    """d' per (concept, direction) from sums over positives (s1, q1: (C, D); n1: (C,)) and all rows
    (s, q: (D,); n): (mu_1 - mu_0) / sqrt(var_1 + var_0), 0 where both variances are 0."""
    n1 = n1[:, None].clamp(min=1)
    n0 = (n - n1).clamp(min=1)
    mu1, mu0 = s1 / n1, (s - s1) / n0
    var = (q1 / n1 - mu1**2).clamp(min=0) + ((q - q1) / n0 - mu0**2).clamp(min=0)
    return torch.where(var > 0, (mu1 - mu0) / var.sqrt().clamp(min=1e-30), torch.zeros_like(var))


@torch.no_grad()
def train_separation(methods, store: ActivationStore, labels: torch.Tensor, device="cpu", chunk_rows: int = 4096,
                     progress: bool = True) -> dict[str, torch.Tensor]:
    """One pass over the training store: method name -> (C, D) d' of every direction for every concept."""
    acc = torch.float32 if torch.device(device).type == "mps" else torch.float64
    sums = {m.name: [torch.zeros(labels.shape[1], m.n, dtype=acc, device=device) for _ in range(2)]
            + [torch.zeros(m.n, dtype=acc, device=device) for _ in range(2)] for m in methods}
    for x, y, _ in _chunks(store, labels, device, chunk_rows, "probe: train", progress):
        for m in methods:
            a = m.encode(x)  # (rows, D)
            a2 = a.square()
            s1, q1, s, q = sums[m.name]
            s1 += (y.T @ a).to(acc)  # (C, D) sums over each concept's positives
            q1 += (y.T @ a2).to(acc)
            s += a.sum(0).to(acc)
            q += a2.sum(0).to(acc)
    n1 = labels.sum(0).to(device, acc)
    return {name: separation(s1, q1, n1, s, q, store.n_rows).cpu() for name, (s1, q1, s, q) in sums.items()}


class _HeldOut:
    """Per method: the chosen directions' activations, a running top-k of positive activations, activity."""

    def __init__(self, method, chosen: torch.Tensor, k: int, device):
        self.method, self.chosen, self.k, self.values = method, chosen.to(device), k, []
        self.top = torch.zeros(k, method.n, device=device)  # (k, D) descending; 0 = no example
        self.rows = torch.full((k, method.n), -1, dtype=torch.int64, device=device)
        self.activity = torch.zeros(method.n, dtype=torch.float64 if self.top.device.type != "mps" else torch.float32,
                                    device=device)

    def update(self, x: torch.Tensor, first: int) -> None:
        a = self.method.encode(x)  # (rows, D)
        self.values.append(a[:, self.chosen].cpu())  # (rows, C)
        positive = a.clamp(min=0)  # an example is a token where the direction is active
        self.activity += positive.sum(0).to(self.activity.dtype)
        chunk = positive.topk(min(self.k, len(a)), dim=0)  # (<=k, D)
        merged = torch.cat([self.top, chunk.values]).topk(self.k, dim=0)
        self.rows = torch.cat([self.rows, chunk.indices + first]).gather(0, merged.indices)
        self.top = merged.values


def token_entropy(token_ids) -> float:
    """Entropy in bits of the empirical distribution of token ids: 0 = one token, log2 k = k distinct."""
    _, counts = np.unique(np.asarray(token_ids), return_counts=True)
    p = counts / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


def roc_auc(values: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `values` as a score for boolean `labels` (ties count 1/2): scikit-learn's."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy(), values.double().numpy()))


@torch.no_grad()
def compare(methods, stores: dict[str, ActivationStore], labels: dict[str, torch.Tensor], profile, device="cpu",
            progress: bool = True) -> Comparison:
    """Both scores for every method: directions chosen on stores["train"], scored on stores["mae"].
    labels: split -> (rows, C) bool, from `concepts.store_labels`."""
    train, held_out = stores["train"], stores["mae"]
    if (train.hook, train.d_in) != (held_out.hook, held_out.d_in):
        raise ValueError(f"the train store holds {train.hook} (d_in={train.d_in}) but the mae store holds "
                         f"{held_out.hook} (d_in={held_out.d_in}); capture both splits at one hook (notebook 02)")
    table = concept_table(labels)
    chunk = profile.interp_chunk_rows
    methods = [m.to(device) for m in methods]
    scores = train_separation(methods, stores["train"], labels["train"], device, chunk, progress)
    chosen = {name: d.argmax(dim=1) for name, d in scores.items()}  # (C,) best direction per concept
    held = {m.name: _HeldOut(m, chosen[m.name], profile.interp_top_examples, device) for m in methods}
    for x, _, first in _chunks(stores["mae"], labels["mae"], device, chunk, "held-out", progress):
        for state in held.values():
            state.update(x, first)
    token_ids = stores["mae"].index()["token_id"]
    usable = [c for c, reason in enumerate(table["skipped"]) if not reason]
    probing, concentration = [], []
    for m in methods:
        values = torch.cat(held[m.name].values)  # (held-out rows, C)
        for c in usable:
            j = int(chosen[m.name][c])
            probing.append({"method": m.name, "concept": table.index[c], "direction": j, "label": m.label(j),
                            "train_separation": float(scores[m.name][c, j]),
                            "auc": roc_auc(values[:, c], labels["mae"][:, c])})
        concentration += _concentration_rows(m, held[m.name], token_ids, profile.interp_top_directions)
    overview = pd.DataFrame({"kind": ["SAE" if hasattr(m, "sae") else "baseline" for m in methods],
                             "directions": [m.n for m in methods], "note": [m.note for m in methods]},
                            index=pd.Index([m.name for m in methods], name="method"))
    return Comparison(pd.DataFrame(probing, columns=PROBING_COLUMNS),
                      pd.DataFrame(concentration, columns=CONCENTRATION_COLUMNS), table, overview)


def _concentration_rows(method, state: _HeldOut, token_ids: torch.Tensor, top_n: int) -> list[dict]:
    """The top_n most active directions among those with k examples: their token entropy."""
    full = (state.top > 0).all(dim=0).cpu()  # (D,) directions with k active examples
    activity = torch.where(full, state.activity.cpu().double(), -math.inf)
    order = activity.argsort(descending=True, stable=True)[:min(top_n, int(full.sum()))]
    rows = state.rows.cpu()
    return [{"method": method.name, "rank": rank, "direction": j, "label": method.label(j),
             "activity": float(activity[j]), "entropy": token_entropy(token_ids[rows[:, j]]),
             "token_ids": token_ids[rows[:, j]].tolist()} for rank, j in enumerate(order.tolist())]


def bootstrap_mean(values, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of the mean (resampling the values with replacement)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    means = values[np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def summarise(comparison: Comparison, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per method: mean held-out AUC over concepts and mean token entropy over its scored
    directions, each with a 95% bootstrap interval (auc_low/high, entropy_low/high)."""
    rows = {}
    for method, kind in comparison.methods["kind"].items():
        auc = comparison.probing.loc[comparison.probing["method"] == method, "auc"]
        ent = comparison.concentration.loc[comparison.concentration["method"] == method, "entropy"]
        a, e = bootstrap_mean(auc, n_boot, seed), bootstrap_mean(ent, n_boot, seed)
        rows[method] = {"kind": kind, "auc": a[0], "auc_low": a[1], "auc_high": a[2], "concepts": len(auc),
                        "entropy": e[0], "entropy_low": e[1], "entropy_high": e[2], "directions": len(ent)}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("method")


def difference(comparison: Comparison, score: str, ours: str, theirs: str, n_boot: int,
               seed: int) -> tuple[float, float, float]:
    """Mean of ours - theirs in `score` ("auc" | "entropy") with a 95% bootstrap interval: paired over
    concepts for AUC (every method probes the same concepts), independent resamples for entropy."""
    if score == "auc":
        per = comparison.probing.pivot(index="concept", columns="method", values="auc")
        return bootstrap_mean(per[ours] - per[theirs], n_boot, seed)
    entropy = comparison.concentration.groupby("method")["entropy"]
    a, b = (entropy.get_group(m).to_numpy() for m in (ours, theirs))
    rng = np.random.default_rng(seed)
    diffs = a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1) - b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(a.mean() - b.mean()), float(low), float(high)


SCORES = {  # score -> (+1 if higher is better, what it is)
    "auc": (1, "1-sparse probing (held-out ROC AUC, mean over concepts)"),
    "entropy": (-1, "token concentration (entropy of the top examples' tokens in bits, lower = more specific)"),
}


def describe(comparison: Comparison, summary: pd.DataFrame, profile, n_boot: int, seed: int,
             reference: str | None = None) -> str:
    """What the numbers show, in words generated from them, whichever way they fall: the reference
    SAE (default: notebook 03's) against every baseline, one line per score, then the verdict."""
    reference = reference or summary.index[summary["kind"] == "SAE"][0]
    lines, won = [], {}
    for score, (better, what) in SCORES.items():
        count = "concepts" if score == "auc" else "directions"
        baselines = [b for b in summary.index[summary["kind"] == "baseline"] if summary.at[b, count] > 0]
        if not baselines or summary.at[reference, count] == 0:
            lines.append(f"{what}: nothing to compare (no concept or direction could be scored)")
            continue
        diffs = {b: difference(comparison, score, reference, b, n_boot, seed) for b in baselines}
        side = {b: better * (1 if low > 0 else -1 if high < 0 else 0) for b, (_, low, high) in diffs.items()}
        best = max(baselines, key=lambda b: better * summary.at[b, score])
        d, low, high = diffs[best]
        word = {1: "better than", -1: "worse than", 0: "not distinguishable from"}[side[best]]
        lines.append(f"{what}: {reference} {_ci(summary, reference, score)}, best baseline {best} "
                     f"{_ci(summary, best, score)}; difference {d:+.3f} (95% CI {low:+.3f} to {high:+.3f}): {word} it. "
                     f"It beats {sum(v == 1 for v in side.values())} of {len(baselines)} baselines (CI excluding 0).")
        won[score] = all(v == 1 for v in side.values())
    if len(won) == len(SCORES) and all(won.values()):
        verdict = f"{reference} beats every baseline on both scores, in line with Cunningham et al.'s claim."
    elif any(won.values()):
        which = " and ".join(SCORES[s][1].split(" (")[0] for s, v in won.items() if v)
        verdict = f"{reference} beats every baseline on {which} only: the paper's claim holds here in part."
    else:
        verdict = (f"On neither score does {reference} beat every baseline: the paper's claim is NOT reproduced "
                   "here.")
    leaders = (f"Highest mean AUC: {summary['auc'].idxmax()}; lowest mean entropy: {summary['entropy'].idxmin()}."
               if summary[["auc", "entropy"]].notna().any().all() else "")
    model = f"{profile.model_name} {profile.hook}" + (", not GPT-2" if profile.is_offline else "")
    return "\n".join(lines + [f"{verdict} {leaders} (profile {profile.name}: {model})"])


def _ci(summary: pd.DataFrame, method: str, score: str) -> str:
    return (f"{summary.at[method, score]:.3f} [{summary.at[method, f'{score}_low']:.3f}, "
            f"{summary.at[method, f'{score}_high']:.3f}]")
