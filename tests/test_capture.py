import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_fixture, tiny_tokens_root_fixture  # noqa: F401  (fixtures)

from saelab import paths
from saelab.data import capture, lm, tokens
from saelab.data.tokens import load_tokens
from saelab.paths import LOCK_FILE, FolderBusy
from saelab.store import CHECKSUM, ActivationStore, ShardDamaged

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


def same_store(a: ActivationStore, b: ActivationStore) -> bool:
    """Equal manifests (shard files, rows, contexts, identity) and equal shard contents."""
    return a.manifest == b.manifest and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                            for x, y in zip(a.iter_shards(), b.iter_shards(), strict=True))


def set_aside(store: ActivationStore, to) -> ActivationStore:
    """Move a finished store out of the profile's folder, so the next capture starts afresh."""
    shutil.move(store.directory, to)
    return ActivationStore(to)


def test_shards_hold_whole_contexts_whatever_the_batch(tiny, tmp_path):
    """shard_rows 100 at 15 rows per context: 7 contexts (105 rows) per shard, the rest in the last."""
    model, stores = lm.load_lm(tiny, "cpu"), []
    for batch_size in (4, 1, 9):
        store = capture.capture_activations(tiny, lm=model, batch_size=batch_size, progress=False)
        stores.append(set_aside(store, tmp_path / f"batch{batch_size}"))
    contexts = stores[0].manifest["n_contexts"]
    assert [s["contexts"] for s in stores[0].manifest["shards"]] == [7] * (contexts // 7) + [contexts % 7] * (
        contexts % 7 > 0)
    assert [s["rows"] for s in stores[0].manifest["shards"]][0] == 105
    assert same_store(stores[0], stores[1]) and same_store(stores[0], stores[2])


@pytest.mark.parametrize("store_dtype", ["float32", "float16"])
def test_capture_on_device_equals_capture_on_the_cpu(tiny, tmp_path, device, tolerance, store_dtype):
    """On CUDA the batch is larger, the copy pinned and non-blocking, and 16-bit stores run TF32 matmuls:
    the store is the same, values within the stated tolerance (float16: one fp16 rounding step more)."""
    profile = tiny.replace(store_dtype=store_dtype)
    model = lm.load_lm(profile, "cpu")
    on_cpu = set_aside(capture.capture_activations(profile, lm=model, progress=False), tmp_path / "cpu")
    store = capture.capture_activations(profile, device=device, lm=model.to(device), progress=False)
    assert capture.read_stats(profile)["device"].startswith(device)
    assert store.manifest == on_cpu.manifest  # same shards, rows and contexts, whatever the batch size
    assert all(torch.equal(a, b) for a, b in zip(store.index().values(), on_cpu.index().values(), strict=True))
    expected = on_cpu.activations()
    tol = tolerance if store_dtype == "float32" else {"rtol": 2e-3 + tolerance["rtol"], "atol": 2e-3 * (
        1 + expected.abs().max().item()) + tolerance["atol"]}  # float16 rounds to 2^-11 relative
    torch.testing.assert_close(store.activations(), expected, **tol)


def fail_above(monkeypatch, contexts: int, after_calls: int = 0) -> list[int]:
    """Make every forward pass of more than `contexts` contexts (after the first `after_calls`) raise
    CUDA's out-of-memory error, as a GPU would; returns the batch size of every pass tried."""
    tried, real = [], capture.hook_rows

    def hook_rows(lm, ids, profile, device):
        tried.append(len(ids))
        if len(tried) > after_calls and len(ids) > contexts:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(lm, ids, profile, device)

    monkeypatch.setattr(capture, "hook_rows", hook_rows)
    return tried


def test_out_of_gpu_memory_halves_the_batch_and_says_so(tiny, tmp_path, monkeypatch):
    model = lm.load_lm(tiny, "cpu")
    whole = set_aside(capture.capture_activations(tiny, lm=model, progress=False), tmp_path / "whole")
    tried = fail_above(monkeypatch, contexts=2)
    with pytest.warns(UserWarning, match=r"capture: CUDA ran out of memory at \d+ contexts") as said:
        store = capture.capture_activations(tiny, lm=model, batch_size=8, progress=False)
    messages = [str(w.message) for w in said if "capture:" in str(w.message)]
    assert [m.split("pass; ")[1] for m in messages] == [
        "continuing at 4. To start there: capture_activations(..., batch_size=4)",
        "continuing at 2. To start there: capture_activations(..., batch_size=2)"]
    assert tried[:3] == [8, 4, 2] and set(tried[3:]) <= {1, 2}  # the same contexts retried, then batches of 2
    assert capture.read_stats(tiny)["batch_size"] == 2
    assert same_store(store, whole)


