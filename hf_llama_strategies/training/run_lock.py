"""One run per folder: an exclusive lock held from a run's first write to its end.

The lock is ``fcntl.flock`` on a hidden file in the folder (:data:`LOCK_FILE_NAME`), holding
who holds it (process id, host, start time, command). The kernel releases it when the holder
exits, however it ends: a lock file left by a killed run is taken over, with a note naming it. A
second live run is refused in one line naming the holder. Within one process the lock is shared
(a notebook that builds a second trainer for the same folder is not refused by the first).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Optional

from transformers.utils import logging

from ..core.faults import writing
from ..errors import OutputDirBusyError

try:  # POSIX; elsewhere runs are not locked (said once)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.get_logger(__name__)

#: The lock file a run keeps in its folder; the checks of an occupied output_dir ignore it.
LOCK_FILE_NAME = ".hf-llama-strategies.lock"
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_HELD: dict[str, "_Held"] = {}
_HELD_GUARD = threading.Lock()


class _Held:
    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path, self.count = fd, path, 1


def describe_holder(text: str) -> str:
    """``process 123 on host gpu1, started 2025-01-01 12:00:00 (command)`` from a lock file's contents."""
    try:
        info = json.loads(text)
        who = f"process {int(info['pid'])} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file names no holder)"
    command = str(info.get("command") or "")
    return who + (f" ({command[:120]})" if command else "")


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _holder_record() -> bytes:
    record = {
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "command": " ".join(sys.argv)[:300],
    }
    return json.dumps(record).encode("utf-8")


def _open_locked(path: str, what: str) -> tuple[int, str]:
    """The lock file opened and locked, and what it held before (a dead holder's record, or nothing)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read(fd)
            os.close(fd)
            if exc.errno not in _BUSY:
                raise
            raise OutputDirBusyError(
                f"{what}={os.path.dirname(path)!r} is in use by another run: {describe_holder(holder)}. Nothing was "
                f"written. Wait for it to finish, or choose another {what}."
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd, _read(fd)
        # The holder removed the file as it finished, after we opened it: lock the new one.
        os.close(fd)


def acquire_run_lock(directory: str, what: str = "output_dir") -> Optional[str]:
    """Lock ``directory`` (created if missing) for this process; returns a note when a dead run's lock was taken over.

    Raises:
        OutputDirBusyError: another live process holds it; the message names it.
        StorageError: the lock file cannot be written (disk full, read-only).
    """
    if fcntl is None:  # pragma: no cover - Windows
        logger.warning_once("This platform has no fcntl: runs are not locked against one another.")
        return None
    path = os.path.join(os.path.abspath(directory), LOCK_FILE_NAME)
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is not None:
            held.count += 1
            return None
        with writing(f"locking {what}", path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, before = _open_locked(path, what)
            try:
                record = _holder_record()
                os.ftruncate(fd, 0)
                os.pwrite(fd, record, 0)
            except BaseException:
                os.close(fd)
                raise
        _HELD[path] = _Held(fd, path)
    if before:
        return f"took over the lock of {what} {os.path.dirname(path)} left by {describe_holder(before)}, which ended"
    return None


def release_run_lock(directory: str) -> None:
    """Release this process's lock of ``directory`` (the last holder within the process removes the file)."""
    path = os.path.join(os.path.abspath(directory), LOCK_FILE_NAME)
    with _HELD_GUARD:
        held = _HELD.get(path)
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[path]
        try:
            # Removed while still locked: a process that opened it meanwhile finds it gone and starts over.
            os.unlink(path)
        except OSError:
            pass
        os.close(held.fd)


def move_run_lock(old_directory: str, new_directory: str) -> None:
    """Record that a held lock's folder was renamed (the lock file moved with it)."""
    old = os.path.join(os.path.abspath(old_directory), LOCK_FILE_NAME)
    new = os.path.join(os.path.abspath(new_directory), LOCK_FILE_NAME)
    with _HELD_GUARD:
        held = _HELD.pop(old, None)
        if held is not None:
            held.path = new
            _HELD[new] = held


class RunLock:
    """``with RunLock(output_dir):`` hold the lock of ``output_dir`` for the block (see :func:`acquire_run_lock`)."""

    def __init__(self, directory: str, what: str = "output_dir") -> None:
        self.directory, self.what = directory, what
        self.note: Optional[str] = None

    def __enter__(self) -> "RunLock":
        self.note = acquire_run_lock(self.directory, self.what)
        return self

    def __exit__(self, *exc: Any) -> None:
        release_run_lock(self.directory)
