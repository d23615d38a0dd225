"""One optimizer step, eager or replayed as one CUDA graph, and the running statistics it keeps.

A step is: the architecture's gradients (`sae.backward`) -> `sae.constrain_grads()` -> Adam ->
`sae.constrain_weights()` -> account the step (`RunningStats.add`). Nothing in it syncs with the host
and nothing in it is a Python number that changes from step to step: the learning rate and the
sparsity coefficient are device tensors that the host refills only when they change. So on CUDA the
whole step is captured once as a CUDA graph and replayed: one launch per step instead of ~30, which
at batch 512 is the difference between a GPU waiting on Python and a busy one. With the data on the
device the step gathers its own batch, by a device-side counter over the epoch's order
(`batching.GraphBatches`); data streamed from host memory is copied into a static buffer just before
each replay. Shapes must be static, so an epoch's last, shorter batch runs the same step eagerly on
the same tensors.
"""

from __future__ import annotations

import warnings

import torch

from saelab.sae import SAE, Losses
from saelab.train.batching import GraphBatches, InGraphBatch, device_batches

SUMS = ("loss", "sse", "sparsity", "aux", "rows")  # summed over an epoch by RunningStats
WARMUP_STEPS = 3  # eager steps on a side stream before capture: cuBLAS handles, Adam's state, autograd


class RunningStats:
    """Device tensors every step updates without a host sync: sums for the epoch's averages, and for
    each latent the training tokens since it last fired (dead = unfired for `window` tokens)."""

    def __init__(self, d_sae: int, device: torch.device, window: int):
        self.window = window
        self.since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        acc = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.sums = torch.zeros(len(SUMS), dtype=acc, device=device)
        self.one = torch.ones((), device=device)  # the rows slot of a step's terms
        self.scales: dict[int, torch.Tensor] = {}

    def add(self, losses: Losses, x: torch.Tensor) -> None:
        """Two small kernels for the sums (a stack, one multiply-add) and three for the counter: the loss
        terms are accumulated as the step gives them, and what the log reads (averages, FVU, training
        MSE) is derived from the sums at log points (saelab.train.loop), not in every step."""
        rows = x.shape[0]
        terms = torch.stack([losses.total, losses.mse, losses.sparsity, losses.aux, self.one])
        self.sums.addcmul_(terms, self._scale(rows, x.shape[1]))  # [loss, sse, sparsity, aux, rows] += ...
        self.since_fired.add_(rows).mul_(losses.mass == 0)  # latents that fired restart at 0

    def _scale(self, rows: int, d_in: int) -> torch.Tensor:
        """[1, rows d_in, 1, 1, rows]: turns a step's [total, mse, sparsity, aux, 1] into what the sums add
        up. One per batch size, made by fill kernels on first use (before any capture: the warm-up)."""
        if rows not in self.scales:
            scale = torch.ones_like(self.sums)
            scale[1], scale[4] = rows * d_in, rows
            self.scales[rows] = scale
        return self.scales[rows]

    def dead(self) -> torch.Tensor:
        """(d_sae,) bool: latents that have not fired in the last `window` training tokens."""
        return self.since_fired >= self.window

    def epoch_sums(self) -> dict[str, float]:
        """The sums as floats (one host sync), then zeroed for the next epoch."""
        values = dict(zip(SUMS, self.sums.tolist(), strict=True))
        self.sums.zero_()
        return values

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"since_fired": self.since_fired, "sums": self.sums}


def make_adam(sae: SAE, lr: float, device: torch.device, tensor_lr: bool | None = None) -> torch.optim.Optimizer:
    """Fused Adam (one kernel for all parameters). With `tensor_lr` (default: on CUDA) lr is a tensor on
    the parameters' device that a schedule refills, so no step reads a Python number and the step can live
    in a graph (on CUDA also `capturable`). The CPU's fused Adam takes a tensor lr too: the tests run that
    branch there."""
    tensor_lr = device.type == "cuda" if tensor_lr is None else tensor_lr
    if device.type == "cuda":
        lr_value = torch.tensor(lr, device=device) if tensor_lr else lr
        return torch.optim.Adam(sae.parameters(), lr=lr_value, fused=True, capturable=True)
    try:
        return torch.optim.Adam(sae.parameters(), lr=torch.tensor(lr) if tensor_lr else lr, fused=True)
    except (RuntimeError, ValueError):  # a device or build without the fused kernel
        return torch.optim.Adam(sae.parameters(), lr=lr, foreach=True)


