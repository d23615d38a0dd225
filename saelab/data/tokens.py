"""Notebook 01: documents -> packed token contexts on disk (Arrow, via `datasets`).

Two disjoint document splits of the first `n_texts + mae_texts` documents: "mae" (`mae_texts` of them,
drawn at random with the profile's seed, held out for max-activating examples, CE-loss evaluation and
every held-out score) and "train" (the other `n_texts`, for the SAE). Drawn, not a block: a block of
consecutive documents is one part of the source (in the offline corpus, a few modules' docstrings), so
intervals over held-out documents would describe those modules, not the corpus.

Packing, so that no pad token ever exists: each document keeps at most `context_size - 1`
tokens (the seed truncated at max_length=128) and is followed by EOT; the stream is cut into
rows of `context_size - 1` tokens and every row gets EOT as BOS at position 0, the way GPT-2
was trained on EOT-separated text and the way SAELens prepends BOS. The tail shorter than a
full row is dropped, never padded.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from saelab import paths
from saelab.config import EOT, Profile
from saelab.data.corpus import DataSourceError, alternatives, iter_documents

SPLITS = ("train", "mae")
INFO = "info.json"
TOKENIZER = "tokenizer"  # folder (save_pretrained) under tokens_dir, so AutoTokenizer can reload it


SPLIT_RULE = "mae: seeded random draw"  # recorded with the token files (and the offline LM): a change rebuilds them


def split_documents(profile: Profile) -> dict[str, list[int]]:
    """Indices, in source order, of the documents of each split among the first n_texts + mae_texts:
    "mae" a seeded random draw of mae_texts of them (a fifth when mae_texts = n_texts / 4), "train" the rest."""
    import numpy as np

    total = profile.n_texts + profile.mae_texts
    held = set(np.random.default_rng(profile.seed).permutation(total)[:profile.mae_texts].tolist())
    return {"train": [i for i in range(total) if i not in held], "mae": sorted(held)}


def split_texts(profile: Profile) -> dict[str, list[str]]:
    """The documents of each split (`split_documents`); a source too small for both is an error."""
    total = profile.n_texts + profile.mae_texts
    texts = list(islice(iter_documents(profile), total))
    if len(texts) < total:
        raise DataSourceError(f"{profile.dataset_id} gave only {len(texts)} documents ({profile.n_texts} for "
                              f"train + {profile.mae_texts} for mae wanted); lower n_texts/mae_texts or use a "
                              "larger source. " + alternatives(profile))
    return {split: [texts[i] for i in rows] for split, rows in split_documents(profile).items()}


def load_tokenizer(profile: Profile, directory=None):
    """GPT-2's tokenizer (gpt2/quick), or a BPE trained on the offline corpus, cached on disk.

    directory: where the offline BPE is cached (default `paths.tokens_dir(profile)`; build_tokens
    passes its temp folder).
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not profile.is_offline:
        try:
            return AutoTokenizer.from_pretrained(profile.model_name)
        except (OSError, ValueError) as err:  # ValueError: a local folder with a model and no tokenizer
            if Path(profile.model_name).expanduser().is_dir():
                raise DataSourceError(f"the model folder {profile.model_name} holds no tokenizer ({err}); save "
                                      "one there with tokenizer.save_pretrained(folder)") from err
            raise DataSourceError(f"cannot load the {profile.model_name!r} tokenizer from the Hugging Face "
                                  f"hub or its cache ({err}); on a machine without the hub use "
                                  "SAELAB_PROFILE=offline") from err
    path = Path(directory or paths.tokens_dir(profile)) / TOKENIZER
    if not (path / "tokenizer.json").is_file():
        documents = split_texts(profile)["train"]  # train documents only
        bpe = train_bpe(documents, profile.offline_vocab_size)
        tmp = path.with_name(TOKENIZER + ".tmp")
        PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT).save_pretrained(str(tmp))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    return AutoTokenizer.from_pretrained(str(path))