def test_out_of_gpu_memory_at_one_context_stops_keeps_the_shards_and_resumes(tiny, tmp_path, monkeypatch):
    model = lm.load_lm(tiny, "cpu")
    whole = set_aside(capture.capture_activations(tiny, lm=model, progress=False), tmp_path / "whole")
    with monkeypatch.context() as patched, pytest.warns(UserWarning, match="capture: CUDA ran out of memory"), \
            pytest.raises(RuntimeError, match=r"(?s)even at one context.*capture_batch_size.*capture on the CPU.*"
                                              r"The 2 shards already written.*are kept: rerunning resumes") as raised:
        fail_above(patched, contexts=0, after_calls=4)  # 4 passes of 4 contexts, then nothing fits
        capture.capture_activations(tiny, lm=model, batch_size=4, progress=False)
    assert isinstance(raised.value.__cause__, torch.cuda.OutOfMemoryError)
    partial = json.loads((paths.store_dir(tiny) / "manifest.json").read_text())
    assert not partial["complete"] and partial["n_contexts"] == 14  # 16 captured: 2 shards of 7 written
    resumed = capture.capture_activations(tiny, lm=model, progress=False)
    assert capture.read_stats(tiny)["resumed_from_context"] == 14
    assert same_store(resumed, whole)


def test_capture_batch_grows_on_cuda_within_free_memory(tiny, monkeypatch):
    model = lm.load_lm(tiny, "cpu")
    assert capture.capture_batch(tiny, model, torch.device("cpu")) == tiny.capture_batch_size
    # tiny's LM, per context: 2 x 4 bytes x 16 positions x (6 x 64 + 2 x 256 + 2 x 4 heads x 16) = 131,072 bytes
    cuda = torch.device("cuda")
    for free_contexts, batch in [(10_000, capture.CUDA_TOKENS_PER_PASS // 16), (100, 100), (2, 4)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free_contexts: (2 * 131_072 * free, 0))
        assert capture.capture_batch(tiny, model, cuda) == batch  # half the free memory; never below 4


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
    assert (paths.store_dir(tiny) / LOCK_FILE).is_file()  # left by the dead process: taken over below
    resumed = capture.capture_activations(tiny, device="cpu", progress=False)
    assert not (paths.store_dir(tiny) / LOCK_FILE).exists()
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
    tokens.build_tokens(newer)
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


def uninterrupted_capture(tiny, tmp_path) -> ActivationStore:
    """The same capture in a fresh saelab root that shares this test's token files."""
    tokens = paths.tokens_dir(tiny)
    os.environ["SAELAB_ROOT"] = str(tmp_path / "uninterrupted")  # restored by conftest's monkeypatch
    paths.tokens_dir(tiny).parent.mkdir(parents=True)
    os.symlink(tokens, paths.tokens_dir(tiny))
    return capture.capture_activations(tiny, device="cpu", progress=False)


def test_a_second_capture_while_one_runs_is_refused_and_the_store_equals_one_capture(tiny, tmp_path):
    profile_json = tmp_path / "tiny.json"
    profile_json.write_text(tiny.to_json())
    first = subprocess.Popen([sys.executable, str(DRIVER), str(profile_json), "2", "hold"], env=os.environ.copy(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()[-2000:]
        with pytest.raises(FolderBusy, match=rf"activations/train is being written by another process: pid "
                                             rf"{first.pid} on .*writing an activation store. Wait for it"):
            capture.capture_activations(tiny, device="cpu", progress=False)
    finally:
        first.stdin.close()
        assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    store = capture.capture_activations(tiny, device="cpu", progress=False)  # complete: returned as it is
    whole = uninterrupted_capture(tiny, tmp_path)
    assert store.manifest == whole.manifest
    assert [p.read_bytes() for p in store.shard_paths()] == [p.read_bytes() for p in whole.shard_paths()]


def test_the_manifest_records_the_tokenizer_and_versions_and_repair_store_recaptures_just_a_damaged_shard(tiny):
    store = capture.capture_activations(tiny, device="cpu", progress=False)
    tokenizer = tokens.load_tokenizer(tiny)
    recorded = store.manifest["provenance"]
    assert recorded["tokenizer"] == capture.tokenizer_identity(tokenizer)
    assert recorded["tokenizer"]["vocab_size"] == len(tokenizer) and len(recorded["tokenizer"]["vocab_sha256"]) == 64
    assert recorded["versions"]["torch"] == torch.__version__ and recorded["versions"]["saelab"]
    assert store.has_checksums and store.verify() == []
    before = [p.read_bytes() for p in store.shard_paths()]
    stamps = [p.stat().st_mtime_ns for p in store.shard_paths()]
    damaged = store.shard_paths()[1]
    data = bytearray(damaged.read_bytes())
    data[-7] ^= 0x01  # one flipped bit in the data; the header still parses
    damaged.write_bytes(bytes(data))
    with pytest.raises(ShardDamaged, match=r"shard_00001.safetensors in the activation store .*activations/train "
                                           r"does not match its checksum.*repair_store\(profile, 'train'\)"):
        capture.open_store(tiny).activations()
    assert capture.repair_store(tiny, progress=False) == ["shard_00001.safetensors"]
    assert [p.read_bytes() for p in store.shard_paths()] == before
    untouched = [p.stat().st_mtime_ns for i, p in enumerate(store.shard_paths()) if i != 1]
    assert untouched == [s for i, s in enumerate(stamps) if i != 1]  # only the damaged shard was rewritten
    assert capture.repair_store(tiny, progress=False) == [] and CHECKSUM in store.manifest["shards"][1]
