"""Binary token concepts a reader can check by eye, for sparse probing (notebook 06).

Each concept labels every token of a context True or False from the token strings alone (no model,
no annotator). Four strata, as in SAEBench's and Gurnee et al.'s (2023) probing tasks, from "one
vocabulary item" to "needs the context":

    token      the token IS one vocabulary string                   ' the', '.', '('
    class      the token belongs to a class of strings (a union)    digits, capitalised, keywords
    context    what precedes the token in its context decides       inside "..." / (...) / `...`, on a
                                                                     doctest line, right after ' the'
    next       the NEXT token of the context decides                 'print' in 'print(x)'

They are chosen to make sense both for GPT-2 on OpenWebText (prose, quotes, numbers) and for the
offline profile's BPE on Python docstrings (code words, calls, doctests). A single-token concept whose
string is not one token of the vocabulary has no positive and is skipped, with the reason, as is any
concept with fewer than `interp_min_positives` positives in a split (`concept_table`).

Context rules: "next" concepts are False at a context's last position (its next token is not in the
context); quotes and backticks are counted from the last line break or <|endoftext|>; parentheses
from the context's start. `concept_grid` is pure (strings and ids in, bools out); `store_labels` gives
each row of an activation store its concepts, by the row's (context, position).
"""

from __future__ import annotations

import keyword
import unicodedata

import pandas as pd
import torch

from saelab.data.tokens import load_tokens
from saelab.store import ActivationStore

STRATA = ("token", "class", "context", "next")
SINGLE_TOKENS = ("\n", ".", ",", ":", "(", ")", " (", "The", " the", " a", " an", " is", " are", " of", " to",
                 " in", " and", " or", " for", " be", " with", " that", " as", " by", " if", " from", " file",
                 " object")
CLASS_CONCEPTS: dict[str, str] = {  # name -> what makes a token positive, by its own string
    "digit": "the token is digits only, spaces stripped (' 2019', '3')",
    "space_prefix": "the token starts with a space (' the', ' (')",
    "capitalised": "its first character, spaces stripped, is an upper-case letter (' The', 'API')",
    "punctuation": "punctuation or symbols only, spaces stripped (',', ').', ' \"')",
    "newline": "the token contains a line break ('\\n', '.\\n\\n')",
    "python_keyword": "stripped, a Python keyword (' if', ' return', ' None'; in prose mostly and/or/in/is/for)",
    "word_start": "a space then a letter: a word's first piece (' the', ' Return')",
    "word_piece": "starts with a lower-case letter, no space: a word's later piece ('ing', 's')",
    "all_caps": "stripped, two or more letters, all upper case ('API', ' NULL')",
    "underscore": "contains '_' ('__', '_name')",
    "bracket": "contains a bracket ( ) [ ] { } ('(', '()', ' [')",
    "quote_mark": "contains a quote mark ' \" or ` (\"('\", ' `')",
    "long_word": "stripped, six or more letters and nothing else (' function', 'Decimal')",
    "inflection": "stripped, letters ending in -ing, -ed, -ly, -ion or -er ('ing', ' called', 'ation')",
    "operator": "stripped, operator characters only: = + - * / < > % & | ^ ~ ! ('=', ' ==', '-')",
}
PREVIOUS = {"the": " the", "a": " a", "of": " of", "to": " to", "is": " is", "comma": ",", "period": "."}
NEXT = {"period": ".", "comma": ",", "colon": ":", "the": " the", "of": " of", "is": " is", "to": " to",
        "and": " and"}
