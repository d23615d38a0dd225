"""Are SAE features more interpretable than other directions? Two scores that need no LM judge.

**k-sparse probing**, as SAEBench's sparse_probing (Karvonen et al. 2025; after Gurnee et al. 2023): for
each concept of `saelab.studies.concepts` and each method, the k directions with the largest absolute
difference between the concept's mean activation and the rest's, on training documents, feed a
logistic-regression probe (SAEBench's `train_sklearn_probe`: L2, C = 1, no scaling), trained on a
class-balanced sample of training rows; its decision value is scored on held-out documents by ROC AUC
(and accuracy, SAEBench's number). A dense probe on the whole residual stream is the ceiling.
Differences from SAEBench, on purpose: concepts are per token, not per mean-pooled text; the mean
difference is taken over every training row (streamed), not the balanced sample; AUC is the headline
(concepts are rare, so accuracy at a 0.5 threshold says little); the probe's objective is scikit-learn's
but solved for all concepts at once by Newton steps (`logistic_regression`: thousands of probes in
seconds; tests/test_interpret.py checks both against a written-out copy of SAEBench's functions).

**Simulation scoring**, as Bills et al. 2023 without an LM: for `interp_top_directions` directions drawn
at random among each method's live ones (|activation| > 0 on at least `interp_top_examples` training
rows), the explanation is a token -> mean activation table built on training documents; it "simulates"
the activation of held-out tokens, and the score is the correlation between simulated and true
activations on the direction's top held-out examples (by |activation|) plus as many random held-out
rows. The token entropy of the top examples (0 bits = one token) is kept beside it.

Held-out split: the train and mae stores are pooled and split by document (a store row's context;
`split_documents`), a seeded `interp_held_out_share` of them held out. Intervals resample held-out
documents (in `interp_document_groups` seeded groups): `placement_sums` splits each AUC into per-group
sums of its positives' and negatives' placements, so a resampled AUC (to first order, as DeLong's
variance) costs a matrix product.

Memory is bounded by the chunk, the concepts and the chosen directions: per method, (concepts,
directions) sums, then the chosen directions' activations on probe and held-out rows only, float32 on
the CPU: offline ~17k rows x <= 512 directions (~35 MB per SAE); gpt2 (a fifth of 20,000 documents held
out) ~0.8M rows x <= 20 per concept (up to ~1,400 distinct, ~4 GB per SAE at worst): lower
interp_held_out_share there if host memory is short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars: a saved notebook keeps their last line (tqdm.auto widgets stay at "0%")

from saelab.devices import accumulator_dtype
from saelab.store import ActivationStore

PROBING_COLUMNS = ["method", "kind", "concept", "stratum", "k", "auc", "accuracy", "directions", "sae_l0"]
SIMULATION_COLUMNS = ["method", "kind", "direction", "label", "score", "entropy", "token_ids"]
DENSE = "dense probe"  # the ceiling: a probe on the whole residual stream


@dataclass
class Split:
    """Pooled rows of the stores (in store order, rows in order): which are held out, and their document group."""

    held_out: torch.Tensor  # (rows,) bool
    group: torch.Tensor  # (rows,) int64: a held-out row's document group, -1 on training rows
    n_documents: int
    n_held_out_documents: int
    n_groups: int


def split_documents(stores: dict[str, ActivationStore], share: float, seed: int, groups: int = 100) -> Split:
    """Hold out a seeded `share` of the documents (each store's contexts, numbered across stores) and
    put the held-out ones in min(groups, documents) seeded groups of near-equal size."""
    docs, offset = [], 0
    for store in stores.values():
        context = store.index()["context"]
        docs.append(context + offset)
        offset += int(context.max()) + 1 if len(context) else 0
    doc = torch.cat(docs)
    present = torch.unique(doc)
    order = present[torch.randperm(len(present), generator=torch.Generator().manual_seed(seed))]
    n_held = round(share * len(present))
    if not 0 < n_held < len(present):
        raise ValueError(f"holding out {share:.0%} of {len(present)} documents leaves one side empty; "
                         "use more documents (n_texts, mae_texts) or another interp_held_out_share")
    n_groups = min(groups, n_held)
    group_of = torch.full((offset,), -1, dtype=torch.int64)
    group_of[order[:n_held]] = torch.arange(n_held) % n_groups
    group = group_of[doc]
    return Split(group >= 0, group, len(present), n_held, n_groups)


def _pooled_chunks(stores: dict[str, ActivationStore], chunk_rows: int, device, desc: str, progress: bool):
    """(first pooled row, x (rows, d_in) float32 on device, token ids (rows,)) over every store in turn."""
    first = 0
    for name, store in stores.items():
        for chunk in store.chunks(chunk_rows, device, progress=progress, desc=f"{desc}: {name}"):
            yield first + chunk.first_row, chunk.activations, chunk.index["token_id"]
        first += store.n_rows


def top_k_by_mean_difference(acts: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """SAEBench's selection rule (`get_top_k_mean_diff_mask`), as indices: the k directions of acts
    (rows, D) with the largest |mean over positives - mean over negatives| for bool labels (rows,), largest first."""
    diff = (acts[labels].mean(0) - acts[~labels].mean(0)).abs()
    return torch.argsort(diff, descending=True, stable=True)[:k]


@torch.no_grad()
def select_directions(methods, stores, labels: torch.Tensor, split: Split, k: int, live_rows: int, device="cpu",
                      chunk_rows: int = 4096, progress: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the training rows: method -> ((C, k) the top-k directions per concept by absolute mean
    difference, largest first; (D,) bool live: |activation| > 0 on at least `live_rows` training rows).
    labels: (pooled rows, C) bool."""
    acc = accumulator_dtype(device)
    train = ~split.held_out
    sums = {m.name: (torch.zeros(labels.shape[1], m.n, dtype=acc, device=device),
                     torch.zeros(m.n, dtype=acc, device=device), torch.zeros(m.n, dtype=acc, device=device))
            for m in methods}
    for first, x, _ in _pooled_chunks(stores, chunk_rows, device, "probe: select", progress):
        keep = train[first:first + len(x)].to(device)
        if not keep.any():
            continue
        x, y = x[keep], labels[first:first + len(keep)][keep.cpu()].to(device, torch.float32)
        for m in methods:
            a = m.encode(x)  # (rows, D)
            s1, s, active = sums[m.name]
            s1 += (y.T @ a).to(acc)  # (C, D) sums over each concept's positives
            s += a.sum(0).to(acc)
            active += (a != 0).sum(0).to(acc)
    y_train = labels[train]
    n1, n = y_train.sum(0).to(device, acc)[:, None], float(len(y_train))
    out = {}
    for name, (s1, s, active) in sums.items():
        diff = (s1 / n1.clamp(min=1) - (s - s1) / (n - n1).clamp(min=1)).abs()  # (C, D)
        out[name] = (torch.argsort(diff, dim=1, descending=True, stable=True)[:, :k].cpu(), (active >= live_rows).cpu())
    return out


def balanced_sample(labels: torch.Tensor, rows: torch.Tensor, per_class: int, seed: int) -> list[torch.Tensor]:
    """Per concept, the pooled row ids of a seeded class-balanced probe training set drawn from `rows`:
    min(per_class, positives, negatives) of each class (SAEBench balances its probe data)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for c in range(labels.shape[1]):
        y = labels[rows, c]
        pos, neg = rows[y], rows[~y]
        n = min(per_class, len(pos), len(neg))
        out.append(torch.cat([pos[torch.randperm(len(pos), generator=generator)[:n]],
                              neg[torch.randperm(len(neg), generator=generator)[:n]]]).sort().values)
    return out


def logistic_regression(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, c: float = 1.0,
                        max_iter: int = 100, tol: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """P logistic-regression probes at once, by damped Newton steps: for each p, minimise
    c * sum_i weight_i * log(1 + exp(-(2 y_i - 1)(x_i . w + b))) + ||w||^2 / 2 (the intercept b unpenalised),
    the objective of SAEBench's probe (scikit-learn's LogisticRegression, L2, C = c), solved to convergence
    rather than stopped by an iteration cap: until every probe's Newton decrement g.H^-1.g / 2 is below
    tol x (1 + |objective|). x (P, n, k), y (P, n) bool, weight (P, n) (0 = padding).
    Returns coef (P, k) and intercept (P,), float64."""
    x = torch.cat([x.double(), torch.ones(*x.shape[:2], 1, dtype=torch.float64)], dim=2)  # (P, n, k + 1)
    y, weight = y.double(), weight.double()
    penalty = torch.ones(x.shape[2], dtype=torch.float64)
    penalty[-1] = 0.0  # no penalty on the intercept, as scikit-learn's lbfgs
    theta = torch.zeros(x.shape[0], x.shape[2], dtype=torch.float64)

    def objective(t: torch.Tensor) -> torch.Tensor:  # (P,)
        z = torch.einsum("pnk,pk->pn", x, t)
        return c * (weight * (torch.nn.functional.softplus(z) - y * z)).sum(1) + 0.5 * (penalty * t**2).sum(1)

    current = objective(theta)
    for _ in range(max_iter):
        prob = torch.sigmoid(torch.einsum("pnk,pk->pn", x, theta))
        gradient = c * torch.einsum("pnk,pn->pk", x, weight * (prob - y)) + penalty * theta
        root = (c * weight * prob * (1 - prob)).sqrt()[:, :, None] * x  # (P, n, k + 1)
        hessian = root.transpose(1, 2) @ root + torch.diag(penalty + 1e-9)
        step = torch.linalg.solve(hessian, gradient)
        done = bool(((gradient * step).sum(1) / 2 <= tol * (1 + current.abs())).all())  # this step is the last
        size = torch.ones(len(theta), dtype=torch.float64)
        for _ in range(30):  # halve each probe's step until its objective does not rise
            trial = objective(theta - size[:, None] * step)
            worse = trial > current + 1e-12 * current.abs()
            if not worse.any():
                break
            size = torch.where(worse, size / 2, size)
        theta = theta - size[:, None] * step
        current = objective(theta)
        if done:
            break
    return theta[:, :-1], theta[:, -1]


def placement_sums(scores: torch.Tensor, labels: torch.Tensor, group: torch.Tensor, n_groups: int):
    """The ROC AUC of `scores` for bool `labels` (ties 1/2) and its per-document-group parts, (4, G):
    per group, the positives' placements (share of negatives scored below each, ties 1/2) summed, the
    positives counted, the negatives' placements (share of positives scored above) summed, the negatives
    counted. The AUC is the mean placement of either class (DeLong et al. 1988). One sort: a row's
    placement depends only on its score's rank among the distinct scores."""
    _, rank = torch.unique(scores, return_inverse=True)  # (rows,) dense rank of each score
    y = labels.double()
    n1, n0 = float(y.sum()), float(len(y) - y.sum())
    pos_at = torch.bincount(rank, y)  # (distinct,) positives and negatives at each score
    neg_at = torch.bincount(rank, 1 - y)
    neg_below = (neg_at.cumsum(0) - neg_at + 0.5 * neg_at) / max(n0, 1.0)  # a positive's placement, by score
    pos_above = (n1 - pos_at.cumsum(0) + 0.5 * pos_at) / max(n1, 1.0)  # a negative's placement, by score
    placement = torch.where(labels, neg_below[rank], pos_above[rank])  # (rows,)
    parts = torch.stack([torch.bincount(group, placement * y, n_groups), torch.bincount(group, y, n_groups),
                         torch.bincount(group, placement * (1 - y), n_groups), torch.bincount(group, 1 - y, n_groups)])
    auc = float((placement * y).sum() / n1) if n1 and n0 else math.nan
    return auc, parts


