"""The device rule's helpers (saelab.devices). 'meta' stands in for a second device on a CPU-only machine."""

import pytest
import torch
from torch import nn

from saelab import devices


def test_canonical_names_what_a_tensor_reports():
    assert devices.canonical("cpu") == torch.device("cpu") == torch.empty(0).device
    assert devices.canonical(torch.device("meta")) == torch.device("meta")


def test_device_of_a_module():
    assert devices.device_of(nn.Linear(2, 3)) == torch.device("cpu")
    assert devices.device_of(nn.Linear(2, 3, device="meta")) == torch.device("meta")
    assert devices.device_of(nn.ReLU()) == torch.device("cpu")  # no parameters: the CPU


def test_module_on_copies_and_never_moves_the_callers_module():
    module = nn.Linear(2, 3)
    assert devices.module_on(module, "cpu") is module  # already there: no copy
    moved = devices.module_on(module, "meta")
    assert moved is not module and moved.weight.device.type == "meta"
    assert module.weight.device.type == "cpu"


def test_check_device_says_which_is_where(device):
    module = nn.Linear(2, 3).to(device)
    assert devices.check_device(module, None) == devices.canonical(device)
    assert devices.check_device(module, device) == devices.canonical(device)
    with pytest.raises(ValueError, match=rf"the LM is on {device}.*device='meta'.*lm.to\('meta'\)"):
        devices.check_device(module, "meta")


def test_accumulators_are_float64_except_on_mps():
    assert devices.accumulator_dtype("cpu") == devices.accumulator_dtype("cuda") == torch.float64
    assert devices.accumulator_dtype(torch.device("mps")) == torch.float32


def test_tf32_matmuls_restores_the_callers_setting():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    with devices.tf32_matmuls(True):
        assert matmul.fp32_precision == "tf32"
    assert matmul.fp32_precision == before
    with pytest.raises(KeyError), devices.tf32_matmuls(True):
        raise KeyError
    assert matmul.fp32_precision == before and not matmul.allow_tf32  # the legacy flag still reads
    with devices.tf32_matmuls(False):
        assert matmul.fp32_precision == before