CONTEXT_CONCEPTS: dict[str, str] = {
    "in_quotes": "between double quotes on its line (an odd number of \" before it, none in it)",
    "in_backticks": "between backticks on its line (an odd number of ` before it, none in it)",
    "in_parens": "inside parentheses opened earlier in the context (more ( than ) before it, none in it)",
    "doctest_line": "on a doctest line: a '>>>' token earlier on its line",
    "after_def": "right after ' def' or ' class' (the name being defined, in code)",
    "line_start": "the first token of a line (the previous token holds a line break)",
    **{f"after_{name}": f"the previous token is {string!r}" for name, string in PREVIOUS.items()},
}
NEXT_CONCEPTS: dict[str, str] = {
    "before_paren": "the next token starts with '(' (a call, or an aside in prose)",
    "before_close_paren": "the next token starts with ')' (the end of an argument list or aside)",
    "before_newline": "the next token holds a line break (the last token of a line)",
    "before_digit": "the next token is digits only",
    "before_capitalised": "the next token is capitalised",
    **{f"before_{name}": f"the next token is {string!r}" for name, string in NEXT.items()},
}
CONCEPTS: dict[str, tuple[str, str]] = {  # name -> (stratum, what makes a token positive); the notebook prints this
    **{f"token {s!r}": ("token", f"the token is exactly {s!r}") for s in SINGLE_TOKENS},
    **{name: ("class", text) for name, text in CLASS_CONCEPTS.items()},
    **{name: ("context", text) for name, text in CONTEXT_CONCEPTS.items()},
    **{name: ("next", text) for name, text in NEXT_CONCEPTS.items()},
}
QUOTES = '"“”'  # straight and curly double quotes; each one flips inside/outside
RESETS = ("\n", "<|endoftext|>")  # a quotation never spans these
OPERATORS = set("=+-*/<>%&|^~!")


def _is_punctuation(text: str) -> bool:
    return bool(text) and all(unicodedata.category(ch)[0] in "PS" for ch in text)


def token_flags(strings: list[str]) -> dict[str, torch.Tensor]:
    """What a token is by itself: the class concepts and single tokens (name -> (vocab,) bool), plus the
    helpers `quotes`, `backticks`, `opens`, `closes` (vocab,) int64 and `reset`, `paren_start`,
    `close_start`, `doctest`, `def` (vocab,) bool."""
    stripped = [s.strip() for s in strings]
    letters = [t.isascii() and t.isalpha() for t in stripped]
    flags = {
        "digit": [t.isascii() and t.isdigit() for t in stripped],
        "space_prefix": [s.startswith(" ") for s in strings],
        "capitalised": [t[:1].isupper() for t in stripped],
        "punctuation": [_is_punctuation(t) for t in stripped],
        "newline": ["\n" in s for s in strings],
        "python_keyword": [keyword.iskeyword(t) for t in stripped],
        "word_start": [s[:1] == " " and s[1:2].isalpha() for s in strings],
        "word_piece": [s[:1].islower() for s in strings],
        "all_caps": [a and len(t) >= 2 and t.isupper() for a, t in zip(letters, stripped, strict=True)],
        "underscore": ["_" in s for s in strings],
        "bracket": [any(b in s for b in "()[]{}") for s in strings],
        "quote_mark": [any(q in s for q in "'\"`“”‘’") for s in strings],
        "long_word": [a and len(t) >= 6 for a, t in zip(letters, stripped, strict=True)],
        "inflection": [a and t.lower().endswith(("ing", "ed", "ly", "ion", "er"))
                       for a, t in zip(letters, stripped, strict=True)],
        "operator": [bool(t) and set(t) <= OPERATORS for t in stripped],
        "reset": [any(r in s for r in RESETS) for s in strings],
        "paren_start": [s.lstrip().startswith("(") for s in strings],
        "close_start": [s.lstrip().startswith(")") for s in strings],
        "doctest": [t == ">>>" for t in stripped],
        "def": [t in ("def", "class") and s.startswith(" ") for s, t in zip(strings, stripped, strict=True)],
    }
    flags.update({f"token {s!r}": [x == s for x in strings] for s in SINGLE_TOKENS})
    out = {name: torch.tensor(values, dtype=torch.bool) for name, values in flags.items()}
    for name, marks in (("quotes", QUOTES), ("backticks", "`"), ("opens", "("), ("closes", ")")):
        out[name] = torch.tensor([sum(s.count(m) for m in marks) for s in strings], dtype=torch.int64)
    return out


