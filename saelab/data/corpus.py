"""Where documents come from: the hub (streamed), a local file, or the offline corpus.

`iter_documents(profile)` yields document texts in a fixed order; `saelab.data.tokens` takes the
first `n_texts + mae_texts` of them. Every failure to reach a source becomes a
`DataSourceError` that names the alternatives, because the usual cause is a machine that
cannot reach the Hugging Face hub. Floor 2 (imports only config): `data` builds on it.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from saelab.config import EOT, OFFLINE_CORPUS, Profile

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
MIN_DOC_CHARS = 200  # offline corpus: shorter docstrings say too little to be a "document"
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


class DataSourceError(RuntimeError):
    """The text source cannot be read; the message lists what to use instead."""


def alternatives(profile: Profile) -> str:
    return ("Alternatives: (1) a local file in dataset_id, e.g. "
            "saelab.load_profile('gpt2', dataset_id='/data/owt.jsonl') (.jsonl/.json/.parquet with a "
            f"{profile.text_column!r} column, or .txt with one document per line); (2) another hub "
            "dataset without a loading script: dataset_id='user/name' (and dataset_revision=None for "
            "datasets already in parquet); (3) no network at all: SAELAB_PROFILE=offline (a random-weight "
            "model on a corpus built from installed docs).")


def iter_documents(profile: Profile) -> Iterator[str]:
    """Non-empty document texts of the profile's source, in the source's order."""
    if profile.dataset_id == OFFLINE_CORPUS:
        yield from installed_docstrings()
        return
    rows = _open_source(profile)
    try:
        for row in rows:
            if profile.text_column not in row:
                raise DataSourceError(f"{profile.dataset_id} has no column {profile.text_column!r} "
                                      f"(columns: {sorted(row)}); set text_column in the profile")
            text = row[profile.text_column].replace(EOT, " ")  # EOT is reserved as the separator
            if text.strip():
                yield text
    except DataSourceError:
        raise
    except Exception as err:  # streaming reads lazily: network errors surface here, not at load
        raise DataSourceError(f"reading {profile.dataset_id!r} failed ({type(err).__name__}: {err}). "
                              + alternatives(profile)) from err


def _open_source(profile: Profile):
    """A streamed `datasets.IterableDataset`: nothing is downloaded beyond what is read."""
    import datasets

    path = Path(profile.dataset_id).expanduser()
    local = path.suffix in LOCAL_FORMATS or path.exists()
    try:
        if local:
            if not path.exists():
                raise DataSourceError(f"local dataset {path} does not exist; check the path in dataset_id "
                                      "(absolute, or relative to the notebook's folder). " + alternatives(profile))
            if not path.is_file() or path.suffix not in LOCAL_FORMATS:
                raise DataSourceError(f"local dataset {path} is not a file ending in one of "
                                      f"{sorted(LOCAL_FORMATS)}. " + alternatives(profile))
            return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train",
                                         streaming=True)
        return datasets.load_dataset(profile.dataset_id, revision=profile.dataset_revision,
                                     split=profile.dataset_split, streaming=True)
    except DataSourceError:
        raise
    except Exception as err:
        raise DataSourceError(f"cannot load {profile.dataset_id!r} (revision {profile.dataset_revision!r}, "
                              f"split {profile.dataset_split!r}) from the Hugging Face hub: "
                              f"{type(err).__name__}: {err}. " + alternatives(profile)) from err


def installed_docstrings(root: str | None = None) -> Iterator[str]:
    """Docstrings of the Python standard library, read with `ast` (nothing is imported).

    A sorted walk, so the order is the same on every run of the same Python; tests excluded.
    """
    root = root or sysconfig.get_paths()["stdlib"]
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            try:
                tree = ast.parse(Path(dirpath, name).read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
                continue  # a few stdlib files are deliberately invalid (lib2to3 fixtures)
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= MIN_DOC_CHARS:
                        yield doc.replace(EOT, " ")
