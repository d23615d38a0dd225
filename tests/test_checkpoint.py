"""Checkpoints under faults: a full disk, a second training into the same run folder, a killed write."""

import errno
import json
import re

import pytest
import torch
from faults import another_process_holds, small_disk

from saelab.paths import LOCK_FILE, FolderBusy, WriteFailed
from saelab.sae import SAE
from saelab.train import checkpoint
from saelab.train.checkpoint import load_checkpoint
from saelab.train.loop import train_sae

OPTIONS = dict(epochs=2, batch_size=64, progress=False, checkpoint_every=4)  # 630 train rows: 10 steps an epoch


def data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(700, 4, generator=generator) @ torch.randn(4, 32, generator=generator)


def run(run_dir, **options):
    torch.manual_seed(1)
    return train_sae(SAE(32, 256), data(), run_dir=run_dir, **OPTIONS, **options)


def assert_said_and_kept(run_dir, raised) -> None:
    """The message names the checkpoint, the folder and the full disk; the last good checkpoint is whole."""
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert re.search(r"could not write the training checkpoint step_00000008 to .*checkpoints: the disk is full.*"
                     r"The last good checkpoint \(step_00000004\) is kept; free some space there, then rerun the same "
                     "training: it resumes from the last good checkpoint", message), message
    assert not list((run_dir / "checkpoints").glob("*.tmp"))  # the failed write's temp folder is gone
    assert load_checkpoint(run_dir / "checkpoints").state["step"] == 4


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_the_rerun_ends_bit_identical(tmp_path):
    whole = run(tmp_path / "whole")
    disk = tmp_path / "disk"
    with small_disk(disk, 200) as grow:  # a checkpoint of this SAE takes ~120 KiB: the second does not fit
        with pytest.raises(WriteFailed) as raised:
            run(disk / "run")
        assert_said_and_kept(disk / "run", raised)
        grow(8192)  # space freed
        rerun = run(disk / "run")
        assert torch.equal(rerun.sae.W_enc, whole.sae.W_enc) and torch.equal(rerun.sae.b_dec, whole.sae.b_dec)
        assert rerun.history.equals(whole.history)


def test_an_injected_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_the_rerun_ends_bit_identical(
        tmp_path, monkeypatch):
    """The tmpfs test's twin for machines where no small filesystem can be mounted."""
    whole = run(tmp_path / "whole")
    real = checkpoint.save_file

    def full_at_step_8(tensors, path):
        if "step_00000008" in str(path):
            path.write_bytes(b"part")  # what a full disk leaves behind
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", full_at_step_8)
    with pytest.raises(WriteFailed) as raised:
        run(tmp_path / "run")
    assert_said_and_kept(tmp_path / "run", raised)
    monkeypatch.setattr(checkpoint, "save_file", real)
    rerun = run(tmp_path / "run")
    assert torch.equal(rerun.sae.W_enc, whole.sae.W_enc) and rerun.history.equals(whole.history)


def test_a_second_training_into_a_run_folder_is_refused_naming_the_first(tmp_path):
    whole = run(tmp_path / "whole")
    with another_process_holds(tmp_path / "run", "training an SAE") as pid:  # another kernel training there
        with pytest.raises(FolderBusy, match=rf"{tmp_path / 'run'} is being written by another process: pid {pid} "
                                             r"on .*training an SAE. Wait for it to finish"):
            run(tmp_path / "run")
        assert not (tmp_path / "run" / "checkpoints").exists()  # refused before writing anything
    rerun = run(tmp_path / "run")  # the first has ended
    assert torch.equal(rerun.sae.W_enc, whole.sae.W_enc)
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_training_that_fails_releases_the_run_folder(tmp_path):
    with pytest.raises(FloatingPointError):
        run(tmp_path / "run", lr=1e30)  # diverges
    run(tmp_path / "run", overwrite=True)  # not refused as busy


def test_temp_folders_a_killed_checkpoint_write_left_are_removed_by_the_next_run(tmp_path):
    leftover = tmp_path / "run" / "checkpoints" / "step_00000099.tmp" / "sae"
    leftover.mkdir(parents=True)
    (leftover / "sae_weights.safetensors.tmp").write_bytes(b"half")
    run(tmp_path / "run", max_steps=2)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))
    assert json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text()) == {
        "checkpoint": "step_00000002"}


def test_a_full_disk_while_saving_the_finished_sae_keeps_the_checkpoint_and_the_rerun_saves_it(tmp_path, monkeypatch):
    whole = run(tmp_path / "whole")
    real = SAE.save

    def full_in_the_run_folder(self, directory):
        if directory == tmp_path / "run":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, directory)

    monkeypatch.setattr(SAE, "save", full_in_the_run_folder)
    with pytest.raises(WriteFailed, match=r"could not write the trained SAE .* to .*run: the disk is full.*The last "
                                          r"checkpoint, holding the finished SAE, is kept.*rerun the same training"):
        run(tmp_path / "run")
    monkeypatch.setattr(SAE, "save", real)
    run(tmp_path / "run")  # finished: loads the last checkpoint and saves the SAE
    assert torch.equal(SAE.load(tmp_path / "run").W_enc, whole.sae.W_enc)
