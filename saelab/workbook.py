"""`make workbook`: execute the notebooks in order, headless, in one profile.

    python -m saelab.workbook notebooks/01_data.ipynb notebooks/02_activations.ipynb ...

The profile is resolved once (SAELAB_PROFILE: a name or a profile JSON file; else auto-detection),
written to runs/<profile>/profile.json and passed to every kernel through SAELAB_PROFILE, so all
notebooks of a run agree, overrides included. Executed copies are written to
runs/<profile>/notebooks; the committed notebooks stay without outputs. Stream outputs are
coalesced, so a text progress bar is saved as its final line, not as every update. Each executed
notebook is also written as one self-contained HTML page to share (nbconvert; plotly figures carry
plotly.js, rendered by plotly's "notebook" renderer, so they show outside JupyterLab too). A failing
notebook stops the run with one line (notebook, cell, error) and its traceback in a log beside it.
The run ends by saying where the figures went and whether PNGs were made (`figures_summary`), and
by checking that the README quotes this run's headline numbers (`record`, `check_readme`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path

from saelab import paths
from saelab.config import load_profile
from saelab.plots import FIGURES_LOG, png_hint

SUMMARY = "summary.json"  # figures/<profile>/summary.json: each headline number as the README quotes it
# plotly outputs as JSON for JupyterLab and as HTML with plotly.js for every other viewer (nbconvert's
# HTML, VS Code, nbviewer): plotly.io reads PLOTLY_RENDERER when a kernel imports it
RENDERER = "plotly_mimetype+notebook"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class NotebookFailed(RuntimeError):
    """A notebook of the workbook raised: the message is one line, the traceback is in the log it names."""


def _failure(nb, notebook: Path, log: Path) -> str:
    """'<notebook> failed in cell N: Error: message (traceback: <log>)' from the executed copy's error output."""
    for number, cell in enumerate(nb.cells, start=1):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                log.write_text(_ANSI.sub("", "\n".join(output.get("traceback", []))) + "\n")
                first = str(output.get("evalue", "")).strip().splitlines()
                return (f"{notebook} failed in cell {number} ({cell.cell_type} cell {number} of {len(nb.cells)}): "
                        f"{output.get('ename')}: {first[0] if first else ''} (traceback: {log})")
    return f"{notebook} failed (traceback: {log})"


def run_notebooks(notebooks: list[Path], timeout_s: int = 24 * 3600) -> Path:
    """Execute `notebooks` in order in the resolved profile; returns the folder of executed copies.
    A failing notebook raises (its executed copy, with the error, is kept); the figure summary is
    printed either way."""
    import nbformat
    from nbconvert.preprocessors import CellExecutionError, ExecutePreprocessor

    profile = load_profile()
    print(profile.banner(), flush=True)
    out_dir = paths.executed_notebooks_dir(profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Kernels get the resolved profile as a JSON file (absolute path: nbmake and nbconvert run each
    # notebook from its own folder), so overrides from a profile JSON reach every notebook.
    resolved = paths.run_dir(profile) / "profile.json"
    resolved.write_text(profile.to_json())
    os.environ["SAELAB_PROFILE"] = str(resolved)
    os.environ.setdefault("PLOTLY_RENDERER", RENDERER)
    (paths.run_dir(profile) / FIGURES_LOG).unlink(missing_ok=True)  # the summary covers this run only
    try:
        for notebook in notebooks:
            started = time.perf_counter()
            print(f"running {notebook} ...", flush=True)
            nb = nbformat.read(notebook, as_version=4)
            # the kernel logs errors only: its "running over TCP without encryption" warning is about a
            # kernel on a shared network, not one this process starts on localhost
            executor = ExecutePreprocessor(timeout=timeout_s, kernel_name="python3", coalesce_streams=True,
                                           extra_arguments=["--log-level=ERROR"])
            executed = out_dir / Path(notebook).name
            try:
                executor.preprocess(nb, {"metadata": {"path": str(Path(notebook).parent)}})
            except CellExecutionError:
                raise NotebookFailed(_failure(nb, Path(notebook), executed.with_suffix(".log"))) from None
            finally:  # keep the executed copy, errors included, for reading what went wrong
                nbformat.write(nb, executed)
                write_html(nb, executed.with_suffix(".html"))
            print(f"  done in {time.perf_counter() - started:.0f} s -> {executed} (+ .html)", flush=True)
    finally:
        print(figures_summary(profile), flush=True)
    return out_dir


def write_html(nb, path: Path) -> Path:
    """The executed notebook as one self-contained HTML page (styles, images and plotly.js inline)."""
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter(embed_images=True).from_notebook_node(nb)
    path.write_text(body, encoding="utf-8")
    return path


def record(profile, name: str, text: str) -> Path:
    """Keep one headline number of a notebook in figures/<profile>/summary.json under `name`, as the exact
    `text` the README quotes (e.g. "+4.87 nats"), formatted by the notebook from the number it computed;
    `check_readme` then says when the README no longer quotes it. Returns the file's path."""
    path = paths.figures_dir(profile) / SUMMARY
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(path.read_text()) if path.is_file() else {}
    if summary.get(name) != text:
        summary[name] = text
        paths.write_json_atomically(path, dict(sorted(summary.items())))
    return path


def figures_summary(profile) -> str:
    """Where this run's figures went and whether PNGs were made, from runs/<profile>/figures.log
    (one JSON line per file `plots.save_figure` / `save_html` / the dashboards wrote or kept)."""
    log = paths.run_dir(profile) / FIGURES_LOG
    entries = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    if not entries:
        return f"figures: none written this run (they go to {paths.figures_dir(profile)})"
    latest = {e["file"]: e for e in entries}  # a figure saved twice counts once, as last saved
    html = Counter(e["html"] for e in latest.values())
    lines = [f"figures: {len(latest)} pages and images in {paths.figures_dir(profile)} ({html['written']} written, "
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


def check_readme(summary: Path, readme: Path) -> list[str]:
    """The headline numbers of `summary` (figures/<profile>/summary.json, see `record`) that `readme` does not
    quote as they are (line breaks and indentation aside): one 'name: "text"' line each; [] when all match
    or when either file is missing."""
    if not Path(summary).is_file() or not Path(readme).is_file():  # e.g. a SAELAB_ROOT without a README
        return []
    text = " ".join(Path(readme).read_text(encoding="utf-8").split())  # a quote may wrap across lines
    return [f"{name}: {quoted!r}" for name, quoted in json.loads(Path(summary).read_text()).items()
            if " ".join(quoted.split()) not in text]


def main(notebooks: list[str]) -> int:
    """`make workbook`: run the notebooks, then check the README against this run's numbers; the exit status."""
    if not notebooks:
        print("no notebooks given; nothing to run")
        return 0
    started = time.perf_counter()
    try:
        run_notebooks([Path(p) for p in notebooks])
        print(f"workbook: {len(notebooks)} notebooks in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    except NotebookFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    summary = paths.figures_dir(load_profile()) / SUMMARY
    stale = check_readme(summary, paths.root() / "README.md")
    if stale:
        print(f"README.md does not quote {len(stale)} of this run's numbers ({summary}); update it:\n  "
              + "\n  ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
