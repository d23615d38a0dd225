"""The training step without a GPU: the tied SAE's one-GEMM gradient, the written-out bfloat16 path, the
running statistics, a step body that never syncs with the host (what a CUDA graph needs), and Adam's
tensor learning rate (the branch CUDA takes) on the CPU, resumed too."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from saelab.sae import ARCHITECTURES, SAE, Losses, sae_for
from saelab.sae.base import SAE as BaseSAE
from saelab.train import batching, loop
from saelab.train.loop import train_sae
from saelab.train.step import RunningStats, Stepper, make_adam

OPTIONS = {"topk": {"k": 4}, "batchtopk": {"k": 4}}
aten = torch.ops.aten
# ops whose result the host must read (a device -> host copy and a wait): forbidden inside a CUDA graph
HOST_SYNCS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select,
              aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.bincount}


class NoHostSync(TorchDispatchMode):
    """Raises on any op that makes the host wait for a value computed on the device (`.item()`, `float(t)`,
    `bool(t)`, `tolist()` of a scalar, data-dependent shapes such as `nonzero` or boolean indexing)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masks = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1])  # boolean indexing: nonzero
        if func.overloadpacket in HOST_SYNCS or masks:
            raise AssertionError(f"{func} syncs with the host inside the step")
        return func(*args, **(kwargs or {}))


def grads(sae) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in sae.named_parameters()}


def tied_grads(sae, x, coefficient, path: str, dtype=None) -> tuple[Losses, dict]:
    sae.zero_grad(set_to_none=True)
    if path == "autograd":
        losses = BaseSAE.backward(sae, x, coefficient, None, dtype=x.dtype)
    elif path == "one_gemm":
        losses = sae._one_gemm_grads(x, coefficient, dtype or x.dtype)
    else:
        losses = sae._exact_grads(x, coefficient, augmented=path == "two_gemms_augmented")
    return Losses(*(t.clone() for t in losses)), grads(sae)


@pytest.mark.parametrize("d_in", [6, 16])  # padded operand rows: 6 + 2 -> 16, 16 + 2 -> 32
def test_the_one_gemm_gradient_equals_the_two_gemm_one_and_autograd_in_float64(d_in):
    sae = SAE(d_in=d_in, d_sae=24).double()
    x, coefficient = 3 * torch.randn(11, d_in, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(d_in))  # a nonzero b_dec reaches g
    one, one_grads = tied_grads(sae, x, coefficient, "one_gemm")
    assert (one.h == 0).any() and (one.h > 0).any()  # the ReLU's mask is exercised
    for path in ("two_gemms", "two_gemms_augmented", "autograd"):
        ref, ref_grads = tied_grads(sae, x, coefficient, path)
        for name in ("total", "mse", "sparsity", "aux", "h", "mass"):
            torch.testing.assert_close(getattr(one, name), getattr(ref, name), rtol=1e-12, atol=1e-12,
                                       msg=f"{name} vs {path}")
        for name, grad in ref_grads.items():
            torch.testing.assert_close(one_grads[name], grad, rtol=1e-12, atol=1e-12, msg=f"{name} vs {path}")


def test_backward_takes_the_selected_weight_gradient():
    sae = SAE(d_in=6, d_sae=12).double()
    x, coefficient = torch.randn(5, 6, dtype=torch.float64), torch.tensor(0.1, dtype=torch.float64)
    seen = []
    sae._one_gemm_grads = lambda *a: seen.append("one_gemm") or type(sae)._one_gemm_grads(sae, *a)
    sae._exact_grads = lambda *a, **k: seen.append("two_gemms") or type(sae)._exact_grads(sae, *a, **k)
    for choice in ("one_gemm", "two_gemms"):
        sae.weight_gradient = choice
        sae.backward(x, coefficient, None, dtype=torch.float64)
    assert seen == ["one_gemm", "two_gemms"]
    sae.weight_gradient = "three_gemms"
    with pytest.raises(ValueError, match="choose 'one_gemm' or 'two_gemms'"):
        sae.backward(x, coefficient, None, dtype=torch.float64)


