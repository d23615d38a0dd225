import errno
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from faults import another_process_holds
from safetensors import SafetensorError

from saelab import paths
from saelab.config import OFFLINE, Profile, load_profile
from saelab.paths import LOCK_FILE, FolderBusy, FolderLock, WriteFailed, writing

HOSTILE = ["../../evil", "", "..", ".hidden", "a/b", "/abs", "-rf", "x" * 101, "runs\\x", "a b"]


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_profile_name_is_refused_before_it_becomes_a_folder(name, tmp_path):
    with pytest.raises(ValueError, match=r"name=.*plain name.*runs/<name>"):
        load_profile("offline", name=name)
    shared = tmp_path / "shared.json"  # a profile JSON someone sent
    shared.write_text(json.dumps({**OFFLINE.to_dict(), "name": name}))
    with pytest.raises(ValueError, match="plain name"):
        load_profile(str(shared))
    with pytest.raises(ValueError, match="profile name .* is not a plain name"):
        paths.run_dir(name)


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_run_name_or_split_is_refused(name):
    with pytest.raises(ValueError, match="run name .* is not a plain name"):
        paths.sae_dir(OFFLINE, name)
    with pytest.raises(ValueError, match="split .* is not a plain name"):
        paths.store_dir(OFFLINE, name)


def test_plain_names_are_kept_as_they_are():
    assert paths.sae_dir(OFFLINE.replace(name="gpt2-local_v1.2"), "topk").parts[-4:] == (
        "runs", "gpt2-local_v1.2", "sae", "topk")
    assert isinstance(Profile.from_json(OFFLINE.replace(name="my.profile").to_json()), Profile)


def test_a_lock_names_its_holder_and_a_second_call_in_this_process_is_refused(tmp_path):
    with FolderLock(tmp_path, "writing things"):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname() and holder["since"]
        with pytest.raises(FolderBusy, match=rf"another call in this process.*pid {os.getpid()} on "
                                             rf"{socket.gethostname()}, since .*writing things.*Wait for it"):
            FolderLock(tmp_path, "writing other things").acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with FolderLock(tmp_path, "writing again"):  # released: free again
        pass


def test_a_lock_held_by_another_live_process_is_refused_naming_it(tmp_path):
    with another_process_holds(tmp_path, "training an SAE") as pid:
        with pytest.raises(FolderBusy, match=rf"another process: pid {pid} on .*training an SAE"):
            FolderLock(tmp_path, "training an SAE").acquire()
    with FolderLock(tmp_path, "training an SAE"):  # the holder has ended
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    code = ("import os, sys; from saelab.paths import FolderLock; held = FolderLock(sys.argv[1], 'dying').acquire(); "
            "os._exit(9)")  # killed while holding it: no cleanup
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)], timeout=120).returncode == 9
    left = json.loads((tmp_path / LOCK_FILE).read_text())
    assert left["what"] == "dying" and left["pid"] != os.getpid()
    with FolderLock(tmp_path, "taking over"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert sorted(os.listdir(tmp_path)) == []  # no stale copies left behind


def test_an_empty_lock_file_left_long_ago_by_a_writer_killed_mid_create_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("")
    old = time.time() - 60
    os.utime(tmp_path / LOCK_FILE, (old, old))
    with FolderLock(tmp_path, "taking over"):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_a_lock_from_another_machine_is_refused_naming_it(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "gpu-node-7", "since": "yesterday",
                                                  "what": "capturing"}))
    with pytest.raises(FolderBusy, match=r"another machine \(pid 1 on gpu-node-7, since yesterday.*delete .*"
                                         + LOCK_FILE):
        FolderLock(tmp_path, "capturing").acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "gpu-node-7"  # left as it was


@pytest.mark.parametrize("fault", [OSError(errno.ENOSPC, "No space left on device"),
                                   SafetensorError("Error while serializing: I/O error: No space left on device "
                                                   "(os error 28)")])
def test_a_full_disk_becomes_a_message_saying_what_where_and_what_to_do(tmp_path, fault):
    with pytest.raises(WriteFailed, match=rf"could not write the thing to {tmp_path}: the disk is full .*Earlier "
                                          r"ones are kept; free some space there, then rerun") as raised:
        with writing("the thing", tmp_path, kept="Earlier ones are kept", then="rerun"):
            raise fault
    assert raised.value.errno == errno.ENOSPC and isinstance(raised.value, OSError)


def test_permission_denied_says_make_it_writable(tmp_path):
    with pytest.raises(WriteFailed, match="permission denied.*make it writable"):
        with writing("the thing", tmp_path, kept="Nothing is lost"):
            raise PermissionError(errno.EACCES, "Permission denied")
    with pytest.raises(SafetensorError, match="header"):  # not an I/O fault: passed on as it is
        with writing("the thing", tmp_path, kept="Nothing is lost"):
            raise SafetensorError("invalid header")


def test_a_failed_atomic_write_leaves_no_temp_file(tmp_path):
    def fail(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        paths.replace_atomically(tmp_path / "x.json", fail)
    assert os.listdir(tmp_path) == []


def test_a_figure_or_dashboard_page_on_a_full_disk_says_so_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from saelab import plots

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(WriteFailed, match=rf"could not write the page feature_3.html to {tmp_path}: the disk is "
                                          r"full.*Figures and pages already written are kept.*rerun the cell"):
        plots.write_if_changed(tmp_path / "feature_3.html", "<html></html>")
    assert os.listdir(tmp_path) == []
