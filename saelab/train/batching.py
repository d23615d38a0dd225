"""Activations -> shuffled minibatches, without DataLoader per-item overhead and without copies.

The activations live in one tensor, on the training device when they fit (`to_training_device`,
`fits_on_device`). The train/validation split is two tensors of row *indices* into it
(`train_val_split`), so the data is never copied to split it (gpt2 profile: ~7.8 GB of float32
rows stay one tensor). An epoch is one seeded permutation of the training rows (`epoch_order`);
batch i is `index_select` of its slice i, so every training row is seen exactly once an epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch

GATHER_SLACK_BATCHES = 4  # zero rows after the epoch's order: warm-up steps before a capture may count past its end
CHECK_ROWS = 16_384  # rows per chunk when checking for NaN/inf (temporaries ~1.7x a chunk)
CHUNK_ROWS = 65_536  # rows per chunk streamed from host memory to a GPU (~200 MB at d_in 768, float32)


class Split(NamedTuple):
    train: torch.Tensor  # (n_train,) int64 row indices into the activations
    val: torch.Tensor  # (n_val,) int64 row indices, disjoint from train


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
    # chunk by chunk: isfinite on all rows at once makes temporaries ~1.7x the data (gpt2: ~13 GB)
    if not all(torch.isfinite(part).all() for part in activations.split(CHECK_ROWS)):
        bad = sum((~torch.isfinite(part)).any(dim=1).sum().item() for part in activations.split(CHECK_ROWS))
        raise ValueError(f"{bad} activation rows contain NaN or inf; drop them before training "
                         "(e.g. activations[torch.isfinite(activations).all(dim=1)])")


def as_activations(activations, d_in: int) -> torch.Tensor:
    """A (rows, d_in) floating tensor from a tensor or a numpy array, checked for what ruins training."""
    if not isinstance(activations, torch.Tensor) and hasattr(activations, "__array__"):
        activations = torch.as_tensor(activations)
    check_activations(activations)
    if activations.shape[1] != d_in:
        raise ValueError(f"activations have d_in={activations.shape[1]} but the SAE expects {d_in}; "
                         "build the SAE with d_in=activations.shape[1]")
    return activations


def train_val_split(n_rows: int, val_fraction: float, seed: int = 0) -> Split:
    """A seeded random split of row indices 0..n_rows-1; at least one row lands on each side.
    Index the activations with them (`index_select`, `epoch_order`): no copy."""
    if n_rows < 2:
        raise ValueError(f"need at least 2 activation rows to split into train and validation, got {n_rows}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")
    n_val = min(max(1, round(n_rows * val_fraction)), n_rows - 1)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))
    return Split(train=order[n_val:], val=order[:n_val])


def epoch_order(rows: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """`rows` (n,) in the seeded random order of `epoch` (seed·1000003 + epoch: resuming needs no RNG
    state). Drawn on the CPU whatever device `rows` is on, so a CUDA run sees the same batches as a
    CPU run; returned on rows' device."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return rows[torch.randperm(rows.shape[0], generator=generator).to(rows.device)]


