"""Max-activating examples (MAE), per-feature statistics and logit attribution (notebook 04).

`max_activating` makes ONE pass over an activation store: each chunk of rows is SAE-encoded on the
device and merged into a running top-k per feature, so memory is O(chunk x d_sae + d_sae x k),
never O(tokens x d_sae). Statistics (total activation, firing count) accumulate in the same pass.

Ties: among equal activations the smaller store row wins. Each activation becomes one int64 key,
(float32 bits << 32) | (2^32 - 1 - row): for values >= 0 the IEEE-754 bit pattern orders like the
value, so keys are unique and `topk` on them is exact and deterministic on any device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from saelab import paths, provenance
from saelab.config import LM_SETTINGS, Profile
from saelab.devices import accumulator_dtype, device_of, module_on
from saelab.sae import CFG_FILENAME, SAE, WEIGHTS_FILENAME
from saelab.store import INDEX_FIELDS, ActivationStore

_LOW = (1 << 32) - 1  # low 32 bits of a key hold (2^32 - 1 - row), so smaller rows rank higher


@dataclass
class MAEResult:
    """Top-k examples and statistics per feature, as store rows."""

    values: torch.Tensor  # (d_sae, k) float32, descending per feature; 0 where fewer than k fired
    rows: torch.Tensor  # (d_sae, k) int64 store rows of those activations; -1 = no example
    stats: pd.DataFrame  # one row per feature, see `feature_stats`
    index: dict[str, torch.Tensor]  # the store's per-row context, position, token_id
    n_tokens: int  # rows scanned (excluded token ids not counted)

    def head(self, k: int) -> MAEResult:
        """The same pass with only each feature's k strongest examples (e.g. the seed's 5 of a pass
        that kept more for the dashboards); statistics and index are shared, not copied."""
        return MAEResult(self.values[:, :k], self.rows[:, :k], self.stats, self.index, self.n_tokens)


def _keys(h: torch.Tensor, first_row: int) -> torch.Tensor:
    """(rows, d_sae) non-negative float32 -> (rows, d_sae) int64 keys ordered by (value, -row)."""
    keys = h.contiguous().view(torch.int32).to(torch.int64)  # a -0.0 or negative gives a key < 0: never kept
    keys <<= 32  # in place: at gpt2 scale a chunk of keys is 200 MB
    keys |= (_LOW - torch.arange(first_row, first_row + h.shape[0], device=h.device))[:, None]
    return keys


def _unkey(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys -> (values, rows); the -1 sentinel and zero activations become (0.0, -1)."""
    valid = (keys >> 32) > 0  # bits > 0 <=> value > 0 for non-negative floats
    values = (keys >> 32).to(torch.int32).view(torch.float32)
    rows = _LOW - (keys & _LOW)
    return torch.where(valid, values, 0.0), torch.where(valid, rows, -1)


def check_matches(sae: SAE, store: ActivationStore, where: str = "the SAE", *, allow_stale: bool = False) -> None:
    """A clear error when an SAE cannot read this store (width, another hook), or was trained on a store of
    other settings (saelab.provenance.check names each; allow_stale=True proceeds with a warning)."""
    if sae.d_in != store.d_in:
        raise ValueError(f"{where} expects d_in={sae.d_in} but the store at {store.directory} has d_in={store.d_in}; "
                         "use the SAE trained on this store's hook (rerun notebook 03)")
    trained_on = sae.metadata.get("hook_name")
    if trained_on and trained_on != store.hook:
        raise ValueError(f"{where} was trained on {trained_on!r} but the store holds {store.hook!r}; "
                         "use the store captured at the SAE's hook, or retrain the SAE (notebook 03)")
    provenance.check(sae, store, where, allow_stale=allow_stale)