class Stepper:
    """`stepper(x, full_batch)`: one optimizer step on the batch x. Captures itself as a CUDA graph on the
    first full batch when `graph` is set (CUDA only); otherwise, and for shorter batches, runs eagerly.
    `stepper.batches(...)` gives an epoch's batches; with data on the device and the graph on, full batches
    are gathered inside the graph (`GraphBatches`) and x is an `InGraphBatch` placeholder."""

    # gather full batches inside the step (GraphBatches): None = when the step is captured and the data is on
    # its device; True also selects them eagerly elsewhere (the CPU tests run that path)
    select_in_graph: bool | None = None

    def __init__(self, sae: SAE, optimizer: torch.optim.Optimizer, stats: RunningStats, device: torch.device,
                 dtype: torch.dtype = torch.float32, graph: bool = False):
        self.sae, self.optimizer, self.stats, self.device, self.dtype = sae, optimizer, stats, device, dtype
        self.sparsity = torch.zeros((), device=device)  # the architecture's coefficient (λ or λ0)
        self.graph = graph and device.type == "cuda"
        self.captured: torch.cuda.CUDAGraph | None = None
        self.x: torch.Tensor | None = None  # the graph's static batch
        self.losses: Losses | None = None  # the graph's static outputs
        self.last_lr: float | None = None  # the values last sent, so an unchanged one costs no launch
        self.last_sparsity: float | None = None
        self.last_x: torch.Tensor | None = None  # the last batch, for logging
        self.graph_batches: GraphBatches | None = None  # batch selection inside the step, once made

    def batches(self, data: torch.Tensor, order: torch.Tensor, batch_size: int, start: int = 0):
        """The epoch's batches from batch `start` on: `GraphBatches` when selected (see `select_in_graph`),
        else `device_batches` (tensors, gathered by the host, streamed when the data is in host memory)."""
        in_graph = self.select_in_graph if self.select_in_graph is not None else self.graph
        if not in_graph or data.device != self.device:
            return device_batches(data, order, batch_size, self.device, start=start)
        if self.graph_batches is None or self.graph_batches.order.shape[0] < order.shape[0]:
            self.graph_batches = GraphBatches(data, order.shape[0], batch_size)
        return self.graph_batches.batches(order, start)

    def set_lr(self, lr: float) -> None:
        if lr != self.last_lr:
            group = self.optimizer.param_groups[0]
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
            self.last_lr = lr

    def set_sparsity(self, coefficient: float) -> None:
        if coefficient != self.last_sparsity:
            self.sparsity.fill_(coefficient)
            self.last_sparsity = coefficient

    def body(self, x: torch.Tensor | None) -> Losses:
        """The step itself: everything here is captured in the graph. x None: gather the batch here."""
        x = self.graph_batches.gather() if x is None else x
        losses = self.sae.backward(x, self.sparsity, self.stats.dead(), self.dtype)
        self.sae.constrain_grads()
        self.optimizer.step()
        self.sae.constrain_weights()
        self.stats.add(losses, x)
        return losses

    def __call__(self, x: torch.Tensor | InGraphBatch, full_batch: int) -> Losses:
        """One step on the batch x (batch, d_in), float32 on the device, or on the next batch the step
        gathers itself (x an `InGraphBatch`)."""
        in_graph = isinstance(x, InGraphBatch)
        if not self.graph or x.shape[0] != full_batch:
            self.optimizer.zero_grad(set_to_none=True)
            self.last_x = self.graph_batches.gather() if in_graph else x
            return self.body(self.last_x)
        if self.captured is None:
            try:
                self._capture(None if in_graph else x)
            except RuntimeError as err:  # torch.AcceleratorError too: a capture that fails must not end the run
                warnings.warn(f"capturing the training step as a CUDA graph failed ({str(err).splitlines()[0]}); "
                              "training continues eagerly (slower, same result)", stacklevel=2)
                self.graph, self.captured = False, None
                return self(x, full_batch)
        if not in_graph:
            self.x.copy_(x)
        self.captured.replay()
        self.last_x = self.graph_batches.x if in_graph else self.x
        return self.losses

    def _capture(self, x: torch.Tensor | None) -> None:
        """Warm up on a side stream (as torch.cuda.graphs requires), capture on that same stream (autograd
        ties each parameter's gradient accumulator to the stream it was first used on: another stream for
        the capture invalidates it), then undo the warm-up's updates so the captured run starts exactly
        where the eager one would."""
        saved = self._state()
        try:
            self.x = x.clone() if x is not None else None  # None: the step gathers its batch (GraphBatches)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_STEPS):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.body(self.x)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.optimizer.zero_grad(set_to_none=True)
            self.captured = torch.cuda.CUDAGraph()
            # thread_local: the host-data prefetch thread may allocate pinned memory while this thread captures
            with torch.cuda.graph(self.captured, stream=side, capture_error_mode="thread_local"):
                self.losses = self.body(self.x)
        finally:  # also when the capture fails: the eager fallback starts from the same state
            self._restore(saved)

    def _state(self) -> dict[str, torch.Tensor | None]:
        """Copies of everything a step changes: weights, buffers, Adam's state, the running statistics."""
        live = self._live()
        return {name: (t.clone() if t is not None else None) for name, t in live.items()}

    def _live(self) -> dict[str, torch.Tensor | None]:
        tensors: dict[str, torch.Tensor | None] = {
            f"sae.{n}": t for n, t in self.sae.state_dict(keep_vars=True).items()}
        for i, p in enumerate(self.sae.parameters()):
            for key in ("exp_avg", "exp_avg_sq", "step"):
                tensors[f"adam.{i}.{key}"] = self.optimizer.state.get(p, {}).get(key)
        if self.graph_batches is not None:  # the warm-up counts batches too
            tensors["batches.counter"] = self.graph_batches.counter
        return tensors | {f"stats.{n}": t for n, t in self.stats.tensors().items()}

    @torch.no_grad()
    def _restore(self, saved: dict[str, torch.Tensor | None]) -> None:
        for name, tensor in self._live().items():
            if tensor is None:
                continue
            if saved[name] is None:  # Adam's state did not exist yet: a fresh state is all zeros
                tensor.zero_()
            else:
                tensor.copy_(saved[name])
