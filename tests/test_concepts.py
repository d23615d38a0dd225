"""Token concepts on hand-written tokens, and store rows labelled by (context, position)."""

import pytest
import torch
from planted import write_store

from saelab.studies.concepts import (
    CONCEPTS,
    concept_grid,
    concept_table,
    inside_quotes,
    store_labels,
    token_flags,
    vocab_strings,
)

VOCAB = ["<|endoftext|>", " the", "The", " 42", "7", ",", "\n", " if", "(", " (", "x", '"', ' "', "API", " return",
         ").", "foo", "“", "”", "ifx", " None", "é"]
ID = {s: i for i, s in enumerate(VOCAB)}


def column(name: str) -> int:
    return list(CONCEPTS).index(name)


@pytest.mark.parametrize("name, positives", [
    ("digit", {" 42", "7"}),
    ("space_prefix", {" the", " 42", " if", " (", ' "', " return", " None"}),
    ("capitalised", {"The", "API", " None"}),
    ("punctuation", {",", "(", " (", '"', ' "', ").", "“", "”"}),
    ("newline", {"\n"}),
    ("python_keyword", {" if", " return", " None"}),  # "ifx" is not a keyword, " the" is not one
])
def test_token_level_concepts(name, positives):
    flags = token_flags(VOCAB)[name]
    assert {s for s, flag in zip(VOCAB, flags.tolist(), strict=True) if flag} == positives


def grid_of(tokens: list[str]) -> torch.Tensor:
    return concept_grid(torch.tensor([[ID[t] for t in tokens]]), VOCAB)[0]  # (pos, C)


def test_before_paren_looks_at_the_next_token_in_the_context():
    g = grid_of(["<|endoftext|>", "foo", "(", "x", ").", " if", " (", "x", "foo"])
    assert g[:, column("before_paren")].tolist() == [False, True, False, False, False, True, False, False, False]
    assert not grid_of(["x", "foo"])[-1, column("before_paren")]  # the last position has no next token


def test_in_quotes_counts_double_quotes_since_the_last_line_break():
    tokens = ["<|endoftext|>", "foo", '"', "x", ' "', "x", "\n", "x", '"', "The", "\n", "The",
              "“", " the", "”", "x", '"', "<|endoftext|>", "x"]
    inside = [t for t, flag in zip(tokens, grid_of(tokens)[:, column("in_quotes")].tolist(), strict=True) if flag]
    positions = [i for i, flag in enumerate(grid_of(tokens)[:, column("in_quotes")].tolist()) if flag]
    # 'x' after the opening quote; 'The' after a quote left open on its line; ' the' inside curly quotes.
    # Quote marks themselves, text after a closing quote, after a line break or <|endoftext|>: outside.
    assert positions == [3, 9, 13] and inside == ["x", "The", " the"]


def test_inside_quotes_by_counts():
    quotes = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 0]])
    reset = torch.tensor([[False, False, False, True, False, False, False, False]])
    # positions 1-2 open a quote that the reset at 3 ends; 4 opens again, 6 closes it
    assert inside_quotes(quotes, reset).tolist() == [[False, False, True, False, False, True, False, False]]


def test_grid_shape_and_out_of_vocabulary_ids():
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    assert concept_grid(ids, VOCAB).shape == (2, 3, len(CONCEPTS))
    with pytest.raises(ValueError, match="outside the vocabulary of 22"):
        concept_grid(torch.tensor([[0, 22]]), VOCAB)


def test_vocab_strings_decode_each_id_alone():
    class Tokenizer:
        def __len__(self):
            return 3

        def batch_decode(self, batches):
            return ["abc"[ids[0]] for ids in batches]

    assert vocab_strings(Tokenizer()) == ["a", "b", "c"]


