"""`make workbook`: execute the notebooks in order, headless, in one profile.

    python -m saelab.workbook notebooks/01_data.ipynb notebooks/02_activations.ipynb ...

The profile is resolved once (SAELAB_PROFILE: a name or a profile JSON file; else auto-detection),
written to runs/<profile>/profile.json and passed to every kernel through SAELAB_PROFILE, so all
notebooks of a run agree, overrides included. Executed copies are written to
runs/<profile>/notebooks; the committed notebooks stay without outputs. Stream outputs are
coalesced, so a text progress bar is saved as its final line, not as every update. The run ends
by saying where the figures went and whether PNGs were made (`figures_summary`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from saelab import paths
from saelab.config import load_profile
from saelab.plots import FIGURES_LOG, png_hint


def run_notebooks(notebooks: list[Path], timeout_s: int = 24 * 3600) -> Path:
    """Execute `notebooks` in order in the resolved profile; returns the folder of executed copies.
    A failing notebook raises (its executed copy, with the error, is kept); the figure summary is
    printed either way."""
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
    (paths.run_dir(profile) / FIGURES_LOG).unlink(missing_ok=True)  # the summary covers this run only
    try:
        for notebook in notebooks:
            started = time.perf_counter()
            print(f"running {notebook} ...", flush=True)
            nb = nbformat.read(notebook, as_version=4)
            executor = ExecutePreprocessor(timeout=timeout_s, kernel_name="python3", coalesce_streams=True)
            try:
                executor.preprocess(nb, {"metadata": {"path": str(Path(notebook).parent)}})
            finally:  # keep the executed copy, errors included, for reading what went wrong
                nbformat.write(nb, out_dir / Path(notebook).name)
            print(f"  done in {time.perf_counter() - started:.0f} s -> {out_dir / Path(notebook).name}", flush=True)
    finally:
        print(figures_summary(profile), flush=True)
    return out_dir


def figures_summary(profile) -> str:
    """Where this run's figures went and whether PNGs were made, from runs/<profile>/figures.log
    (one JSON line per file `plots.save_figure` / `save_html` / the dashboards wrote or kept)."""
    log = paths.run_dir(profile) / FIGURES_LOG
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    if not entries:
        return f"figures: none written this run (they go to {paths.figures_dir(profile)})"
    latest = {e["file"]: e for e in entries}  # a figure saved twice counts once, as last saved
    html = Counter(e["html"] for e in latest.values())
    lines = [f"figures: {len(latest)} HTML files in {paths.figures_dir(profile)} ({html['written']} written, "
             f"{html['kept']} unchanged up to float noise)"]
    plotly = [e for e in latest.values() if e.get("png") != "-"]
    if plotly:
        png = Counter(e["png"] for e in plotly)
        without = [e for e in plotly if e["png"] in ("none", "removed stale")]
        lines.append(f"PNGs: {png['written']} written, {png['kept']} kept, {len(without)} figures without one"
                     + (f" ({png['removed stale']} stale PNGs removed)" if png["removed stale"] else ""))
        reasons = sorted({e["reason"] for e in without if e.get("reason")})
        if reasons:
            lines.append(f"  no PNG because {'; '.join(reasons)}. {png_hint()}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("no notebooks given; nothing to run")
    else:
        run_notebooks([Path(p) for p in sys.argv[1:]])
