"""The offline LM saelab trains: trained once and reused, saved atomically, never loaded when damaged
or made with other settings; and the numbers around it (unigram baseline, lr schedule, ablation CE)."""

import json
import math
import warnings

import pytest
import torch
from tiny import TINY, tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab import metrics, paths
from saelab.data import capture, lm, offline_lm
from saelab.sae import SAE

# a few steps on a few documents: seconds on a CPU; the TINY tokens (vocabulary 512, 16-token contexts)
TRAINED = dict(offline_lm="trained", offline_lm_steps=4, offline_lm_batch_size=4, offline_lm_texts=30,
               offline_lm_eval_every=2, offline_lm_threads=1)


@pytest.fixture(name="small")
def small_fixture(tiny):
    return tiny.replace(**TRAINED)


def saved(profile):
    directory, _ = offline_lm.model_dir(profile, lm._offline_tokenizer(profile))
    return directory


def weights_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_unigram_cross_entropy_by_hand():
    # counts + 1 = [3, 2, 1] over 6: p = 1/2, 1/3, 1/6; eval tokens 0 and 2
    ce = offline_lm.unigram_cross_entropy(torch.tensor([0, 0, 1]), torch.tensor([0, 2]), vocab_size=3)
    assert ce == pytest.approx((math.log(2) + math.log(6)) / 2)


def test_lr_warms_up_then_decays_to_a_tenth():
    assert offline_lm.lm_lr_at(0, 100, 1.0, warmup=4) == pytest.approx(0.25)
    assert offline_lm.lm_lr_at(4, 100, 1.0, warmup=4) == pytest.approx(1.0)
    assert offline_lm.lm_lr_at(52, 100, 1.0, warmup=4) == pytest.approx(0.55)  # half way: mean of 1 and 0.1
    assert offline_lm.lm_lr_at(100, 100, 1.0, warmup=4) == pytest.approx(0.1)


def test_trains_once_then_reuses_the_saved_model(small, monkeypatch):
    first = lm.load_lm(small, "cpu", progress=False)
    directory = saved(small)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    record = json.loads((directory / "config.json").read_text())
    assert [p["step"] for p in record["history"]] == [0, 2, 4]
    assert record["history"][-1]["tokens"] == 4 * 4 * small.context_size
    assert record["training"]["threads"] == 1 and record["settings"]["offline_lm_steps"] == 4

    monkeypatch.setattr(offline_lm, "train_lm", lambda *a, **k: pytest.fail("retrained a saved model"))
    again = lm.load_lm(small, "cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values(),
                                                  strict=True))
    assert not torch.equal(first.W_E, lm.load_lm(small.replace(offline_lm="random"), "cpu").W_E)  # it trained


def test_training_moves_the_held_out_loss_off_its_start(small):
    lm.load_lm(small.replace(offline_lm_steps=20, offline_lm_eval_every=20), "cpu", progress=False)
    history = lm.training_history(small.replace(offline_lm_steps=20, offline_lm_eval_every=20))
    assert history["held_out_loss"].iloc[-1] < history["held_out_loss"].iloc[0]


