"""The offline profile's language model: a small GPT-2 that saelab trains on the offline corpus.

Without the hub there is no pretrained GPT-2, and a random-weight model's features are noise (its
residual stream is mostly position). So the offline profile trains its own: transformers'
`GPT2LMHeadModel` of the profile's shape, on every corpus document except the held-out "mae"
split, with notebook 01's BPE tokenizer, in a plain seeded loop (AdamW, warm-up then cosine decay,
gradient clipping, as nanoGPT). `saelab.data.lm.load_lm` converts it to TransformerLens as it does GPT-2.

Trained once, then reused:

    runs/<profile>/lm/d64-l8-v4096-<hash>/model.safetensors   the weights
                                          config.json         settings, GPT2Config, sha256 of the weights,
                                                              training curve and held-out numbers

The folder name hashes every setting the weights depend on (tokenizer vocabulary included): a model
of other settings is never loaded, and never overwritten. Both files are written into a temp folder
that is renamed into place, so a killed training leaves no loadable half model; a folder whose
config or weights do not check out is refused with a warning and trained again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm  # text bars: they read well in a saved notebook

from saelab import paths
from saelab.config import EOT, Profile, describe_device
from saelab.data.corpus import iter_documents
from saelab.data.tokens import SPLIT_RULE, load_tokens, pack, split_documents

FORMAT = "saelab-offline-lm/1"  # bump when the training recipe changes: older models then retrain
WEIGHTS, CONFIG = "model.safetensors", "config.json"
EVAL_BATCH = 64  # held-out contexts per forward pass
# Initial weight std. GPT-2's 0.02 suits width 768 (about 0.55 / sqrt(768)); at width 64 it kept the model at
# the unigram loss for its first ~200 steps (measured on the offline corpus), while 0.1 learns from the start.
INIT_STD = 0.1


class InvalidSavedModel(ValueError):
    """A saved model that must not be used: missing file, other settings, weights not as recorded."""


def gpt2_config(profile: Profile, tokenizer=None, init_std: float = 0.02):
    """transformers' GPT2Config of the offline shape (no dropout: the data is seen a few times only).
    init_std: GPT-2's 0.02 for the random-weight model, INIT_STD for the one trained here."""
    from transformers import GPT2Config

    eot = tokenizer.convert_tokens_to_ids(EOT) if tokenizer is not None else None
    return GPT2Config(vocab_size=profile.offline_vocab_size, n_positions=profile.context_size, n_embd=profile.d_in,
                      n_layer=profile.offline_n_layers, n_head=profile.offline_n_heads, n_inner=4 * profile.d_in,
                      activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=eot, eos_token_id=eot, initializer_range=init_std)


def lm_training_settings(profile: Profile) -> dict:
    """Every profile value the trained weights depend on (the tokenizer is added by `model_dir`).
    n_texts and mae_texts fix which documents are held out."""
    keys = ("model_name", "dataset_id", "n_texts", "mae_texts", "offline_vocab_size", "context_size", "d_in",
            "offline_n_layers", "offline_n_heads", "offline_lm_texts", "offline_lm_steps", "offline_lm_batch_size",
            "offline_lm_lr", "seed")
    return {"format": FORMAT, "init_std": INIT_STD, "split_rule": SPLIT_RULE, **{k: getattr(profile, k) for k in keys}}


