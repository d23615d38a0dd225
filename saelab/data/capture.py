"""Notebook 02: run the LM over the token contexts and stream one hook's activations to a store.

One forward pass per batch of contexts, stopped right after the hooked block
(`stop_at_layer=layer + 1`: later layers would be wasted work), under inference_mode. Each batch's
rows are cast to the store dtype on the device and copied to the host. A shard holds
ceil(shard_rows / rows per context) whole contexts, so shard boundaries depend on the profile and
the data only, not on the batch size: a capture resumed after a kill, run on another device or
with a smaller batch writes the same shards as one that never stopped. Host memory is bounded by
about one shard plus one batch, whatever the number of documents.

Device (saelab.devices): given `lm`, capture runs where the LM lives (a `device` naming another is
an error: the LM is never copied); without one, `load_lm` puts the model on `device`.
On CUDA:
- the batch grows to CUDA_TOKENS_PER_PASS tokens when free GPU memory holds it (`capture_batch`);
- the copy to the host is pinned and non-blocking, and a background thread writes a shard only once
  the copies into it have landed (a CUDA event), while the GPU already runs the next batch and the
  loop never waits for the disk (`ShardBuffer`);
- matmuls run in TF32 when the store is float16/bfloat16: those keep 10/7 mantissa bits, TF32 10,
  so the store loses little; a float32 store gets float32 matmuls;
- out of GPU memory, the batch is halved and the same contexts retried, with a warning naming
  `batch_size`; at one context it stops with an error that says what to do. Shards already
  written are kept, and rerunning resumes after them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm import tqdm  # text bars: tqdm.auto needs ipywidgets in Jupyter

from saelab import paths
from saelab.config import LM_SETTINGS, Profile, default_device
from saelab.data.lm import check_hook, load_lm
from saelab.data.offline_lm import lm_training_settings
from saelab.data.tokens import load_tokens, read_info, token_settings
from saelab.devices import check_device, tf32_matmuls
from saelab.store import DTYPES, INDEX_FIELDS, MANIFEST, ActivationStore, StoreWriter, replace_shard

STATS = "capture_stats.json"  # throughput of the last capture run; not part of the store's identity
# notebook 02's plots: 64 contexts give stable 10/90% norm quantiles per position in one forward pass;
# 200k values draw a smooth 200-bin histogram while the figure file stays small (it is binned first)
NORM_PLOT_CONTEXTS = 64
VALUE_SAMPLE_SIZE = 200_000
# tokens per forward pass on CUDA: 512 GPT-2 contexts of 128. An H100 is busy at this size; larger
# batches only hold more memory (capture_batch_size stays the batch on CPU and MPS)
CUDA_TOKENS_PER_PASS = 65_536


def store_metadata(profile: Profile, split: str, lm) -> dict:
    """The store's metadata dict: what the activations depend on (profile settings, tokens, LM config).
    A resume with anything different is refused by StoreWriter."""
    return {"profile": profile.name, "split": split, "context_size": profile.context_size,
            "exclude_first_position": profile.exclude_first_position, "lm_settings": LM_SETTINGS,
            "lm_config": {k: getattr(lm.cfg, k) for k in ("n_layers", "d_model", "n_heads", "d_mlp", "d_vocab")},
            "tokens": read_info(profile)["settings"], "random_weights": random_weights(profile), "seed": profile.seed,
            **offline_lm_identity(profile)}


def random_weights(profile: Profile) -> bool:
    """True when the profile's LM is the seeded random-weight model (offline, offline_lm="random")."""
    return profile.is_offline and profile.offline_lm == "random"


def offline_lm_identity(profile: Profile) -> dict:
    """Offline, trained: the settings the LM was trained with, so activations of another LM are stale."""
    return {"offline_lm": lm_training_settings(profile)} if profile.is_offline and not random_weights(profile) else {}