def resample_weights(n_groups: int, n_boot: int, seed: int) -> torch.Tensor:
    """(n_boot, G) how often each document group is drawn in each bootstrap resample (G draws with replacement)."""
    draws = torch.randint(0, n_groups, (n_boot, n_groups), generator=torch.Generator().manual_seed(seed))
    return torch.zeros(n_boot, n_groups, dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws,
                                                                                                     dtype=torch.float64))


def bootstrap_auc(auc: torch.Tensor, parts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., n_boot) the AUC in each document resample (weights (n_boot, G): how often each group is drawn),
    to first order: AUC* = mean* positive placement + mean* negative placement - AUC, the resampled means
    weighted by the draws. This is the Hajek projection of the AUC's U-statistic, the linearisation behind
    DeLong's variance; the second-order term left out is O(1 / rows). auc (...,), parts (..., 4, G) as
    `placement_sums` gives them (stacked for several probes). NaN where a resample lacks a class."""
    sums = parts @ weights.to(parts.dtype).T  # (..., 4, n_boot)
    pos, neg = sums[..., 0, :] / sums[..., 1, :], sums[..., 2, :] / sums[..., 3, :]
    return pos + neg - auc[..., None]


def token_entropy(token_ids) -> float:
    """Entropy in bits of the empirical distribution of token ids: 0 = one token, log2 k = k distinct."""
    _, counts = np.unique(np.asarray(token_ids), return_counts=True)
    p = counts / counts.sum()
    return float(max(0.0, -(p * np.log2(p)).sum()))


def roc_auc(values: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of `values` as a score for boolean `labels` (ties count 1/2): scikit-learn's."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels.numpy(), values.double().numpy()))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two (n,) tensors; 0 when either is constant (it predicts nothing)."""
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    norm = float(a.norm() * b.norm())
    return float((a * b).sum()) / norm if norm > 0 else 0.0


