"""Train an SAE on a tensor of activations; the recipe follows from the SAE (see saelab.recipes).

    sae = SAE(d_in=768, d_sae=6144)                    # tied, k=None: the seed's recipe
    result = train_sae(sae, activations, epochs=100)   # activations: (rows, d_in)
    result.history.plot(x="epoch", y="val_loss")

With `run_dir`, the run checkpoints every `checkpoint_every` steps and at each epoch end, logs to
wandb, writes history.csv, and saves the final SAE there. Calling it again with the same run_dir
continues from the last checkpoint (`resume=True`, the default) and gives the same SAE as an
uninterrupted run; a finished run returns at once. Checkpoints made with other settings are refused;
only `overwrite=True` deletes them. The trainer never sees the language model: notebook 03 reads
the activation store into a tensor, and training indexes that tensor (no copy for the split).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from saelab.batching import check_activations, to_training_device, train_val_split
from saelab.checkpoint import LATEST
from saelab.loop import TrainConfig, TrainingRun, evaluate
from saelab.metrics import ILL_CONDITIONED_GAP
from saelab.recipes import init_b_dec, recipe_of
from saelab.sae import SAE
from saelab.tracking import RunLog

__all__ = ["TrainConfig", "TrainResult", "evaluate", "sae_for_profile", "tf32_matmuls", "train_profile",
           "train_sae"]


class TrainResult(NamedTuple):
    sae: SAE  # the trained SAE (same object that was passed in)
    history: pd.DataFrame  # one row per finished epoch: train_*, val_*, dead_fraction, lr, tokens


def sae_for_profile(profile) -> SAE:
    """A fresh SAE for `profile.recipe`, seeded by profile.seed (global RNG left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.seed)
        return SAE(profile.d_in, profile.d_sae, tied=profile.recipe == "tied_l1",
                   k=profile.topk_k if profile.recipe == "topk" else None,
                   metadata={"model_name": profile.model_name, "hook_name": profile.hook,
                             "profile": profile.name, "recipe": profile.recipe})


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 float32 matmuls on CUDA while the block runs (`enabled`), then the caller's setting again:
    the flag is process-wide, and an LM forward after training (CE loss recovered, capture) must
    not silently run in TF32."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = previous or enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Deletes old checkpoints only when asked to (overwrite=True); refuses to ignore them silently."""
    checkpoints = run_dir / "checkpoints"
    if overwrite:
        shutil.rmtree(checkpoints, ignore_errors=True)
    elif not resume and (checkpoints / LATEST).is_file():
        raise ValueError(f"{run_dir} already holds a checkpointed run: continue it with resume=True, "
                         "start over with overwrite=True (deletes its checkpoints), or pick another run_dir")


