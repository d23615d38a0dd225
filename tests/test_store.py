import json

import pytest
import torch

from saelab.store import ActivationStore, StoreWriter

SETTINGS = dict(model_name="m", hook="blocks.1.hook_resid_pre", d_in=4, dtype="float32")


def shard(start: int, rows: int = 6):
    acts = torch.arange(start, start + rows, dtype=torch.float32)[:, None].expand(rows, 4).clone()
    index = {"context": torch.arange(rows) // 3 + start // 3, "position": torch.arange(rows) % 3,
             "token_id": torch.arange(rows) + 100}
    return acts, index


def write(directory, n_shards: int, finish: bool = True) -> StoreWriter:
    writer = StoreWriter(directory, **SETTINGS)
    for i in range(writer.contexts_done // 2, n_shards):
        writer.add_shard(*shard(6 * i), contexts=2)
    if finish:
        writer.finish()
    return writer


def test_round_trip(tmp_path):
    write(tmp_path, 3)
    store = ActivationStore(tmp_path, hook=SETTINGS["hook"], d_in=4)
    assert store.n_rows == 18 and len(store.shard_paths()) == 3
    assert store.activations()[:, 0].tolist() == list(range(18))
    assert store.index()["token_id"].tolist() == [100 + i % 6 for i in range(18)]


def test_resume_continues_after_last_complete_shard(tmp_path):
    write(tmp_path / "a", 2, finish=False)
    resumed = StoreWriter(tmp_path / "a", **SETTINGS)
    assert resumed.contexts_done == 4
    write(tmp_path / "a", 4)
    write(tmp_path / "b", 4)
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    assert a.manifest == b.manifest
    assert torch.equal(a.activations(), b.activations())


def test_resume_drops_a_damaged_last_shard(tmp_path):
    write(tmp_path, 3, finish=False)
    last = tmp_path / "shard_00002.safetensors"
    last.write_bytes(last.read_bytes()[:50])  # half-written
    assert StoreWriter(tmp_path, **SETTINGS).contexts_done == 4


def test_incomplete_store_says_resume(tmp_path):
    write(tmp_path, 1, finish=False)
    with pytest.raises(ValueError, match="incomplete.*rerun notebook 02 to resume"):
        ActivationStore(tmp_path)


def test_missing_store_says_run_capture(tmp_path):
    with pytest.raises(FileNotFoundError, match="run notebook 02_activations"):
        ActivationStore(tmp_path / "nothing")


def test_wrong_hook_or_width_is_a_clear_error(tmp_path):
    write(tmp_path, 1)
    with pytest.raises(ValueError, match="holds 'blocks.1.hook_resid_pre'.*'blocks.6.hook_resid_pre'"):
        ActivationStore(tmp_path, hook="blocks.6.hook_resid_pre")
    with pytest.raises(ValueError, match="d_in=4.*d_in=768"):
        ActivationStore(tmp_path, d_in=768)


def test_manifest_not_matching_shards_is_a_clear_error(tmp_path):
    write(tmp_path, 2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][1]["rows"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="shard_00001.safetensors is 6 rows, but the manifest says 7"):
        ActivationStore(tmp_path)


def test_reopening_with_other_settings_refuses_and_keeps_the_data(tmp_path):
    write(tmp_path, 2)
    with pytest.raises(ValueError, match="other settings"):
        StoreWriter(tmp_path, **{**SETTINGS, "hook": "blocks.2.hook_resid_pre"})
    assert ActivationStore(tmp_path).n_rows == 12


def test_shard_with_wrong_width_is_refused(tmp_path):
    writer = StoreWriter(tmp_path, **SETTINGS)
    acts, index = shard(0)
    with pytest.raises(ValueError, match="d_in=3"):
        writer.add_shard(acts[:, :3], index, contexts=2)


@pytest.mark.parametrize("whole_contexts", [False, True])
def test_chunks_cover_every_row_once_in_order(tmp_path, whole_contexts):
    writer = StoreWriter(tmp_path / "s", model_name="m", hook="h", d_in=2, dtype="float32")
    rows = torch.arange(22, dtype=torch.float32)[:, None].repeat(1, 2)
    context = torch.tensor([0] * 4 + [1] * 7 + [2] * 3 + [3] * 8)
    for part in (slice(0, 11), slice(11, 22)):  # two shards of 11 rows
        index = {"context": context[part], "position": torch.arange(22)[part], "token_id": torch.arange(22)[part]}
        writer.add_shard(rows[part], index, contexts=2)
    store = writer.finish()
    chunks = list(store.chunks(3, whole_contexts=whole_contexts))
    assert torch.equal(torch.cat([c.activations for c in chunks]), rows)
    assert [c.first_row for c in chunks] == [sum(len(c.activations) for c in chunks[:i]) for i in range(len(chunks))]
    assert torch.equal(torch.cat([c.index["context"] for c in chunks]), context)
    if whole_contexts:  # no context straddles two chunks
        pairs = zip(chunks[:-1], chunks[1:], strict=True)
        assert all(c.index["context"][-1] != d.index["context"][0] for c, d in pairs)
    else:
        assert [len(c.activations) for c in chunks] == [3, 3, 3, 2] * 2
    with pytest.raises(ValueError, match="chunk_rows=0"):
        next(store.chunks(0))
