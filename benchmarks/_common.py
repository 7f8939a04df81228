"""What the benchmarks share: random-token data, the peak-RSS probes, the load average, the JSON report.

Not a benchmark. Each benchmark puts this folder on ``sys.path`` and imports it as ``_common``,
so that it works run as a script (``python benchmarks/x.py``) and loaded by path from the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
from typing import Any, Optional

import torch


class RandomTokens(torch.utils.data.Dataset):
    """``n`` causal-LM examples of ``seq`` random tokens in ``[3, vocab)`` (0-2: pad, bos, eos), seeded."""

    def __init__(self, n: int, seq: int, vocab: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab, (n, seq), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# -- peak resident set (Linux) -----------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[Any]:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def pin_malloc() -> bool:
    """Fix glibc's mmap threshold so that freed tensors go back to the system; whether it could.

    By default glibc raises the threshold as large blocks are freed, after which one run's
    freed tensors serve the next run from the heap and its peak resident set shows nothing.
    """
    libc = _libc()
    try:
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        return True
    except AttributeError:  # no glibc
        return False


def reset_peak_rss() -> bool:
    """Give freed heap back and reset the kernel's peak (``VmHWM``) to the current RSS; whether it could."""
    with contextlib.suppress(AttributeError):
        _libc().malloc_trim(0)
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


def load_average() -> Optional[list[float]]:
    """The machine's 1, 5 and 15 minute load averages (None where the system has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return list(os.getloadavg())
    return None


# -- the report --------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out: str, announce: bool = False) -> None:
    """Write ``report`` as indented JSON to ``out`` (its folder made); nothing when ``out`` is empty."""
    if not out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    if announce:
        print(f"\nwrote {out}")
