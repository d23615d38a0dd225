"""Binary token concepts a reader can check by eye, for 1-sparse probing (notebook 06).

Each concept labels every token of a context True or False from the token strings alone (no model,
no annotator). They are chosen to make sense both for GPT-2 on OpenWebText (prose, quotes, numbers)
and for the offline profile's BPE on Python docstrings (code words, calls, literals):

    digit           the token, stripped of spaces, is digits only       ' 2019', '3'
    space_prefix    the token starts with a space                        ' the', ' ('
    capitalised     its first character, spaces stripped, is upper case  ' The', 'API'
    punctuation     it is punctuation or symbols only, spaces stripped   ',', ').', ' "'
    newline         it contains a line break                             '\\n', '.\\n\\n'
    python_keyword  stripped, it is a Python keyword                     ' if', ' return', ' None'
    before_paren    the NEXT token of the context starts with '('        'print' in 'print(x)'
    in_quotes       an odd number of double quotes precede it on its line, and it holds none itself
                    (the words between "...", not the quote marks nor the line break)

`before_paren` is False at a context's last position (its next token is not in the context);
`in_quotes` counts quotes from the last line break or <|endoftext|>, so a context that starts inside
a quotation is read as outside it. `concept_grid` is pure (strings and ids in, bools out);
`store_labels` gives each row of an activation store its concepts, by the row's (context, position).
"""

from __future__ import annotations

import keyword
import unicodedata

import pandas as pd
import torch

from saelab.data.tokens import load_tokens
from saelab.store import ActivationStore

CONCEPTS: dict[str, str] = {  # name -> what makes a token positive (the notebook prints this table)
    "digit": "the token is digits only, spaces stripped (' 2019', '3')",
    "space_prefix": "the token starts with a space (' the', ' (')",
    "capitalised": "its first character, spaces stripped, is an upper-case letter (' The', 'API')",
    "punctuation": "punctuation or symbols only, spaces stripped (',', ').', ' \"')",
    "newline": "the token contains a line break",
    "python_keyword": "stripped, a Python keyword (' if', ' return', ' None'; in prose mostly and/or/in/is/for)",
    "before_paren": "the next token of the context starts with '(' (a call, or an aside in prose)",
    "in_quotes": "between double quotes on its line (an odd number of \" before it, none in it)",
}
QUOTES = '"“”'  # straight and curly double quotes; each one flips inside/outside
RESETS = ("\n", "<|endoftext|>")  # a quotation never spans these


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch)[0] in "PS" for ch in text)


def token_flags(strings: list[str]) -> dict[str, torch.Tensor]:
    """The concepts a token carries by itself: name -> (vocab,) bool, plus the helpers
    `quotes` (vocab,) int (double quotes in the token), `reset` and `paren_start` (vocab,) bool."""
    stripped = [s.strip() for s in strings]
    flags = {
        "digit": [t.isascii() and t.isdigit() for t in stripped],
        "space_prefix": [s.startswith(" ") for s in strings],
        "capitalised": [t[:1].isupper() for t in stripped],
        "punctuation": [_is_punctuation(t) for t in stripped],
        "newline": ["\n" in s for s in strings],
        "python_keyword": [keyword.iskeyword(t) for t in stripped],
        "reset": [any(r in s for r in RESETS) for s in strings],
        "paren_start": [s.lstrip().startswith("(") for s in strings],
    }
    out = {name: torch.tensor(values, dtype=torch.bool) for name, values in flags.items()}
    out["quotes"] = torch.tensor([sum(s.count(q) for q in QUOTES) for s in strings], dtype=torch.int64)
    return out


def inside_quotes(quotes: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """(n_ctx, pos) quote counts and reset flags per token -> (n_ctx, pos) bool: an odd number of
    quotes since the last reset token precede this token, and it holds no quote and is no reset itself."""
    n_ctx, n_pos = quotes.shape
    position = torch.arange(n_pos).expand(n_ctx, n_pos)
    last_reset = torch.where(reset, position, -1).cummax(dim=1).values  # last reset at or before i
    before = torch.cat([torch.full((n_ctx, 1), -1), last_reset[:, :-1]], dim=1)  # strictly before i
    seen = quotes.cumsum(dim=1)  # quotes in tokens 0..i
    at_reset = torch.where(before >= 0, seen.gather(1, before.clamp(min=0)), 0)  # quotes up to that reset
    count = seen - quotes - at_reset  # quotes strictly between the last reset and token i
    return (count % 2 == 1) & (quotes == 0) & ~reset


def concept_grid(ids: torch.Tensor, strings: list[str]) -> torch.Tensor:
    """(n_ctx, pos) token ids and the vocabulary's strings -> (n_ctx, pos, len(CONCEPTS)) bool,
    concepts in CONCEPTS order."""
    if ids.numel() and int(ids.max()) >= len(strings):
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {len(strings)} strings; "
                         "decode the vocabulary of the tokenizer that made these ids")
    flags = token_flags(strings)
    next_paren = torch.zeros(ids.shape, dtype=torch.bool)
    next_paren[:, :-1] = flags["paren_start"][ids[:, 1:]]  # the last position has no next token here
    columns = {name: flags[name][ids] for name in CONCEPTS if name in flags}
    columns["before_paren"] = next_paren
    columns["in_quotes"] = inside_quotes(flags["quotes"][ids], flags["reset"][ids])
    return torch.stack([columns[name] for name in CONCEPTS], dim=-1)


def vocab_strings(tokenizer) -> list[str]:
    """Each token id's text, decoded on its own (the strings the concepts read)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def context_ids(profile, split: str) -> torch.Tensor:
    """(n_ctx, context_size) token ids of one split, as notebook 01 packed them."""
    return torch.tensor(load_tokens(profile, split)["input_ids"], dtype=torch.int64)


def store_labels(store: ActivationStore, ids: torch.Tensor, strings: list[str]) -> torch.Tensor:
    """(rows, len(CONCEPTS)) bool: each store row's concepts, looked up by its (context, position)."""
    index = store.index()
    if len(index["context"]) and int(index["context"].max()) >= len(ids):
        raise ValueError(f"the store at {store.directory} refers to context {int(index['context'].max())} but the "
                         f"tokens hold {len(ids)}; rerun notebook 02 for these tokens")
    if not torch.equal(ids[index["context"], index["position"]], index["token_id"]):
        raise ValueError(f"the token ids in {store.directory} differ from the token contexts; the store was "
                         "captured from other tokens: delete it and rerun notebook 02")
    return concept_grid(ids, strings)[index["context"], index["position"]]


def concept_table(labels: dict[str, torch.Tensor]) -> pd.DataFrame:
    """Positives per concept and split (labels: split -> (rows, C) bool); column `skipped` says why a
    concept cannot be scored (no positive or no negative token in a split), '' when it can."""
    table = pd.DataFrame({"description": CONCEPTS.values()}, index=pd.Index(list(CONCEPTS), name="concept"))
    reasons = {concept: [] for concept in CONCEPTS}
    for split, y in labels.items():
        positives = y.sum(0).tolist()
        table[f"{split}_positives"] = positives
        table[f"{split}_share"] = [n / max(len(y), 1) for n in positives]
        for concept, n in zip(CONCEPTS, positives, strict=True):
            if n == 0:
                reasons[concept].append(f"no positive token in the {split} split (0 of {len(y):,})")
            elif n == len(y):
                reasons[concept].append(f"no negative token in the {split} split (all {len(y):,} positive)")
    table["skipped"] = ["; ".join(r) for r in reasons.values()]
    return table
