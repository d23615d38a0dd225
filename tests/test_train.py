import pandas as pd
import pytest
import torch

from saelab import paths
from saelab.checkpoint import load_checkpoint
from saelab.config import load_profile
from saelab.loop import TrainingRun, evaluate
from saelab.sae import SAE
from saelab.train import train_profile, train_sae


def low_rank_data(n: int = 2048, d_in: int = 8) -> torch.Tensor:
    """Sparse non-negative combinations of 4 directions: an SAE can reconstruct these well."""
    directions = torch.randn(4, d_in)
    codes = torch.rand(n, 4) * (torch.rand(n, 4) < 0.3)
    return codes @ directions


def test_training_lowers_validation_loss():
    data = low_rank_data()
    sae = SAE(d_in=8, d_sae=16)
    before = evaluate(sae, data, l1_coefficient=1e-3)["loss"]
    result = train_sae(sae, data, epochs=5, batch_size=64, progress=False)
    assert result.sae is sae
    assert list(result.history["epoch"]) == [1, 2, 3, 4, 5]
    assert result.history["val_loss"].iloc[-1] < 0.5 * before


def test_same_seed_same_sae():
    data = low_rank_data()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(train_sae(SAE(8, 16), data, epochs=2, batch_size=64, progress=False).sae)
    assert torch.equal(runs[0].W_enc, runs[1].W_enc)


def test_evaluate_by_hand():
    sae = SAE(d_in=2, d_sae=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # h = [[1, 0], [0, 0]] -> x_hat = h
    metrics = evaluate(sae, x, l1_coefficient=0.5, batch_size=1)
    assert metrics["mse"] == 0.25  # one squared error of 1 over 4 entries
    assert metrics["l1"] == 0.5 and metrics["l0"] == 0.5 and metrics["fraction_active"] == 0.25
    assert metrics["loss"] == 0.25 + 0.5 * 0.5


def test_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="d_in=3 but the SAE expects 8"):
        train_sae(SAE(8, 16), torch.randn(10, 3), epochs=1, progress=False)


def test_nan_activations_are_refused():
    data = low_rank_data()
    data[5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_sae(SAE(8, 16), data, epochs=1, progress=False)


def params(sae: SAE) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in sae.named_parameters()}


@pytest.mark.parametrize("tied, k", [(True, None), (False, 2)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, tied, k):
    data = low_rank_data(n=700)  # 630 train rows, batch 64: 10 steps an epoch, the last one short
    options = dict(epochs=3, batch_size=64, progress=False, checkpoint_every=4, dead_after_tokens=100)
    torch.manual_seed(1)
    whole = train_sae(SAE(8, 16, tied=tied, k=k), data, run_dir=tmp_path / "whole", **options)
    torch.manual_seed(1)
    part = train_sae(SAE(8, 16, tied=tied, k=k), data, run_dir=tmp_path / "cut", max_steps=13, **options)
    assert len(part.history) == 1  # stopped in epoch 2, between checkpoints
    fresh = SAE(8, 16, tied=tied, k=k)  # other weights: resume must replace them
    resumed = train_sae(fresh, data, run_dir=tmp_path / "cut", resume=True, **options)
    assert all(torch.equal(a, b) for a, b in zip(params(whole.sae).values(), params(resumed.sae).values(),
                                                 strict=True))
    pd.testing.assert_frame_equal(whole.history, resumed.history)
    assert (tmp_path / "cut" / "history.csv").is_file() and SAE.load(tmp_path / "cut").tied == tied


def test_resume_refuses_other_settings(tmp_path):
    data = low_rank_data(n=300)
    train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False, run_dir=tmp_path)
    with pytest.raises(ValueError, match="lr"):
        train_sae(SAE(8, 16), data, epochs=2, batch_size=64, lr=1e-2, progress=False, run_dir=tmp_path, resume=True)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    data = low_rank_data(n=300)
    # lr 1e30: step 1 is finite, it moves the weights by ~1e30, and step 2's loss overflows
    with pytest.raises(FloatingPointError, match="last good checkpoint"):
        train_sae(SAE(8, 16), data, epochs=2, batch_size=64, lr=1e30, progress=False, run_dir=tmp_path,
                  checkpoint_every=1)
    checkpoint = load_checkpoint(tmp_path / "checkpoints")
    assert checkpoint.state["step"] == 1
    assert all(torch.isfinite(p).all() for p in checkpoint.sae.parameters())