@dataclass
class Evaluation:
    """Everything notebook 06 shows: per-concept probe AUCs, simulation scores, and the resamples behind intervals."""

    probing: pd.DataFrame  # one row per (method, scored concept, k): PROBING_COLUMNS
    simulation: pd.DataFrame  # one row per (method, sampled direction): SIMULATION_COLUMNS
    concepts: pd.DataFrame  # concepts.concept_table over the split: positives per side, `skipped` = why not scored
    methods: pd.DataFrame  # method -> kind ("baseline" | "SAE" | "ceiling"), directions, live, sae_l0, note
    resamples: dict  # (method, k) -> (scored concepts, n_boot) held-out AUC in each document resample
    split: Split


def _kind(method) -> str:
    return "SAE" if hasattr(method, "sae") else "baseline"


@torch.no_grad()
def evaluate(methods, stores: dict[str, ActivationStore], labels: dict[str, torch.Tensor], profile, device="cpu",
             progress: bool = True, concepts: dict | None = None) -> Evaluation:
    """Both scores for every method (see the module docstring). stores: name -> store, pooled in this order
    (notebook 06: "train" and "mae"); labels: name -> (rows, C) bool, from `concepts.store_labels`;
    concepts: name -> (stratum, description) of the C columns (default `concepts.CONCEPTS`)."""
    from saelab.studies.concepts import concept_table

    first = next(iter(stores.values()))
    for name, store in stores.items():
        if (store.hook, store.d_in) != (first.hook, first.d_in):
            raise ValueError(f"the {name} store holds {store.hook} (d_in={store.d_in}) but another holds "
                             f"{first.hook} (d_in={first.d_in}); capture every split at one hook (notebook 02)")
        if len(labels[name]) != store.n_rows:
            raise ValueError(f"{len(labels[name])} label rows for the {name} store of {store.n_rows} rows; "
                             "build them from this store (concepts.store_labels)")
    y_all = torch.cat([labels[name] for name in stores])  # (pooled rows, C)
    split = split_documents(stores, profile.interp_held_out_share, profile.seed, profile.interp_document_groups)
    table = concept_table({"train": y_all[~split.held_out], "held_out": y_all[split.held_out]},
                          profile.interp_min_positives, concepts)
    usable = [c for c, reason in enumerate(table["skipped"]) if not reason]
    if not usable:
        raise ValueError(f"no concept has {profile.interp_min_positives} positives (and a negative) on both sides "
                         f"of the split ({split.n_held_out_documents} of {split.n_documents} documents held out); "
                         "use more documents (n_texts, mae_texts) or a smaller interp_min_positives")
    y = y_all[:, usable]
    methods = [m.to(device) for m in methods]
    chunk, seed, top = profile.interp_chunk_rows, profile.seed, profile.interp_top_examples
    chosen = select_directions(methods, stores, y, split, max(profile.interp_ks), top, device, chunk, progress)
    generator = torch.Generator().manual_seed(seed)
    sampled = {m.name: _sample_live(chosen[m.name][1], profile.interp_top_directions, generator) for m in methods}
    samples = balanced_sample(y, torch.nonzero(~split.held_out).squeeze(1), profile.interp_probe_rows, seed)
    kept = _collect(methods, stores, split, chosen, sampled, samples, device, chunk, progress)
    probing, resamples = _probe(methods, kept, y, split, samples, chosen, table.iloc[usable], profile, progress)
    simulation = _simulate(methods, kept, sampled, split, top, seed)
    overview = pd.DataFrame({
        "kind": [_kind(m) for m in methods] + ["ceiling"], "directions": [m.n for m in methods] + [first.d_in],
        "live": [int(chosen[m.name][1].sum()) for m in methods] + [first.d_in],
        "sae_l0": [kept["l0"].get(m.name, math.nan) for m in methods] + [math.nan],
        "note": [m.note for m in methods] + ["logistic regression on the whole residual stream: the ceiling"]},
        index=pd.Index([m.name for m in methods] + [DENSE], name="method"))
    probing["sae_l0"] = probing["method"].map(overview["sae_l0"])
    return Evaluation(probing, simulation, table, overview, resamples, split)


