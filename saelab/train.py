"""Train an SAE on a tensor of activations: the seed's recipe (Adam, fixed lr, λ·L1).

    sae = SAE(d_in=768, d_sae=6144)
    result = train_sae(sae, activations, epochs=100)
    result.history.plot(x="epoch", y="val_loss")

The trainer never sees the language model: it takes activations (a tensor here; the
activation store is read into one by notebook 03).
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch
from tqdm.auto import tqdm

from saelab.batching import check_activations, sequential_batches, shuffled_batches, to_training_device, train_val_split
from saelab.loss import l1_penalty, reconstruction_mse
from saelab.sae import SAE


class TrainResult(NamedTuple):
    sae: SAE  # the trained SAE (same object that was passed in)
    history: pd.DataFrame  # one row per epoch: train/val losses, L0, fraction active


@torch.no_grad()
def evaluate(sae: SAE, data: torch.Tensor, l1_coefficient: float, batch_size: int = 4096) -> dict:
    """Averages over all rows of `data` (batch-size independent): loss parts, L0, active fraction."""
    totals = {"mse": 0.0, "l1": 0.0, "l0": 0.0}
    device = next(sae.parameters()).device
    for batch in sequential_batches(data, batch_size):
        batch = batch.to(device, torch.float32)
        x_hat, h = sae(batch)
        rows = batch.shape[0]
        totals["mse"] += reconstruction_mse(batch, x_hat).item() * rows
        totals["l1"] += l1_penalty(h).item() * rows
        totals["l0"] += (h > 0).sum().item()
    n = data.shape[0]
    mse, l1, l0 = totals["mse"] / n, totals["l1"] / n, totals["l0"] / n
    return {"mse": mse, "l1": l1, "loss": mse + l1_coefficient * l1, "l0": l0,
            "fraction_active": l0 / sae.d_sae}


def train_sae(sae: SAE, activations: torch.Tensor, *, l1_coefficient: float = 1e-3, lr: float = 1e-3,
              batch_size: int = 512, epochs: int = 100, val_fraction: float = 0.1, seed: int = 0,
              device: str | None = None, progress: bool = True) -> TrainResult:
    """Fit `sae` to `activations` (rows, d_in) with the seed's loss; returns it with a history."""
    check_activations(activations)
    if activations.shape[1] != sae.d_in:
        raise ValueError(f"activations have d_in={activations.shape[1]} but the SAE expects {sae.d_in}; "
                         "build the SAE with SAE(d_in=activations.shape[1], ...)")
    device = device or next(sae.parameters()).device.type
    sae.to(device)
    split = train_val_split(activations, val_fraction, seed)
    train = to_training_device(split.train, device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    shuffle = torch.Generator(device=train.device).manual_seed(seed)
    rows = []
    for epoch in tqdm(range(1, epochs + 1), desc="epochs", disable=not progress):
        for batch in shuffled_batches(train, batch_size, generator=shuffle):
            x_hat, h = sae(batch)
            loss = reconstruction_mse(batch, x_hat) + l1_coefficient * l1_penalty(h)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} in epoch {epoch}; lower lr or check the "
                                     "activations for extreme values")
        val = evaluate(sae, split.val, l1_coefficient)
        rows.append({"epoch": epoch, "train_loss": loss.item(),
                     **{f"val_{name}": value for name, value in val.items()}})
    return TrainResult(sae=sae, history=pd.DataFrame(rows))