def _expected(profile: Profile, split: str) -> dict:
    """The store's identity as far as the profile alone fixes it (no model loaded): manifest and metadata."""
    lm_config = {"d_model": profile.d_in}
    if profile.is_offline:  # the offline model's shape comes from the profile (saelab.data.offline_lm)
        lm_config |= {"n_layers": profile.offline_n_layers, "n_heads": profile.offline_n_heads}
    metadata = {"split": split, "context_size": profile.context_size, "lm_settings": LM_SETTINGS,
                "exclude_first_position": profile.exclude_first_position, "tokens": token_settings(profile),
                "random_weights": random_weights(profile), "seed": profile.seed, "lm_config": lm_config,
                **offline_lm_identity(profile)}
    return {"model_name": profile.model_name, "hook": profile.hook, "d_in": profile.d_in,
            "dtype": profile.store_dtype, "metadata": metadata}


def differences(stored, wanted, prefix: str = "") -> list[str]:
    """A list of 'key.sub: stored X, profile Y', one for each leaf of the (nested) dict `wanted` that
    `stored` does not match; [] when all match. Keys only in `stored` are ignored."""
    if isinstance(stored, dict) and isinstance(wanted, dict):
        return [d for k, v in wanted.items() for d in differences(stored.get(k), v, f"{prefix}{k}.")]
    return [] if stored == wanted else [f"{prefix[:-1]}: stored {stored!r}, profile {wanted!r}"]


def stale_store_message(profile: Profile, split: str, detail: list[str]) -> str:
    """What to delete and rerun when the store on disk no longer matches the profile."""
    return (f"the activation store {paths.store_dir(profile, split)} was captured with other settings than "
            f"profile {profile.name!r} has now ({'; '.join(detail)}). Delete runs/{profile.name}/activations/"
            f"{split} and rerun notebook 02_activations (then 03_train and 04_mae_analysis, which read it).")


def open_store(profile: Profile, split: str = "train") -> ActivationStore:
    """The finished store of `split` ("train" or "mae") in `paths.store_dir(profile, split)`, checked
    against the profile's current tokens, model and hook; nothing is captured or changed.

    Notebooks 03-04 open stores this way, so activations captured before notebook 01 was rerun
    with other settings are refused (ValueError saying what to delete and rerun) instead of
    silently used. A missing store raises FileNotFoundError: run notebook 02.
    """
    store = ActivationStore(paths.store_dir(profile, split))
    detail = differences(store.manifest, _expected(profile, split))
    if detail:
        raise ValueError(stale_store_message(profile, split, detail))
    return store


def row_index(ids: torch.Tensor, first_context: int, skip_first: bool) -> dict[str, torch.Tensor]:
    """(batch, pos) token ids -> each stored row's context, position and token id, position 0 dropped if asked."""
    start = 1 if skip_first else 0
    batch, pos = ids.shape
    context = torch.arange(first_context, first_context + batch).repeat_interleave(pos - start)
    position = torch.arange(start, pos).repeat(batch)
    return {"context": context, "position": position, "token_id": ids[:, start:].reshape(-1)}


