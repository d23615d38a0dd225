"""Every Python block of the README runs on its own, as written, in the offline profile (a reader copies
one block, not the page)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.splitlines()[-1][:40])
def test_readme_block_runs_on_its_own(block, tmp_path):
    env = {**os.environ, "SAELAB_ROOT": str(tmp_path), "SAELAB_PROFILE": "offline", "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, f"README block failed:\n{block}\n{run.stderr[-3000:]}"