def model_dir(profile: Profile, tokenizer) -> tuple[Path, dict]:
    """The folder of the model for these settings and this tokenizer, and the settings it must hold."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = {**lm_training_settings(profile), "tokenizer_sha256": hashlib.sha256(vocab.encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    name = f"d{profile.d_in}-l{profile.offline_n_layers}-v{profile.offline_vocab_size}-{digest}"
    return paths.lm_dir(profile, name), settings


def load_or_train(profile: Profile, tokenizer, device: str = "cpu", progress: bool = True):
    """The trained GPT2LMHeadModel for the profile: loaded when saved with the same settings, else
    trained (and saved). A saved model that does not check out is refused with a warning, retrained."""
    directory, settings = model_dir(profile, tokenizer)
    if directory.exists():
        try:
            return load(directory, settings)
        except InvalidSavedModel as err:
            warnings.warn(f"refusing the saved offline LM in {directory}: {err}. Training it again.", stacklevel=2)
    model, record = train_lm(profile, tokenizer, settings, device, progress)
    save(model, record, directory)
    return model


def read_record(directory: Path) -> dict:
    """config.json of a saved model: settings, GPT2Config, weights checksum, history, held-out numbers."""
    try:
        record = json.loads((Path(directory) / CONFIG).read_text())
    except (OSError, ValueError) as err:
        raise InvalidSavedModel(f"{CONFIG} is missing or unreadable ({type(err).__name__})") from err
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InvalidSavedModel(f"{CONFIG} is not a {FORMAT} record")
    return record


def load(directory: Path, settings: dict):
    """Load a saved model after checking its settings and the sha256 of its weights file."""
    from safetensors.torch import load_model
    from transformers import GPT2Config, GPT2LMHeadModel

    record = read_record(directory)
    if record.get("settings") != settings:
        raise InvalidSavedModel("it was saved with other settings")
    weights = Path(directory) / WEIGHTS
    if not weights.is_file() or _sha256(weights) != record.get("weights_sha256"):
        raise InvalidSavedModel(f"{WEIGHTS} is missing or differs from the one saved (sha256)")
    try:
        model = GPT2LMHeadModel(GPT2Config.from_dict(record["gpt2_config"]))
        load_model(model, weights, strict=True)
    except Exception as err:  # no recorded architecture, or tensors of other names or shapes
        reason = (str(err).strip().splitlines() or [""])[0][:160]  # torch lists every key: the first line says it
        raise InvalidSavedModel(f"{WEIGHTS} does not fit the recorded config ({type(err).__name__}: {reason})") from err
    return model.eval()


def save(model, record: dict, directory: Path) -> Path:
    """Weights, then config.json (with the weights' sha256), in a temp folder renamed into place."""
    from safetensors.torch import save_model

    directory = Path(directory)
    tmp, old = (directory.with_name(directory.name + suffix) for suffix in (".tmp", ".old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model.cpu(), str(tmp / WEIGHTS))  # tied wte/lm_head saved once
    paths.write_json_atomically(tmp / CONFIG, {**record, "weights_sha256": _sha256(tmp / WEIGHTS)})
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():  # a refused (corrupt) model of the same settings
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def corpus_contexts(profile: Profile, tokenizer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(train (n, context_size), held_out (m, context_size), documents): the LM trains on whole documents
    of the corpus packed as in notebook 01, minus the "mae" documents, which are its held-out set."""
    held = set(split_documents(profile)["mae"])
    texts = (text for i, text in enumerate(iter_documents(profile)) if i not in held)
    texts = list(islice(texts, profile.offline_lm_texts or None))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = list(pack(ids, profile.context_size, tokenizer.convert_tokens_to_ids(EOT), truncate=False))
    if not rows:
        raise ValueError(f"{len(texts)} documents make no full context of {profile.context_size} tokens; "
                         "raise offline_lm_texts (0 = every document)")
    held_out = torch.tensor(load_tokens(profile, "mae")["input_ids"], dtype=torch.int64)
    return torch.tensor(rows, dtype=torch.int64), held_out, len(texts)


def unigram_cross_entropy(fit_tokens: torch.Tensor, eval_tokens: torch.Tensor, vocab_size: int) -> float:
    """Nats per token on eval_tokens of the add-one unigram of fit_tokens: p(t) = (count(t) + 1) / (N + V).
    The baseline a language model must beat: it knows token frequencies and no context."""
    counts = torch.bincount(fit_tokens.flatten(), minlength=vocab_size).double() + 1  # (vocab,)
    log_p = counts.log() - counts.sum().log()
    return -log_p[eval_tokens.flatten()].mean().item()


def next_token_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from ids[:, :-1]; ids (batch, pos)."""
    logits = model(ids).logits[:, :-1]  # (batch, pos - 1, vocab)
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def held_out_loss(model, held_out: torch.Tensor) -> float:
    """Mean next-token cross-entropy over every predicted token of the held-out contexts."""
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    total = sum(next_token_loss(model, batch.to(device)).item() * len(batch) for batch in held_out.split(EVAL_BATCH))
    model.train(was_training)
    return total / len(held_out)


def lm_lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay from `peak` to peak / 10 (nanoGPT's get_lr)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@contextmanager
def cpu_threads(n: int):
    """torch's intra-op threads set to n (0 = every core) inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n or os.cpu_count() or 1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def fit(model, train: torch.Tensor, held_out: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int,
        eval_every: int, progress: bool = True) -> list[dict]:
    """The training loop: random contexts from `train` (seeded), AdamW, clipped gradients. Returns the
    training curve: held-out loss at step 0, every `eval_every` steps and at the end."""
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    generator, warmup = torch.Generator().manual_seed(seed), max(1, steps // 20)
    history, recent = [{"step": 0, "tokens": 0, "train_loss": None,
                        "held_out_loss": held_out_loss(model, held_out)}], []
    model.train()
    bar = tqdm(range(steps), desc="train offline LM", disable=not progress, mininterval=5)  # few lines when saved
    for step in bar:
        for group in optimizer.param_groups:  # lr of this step
            group["lr"] = lm_lr_at(step, steps, lr, warmup)
        batch = train[torch.randint(len(train), (batch_size,), generator=generator)].to(device)  # (batch, pos)
        loss = next_token_loss(model, batch)  # forward / backward / step
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:  # log: one point of the curve
            history.append({"step": step + 1, "tokens": (step + 1) * batch_size * train.shape[1],
                            "train_loss": sum(recent) / len(recent), "held_out_loss": held_out_loss(model, held_out)})
            recent = []
            bar.set_postfix(held_out=f"{history[-1]['held_out_loss']:.3f}", refresh=False)
    return history


def initial_model(profile: Profile, tokenizer=None):
    """The offline model at step 0: GPT2LMHeadModel with INIT_STD weights seeded by profile.seed (the global
    RNG is left untouched). `train_lm` trains it; `saelab.data.lm.at_initialisation` rebuilds it as the
    random twin (notebook 04), so the twin is the trained model's own initialisation."""
    from transformers import GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.seed)
        return GPT2LMHeadModel(gpt2_config(profile, tokenizer, INIT_STD))


def train_lm(profile: Profile, tokenizer, settings: dict, device: str = "cpu", progress: bool = True):
    """A seeded GPT2LMHeadModel trained with the profile's offline_lm_* settings, and its record."""

    train_ids, held_out, documents = corpus_contexts(profile, tokenizer)
    model = initial_model(profile, tokenizer).to(device)
    config = model.config
    started = time.perf_counter()
    with cpu_threads(profile.offline_lm_threads) as threads:
        history = fit(model, train_ids, held_out, steps=profile.offline_lm_steps,
                      batch_size=profile.offline_lm_batch_size, lr=profile.offline_lm_lr, seed=profile.seed,
                      eval_every=profile.offline_lm_eval_every, progress=progress)
    seconds = time.perf_counter() - started
    record = {"format": FORMAT, "settings": settings, "gpt2_config": config.to_dict(), "history": history,
              "held_out_ce": history[-1]["held_out_loss"],
              "unigram_ce": unigram_cross_entropy(train_ids[:, 1:], held_out[:, 1:], config.vocab_size),
              "training": {"documents": documents, "train_contexts": len(train_ids),
                           "tokens_seen": history[-1]["tokens"], "seconds": round(seconds, 1),
                           "device": describe_device(str(device)), "threads": threads}}
    return model.eval(), record
