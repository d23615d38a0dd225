import pytest
import torch

# The device tests take the `device` fixture: each runs on the CPU, and again on CUDA where a GPU exists;
# `pytest -m device` runs only them. They compare a result computed on `device` with the same computation
# on the CPU. Both are float32, but CUDA kernels sum in other orders (~1e-7 relative per sum) and a path
# may run TF32 matmuls (saelab turns TF32 on for training and for capture into 16-bit stores; TF32 keeps
# 10 mantissa bits: ~5e-4 relative per product, ~1e-3 after the few blocks of the test models). Hence
# CUDA_VS_CPU: CUDA results equal CPU results within 1e-3 relative + 1e-4 absolute on O(1) values, far
# below what a real fault (a wrong device, row, position or dtype) changes, which is O(1).
CUDA_VS_CPU = {"rtol": 1e-3, "atol": 1e-4}
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.fixture(autouse=True)
def seeded_and_isolated(tmp_path, monkeypatch):
    """Every test: fixed seeds, and saelab's root in a temp folder so nothing touches runs/."""
    torch.manual_seed(0)
    monkeypatch.setenv("SAELAB_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield


@pytest.fixture(params=[pytest.param(d, marks=pytest.mark.device) for d in DEVICES])
def device(request) -> str:
    """'cpu', plus 'cuda' where torch sees a GPU: a test taking it runs once per device and is marked
    `device`, so `pytest -m device` runs exactly the device tests (the GPU check)."""
    return request.param


@pytest.fixture
def tolerance(device) -> dict:
    """rtol/atol for torch.testing.assert_close(result on `device`, the same computed on the CPU):
    exact on the CPU (the same kernels), CUDA_VS_CPU on CUDA."""
    return {"rtol": 0.0, "atol": 0.0} if device == "cpu" else CUDA_VS_CPU
