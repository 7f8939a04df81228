"""The peak memory a run reached, measured: the device's on a GPU, the process's resident set on a CPU.

A GPU run's figure is torch's peak of allocated device memory (what the estimate of
:mod:`.dry_run` predicts per device). On a CPU the tensors live in the process's memory, so the
figure is the kernel's peak resident set (``VmHWM``, Linux), reset before the run; it holds
everything the process holds besides the run (Python, libraries, other models in memory).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch


@functools.lru_cache(maxsize=None)
def libc() -> Optional[Any]:
    """glibc, where there is one (its allocator's controls), else ``None``."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Give freed heap back and reset the kernel's peak (``VmHWM``) to the current RSS; whether it could."""
    with contextlib.suppress(AttributeError):
        libc().malloc_trim(0)  # type: ignore[union-attr]
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def rss_kib(field_name: str) -> Optional[int]:
    """A KiB figure of ``/proc/self/status`` (``VmRSS``, ``VmHWM``); None where there is none."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """Measures one run's peak: :meth:`start` before it, :meth:`read` after.

    Attributes:
        device_type: ``cuda`` measures the device's allocated memory; anything else the process's
            resident set.
    """

    device_type: str
    _reset: bool = False

    def start(self) -> None:
        """Forget the peaks reached so far."""
        if self.device_type == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._reset = True
        else:
            self._reset = reset_peak_rss()

    @property
    def what(self) -> str:
        """What the figure counts, in words."""
        if self.device_type == "cuda":
            return "peak GPU memory allocated by torch"
        since = " during the run" if self._reset else " since the process started"
        return f"peak resident memory of this process{since} (the model's pristine copy and data included)"

    def read(self) -> Optional[int]:
        """The peak in bytes since :meth:`start`; ``None`` where it cannot be read."""
        if self.device_type == "cuda" and torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        kib = rss_kib("VmHWM")
        return None if kib is None else kib * 1024
