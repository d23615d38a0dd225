"""Benchmarks cannot rot: every script in benchmarks/ runs in its tiny --smoke mode (seconds, CPU) and
prints its results table. Nothing is timed. A new benchmark is covered by being there; helper modules
that are not scripts start with an underscore."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted(p for p in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
                    if not p.name.startswith("_"))


def test_there_are_benchmarks():
    assert {"capture.py", "mae.py", "train.py"} <= {p.name for p in BENCHMARKS}


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_runs_in_smoke_mode_and_prints_its_table(script, tmp_path):
    env = {**os.environ, "SAELAB_ROOT": str(tmp_path / "root"), "CUDA_VISIBLE_DEVICES": ""}  # smoke: the CPU
    run = subprocess.run([sys.executable, str(script), "--smoke"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, f"{script.name} --smoke failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    lines = run.stdout.splitlines()
    header = next((i for i, line in enumerate(lines) if "tokens/s" in line), None)
    assert header is not None, f"{script.name} printed no tokens/s:\n{run.stdout[-2000:]}"
    assert "peak" in run.stdout.lower(), f"{script.name} printed no peak memory"
    assert any(any(c.isdigit() for c in line) for line in lines[header:]), f"{script.name} printed no results"