def feature_stats(totals: torch.Tensor, counts: torch.Tensor, max_values: torch.Tensor,
                  n_tokens: int) -> pd.DataFrame:
    """Per-feature table from (d_sae,) sums: one row per feature (index "feature"), columns
    total_activation, frequency (fraction of the n_tokens on which it fired, 0..1), n_active,
    max_activation and mean_when_active (NaN for a feature that never fired)."""
    totals, counts, max_values = totals.cpu().double(), counts.cpu(), max_values.cpu().double()  # float64 on the CPU
    frame = pd.DataFrame({
        "total_activation": totals.numpy(),
        "frequency": (counts.double() / max(n_tokens, 1)).numpy(),
        "n_active": counts.numpy(),
        "max_activation": max_values.numpy(),
    })
    frame["mean_when_active"] = frame["total_activation"] / frame["n_active"].where(frame["n_active"] > 0)
    frame.index.name = "feature"
    return frame


class RunningTopK:
    """Per column, the `k` largest int64 keys seen so far, with payload tensors that travel with them: the
    one running top-k of saelab's streaming passes (MAE examples; the dashboards' sample of firings).

    keys: (k, columns) int64, descending per column; -1 = nothing kept yet (callers use keys >= 0).
    payloads: name -> (k, columns, *shape) tensors, the values stored with each key.
    """

    def __init__(self, k: int, columns: int, device: torch.device, **payloads: tuple[tuple[int, ...], float]):
        """payloads: name=(shape, fill), e.g. windows=((9,), nan): a (k, columns, 9) tensor filled with nan."""
        self.keys = torch.full((k, columns), -1, dtype=torch.int64, device=device)
        self.payloads = {name: torch.full((k, columns, *shape), fill, device=device)
                         for name, (shape, fill) in payloads.items()}

    def update(self, keys: torch.Tensor, payload=None) -> None:
        """keys: (rows, columns) int64 candidates. payload: a function of the (<=k, columns) row indices of
        the chunk's best candidates -> {name: (<=k, columns, *shape) tensor}, so a payload is computed for
        those only. Ties between equal keys never arise when keys are unique (a row number in their bits)."""
        best = keys.topk(min(self.keys.shape[0], keys.shape[0]), dim=0)  # (<=k, columns)
        merged = torch.cat([self.keys, best.values]).topk(self.keys.shape[0], dim=0)
        self.keys = merged.values
        if self.payloads:
            extra = payload(best.indices)
            for name, kept in self.payloads.items():
                gather = merged.indices.reshape(*merged.indices.shape, *[1] * (kept.dim() - 2))
                self.payloads[name] = torch.cat([kept, extra[name]]).gather(0, gather.expand_as(kept))


@dataclass
class _Sums:
    """The statistics' running sums, on the device (float64; float32 on MPS, which has no float64)."""

    totals: torch.Tensor  # (d_sae,) summed activation
    counts: torch.Tensor  # (d_sae,) int64 tokens where it fired
    finite: torch.Tensor  # () bool: all inputs finite so far

    @classmethod
    def zeros(cls, d_sae: int, device: torch.device) -> _Sums:
        return cls(torch.zeros(d_sae, dtype=accumulator_dtype(device), device=device),
                   torch.zeros(d_sae, dtype=torch.int64, device=device),
                   torch.ones((), dtype=torch.bool, device=device))


