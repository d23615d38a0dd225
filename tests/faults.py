"""Faults made to happen: a small filesystem that fills up, and a process that holds a folder's lock."""

import contextlib
import os
import subprocess
import sys
import uuid

import pytest


@contextlib.contextmanager
def small_disk(path, size_kib: int):
    """A tmpfs of `size_kib` KiB mounted at `path` (needs root on Linux; the test is skipped elsewhere:
    each such test has a twin that injects OSError(ENOSPC) instead). Yields grow(size_kib), which
    enlarges it in place, as freeing space would."""
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", f"saelab-test-{uuid.uuid4().hex[:8]}", str(path)]
    linux_root = sys.platform.startswith("linux") and os.geteuid() == 0
    if not linux_root or subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("a small tmpfs needs root on Linux; the injected-ENOSPC twin of this test covers the rest")

    def grow(new_kib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_kib}k", str(path)], check=True)

    try:
        yield grow
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


HOLDER = """
import sys
from saelab.paths import FolderLock
lock = FolderLock(sys.argv[1], sys.argv[2]).acquire()
print("held", flush=True)
sys.stdin.read()  # holds the lock until the test closes stdin
lock.release()
"""


@contextlib.contextmanager
def another_process_holds(folder, what: str):
    """A second Python process holding `folder`'s lock (as another kernel writing it would); yields its pid."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), what], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
