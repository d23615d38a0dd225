"""Training checkpoints without pickle: the SAE folder, Adam's state in safetensors, the rest in JSON.

    <run_dir>/checkpoints/step_00001200/   sae/ (cfg.json + sae_weights.safetensors, SAE.save)
                                           trainer.safetensors   Adam moments and step counts, and
                                                                 the loop's running tensors
                                           state.json            step, epoch, history so far, config
    <run_dir>/checkpoints/latest.json      {"checkpoint": "step_00001200"}

A checkpoint is written under a temp name and renamed, then `latest.json` is replaced atomically,
and only then are older checkpoints removed: a crash at any moment leaves the last good one. A write
that fails (full disk, permission) says what it kept and how to continue, and removes its temp folder;
a temp folder a killed run left behind is removed by the next run. While a run trains, its folder is
locked (`locks_run_dir`, `paths.FolderLock`): a second training into it is refused, naming the first.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saelab.paths import FolderLock, write_json_atomically, writing
from saelab.sae import SAE

LATEST = "latest.json"


class Checkpoint(NamedTuple):
    sae: SAE
    tensors: dict[str, torch.Tensor]  # "adam.<param>.<key>" and the loop's own tensors
    state: dict  # JSON-able: step, epoch, batch, history rows, config


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state (exp_avg, exp_avg_sq, step) as flat named tensors."""
    return {f"adam.{index}.{key}": value.detach().cpu().contiguous()
            for index, per_param in optimizer.state_dict()["state"].items()
            for key, value in per_param.items() if isinstance(value, torch.Tensor)}


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `optimizer_tensors`; hyper-parameters come from the freshly built optimizer."""
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("adam."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(directory: str | os.PathLike, sae: SAE, optimizer: torch.optim.Optimizer,
                    tensors: dict[str, torch.Tensor], state: dict) -> Path:
    """Write the checkpoint of `state['step']` into `directory` (see the module docstring); returns its folder."""
    directory = Path(directory)
    name = f"step_{state['step']:08d}"
    tmp = directory / (name + ".tmp")
    latest = directory / LATEST
    kept = (f"The last good checkpoint ({json.loads(latest.read_text())['checkpoint']}) is kept"
            if latest.is_file() else "No earlier checkpoint exists")
    try:
        with writing(f"the training checkpoint {name}", directory, kept=kept,
                     then="rerun the same training: it resumes from the last good checkpoint"):
            directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            sae.save(tmp / "sae")
            all_tensors = {**optimizer_tensors(optimizer),
                           **{k: v.detach().cpu().contiguous() for k, v in tensors.items()}}
            save_file(all_tensors, tmp / "trainer.safetensors")
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
            shutil.rmtree(directory / name, ignore_errors=True)
            os.replace(tmp, directory / name)
            write_json_atomically(directory / LATEST, {"checkpoint": name}, indent=None)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees what the failed write took; the last good one stays
        raise
    for old in directory.glob("step_*"):  # only now is the previous checkpoint redundant
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return directory / name


def save_sae(sae: SAE, run_dir: Path) -> Path:
    """The finished run's SAE into run_dir (SAE.save); a failed write says what is kept and what to do."""
    with writing("the trained SAE (cfg.json, sae_weights.safetensors)", run_dir,
                 kept="The last checkpoint, holding the finished SAE, is kept",
                 then="rerun the same training: it loads that checkpoint and saves the SAE"):
        return sae.save(run_dir)


def locks_run_dir(train):
    """Decorator for a function taking `run_dir=`: while it runs, the run folder is locked, so a second
    training into the same folder (another kernel, a rerun while one still runs) is refused, naming the
    first, instead of both interleaving their checkpoints. No run_dir, no lock."""
    signature = inspect.signature(train)

    @functools.wraps(train)
    def locked(*args, **kwargs):
        run_dir = signature.bind(*args, **kwargs).arguments.get("run_dir")
        if run_dir is None:
            return train(*args, **kwargs)
        with FolderLock(run_dir, "training an SAE"):
            return train(*args, **kwargs)
    return locked


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Deletes old checkpoints only when asked to (overwrite=True); refuses to ignore them silently.
    Removes temp folders a killed or failed checkpoint write left behind."""
    checkpoints = run_dir / "checkpoints"
    for leftover in checkpoints.glob("step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    if overwrite:
        shutil.rmtree(checkpoints, ignore_errors=True)
    elif not resume and (checkpoints / LATEST).is_file():
        raise ValueError(f"{run_dir} already holds a checkpointed run: continue it with resume=True, "
                         "start over with overwrite=True (deletes its checkpoints), or pick another run_dir")


def load_checkpoint(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint | None:
    """The latest checkpoint in `directory`, or None when there is none."""
    directory = Path(directory)
    if not (directory / LATEST).is_file():
        return None
    folder = directory / json.loads((directory / LATEST).read_text())["checkpoint"]
    try:
        sae = SAE.load(folder / "sae", device=device)
        tensors = load_file(folder / "trainer.safetensors", device=str(device))
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError, SafetensorError) as err:
        raise ValueError(f"the checkpoint {folder} is damaged ({err}); train from scratch with "
                         f"overwrite=True (deletes {directory}) or use another run_dir") from err
    return Checkpoint(sae, tensors, state)