def _sample_live(live: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n directions drawn at random (seeded) among the live ones, in index order: never "the most active"."""
    ids = torch.nonzero(live).squeeze(1)
    return ids[torch.randperm(len(ids), generator=generator)[:n]].sort().values


def _collect(methods, stores, split: Split, chosen, sampled, samples, device, chunk_rows: int, progress: bool) -> dict:
    """Pass two, over every row: the chosen directions' activations on probe and held-out rows, the residual
    there (dense probe), the sampled directions' token tables on training rows and activations on held-out rows,
    and each SAE's L0 on held-out rows."""
    n_rows = len(split.held_out)
    need = split.held_out.clone()
    need[torch.cat(samples)] = True
    position = torch.full((n_rows,), -1, dtype=torch.int64)
    position[need] = torch.arange(int(need.sum()))
    token_ids = torch.cat([store.index()["token_id"] for store in stores.values()])
    vocab = int(token_ids.max()) + 1 if len(token_ids) else 1
    columns = {m.name: torch.unique(chosen[m.name][0]) for m in methods}
    parts = {m.name: [] for m in methods} | {DENSE: []}
    sums = {m.name: torch.zeros(vocab, len(sampled[m.name]), dtype=torch.float64) for m in methods}
    held = {m.name: [] for m in methods}
    counts = torch.zeros(vocab, dtype=torch.float64)
    active = {m.name: 0.0 for m in methods if _kind(m) == "SAE"}
    for first, x, tok in _pooled_chunks(stores, chunk_rows, device, "probe: collect", progress):
        rows = slice(first, first + len(x))
        nd, hd = need[rows], split.held_out[rows]
        parts[DENSE].append(x[nd.to(x.device)].cpu())
        counts.index_add_(0, tok[~hd], torch.ones(int((~hd).sum()), dtype=torch.float64))
        for m in methods:
            a = m.encode(x)  # (rows, D)
            parts[m.name].append(a[nd.to(a.device)][:, columns[m.name].to(a.device)].cpu())
            s = a[:, sampled[m.name].to(a.device)].cpu()  # (rows, N)
            sums[m.name].index_add_(0, tok[~hd], s[~hd].double())
            held[m.name].append(s[hd])
            if m.name in active:
                active[m.name] += float((a[hd.to(a.device)] > 0).sum())
    n_held = int(split.held_out.sum())
    return {"position": position, "columns": columns, "tokens": token_ids, "counts": counts, "sums": sums,
            "acts": {name: torch.cat(p) for name, p in parts.items()},
            "held": {name: torch.cat(h) for name, h in held.items()},
            "l0": {name: a / max(n_held, 1) for name, a in active.items()}}


def _probe(methods, kept, y: torch.Tensor, split: Split, samples, chosen, table: pd.DataFrame, profile,
           progress: bool = True):
    """Fit every (method, k) probe for all concepts at once, and the dense one; held-out AUC, accuracy and
    the AUC in every document resample."""
    held_ids = torch.nonzero(split.held_out).squeeze(1)
    held_pos, group, y_held = kept["position"][held_ids], split.group[held_ids], y[held_ids]
    weights = resample_weights(split.n_groups, profile.interp_bootstrap, profile.seed)
    n_max = max(len(s) for s in samples)
    pad = torch.zeros(len(samples), n_max, dtype=torch.int64)  # (C, n_max) probe rows, padded with row 0
    mask = torch.zeros(len(samples), n_max, dtype=torch.bool)
    for ci, rows in enumerate(samples):
        pad[ci, :len(rows)], mask[ci, :len(rows)] = kept["position"][rows], True
    y_train = torch.stack([torch.nn.functional.pad(y[rows, ci], (0, n_max - len(rows))) for ci, rows in
                           enumerate(samples)])  # (C, n_max)
    by_size = torch.argsort(torch.tensor([len(s) for s in samples]))
    batches = [by_size[i:i + 8] for i in range(0, len(samples), 8)]  # concepts of similar size: little padding
    names = [m.name for m in methods] + [DENSE]
    kinds = [_kind(m) for m in methods] + ["ceiling"]
    labels = {m.name: m.label for m in methods}
    jobs = [(n, kd, k) for n, kd in zip(names, kinds, strict=True)
            for k in (profile.interp_ks if n != DENSE else (kept["acts"][DENSE].shape[1],))]
    rows, resamples, held_acts = [], {}, {}
    for name, kind, k in tqdm(jobs, desc="probe: fit", disable=not progress):
        acts = kept["acts"][name]  # (probe and held-out rows, columns kept)
        if name not in held_acts:
            held_acts = {name: acts[held_pos]}  # (held rows, columns kept), one method at a time
        if name == DENSE:
            idx = torch.arange(acts.shape[1]).expand(len(samples), -1)
        else:
            picked = chosen[name][0][:, :k]  # (C, <=k)
            idx = torch.searchsorted(kept["columns"][name], picked.contiguous())
        coef = torch.zeros(len(samples), idx.shape[1], dtype=torch.float64)
        intercept = torch.zeros(len(samples), dtype=torch.float64)
        for batch in batches:
            n = int(mask[batch].sum(1).max())
            x = acts[pad[batch, :n, None], idx[batch, None, :]]  # (batch, n, k)
            coef[batch], intercept[batch] = logistic_regression(x, y_train[batch, :n], mask[batch, :n])
        aucs, parts = [], []
        for ci, (concept, stratum) in enumerate(zip(table.index, table["stratum"], strict=True)):
            score = held_acts[name][:, idx[ci]].double() @ coef[ci] + intercept[ci]  # (held rows,) decision value
            auc, part = placement_sums(score, y_held[:, ci], group, split.n_groups)
            aucs.append(auc)
            parts.append(part)
            directions = "all" if name == DENSE else " ".join(labels[name](int(j)) for j in picked[ci])
            rows.append({"method": name, "kind": kind, "concept": concept, "stratum": stratum, "k": k, "auc": auc,
                         "accuracy": float(((score > 0) == y_held[:, ci]).double().mean()), "directions": directions})
        resamples[(name, k)] = bootstrap_auc(torch.tensor(aucs, dtype=torch.float64), torch.stack(parts),
                                             weights).numpy()
    return pd.DataFrame(rows, columns=PROBING_COLUMNS), resamples


def _simulate(methods, kept, sampled, split: Split, top: int, seed: int) -> pd.DataFrame:
    """Per sampled direction: token -> mean activation on training rows predicts the held-out activation on its
    top examples (by |activation|) and as many random held-out rows; score = their correlation."""
    held_tokens = kept["tokens"][split.held_out]
    counts = kept["counts"]
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for m in methods:
        sums, acts = kept["sums"][m.name], kept["held"][m.name]  # (V, N), (held rows, N)
        fallback = sums.sum(0) / counts.sum().clamp(min=1)  # a token never seen in training: the overall mean
        table = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], fallback)
        for j, direction in enumerate(sampled[m.name].tolist()):
            a = acts[:, j]
            magnitude = a.abs()
            order = torch.argsort(magnitude, descending=True, stable=True)[:top]
            order = order[magnitude[order] > 0]
            rest = torch.ones(len(a), dtype=torch.bool)
            rest[order] = False
            others = torch.nonzero(rest).squeeze(1)
            random_rows = others[torch.randperm(len(others), generator=generator)[:top]]
            scored = torch.cat([order, random_rows])
            rows.append({"method": m.name, "kind": _kind(m), "direction": direction, "label": m.label(direction),
                         "score": correlation(table[held_tokens[scored], j], a[scored]),
                         "entropy": token_entropy(held_tokens[order].numpy()) if len(order) else math.nan,
                         "token_ids": held_tokens[order].tolist()})
    return pd.DataFrame(rows, columns=SIMULATION_COLUMNS)


