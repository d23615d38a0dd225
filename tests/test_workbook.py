import json

import nbformat

from saelab import paths
from saelab.config import OFFLINE
from saelab.workbook import run_notebooks


def test_overrides_from_a_profile_json_reach_every_kernel(tmp_path, monkeypatch):
    custom = tmp_path / "my_profile.json"
    custom.write_text(OFFLINE.replace(name="mine", epochs=2).to_json())
    monkeypatch.setenv("SAELAB_PROFILE", str(custom))
    seen = tmp_path / "seen.json"
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        f"import saelab\nopen({str(seen)!r}, 'w').write(saelab.load_profile().to_json())")])
    nbformat.write(notebook, tmp_path / "01_probe.ipynb")

    out_dir = run_notebooks([tmp_path / "01_probe.ipynb"])

    assert json.loads(seen.read_text())["epochs"] == 2
    assert json.loads(seen.read_text())["name"] == "mine"
    assert (out_dir / "01_probe.ipynb").is_file() and out_dir == paths.executed_notebooks_dir("mine")
