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

    assert json.loads(seen.read_text())["epochs"] == 2
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
    assert f"4 HTML files in {paths.figures_dir(OFFLINE)} (3 written, 1 unchanged up to float noise)" in summary
    assert "PNGs: 1 written, 1 kept, 1 figures without one (1 stale PNGs removed)" in summary
    assert "no PNG because FileNotFoundError: no Chrome" in summary and "plotly_get_chrome" in summary
    assert "apt-get" not in summary  # a user may have no root
