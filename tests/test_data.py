import json

import pandas as pd
import pytest
from tiny import TINY, tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab import paths
from saelab.config import EOT, GPT2
from saelab.data import tokens
from saelab.data.corpus import DataSourceError, installed_docstrings, iter_documents

DOCS = ["alpha beta gamma", "delta", "  ", "epsilon zeta eta theta iota kappa"]


@pytest.fixture
def no_hub(monkeypatch):
    """Nothing may try the network: the hub libraries' offline switches, read at import, forced on."""
    import datasets
    import huggingface_hub

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_pack_by_hand():
    rows = list(tokens.pack([[1, 2, 3], [4], [5, 6, 7, 8, 9]], context_size=4, eot_id=0, truncate=False))
    # stream 1 2 3 0 4 0 5 6 7 8 9 0 -> bodies of 3 with BOS 0 in front; the tail "" is dropped
    assert rows == [[0, 1, 2, 3], [0, 0, 4, 0], [0, 5, 6, 7], [0, 8, 9, 0]]


def test_pack_truncates_each_document_to_one_context_body():
    rows = list(tokens.pack([[1, 2, 3, 4, 5], [6, 7, 8, 9]], context_size=4, eot_id=0, truncate=True))
    assert rows == [[0, 1, 2, 3], [0, 0, 6, 7]]  # "8 0" is a partial row: dropped, never padded


def test_packed_rows_are_full_and_hold_only_text_and_eot(tiny):
    tokenizer = tokens.load_tokenizer(tiny)
    eot = tokenizer.convert_tokens_to_ids(EOT)
    for split in tokens.SPLITS:
        rows = tokens.load_tokens(tiny, split)["input_ids"]
        assert rows and all(len(r) == tiny.context_size and r[0] == eot for r in rows)
        assert tokenizer.pad_token_id is None or all(tokenizer.pad_token_id not in r for r in rows)
        assert max(max(r) for r in rows) < len(tokenizer) <= tiny.offline_vocab_size


def test_train_and_mae_use_disjoint_documents(tiny):
    documents = [d for _, d in zip(range(32), iter_documents(tiny), strict=False)]
    info = tokens.read_info(tiny)["splits"]
    assert (info["train"]["documents"], info["mae"]["documents"]) == (24, 8)
    split = tokens.split_documents(tiny)
    assert sorted(split["train"] + split["mae"]) == list(range(32)) and not set(split["train"]) & set(split["mae"])
    tokenizer = tokens.load_tokenizer(tiny)
    first_mae = tokenizer.decode(tokens.load_tokens(tiny, "mae")[0]["input_ids"][1:6])
    assert documents[split["mae"][0]].startswith(first_mae) and not documents[split["train"][0]].startswith(first_mae)


def test_held_out_documents_are_a_seeded_draw_not_a_block(tiny):
    """A fifth of the documents, drawn with the profile's seed: spread over the source, the same each run."""
    profile = tiny.replace(n_texts=400, mae_texts=100)
    held = tokens.split_documents(profile)["mae"]
    assert len(held) == 100 and held == tokens.split_documents(profile)["mae"]
    assert max(held) - min(held) > 300 and max(b - a for a, b in zip(held, held[1:], strict=False)) < 50
    assert sum(i < 250 for i in held) in range(35, 66)  # both halves of the source hold some: not one block
    assert tokens.split_documents(profile.replace(seed=1))["mae"] != held


def test_rebuild_is_skipped_when_settings_match(tiny, monkeypatch):
    monkeypatch.setattr(tokens, "iter_documents", lambda p: pytest.fail("rebuilt instead of reusing"))
    assert len(tokens.build_tokens(tiny)["train"]) == len(tokens.load_tokens(tiny))


def test_tokens_of_other_settings_are_refused_by_the_reader(tiny):
    with pytest.raises(ValueError, match="other settings.*rerun notebook 01_data"):
        tokens.load_tokens(tiny.replace(context_size=32))


def test_missing_tokens_say_run_notebook_01():
    with pytest.raises(FileNotFoundError, match="run notebook 01_data"):
        tokens.load_tokens(TINY)