def bootstrap_mean(values, n_boot: int, seed: int, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile bootstrap interval of the mean (resampling the values with replacement)."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return math.nan, math.nan, math.nan
    means = values[np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(low), float(high)


def _interval(resampled: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    low, high = np.nanquantile(resampled, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def summarise(evaluation: Evaluation) -> pd.DataFrame:
    """One row per (method, k): mean held-out AUC over the scored concepts with its 95% interval from
    resampling held-out documents (auc_low, auc_high), mean accuracy, concepts, and an SAE's L0."""
    rows = []
    for (method, k), resampled in evaluation.resamples.items():
        scored = evaluation.probing[(evaluation.probing["method"] == method) & (evaluation.probing["k"] == k)]
        low, high = _interval(np.nanmean(resampled, axis=0))
        rows.append({"method": method, "kind": evaluation.methods.at[method, "kind"], "k": k,
                     "auc": scored["auc"].mean(), "auc_low": low, "auc_high": high,
                     "accuracy": scored["accuracy"].mean(), "concepts": len(scored),
                     "sae_l0": evaluation.methods.at[method, "sae_l0"]})
    return pd.DataFrame(rows)


def differences(evaluation: Evaluation, reference: str, k: int) -> pd.DataFrame:
    """Reference minus each baseline at k: mean AUC difference over concepts, its 95% interval (paired:
    the same document resamples for both), and `best` marking the baseline with the highest mean AUC."""
    ours = evaluation.resamples[(reference, k)]
    rows = []
    for method in evaluation.methods.index[evaluation.methods["kind"] == "baseline"]:
        per = evaluation.probing[evaluation.probing["k"] == k].pivot(index="concept", columns="method", values="auc")
        low, high = _interval(np.nanmean(ours - evaluation.resamples[(method, k)], axis=0))
        rows.append({"k": k, "reference": reference, "baseline": method, "baseline_auc": per[method].mean(),
                     "difference": float((per[reference] - per[method]).mean()), "low": low, "high": high})
    table = pd.DataFrame(rows)
    table["best"] = table["baseline_auc"] == table["baseline_auc"].max()
    return table


def simulation_summary(evaluation: Evaluation, n_boot: int, seed: int) -> pd.DataFrame:
    """One row per method: mean simulation score and mean top-example token entropy over its sampled
    directions, each with a 95% bootstrap interval over those directions."""
    rows = []
    for method, kind in evaluation.methods["kind"].items():
        scored = evaluation.simulation[evaluation.simulation["method"] == method]
        if kind == "ceiling":
            continue
        s, e = bootstrap_mean(scored["score"], n_boot, seed), bootstrap_mean(scored["entropy"].dropna(), n_boot, seed)
        rows.append({"method": method, "kind": kind, "score": s[0], "score_low": s[1], "score_high": s[2],
                     "entropy": e[0], "entropy_low": e[1], "entropy_high": e[2], "directions": len(scored)})
    return pd.DataFrame(rows).set_index("method")


def simulation_difference(evaluation: Evaluation, ours: str, theirs: str, n_boot: int,
                          seed: int) -> tuple[float, float, float]:
    """Mean simulation score of ours - theirs with a 95% interval: independent bootstrap resamples of each
    method's sampled directions (they are different directions, so nothing pairs them)."""
    score = evaluation.simulation.groupby("method")["score"]
    a, b = (score.get_group(m).to_numpy() for m in (ours, theirs))
    rng = np.random.default_rng(seed)
    diffs = a[rng.integers(0, len(a), (n_boot, len(a)))].mean(1) - b[rng.integers(0, len(b), (n_boot, len(b)))].mean(1)
    low, high = np.quantile(diffs, [0.025, 0.975])
    return float(a.mean() - b.mean()), float(low), float(high)


DECISION_RULE = (
    "Decision rule, fixed before any number is read: the reference SAE is MORE interpretable than the baselines "
    "by k-sparse probing at k if the 95% interval of its mean held-out AUC minus the best baseline's (the one "
    "with the highest mean AUC at that k) lies above 0, LESS if it lies below 0, and undecided otherwise; k = 1 "
    "is the headline. Likewise for simulation scoring (mean correlation over the sampled directions). The claim "
    "of Cunningham et al. is reproduced here if both are MORE, and refuted if either is LESS.")


WORDS = {"more": "better than", "less": "worse than", "undecided": "not distinguishable from"}


def decide(low: float, high: float) -> str:
    """'more' when the interval of a difference (ours - theirs) lies above 0, 'less' below, else 'undecided'."""
    return "more" if low > 0 else "less" if high < 0 else "undecided"


def describe(evaluation: Evaluation, profile, reference: str | None = None) -> str:
    """What the numbers show, in words generated from them whichever way they fall, by DECISION_RULE:
    per k the reference SAE (default: the first SAE, notebook 03's) against the best baseline, then
    simulation scoring, then the verdict."""
    methods = evaluation.methods
    reference = reference or methods.index[methods["kind"] == "SAE"][0]
    lines, calls = [], {}
    for k in profile.interp_ks:
        if (reference, k) not in evaluation.resamples:
            lines.append(f"k = {k}: nothing to compare (no concept could be scored)")
            continue
        table = differences(evaluation, reference, k)
        best = table[table["best"]].iloc[0]
        beaten = int((table["low"] > 0).sum())
        call = decide(best["low"], best["high"])
        calls.setdefault("probing", call)
        word = WORDS[call]
        ours = evaluation.probing.query("method == @reference and k == @k")["auc"].mean()
        lines.append(f"k = {k}: {reference} mean AUC {ours:.3f}, best baseline {best['baseline']} "
                     f"{best['baseline_auc']:.3f}; difference {best['difference']:+.3f} (95% CI {best['low']:+.3f} "
                     f"to {best['high']:+.3f}, ±{(best['high'] - best['low']) / 2:.3f}): {word} it; it beats "
                     f"{beaten} of {len(table)} baselines.")
    summary = simulation_summary(evaluation, profile.interp_bootstrap, profile.seed)
    baselines = summary.index[summary["kind"] == "baseline"]
    if len(baselines) and summary.at[reference, "directions"] > 0:
        best = summary.loc[baselines, "score"].idxmax()
        d, low, high = simulation_difference(evaluation, reference, best, profile.interp_bootstrap, profile.seed)
        calls["simulation"] = decide(low, high)
        lines.append(f"simulation: {reference} mean correlation {summary.at[reference, 'score']:.3f}, best baseline "
                     f"{best} {summary.at[best, 'score']:.3f}; difference {d:+.3f} (95% CI {low:+.3f} to {high:+.3f})"
                     f": {WORDS[calls['simulation']]} it.")
    if calls and all(c == "more" for c in calls.values()) and len(calls) == 2:
        verdict = f"{reference} is more interpretable than every baseline on both scores: the claim is reproduced."
    elif any(c == "less" for c in calls.values()):
        which = " and ".join(name for name, c in calls.items() if c == "less")
        verdict = f"{reference} is LESS interpretable than the best baseline by {which}: the claim is refuted here."
    else:
        verdict = (f"{reference} does not beat the best baseline on every score (calls: "
                   f"{', '.join(f'{n} {c}' for n, c in calls.items()) or 'none'}): the claim is NOT reproduced here.")
    model = f"{profile.model_name} {profile.hook}" + (", not GPT-2" if profile.is_offline else "")
    return "\n".join(lines + [f"{verdict} (profile {profile.name}: {model})"])
