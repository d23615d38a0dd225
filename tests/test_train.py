import numpy as np
import pandas as pd
import pytest
import torch

from saelab import paths
from saelab.config import GPT2, load_profile
from saelab.devices import tf32_enabled, tf32_matmuls
from saelab.metrics import evaluate
from saelab.sae import ARCHITECTURES, SAE, sae_for
from saelab.train.checkpoint import load_checkpoint
from saelab.train.loop import Trainer, l1_at, lr_at, sae_for_profile, train_profile, train_sae
from saelab.train.step import RunningStats, Stepper, make_adam
from saelab.train.tracking import RunLog

OPTIONS = {"topk": {"k": 2}, "batchtopk": {"k": 2}}


def low_rank_data(n: int = 2048, d_in: int = 8) -> torch.Tensor:
    """Sparse non-negative combinations of 4 directions: an SAE can reconstruct these well."""
    directions = torch.randn(4, d_in)
    codes = torch.rand(n, 4) * (torch.rand(n, 4) < 0.3)
    return codes @ directions


def params(sae: SAE) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in sae.state_dict().items()}


def test_training_lowers_validation_loss():
    data = low_rank_data()
    sae = SAE(d_in=8, d_sae=16)
    before = evaluate(sae, data, 1e-3)["loss"]
    result = train_sae(sae, data, epochs=5, batch_size=64, progress=False)
    assert result.sae is sae
    assert list(result.history["epoch"]) == [1, 2, 3, 4, 5]
    assert result.history["val_loss"].iloc[-1] < 0.5 * before


def test_same_seed_same_sae():
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(train_sae(SAE(8, 16), low_rank_data(), epochs=2, batch_size=64, progress=False).sae)
    assert torch.equal(runs[0].W_enc, runs[1].W_enc)


def test_evaluate_by_hand():
    sae = SAE(d_in=2, d_sae=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, -1.0]])  # h = [[1, 0], [0, 0]] -> x_hat = h
    metrics = evaluate(sae, x, 0.5, batch_size=1)
    assert metrics["mse"] == 0.25  # one squared error of 1 over 4 entries
    assert metrics["l1"] == 0.5 and metrics["l0"] == 0.5 and metrics["fraction_active"] == 0.25
    assert metrics["loss"] == 0.25 + 0.5 * 0.5