def fits_on_device(data: torch.Tensor, device: str | torch.device, headroom: float = 0.5) -> bool:
    """True on CPU, or when `data` takes at most `headroom` of the accelerator's free memory."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    return data.numel() * 4 <= headroom * free_bytes  # held as float32 for training


def to_training_device(data: torch.Tensor, device: str | torch.device, dtype=torch.float32) -> torch.Tensor:
    """Move the whole dataset to `device` once (as float32) when it fits; else leave it on the host as it
    is (its own dtype, no copy): `device_batches` then streams it through pinned chunks."""
    if fits_on_device(data, device):
        return data.to(device=device, dtype=dtype)
    return data.cpu()


def device_batches(data: torch.Tensor, order: torch.Tensor, batch_size: int, device: torch.device, start: int = 0,
                   chunk_rows: int | None = None, prefetch: bool | None = None) -> Iterator[torch.Tensor]:
    """The batches data[order[i*B:(i+1)*B]] for i >= start, as float32 on `device`.

    Data on the device (or a CPU run): one gather per batch. Data on the host for a GPU run (larger than
    GPU memory; `prefetch` defaults to exactly that case): a background thread gathers the rows of the
    next chunk (`chunk_rows`, default CHUNK_ROWS) into pinned memory while the GPU trains on the current
    one, and each chunk is copied to the device on a side stream one chunk ahead, so neither the gather
    nor the copy waits for the other (measured in benchmarks/train.py, trainer saelab-host).
    """
    order, device = order[start * batch_size:], torch.empty(0, device=device).device  # "cuda" -> cuda:0
    if not (prefetch if prefetch is not None else data.device != device and device.type == "cuda"):
        for first in range(0, order.shape[0], batch_size):
            yield data.index_select(0, order[first:first + batch_size].to(data.device)).to(device, torch.float32)
        return
    chunk_rows = max(batch_size, (chunk_rows or CHUNK_ROWS) // batch_size * batch_size)  # whole batches per chunk
    chunks = order.cpu().split(chunk_rows)
    cuda = device.type == "cuda"
    copies = torch.cuda.Stream(device) if cuda else None

    def gather(rows: torch.Tensor) -> torch.Tensor:
        host = torch.empty((rows.shape[0], data.shape[1]), dtype=data.dtype, pin_memory=cuda)
        return torch.index_select(data, 0, rows, out=host)

    def to_device(host: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        if not cuda:
            return host.to(device, torch.float32), None
        with torch.cuda.stream(copies):
            chunk = host.to(device, non_blocking=True).float()
            done = torch.cuda.Event()
            done.record(copies)
        return chunk, done

    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = to_device(gather(chunks[0]))
        gathering = pool.submit(gather, chunks[1]) if len(chunks) > 1 else None
        for k in range(len(chunks)):
            chunk, done = ahead
            if gathering is not None:  # chunk k+1 starts copying while the device works on chunk k
                ahead = to_device(gathering.result())
                gathering = pool.submit(gather, chunks[k + 2]) if k + 2 < len(chunks) else None
            if cuda:
                torch.cuda.current_stream(device).wait_event(done)
                chunk.record_stream(torch.cuda.current_stream(device))  # made on `copies`, read on this stream
            yield from chunk.split(batch_size)


class InGraphBatch(NamedTuple):
    """A full batch that the step gathers itself (`GraphBatches.gather`): stands in for the tensor."""

    shape: torch.Size  # (batch, d_in), the gathered tensor's


class GraphBatches:
    """Batch selection inside the captured step, for data on the training device: the epoch's order sits in
    a static device buffer and a device-side counter i names the batch, so each replay gathers its own
    x = data[order[i B : (i + 1) B]] and counts i up; the host only replays (no Python gather, no copy into
    the graph's input). The epoch's last, shorter batch is a plain tensor, run eagerly as before."""

    def __init__(self, data: torch.Tensor, n_rows: int, batch_size: int):
        device = data.device
        self.data, self.batch_size = data, batch_size
        self.order = torch.zeros(n_rows + GATHER_SLACK_BATCHES * batch_size, dtype=torch.int64, device=device)
        self.offsets = torch.arange(batch_size, device=device)
        self.counter = torch.zeros((), dtype=torch.int64, device=device)
        self.positions = torch.empty(batch_size, dtype=torch.int64, device=device)  # into order
        self.rows = torch.empty(batch_size, dtype=torch.int64, device=device)  # into data
        self.x = torch.empty(batch_size, data.shape[1], device=device)  # the step's batch, float32

    def batches(self, order: torch.Tensor, start: int = 0) -> Iterator[InGraphBatch | torch.Tensor]:
        """The batches of `order` from batch `start` on: an `InGraphBatch` for each full one, the last
        shorter one as a tensor (as `device_batches` gives it)."""
        n, size = order.shape[0], self.batch_size
        self.order[:n].copy_(order)
        self.counter.fill_(start)
        shape = torch.Size((size, self.data.shape[1]))
        for _ in range(start, n // size):
            yield InGraphBatch(shape)
        if n % size and start <= n // size:
            yield self.data.index_select(0, order[n - n % size:]).float()

    def gather(self) -> torch.Tensor:
        """Four kernels, no host sync: x = data[order[counter B + arange(B)]]; counter += 1."""
        torch.add(self.offsets, self.counter, alpha=self.batch_size, out=self.positions)
        torch.index_select(self.order, 0, self.positions, out=self.rows)
        torch.index_select(self.data, 0, self.rows, out=self.x)
        self.counter.add_(1)
        return self.x
