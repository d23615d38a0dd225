"""The training loop shared by all recipes, and what it needs: TrainConfig, Adam, evaluation.

`saelab.train.train_sae` is the public entry; `TrainingRun.loop` reads top to bottom in phases:
shuffle (`batching.shuffled_batches`: one seeded randperm of the training rows per epoch, on the
data's device) -> batch -> gradients by recipe -> Adam step -> decoder constraint -> account (no
host sync) -> log / checkpoint / stop. The run holds all activations once plus the row indices of
its train/validation split (`batching.train_val_split`), never a copy of either side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from saelab.batching import Split, shuffled_batches
from saelab.checkpoint import load_checkpoint, restore_optimizer, save_checkpoint
from saelab.config import B_DEC_INITS
from saelab.metrics import evaluate_sae
from saelab.progress import Progress
from saelab.recipes import default_aux_k, normalise_decoder_rows, train_step
from saelab.sae import SAE
from saelab.tracking import RunLog

RESUMABLE_CHANGES = ("epochs", "checkpoint_every", "log_every")  # may differ when resuming a run


@dataclass(frozen=True)
class TrainConfig:
    """Everything `train_sae` does besides the SAE and the data. Defaults are the seed's."""

    l1_coefficient: float = 1e-3  # λ, against MSE averaged over batch and d_in (saelab.loss)
    lr: float = 1e-3  # Adam, constant
    batch_size: int = 512
    epochs: int = 100
    val_fraction: float = 0.1  # rows held out for the per-epoch validation metrics
    seed: int = 0  # the train/val split and each epoch's shuffle (epoch e uses seed·1000003 + e)
    l1_warmup_steps: int = 0  # λ ramps linearly from 0 (SAELens' l1_warm_up_steps); 0 = constant
    b_dec_init: str = "zeros"  # zeros (seed) | mean | geometric_median, of up to 4096 training rows
    aux_k: int = 0  # topk: AuxK latents; 0 = saelab.recipes.default_aux_k(d_in)
    aux_coefficient: float = 1 / 32  # topk: α (Gao et al. 2024)
    dead_after_tokens: int = 10_000_000  # capped at one epoch's tokens
    checkpoint_every: int = 1_000  # steps; only with run_dir
    log_every: int = 100  # steps between wandb points and progress-bar updates (each one host sync)

    def __post_init__(self) -> None:
        counts = ("batch_size", "epochs", "checkpoint_every", "log_every", "dead_after_tokens")
        problems = [f"{name}={getattr(self, name)!r}: must be a positive integer" for name in counts
                    if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0)]
        problems += [f"{name}={getattr(self, name)!r}: must be an integer >= 0 (0 = {meaning})"
                     for name, meaning in (("aux_k", "default_aux_k(d_in)"), ("l1_warmup_steps", "constant λ"))
                     if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0)]
        if self.b_dec_init not in B_DEC_INITS:
            problems.append(f"b_dec_init={self.b_dec_init!r}: choose one of {B_DEC_INITS}")
        if problems:
            raise ValueError("invalid training settings:\n  " + "\n  ".join(problems))

    @classmethod
    def from_profile(cls, profile) -> TrainConfig:
        return cls(**{f.name: getattr(profile, f.name) for f in dataclasses.fields(cls) if hasattr(profile, f.name)})


def evaluate(sae: SAE, data: torch.Tensor, l1_coefficient: float, batch_size: int = 4096,
             rows: torch.Tensor | None = None) -> dict[str, float]:
    """The per-epoch validation metrics (`metrics.evaluate_sae` over `rows` of `data`) and the
    training objective on them: loss = mse + λ·l1 (topk: mse; its AuxK term needs the dead set)."""
    m = evaluate_sae(sae, data, batch_size, rows)
    loss = m["mse"] + (l1_coefficient * m["l1"] if sae.k is None else 0.0)
    return {"mse": m["mse"], "l1": m["l1"], "loss": loss, "l0": m["l0"], "fraction_active": m["fraction_active"],
            "fvu": m["fvu"]}


@torch.no_grad()
def total_variance(data: torch.Tensor, rows: torch.Tensor, chunk: int = 8_192) -> float:
    """sum over `rows` of data of ||x - mean||^2, in float64, chunk by chunk (no copy of the rows)."""
    rows = rows.to(data.device)
    mean = sum(data.index_select(0, part).sum(0, dtype=torch.float64) for part in rows.split(chunk)) / rows.shape[0]
    return sum((data.index_select(0, part).double() - mean).pow(2).sum().item() for part in rows.split(chunk))


def make_adam(sae: SAE, lr: float) -> torch.optim.Optimizer:
    """Fused Adam (one kernel for all parameters) where this torch supports it, else foreach."""
    try:
        return torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(sae.parameters(), lr=lr, foreach=True)


