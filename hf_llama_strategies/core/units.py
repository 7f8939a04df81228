"""Sizes as people read them: bytes, FLOPs and parameter counts."""

from __future__ import annotations


def format_bytes(count: float) -> str:
    """``85899345920`` -> ``'80.00 GiB'``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(count) >= size:
            return f"{count / size:,.2f} {unit}"
    return f"{int(count)} B"


def format_flops(count: float) -> str:
    """``1.5e12`` -> ``'1.50 TFLOP'``."""
    for unit, size in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if count >= size:
            return f"{count / size:,.2f} {unit}"
    return f"{int(count)} FLOP"


def format_count(count: int) -> str:
    """``1_500_000`` -> ``'1.50M'``."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def compact_bytes(count: float) -> str:
    """``format_bytes`` without the space, for table cells: ``'1.50GiB'``."""
    return format_bytes(count).replace(" ", "")
