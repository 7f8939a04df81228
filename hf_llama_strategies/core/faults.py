"""Writes that the machine fails (disk full, quota, read-only, I/O error): told apart from bugs, named in one line.

A full disk reaches Python in three shapes: an ``OSError`` with ``errno`` ENOSPC (Python's own
files), a ``SafetensorError`` whose text ends in "(os error 28)" (safetensors' Rust writer), and a
``RuntimeError`` from torch's zip writer that says only "unexpected pos" or "file write failed".
:func:`machine_fault` recognises each; :func:`writing` turns them into a
:class:`~hf_llama_strategies.errors.StorageError` naming the operation and the path.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from contextlib import contextmanager
from typing import Iterator, Optional

from ..errors import MACHINE_ERRNOS, StorageError

_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# torch.save's zip writer (caffe2's PyTorchStreamWriter) reports a failed write without its errno.
_TORCH_WRITE_FAILED = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")
# Below this, a write that failed without saying why failed for want of space.
_NEARLY_FULL = 1 << 20


def _free_bytes(path: str) -> Optional[int]:
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return None
        probe = parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def machine_fault(exc: BaseException, path: Optional[str] = None) -> Optional[tuple[str, Optional[int]]]:
    """``(cause in words, errno)`` when ``exc`` is a write the machine failed, else ``None``.

    Args:
        exc: the exception a write raised.
        path: where it wrote, to tell a torch write that failed for want of space (it gives no errno).
    """
    if isinstance(exc, StorageError):
        return exc.cause, exc.errno
    if isinstance(exc, OSError):
        if exc.errno in MACHINE_ERRNOS:
            return os.strerror(exc.errno), exc.errno
        return None
    text = str(exc)
    match = _RUST_OS_ERROR.search(text)
    if match and int(match.group(1)) in MACHINE_ERRNOS:
        code = int(match.group(1))
        return os.strerror(code), code
    if isinstance(exc, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILED):
        free = _free_bytes(path) if path else None
        if free is not None and free < _NEARLY_FULL:
            return os.strerror(errno.ENOSPC), errno.ENOSPC
        return "the write failed (torch.save could not write the file)", errno.EIO
    return None


@contextmanager
def writing(operation: str, path: str) -> Iterator[None]:
    """Run a write; a failure that is the machine's becomes a :class:`StorageError` naming the operation and path."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        fault = machine_fault(exc, path)
        if fault is None:
            raise
        raise StorageError(operation, getattr(exc, "filename", None) or path, *fault) from exc