def test_lr_schedules_by_hand():
    s = GPT2.replace(lr=1.0, lr_end=0.0)
    assert [lr_at(t, s, 10) for t in (0, 5, 9)] == [1.0, 1.0, 1.0]  # the seed: constant
    warm = s.replace(lr_warm_up_steps=4)
    assert [lr_at(t, warm, 10) for t in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    decay = s.replace(lr_decay_steps=4)
    assert [lr_at(t, decay, 10) for t in range(5, 10)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    cosine = s.replace(lr_scheduler_name="cosineannealing")
    assert lr_at(0, cosine, 11) == 1.0 and lr_at(5, cosine, 11) == pytest.approx(0.5)
    assert lr_at(10, cosine, 11) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(0, GPT2.train.replace(lr=1.0, lr_decay_steps=1), 2) == 1.0  # lr_end None = lr / 10
    assert lr_at(1, GPT2.train.replace(lr=1.0, lr_decay_steps=1), 2) == pytest.approx(0.1)


def test_sparsity_warm_up_by_hand():
    assert [l1_at(t, 2.0, 4) for t in range(5)] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert l1_at(0, 2.0, 0) == 2.0


def test_l1_warm_up_reaches_the_history(tmp_path):
    result = train_sae(SAE(8, 16), low_rank_data(n=300), epochs=1, batch_size=30, l1_warm_up_steps=20,
                       progress=False)  # 270 train rows -> 9 steps: the last one uses λ·9/20
    assert result.history["sparsity_coefficient"].iloc[-1] == pytest.approx(1e-3 * 9 / 20)


def test_a_schedule_reaches_adam(monkeypatch):
    seen = []
    original = Stepper.set_lr
    monkeypatch.setattr(Stepper, "set_lr", lambda self, lr: (seen.append(lr), original(self, lr)))
    train_sae(SAE(8, 16), low_rank_data(n=300), epochs=1, batch_size=30, lr=1e-2, lr_warm_up_steps=3, progress=False)
    assert seen[:4] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_architecture_trains_resumes_exactly_and_saves(tmp_path, architecture):
    data = low_rank_data(n=700)  # 630 train rows, batch 64: 10 steps an epoch, the last one short
    options = dict(epochs=3, batch_size=64, progress=False, checkpoint_every=4, dead_after_tokens=100)
    torch.manual_seed(1)
    whole = train_sae(sae_for(architecture, 8, 16, **OPTIONS.get(architecture, {})), data,
                      run_dir=tmp_path / "whole", **options)
    torch.manual_seed(1)
    part = train_sae(sae_for(architecture, 8, 16, **OPTIONS.get(architecture, {})), data,
                     run_dir=tmp_path / "cut", max_steps=13, **options)
    assert len(part.history) == 1  # stopped in epoch 2, between checkpoints
    fresh = sae_for(architecture, 8, 16, **OPTIONS.get(architecture, {}))  # other weights: resume replaces them
    resumed = train_sae(fresh, data, run_dir=tmp_path / "cut", **options)
    assert all(torch.equal(a, b) for a, b in zip(params(whole.sae).values(), params(resumed.sae).values(),
                                                 strict=True))
    pd.testing.assert_frame_equal(whole.history, resumed.history)
    loaded = SAE.load(tmp_path / "cut")
    assert loaded.architecture == architecture and torch.equal(loaded(data).x_hat, resumed.sae(data).x_hat)
    assert whole.history["val_fvu"].iloc[-1] < whole.history["val_fvu"].iloc[0]


def test_interrupt_saves_a_checkpoint_and_a_rerun_ends_where_an_uninterrupted_run_does(tmp_path, monkeypatch):
    data = low_rank_data(n=700)
    options = dict(epochs=2, batch_size=64, progress=False)
    torch.manual_seed(1)
    whole = train_sae(SAE(8, 16), data, run_dir=tmp_path / "whole", **options)
    original, calls = Stepper.__call__, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Stepper, "__call__", interrupted)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        train_sae(SAE(8, 16), data, run_dir=tmp_path / "cut", **options)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints").state["step"] == 6
    monkeypatch.setattr(Stepper, "__call__", original)
    rerun = train_sae(SAE(8, 16), data, run_dir=tmp_path / "cut", **options)
    assert torch.equal(rerun.sae.W_enc, whole.sae.W_enc)


def test_a_finished_run_returns_at_once_without_a_new_wandb_run(tmp_path, monkeypatch):
    data = low_rank_data(n=300)
    first = train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False, run_dir=tmp_path)
    opened = []
    original = RunLog.__init__

    def spy(self, run_dir, *args, **kwargs):
        opened.append(run_dir)
        original(self, run_dir, *args, **kwargs)

    monkeypatch.setattr(RunLog, "__init__", spy)
    again = train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False, run_dir=tmp_path)
    assert opened == [None] and torch.equal(again.sae.W_enc, first.sae.W_enc)
    pd.testing.assert_frame_equal(again.history, first.history)


def test_width_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="d_in=3 but the SAE expects 8"):
        train_sae(SAE(8, 16), torch.randn(10, 3), epochs=1, progress=False)


def test_nan_activations_are_refused():
    data = low_rank_data()
    data[5, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        train_sae(SAE(8, 16), data, epochs=1, progress=False)


def test_a_numpy_array_trains_like_a_tensor():
    data = low_rank_data(n=300)
    torch.manual_seed(0)
    from_numpy = train_sae(SAE(8, 16), data.numpy(), epochs=1, batch_size=64, progress=False).sae
    torch.manual_seed(0)
    from_tensor = train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False).sae
    assert isinstance(data.numpy(), np.ndarray) and torch.equal(from_numpy.W_enc, from_tensor.W_enc)


def test_a_typo_in_an_option_names_the_option_meant_and_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown training setting\(s\) 'epoch' \(did you mean 'epochs'\?\); "
                                        r"valid: \['l1_coefficient'"):
        train_sae(SAE(8, 16), low_rank_data(n=100), epoch=1)


def test_train_sae_takes_a_training_section_as_it_is_and_keywords_replace_its_fields():
    from saelab.config import OFFLINE, TrainConfig

    data = low_rank_data(n=256)
    torch.manual_seed(0)
    by_config = train_sae(SAE(8, 16), data, OFFLINE.train.replace(epochs=1, batch_size=64), progress=False)
    torch.manual_seed(0)
    by_keywords = train_sae(SAE(8, 16), data, OFFLINE.train, epochs=1, batch_size=64, progress=False)
    assert torch.equal(by_config.sae.W_enc, by_keywords.sae.W_enc) and len(by_config.history) == 1
    with pytest.raises(TypeError, match="a saelab.config.TrainConfig"):
        train_sae(SAE(8, 16), data, {"epochs": 1})
    assert TrainConfig().epochs == 100  # no config: the seed's settings


