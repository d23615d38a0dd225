"""The project's own files: dependencies in step, notebooks committed clean and conventional."""

import json
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def package_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    in_pyproject = {package_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    pip_lines = re.findall(r"^\s+- (?!-e)(\S.*)$", (ROOT / "environment.yml").read_text().split("- pip:")[1], re.M)
    in_environment = {package_name(line) for line in pip_lines}
    assert in_environment == in_pyproject


def test_makefile_test_target_is_what_ci_runs():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_without_outputs(path):
    notebook = json.loads(path.read_text())
    dirty = [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"
             and (cell.get("outputs") or cell.get("execution_count") is not None)]
    assert not dirty, f"{path.name}: cells {dirty} carry outputs; clear them (jupyter nbconvert --clear-output)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_follows_the_conventions(path):
    cells = json.loads(path.read_text())["cells"]
    first = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and "Reads" in first and "Writes" in first
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1 and "profile = None" in "".join(tagged[0]["source"])
    code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "../" not in code, "use saelab.paths instead of relative paths"
    assert not re.search(r"\bCI\b|GITHUB_ACTIONS", code), "the profile is the only switch"


FLOORS = {  # STYLE.md: each module imports only from its own floor or below
    1: {"sae", "architectures", "loss", "metrics", "synthetic", "devices"},  # pure tensor code: no files, no model
    2: {"config", "paths", "store", "plots", "batching", "checkpoint", "tracking", "step", "tables"},
    3: {"corpus", "data", "offline_lm", "lm", "analysis", "concepts", "baselines", "interpret"},
    4: {"capture", "train", "compare", "cards", "dashboards", "ground_truth", "workbook", "random_twin"},
}


def saelab_imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "saelab":  # from saelab import paths
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("saelab."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("saelab.")}
    return found


def test_import_scanner_sees_every_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from saelab import paths\nfrom saelab.store import X\nimport saelab.sae\nimport torch\n")
    assert saelab_imports(source) == {"paths", "store", "sae"}


def test_every_module_has_a_floor_and_imports_only_from_below():
    floor_of = {module: floor for floor, modules in FLOORS.items() for module in modules}
    modules = {p.stem for p in (ROOT / "saelab").glob("*.py")} - {"__init__"}
    assert modules == set(floor_of), "add new modules to FLOORS (and to the README's floor map)"
    upward = {(m, i) for m in modules for i in saelab_imports(ROOT / "saelab" / f"{m}.py")
              if floor_of[i] > floor_of[m]}
    assert not upward, f"imports from a higher floor: {sorted(upward)}"


DOCUMENTED = ("analysis", "cards", "store", "capture", "dashboards")  # issue 11: help() says what each does


@pytest.mark.parametrize("module", DOCUMENTED)
def test_public_functions_and_methods_have_a_docstring(module):
    import importlib
    import inspect

    mod = importlib.import_module(f"saelab.{module}")
    public = [(name, obj) for name, obj in vars(mod).items() if not name.startswith("_")
              and (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__module__ == mod.__name__]
    public += [(f"{cls}.{name}", obj) for cls, owner in list(public) if inspect.isclass(owner)
               for name, obj in vars(owner).items() if not name.startswith("_") and inspect.isfunction(obj)]
    bare = [name for name, obj in public if len(inspect.getdoc(obj) or "") < 20]
    assert not bare, f"saelab.{module}: give these a docstring (what they do, return, defaults): {bare}"
