"""Every artifact knows where it came from: an SAE names its store, and a stale pair is refused."""

import dataclasses
import json
import shutil
import warnings

import pytest
import torch
from tiny import tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab import paths
from saelab.config import OFFLINE
from saelab.data import capture
from saelab.features.analysis import load_sae, max_activating
from saelab.provenance import KEY, StaleSAE, check, lineage, store_id
from saelab.sae import SAE
from saelab.store import ActivationStore, StoreWriter
from saelab.studies.baselines import trained_saes
from saelab.train.loop import train_profile


def train_on_store(profile):
    store = capture.capture_activations(profile, device="cpu", progress=False)
    capture.capture_activations(profile, "mae", device="cpu", progress=False)
    train_profile(profile, store.activations(), store=store, device="cpu", progress=False)
    return store


@pytest.fixture(name="trained")
def trained_fixture(tiny):
    profile = tiny.replace(epochs=1)
    return profile, train_on_store(profile)


def test_the_saved_sae_records_its_store_and_reads_the_held_out_split_without_a_word(trained):
    profile, store = trained
    cfg = json.loads((paths.sae_dir(profile) / "cfg.json").read_text())
    record = cfg["metadata"][KEY]
    assert record["store"]["id"] == store_id(store.manifest) and record["store"]["split"] == "train"
    assert record["store"]["n_rows"] == store.n_rows and record["store"]["directory"] == str(store.directory)
    assert record["store"]["lineage"] == lineage(store.manifest)
    assert record["store"]["lineage"]["lm_config"]["d_model"] == 64  # the LM's identity
    assert record["store"]["lineage"]["tokenizer"] == store.manifest["provenance"]["tokenizer"]
    assert record["profile"] == "tiny" and record["training"]["epochs"] == 1
    assert record["training"] == dataclasses.asdict(profile.train)
    assert record["versions"]["torch"] == torch.__version__
    assert SAE.load(paths.sae_dir(profile)).metadata[KEY] == record  # save and load keep it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note, no warning: same LM, hook, tokenizer and capture settings
        load_sae(profile, store=capture.open_store(profile, "mae"))


def test_a_stale_sae_is_refused_naming_each_difference_unless_allowed(trained):
    profile, old = trained
    shutil.rmtree(old.directory)  # as the stale-store message says: delete it and recapture, with other settings
    newer = profile.replace(store_dtype="float16", exclude_first_position=False)  # two other capture settings
    store = capture.capture_activations(newer, device="cpu", progress=False)
    with pytest.raises(StaleSAE, match=r"(?s)the SAE at .*sae/sae was trained on the store .*activations/train \(id "
                                       r"\w+\), whose settings differ from the store .*: dtype: trained on 'float32', "
                                       r"this store 'float16'; exclude_first_position: trained on True, this store "
                                       r"False. Retrain it on this store \(notebook 03\).*allow_stale=True") as raised:
        load_sae(newer, store=store)
    assert "split" not in str(raised.value)  # what differs between splits is not a difference
    with pytest.warns(UserWarning, match="allow_stale=True: proceeding"):
        sae = load_sae(newer, store=store, allow_stale=True)
    assert max_activating(sae, store, 2, progress=False).rows.shape == (sae.d_sae, 2)  # allowed once, for both
    with pytest.raises(StaleSAE, match="exclude_first_position: trained on True, this store False"):  # notebook 06
        trained_saes(newer, store)
    with pytest.warns(UserWarning, match="allow_stale=True"):
        assert len(trained_saes(newer, store, allow_stale=True)[0]) == 1


def test_a_folder_without_provenance_loads_with_a_note(tmp_path):
    SAE(64, 128).save(tmp_path / "saelens")  # no record: as a SAELens folder, or saelab before it kept one
    with pytest.warns(UserWarning, match=r"note: the SAE at .*saelens carries no saelab provenance.*it loads"):
        sae = load_sae(OFFLINE.replace(sae_path=str(tmp_path / "saelens")))
    writer = StoreWriter(tmp_path / "store", model_name="m", hook=OFFLINE.hook, d_in=64, dtype="float32")
    index = {k: torch.zeros(3, dtype=torch.int64) for k in ("context", "position", "token_id")}
    writer.add_shard(torch.randn(3, 64), index, contexts=1)
    assert check(sae, writer.finish()) == []  # nothing recorded, nothing to compare


def test_the_store_id_follows_settings_and_content(tmp_path):
    def store(name, value: float, hook: str = "blocks.1.hook_resid_pre") -> ActivationStore:
        writer = StoreWriter(tmp_path / name, model_name="m", hook=hook, d_in=2, dtype="float32")
        index = {k: torch.zeros(2, dtype=torch.int64) for k in ("context", "position", "token_id")}
        writer.add_shard(torch.full((2, 2), value), index, contexts=1)
        return writer.finish()

    same, also, other_bytes, other_hook = store("a", 1.0), store("b", 1.0), store("c", 2.0), store("d", 1.0, "h")
    assert store_id(same.manifest) == store_id(also.manifest)
    assert len({store_id(s.manifest) for s in (same, other_bytes, other_hook)}) == 3


def test_a_setting_one_store_did_not_record_is_not_a_difference(trained):
    profile, store = trained
    sae = SAE.load(paths.sae_dir(profile))
    older = capture.open_store(profile, "mae")
    del older.manifest["provenance"]  # as a store captured before saelab recorded its tokenizer
    assert check(sae, older) == []
    older.manifest["metadata"]["context_size"] = 32  # but a recorded setting that differs is one
    with pytest.raises(StaleSAE, match="context_size: trained on 16, this store 32"):
        check(sae, older)
