"""Train an SAE on a tensor of activations: the one training loop, for every architecture.

    sae = saelab.SAE(d_in=768, d_sae=6144)             # the seed's tied SAE; or saelab.sae_for("topk", ...)
    result = train_sae(sae, activations, epochs=100)   # activations: (rows, d_in)
    result.history.plot(x="epoch", y="val_loss")

Where to change what: the loss of an architecture in its file under saelab/sae/ (its terms are the
functions of saelab/sae/loss.py), the learning-rate and sparsity schedules in `lr_at` and `l1_at` below,
the step itself (Adam, constraint, CUDA graph) in saelab/train/step.py. The loop never branches on the
architecture: it asks the SAE for its gradients and its constraint.

With `run_dir`, the run checkpoints (safetensors + JSON, no pickle), logs to wandb, writes history.csv
and saves the final SAE there. Calling it again with the same run_dir continues from the last
checkpoint and gives the same SAE as an uninterrupted run; a finished run returns at once. The trainer
never sees the language model: notebook 03 reads the activation store into a tensor.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from tqdm import tqdm  # text bars: a saved notebook keeps their last line (tqdm.auto widgets stay at "0%")

from saelab.config import Profile, TrainConfig
from saelab.devices import accumulator_dtype, canonical, device_of, tf32_matmuls
from saelab.metrics import evaluate, from_sums, fvu, sums_of, total_variance
from saelab.provenance import record_provenance
from saelab.sae import SAE, sae_for
from saelab.store import ActivationStore
from saelab.train.batching import as_activations, epoch_order, to_training_device, train_val_split
from saelab.train.checkpoint import (
    load_checkpoint,
    locks_run_dir,
    prepare_run_dir,
    restore_optimizer,
    save_checkpoint,
    save_sae,
)
from saelab.train.step import RunningStats, Stepper, make_adam
from saelab.train.tracking import RunLog

RESUMABLE_CHANGES = ("epochs", "checkpoint_every", "checkpoint_minutes", "log_every", "cuda_graph")
SPARSITY_FIELDS = ("l1_coefficient", "l0_coefficient")  # an architecture's `sparsity_setting` is one of these


def lr_at(step: int, s: TrainConfig, total_steps: int) -> float:
    """Adam's learning rate for optimizer step `step` (0-based) of `total_steps`: linear warm-up over
    lr_warm_up_steps, then constant or cosine-annealed to lr_end, and a linear decay to lr_end over the
    last lr_decay_steps (SAELens' lr_warm_up_steps, lr_scheduler_name, lr_decay_steps, lr_end)."""
    lr, end = s.lr, s.lr / 10 if s.lr_end is None else s.lr_end
    if step < s.lr_warm_up_steps:
        return lr * (step + 1) / s.lr_warm_up_steps
    decay_from = total_steps - s.lr_decay_steps
    span = max(decay_from - s.lr_warm_up_steps - 1, 1)  # cosine reaches lr_end on the last step before decay
    if s.lr_scheduler_name == "cosineannealing":
        lr = end + (lr - end) * (1 + math.cos(math.pi * min(step - s.lr_warm_up_steps, span) / span)) / 2
    if step >= decay_from:
        return lr + (end - lr) * (step - decay_from + 1) / s.lr_decay_steps
    return lr


def l1_at(step: int, coefficient: float, warm_up_steps: int) -> float:
    """The sparsity coefficient (λ, or λ0 for jumprelu) at step `step` (0-based): a linear ramp from 0
    over warm_up_steps (SAELens' l1_warm_up_steps), then constant."""
    return coefficient * min(1.0, (step + 1) / warm_up_steps) if warm_up_steps else coefficient


class TrainResult(NamedTuple):
    sae: SAE  # the trained SAE: the object that was passed in, trained in place, on the training device
    history: pd.DataFrame  # one row per finished epoch: train_*, val_*, dead_fraction, lr, tokens


def training_settings(sae: SAE, config: TrainConfig | None, options: dict) -> TrainConfig:
    """`config` (default: the seed's) with `options` replaced; an option the SAE's architecture does not
    take (λ for a jumprelu, say) is refused rather than ignored."""
    wrong = sorted((set(SPARSITY_FIELDS) - {sae.sparsity_setting}) & set(options))
    if wrong:
        raise ValueError(f"{wrong} do not apply to a {sae.architecture} SAE; its sparsity is set by "
                         f"{sae.sparsity_setting or 'its k (no coefficient)'}")
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config={config!r}: a saelab.config.TrainConfig (e.g. profile.train), or None for the seed's")
    return config.replace(**options)


class Trainer:
    """One run: the loop, and the state a checkpoint holds to resume it exactly."""

    def __init__(self, sae: SAE, s: TrainConfig, data: torch.Tensor, split, device: torch.device, fingerprint: dict,
                 run_dir: Path | None):
        self.sae, self.s, self.data, self.device, self.run_dir = sae, s, data, device, run_dir
        self.train_rows, self.val_rows = split.train.to(data.device), split.val.to(data.device)
        self.steps_per_epoch = -(-len(self.train_rows) // s.batch_size)
        self.optimizer = make_adam(sae, s.lr, device)
        self.stats = RunningStats(sae.d_sae, device, window=min(s.dead_after_tokens, len(self.train_rows)))
        self.stepper = Stepper(sae, self.optimizer, self.stats, device, getattr(torch, s.dtype), s.cuda_graph)
        self.coefficient = getattr(s, sae.sparsity_setting) if sae.sparsity_setting else 0.0
        self.step, self.epoch, self.batch, self.tokens = 0, 1, 0, 0  # steps done; epoch (1-based); batch in it
        self.history: list[dict] = []
        self.fingerprint, self.wandb_id, self.saved_at = fingerprint, None, time.monotonic()
        self.variance = total_variance(data, self.train_rows)  # for the epochs' training FVU

    @property
    def finished(self) -> bool:
        return self.epoch > self.s.epochs

    def loop(self, log: RunLog, max_steps: int | None, progress: bool) -> bool:
        """Runs to the last epoch (True) or to max_steps (False); Ctrl-C saves a checkpoint first."""
        s, total = self.s, self.s.epochs * self.steps_per_epoch
        bar = tqdm(total=total, initial=self.step, desc="SAE steps", disable=not progress or self.finished)
        try:
            while not self.finished:
                order = epoch_order(self.train_rows, s.seed, self.epoch)
                for x in self.stepper.batches(self.data, order, s.batch_size, start=self.batch):
                    # lr and λ -> step (gradients, Adam, constraint, statistics) -> log / checkpoint / stop
                    self.stepper.set_lr(lr_at(self.step, s, total))
                    self.stepper.set_sparsity(l1_at(self.step, self.coefficient, s.l1_warm_up_steps))
                    losses = self.stepper(x, s.batch_size)
                    self.step, self.batch, self.tokens = self.step + 1, self.batch + 1, self.tokens + x.shape[0]
                    bar.update(1)
                    if self.step % s.log_every == 0:  # one host sync every log_every steps
                        self.log_step(losses, log, bar)
                    if self.checkpoint_due():
                        self.checkpoint(log)
                    if max_steps is not None and self.step >= max_steps:
                        self.checkpoint(log)
                        return False
                self.end_epoch(log)
            self.checkpoint(log)
            return True
        except KeyboardInterrupt:
            self.checkpoint(log)  # what was trained is kept: rerun to continue
            raise
        except torch.cuda.OutOfMemoryError as err:  # the checkpoints already written stay
            kept = f"the last checkpoint is in {self.run_dir / 'checkpoints'}" if self.run_dir else "no run_dir"
            raise MemoryError(
                f"out of GPU memory at step {self.step} (SAE {self.sae.d_in}->{self.sae.d_sae}, batch_size "
                f"{s.batch_size}, dtype {s.dtype}): lower batch_size or expansion_factor, or use dtype='bfloat16'; "
                f"{kept}") from err
        finally:
            bar.close()

    def checkpoint_due(self) -> bool:
        if self.s.checkpoint_every:
            return self.step % self.s.checkpoint_every == 0
        return time.monotonic() - self.saved_at >= 60 * self.s.checkpoint_minutes

    def log_step(self, losses, log: RunLog, bar) -> None:
        self.check_finite()
        x = self.stepper.last_x  # (batch, d_in): the batch of this step
        batch = from_sums(sums_of(x, losses.h, losses.mse * x.numel(), accumulator_dtype(x.device)))
        numbers = torch.stack([losses.total, losses.sparsity, losses.aux, self.stats.dead().float().mean()]).tolist()
        values = dict(zip(["train/loss", "train/sparsity", "train/aux", "train/dead_fraction"], numbers, strict=True))
        values |= {"train/mse": batch["mse"], "train/l0": batch["l0"], "train/fvu": batch["fvu"],
                   "lr": self.stepper.last_lr, "sparsity_coefficient": self.stepper.last_sparsity}
        log.log(values, step=self.step)
        bar.set_postfix(loss=f"{values['train/loss']:.4g}", l0=f"{values['train/l0']:.1f}")

    def end_epoch(self, log: RunLog) -> None:
        self.check_finite()
        sums, d_in = self.stats.epoch_sums(), self.sae.d_in
        row = {"epoch": self.epoch, "step": self.step, "tokens": self.tokens,
               "train_loss": sums["loss"] / self.batch, "train_mse": sums["sse"] / (sums["rows"] * d_in),
               "train_sparsity": sums["sparsity"] / self.batch, "train_aux": sums["aux"] / self.batch,
               "train_fvu": fvu(sums["sse"], self.variance),
               "dead_fraction": self.stats.dead().float().mean().item()}
        val = evaluate(self.sae, self.data, self.coefficient, rows=self.val_rows)
        row |= {f"val_{k}": v for k, v in val.items()}
        row |= {"lr": self.stepper.last_lr, "sparsity_coefficient": self.stepper.last_sparsity}
        self.history.append(row)
        log.log({f"epoch/{k}": v for k, v in row.items()}, step=self.step)
        self.epoch, self.batch = self.epoch + 1, 0

    def check_finite(self) -> None:
        finite = bool(torch.stack([torch.isfinite(self.stats.sums).all()]
                                  + [torch.isfinite(p).all() for p in self.sae.parameters()]).all())  # one sync
        if not finite:
            where = (f"the last good checkpoint is in {self.run_dir / 'checkpoints'}" if self.run_dir
                     else "no checkpoint (no run_dir)")
            raise FloatingPointError(
                f"training stopped: the loss or the weights became NaN/inf by step {self.step} (epoch {self.epoch}); "
                f"{where}. Lower lr (now {self.s.lr}) or the sparsity coefficient, or check the activations for "
                "extreme values, then start a new run.")

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "tokens": self.tokens,
                "history": self.history, "config": dataclasses.asdict(self.s),
                "data": self.fingerprint}

    def checkpoint(self, log: RunLog) -> None:
        self.check_finite()
        if self.run_dir is not None:
            save_checkpoint(self.run_dir / "checkpoints", self.sae, self.optimizer, self.stats.tensors(),
                            self.state() | {"wandb_id": log.run_id})
        self.saved_at = time.monotonic()

    def resume(self) -> bool:
        """Load the last checkpoint of run_dir; False when there is none."""
        directory = self.run_dir / "checkpoints"
        checkpoint = load_checkpoint(directory, self.device)
        if checkpoint is None:
            return False
        saved, current = {**checkpoint.state["config"], **checkpoint.state["data"]}, {**self.state()["config"],
                                                                                       **self.fingerprint}
        unused = set(SPARSITY_FIELDS) - {self.sae.sparsity_setting}  # a coefficient this SAE does not take
        changed = {k: (saved.get(k), v) for k, v in current.items()
                   if k not in RESUMABLE_CHANGES and k not in unused and saved.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {directory}: the run was made with other settings or data {changed} "
                             "(checkpoint, now). Use the same settings to continue it, or start over with "
                             "overwrite=True (deletes its checkpoints) or another run_dir.")
        self.sae.load_state_dict(checkpoint.sae.state_dict())
        restore_optimizer(self.optimizer, checkpoint.tensors)
        for name, tensor in self.stats.tensors().items():
            tensor.copy_(checkpoint.tensors[name])
        for key in ("step", "epoch", "batch", "tokens", "history"):
            setattr(self, key, checkpoint.state[key])
        self.wandb_id = checkpoint.state.get("wandb_id")
        return True


@locks_run_dir
def train_sae(sae: SAE, activations, config: TrainConfig | None = None, *,
              device: str | torch.device | None = None, progress: bool = True,
              run_dir: str | Path | None = None, resume: bool = True, overwrite: bool = False,
              max_steps: int | None = None, run_name: str | None = None, run_config: dict | None = None,
              tf32: bool | None = None, **options) -> TrainResult:
    """Train `sae` **in place** on `activations` ((rows, d_in) tensor or numpy array) and return
    TrainResult(sae, history): the same SAE object, on the training device, and one row per epoch.

    config: a `saelab.config.TrainConfig` (e.g. `profile.train`), default the seed's (epochs=100,
    batch_size=512, lr=1e-3 constant, l1_coefficient=1e-3, val_fraction=0.1, seed=0, ...); `options`: any of
    its fields as keywords, replacing the config's (train_sae(sae, x, epochs=2) or train_sae(sae, x, cfg, lr=3e-4)).
    device: where to train (default: where the SAE is; the SAE is moved there). With `run_dir`:
    `resume` continues a compatible checkpoint there; `overwrite=True` deletes its checkpoints first.
    `max_steps` stops early after that many steps in all (with a checkpoint). `run_config` (e.g. the
    profile) goes to wandb. `tf32` (default: on CUDA) allows TF32 matmuls during training only.
    """
    s = training_settings(sae, config, options)
    activations = as_activations(activations, sae.d_in)
    device = canonical(device) if device is not None else device_of(sae)  # "cuda" -> cuda:0, as tensors say
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None:
        prepare_run_dir(run_dir, resume, overwrite)
    split = train_val_split(activations.shape[0], s.val_fraction, s.seed)  # row indices: no copy
    data = to_training_device(activations, device)  # no copy on CPU when already float32
    if data.device != device:
        warnings.warn(f"the activations ({activations.numel() * 4 / 2**30:.1f} GiB as float32) do not fit in "
                      f"{device} memory: they stay in host memory and stream to the GPU in chunks", stacklevel=2)
    sae.to(device)
    fingerprint = {"rows": activations.shape[0], "d_in": activations.shape[1], "architecture": sae.architecture,
                   "options": sae.option_values(),
                   "checksum": activations[:: max(1, activations.shape[0] // 1024)].double().sum().item()}
    with tf32_matmuls(device.type == "cuda" if tf32 is None else tf32):
        trainer = Trainer(sae, s, data, split, device, fingerprint, run_dir)
        if not (run_dir is not None and resume and trainer.resume()):
            sae.init_b_dec(data.index_select(0, trainer.train_rows[:4096]).to(device, torch.float32), s.b_dec_init)
        logged = {"train": dataclasses.asdict(s), **(run_config or {})}
        log = RunLog(run_dir if not trainer.finished else None, logged, run_id=trainer.wandb_id, name=run_name)
        try:
            finished = trainer.loop(log, max_steps, progress)
        finally:
            log.finish()
    history = RunLog.write_history(run_dir, trainer.history)
    if finished and run_dir is not None:
        save_sae(sae, run_dir)  # the run's SAE: cfg.json + sae_weights.safetensors (SAELens format)
    return TrainResult(sae=sae, history=history)


def sae_for_profile(profile: Profile, device: str | torch.device = "cpu") -> SAE:
    """A fresh SAE of the profile's `sae` section, seeded by profile.seed (the global RNG is left
    untouched), on `device`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(profile.seed)
        sae = sae_for(profile.sae.architecture, profile.d_in, profile.d_sae, **profile.sae.options_for(),
                      metadata={"model_name": profile.model_name, "hook_name": profile.hook, "profile": profile.name})
    return sae.to(device)


def train_profile(profile: Profile, activations, name: str = "sae", *, resume: bool = True, overwrite: bool = False,
                  progress: bool = True, device: str | None = None, max_steps: int | None = None,
                  store: ActivationStore | None = None) -> TrainResult:
    """Notebook 03: a fresh SAE for the profile, trained with the profile's settings in the run folder
    paths.sae_dir(profile, name), on `device` (default: the GPU when there is one), where result.sae stays.
    Rerunning resumes (or returns the finished run at once). A run there from other settings is refused:
    pass overwrite=True or another `name`. `store`: the store `activations` came from, recorded in the
    saved SAE's cfg.json (saelab.provenance), so analysing it against another store is caught."""
    from saelab import paths
    from saelab.config import default_device

    device = device or default_device()
    sae = sae_for_profile(profile, device)
    record_provenance(sae, store, profile=profile.name, training=dataclasses.asdict(profile.train))
    return train_sae(sae, activations, device=device, progress=progress, run_dir=paths.sae_dir(profile, name),
                     resume=resume, overwrite=overwrite, max_steps=max_steps, run_name=f"{profile.name}-{name}",
                     run_config={"profile": profile.to_dict()}, config=profile.train)
