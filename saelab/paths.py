"""Where each stage reads and writes, all derived from one root.

nbmake runs a notebook from its own folder, so notebooks never build paths with `../`:
they ask this module. The root is `$SAELAB_ROOT` when set, else the checkout saelab was
installed from (editable install), else the current directory.

    <root>/runs/<profile>/tokens/        token dataset (Arrow, notebook 01)
    <root>/runs/<profile>/lm/<name>/     offline profile: the LM saelab trained (notebook 02)
    <root>/runs/<profile>/activations/   activation store (notebook 02)
    <root>/runs/<profile>/sae/<name>/    SAE checkpoints and history (notebook 03)
    <root>/figures/<profile>/            figures to share (committed for `offline`)

Names that become folders (a profile name, a run name, a split) must be plain slugs (`check_slug`):
a profile JSON is a file people share, and `../../x` or "" would put runs outside runs/ or into it.
A folder being written is held by a `FolderLock` (a lock file naming pid, host and since when), and
a write that fails on a full disk or a permission says what, where, what is kept (`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import threading
import time
import weakref
from pathlib import Path

SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # letters, digits, . _ -; no leading dot or dash


def is_slug(name) -> bool:
    """True for a plain folder name: letters, digits, '.', '_', '-', starting with a letter or digit,
    at most 100 characters, no '..'."""
    return isinstance(name, str) and bool(SLUG.fullmatch(name)) and ".." not in name


def check_slug(name, what: str = "name") -> str:
    """`name` if `is_slug(name)`; else ValueError saying what to use."""
    if not is_slug(name):
        raise ValueError(f"{what} {name!r} is not a plain name: it becomes a folder, so use letters, digits, "
                         "'.', '_' and '-' only, starting with a letter or digit (e.g. 'gpt2-local'); "
                         "no '/', no '..', not empty")
    return name


def _profile_name(profile) -> str:
    return check_slug(profile if isinstance(profile, str) else profile.name, "profile name")


def root() -> Path:
    if os.environ.get("SAELAB_ROOT"):
        return Path(os.environ["SAELAB_ROOT"]).expanduser().resolve()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "notebooks").is_dir():
        return checkout
    return Path.cwd()


def run_dir(profile) -> Path:
    return root() / "runs" / _profile_name(profile)


def tokens_dir(profile) -> Path:
    return run_dir(profile) / "tokens"


def lm_dir(profile, name: str) -> Path:
    """A language model saelab trained (offline profile); name encodes its settings (saelab.data.offline_lm)."""
    return run_dir(profile) / "lm" / check_slug(name, "LM folder name")


def store_dir(profile, split: str = "train") -> Path:
    """Activation store; split "train" feeds the SAE, "mae" holds the held-out MAE texts."""
    return run_dir(profile) / "activations" / check_slug(split, "split")


def sae_dir(profile, name: str = "sae") -> Path:
    """An SAE run folder: checkpoints, history and the finished SAE; name is a plain slug."""
    return run_dir(profile) / "sae" / check_slug(name, "run name")


def figures_dir(profile) -> Path:
    return root() / "figures" / _profile_name(profile)


def executed_notebooks_dir(profile) -> Path:
    return run_dir(profile) / "notebooks"


def replace_atomically(path: Path, write) -> Path:
    """`write(tmp)` then rename tmp over `path`: a kill leaves the old file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk or Ctrl-C leaves no half-written temp file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomically(path: Path, payload, indent: int | None = 2) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=indent)))


# ---------------------------------------------------------------------------------------------- locks

LOCK_FILE = ".saelab.lock"
GARBLED_AFTER_S = 5.0  # a lock file still empty or unreadable after this long was left by a writer killed mid-create
_HELD: weakref.WeakValueDictionary[str, FolderLock] = weakref.WeakValueDictionary()  # in this process
_HELD_GUARD = threading.Lock()