def test_wandb_offline_run_is_created(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    train_sae(SAE(8, 16), low_rank_data(n=200), epochs=1, batch_size=64, progress=False, run_dir=tmp_path / "run")
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def test_l1_warmup_ramps_lambda(tmp_path):
    result = train_sae(SAE(8, 16), low_rank_data(n=300), epochs=1, batch_size=30, l1_warmup_steps=20,
                       progress=False)  # 270 train rows -> 9 steps: λ ends at 9/20 of 1e-3
    assert result.history["l1_coefficient"].iloc[-1] == pytest.approx(1e-3 * 9 / 20)


def test_train_profile_writes_the_sae_folder_and_a_rerun_returns_it():
    profile = load_profile("offline", d_in=8, expansion_factor=2, epochs=2, batch_size=64)
    data = low_rank_data(n=300)
    first = train_profile(profile, data, progress=False)
    saved = SAE.load(paths.sae_dir(profile))
    assert saved.metadata["hook_name"] == profile.hook and torch.equal(saved.W_enc, first.sae.W_enc)
    again = train_profile(profile, data, progress=False)  # resumes the finished run: no more steps
    assert torch.equal(again.sae.W_enc, first.sae.W_enc)
    pd.testing.assert_frame_equal(again.history, first.history)


def test_rerunning_without_resume_continues_the_crashed_run(tmp_path):
    data = low_rank_data(n=700)
    options = dict(epochs=2, batch_size=64, progress=False, checkpoint_every=4)
    torch.manual_seed(1)
    whole = train_sae(SAE(8, 16), data, run_dir=tmp_path / "whole", **options)
    torch.manual_seed(1)
    train_sae(SAE(8, 16), data, run_dir=tmp_path / "cut", max_steps=13, **options)
    rerun = train_sae(SAE(8, 16), data, run_dir=tmp_path / "cut", **options)  # no resume argument
    assert torch.equal(rerun.sae.W_enc, whole.sae.W_enc)


def test_old_checkpoints_are_deleted_only_with_overwrite(tmp_path):
    data = low_rank_data(n=300)
    train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False, run_dir=tmp_path)
    with pytest.raises(ValueError, match="overwrite=True"):  # other settings: refused, checkpoint kept
        train_sae(SAE(8, 16), data, epochs=1, batch_size=32, progress=False, run_dir=tmp_path)
    with pytest.raises(ValueError, match="overwrite=True"):  # resume=False alone deletes nothing either
        train_sae(SAE(8, 16), data, epochs=1, batch_size=32, progress=False, run_dir=tmp_path, resume=False)
    assert load_checkpoint(tmp_path / "checkpoints").state["config"]["batch_size"] == 64
    result = train_sae(SAE(8, 16), data, epochs=1, batch_size=32, progress=False, run_dir=tmp_path, overwrite=True)
    assert result.history["step"].iloc[-1] == 9  # 270 train rows / 32: a fresh run
    assert load_checkpoint(tmp_path / "checkpoints").state["config"]["batch_size"] == 32


def test_train_profile_refuses_a_run_from_other_settings_unless_overwrite():
    profile = load_profile("offline", d_in=8, expansion_factor=2, epochs=1, batch_size=64)
    data = low_rank_data(n=300)
    train_profile(profile, data, progress=False)
    with pytest.raises(ValueError, match="overwrite=True"):
        train_profile(profile.replace(lr=3e-3), data, progress=False)
    again = train_profile(profile.replace(lr=3e-3), data, progress=False, overwrite=True)
    assert again.history["epoch"].tolist() == [1]


@pytest.fixture(name="tf32_flag")
def tf32_flag_fixture():
    """The process-wide TF32 flag (settable on CPU builds too), restored after the test."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("before", [False, True])
def test_tf32_is_on_during_training_only(monkeypatch, tf32_flag, before):
    seen = []
    original = TrainingRun.loop

    def spy(self, *args):
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return original(self, *args)

    monkeypatch.setattr(TrainingRun, "loop", spy)
    torch.backends.cuda.matmul.allow_tf32 = before
    train_sae(SAE(8, 16), low_rank_data(n=200), epochs=1, batch_size=64, progress=False, tf32=True)
    assert seen == [True] and torch.backends.cuda.matmul.allow_tf32 is before


def test_tf32_setting_is_restored_when_training_fails(tf32_flag):
    torch.backends.cuda.matmul.allow_tf32 = False
    with pytest.raises(FloatingPointError):
        train_sae(SAE(8, 16), low_rank_data(n=300), epochs=2, batch_size=64, lr=1e30, progress=False, tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_training_indexes_the_activations_without_copying_them(monkeypatch):
    data = low_rank_data(n=300)
    held = []
    original = TrainingRun.__init__

    def spy(self, sae, config, run_data, split, *args):
        held.append((run_data, split))
        original(self, sae, config, run_data, split, *args)

    monkeypatch.setattr(TrainingRun, "__init__", spy)
    train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False)
    (run_data, split), = held
    assert run_data.data_ptr() == data.data_ptr()  # the caller's tensor itself
    assert split.train.shape == (270,) and split.val.shape == (30,)  # row indices, not rows


@pytest.mark.parametrize("option, message", [
    ({"checkpoint_every": 0}, "checkpoint_every=0: must be a positive integer"),
    ({"b_dec_init": "median"}, "b_dec_init='median': choose one of"),
    ({"aux_k": -1}, "aux_k=-1: must be an integer >= 0"),
    ({"l1_warmup_steps": 2.5}, "l1_warmup_steps=2.5"),
])
def test_bad_training_settings_fail_before_any_work(option, message):
    with pytest.raises(ValueError, match=message):
        train_sae(SAE(8, 16), low_rank_data(n=100), progress=False, **option)