def test_offline_corpus_is_deterministic():
    first = [d for _, d in zip(range(5), installed_docstrings(), strict=False)]
    assert first == [d for _, d in zip(range(5), installed_docstrings(), strict=False)]
    assert all(len(d) >= 200 and EOT not in d for d in first)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_local_files_are_read_in_order_without_empty_documents(tmp_path, suffix, no_hub):
    path = tmp_path / f"docs{suffix}"
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    elif suffix == ".parquet":
        pd.DataFrame({"text": DOCS}).to_parquet(path)
    else:
        path.write_text("\n".join(DOCS) + "\n")
    assert list(iter_documents(GPT2.replace(dataset_id=str(path)))) == [d for d in DOCS if d.strip()]


def test_local_file_builds_tokens_end_to_end(tmp_path, no_hub):
    path = tmp_path / "docs.jsonl"
    docs = [f"document number {i} says " + "words and more words " * (i + 3) for i in range(12)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    profile = TINY.replace(dataset_id=str(path), n_texts=9, mae_texts=3)  # offline model, local texts
    splits = tokens.build_tokens(profile)
    assert tokens.read_info(profile)["splits"]["mae"]["documents"] == 3 and len(splits["mae"]) >= 1


def test_missing_text_column_names_the_columns(tmp_path, no_hub):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(DataSourceError, match=r"no column 'text' \(columns: \['content'\]\).*text_column"):
        next(iter_documents(GPT2.replace(dataset_id=str(path))))


def test_missing_local_file_says_it_does_not_exist(tmp_path):
    with pytest.raises(DataSourceError, match="missing.jsonl does not exist; check the path.*SAELAB_PROFILE=offline"):
        next(iter_documents(GPT2.replace(dataset_id=str(tmp_path / "missing.jsonl"))))


def test_local_path_of_unknown_format_names_the_formats(tmp_path):
    (tmp_path / "docs.csv").mkdir()  # exists, but is a folder
    with pytest.raises(DataSourceError, match=r"not a file ending in one of \[.*SAELAB_PROFILE=offline"):
        next(iter_documents(GPT2.replace(dataset_id=str(tmp_path / "docs.csv"))))


def test_hub_without_network_names_the_alternatives(no_hub):
    with pytest.raises(DataSourceError, match="(?s)Skylion007/openwebtext.*local file.*another hub dataset.*"
                                              "SAELAB_PROFILE=offline"):
        next(iter_documents(GPT2))


def test_gpt2_tokenizer_without_network_says_use_offline(no_hub):
    with pytest.raises(DataSourceError, match="(?s)'gpt2' tokenizer.*SAELAB_PROFILE=offline"):
        tokens.load_tokenizer(GPT2)


def test_too_few_documents_is_a_clear_error(tmp_path, no_hub):
    path = tmp_path / "docs.txt"
    path.write_text("one document only, long enough\n")
    with pytest.raises(DataSourceError, match="gave only 1 documents.*lower n_texts"):
        tokens.build_tokens(TINY.replace(dataset_id=str(path), n_texts=5))
    assert not (paths.tokens_dir(TINY) / tokens.INFO).exists()


def test_failed_rebuild_keeps_the_old_tokens(tiny, tmp_path, no_hub):
    """A typo in dataset_id (or a hub outage) must not delete tokens already built, tokenizer included."""
    before = tokens.load_tokens(tiny, "train")["input_ids"]
    with pytest.raises(DataSourceError, match="does not exist"):
        tokens.build_tokens(tiny.replace(dataset_id=str(tmp_path / "typo.jsonl")))
    assert tokens.load_tokens(tiny, "train")["input_ids"] == before
    assert (paths.tokens_dir(tiny) / tokens.TOKENIZER / "tokenizer.json").is_file()
    assert not paths.tokens_dir(tiny).with_name("tokens.building").exists()


def test_rebuild_with_other_settings_replaces_the_old_tokens(tiny):
    rebuilt = tokens.build_tokens(tiny.replace(context_size=32))
    assert len(rebuilt["train"][0]["input_ids"]) == 32 and tokens.read_info(tiny)["settings"]["context_size"] == 32
    assert sorted(p.name for p in paths.tokens_dir(tiny).parent.iterdir()) == ["tokens"]
