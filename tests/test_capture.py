import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab import capture, data, lm, paths
from saelab.data import load_tokens
from saelab.store import ActivationStore

DRIVER = Path(__file__).with_name("capture_driver.py")


def test_store_rows_are_the_hook_at_every_position_but_the_first(tiny):
    model = lm.load_lm(tiny, "cpu")
    store = capture.capture_activations(tiny, device="cpu", lm=model, progress=False)
    ids = torch.tensor(load_tokens(tiny)["input_ids"])  # (contexts, pos)
    _, cache = model.run_with_cache(ids, names_filter=[tiny.hook])
    index = store.index()
    assert store.n_rows == ids.shape[0] * (tiny.context_size - 1)
    assert torch.equal(index["token_id"], ids[index["context"], index["position"]])
    assert index["position"].min() == 1 and index["context"].max() == ids.shape[0] - 1
    assert torch.allclose(store.activations(), cache[tiny.hook][index["context"], index["position"]], atol=1e-6)
    assert store.metadata["lm_settings"]["center_writing_weights"] is False


def test_position_zero_is_kept_when_the_profile_says_so(tiny):
    profile = tiny.replace(exclude_first_position=False)
    store = capture.capture_activations(profile, device="cpu", progress=False)
    assert store.index()["position"][: tiny.context_size].tolist() == list(range(tiny.context_size))


def test_shards_flush_at_batch_boundaries_and_memory_stays_one_shard(tiny):
    store = capture.capture_activations(tiny, device="cpu", progress=False)
    rows = [s["rows"] for s in store.manifest["shards"]]
    batch_rows = tiny.capture_batch_size * (tiny.context_size - 1)  # 60: two batches reach shard_rows 100
    assert rows[:-1] == [2 * batch_rows] * (len(rows) - 1) and 0 < rows[-1] <= 2 * batch_rows


def test_both_splits_and_a_second_call_reuses_the_store(tiny):
    train = capture.capture_activations(tiny, "train", device="cpu", progress=False)
    mae = capture.capture_activations(tiny, "mae", device="cpu", progress=False)
    assert mae.directory == paths.store_dir(tiny, "mae") and mae.n_rows < train.n_rows
    stamp = [p.stat().st_mtime_ns for p in train.shard_paths()]
    again = capture.capture_activations(tiny, "train", device="cpu", progress=False)
    assert [p.stat().st_mtime_ns for p in again.shard_paths()] == stamp
    assert capture.read_stats(tiny)["tokens"] == len(load_tokens(tiny)) * tiny.context_size


def test_killed_capture_resumes_to_the_same_store(tiny, tmp_path):
    """Killed with shard 2 renamed into place but not yet in the manifest: the worst moment.
    (Kills between whole shards are covered without a subprocess in test_store.py.)"""
    profile_json = tmp_path / "tiny.json"
    profile_json.write_text(tiny.to_json())
    command = [sys.executable, str(DRIVER), str(profile_json), "2"]
    killed = subprocess.run(command, env=os.environ.copy(), capture_output=True, text=True, timeout=600)
    assert killed.returncode == 17, killed.stderr[-2000:]
    partial = json.loads((paths.store_dir(tiny) / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 1
    assert (paths.store_dir(tiny) / "shard_00001.safetensors").is_file()  # on disk, not in the manifest
    resumed = capture.capture_activations(tiny, device="cpu", progress=False)
    assert capture.read_stats(tiny)["resumed_from_context"] == partial["n_contexts"] > 0
    os.environ["SAELAB_ROOT"] = str(tmp_path / "uninterrupted")  # restored by conftest's monkeypatch
    paths.tokens_dir(tiny).parent.mkdir(parents=True)
    os.symlink(resumed.directory.parent.parent / "tokens", paths.tokens_dir(tiny))
    whole = capture.capture_activations(tiny, device="cpu", progress=False)
    assert resumed.manifest == whole.manifest
    for a, b in zip(resumed.iter_shards(), whole.iter_shards(), strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_store_of_other_settings_is_refused_and_kept(tiny):
    store = capture.capture_activations(tiny, device="cpu", progress=False)
    with pytest.raises(ValueError, match="other settings.*exclude_first_position"):
        capture.capture_activations(tiny.replace(exclude_first_position=False, name=tiny.name), device="cpu")
    assert ActivationStore(store.directory).n_rows == store.n_rows


def test_reader_asking_for_another_hook_or_width_is_refused(tiny):
    store = capture.capture_activations(tiny, device="cpu", progress=False)
    with pytest.raises(ValueError, match="holds 'blocks.6.hook_resid_pre'.*'blocks.5.hook_resid_pre'"):
        ActivationStore(store.directory, hook="blocks.5.hook_resid_pre")
    with pytest.raises(ValueError, match="d_in=64, but d_in=768"):
        ActivationStore(store.directory, d_in=768)


def test_open_store_returns_the_store_captured_for_this_profile(tiny):
    store = capture.capture_activations(tiny, device="cpu", progress=False)
    assert capture.open_store(tiny, "train").n_rows == store.n_rows


def test_open_store_refuses_a_store_made_before_the_tokens_were_rebuilt(tiny):
    """Notebook 01 rerun with other settings: notebooks 03-04 must not train on the old activations."""
    capture.capture_activations(tiny, device="cpu", progress=False)
    newer = tiny.replace(n_texts=20)
    data.build_tokens(newer)
    with pytest.raises(ValueError, match=r"(?s)other settings.*n_texts.*Delete runs/tiny/activations/train and "
                                         r"rerun notebook 02_activations"):
        capture.open_store(newer, "train")
    with pytest.raises(ValueError, match=r"(?s)other settings.*Delete runs/tiny/activations/train and "
                                         r"rerun notebook 02_activations"):
        capture.capture_activations(newer, device="cpu", progress=False)


def test_open_store_refuses_another_hook_or_position_rule(tiny):
    capture.capture_activations(tiny, device="cpu", progress=False)
    with pytest.raises(ValueError, match="hook.*Delete runs/tiny/activations/train"):
        capture.open_store(tiny.replace(hook="blocks.0.hook_resid_pre"), "train")
    with pytest.raises(ValueError, match="exclude_first_position"):
        capture.open_store(tiny.replace(exclude_first_position=False), "train")
