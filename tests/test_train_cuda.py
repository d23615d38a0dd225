"""Training on CUDA: the captured step, resume, bfloat16, host-streamed data, against CPU and eager runs.

Run on a machine with a GPU (they are skipped elsewhere): `pytest -m device`. Tolerances: with TF32 off,
CUDA float32 differs from the CPU only in summation order (~1e-6 relative per op); a few hundred Adam
steps amplify that where gradients are near zero (Adam's step is ~lr whatever the gradient's size), so
weights are compared to 1e-3 and per-epoch metrics to 1e-3 relative. The captured graph replays the very
kernels the eager step launches, and resume copies exact tensors, so those are compared to 1e-6.
"""

import pandas as pd
import pytest
import torch

from saelab.sae import ARCHITECTURES, sae_for
from saelab.train import batching
from saelab.train.loop import train_profile, train_sae

pytestmark = [pytest.mark.device,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
OPTIONS = {"topk": {"k": 4}, "batchtopk": {"k": 4}}


def data(n: int = 3300, d_in: int = 16) -> torch.Tensor:
    """2970 training rows: 92 full batches of 32 and a short one each epoch (the eager path)."""
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(8, d_in, generator=generator)
    codes = torch.rand(n, 8, generator=generator) * (torch.rand(n, 8, generator=generator) < 0.3)
    return codes @ directions


def train(architecture: str, device: str, **options):
    torch.manual_seed(1)
    sae = sae_for(architecture, 16, 64, **OPTIONS.get(architecture, {}))
    settings = dict(epochs=3, batch_size=32, progress=False, dead_after_tokens=500, tf32=False)
    return train_sae(sae, data(), device=device, **(settings | options))


def weights(sae) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().double() for name, t in sae.state_dict().items()}


def assert_weights_close(a, b, atol: float) -> None:
    for name, value in weights(a).items():
        assert torch.allclose(value, weights(b)[name], atol=atol), (name, (value - weights(b)[name]).abs().max())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_captured_step_follows_the_eager_trajectory(architecture):
    graph = train(architecture, "cuda")
    eager = train(architecture, "cuda", cuda_graph=False)
    assert_weights_close(graph.sae, eager.sae, atol=1e-6)
    pd.testing.assert_frame_equal(graph.history, eager.history, rtol=1e-6)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_cuda_training_matches_cpu_training(architecture):
    gpu, cpu = train(architecture, "cuda"), train(architecture, "cpu")
    assert next(gpu.sae.parameters()).is_cuda
    if architecture in ("tied", "standard"):  # continuous in the weights: TopK/JumpReLU may flip near-ties
        assert_weights_close(gpu.sae, cpu.sae, atol=1e-3)
    for column in ("val_fvu", "val_l0", "train_mse"):
        assert gpu.history[column].to_numpy() == pytest.approx(cpu.history[column].to_numpy(), rel=1e-2), column


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_resumed_cuda_run_equals_an_uninterrupted_one(tmp_path, architecture):
    whole = train(architecture, "cuda", run_dir=tmp_path / "whole")
    train(architecture, "cuda", run_dir=tmp_path / "cut", max_steps=150)  # mid-epoch 2, graph captured
    resumed = train(architecture, "cuda", run_dir=tmp_path / "cut")
    assert_weights_close(whole.sae, resumed.sae, atol=1e-6)


def test_tf32_training_stays_close_to_float32():
    tf32, full = train("tied", "cuda", tf32=True), train("tied", "cuda")
    assert tf32.history["val_fvu"].iloc[-1] == pytest.approx(full.history["val_fvu"].iloc[-1], rel=2e-2)


def test_bfloat16_keeps_float32_weights_and_learns_like_float32():
    bf16, full = train("standard", "cuda", dtype="bfloat16"), train("standard", "cuda")
    assert all(p.dtype == torch.float32 for p in bf16.sae.parameters())
    assert bf16.history["val_fvu"].iloc[-1] == pytest.approx(full.history["val_fvu"].iloc[-1], rel=0.1)