def test_a_coefficient_the_architecture_does_not_use_is_refused():
    with pytest.raises(ValueError, match=r"\['l0_coefficient'\] do not apply to a tied SAE; its sparsity is set "
                                         "by l1_coefficient"):
        train_sae(SAE(8, 16), low_rank_data(n=100), l0_coefficient=1e-3)


def test_resume_refuses_other_settings(tmp_path):
    data = low_rank_data(n=300)
    train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False, run_dir=tmp_path)
    with pytest.raises(ValueError, match="lr"):
        train_sae(SAE(8, 16), data, epochs=2, batch_size=64, lr=1e-2, progress=False, run_dir=tmp_path, resume=True)


def test_resume_ignores_a_coefficient_the_architecture_does_not_take(tmp_path):
    from saelab.config import TrainConfig

    data = low_rank_data(n=300)
    config = TrainConfig(epochs=1, batch_size=64)
    first = train_sae(SAE(8, 16), data, config, progress=False, run_dir=tmp_path)
    again = train_sae(SAE(8, 16), data, config.replace(l0_coefficient=0.3), progress=False, run_dir=tmp_path)
    assert again.history.equals(first.history)  # the finished tied run, whatever jumprelu's λ0 says


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


def test_train_profile_writes_the_sae_folder_and_a_rerun_returns_it():
    profile = load_profile("offline", d_in=8, expansion_factor=2, epochs=2, batch_size=64)
    data = low_rank_data(n=300)
    first = train_profile(profile, data, progress=False, device="cpu")
    saved = SAE.load(paths.sae_dir(profile))
    assert saved.metadata["hook_name"] == profile.hook and torch.equal(saved.W_enc, first.sae.W_enc)
    again = train_profile(profile, data, progress=False, device="cpu")  # the finished run: no more steps
    assert torch.equal(again.sae.W_enc, first.sae.W_enc)
    pd.testing.assert_frame_equal(again.history, first.history)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_one_profile_field_switches_the_architecture(architecture):
    profile = load_profile("offline", architecture=architecture, d_in=8, expansion_factor=2, topk_k=3, epochs=1,
                           batch_size=64)
    result = train_profile(profile, low_rank_data(n=300), progress=False, device="cpu")
    assert result.sae.architecture == architecture and result.sae.d_sae == 16
    if architecture == "topk":
        assert (torch.count_nonzero(result.sae.encode(low_rank_data(n=50)), dim=1) <= 3).all()


def test_sae_for_profile_is_seeded_and_leaves_the_global_rng_alone():
    profile = load_profile("offline")
    before = torch.random.get_rng_state()
    assert torch.equal(sae_for_profile(profile).W_enc, sae_for_profile(profile).W_enc)
    assert torch.equal(torch.random.get_rng_state(), before)


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
    train_profile(profile, data, progress=False, device="cpu")
    with pytest.raises(ValueError, match="overwrite=True"):
        train_profile(profile.replace(lr=3e-3), data, progress=False, device="cpu")
    again = train_profile(profile.replace(lr=3e-3), data, progress=False, device="cpu", overwrite=True)
    assert again.history["epoch"].tolist() == [1]


@pytest.fixture(name="tf32_flag")
def tf32_flag_fixture():
    """The process-wide TF32 setting (settable on CPU builds too), set through saelab's own switch and
    restored after the test."""
    with tf32_matmuls(False):  # restores the caller's setting on exit
        yield


@pytest.mark.parametrize("before", [False, True])
def test_tf32_is_on_during_training_only(monkeypatch, tf32_flag, before):
    seen = []
    original = Trainer.loop

    def spy(self, *args):
        seen.append(tf32_enabled())
        return original(self, *args)

    monkeypatch.setattr(Trainer, "loop", spy)
    with tf32_matmuls(before):
        train_sae(SAE(8, 16), low_rank_data(n=200), epochs=1, batch_size=64, progress=False, tf32=True)
        assert seen == [True] and tf32_enabled() is before


def test_tf32_setting_is_restored_when_training_fails(tf32_flag):
    with pytest.raises(FloatingPointError):
        train_sae(SAE(8, 16), low_rank_data(n=300), epochs=2, batch_size=64, lr=1e30, progress=False, tf32=True)
    assert tf32_enabled() is False


