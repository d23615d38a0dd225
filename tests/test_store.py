import errno
import json
import re

import pytest
import torch
from faults import small_disk

from saelab import store
from saelab.paths import FolderBusy, WriteFailed
from saelab.store import CHECKSUM, ActivationStore, ShardDamaged, StoreWriter, checksum

SETTINGS = dict(model_name="m", hook="blocks.1.hook_resid_pre", d_in=4, dtype="float32")


def shard(start: int, rows: int = 6):
    acts = torch.arange(start, start + rows, dtype=torch.float32)[:, None].expand(rows, 4).clone()
    index = {"context": torch.arange(rows) // 3 + start // 3, "position": torch.arange(rows) % 3,
             "token_id": torch.arange(rows) + 100}
    return acts, index


def write(directory, n_shards: int, finish: bool = True, rows: int = 6) -> StoreWriter:
    """Shards of `rows` rows (2 contexts each) up to n_shards, resuming a partial store."""
    writer = StoreWriter(directory, **SETTINGS)
    for i in range(writer.contexts_done // 2, n_shards):
        writer.add_shard(*shard(rows * i, rows), contexts=2)
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
    resumed.close()  # a writer holds the folder's lock until it finishes or closes
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


def flip_a_bit(path, offset_in_data: int = 5) -> None:
    """Flip one bit inside the tensor data of a safetensors file: its header still parses."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + offset_in_data] ^= 0x10
    path.write_bytes(bytes(data))


def test_every_shard_has_a_checksum_in_the_manifest(tmp_path):
    write(tmp_path, 2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [s[CHECKSUM] for s in manifest["shards"]] == [checksum(p.read_bytes()) for p in sorted(
        tmp_path.glob("shard_*.safetensors"))]
    assert len({s[CHECKSUM] for s in manifest["shards"]}) == 2 and ActivationStore(tmp_path).verify() == []


@pytest.mark.parametrize("read", ["chunks", "iter_shards", "activations", "index"])
def test_a_flipped_bit_is_caught_on_every_read_naming_the_shard_and_how_to_recapture_it(tmp_path, read):
    write(tmp_path, 3)
    flip_a_bit(tmp_path / "shard_00001.safetensors")
    store = ActivationStore(tmp_path)  # the header still parses: opening cannot tell
    with pytest.raises(ShardDamaged, match=r"shard_00001.safetensors in the activation store .* does not match its "
                                           r"checksum .*repair_store\(profile, 'train'\)"):
        result = getattr(store, read)()
        list(result) if read in ("chunks", "iter_shards") else None
    assert store.verify() == ["shard_00001.safetensors"]
    flip_a_bit(tmp_path / "shard_00001.safetensors")  # flipped back: sound again
    assert store.verify() == [] and store.activations()[:, 0].tolist() == list(range(18))


def test_a_store_written_before_checksums_still_reads(tmp_path):
    write(tmp_path, 2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard[CHECKSUM]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    store = ActivationStore(tmp_path)
    assert not store.has_checksums and store.n_rows == 12 and store.verify() == []


def test_a_second_writer_is_refused_and_writers_in_turn_make_the_same_store_as_one(tmp_path):
    first = write(tmp_path / "a", 2, finish=False)  # still open: holds the lock
    with pytest.raises(FolderBusy, match=rf"{tmp_path / 'a'} is being written by another call in this process.*"
                                         "writing an activation store"):
        StoreWriter(tmp_path / "a", **SETTINGS)
    first.close()
    write(tmp_path / "a", 4)
    write(tmp_path / "b", 4)
    a, b = ActivationStore(tmp_path / "a"), ActivationStore(tmp_path / "b")
    assert a.manifest == b.manifest
    assert [p.read_bytes() for p in a.shard_paths()] == [p.read_bytes() for p in b.shard_paths()]
    assert not (tmp_path / "a" / ".saelab.lock").exists()


def assert_full_disk_kept_the_whole_shards(directory, raised) -> int:
    """The message, and a folder holding the manifest's shards and nothing half-written."""
    manifest = json.loads((directory / "manifest.json").read_text())
    kept = len(manifest["shards"])
    assert raised.value.errno == errno.ENOSPC
    assert re.search(rf"could not write shard_{kept:05d}.safetensors of the activation store to {directory}: the "
                     rf"disk is full .*The {kept} shards before it are kept .*free some space there, then rerun the "
                     "capture", str(raised.value)), str(raised.value)
    assert not list(directory.glob("*.tmp")) and not manifest["complete"]
    return kept


def test_a_full_disk_while_writing_a_shard_says_so_and_the_capture_resumes_to_the_same_store(tmp_path):
    disk = tmp_path / "disk"
    with small_disk(disk, 96) as grow:  # room for the lock, the manifest and 2 shards of ~19 KiB, not 4
        with pytest.raises(WriteFailed) as raised:
            write(disk / "store", 6, rows=480)
        kept = assert_full_disk_kept_the_whole_shards(disk / "store", raised)
        assert 0 < kept < 6
        grow(4096)  # space freed
        write(disk / "store", 6, rows=480)  # resumes after the kept shards
        write(tmp_path / "whole", 6, rows=480)
        resumed, whole = ActivationStore(disk / "store"), ActivationStore(tmp_path / "whole")
        assert resumed.manifest == whole.manifest
        assert [p.read_bytes() for p in resumed.shard_paths()] == [p.read_bytes() for p in whole.shard_paths()]


def test_a_full_disk_injected_while_writing_a_shard_says_so_and_the_capture_resumes(tmp_path, monkeypatch):
    """The same as the tmpfs test where no small filesystem can be mounted: OSError(ENOSPC) from the 3rd shard."""
    real, calls = store.replace_atomically, []

    def full_from_the_third(path, write_into):
        calls.append(path)
        if len(calls) >= 3:
            def write_part(tmp):
                tmp.write_bytes(b"part")  # what a full disk leaves: part of the file
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(path, write_part)
        return real(path, write_into)

    monkeypatch.setattr(store, "replace_atomically", full_from_the_third)
    with pytest.raises(WriteFailed) as raised:
        write(tmp_path / "store", 4)
    assert assert_full_disk_kept_the_whole_shards(tmp_path / "store", raised) == 2
    monkeypatch.setattr(store, "replace_atomically", real)
    write(tmp_path / "store", 4)
    write(tmp_path / "whole", 4)
    assert ActivationStore(tmp_path / "store").manifest == ActivationStore(tmp_path / "whole").manifest
