"""Activations -> shuffled minibatches, without DataLoader per-item overhead.

The activations live in one tensor, on the training device when they fit; an epoch is one
`randperm` on that device and `index_select` per batch, so every row is seen exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch


class Split(NamedTuple):
    train: torch.Tensor  # (n_train, d_in)
    val: torch.Tensor  # (n_val, d_in)


def check_activations(activations: torch.Tensor) -> None:
    """Clear errors for the inputs that silently ruin training."""
    if not isinstance(activations, torch.Tensor) or activations.ndim != 2:
        shape = getattr(activations, "shape", type(activations).__name__)
        raise ValueError(f"activations must be a 2-D tensor (rows, d_in), got {shape}; "
                         "flatten (batch, pos, d_in) with .reshape(-1, d_in)")
    if activations.shape[0] == 0:
        raise ValueError("activations are empty: capture some first (notebook 02) or check the store")
    if not activations.is_floating_point():
        raise ValueError(f"activations must be floating point, got {activations.dtype}")
    if not torch.isfinite(activations).all():
        bad = (~torch.isfinite(activations)).any(dim=1).sum().item()
        raise ValueError(f"{bad} activation rows contain NaN or inf; drop them before training "
                         "(e.g. activations[torch.isfinite(activations).all(dim=1)])")


def train_val_split(activations: torch.Tensor, val_fraction: float, seed: int = 0) -> Split:
    """A seeded random split of rows; at least one row lands on each side."""
    n = activations.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 activation rows to split into train and validation, got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Split(train=activations[order[n_val:]], val=activations[order[:n_val]])


def shuffled_batches(data: torch.Tensor, batch_size: int, generator: torch.Generator | None = None,
                     drop_last: bool = False) -> Iterator[torch.Tensor]:
    """One epoch: every row exactly once, in random order; the last batch may be short."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = torch.randperm(data.shape[0], generator=generator,
                           device=generator.device if generator is not None else data.device)
    order = order.to(data.device)
    stop = data.shape[0] - (data.shape[0] % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        yield data.index_select(0, order[start:start + batch_size])


def sequential_batches(data: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """In order, for evaluation."""
    for start in range(0, data.shape[0], batch_size):
        yield data[start:start + batch_size]


def fits_on_device(data: torch.Tensor, device: str | torch.device, headroom: float = 0.5) -> bool:
    """True on CPU, or when `data` takes at most `headroom` of the accelerator's free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return data.numel() * 4 <= headroom * free_bytes  # held as float32 for training


def to_training_device(data: torch.Tensor, device: str | torch.device, dtype=torch.float32) -> torch.Tensor:
    """Move the whole dataset to `device` once (as float32) when it fits; else keep it on the host."""
    target = device if fits_on_device(data, device) else "cpu"
    return data.to(device=target, dtype=dtype)