@torch.no_grad()
def max_activating(sae: SAE, store: ActivationStore, k: int = 5, *, device: str | torch.device | None = None,
                   chunk_rows: int = 4096, exclude_token_ids: set[int] | None = None,
                   progress: bool = True) -> MAEResult:
    """One streaming pass over `store`: the top-k store rows of every feature and per-feature statistics.

    sae: encodes each chunk. Its d_in (and hook, when its cfg names one) must match the store's.
    k: examples kept per feature (notebook 04: profile.mae_top_k, the seed's 5); k >= 1.
    device: where chunks are encoded (default: where the SAE lives; an SAE elsewhere is copied there,
        the caller's is not moved). The store is read on the CPU; results come back on the CPU.
    chunk_rows: rows encoded at once; memory is O(chunk_rows x d_sae + d_sae x k).
    exclude_token_ids: rows with these token ids (e.g. a pad id) are skipped entirely: never
        examples, not counted as tokens. Packed token data has no pads: the default excludes nothing.
    progress: a text progress bar over shards.

    Returns an `MAEResult`: values/rows (d_sae, k) sorted by activation (ties: the smaller row
    first; 0.0 / -1 where fewer than k rows fired), `stats` (see `feature_stats`), the store's
    per-row index and the number of tokens scanned. Nothing is written.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r}: the number of examples kept per feature must be an integer >= 1 "
                         "(notebook 04 passes profile.mae_top_k; the seed keeps 5)")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows={chunk_rows!r}: rows encoded at once, an integer >= 1 (default 4096)")
    check_matches(sae, store)
    if store.n_rows == 0:
        raise ValueError(f"the store at {store.directory} holds no rows; rerun notebook 02")
    if store.n_rows >= _LOW:
        raise ValueError(f"{store.n_rows} rows exceed the 2^32 rows a key can number; split the store")
    device = device_of(sae) if device is None else torch.device(device)
    sae = module_on(sae, device)
    top, sums = RunningTopK(k, sae.d_sae, device), _Sums.zeros(sae.d_sae, device)
    excluded = torch.tensor(sorted(exclude_token_ids or []), dtype=torch.int64)
    index, n_tokens = {f: [] for f in INDEX_FIELDS}, 0
    for chunk in store.chunks(chunk_rows, device, progress=progress, desc="MAE"):
        for f in INDEX_FIELDS:
            index[f].append(chunk.index[f])
        keep = ~torch.isin(chunk.index["token_id"], excluded)  # (rows,) on the CPU
        n_tokens += int(keep.sum())
        sums.finite &= torch.isfinite(chunk.activations).all()  # no device sync per chunk
        h = sae.encode(chunk.activations)  # (rows, d_sae)
        if not keep.all():
            h[~keep.to(device)] = 0.0
        sums.totals += h.sum(0)  # float32 within a chunk, accumulated in float64 across chunks
        sums.counts += (h > 0).sum(0, dtype=torch.int32)
        top.update(_keys(h, chunk.first_row))
    if not sums.finite:
        raise ValueError(f"non-finite activations in the store at {store.directory}; "
                         "the capture is corrupt: delete the store and rerun notebook 02")
    values, rows = (t.t().contiguous().cpu() for t in _unkey(top.keys))  # (d_sae, k)
    stats = feature_stats(sums.totals, sums.counts, values[:, 0], n_tokens)
    return MAEResult(values, rows, stats, {f: torch.cat(v) for f, v in index.items()}, n_tokens)


def top_features(stats: pd.DataFrame, by: str = "total_activation", n: int = 20) -> pd.DataFrame:
    """The n rows of `stats` (as `feature_stats`) with the largest `by` column, largest first
    (ties: smaller feature id first); a new DataFrame, `stats` is not changed. Default: the seed's
    ranking, total activation, top 20."""
    if by not in stats.columns:
        raise ValueError(f"unknown column {by!r}; choose one of {list(stats.columns)}")
    return stats.sort_values([by, "feature"], ascending=[False, True], kind="stable").head(n)


SPARSE_BAND = (1e-3, 0.05)  # "sparse": fires on 0.1% to 5% of tokens (dense latents fire on > 10%)


def specific_features(mae: MAEResult, n: int = 12, *, band: tuple[float, float] = SPARSE_BAND,
                      one_per_token: bool = True) -> pd.DataFrame:
    """Features worth showing: sparse and specific, where `top_features` by total activation (the seed's
    ranking) surfaces dense latents that fire on most tokens.

    Rule: a feature qualifies when its firing frequency lies in `band` (default 0.1%-5% of tokens) and it
    fired at least as often as the examples kept per feature (so its purity is over a full set); qualified
    features rank by token purity of their top examples (`token_purity`: share with the most common token),
    then by max activation, then by id. one_per_token: only the best feature for each most common token,
    so the list is not twelve variants of one token. Returns the `mae.stats` rows of at most n features,
    in rank order, with columns top_token_id and token_purity added (fewer rows when few qualify).
    """
    low, high = band
    if not 0 <= low < high <= 1:
        raise ValueError(f"band={band!r}: a (low, high) range of firing frequencies with 0 <= low < high <= 1")
    k = mae.rows.shape[1]
    stats = mae.stats
    qualified = stats.index[(stats["frequency"] >= low) & (stats["frequency"] <= high) & (stats["n_active"] >= k)]
    if len(qualified) == 0:
        return stats.iloc[:0].assign(top_token_id=pd.Series(dtype="int64"), token_purity=pd.Series(dtype=float))
    alignment = text_alignment(mae, qualified.tolist())
    table = stats.loc[qualified].assign(top_token_id=alignment["top_token_id"], token_purity=alignment["token_purity"])
    table = table.sort_values(["token_purity", "max_activation", "feature"], ascending=[False, False, True],
                              kind="stable")
    if one_per_token:
        table = table[~table["top_token_id"].duplicated()]
    return table.head(n)


def load_sae(profile: Profile, device: str | torch.device = "cpu", *, store: ActivationStore | None = None,
             allow_stale: bool = False) -> SAE:
    """The SAE notebook 04 analyses for `profile`, loaded on `device` (default "cpu"): the
    SAELens-format folder `profile.sae_path` when set (cfg.json + sae_weights.safetensors, e.g. a
    public SAE that SAELens downloaded and saved with `save_model`), else notebook 03's SAE in
    `paths.sae_dir(profile)`.

    Refuses, saying what to do, an SAE that does not read this profile's hook (d_in, or cfg.json's
    metadata.hook_name when it names one); `SAE.load` refuses cfg.json settings it cannot apply, so
    features are never silently wrong. A different metadata.model_name only warns: names differ
    by alias (SAELens' "gpt2-small" is TransformerLens' "gpt2"). Given the `store` to analyse, refuses an
    SAE trained on a store of other settings (check_matches; allow_stale=True proceeds with a warning).
    """
    folder = Path(profile.sae_path).expanduser() if profile.sae_path else paths.sae_dir(profile)
    if profile.sae_path and not folder.is_dir():
        raise FileNotFoundError(f"sae_path={profile.sae_path!r} is not a folder: give a SAELens-format SAE folder "
                                f"({CFG_FILENAME} + {WEIGHTS_FILENAME}), e.g. one written by SAELens' save_model")
    if not profile.sae_path and not (folder / CFG_FILENAME).is_file():
        raise FileNotFoundError(f"no SAE at {folder} ({CFG_FILENAME} is missing): run notebook 03_train first, "
                                "or set sae_path in the profile to a SAELens-format SAE folder")
    sae = SAE.load(folder, device=device)  # refuses cfg.json settings it cannot apply (normalize_activations, ...)
    if sae.d_in != profile.d_in:
        raise ValueError(f"{folder} holds an SAE with d_in={sae.d_in}, but profile {profile.name!r} captures "
                         f"{profile.hook!r} with d_in={profile.d_in}; use an SAE trained on that hook")
    hook, model = sae.metadata.get("hook_name"), sae.metadata.get("model_name")
    if hook and hook != profile.hook:
        raise ValueError(f"{folder} holds an SAE for {hook!r}, but profile {profile.name!r} captures {profile.hook!r}; "
                         f"use a profile with hook={hook!r} (and capture its activations in notebook 02)")
    if model and model != profile.model_name:
        warnings.warn(f"{folder} was trained on model {model!r}; profile {profile.name!r} runs "
                      f"{profile.model_name!r}. Fine if these are one model under two names.", stacklevel=2)
    loaded_with = sae.metadata.get("model_from_pretrained_kwargs") or {}
    differ = {k: v for k, v in loaded_with.items() if k in LM_SETTINGS and LM_SETTINGS[k] != v}
    if differ:  # e.g. SAELens' gpt2-small-res-jb: center_writing_weights=True
        warnings.warn(f"{folder} was trained on activations of a model loaded with {differ}, saelab captures them "
                      f"with {({k: LM_SETTINGS[k] for k in differ})} (Hugging Face's residual stream); "
                      "center_writing_weights removes each residual vector's mean over d_model, so expect a "
                      "worse reconstruction here than its authors report", stacklevel=2)
    provenance.note_if_unrecorded(sae, f"the SAE at {folder}")  # SAELens folders still load
    if store is not None:
        check_matches(sae, store, f"the SAE at {folder}", allow_stale=allow_stale)
    return sae


def unembedding(lm) -> torch.Tensor:
    """(d_model, d_vocab) W_U of a TransformerLens model `lm`, as the residual stream sees it, final
    LayerNorm scale included; a detached tensor on lm's device (lm is not changed).

    TransformerLens folds ln_final.w into W_U when loaded with fold_ln=True (normalization
    "LNPre", no `ln_final.w`; it also centres W_U over d_model, which `logit_attribution` makes
    irrelevant by centring the direction); otherwise we multiply it in here. The per-token 1/norm of LayerNorm
    is a positive scalar, so it changes no ranking and is left out; ln_final.b adds the same
    logits whatever the feature, so it is left out too.
    """
    W_U = lm.W_U.detach()
    scale = getattr(getattr(lm, "ln_final", None), "w", None)
    return scale.detach()[:, None] * W_U if isinstance(scale, torch.Tensor) else W_U


def logit_attribution(sae: SAE, unembed: torch.Tensor, feature: int, *, center: bool = True) -> torch.Tensor:
    """(d_vocab,) direct effect on the logits of one unit of the feature: W_dec[f] @ W_U, on
    unembed's device and dtype (nothing is changed in place). unembed: `unembedding(lm)`.

    center: LayerNorm subtracts the mean over d_model first, so the direction's mean component
    never reaches the logits (exact for LN models such as GPT-2); and softmax ignores a shift of
    all logits, so the result is centred over the vocabulary too (as TransformerLens'
    center_unembed would): > 0 promotes a token relative to the average token, < 0 suppresses it.
    """
    direction = sae.decoder_weight[feature].detach().to(unembed.device, unembed.dtype)  # (d_in,)
    if not center:
        return direction @ unembed
    logits = (direction - direction.mean()) @ unembed  # (d_vocab,)
    return logits - logits.mean()


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet (Radford et al. 2019, `bytes_to_unicode`): each byte is one printable
    character in a token's vocabulary string; inverted here, character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTES = _byte_of_char()


def token_text(tokenizer, token_id: int) -> str:
    """A token as a reader can read it: its decoded text, or, for a byte-level token that is only part of
    a UTF-8 character (decode gives U+FFFD), the bytes that do not decode written as <0xE2> (the notation
    of byte-fallback vocabularies), e.g. ' <0xE2><0x80>'."""
    text = tokenizer.decode([int(token_id)])
    if "\ufffd" not in text or not hasattr(tokenizer, "convert_ids_to_tokens"):
        return text
    piece = tokenizer.convert_ids_to_tokens([int(token_id)])[0]
    if not isinstance(piece, str) or any(c not in _BYTES for c in piece):
        return text
    text = bytes(_BYTES[c] for c in piece).decode("utf-8", errors="surrogateescape")  # bad byte b -> U+DC00 + b
    return "".join(f"<0x{ord(c) - 0xDC00:02X}>" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in text)


def top_logit_tokens(logits: torch.Tensor, tokenizer, n: int = 10) -> pd.DataFrame:
    """The n most promoted and n most suppressed tokens of a (d_vocab,) `logits` vector (as
    `logit_attribution`): a DataFrame of 2n rows, promoted first (largest logit first), then
    suppressed (most negative first), equal logits by token id; columns token_id, token
    (`token_text`: partial UTF-8 bytes escaped), logit, effect. The same on every device (a stable
    sort on the CPU, not topk)."""
    n = min(n, len(logits))
    logits = logits.detach().float().cpu()
    up, down = logits.sort(descending=True, stable=True), (-logits).sort(descending=True, stable=True)
    ids = torch.cat([up.indices[:n], down.indices[:n]]).tolist()
    return pd.DataFrame({"token_id": ids, "token": [token_text(tokenizer, i) for i in ids],
                         "logit": torch.cat([up.values[:n], -down.values[:n]]).tolist(),
                         "effect": ["promoted"] * n + ["suppressed"] * n})


# ---------------------------------------------------------------- are the top features about text?
# A feature of a random-weight model fires at one position whatever the token (its residual stream is mostly
# the position embedding); a feature of a model that learned text fires on a token or a kind of token,
# wherever it stands. These two numbers, per feature, over its top examples, tell the two apart.


def _most_common(values: torch.Tensor) -> tuple[int, int]:
    """(value, count) of the most common value of a 1-D tensor; ties: the smallest value."""
    unique, counts = values.unique(return_counts=True)  # sorted ascending
    best = int(counts.argmax())  # first maximum
    return int(unique[best]), int(counts[best])


def token_purity(rows: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """(features,) share of a feature's top examples whose token is its most common token (1 = all the same).

    rows: (features, k) store rows of the examples, -1 = no example; token_ids: (n_rows,) the store's
    per-row token id. NaN for a feature without examples."""
    out = torch.full((rows.shape[0],), float("nan"))
    for f, feature_rows in enumerate(rows):
        tokens = token_ids[feature_rows[feature_rows >= 0]]
        if len(tokens):
            out[f] = _most_common(tokens)[1] / len(tokens)
    return out


def position_spread(rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(features,) standard deviation (population, in tokens) of the positions of a feature's top examples:
    0 = all at one position. rows as in `token_purity`; positions: (n_rows,) per store row."""
    out = torch.full((rows.shape[0],), float("nan"))
    for f, feature_rows in enumerate(rows):
        at = positions[feature_rows[feature_rows >= 0]].double()
        if len(at):
            out[f] = at.std(correction=0)
    return out


def text_alignment(mae: MAEResult, features, tokenizer=None) -> pd.DataFrame:
    """Per feature (the given ids, in order): its most common top-example token, token purity, position spread
    and number of examples, from one `max_activating` pass."""
    features = torch.as_tensor(list(features), dtype=torch.int64)
    rows, token_ids = mae.rows[features], mae.index["token_id"]
    top_token = [_most_common(token_ids[r[r >= 0]])[0] if (r >= 0).any() else -1 for r in rows]
    frame = pd.DataFrame({"top_token_id": top_token, "token_purity": token_purity(rows, token_ids).numpy(),
                          "position_spread": position_spread(rows, mae.index["position"]).numpy(),
                          "examples": (rows >= 0).sum(1).numpy()}, index=pd.Index(features.tolist(), name="feature"))
    if tokenizer is not None:
        frame.insert(1, "top_token", [token_text(tokenizer, t) if t >= 0 else "" for t in top_token])
    return frame


def alignment_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Mean token purity and position spread (tokens) over each table's features; a column per model."""
    return pd.DataFrame({name: {"features": len(t), "mean token purity": t["token_purity"].mean(),
                                "mean position spread (tokens)": t["position_spread"].mean()}
                         for name, t in tables.items()})
