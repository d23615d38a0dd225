"""Notebook 02: run the LM over the token contexts and stream one hook's activations to a store.

One forward pass per batch of `capture_batch_size` contexts, stopped right after the hooked
block (`stop_at_layer=layer + 1`: later layers would be wasted work), under inference_mode.
Rows are buffered on the CPU and flushed as a shard at the first batch boundary where the
buffer holds >= `shard_rows` rows, so shard boundaries depend only on the data: a capture
resumed after a kill writes the same shards as one that never stopped. Host memory is bounded
by one shard plus one batch, whatever the number of documents.
"""

from __future__ import annotations

import json
import math
import time

import torch
from tqdm import tqdm  # text bars: tqdm.auto needs ipywidgets in Jupyter

from saelab import paths
from saelab.config import Profile, default_device
from saelab.data import load_tokens, read_info, token_settings
from saelab.lm import LM_SETTINGS, check_hook, load_lm
from saelab.offline_lm import training_settings
from saelab.store import DTYPES, MANIFEST, ActivationStore, StoreWriter

STATS = "capture_stats.json"  # throughput of the last capture run; not part of the store's identity
# notebook 02's plots: 64 contexts give stable 10/90% norm quantiles per position in one forward pass;
# 200k values draw a smooth 200-bin histogram while the figure file stays small (it is binned first)
NORM_PLOT_CONTEXTS = 64
VALUE_SAMPLE_SIZE = 200_000