def test_the_bfloat16_path_keeps_float32_gradients_close_to_float32():
    sae = SAE(d_in=16, d_sae=64)
    x, coefficient = 3 * torch.randn(32, 16), torch.tensor(0.05)
    low, low_grads = tied_grads(sae, x, coefficient, "one_gemm", dtype=torch.bfloat16)
    full, full_grads = tied_grads(sae, x, coefficient, "one_gemm")
    assert low.h.dtype == torch.bfloat16 and low.mass.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in low_grads.values())
    assert all(p.dtype == torch.float32 for p in sae.parameters())  # the master weights
    for name, grad in full_grads.items():  # bfloat16 keeps 8 mantissa bits: ~0.4% per rounding
        assert (low_grads[name] - grad).norm() <= 2e-2 * grad.norm(), name
    for name in ("total", "mse", "sparsity"):
        assert getattr(low, name).item() == pytest.approx(getattr(full, name).item(), rel=2e-2), name


def test_running_stats_sum_what_the_epoch_averages_need():
    stats = RunningStats(3, torch.device("cpu"), window=5)
    for total, mse, rows, mass in ((1.0, 0.5, 4, [0.0, 2.0, 0.0]), (3.0, 0.25, 2, [0.0, 0.0, 1.0])):
        t = torch.tensor
        stats.add(Losses(t(total), t(mse), t(2 * total), t(0.0), torch.zeros(rows, 3), t(mass)), torch.zeros(rows, 7))
    assert stats.epoch_sums() == {"loss": 4.0, "sse": 0.5 * 4 * 7 + 0.25 * 2 * 7, "sparsity": 8.0, "aux": 0.0,
                                  "rows": 6.0}
    assert stats.since_fired.tolist() == [6, 2, 0]  # tokens since each latent last fired
    assert stats.dead().tolist() == [True, False, False]
    assert stats.epoch_sums()["rows"] == 0.0  # zeroed for the next epoch