class TrainingRun:
    """One training run's loop and the state it checkpoints."""

    def __init__(self, sae: SAE, config: TrainConfig, data: torch.Tensor, split: Split, device, fingerprint: dict,
                 run_dir: Path | None):
        """data: (rows, d_in), all activations (train and validation); split: row indices into it."""
        self.sae, self.config, self.data, self.device = sae.to(device), config, data, device
        self.train, self.val = split.train.to(data.device), split.val.to(data.device)  # (n_train,), (n_val,)
        self.fingerprint, self.run_dir, self.wandb_id = fingerprint, run_dir, None
        self.optimizer = make_adam(sae, config.lr)
        self.progress = Progress(sae.d_sae, device)
        self.variance = total_variance(data, self.train)  # for the epochs' training FVU
        self.window = min(config.dead_after_tokens, self.train.shape[0])  # tokens; see TrainConfig
        self.aux_k = config.aux_k or default_aux_k(sae.d_in)
        self.work: dict = {}  # buffers the tied step reuses across steps

    def resume(self) -> bool:
        """Load the last checkpoint of run_dir; False when there is none."""
        directory = self.run_dir / "checkpoints"
        checkpoint = load_checkpoint(directory, self.device)
        if checkpoint is None:
            return False
        saved = {**checkpoint.state["config"], **checkpoint.state["data"]}
        current = {**dataclasses.asdict(self.config), **self.fingerprint}
        changed = {k: (saved.get(k), v) for k, v in current.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
        if changed:
            raise ValueError(f"cannot resume {directory}: the run was made with other settings or data {changed} "
                             "(checkpoint, now). Use the same settings to continue it, or start over with "
                             "overwrite=True (deletes its checkpoints) or another run_dir.")
        self.sae.load_state_dict(checkpoint.sae.state_dict())
        restore_optimizer(self.optimizer, checkpoint.tensors)
        self.progress.load(checkpoint.tensors, checkpoint.state)
        self.wandb_id = checkpoint.state.get("wandb_id")
        return True

    def checkpoint(self, log: RunLog) -> None:
        self.check_finite()
        if self.run_dir is not None:
            tensors, state = self.progress.to_checkpoint()
            state |= {"config": dataclasses.asdict(self.config), "data": self.fingerprint, "wandb_id": log.run_id}
            save_checkpoint(self.run_dir / "checkpoints", self.sae, self.optimizer, tensors, state)

    def check_finite(self) -> None:
        finite = self.progress.loss_is_finite() and bool(
            torch.stack([torch.isfinite(p).all() for p in self.sae.parameters()]).all())  # one host sync
        if not finite:
            where = (f"the last good checkpoint is in {self.run_dir / 'checkpoints'}" if self.run_dir
                     else "no checkpoint (no run_dir)")
            raise FloatingPointError(
                f"training stopped: the loss or the weights became NaN/inf by step {self.progress.step} "
                f"(epoch {self.progress.epoch}); {where}. Lower lr (now {self.config.lr}) or l1_coefficient, "
                "or check the activations for extreme values, then start a new run.")

    def l1_at(self, step: int) -> float:
        """λ at optimizer step `step` (1-based): a linear ramp over l1_warmup_steps, then constant."""
        warmup = self.config.l1_warmup_steps
        return self.config.l1_coefficient * (min(1.0, step / warmup) if warmup else 1.0)

    def loop(self, log: RunLog, max_steps: int | None, progress: bool) -> bool:
        """Runs to the last epoch (True) or to max_steps (False)."""
        cfg, p, n = self.config, self.progress, self.train.shape[0]
        steps_per_epoch = -(-n // cfg.batch_size)
        bar = tqdm(total=cfg.epochs * steps_per_epoch, initial=p.step, desc="SAE steps",
                   disable=not progress or p.epoch > cfg.epochs)  # a finished run shows no bar
        while p.epoch <= cfg.epochs:
            shuffle = torch.Generator(device=self.data.device).manual_seed(cfg.seed * 1_000_003 + p.epoch)
            for batch in shuffled_batches(self.data, cfg.batch_size, self.train, shuffle, start=p.batch):
                # forward/backward -> step -> constrain decoder -> account (no host sync)
                x = batch.to(self.device, non_blocking=True)  # (batch, d_in)
                dead = p.dead(self.window) if self.sae.k is not None else None  # only AuxK (topk) reads it
                stats = train_step(self.sae, x, self.l1_at(p.step + 1), dead, self.aux_k,
                                   cfg.aux_coefficient, self.work)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                normalise_decoder_rows(self.sae)
                p.add(x, stats)
                bar.update(1)
                if p.step % cfg.log_every == 0:  # one sync every log_every steps
                    self.log_step(stats, x, log, bar)
                if self.run_dir is not None and p.step % cfg.checkpoint_every == 0:
                    self.checkpoint(log)
                if max_steps is not None and p.step >= max_steps:
                    self.checkpoint(log)
                    bar.close()
                    return False
            self.end_epoch(log)
        bar.close()
        return True

    def log_step(self, stats, x: torch.Tensor, log: RunLog, bar) -> None:
        self.check_finite()
        sse = stats.sse.item()
        values = {"train/loss": stats.loss.item(), "train/mse": sse / x.numel(),
                  "train/penalty": stats.penalty.item(), "train/l0": torch.count_nonzero(stats.h).item() / x.shape[0],
                  "train/fvu": sse / (x - x.mean(0)).pow(2).sum().item(),
                  "train/dead_fraction": self.progress.dead(self.window).float().mean().item(),
                  "lr": self.config.lr, "l1_coefficient": self.l1_at(self.progress.step)}
        log.log(values, step=self.progress.step)
        bar.set_postfix(loss=f"{values['train/loss']:.4g}", l0=f"{values['train/l0']:.1f}")

    def end_epoch(self, log: RunLog) -> None:
        self.check_finite()
        row = self.progress.epoch_row(self.sae.d_in, self.window, self.variance)
        val = evaluate(self.sae, self.data, self.config.l1_coefficient, rows=self.val)
        row |= {f"val_{k}": v for k, v in val.items()}
        row |= {"lr": self.config.lr, "l1_coefficient": self.l1_at(self.progress.step)}
        self.progress.history.append(row)
        log.log({f"epoch/{k}": v for k, v in row.items()}, step=self.progress.step)
        self.checkpoint(log)