def capture_batch(profile: Profile, lm, device: torch.device) -> int:
    """Contexts per forward pass: capture_batch_size on CPU and MPS. On CUDA, CUDA_TOKENS_PER_PASS
    tokens' worth if half the free GPU memory holds such a pass (estimated), never fewer than
    capture_batch_size; a pass that still runs out of memory is halved (capture_activations)."""
    if device.type != "cuda":
        return profile.capture_batch_size
    cfg, pos = lm.cfg, profile.context_size
    # float32 bytes alive at once inside one block per context, x2 for temporaries: residual, q, k, v and
    # attention output (6 x d_model), MLP hidden and its activation (2 x d_mlp), scores and pattern (2 x heads x pos)
    per_context = 2 * 4 * pos * (6 * cfg.d_model + 2 * cfg.d_mlp + 2 * cfg.n_heads * pos)
    free, _ = torch.cuda.mem_get_info(device)
    return max(profile.capture_batch_size, min(CUDA_TOKENS_PER_PASS // pos, free // 2 // per_context))


def hook_rows(lm, ids: torch.Tensor, profile: Profile, device: torch.device) -> torch.Tensor:
    """(batch, pos) token ids on the CPU -> (batch * stored positions, d_in) hook activations in the
    store dtype, on `device`. On CUDA nothing here waits for the GPU."""
    if device.type == "cuda":  # a pageable copy would wait for the GPU to finish the previous batch
        ids = ids.pin_memory().to(device, non_blocking=True)
    _, cache = lm.run_with_cache(ids.to(device), names_filter=[profile.hook], stop_at_layer=profile.layer + 1)
    acts = cache[profile.hook][:, int(profile.exclude_first_position):]  # (batch, stored positions, d_in)
    return acts.to(DTYPES[profile.store_dtype]).reshape(-1, acts.shape[-1])  # cast here: fp16 halves the copy


class ShardBuffer:
    """Rows on their way to the store, written as shards of whole contexts in context order.

    Shards are written by one background thread, so the loop that feeds the GPU never waits for the
    disk (a GPT-2-small shard is ~96 MiB): `write` hands the full shards to the thread and returns; the
    next `write` first takes what the previous one left over. At most one write is in flight, so host
    memory stays about two shards plus a batch. An error in the thread is raised by the next call."""

    def __init__(self, writer: StoreWriter, profile: Profile):
        self.writer = writer
        self.rows_per_context = profile.context_size - int(profile.exclude_first_position)
        self.contexts_per_shard = -(-profile.shard_rows // self.rows_per_context)
        self.parts: list[tuple[torch.Tensor, dict, torch.cuda.Event | None]] = []  # rows, index, copy done
        self.contexts = 0
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saelab-shards")
        self.pending: Future | None = None  # the write in flight; its result is the rows left over

    def add(self, rows: torch.Tensor, index: dict[str, torch.Tensor], contexts: int) -> None:
        """Start copying one batch's rows to the host, then hand the shards the earlier batches
        filled to the writer thread: on CUDA the GPU computes and copies this batch while the host writes."""
        done = None
        if rows.is_cuda:  # into pinned host memory: the copy runs without blocking the host
            host, done = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True), torch.cuda.Event()
            host.copy_(rows, non_blocking=True)
            done.record(torch.cuda.current_stream(rows.device))
            rows = host  # not to be read before done.synchronize()
        self.write()
        self.parts.append((rows.cpu(), index, done))  # .cpu(): MPS copies here; CPU and pinned rows stay
        self.contexts += contexts

    def write(self, final: bool = False) -> None:
        """Hand every full shard to the writer thread; with `final`, the rest as a last, shorter shard,
        and wait until all is on disk."""
        sizes = [self.contexts_per_shard] * (self.contexts // self.contexts_per_shard)
        if final and self.contexts % self.contexts_per_shard:
            sizes.append(self.contexts % self.contexts_per_shard)
        if sizes:
            parts, self.parts = self._take_leftover() + self.parts, []
            self.pending = self.thread.submit(self._write_shards, parts, sizes)
            self.contexts -= sum(sizes)
        if final:
            self.wait()

    def wait(self) -> None:
        """Block until the write in flight is on disk (raising its error, if any); stop the thread."""
        self.parts = self._take_leftover() + self.parts
        self.thread.shutdown(wait=True)

    def _take_leftover(self) -> list:
        pending, self.pending = self.pending, None
        return pending.result() if pending is not None else []

    def _write_shards(self, parts: list, sizes: list[int]) -> list:
        """On the writer thread: shards of `sizes` contexts from `parts`; returns the rows left over."""
        for _, _, done in parts:
            if done is not None:
                done.synchronize()  # the non-blocking copies must have landed before the rows are read
        rows = torch.cat([p[0] for p in parts])  # (rows, d_in)
        index = {k: torch.cat([p[1][k] for p in parts]) for k in INDEX_FIELDS}
        start = 0
        for contexts in sizes:
            stop = start + contexts * self.rows_per_context
            self.writer.add_shard(rows[start:stop], {k: v[start:stop] for k, v in index.items()}, contexts)
            start = stop
        rest = (rows[start:].clone(), {k: v[start:].clone() for k, v in index.items()}, None)  # frees the rest of rows
        return [rest] if start < len(rows) else []


def tokenizer_identity(tokenizer) -> dict | None:
    """The tokenizer as the store's provenance records it: vocabulary size and a SHA-256 of the vocabulary
    (the same tokenizer under any name or path gives the same digest)."""
    if tokenizer is None:
        return None
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {"vocab_size": len(tokenizer), "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()}


def _open_writer(profile: Profile, split: str, lm) -> StoreWriter:
    """The store's writer, holding the folder's lock: a second capture into it is refused, naming this one."""
    directory = paths.store_dir(profile, split)
    identity = _expected(profile, split) | {"metadata": store_metadata(profile, split, lm)}
    try:
        return StoreWriter(directory, **identity,
                           provenance={"tokenizer": tokenizer_identity(getattr(lm, "tokenizer", None))})
    except ValueError as err:  # a store of other settings: say which folder to delete and what to rerun
        stored = json.loads((directory / MANIFEST).read_text())
        raise ValueError(stale_store_message(profile, split, differences(stored, identity) or [str(err)])) from err


def _out_of_memory(profile: Profile, split: str, device: torch.device, writer: StoreWriter) -> str:
    return (f"CUDA ran out of memory on {device} even at one context ({profile.context_size} tokens) per forward "
            "pass, after halving the batch (capture_batch_size, or batch_size=) down to 1: free the GPU memory that "
            "other work holds (another notebook, an SAE or activations left on the GPU) or capture on the CPU "
            f"(device='cpu'). The {len(writer.manifest['shards'])} shards already written to "
            f"{paths.store_dir(profile, split)} are kept: rerunning resumes after them.")


def _tokens_and_lm(profile: Profile, split: str, lm, device: str | None):
    """The split's token contexts, the LM (the one given, else the profile's on `device`), and the device it
    runs on, its hook checked: what a capture and a repair both start from."""
    tokens = load_tokens(profile, split).with_format("torch")
    if lm is None:
        lm = load_lm(profile, device or default_device())
    device = check_device(lm, device)
    check_hook(lm, profile.hook)
    return tokens, lm, device


@torch.inference_mode()
def capture_activations(profile: Profile, split: str = "train", device: str | None = None, *,
                        lm=None, batch_size: int | None = None, progress: bool = True) -> ActivationStore:
    """Capture profile.hook over `load_tokens(profile, split)` into `paths.store_dir(profile, split)`.

    Runs where `lm` lives if one is given (`device`, if also given, must name the same device);
    otherwise loads the profile's LM on `device` (default: the GPU when there is one). `batch_size`:
    contexts per forward pass (default `capture_batch`). Resumes an interrupted capture; returns the
    finished store at once if it is complete.
    """
    tokens, lm, device = _tokens_and_lm(profile, split, lm, device)
    with _open_writer(profile, split, lm) as writer:  # the lock is released however the capture ends
        if writer.is_complete:
            return ActivationStore(writer.directory, hook=profile.hook, d_in=profile.d_in)
        return _capture(profile, split, lm, device, writer, tokens, batch_size, progress)


def _capture(profile: Profile, split: str, lm, device: torch.device, writer: StoreWriter, tokens,
             batch_size: int | None, progress: bool) -> ActivationStore:
    """The capture loop of capture_activations, into an open writer."""
    n, done = len(tokens), writer.contexts_done
    size, first, buffer = batch_size or capture_batch(profile, lm, device), done, ShardBuffer(writer, profile)
    started = time.perf_counter()
    with tf32_matmuls(device.type == "cuda" and profile.store_dtype != "float32"), \
            tqdm(total=n, initial=done, unit="ctx", desc=f"capture {split}", disable=not progress) as bar:
        while first < n:
            ids = tokens[first:first + size]["input_ids"].to(torch.int64)  # (batch, pos)
            try:
                rows = hook_rows(lm, ids, profile, device)  # (batch * stored positions, d_in) on the device
            except torch.cuda.OutOfMemoryError as err:
                if size == 1:
                    buffer.write()  # full shards waiting to be written are kept too
                    buffer.wait()
                    raise RuntimeError(_out_of_memory(profile, split, device, writer)) from err
                rows = None
            if rows is None:  # outside the except block, so the failed pass's tensors are freed
                failed, size = size, size // 2
                warnings.warn(f"capture: CUDA ran out of memory at {failed} contexts per forward pass; continuing "
                              f"at {size}. To start there: capture_activations(..., batch_size={size})", stacklevel=3)
                continue
            buffer.add(rows, row_index(ids, first, profile.exclude_first_position), len(ids))
            first += len(ids)
            bar.update(len(ids))
        buffer.write(final=True)
    elapsed = time.perf_counter() - started
    store = writer.finish()
    captured = (n - done) * profile.context_size
    stats = {"contexts": n - done, "tokens": captured, "seconds": elapsed, "device": str(device), "batch_size": size,
             "tokens_per_s": captured / elapsed if elapsed > 0 else None, "resumed_from_context": done}
    (writer.directory / STATS).write_text(json.dumps(stats, indent=2))
    return store


@torch.inference_mode()
def repair_store(profile: Profile, split: str = "train", device: str | None = None, *, lm=None,
                 progress: bool = True) -> list[str]:
    """Check every shard of the finished store of `split` (`ActivationStore.verify`) and recapture just
    the damaged ones, each from its own contexts with the store's settings; returns their file names
    ([] when the store was sound). A recapture on the device and versions of the original is bit-identical;
    elsewhere it differs within rounding, the new checksum is recorded and a warning says so."""
    store = open_store(profile, split)  # refuses a store whose settings no longer match the profile
    damaged = set(store.verify(progress=progress))
    if not damaged:
        return []
    tokens, lm, device = _tokens_and_lm(profile, split, lm, device)
    first, size = 0, capture_batch(profile, lm, device)
    with tf32_matmuls(device.type == "cuda" and profile.store_dtype != "float32"):  # as the capture ran
        for shard in store.manifest["shards"]:
            if shard["file"] in damaged:
                ids = tokens[first:first + shard["contexts"]]["input_ids"].to(torch.int64)  # (contexts, pos)
                rows = torch.cat([hook_rows(lm, ids[i:i + size], profile, device).cpu()
                                  for i in range(0, len(ids), size)])  # (contexts * stored positions, d_in)
                index = row_index(ids, first, profile.exclude_first_position)
                if not replace_shard(store, shard["file"], rows, index):
                    warnings.warn(f"repair_store: the recaptured {shard['file']} differs in its bytes from the "
                                  "original capture (another device or library version); its new checksum is "
                                  "recorded", stacklevel=2)
            first += shard["contexts"]
    return sorted(damaged)


@torch.inference_mode()
def norm_by_position(lm, input_ids: torch.Tensor, hook: str, device: str | None = None):
    """A DataFrame, one row per position (position 0 included): mean_norm, q10, q90 of the hook's
    L2 norm over the batch. Runs `lm` on its own device unless `device` is given.

    input_ids: (batch, pos). Computed from the LM rather than the store, because the store may
    exclude position 0, which is exactly the position this plot is about. Runs where `lm` lives
    (`device`, if given, must name the same device).
    """
    import pandas as pd

    layer = int(hook.split(".")[1])
    device = check_device(lm, device)
    _, cache = lm.run_with_cache(input_ids.to(device), names_filter=[hook], stop_at_layer=layer + 1)
    norms = cache[hook].float().norm(dim=-1).cpu()  # (batch, pos)
    q = torch.quantile(norms, torch.tensor([0.1, 0.9]), dim=0)  # (2, pos)
    return pd.DataFrame({"position": range(norms.shape[1]), "mean_norm": norms.mean(0).numpy(),
                         "q10": q[0].numpy(), "q90": q[1].numpy()})


def value_sample(store: ActivationStore, n: int = VALUE_SAMPLE_SIZE, seed: int = 0):
    """About n activation values as a flat numpy float32 array: all d_in values of rows drawn
    uniformly (seeded) from every shard. Default n: VALUE_SAMPLE_SIZE (200k), enough for a smooth histogram."""
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