def test_host_streamed_data_trains_as_device_data(monkeypatch):
    on_device = train("tied", "cuda")
    monkeypatch.setattr(batching, "fits_on_device", lambda *args, **kwargs: False)
    monkeypatch.setattr(batching, "CHUNK_ROWS", 1024)  # several chunks per epoch
    with pytest.warns(UserWarning, match=r"do not fit in cuda(:0)? memory: they stay in host memory"):
        streamed = train("tied", "cuda")
    assert_weights_close(on_device.sae, streamed.sae, atol=1e-6)


def test_train_profile_on_cuda_leaves_the_sae_there_and_saves_it_loadable():
    from saelab import paths
    from saelab.config import load_profile
    from saelab.sae import SAE

    profile = load_profile("offline", d_in=16, expansion_factor=2, epochs=1, batch_size=64)
    result = train_profile(profile, data(), progress=False, device="cuda")
    assert next(result.sae.parameters()).is_cuda  # documented: result.sae stays on the training device
    saved = SAE.load(paths.sae_dir(profile))
    assert torch.equal(saved.W_enc, result.sae.W_enc.cpu())


SCHEDULES = dict(lr_warm_up_steps=20, lr_scheduler_name="cosineannealing", lr_decay_steps=30, l1_warm_up_steps=40)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_captured_step_follows_the_eager_one_through_warm_ups_and_a_cosine_schedule(architecture):
    """The graph reads lr and λ from device tensors the host refills: every schedule value must reach it."""
    graph = train(architecture, "cuda", **SCHEDULES)
    eager = train(architecture, "cuda", cuda_graph=False, **SCHEDULES)
    assert_weights_close(graph.sae, eager.sae, atol=1e-6)
    pd.testing.assert_frame_equal(graph.history, eager.history, rtol=1e-6)


def test_the_tied_bfloat16_step_captured_follows_it_eager():
    graph = train("tied", "cuda", dtype="bfloat16", **SCHEDULES)
    eager = train("tied", "cuda", dtype="bfloat16", cuda_graph=False, **SCHEDULES)
    assert all(p.dtype == torch.float32 for p in graph.sae.parameters())
    assert_weights_close(graph.sae, eager.sae, atol=1e-6)
    pd.testing.assert_frame_equal(graph.history, eager.history, rtol=1e-6)


def test_tied_bfloat16_written_out_learns_like_float32():
    bf16, full = train("tied", "cuda", dtype="bfloat16"), train("tied", "cuda")
    assert bf16.history["val_fvu"].iloc[-1] == pytest.approx(full.history["val_fvu"].iloc[-1], rel=0.1)
    assert bf16.history["val_l0"].iloc[-1] == pytest.approx(full.history["val_l0"].iloc[-1], rel=0.1)


def test_one_and_two_gemm_weight_gradients_agree_on_cuda(monkeypatch):
    """One step's gradients (TF32 off: float32 products, other summation orders), then whole runs."""
    from saelab.sae import SAE
    from saelab.sae.relu import TiedSAE

    x, coefficient = 3 * data()[:512].cuda(), torch.tensor(1e-2, device="cuda")
    grads = {}
    for choice in ("one_gemm", "two_gemms"):
        torch.manual_seed(1)
        sae = SAE(16, 64).cuda()
        sae.weight_gradient = choice
        losses = sae.backward(x, coefficient, None)
        grads[choice] = [losses.total.item(), *(p.grad.clone() for p in sae.parameters())]
    assert grads["one_gemm"][0] == pytest.approx(grads["two_gemms"][0], rel=1e-5)
    for one, two in zip(grads["one_gemm"][1:], grads["two_gemms"][1:], strict=True):
        torch.testing.assert_close(one, two, rtol=1e-4, atol=1e-6)
    runs = {}
    for choice in ("one_gemm", "two_gemms"):
        monkeypatch.setattr(TiedSAE, "weight_gradient", choice)  # the class default: train() builds a fresh SAE
        runs[choice] = train("tied", "cuda")
    assert_weights_close(runs["one_gemm"].sae, runs["two_gemms"].sae, atol=1e-3)
