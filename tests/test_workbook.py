import json

import nbformat

from saelab import paths, plots
from saelab.config import OFFLINE
from saelab.workbook import figures_summary, run_notebooks


def test_overrides_from_a_profile_json_reach_every_kernel(tmp_path, monkeypatch, capsys):
    custom = tmp_path / "my_profile.json"
    custom.write_text(OFFLINE.replace(name="mine", epochs=2).to_json())
    monkeypatch.setenv("SAELAB_PROFILE", str(custom))
    seen = tmp_path / "seen.json"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"import saelab\nopen({str(seen)!r}, 'w').write(saelab.load_profile().to_json())"),
        nbformat.v4.new_code_cell("from tqdm import tqdm\nfor _ in tqdm(range(3), desc='bar', mininterval=0): pass")])
    nbformat.write(notebook, tmp_path / "01_probe.ipynb")

    out_dir = run_notebooks([tmp_path / "01_probe.ipynb"])

    assert json.loads(seen.read_text())["train"]["epochs"] == 2
    assert json.loads(seen.read_text())["name"] == "mine"
    assert (out_dir / "01_probe.ipynb").is_file() and out_dir == paths.executed_notebooks_dir("mine")
    # the saved progress bar is its final state, not every update (nor a frozen widget at 0%)
    bar = "".join(o.get("text", "") for o in nbformat.read(out_dir / "01_probe.ipynb", 4).cells[1].outputs)
    assert "\r" not in bar and bar.count("bar:") == 1 and "100%" in bar
    assert "figures: none written this run" in capsys.readouterr().out


def test_summary_says_where_figures_went_and_why_pngs_are_missing():
    log = paths.run_dir(OFFLINE) / plots.FIGURES_LOG
    log.parent.mkdir(parents=True)
    lines = [{"file": "03_a.html", "html": "written", "png": "removed stale", "reason": "FileNotFoundError: no Chrome"},
             {"file": "04_b.html", "html": "kept", "png": "kept", "reason": None},
             {"file": "04_c.html", "html": "written", "png": "-"},
             {"file": "04_d.html", "html": "written", "png": "written", "reason": None}]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = figures_summary(OFFLINE)
    assert f"4 pages and images in {paths.figures_dir(OFFLINE)} (3 written, 1 unchanged up to float noise)" in summary
    assert "PNGs: 1 written, 1 kept, 1 figures without one (1 stale PNGs removed)" in summary
    assert "no PNG because FileNotFoundError: no Chrome" in summary and "plotly_get_chrome" in summary
    assert "apt-get" not in summary  # a user may have no root


def test_a_failing_notebook_says_which_cell_and_why_in_one_line(tmp_path, monkeypatch, capsys):
    from saelab.workbook import main

    monkeypatch.setenv("SAELAB_PROFILE", "offline")
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# probe"),
                                               nbformat.v4.new_code_cell("import plotly.graph_objects as go\n"
                                                                         "go.Figure(go.Bar(y=[1, 2]))"),
                                               nbformat.v4.new_code_cell("raise ValueError('run notebook 03 first')")])
    nbformat.write(notebook, tmp_path / "04_probe.ipynb")
    assert main([str(tmp_path / "04_probe.ipynb")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "04_probe.ipynb failed in cell 3" in err[0]
    assert "ValueError: run notebook 03 first" in err[0] and "\x1b[" not in err[0]
    executed = paths.executed_notebooks_dir(OFFLINE)
    assert "ValueError" in (executed / "04_probe.log").read_text()  # the traceback, without colour codes
    page = (executed / "04_probe.html").read_text()  # shared as one page, the figure drawn by plotly.js inline
    assert "run notebook 03 first" in page and "Plotly.newPlot" in page and "src=\"https://cdn.plot.ly" not in page


def test_the_readme_check_names_each_number_it_does_not_quote(tmp_path):
    from saelab.workbook import check_readme, record

    summary = record(OFFLINE, "02_zero_ablation", "+4.87 nats")
    record(OFFLINE, "06_auc", "0.789 [0.686, 0.894]")
    readme = tmp_path / "README.md"
    readme.write_text("zero-ablating costs **+4.87 nats**; AUC 0.789\n  [0.686, 0.894]\n")  # wrapped: still quoted
    assert check_readme(summary, readme) == []
    record(OFFLINE, "02_zero_ablation", "+5.65 nats")  # a rerun of the notebook measured another number
    assert check_readme(summary, readme) == ["02_zero_ablation: '+5.65 nats'"]


def test_the_readme_quotes_the_committed_offline_numbers():
    """figures/offline/summary.json is written by `make workbook` beside the committed figures: the README's
    offline numbers must be the ones it holds."""
    from pathlib import Path

    from saelab.workbook import SUMMARY, check_readme

    root = Path(__file__).resolve().parent.parent
    summary = root / "figures" / "offline" / SUMMARY
    if not summary.is_file():
        import pytest

        pytest.skip(f"no {summary}: the committed figures predate it; run make workbook")
    stale = check_readme(summary, root / "README.md")
    assert not stale, f"README.md does not quote these numbers of {summary} (rerun make workbook, update it): {stale}"
