"""What the benchmarks share: random-token data, the peak-RSS probes, the load average, the JSON report.

Not a benchmark. Each benchmark puts this folder on ``sys.path`` and imports it as ``_common``,
so that it works run as a script (``python benchmarks/x.py``) and loaded by path from the tests.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Optional

import torch

from hf_llama_strategies.memory.peak import libc, reset_peak_rss, rss_kib

__all__ = ["RandomTokens", "load_average", "pin_malloc", "reset_peak_rss", "rss_kib", "write_report"]


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


# -- peak resident set (Linux): the package's probes (the CLI's `compare` measures with them too) --


def pin_malloc() -> bool:
    """Fix glibc's mmap threshold so that freed tensors go back to the system; whether it could.

    By default glibc raises the threshold as large blocks are freed, after which one run's
    freed tensors serve the next run from the heap and its peak resident set shows nothing.
    """
    glibc = libc()
    try:
        glibc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        glibc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        return True
    except AttributeError:  # no glibc
        return False


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