def _since_reset(counts: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """(n_ctx, pos) counts per token -> (n_ctx, pos) sum of the counts strictly between the last reset
    token before i and token i."""
    n_ctx, n_pos = counts.shape
    position = torch.arange(n_pos).expand(n_ctx, n_pos)
    last_reset = torch.where(reset, position, -1).cummax(dim=1).values  # last reset at or before i
    before = torch.cat([torch.full((n_ctx, 1), -1), last_reset[:, :-1]], dim=1)  # strictly before i
    seen = counts.cumsum(dim=1)  # counts in tokens 0..i
    at_reset = torch.where(before >= 0, seen.gather(1, before.clamp(min=0)), 0)  # counts up to that reset
    return seen - counts - at_reset


def inside_quotes(quotes: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    """(n_ctx, pos) quote counts and reset flags per token -> (n_ctx, pos) bool: an odd number of
    quotes since the last reset token precede this token, and it holds no quote and is no reset itself."""
    return (_since_reset(quotes, reset) % 2 == 1) & (quotes == 0) & ~reset


def inside_parens(opens: torch.Tensor, closes: torch.Tensor) -> torch.Tensor:
    """(n_ctx, pos) '(' and ')' counts per token -> bool: more '(' than ')' before it in the context,
    and it holds neither itself."""
    depth = (opens - closes).cumsum(dim=1) - (opens - closes)  # strictly before i
    return (depth > 0) & (opens == 0) & (closes == 0)


def _previous(flag: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(flag)
    out[:, 1:] = flag[:, :-1]
    return out


def _next(flag: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(flag)  # the last position has no next token here
    out[:, :-1] = flag[:, 1:]
    return out


def concept_grid(ids: torch.Tensor, strings: list[str]) -> torch.Tensor:
    """(n_ctx, pos) token ids and the vocabulary's strings -> (n_ctx, pos, len(CONCEPTS)) bool,
    concepts in CONCEPTS order."""
    if ids.numel() and int(ids.max()) >= len(strings):
        raise ValueError(f"token id {int(ids.max())} is outside the vocabulary of {len(strings)} strings; "
                         "decode the vocabulary of the tokenizer that made these ids")
    f = {name: value[ids] for name, value in token_flags(strings).items()}  # each (n_ctx, pos)
    columns = {name: f[name] for name in CONCEPTS if name in f}
    columns["in_quotes"] = inside_quotes(f["quotes"], f["reset"])
    columns["in_backticks"] = (_since_reset(f["backticks"], f["reset"]) % 2 == 1) & (f["backticks"] == 0) & ~f["reset"]
    columns["in_parens"] = inside_parens(f["opens"], f["closes"])
    columns["doctest_line"] = (_since_reset(f["doctest"].long(), f["reset"]) > 0) & ~f["reset"]
    columns["after_def"] = _previous(f["def"])
    columns["line_start"] = _previous(f["newline"])
    columns.update({f"after_{name}": _previous(f[f"token {s!r}"]) for name, s in PREVIOUS.items()})
    columns["before_paren"] = _next(f["paren_start"])
    columns["before_close_paren"] = _next(f["close_start"])
    columns["before_newline"] = _next(f["newline"])
    columns["before_digit"] = _next(f["digit"])
    columns["before_capitalised"] = _next(f["capitalised"])
    columns.update({f"before_{name}": _next(f[f"token {s!r}"]) for name, s in NEXT.items()})
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


def concept_table(labels: dict[str, torch.Tensor], min_positives: int = 1,
                  concepts: dict[str, tuple[str, str]] | None = None) -> pd.DataFrame:
    """Positives per concept and split (labels: split -> (rows, C) bool, e.g. "train" and "held_out");
    column `skipped` says why a concept cannot be scored (fewer than `min_positives` positives, or no
    negative, in a split), '' when it can. concepts: name -> (stratum, description), default CONCEPTS."""
    concepts = CONCEPTS if concepts is None else concepts
    table = pd.DataFrame({"stratum": [s for s, _ in concepts.values()],
                          "description": [d for _, d in concepts.values()]},
                         index=pd.Index(list(concepts), name="concept"))
    reasons = {concept: [] for concept in concepts}
    for split, y in labels.items():
        if y.shape[1] != len(concepts):
            raise ValueError(f"{y.shape[1]} label columns in the {split} split for {len(concepts)} concepts")
        positives = y.sum(0).tolist()
        table[f"{split}_positives"] = positives
        table[f"{split}_share"] = [n / max(len(y), 1) for n in positives]
        for concept, n in zip(concepts, positives, strict=True):
            if n < min_positives:
                reasons[concept].append(f"{n} positive tokens in the {split} split (fewer than {min_positives})"
                                        if n else f"no positive token in the {split} split (0 of {len(y):,})")
            elif n == len(y):
                reasons[concept].append(f"no negative token in the {split} split (all {len(y):,} positive)")
    table["skipped"] = ["; ".join(r) for r in reasons.values()]
    return table