def train_sae(sae: SAE, activations: torch.Tensor, *, device: str | None = None, progress: bool = True,
              run_dir: str | Path | None = None, resume: bool = True, overwrite: bool = False,
              max_steps: int | None = None, run_name: str | None = None, run_config: dict | None = None,
              tf32: bool | None = None, **options) -> TrainResult:
    """Fit `sae` to `activations` (rows, d_in). `options` are TrainConfig fields (l1_coefficient, lr,
    batch_size, epochs, val_fraction, seed, ...). With `run_dir`: `resume` continues a compatible
    checkpoint there (none: a fresh start); `overwrite=True` deletes its checkpoints first. `max_steps`
    stops early after that many steps in all (with a checkpoint), e.g. to test resuming. `run_config`
    (e.g. the profile) goes to wandb. `tf32` (default: on CUDA) allows TF32 matmuls during training only."""
    config = TrainConfig(**options)
    check_activations(activations)
    if activations.shape[1] != sae.d_in:
        raise ValueError(f"activations have d_in={activations.shape[1]} but the SAE expects {sae.d_in}; "
                         "build the SAE with SAE(d_in=activations.shape[1], ...)")
    device = device or next(sae.parameters()).device.type
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        prepare_run_dir(run_dir, resume, overwrite)
    split = train_val_split(activations.shape[0], config.val_fraction, config.seed)  # row indices: no copy
    data = to_training_device(activations, device)  # no copy on CPU when already float32
    fingerprint = {"rows": activations.shape[0], "d_in": activations.shape[1], "recipe": recipe_of(sae),
                   "checksum": activations[:: max(1, activations.shape[0] // 1024)].double().sum().item()}
    with tf32_matmuls(torch.device(device).type == "cuda" if tf32 is None else tf32):
        run = TrainingRun(sae, config, data, split, device, fingerprint, run_dir)
        if not (run_dir is not None and resume and run.resume()):
            init_b_dec(sae, data.index_select(0, run.train[:4096]).to(device), config.b_dec_init)
        log = RunLog(run_dir, {"train": dataclasses.asdict(config), **(run_config or {})},
                     run_id=run.wandb_id, name=run_name)
        try:
            finished = run.loop(log, max_steps, progress)
        finally:
            log.finish()
    history = log.save_history(run.progress.history)
    if finished and run_dir is not None:
        sae.save(run_dir)  # the run's SAE: cfg.json + sae_weights.safetensors (SAELens layout)
    return TrainResult(sae=sae, history=history)


def train_profile(profile, activations: torch.Tensor, name: str = "sae", *, resume: bool = True,
                  overwrite: bool = False, progress: bool = True, device: str | None = None,
                  max_steps: int | None = None) -> TrainResult:
    """Notebook 03: a fresh SAE for `profile.recipe`, trained with the profile's settings in the run
    folder paths.sae_dir(profile, name); rerunning resumes (or returns the finished run at once).
    A run there from other settings is refused: pass overwrite=True or another `name`."""
    from saelab import paths
    from saelab.config import default_device

    return train_sae(sae_for_profile(profile), activations, device=device or default_device(), progress=progress,
                     run_dir=paths.sae_dir(profile, name), resume=resume, overwrite=overwrite, max_steps=max_steps,
                     run_name=f"{profile.name}-{name}", run_config={"profile": profile.to_dict()},
                     **dataclasses.asdict(TrainConfig.from_profile(profile)))


def compare_recipes(profile, train_activations: torch.Tensor, eval_activations: torch.Tensor, lm,
                    tokens: torch.Tensor, recipes=("tied_l1", "l1", "topk"), progress: bool = True) -> pd.DataFrame:
    """Train (or reuse) one SAE per recipe on the same activations, all other settings equal, and
    evaluate each on held-out activations and tokens: L0, FVU, dead %, CE loss recovered, KL.
    The profile's own recipe is its main run ("sae"); the others are runs "recipe_<name>"."""
    from saelab.metrics import ce_loss_recovered, evaluate_sae

    rows = []
    for recipe in recipes:
        name = "sae" if recipe == profile.recipe else f"recipe_{recipe}"
        sae = train_profile(profile.replace(recipe=recipe), train_activations, name, progress=progress).sae
        quality = evaluate_sae(sae, eval_activations)
        ce = ce_loss_recovered(lm, sae, tokens, profile.hook, skip_first_position=profile.exclude_first_position)
        rows.append({"recipe": recipe, "run": name, "l0": quality["l0"], "fvu": quality["fvu"],
                     "ce_loss_recovered": ce["ce_loss_recovered"], "kl_sae": ce["kl_sae"],
                     "ablation_gap": ce["ce_zero"] - ce["ce_clean"],
                     "dead_pct": 100 * quality["dead_fraction"], "dense_pct": 100 * quality["dense_fraction"]})
    return pd.DataFrame(rows).set_index("recipe")


def describe_recipes(table: pd.DataFrame, profile) -> str:
    """The comparison in plain words, from the numbers in `table` (one line per recipe)."""
    d_sae = profile.d_sae
    lines = [f"{recipe}: L0 {row.l0:.1f} of {d_sae} latents per token ({row.l0 / d_sae:.1%}), "
             f"FVU {row.fvu:.3f}, CE loss recovered {row.ce_loss_recovered:.1%}, dead {row.dead_pct:.1f}%"
             for recipe, row in table.iterrows()]
    if "tied_l1" in table.index and len(table) > 1:
        seed, others = table.loc["tied_l1"], table.drop(index="tied_l1")
        sparser = others[(others.l0 < seed.l0) & (others.fvu <= seed.fvu)].index.tolist()
        lines.append(f"The seed recipe (tied_l1) uses {seed.l0 / d_sae:.1%} of its latents per token "
                     f"(the seed article reported ~12.5%). "
                     + (f"{', '.join(sparser)} reconstruct at least as well with fewer active latents."
                        if sparser else "No other recipe here is both sparser and at least as accurate."))
    if (table["ablation_gap"] < ILL_CONDITIONED_GAP).any():
        lines.append(f"Zeroing the residual stream raises CE by only {table['ablation_gap'].min():.3f} nats here, "
                     "so CE loss recovered is ill-conditioned (it can exceed 100%); compare FVU and KL instead.")
    if profile.is_offline:
        lines.append("OFFLINE PROFILE: a random-weight model; these numbers check the pipeline, not GPT-2.")
    return "\n".join(lines)
