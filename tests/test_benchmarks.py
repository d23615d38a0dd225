"""Benchmarks cannot rot: the GPU check (benchmarks/gpu_check.py) runs every other benchmark script, and
its --smoke mode runs them all in their tiny --smoke modes (seconds, CPU). Each must exit 0 and print
its results with tokens/s and peak memory. Nothing is timed. A new benchmark is covered by adding it to
the GPU check, which this test demands; helper modules that are not scripts start with an underscore."""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "benchmarks").glob("*.py")
                    if not p.name.startswith("_") and p.stem != "gpu_check")


def test_the_gpu_check_runs_every_benchmark_in_smoke_mode_and_each_prints_its_table(tmp_path):
    assert {"capture", "mae", "train"} <= set(BENCHMARKS)
    env = {**os.environ, "SAELAB_ROOT": str(tmp_path / "root"), "CUDA_VISIBLE_DEVICES": ""}  # smoke: the CPU
    check = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    run = subprocess.run([sys.executable, str(check), "--smoke", "--out", str(tmp_path / "logs")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"gpu_check --smoke failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    assert "| train | ok |" in run.stdout and "| trainer | tokens/s |" in run.stdout  # the summary table
    for name in BENCHMARKS:
        log = tmp_path / "logs" / f"{name}.log"
        assert log.is_file(), f"gpu_check does not run benchmarks/{name}.py: add it as a step"
        lines = log.read_text().splitlines()
        header = next((i for i, line in enumerate(lines) if "tokens/s" in line), None)
        assert header is not None, f"{name} printed no tokens/s:\n{log.read_text()[-2000:]}"
        assert "peak" in log.read_text().lower(), f"{name} printed no peak memory"
        assert any(any(c.isdigit() for c in line) for line in lines[header + 1:]), f"{name} printed no results"
    train = (tmp_path / "logs" / "train.log").read_text()
    assert "| saelab-topk |" in train  # the sparse TopK step, beside sparsify (an optional dependency)
    assert "| sparsify |" in train or "sparsify is not installed" in train