def test_the_sync_guard_catches_a_sync():
    with NoHostSync(), pytest.raises(AssertionError, match="syncs with the host"):
        float(torch.ones(()) * 2)
    with NoHostSync(), pytest.raises(AssertionError, match="syncs with the host"):
        torch.arange(4)[torch.arange(4) > 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_step_body_never_syncs_with_the_host(architecture, dtype, monkeypatch):
    """What a CUDA graph needs, checked on the CPU: no op in the step waits for a device value."""
    sae = sae_for(architecture, 8, 32, **OPTIONS.get(architecture, {}))
    sparse = getattr(type(sae), "_sparse_grads", None)
    if sparse is not None:  # TopK's sparse step syncs on the CPU by design (cheap there): check the path CUDA takes
        monkeypatch.setattr(type(sae), "_sparse_grads", lambda self, x, dead, capturable: sparse(self, x, dead, True))
    device = torch.device("cpu")
    stepper = Stepper(sae, make_adam(sae, 1e-3, device, tensor_lr=True), RunningStats(32, device, 64), device,
                      dtype)
    stepper.set_lr(1e-3)
    stepper.set_sparsity(1e-2)
    x = 3 * torch.randn(16, 8)
    for _ in range(3):  # the first step makes the buffers and Adam's state, the others reuse them
        stepper.optimizer.zero_grad(set_to_none=True)
        with NoHostSync():
            losses = stepper.body(x)
    assert torch.isfinite(losses.total) and stepper.stats.sums[4] == 48


def low_rank_data(n: int = 600, d_in: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, generator=generator) @ torch.randn(3, d_in, generator=generator)


@pytest.fixture(name="adam_lr")
def adam_lr_fixture(monkeypatch):
    """Sets whether the loop's Adam takes lr as a tensor; records each optimizer's lr type."""
    made, choice = [], {"tensor_lr": False}

    def make(sae, lr, device):
        optimizer = make_adam(sae, lr, device, tensor_lr=choice["tensor_lr"])
        made.append(type(optimizer.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(loop, "make_adam", make)
    return choice, made


def test_a_tensor_lr_trains_as_a_float_lr_and_resumes_exactly(tmp_path, adam_lr):
    choice, made = adam_lr
    settings = dict(epochs=3, batch_size=64, progress=False, lr=3e-3, lr_warm_up_steps=5,
                    lr_scheduler_name="cosineannealing", l1_coefficient=1e-2, l1_warm_up_steps=7)

    def run(**options):
        torch.manual_seed(3)
        return train_sae(SAE(8, 32), low_rank_data(), **(settings | options)).sae

    as_float = run()
    choice["tensor_lr"] = True
    as_tensor = run()
    run(run_dir=tmp_path / "cut", max_steps=11)  # stops mid-epoch 2, after warm-up
    resumed = run(run_dir=tmp_path / "cut")
    assert made == [float, torch.Tensor, torch.Tensor, torch.Tensor]
    for name, value in as_float.state_dict().items():
        torch.testing.assert_close(as_tensor.state_dict()[name], value, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(resumed.state_dict()[name], as_tensor.state_dict()[name], rtol=0, atol=0)


def test_make_adam_puts_a_tensor_lr_where_the_parameters_are():
    sae = SAE(4, 8)
    assert isinstance(make_adam(sae, 1e-3, torch.device("cpu")).param_groups[0]["lr"], float)
    lr = make_adam(sae, 1e-3, torch.device("cpu"), tensor_lr=True).param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.device.type == "cpu" and lr.item() == pytest.approx(1e-3)


def test_batches_selected_in_the_step_are_the_host_gathered_ones():
    data, order = torch.randn(50, 4), torch.randperm(50)
    for start in (0, 3):
        expected = list(batching.device_batches(data, order, 8, torch.device("cpu"), start=start))
        selector = batching.GraphBatches(data, 50, 8)
        got = [b if isinstance(b, torch.Tensor) else selector.gather().clone() for b in selector.batches(order, start)]
        assert [b.shape[0] for b in got] == [8] * (6 - start) + [2]
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_training_with_batches_selected_in_the_step_equals_the_host_gathered_run(tmp_path, monkeypatch):
    settings = dict(epochs=2, batch_size=64, progress=False, l1_coefficient=1e-2)

    def run(**options):
        torch.manual_seed(3)
        return train_sae(SAE(8, 32), low_rank_data(), **(settings | options)).sae

    host = run()
    monkeypatch.setattr(Stepper, "select_in_graph", True)
    gathers, gather = [], batching.GraphBatches.gather
    monkeypatch.setattr(batching.GraphBatches, "gather", lambda self: gathers.append(1) or gather(self))
    in_step = run()
    run(run_dir=tmp_path / "cut", max_steps=11)  # mid-epoch 2: the counter restarts at batch 2 of epoch 2
    resumed = run(run_dir=tmp_path / "cut")
    assert len(gathers) == 16 + 11 + 5  # 540 training rows, 8 full batches of 64 an epoch: two epochs, 11 steps, 5
    for name, value in host.state_dict().items():
        assert torch.equal(in_step.state_dict()[name], value), name
        assert torch.equal(resumed.state_dict()[name], value), name


def test_the_step_gathering_its_own_batch_never_syncs_and_its_warm_up_is_undone():
    sae = SAE(8, 32)
    device = torch.device("cpu")
    stepper = Stepper(sae, make_adam(sae, 1e-3, device, tensor_lr=True), RunningStats(32, device, 64), device)
    stepper.set_lr(1e-3)
    stepper.set_sparsity(1e-2)
    stepper.select_in_graph = True
    batches = stepper.batches(low_rank_data(n=100), torch.randperm(100), 16)
    assert isinstance(next(batches), batching.InGraphBatch)
    saved = stepper._state()
    with NoHostSync():
        stepper.body(None)
    assert stepper.graph_batches.counter == 1 and "batches.counter" in saved
    stepper._restore(saved)
    assert stepper.graph_batches.counter == 0