def store_metadata(profile: Profile, split: str, lm) -> dict:
    """What the activations depend on; a resume with anything different is refused by StoreWriter."""
    return {"profile": profile.name, "split": split, "context_size": profile.context_size,
            "exclude_first_position": profile.exclude_first_position, "lm_settings": LM_SETTINGS,
            "lm_config": {k: getattr(lm.cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")},
            "tokens": read_info(profile)["settings"], "random_weights": random_weights(profile), "seed": profile.seed,
            **offline_lm_identity(profile)}


def random_weights(profile: Profile) -> bool:
    return profile.is_offline and profile.offline_lm == "random"


def offline_lm_identity(profile: Profile) -> dict:
    """Offline, trained: the settings the LM was trained with, so activations of another LM are stale."""
    return {"offline_lm": training_settings(profile)} if profile.is_offline and not random_weights(profile) else {}


def _expected(profile: Profile, split: str) -> dict:
    """The store's identity as far as the profile alone fixes it (no model loaded): manifest and metadata."""
    lm_config = {"d_model": profile.d_in}
    if profile.is_offline:  # the offline model's shape comes from the profile (saelab.offline_lm)
        lm_config |= {"n_layers": profile.offline_n_layers, "n_heads": profile.offline_n_heads}
    metadata = {"split": split, "context_size": profile.context_size, "lm_settings": LM_SETTINGS,
                "exclude_first_position": profile.exclude_first_position, "tokens": token_settings(profile),
                "random_weights": random_weights(profile), "seed": profile.seed, "lm_config": lm_config,
                **offline_lm_identity(profile)}
    return {"model_name": profile.model_name, "hook": profile.hook, "d_in": profile.d_in,
            "dtype": profile.store_dtype, "metadata": metadata}


def differences(stored, wanted, prefix: str = "") -> list[str]:
    """'key.sub: stored X, profile Y' for every leaf of `wanted` that `stored` does not match."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [d for k, v in wanted.items() for d in differences(stored.get(k), v, f"{prefix}{k}.")]
    return [] if stored == wanted else [f"{prefix[:-1]}: stored {stored!r}, profile {wanted!r}"]


def stale_store_message(profile: Profile, split: str, detail: list[str]) -> str:
    """What to delete and rerun when the store on disk no longer matches the profile."""
    return (f"the activation store {paths.store_dir(profile, split)} was captured with other settings than "
            f"profile {profile.name!r} has now ({'; '.join(detail)}). Delete runs/{profile.name}/activations/"
            f"{split} and rerun notebook 02_activations (then 03_train and 04_mae_analysis, which read it).")


def open_store(profile: Profile, split: str = "train") -> ActivationStore:
    """The finished store of `split`, checked against the profile's current tokens, model and hook.

    Notebooks 03-04 open stores this way, so activations captured before notebook 01 was rerun
    with other settings are refused instead of silently used.
    """
    store = ActivationStore(paths.store_dir(profile, split))
    detail = differences(store.manifest, _expected(profile, split))
    if detail:
        raise ValueError(stale_store_message(profile, split, detail))
    return store


def batch_rows(acts: torch.Tensor, ids: torch.Tensor, first_context: int, skip_first: bool):
    """(batch, pos, d_in) activations -> (rows, d_in) and the per-row index, position 0 dropped if asked."""
    start = 1 if skip_first else 0
    batch, pos = ids.shape
    acts, ids = acts[:, start:], ids[:, start:]  # (batch, pos - start, d_in), (batch, pos - start)
    context = torch.arange(first_context, first_context + batch).repeat_interleave(pos - start)
    position = torch.arange(start, pos).repeat(batch)
    return acts.reshape(-1, acts.shape[-1]), {"context": context, "position": position, "token_id": ids.reshape(-1)}


@torch.inference_mode()
def capture_activations(profile: Profile, split: str = "train", device: str | None = None, *,
                        lm=None, progress: bool = True) -> ActivationStore:
    """Capture profile.hook over `load_tokens(profile, split)` into `paths.store_dir(profile, split)`.

    Resumes an interrupted capture; returns the finished store at once if it is complete.
    """
    tokens = load_tokens(profile, split).with_format("torch")
    device = device or default_device()
    lm = lm or load_lm(profile, device)
    check_hook(lm, profile.hook)
    directory = paths.store_dir(profile, split)
    identity = _expected(profile, split) | {"metadata": store_metadata(profile, split, lm)}
    try:
        writer = StoreWriter(directory, **identity)
    except ValueError as err:  # a store of other settings: say which folder to delete and what to rerun
        stored = json.loads((directory / MANIFEST).read_text())
        raise ValueError(stale_store_message(profile, split, differences(stored, identity) or [str(err)])) from err
    if writer.is_complete:
        return ActivationStore(directory, hook=profile.hook, d_in=profile.d_in)
    n, size, done = len(tokens), profile.capture_batch_size, writer.contexts_done
    buffer, index, contexts, started = [], [], 0, time.perf_counter()
    for first in tqdm(range(done, n, size), desc=f"capture {split}", disable=not progress,
                      initial=done // size, total=-(-n // size)):
        ids = tokens[first:first + size]["input_ids"].to(torch.int64)  # (batch, pos)
        _, cache = lm.run_with_cache(ids.to(device), names_filter=[profile.hook], stop_at_layer=profile.layer + 1)
        rows, row_index = batch_rows(cache[profile.hook].cpu(), ids, first, profile.exclude_first_position)
        buffer.append(rows.to(DTYPES[profile.store_dtype]))
        index.append(row_index)
        contexts += ids.shape[0]
        if sum(len(b) for b in buffer) >= profile.shard_rows or first + size >= n:
            writer.add_shard(torch.cat(buffer), {k: torch.cat([i[k] for i in index]) for k in index[0]}, contexts)
            buffer, index, contexts = [], [], 0
    elapsed = time.perf_counter() - started
    store = writer.finish()
    captured = (n - done) * profile.context_size
    stats = {"contexts": n - done, "tokens": captured, "seconds": elapsed, "device": str(device),
             "tokens_per_s": captured / elapsed if elapsed > 0 else None, "resumed_from_context": done}
    (directory / STATS).write_text(json.dumps(stats, indent=2))
    return store


@torch.inference_mode()
def norm_by_position(lm, input_ids: torch.Tensor, hook: str, device: str | None = None):
    """Mean and 10/90% quantiles of the hook's L2 norm at each position, position 0 included.

    input_ids: (batch, pos). Computed from the LM rather than the store, because the store may
    exclude position 0, which is exactly the position this plot is about.
    """
    import pandas as pd

    layer = int(hook.split(".")[1])
    _, cache = lm.run_with_cache(input_ids.to(device or lm.cfg.device), names_filter=[hook], stop_at_layer=layer + 1)
    norms = cache[hook].float().norm(dim=-1).cpu()  # (batch, pos)
    q = torch.quantile(norms, torch.tensor([0.1, 0.9]), dim=0)  # (2, pos)
    return pd.DataFrame({"position": range(norms.shape[1]), "mean_norm": norms.mean(0).numpy(),
                         "q10": q[0].numpy(), "q90": q[1].numpy()})


def value_sample(store: ActivationStore, n: int = VALUE_SAMPLE_SIZE, seed: int = 0):
    """About n activation values: all d_in values of rows drawn uniformly from every shard (numpy)."""
    generator = torch.Generator().manual_seed(seed)
    share = min(1.0, n / max(store.n_rows * store.d_in, 1))
    parts = []
    for shard in store.iter_shards():
        acts = shard["activations"]  # (rows, d_in)
        keep = torch.randperm(acts.shape[0], generator=generator)[: math.ceil(share * acts.shape[0])]
        parts.append(acts[keep].float().flatten())
    return torch.cat(parts).numpy() if parts else torch.empty(0).numpy()


def read_stats(profile: Profile, split: str = "train") -> dict | None:
    """Throughput of the last capture run into this store (None if it was never run here)."""
    path = paths.store_dir(profile, split) / STATS
    return json.loads(path.read_text()) if path.is_file() else None
