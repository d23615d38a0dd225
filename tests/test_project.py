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


LAYERS = {  # STYLE.md: the core at the root, one room per stage; a room imports from its own layer or below
    1: {"paths", "devices", "tables", "sae"},  # pure tensor code and files: no model, no profile
    2: {"config", "metrics", "store", "plots", "workbook"},  # the rest of the core
    3: {"data", "train", "features"},  # notebooks 01-02, 03, 04: each needs only the core
    4: {"studies", "adhoc"},  # notebooks 05-06 and the one-line ad-hoc calls: may use every stage
}
PACKAGE = ROOT / "saelab"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def saelab_imports(path: Path) -> set[str]:
    """The saelab modules that `path` imports, in full (saelab.data.lm), in any form, lazy ones too."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "saelab":
            for alias in node.names:  # `from saelab.data import lm` names a module, `from saelab.sae import SAE` not
                candidate = f"{node.module}.{alias.name}"
                is_module = (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists() or \
                    (ROOT / Path(*candidate.split("."))).is_dir()
                found.add(candidate if is_module else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "saelab"}
    return found - {"saelab"}


def room(module: str) -> str:
    """The room a module lives in: its stage subpackage, or its own name at the root."""
    return module.split(".")[1]


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.parent != PACKAGE or p.stem != "__init__"}


def test_import_scanner_sees_every_form(tmp_path):
    source = ROOT / "saelab" / "_probe_for_test.py"
    source.write_text("from saelab import paths\nfrom saelab.store import X\nimport saelab.sae\nimport torch\n"
                      "from saelab.data import lm\nfrom saelab.train.loop import train_sae\n"
                      "def f():\n    from saelab.studies import probing\n")
    try:
        assert saelab_imports(source) == {"saelab.paths", "saelab.store", "saelab.sae", "saelab.data.lm",
                                          "saelab.train.loop", "saelab.studies.probing"}
    finally:
        source.unlink()


def test_every_room_has_a_layer_and_imports_only_from_its_layer_or_below():
    layer_of = {name: layer for layer, names in LAYERS.items() for name in names}
    rooms = {room(m) for m in MODULES}
    assert rooms == set(layer_of), "give each new module or subpackage a layer here (and in the README's code map)"
    upward = sorted((m, i) for m, path in MODULES.items() for i in saelab_imports(path)
                    if layer_of[room(i)] > layer_of[room(m)])
    assert not upward, f"imports from a higher layer: {upward}"


def test_stages_do_not_reach_into_each_other():
    """The trainer never sees the language model (SAELens' separation), and features are read from a store."""
    crossing = sorted((m, i) for m, path in MODULES.items() if room(m) in {"data", "train", "features"}
                      for i in saelab_imports(path) if room(i) in {"data", "train", "features"} and room(i) != room(m))
    assert not crossing, f"a stage imports another stage: {crossing}"


def import_graph() -> dict[str, set[str]]:
    return {m: {i for i in saelab_imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_no_import_cycle_and_at_most_five_floors():
    graph, floor, visiting = import_graph(), {}, []

    def floor_of(module: str) -> int:  # 1 + the highest floor it imports; a module on the stack is a cycle
        if module in visiting:
            raise AssertionError(f"import cycle: {' -> '.join(visiting[visiting.index(module):] + [module])}")
        if module not in floor:
            visiting.append(module)
            floor[module] = 1 + max((floor_of(i) for i in graph.get(module, ())), default=0)
            visiting.pop()
        return floor[module]

    for module in graph:
        floor_of(module)
    rooms: dict[str, set[str]] = {}  # the same graph with each stage subpackage as one room
    for module, imported in graph.items():
        rooms.setdefault(room(module), set()).update(room(i) for i in imported if room(i) != room(module))
    room_floor: dict[str, int] = {}

    def room_floor_of(name: str) -> int:
        if name not in room_floor:
            room_floor[name] = 1 + max((room_floor_of(i) for i in rooms.get(name, ())), default=0)
        return room_floor[name]

    assert max(room_floor_of(r) for r in rooms) <= 5, room_floor


def test_the_wheel_carries_every_subpackage(tmp_path):
    import shutil
    import subprocess
    import sys
    import zipfile

    source = tmp_path / "source"  # a copy, so the build leaves no build/ folder in the checkout
    shutil.copytree(PACKAGE, source / "saelab", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(source)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("saelab-*.whl")
    packed = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("saelab/")}
    expected = {str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")}
    assert expected <= packed, f"missing from the wheel: {sorted(expected - packed)}"


# help() says what each does
DOCUMENTED = ("features.analysis", "features.cards", "store", "data.capture", "features.dashboards")


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