class FolderBusy(RuntimeError):
    """Another process (or another call in this one) is writing the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class FolderLock:
    """An exclusive lock on a folder being written: `<folder>/.saelab.lock` holds the holder's pid, host,
    start time and what it writes. Created atomically (O_CREAT | O_EXCL), so of two writers exactly one
    wins; the other gets FolderBusy naming the holder and what to do. A lock left by a dead process on
    this host is taken over; one from another host is refused (its pid cannot be checked from here).
    Use as `with FolderLock(folder, "training"):`; `release()` is idempotent."""

    def __init__(self, folder: str | os.PathLike, what: str):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_FILE
        self.held = False

    def acquire(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "what": self.what}
        for _ in range(10):  # a takeover race with another process: read again and retry
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and self._age() < GARBLED_AFTER_S:  # the other writer is mid-create or mid-release
                    time.sleep(0.05)
                    continue
                self._take_over_or_refuse(holder or {}, key)  # {}: empty for long, left by a writer killed mid-create
                continue
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(me))
            self.held = True
            with _HELD_GUARD:
                _HELD[key] = self
            return self
        raise FolderBusy(f"could not lock {self.folder}: {self.path} keeps changing hands; retry in a moment")

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return 0.0

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return holder if isinstance(holder, dict) else None

    def _take_over_or_refuse(self, holder: dict, key: str) -> None:
        pid, host = holder.get("pid"), holder.get("host")
        who = f"pid {pid} on {host}, since {holder.get('since')}, {holder.get('what', 'writing')}"
        if holder and host != socket.gethostname():
            raise FolderBusy(f"{self.folder} is locked by another machine ({who}). If that machine no longer "
                             f"writes here, delete {self.path} and rerun; else wait for it or use another folder")
        with _HELD_GUARD:
            mine = _HELD.get(key)
        if holder and isinstance(pid, int) and _alive(pid) and (pid != os.getpid() or mine is not None):
            what = ("another call in this process (e.g. a notebook cell still running, or one you interrupted "
                    "whose result is still referenced)" if pid == os.getpid() else "another process")
            raise FolderBusy(f"{self.folder} is being written by {what}: {who}. Wait for it to finish (or stop "
                             f"it), or use another folder; running both at once would interleave their files")
        # the holder is dead (or is this process, which no longer holds it): take over, atomically. Renaming
        # the stale file to a name only this process uses means two takers cannot both remove a fresh lock
        stale = self.path.with_name(f"{LOCK_FILE}.stale.{os.getpid()}.{threading.get_ident()}")
        try:
            os.rename(self.path, stale)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(stale.read_text())
        except (OSError, json.JSONDecodeError):
            moved = {}
        if moved != holder:  # another taker replaced it in between: put the live lock back if the spot is free
            with contextlib.suppress(OSError):
                os.link(stale, self.path)
        stale.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        with _HELD_GUARD:
            key = str(self.path.resolve())
            if _HELD.get(key) is self:
                del _HELD[key]
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


# ---------------------------------------------------------------------------------------------- I/O faults

class WriteFailed(OSError):
    """A write that failed on the disk (full, read-only, permission): says what, where, what is kept."""


_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
            errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EROFS: "the filesystem is read-only"}


def error_number(err: BaseException) -> int | None:
    """The errno of an OSError, or of a safetensors error that wraps one ("... (os error 28)")."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    found = re.search(r"os error (\d+)", str(err))
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def writing(what: str, where: str | os.PathLike, kept: str, then: str = "rerun to continue"):
    """Wrap a write: an OSError (or safetensors' I/O error) inside becomes WriteFailed saying
    "could not write <what> to <where>: <reason>. <kept>; free space / fix permissions, then <then>"."""
    from safetensors import SafetensorError  # deferred: importing saelab stays cheap

    try:
        yield
    except (OSError, SafetensorError) as err:
        if isinstance(err, WriteFailed):
            raise
        number = error_number(err)
        if number is None and isinstance(err, SafetensorError):
            raise
        reason = _REASONS.get(number, os.strerror(number) if number else str(err))
        fix = ("free some space there" if number in (errno.ENOSPC, errno.EDQUOT)
               else "make it writable" if number in (errno.EACCES, errno.EPERM, errno.EROFS) else "fix that")
        raise WriteFailed(number or errno.EIO, f"could not write {what} to {where}: {reason} ({err}). {kept}; "
                          f"{fix}, then {then}") from err
