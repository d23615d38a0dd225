"""Where each stage reads and writes, all derived from one root.

nbmake runs a notebook from its own folder, so notebooks never build paths with `../`:
they ask this module. The root is `$SAELAB_ROOT` when set, else the checkout saelab was
installed from (editable install), else the current directory.

    <root>/runs/<profile>/tokens/        token dataset (Arrow, notebook 01)
    <root>/runs/<profile>/lm/<name>/     offline profile: the LM saelab trained (notebook 02)
    <root>/runs/<profile>/activations/   activation store (notebook 02)
    <root>/runs/<profile>/sae/<name>/    SAE checkpoints and history (notebook 03)
    <root>/figures/<profile>/            figures to share (committed for `offline`)
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def _profile_name(profile) -> str:
    return profile if isinstance(profile, str) else profile.name


def root() -> Path:
    if os.environ.get("SAELAB_ROOT"):
        return Path(os.environ["SAELAB_ROOT"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "notebooks").is_dir():
        return checkout
    return Path.cwd()


def run_dir(profile) -> Path:
    return root() / "runs" / _profile_name(profile)


def tokens_dir(profile) -> Path:
    return run_dir(profile) / "tokens"


def lm_dir(profile, name: str) -> Path:
    """A language model saelab trained (offline profile); name encodes its settings (saelab.data.offline_lm)."""
    return run_dir(profile) / "lm" / name


def store_dir(profile, split: str = "train") -> Path:
    """Activation store; split "train" feeds the SAE, "mae" holds the held-out MAE texts."""
    return run_dir(profile) / "activations" / split


def sae_dir(profile, name: str = "sae") -> Path:
    return run_dir(profile) / "sae" / name


def figures_dir(profile) -> Path:
    return root() / "figures" / _profile_name(profile)


def executed_notebooks_dir(profile) -> Path:
    return run_dir(profile) / "notebooks"


def replace_atomically(path: Path, write) -> Path:
    """`write(tmp)` then rename tmp over `path`: a kill leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_json_atomically(path: Path, payload, indent: int | None = 2) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=indent)))
