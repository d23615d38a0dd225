"""Where work runs: saelab's device rule, written once here and followed by every module.

1. A function that takes `device` honours it.
2. A function given a module (an LM, an SAE) and no `device` runs where that module lives.
3. It moves what it needs to that device itself, and never moves the caller's module
   (`nn.Module.to` moves in place): tensors (tokens, activation chunks) are moved freely; an SAE,
   small, is copied there when it lives elsewhere (`module_on`); the language model, large, is
   never copied: a `device` that disagrees with the LM's is an error saying which is where
   (`check_device`). Results come back on the CPU.
4. No float64 tensors on MPS, which has none: accumulators take `accumulator_dtype(device)`.

A TransformerLens model keeps its own `cfg.device`, where it sends the tokens it is given: saelab
builds and moves LMs so that it always names where the weights are (`saelab.data.lm`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def canonical(device: str | torch.device) -> torch.device:
    """'cuda' -> cuda:0 (the current card), 'cpu' -> cpu: the name a tensor made there reports."""
    return torch.empty(0, device=device).device


def device_of(module: nn.Module) -> torch.device:
    """Where the module's first parameter (or buffer) lives; the CPU for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def module_on(module: nn.Module, device: str | torch.device) -> nn.Module:
    """`module` itself if it lives on `device`, else a copy there: the caller's module stays put."""
    device = canonical(device)
    return module if device_of(module) == device else copy.deepcopy(module).to(device)


def check_device(module: nn.Module, device: str | torch.device | None, what: str = "the LM") -> torch.device:
    """The module's device, after checking that `device` (if given) names the same one."""
    here = device_of(module)
    if device is not None and canonical(device) != here:
        raise ValueError(f"{what} is on {here} but device={str(device)!r} was asked for: move it first "
                         f"(lm.to({str(device)!r})) or leave device out to run on {here}")
    return here


def accumulator_dtype(device: str | torch.device) -> torch.dtype:
    """float64 for sums over many rows, except on MPS (no float64 there): float32."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


@contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 float32 matmuls on CUDA while the block runs (`enabled`), then the caller's setting again:
    the flag is process-wide, so nothing after the block runs in TF32 by accident. Uses torch's
    `fp32_precision` where it exists (torch >= 2.9 raises when the legacy `allow_tf32` flag is read
    after the new one was set; the new one reads fine either way)."""
    matmul = torch.backends.cuda.matmul
    name, tf32 = ("fp32_precision", "tf32") if hasattr(matmul, "fp32_precision") else ("allow_tf32", True)
    previous = getattr(matmul, name)
    if enabled:
        setattr(matmul, name, tf32)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def tf32_enabled() -> bool:
    """Whether float32 matmuls on CUDA currently run in TF32 (read through the same flag as above)."""
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
