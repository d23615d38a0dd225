"""The training loop's running state: what a checkpoint must hold to resume exactly.

Tensors stay on the training device and are updated without host syncs; `epoch_row` syncs
once per epoch. `to_checkpoint` / `from_checkpoint` split the state into safetensors-able
tensors and JSON-able numbers (no pickle).
"""

from __future__ import annotations

import torch

from saelab.recipes import StepStats

SUMS = ("loss", "sse", "penalty", "steps", "rows")  # scalars summed over the epoch


class Progress:
    def __init__(self, d_sae: int, device: str | torch.device):
        self.step, self.epoch, self.batch = 0, 1, 0  # steps done; current epoch (1-based); batch in it
        self.tokens = 0  # training tokens seen, all epochs
        self.history: list[dict] = []  # one dict per finished epoch
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)  # tokens since last fired
        self.sums = {name: torch.zeros((), dtype=torch.float64, device=device) for name in SUMS}

    @torch.no_grad()
    def add(self, x: torch.Tensor, stats: StepStats) -> None:
        """Account one step (no host sync)."""
        batch = x.shape[0]
        for name, value in (("loss", stats.loss), ("sse", stats.sse), ("penalty", stats.penalty)):
            self.sums[name] += value
        self.sums["steps"] += 1
        self.sums["rows"] += batch
        self.since_fired.add_(batch).mul_(stats.mass == 0)  # latents that fired restart at 0
        self.step, self.batch, self.tokens = self.step + 1, self.batch + 1, self.tokens + batch

    def dead(self, window_tokens: int) -> torch.Tensor:
        """(d_sae,) bool: not fired in the last `window_tokens` training tokens."""
        return self.since_fired >= window_tokens

    def loss_is_finite(self) -> bool:
        return bool(torch.isfinite(self.sums["loss"]))

    @torch.no_grad()
    def epoch_row(self, d_in: int, window_tokens: int, variance: float) -> dict[str, float]:
        """The epoch's training averages; resets the sums for the next epoch. `variance` is
        sum ||x - mean||^2 over the training rows, each of which the epoch saw once (for FVU)."""
        s = {name: value.item() for name, value in self.sums.items()}
        rows = max(s["rows"], 1)
        row = {"epoch": self.epoch, "step": self.step, "tokens": self.tokens,
               "train_loss": s["loss"] / max(s["steps"], 1), "train_mse": s["sse"] / (rows * d_in),
               "train_penalty": s["penalty"] / max(s["steps"], 1),
               "train_fvu": s["sse"] / variance if variance > 0 else float("nan"),
               "dead_fraction": self.dead(window_tokens).float().mean().item()}
        for value in self.sums.values():
            value.zero_()
        self.epoch, self.batch = self.epoch + 1, 0
        return row

    def to_checkpoint(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"since_fired": self.since_fired, **{f"sum.{name}": value for name, value in self.sums.items()}}
        return tensors, {"step": self.step, "epoch": self.epoch, "batch": self.batch, "tokens": self.tokens,
                         "history": self.history}

    def load(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.tokens, self.history = state["tokens"], state["history"]
        self.since_fired.copy_(tensors["since_fired"])
        for name in SUMS:
            self.sums[name].copy_(tensors[f"sum.{name}"])