def train_bpe(documents: list[str], vocab_size: int):
    """A byte-level BPE like GPT-2's (same pre-tokenizer, EOT special token), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def pack(token_lists: Iterable[list[int]], context_size: int, eot_id: int, truncate: bool) -> Iterator[list[int]]:
    """Rows of exactly context_size ids: [EOT, tokens...]; documents separated by EOT, never padded."""
    body = context_size - 1
    stream: list[int] = []
    for ids in token_lists:
        stream += (ids[:body] if truncate else ids) + [eot_id]
        while len(stream) >= body:
            yield [eot_id] + stream[:body]
            del stream[:body]


def token_settings(profile: Profile) -> dict:
    """What the token files depend on; a different value means they are rebuilt."""
    keys = ("model_name", "dataset_id", "dataset_revision", "dataset_split", "text_column", "n_texts",
            "mae_texts", "context_size", "truncate_documents", "offline_vocab_size")
    return {**{k: getattr(profile, k) for k in keys}, "seed": profile.seed, "split_rule": SPLIT_RULE}


def read_info(profile: Profile) -> dict | None:
    path = paths.tokens_dir(profile) / INFO
    return json.loads(path.read_text()) if path.is_file() else None


def build_tokens(profile: Profile, batch_docs: int = 256) -> dict:
    """Tokenize and pack both splits; reuse the files on disk when they match the profile."""
    info = read_info(profile)
    if info and info["settings"] == token_settings(profile) and all(
            (paths.tokens_dir(profile) / s).is_dir() for s in SPLITS):
        return {split: load_tokens(profile, split) for split in SPLITS}
    out = paths.tokens_dir(profile)
    building = out.with_name(out.name + ".building")  # sibling: the old tokens stay until this is complete
    shutil.rmtree(building, ignore_errors=True)  # leftovers of an earlier failed build
    building.mkdir(parents=True)
    try:
        info = _build_into(building, profile, batch_docs)
    except BaseException:  # a typo in dataset_id, a hub outage, Ctrl-C: the old tokens are kept
        shutil.rmtree(building, ignore_errors=True)
        raise
    (building / INFO).write_text(json.dumps(info, indent=2))  # written last: marks the build complete
    old = out.with_name(out.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():  # tokens of other settings (tokenizer included) are replaced only now
        os.replace(out, old)
    os.replace(building, out)
    shutil.rmtree(old, ignore_errors=True)
    return {split: load_tokens(profile, split) for split in SPLITS}


def _build_into(directory: Path, profile: Profile, batch_docs: int) -> dict:
    """Tokenizer (offline) and both splits written into directory; returns the info to record."""
    tokenizer = load_tokenizer(profile, directory)
    texts = split_texts(profile)
    info = {"settings": token_settings(profile), "profile": profile.name, "splits": {}}
    for split in SPLITS:
        info["splits"][split] = _write_split(profile, split, texts[split], tokenizer, batch_docs, directory / split)
    return info


def _write_split(profile: Profile, split: str, texts: list[str], tokenizer, batch_docs: int, target: Path) -> dict:
    import datasets

    lengths: list[int] = []  # tokens per document before truncation, for notebook 01's histogram

    def documents_ids() -> Iterator[list[int]]:
        for i in range(0, len(texts), batch_docs):
            for ids in tokenizer(texts[i:i + batch_docs], add_special_tokens=False)["input_ids"]:
                lengths.append(len(ids))
                yield ids

    eot_id = tokenizer.convert_tokens_to_ids(EOT)
    rows = list(pack(documents_ids(), profile.context_size, eot_id, profile.truncate_documents))
    if not rows:
        raise DataSourceError(f"split {split!r}: {len(texts)} documents make no full context of "
                              f"{profile.context_size} tokens; use more documents or a smaller context_size")
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
    bars_were_on = not datasets.are_progress_bars_disabled()  # a sub-second save: its bar is noise in notebook 01
    datasets.disable_progress_bars()
    try:
        datasets.Dataset.from_dict({"input_ids": rows}, features=features).save_to_disk(str(target))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    return {"documents": len(texts), "document_tokens": sum(lengths), "contexts": len(rows),
            "context_tokens": len(rows) * profile.context_size, "document_lengths": lengths}


def summary(profile: Profile):
    """One row per split: documents, their tokens, and the packed contexts (a pandas DataFrame)."""
    import pandas as pd

    info = read_info(profile) or {"splits": {}}
    rows = {split: {k: v for k, v in stats.items() if k != "document_lengths"}
            for split, stats in info["splits"].items()}
    return pd.DataFrame.from_dict(rows, orient="index")


def document_lengths(profile: Profile) -> dict[str, list[int]]:
    """Tokens per document (before truncation), per split, as counted when the tokens were built."""
    return {split: stats["document_lengths"] for split, stats in read_info(profile)["splits"].items()}


def load_tokens(profile: Profile, split: str = "train"):
    """The packed contexts of one split: a `datasets.Dataset` with column input_ids (context_size ints)."""
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    info = read_info(profile)
    if info is None or not (paths.tokens_dir(profile) / split).is_dir():
        raise FileNotFoundError(f"no token dataset at {paths.tokens_dir(profile)}; run notebook 01_data "
                                "(saelab.data.tokens.build_tokens(profile)) first")
    if info["settings"] != token_settings(profile):
        raise ValueError(f"the tokens at {paths.tokens_dir(profile)} were built with other settings "
                         f"{info['settings']}; rerun notebook 01_data to rebuild them for this profile")
    return datasets.load_from_disk(str(paths.tokens_dir(profile) / split))
