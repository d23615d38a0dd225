import dataclasses
import subprocess
import sys
import threading

import pytest

from saelab import config
from saelab.config import (
    GPT2,
    OFFLINE,
    QUICK,
    TRAINING_FIELDS,
    Profile,
    SAEConfig,
    TrainConfig,
    field_names,
    load_profile,
)


def test_gpt2_profile_is_the_seed_table():
    assert (GPT2.model_name, GPT2.hook, GPT2.n_texts, GPT2.context_size) == \
        ("gpt2", "blocks.6.hook_resid_pre", 20_000, 128)
    assert (GPT2.d_in, GPT2.d_sae, GPT2.sae.architecture, GPT2.train.l1_coefficient) == (768, 6144, "tied", 1e-3)
    assert (GPT2.train.lr, GPT2.train.batch_size, GPT2.train.epochs) == (1e-3, 512, 100)
    assert GPT2.train == TrainConfig() and GPT2.sae == SAEConfig()  # the sections' defaults are the seed's
    assert (GPT2.mae_texts, GPT2.mae_top_k, GPT2.mae_top_features) == (5_000, 5, 20)
    assert GPT2.layer == 6


@pytest.mark.parametrize("profile", [GPT2, QUICK, OFFLINE])
def test_json_round_trip(profile):
    assert Profile.from_json(profile.to_json()) == profile


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPT2.train = TrainConfig(epochs=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPT2.train.epochs = 1


def test_explicit_name_beats_environment(monkeypatch):
    monkeypatch.setenv("SAELAB_PROFILE", "quick")
    assert load_profile("gpt2").name == "gpt2"
    assert load_profile().name == "quick"


def test_unknown_profile_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown profile 'gtp2'.*\['gpt2', 'offline', 'offline-test', 'quick'\]"):
        load_profile("gtp2")


def test_a_typo_in_a_field_names_the_one_meant():
    with pytest.raises(ValueError, match=r"unknown profile field\(s\) 'epoch' \(did you mean 'epochs'\?\)$"):
        load_profile("offline", epoch=3)
    with pytest.raises(ValueError, match="'zzz'; valid fields: .*'epochs'"):  # nothing close: the list
        load_profile("offline", zzz=3)
    with pytest.raises(AttributeError, match="did you mean 'epochs'"):
        _ = OFFLINE.epoch
    with pytest.raises(TypeError, match="did you mean 'lr'"):
        OFFLINE.train.replace(lrr=1.0)


def test_overrides_replace_single_fields_section_fields_by_their_own_name():
    profile = load_profile("offline", epochs=2, architecture="topk", k=8)
    assert profile.train.epochs == 2 and profile.d_in == OFFLINE.d_in
    assert profile.sae == OFFLINE.sae.replace(architecture="topk", k=8)
    assert profile.train == OFFLINE.train.replace(epochs=2)
    assert profile.epochs == 2 and profile.k == 8 == profile.topk_k  # reads by the old flat names forward


def test_sections_compose_and_train_sae_takes_the_training_section_as_it_is():
    profile = OFFLINE.replace(train=OFFLINE.train.replace(lr=3e-4), sae={"architecture": "jumprelu"})
    assert profile.train.lr == 3e-4 and profile.sae.architecture == "jumprelu" and profile.sae.bandwidth == 2.0
    assert profile.sae.options_for() == {"bandwidth": 2.0, "init_threshold": 2.0}
    assert profile.sae.options_for("topk") == {"k": 32, "aux_k": 0, "aux_coefficient": 1 / 32}
    assert profile.seed == profile.train.seed


def test_an_old_flat_profile_json_migrates_into_the_sections():
    nested = OFFLINE.to_dict()
    flat = {k: v for k, v in nested.items() if k not in ("sae", "train")} | nested["train"] | nested["sae"]
    flat |= {"topk_k": flat.pop("k"), "jumprelu_bandwidth": flat.pop("bandwidth")}  # names before the sections
    assert Profile.from_dict(flat) == OFFLINE
    assert set(nested["train"]) == set(TRAINING_FIELDS) and set(nested["sae"]) == set(config.SAE_FIELDS)


@pytest.mark.parametrize("field, value, message", [
    ("architecture", "relu", "architecture='relu': choose one of .*'tied'"),
    ("hook", "layer6", "hook='layer6'.*blocks.6.hook_resid_pre"),
    ("val_fraction", 1.0, "val_fraction"),
    ("batch_size", 0, "batch_size=0"),
    ("store_dtype", "int8", "store_dtype"),
    ("torch_threads", -1, "torch_threads=-1"),
    ("checkpoint_every", -1, "checkpoint_every=-1: must be an integer >= 0"),
    ("lr_scheduler_name", "cosine", "lr_scheduler_name='cosine': choose one of .*cosineannealing"),
    ("dtype", "float16", "dtype='float16': choose one of .*bfloat16"),
    ("l0_coefficient", -1.0, "l0_coefficient=-1.0: must be a number >= 0"),
    ("b_dec_init", "median", r"b_dec_init='median': choose one of \('zeros', 'mean', 'geometric_median'\)"),
    ("ce_eval_contexts", 0, "ce_eval_contexts=0: must be a positive integer"),
    ("aux_k", -4, "aux_k=-4: must be an integer >= 0"),
    ("l1_warm_up_steps", 10.5, "l1_warm_up_steps=10.5: must be an integer >= 0"),
    ("interp_random_directions", -1, r"interp_random_directions=-1: an integer >= 0 \(random directions, 0 = d_sae\)"),
    ("interp_top_examples", 1, "interp_top_examples=1: an integer >= 2 .*an entropy needs at least 2"),
    ("interp_chunk_rows", 0, "interp_chunk_rows=0: an integer >= 1"),
    ("interp_ks", (1, 0), r"interp_ks=\(1, 0\): one or more integers >= 1"),
    ("interp_held_out_share", 1.0, "interp_held_out_share=1.0: a share of the documents, strictly between 0 and 1"),
    ("interp_document_groups", 1, "interp_document_groups=1: an integer >= 2"),
])
def test_invalid_values_say_what_to_change(field, value, message):
    with pytest.raises(ValueError, match=message):
        GPT2.replace(**{field: value})


@pytest.mark.parametrize("old, new", [("recipe", "architecture"), ("l1_warmup_steps", "l1_warm_up_steps")])
def test_renamed_fields_say_their_new_name(old, new):
    with pytest.raises(ValueError, match=f"{old} is now {new}"):
        Profile.from_dict({**GPT2.to_dict(), old: 1})


def test_every_section_field_is_a_name_a_profile_takes():
    assert set(TRAINING_FIELDS) | set(config.SAE_FIELDS) <= set(field_names())


def test_apply_threads_sets_the_profile_count_and_zero_keeps_torch_default():
    import torch

    before = torch.get_num_threads()
    try:
        assert OFFLINE.torch_threads == 1 and config.apply_threads(OFFLINE) == 1 == torch.get_num_threads()
        torch.set_num_threads(2)
        assert config.apply_threads(GPT2) == 2  # 0: leaves whatever torch uses
    finally:
        torch.set_num_threads(before)


def test_profile_json_file_loads(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(OFFLINE.replace(name="mine", epochs=1).to_json())
    assert load_profile(str(path)).train.epochs == 1


def test_offline_banner_says_not_gpt2():
    text = repr(OFFLINE)
    assert "'offline'" in text and "NOT GPT-2" in text
    assert "NOT GPT-2" not in repr(GPT2)


def test_detection_without_network_or_cache_is_offline(monkeypatch):
    monkeypatch.delenv("SAELAB_PROFILE", raising=False)
    monkeypatch.setattr(config, "gpt2_is_cached", lambda: False)
    monkeypatch.setattr(config, "hub_is_reachable", lambda: False)
    assert load_profile().name == "offline"


@pytest.mark.parametrize("device, expected", [("cuda", "gpt2"), ("cpu", "quick")])
def test_detection_with_cached_gpt2_picks_by_device(monkeypatch, device, expected):
    monkeypatch.delenv("SAELAB_PROFILE", raising=False)
    monkeypatch.setattr(config, "gpt2_is_cached", lambda: True)
    monkeypatch.setattr(config, "default_device", lambda: device)
    assert load_profile().name == expected


def test_hub_probe_respects_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert config.hub_is_reachable() is False


def test_hub_probe_returns_when_the_connection_hangs(monkeypatch):
    never = threading.Event()

    def hang(*args, **kwargs):
        never.wait()  # a DNS lookup or connect that never answers
        raise OSError("released at the end of the test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(config.socket, "create_connection", hang)
    assert config.hub_is_reachable(timeout_s=0.2) is False
    never.set()


def test_import_does_no_work():
    code = ("import sys, saelab; heavy = {'torch', 'transformer_lens', 'datasets', 'wandb'} & set(sys.modules);"
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]" and out.stderr == ""


@pytest.mark.parametrize("field, value, message", [
    ("synth_topk_ks", (4, 200), r"synth_topk_ks=\(4, 200\).*1\.\.128"),  # offline's narrowest dictionary: 128
    ("synth_dict_ratios", (), "synth_dict_ratios"),
    ("synth_l1_coefficients", (-1e-3,), "each coefficient must be >= 0"),
    ("synth_samples", 0, "synth_samples=0"),
])
def test_invalid_synthetic_settings_say_what_to_change(field, value, message):
    with pytest.raises(ValueError, match=message):
        OFFLINE.replace(**{field: value})


def test_synthetic_sweep_lists_survive_json_as_tuples():
    profile = Profile.from_json(OFFLINE.to_json())
    assert isinstance(profile.synth_topk_ks, tuple) and profile.synth_topk_ks == OFFLINE.synth_topk_ks


def test_device_description_names_the_machine(monkeypatch):
    monkeypatch.setattr(config.os, "cpu_count", lambda: 2)
    assert config.describe_device("cpu") == "cpu (2-core CPU)"
    assert "2-core CPU" in OFFLINE.banner("cpu")


def test_dir_lists_the_public_names_without_importing_them():
    code = ("import sys, saelab; names = dir(saelab); "
            "heavy = {'torch', 'transformer_lens', 'datasets', 'wandb'} & set(sys.modules); "
            "print(sorted(heavy), 'train_sae' in names, 'load_profile' in names, 'import_module' in names)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "True", "True", "False"]


def test_an_override_may_rename_the_profile():
    profile = load_profile("gpt2", name="gpt2-local", dataset_id="/data/owt.jsonl")
    assert (profile.name, profile.dataset_id, profile.d_in) == ("gpt2-local", "/data/owt.jsonl", 768)


def test_the_banner_names_the_sae_that_notebook_04_analyses():
    text = OFFLINE.replace(sae_path="/data/saes/gpt2_res_l6").banner("cpu")
    assert "the SAE in /data/saes/gpt2_res_l6 (sae_path" in text and "SAE 64->512" not in text
    own = f"SAE 64->{OFFLINE.d_sae} ({OFFLINE.sae.architecture}), {OFFLINE.train.epochs} epochs"
    assert own in OFFLINE.banner("cpu")


def test_make_tests_setting_is_the_offline_pipeline_with_shorter_training():
    """`make test` runs the notebooks with offline-test: the same data, model, hook and SAE shape as
    `make workbook`'s offline, only training and notebook 05 shorter."""
    from saelab.config import OFFLINE_TEST

    def flat(p):  # every setting by its own name, the sections' included
        return {**p.to_dict(), **p.to_dict()["sae"], **p.to_dict()["train"]}

    changed = {f for f, v in flat(OFFLINE_TEST).items() if v != flat(OFFLINE)[f]} - {"sae", "train"}
    assert changed <= {"name", "epochs", "lr", "synth_samples", "synth_epochs", "synth_seeds"}
    assert OFFLINE_TEST.epochs < OFFLINE.epochs and OFFLINE_TEST.target_l0 == OFFLINE.target_l0 > 0
