import pytest
import torch


@pytest.fixture(autouse=True)
def seeded_and_isolated(tmp_path, monkeypatch):
    """Every test: fixed seeds, and saelab's root in a temp folder so nothing touches runs/."""
    torch.manual_seed(0)
    monkeypatch.setenv("SAELAB_ROOT", str(tmp_path / "root"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    yield