def test_killed_training_leaves_no_loadable_model(small, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(offline_lm, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        lm.load_lm(small, "cpu", progress=False)
    assert not saved(small).exists()


def test_killed_save_leaves_no_loadable_model_and_the_next_run_trains(small, monkeypatch):
    def killed(path, payload, indent=2):  # the weights are written, the config is not
        raise KeyboardInterrupt

    with monkeypatch.context() as patched, pytest.raises(KeyboardInterrupt):
        patched.setattr(paths, "write_json_atomically", killed)
        lm.load_lm(small, "cpu", progress=False)
    directory = saved(small)
    assert not directory.exists() and (directory.with_name(directory.name + ".tmp") / "model.safetensors").is_file()
    lm.load_lm(small, "cpu", progress=False)
    assert (directory / "config.json").is_file()


@pytest.mark.parametrize("damage", ["flip a weight byte", "truncate the config", "other settings in the config",
                                    "another architecture in the config", "delete the weights"])
def test_a_damaged_saved_model_is_refused_and_retrained(small, damage):
    first = weights_of(lm.load_lm(small, "cpu", progress=False))
    directory = saved(small)
    weights, config = directory / "model.safetensors", directory / "config.json"
    if damage == "flip a weight byte":
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate the config":
        config.write_text(config.read_text()[:50])
    elif damage == "other settings in the config":
        record = json.loads(config.read_text())
        record["settings"]["d_in"] = 32
        config.write_text(json.dumps(record))
    elif damage == "another architecture in the config":  # settings and weights as saved: the shapes disagree
        record = json.loads(config.read_text())
        record["gpt2_config"]["n_layer"] = 2
        config.write_text(json.dumps(record))
    else:
        weights.unlink()
    with pytest.warns(UserWarning, match="refusing the saved offline LM.*Training it again"):
        model = lm.load_lm(small, "cpu", progress=False)
    assert all(torch.equal(a, model.state_dict()[k]) for k, a in first.items())  # seeded: the same model again
    assert offline_lm._sha256(weights) == json.loads(config.read_text())["weights_sha256"]


def test_other_settings_train_into_a_new_folder_and_leave_the_old_one(small):
    lm.load_lm(small, "cpu", progress=False)
    old = saved(small)
    before = {p.name: p.read_bytes() for p in old.iterdir()}
    wider = small.replace(offline_n_heads=2)  # another architecture
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="refusing")  # nothing refused: the old model is not this one
        lm.load_lm(wider, "cpu", progress=False)
    assert saved(wider) != old and (saved(wider) / "config.json").is_file()
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before


def test_folder_names_the_shape_and_changes_with_the_tokenizer(small):
    tokenizer = lm._offline_tokenizer(small)
    directory, settings = offline_lm.model_dir(small, tokenizer)
    assert directory.name.startswith("d64-l8-v512-") and directory.parent == paths.run_dir(small) / "lm"
    tokenizer.add_tokens(["<extra>"])  # another vocabulary, same profile
    assert offline_lm.model_dir(small, tokenizer)[0] != directory


def test_model_card_and_measurements(small):
    model = lm.load_lm(small, "cpu", progress=False)
    card = lm.model_card(small, model)
    assert card["weights"].startswith("trained by saelab") and paths.root() / card["saved in"] == saved(small)
    assert card["held-out CE (nats/token)"] == pytest.approx(lm.training_history(small)["held_out_loss"].iloc[-1],
                                                             abs=1e-3)
    measured = lm.measure_lm(model, small)
    assert measured["ce"] == pytest.approx(card["held-out CE (nats/token)"], abs=1e-3)  # HF and TransformerLens
    assert measured["ce_over_unigram"] == pytest.approx(measured["ce"] / measured["unigram_ce"])
    assert "MISSES the bar" in lm.describe_lm(measured)  # 4 steps are not a language model
    random = lm.load_lm(small.replace(offline_lm="random"), "cpu")
    assert lm.training_history(small.replace(offline_lm="random")) is None
    assert lm.model_card(small.replace(offline_lm="random"), random)["weights"].startswith("seeded random")


def test_ablation_ce_agrees_with_ce_loss_recovered(tiny):
    model = lm.load_lm(tiny, "cpu")
    tokens = torch.tensor(capture.load_tokens(tiny, "mae")["input_ids"][:4]).long()
    ce = lm.ablation_ce(model, tokens, tiny.hook)
    reference = metrics.ce_loss_recovered(model, SAE(tiny.d_in, 8), tokens, tiny.hook)
    assert ce["ce"] == pytest.approx(reference["ce_clean"], rel=1e-5)
    assert ce["ce_zero_ablated"] == pytest.approx(reference["ce_zero"], rel=1e-5)


def test_random_twin_is_the_random_weight_option(tiny):
    random = lm.load_lm(tiny, "cpu")  # TINY uses offline_lm="random"
    twin = lm.at_initialisation(random, seed=tiny.seed)
    assert all(torch.equal(a, b) for a, b in zip(random.state_dict().values(), twin.state_dict().values(),
                                                  strict=True))
    assert "random weights" in twin.cfg.model_name and twin.tokenizer is random.tokenizer


def test_random_twin_is_the_trained_models_own_initialisation(small, monkeypatch):
    """The twin (profile seed, lm.init_std) equals the weights training started from, tokenizer included."""
    start = {}
    real_fit = offline_lm.fit

    def spy(model, *args, **kwargs):  # what train_lm hands to its training loop
        start.update(weights_of(model))
        return real_fit(model, *args, **kwargs)

    monkeypatch.setattr(offline_lm, "fit", spy)
    model = lm.load_lm(small, "cpu", progress=False)
    twin = lm.at_initialisation(model, seed=small.seed, std=lm.init_std(small))
    assert lm.init_std(small) == offline_lm.INIT_STD and lm.init_std(small.replace(offline_lm="random")) == 0.02
    expected = lm.hooked_from_hf(offline_lm.initial_model(small), model.tokenizer)
    assert torch.equal(offline_lm.initial_model(small).transformer.wte.weight, start["transformer.wte.weight"])
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), expected.state_dict().values(),
                                                  strict=True))
    assert twin.tokenizer is model.tokenizer and not torch.equal(twin.W_E, model.W_E)  # training moved it
    assert not torch.equal(lm.at_initialisation(model, seed=small.seed).W_E, twin.W_E)  # GPT-2's 0.02 is not it


def test_stores_of_the_random_model_are_stale_for_the_trained_one(small):
    capture.capture_activations(small.replace(offline_lm="random"), "mae", "cpu", progress=False)
    with pytest.raises(ValueError, match="random_weights: stored True, profile False"):
        capture.open_store(small, "mae")


def test_profile_checks_the_offline_lm_fields(tiny):
    with pytest.raises(ValueError, match=r"offline_lm='pretrained': choose one of \('trained', 'random'\)"):
        tiny.replace(offline_lm="pretrained")
    with pytest.raises(ValueError, match="offline_lm_steps=0: must be a positive integer"):
        tiny.replace(offline_lm_steps=0)
    with pytest.raises(ValueError, match=r"offline_lm_threads=-1: an integer >= 0 \(0 = every core\)"):
        tiny.replace(offline_lm_threads=-1)


def test_describe_lm_reads_both_bars():
    import pandas as pd

    good = lm.describe_lm(pd.Series({"ce": 3.0, "unigram_ce": 6.0, "ce_over_unigram": 0.5, "ablation_gap": 2.0}))
    assert good.count("meets the bar") == 2 and "0.50 x the unigram baseline's 6.000" in good
    borderline = lm.describe_lm(pd.Series({"ce": 4.5, "unigram_ce": 6.0, "ce_over_unigram": 0.75,
                                           "ablation_gap": 0.5}))
    assert "meets the bar <= 0.75" in borderline and "MISSES the bar >= 1" in borderline
