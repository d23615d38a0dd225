"""`make workbook`: execute the notebooks in order, headless, in one profile.

    python -m saelab.workbook notebooks/01_data.ipynb notebooks/02_activations.ipynb ...

The profile is resolved once (SAELAB_PROFILE: a name or a profile JSON file; else auto-detection),
written to runs/<profile>/profile.json and passed to every kernel through SAELAB_PROFILE, so all
notebooks of a run agree, overrides included. Executed copies are written to
runs/<profile>/notebooks; the committed notebooks stay without outputs.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from saelab import paths
from saelab.config import load_profile


def run_notebooks(notebooks: list[Path], timeout_s: int = 24 * 3600) -> Path:
    import nbformat
    from nbconvert.preprocessors import ExecutePreprocessor

    profile = load_profile()
    print(profile.banner(), flush=True)
    out_dir = paths.executed_notebooks_dir(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Kernels get the resolved profile as a JSON file (absolute path: nbmake and nbconvert run each
    # notebook from its own folder), so overrides from a profile JSON reach every notebook.
    resolved = paths.run_dir(profile) / "profile.json"
    resolved.write_text(profile.to_json())
    os.environ["SAELAB_PROFILE"] = str(resolved)
    for notebook in notebooks:
        started = time.perf_counter()
        print(f"running {notebook} ...", flush=True)
        nb = nbformat.read(notebook, as_version=4)
        executor = ExecutePreprocessor(timeout=timeout_s, kernel_name="python3")
        try:
            executor.preprocess(nb, {"metadata": {"path": str(Path(notebook).parent)}})
        finally:  # keep the executed copy, errors included, for reading what went wrong
            nbformat.write(nb, out_dir / Path(notebook).name)
        print(f"  done in {time.perf_counter() - started:.0f} s -> {out_dir / Path(notebook).name}", flush=True)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("no notebooks given; nothing to run")
    else:
        run_notebooks([Path(p) for p in sys.argv[1:]])