def test_training_indexes_the_activations_without_copying_them(monkeypatch):
    data = low_rank_data(n=300)
    held = []
    original = Trainer.__init__

    def spy(self, sae, s, run_data, split, *args):
        held.append((run_data, split))
        original(self, sae, s, run_data, split, *args)

    monkeypatch.setattr(Trainer, "__init__", spy)
    train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False)
    (run_data, split), = held
    assert run_data.data_ptr() == data.data_ptr()  # the caller's tensor itself
    assert split.train.shape == (270,) and split.val.shape == (30,)  # row indices, not rows


@pytest.mark.parametrize("option, message", [
    ({"checkpoint_every": -1}, "checkpoint_every=-1: must be an integer >= 0"),
    ({"b_dec_init": "median"}, "b_dec_init='median': choose one of"),
    ({"l1_warm_up_steps": 2.5}, "l1_warm_up_steps=2.5"),
    ({"dtype": "float16"}, "dtype='float16'"),
])
def test_bad_training_settings_fail_before_any_work(option, message):
    with pytest.raises(ValueError, match=message):
        train_sae(SAE(8, 16), low_rank_data(n=100), progress=False, **option)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_warm_up_steps_are_undone_before_capture(architecture):
    """The graph's warm-up runs real steps; `_state`/`_restore` put every tensor back (CPU-checkable part)."""
    sae = sae_for(architecture, 8, 16, **OPTIONS.get(architecture, {}))
    optimizer = make_adam(sae, 1e-3, torch.device("cpu"))
    stats = RunningStats(16, torch.device("cpu"), window=100)
    stepper = Stepper(sae, optimizer, stats, torch.device("cpu"))
    stepper.set_lr(1e-3)
    stepper.set_sparsity(1e-3)
    x = low_rank_data(n=64)
    stepper.body(x)  # Adam's state exists now
    before = {n: t.clone() for n, t in stepper._live().items()}
    saved = stepper._state()
    for _ in range(3):
        optimizer.zero_grad(set_to_none=True)
        stepper.body(x)
    assert not all(torch.equal(before[n], t) for n, t in stepper._live().items())
    stepper._restore(saved)
    assert all(torch.equal(before[n], t) for n, t in stepper._live().items())


def test_a_fresh_adam_state_is_restored_to_zeros():
    sae = SAE(8, 16)
    optimizer = make_adam(sae, 1e-3, torch.device("cpu"))
    stepper = Stepper(sae, optimizer, RunningStats(16, torch.device("cpu"), 100), torch.device("cpu"))
    stepper.set_lr(1e-3)
    saved = stepper._state()  # before any step: Adam has no state yet
    stepper.body(low_rank_data(n=64))
    stepper._restore(saved)
    state = optimizer.state[sae.W_enc]
    assert state["exp_avg"].abs().sum() == 0 and state["exp_avg_sq"].abs().sum() == 0 and state["step"] == 0


def test_bfloat16_training_keeps_float32_weights_and_learns():
    data = low_rank_data()
    sae = sae_for("standard", 8, 16)
    before = evaluate(sae, data)["fvu"]
    train_sae(sae, data, epochs=3, batch_size=64, progress=False, dtype="bfloat16")
    assert all(p.dtype == torch.float32 for p in sae.parameters()) and evaluate(sae, data)["fvu"] < 0.5 * before


def test_running_out_of_gpu_memory_names_the_settings_to_lower(tmp_path, monkeypatch):
    def out_of_memory(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Stepper, "__call__", out_of_memory)
    with pytest.raises(MemoryError, match="lower batch_size or expansion_factor, or use dtype='bfloat16'"):
        train_sae(SAE(8, 16), low_rank_data(n=300), epochs=1, batch_size=64, progress=False, run_dir=tmp_path)



def test_a_failed_graph_capture_falls_back_to_the_eager_step_and_says_so(monkeypatch):
    def broken(self, x):
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    data = low_rank_data(n=300)
    torch.manual_seed(0)
    eager = train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False).sae
    monkeypatch.setattr(Stepper, "_capture", broken)
    original_init = Stepper.__init__

    def graphed(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.graph = True  # as on CUDA

    monkeypatch.setattr(Stepper, "__init__", graphed)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="training continues eagerly"):
        fallback = train_sae(SAE(8, 16), data, epochs=1, batch_size=64, progress=False).sae
    assert torch.equal(fallback.W_enc, eager.W_enc)