def test_store_rows_get_the_labels_of_their_context_and_position(tmp_path):
    ids = torch.randint(0, len(VOCAB), (4, 6))  # 4 contexts of 6 tokens; the store skips position 0
    rows = torch.arange(20)
    context, position = rows // 5, rows % 5 + 1
    store = write_store(tmp_path / "s", torch.randn(20, 3), ids[context, position], shard_rows=8)
    labels = store_labels(store, ids, VOCAB)
    assert torch.equal(labels, concept_grid(ids, VOCAB)[context, position])
    other = ids.clone()
    other[2, 3] = (other[2, 3] + 1) % len(VOCAB)
    with pytest.raises(ValueError, match="differ from the token contexts"):
        store_labels(store, other, VOCAB)
    with pytest.raises(ValueError, match="refers to context 3 but the tokens hold 2"):
        store_labels(store, ids[:2], VOCAB)


def test_concept_table_counts_positives_and_says_why_a_concept_is_skipped():
    train = torch.zeros(10, len(CONCEPTS), dtype=torch.bool)
    train[:3] = True
    held_out = train[:4].clone()
    held_out[:, column("digit")] = False  # no positive digit in the held-out split
    held_out[:, column("newline")] = True  # and no negative newline
    table = concept_table({"train": train, "mae": held_out})
    assert table["train_positives"].tolist() == [3] * len(CONCEPTS)
    assert table.at["digit", "skipped"] == "no positive token in the mae split (0 of 4)"
    assert table.at["newline", "skipped"] == "no negative token in the mae split (all 4 positive)"
    assert (table.drop(index=["digit", "newline"])["skipped"] == "").all()


CODE = ["<|endoftext|>", ">>>", " f", "(", "x", ")", "\n", " def", " name", "`", "a", " the", " ", "()", ".", " of"]


def code_grid(tokens: list[str]) -> dict[str, list[bool]]:
    ids = torch.tensor([[CODE.index(t) for t in tokens]])
    grid = concept_grid(ids, CODE)[0]
    return {name: grid[:, i].tolist() for i, name in enumerate(CONCEPTS)}


def positions(flags: list[bool]) -> list[int]:
    return [i for i, flag in enumerate(flags) if flag]


def test_context_concepts_read_what_precedes_the_token():
    tokens = ["<|endoftext|>", ">>>", " f", "(", "x", "(", "x", ")", "a", ")", "\n", " def", " name", "`", "a", "`",
              " the", "x", "\n", "a"]
    g = code_grid(tokens)
    assert positions(g["in_parens"]) == [4, 6, 8]  # depth counted from the context's start; parens themselves out
    assert positions(g["doctest_line"]) == [2, 3, 4, 5, 6, 7, 8, 9]  # after '>>>' until the line break
    assert positions(g["in_backticks"]) == [14]
    assert positions(g["after_def"]) == [12]
    assert positions(g["line_start"]) == [11, 19]
    assert positions(g["after_the"]) == [17]


def test_next_and_single_token_concepts():
    tokens = ["x", " of", " the", "x", ".", "\n", "x", "()", "x"]
    g = code_grid(tokens)
    assert positions(g["before_newline"]) == [4] and positions(g["before_the"]) == [1]
    assert positions(g["before_paren"]) == [6] and positions(g["before_period"]) == [3]
    assert positions(g["token ' the'"]) == [2] and positions(g["token '.'"]) == [4]
    assert positions(g["after_of"]) == [2] and not g["before_paren"][-1]  # the last token has no next here


def test_every_concept_has_one_of_the_four_strata():
    strata = {stratum for stratum, _ in CONCEPTS.values()}
    assert strata == {"token", "class", "context", "next"}
    assert len(CONCEPTS) >= 40 and all(sum(s == stratum for s, _ in CONCEPTS.values()) >= 8 for stratum in strata)


def test_too_few_positives_are_skipped_with_the_count():
    held_out = torch.zeros(100, len(CONCEPTS), dtype=torch.bool)
    held_out[:60] = True
    held_out[:, column("digit")] = False
    held_out[:7, column("digit")] = True
    table = concept_table({"held_out": held_out}, min_positives=50)
    assert table.at["digit", "skipped"] == "7 positive tokens in the held_out split (fewer than 50)"
    assert table.at["newline", "skipped"] == "" and table.at["newline", "stratum"] == "class"
