"""``plan --fit 80GiB``: the settings that trade speed for memory, searched until the step fits.

Every candidate is one dry run of :func:`~hf_llama_strategies.memory.dry_run.estimate_training_memory`.
What is searched, with the batch each device sees per optimizer step kept
(``per_device_train_batch_size x gradient_accumulation_steps``):

* the per-device batch size (every divisor of that product), gradient accumulation making up the rest;
* activation checkpointing on and off;
* ``frozen_dtype`` in the autocast dtype, when frozen parameters are held in a wider one;
* the optimizer, among those the user names (``--fit_optimizers adafactor,sgd``).

For each combination of the last three, the largest per-device batch that fits is found by bisection
(the peak grows with the batch). Candidates are ranked fastest first by a step model: the
matrix-product and attention FLOPs the dry run counted for the optimizer step (checkpointing's
recomputation included), then fewer micro-batches (each one costs a kernel launch round and a
smaller, less efficient matrix product), then fewer changed settings.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence

from torch import nn

from ..arguments import StrategyArguments
from ..context import RunContext
from ..core.dtypes import torch_dtype
from ..core.units import format_bytes, format_flops
from ..errors import InvalidArgumentError
from ..planner import build_plan
from .dry_run import estimate_training_memory
from .estimate import TrainingMemoryEstimate

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from ..core.plugins import PluginManager

_UNITS = {
    "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_HALF = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}


def parse_size(text: Any, option: str = "--fit") -> int:
    """Bytes in ``text``: ``80GiB``, ``80GB`` (10**9), ``80G`` (GiB, as nvidia-smi counts), ``81920MiB``...

    Raises:
        InvalidArgumentError: not a positive size with one of those units.
    """
    match = _SIZE.match(str(text)) if isinstance(text, (str, int, float)) and not isinstance(text, bool) else None
    unit = match.group(2).lower() if match else None
    if unit == "":
        # `--fit 80` meant 80 GiB, not 80 bytes: a size needs its unit.
        raise InvalidArgumentError(
            option, text, "a memory size with its unit, such as 80GiB, 80GB or 24G",
            f"A bare number is not taken as bytes: write {match.group(1)}GiB (or B for bytes).",
        )
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise InvalidArgumentError(
            option, text, "a positive memory size such as 80GiB, 80GB, 24G or 81920MiB (KiB/MiB/GiB/TiB: powers "
            "of 1024; KB/MB/GB/TB: powers of 1000; K/M/G/T: as KiB/MiB/GiB/TiB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass
class FitCandidate:
    """One setting of the searched options and the peak its dry run gave."""

    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    frozen_dtype: Optional[str]
    optim: str
    peak_bytes: int
    flops_per_step: Optional[int]
    simulated: bool
    changes: int = 0

    def fits(self, budget: int) -> bool:
        return self.peak_bytes <= budget

    def yaml_lines(self) -> list[str]:
        """The config lines that select this candidate."""
        lines = [
            f"per_device_train_batch_size: {self.per_device_train_batch_size}",
            f"gradient_accumulation_steps: {self.gradient_accumulation_steps}",
            f"activation_checkpointing: {'true' if self.activation_checkpointing else 'false'}",
        ]
        if self.frozen_dtype is not None:
            lines.append(f"frozen_dtype: {self.frozen_dtype}")
        lines.append(f"optim: {self.optim}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "yaml": self.yaml_lines()}


@dataclass
class FitResult:
    """What ``--fit`` found: the configured run, the candidates that fit (fastest first), the closest."""

    budget_bytes: int
    batch_per_step: int
    current: FitCandidate
    candidates: list[FitCandidate] = field(default_factory=list)
    closest: Optional[FitCandidate] = None
    tried: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_bytes": self.budget_bytes,
            "batch_per_step": self.batch_per_step,
            "current": self.current.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "closest": self.closest.to_dict() if self.closest else None,
            "over_budget_bytes": None if self.candidates or self.closest is None
            else self.closest.peak_bytes - self.budget_bytes,
            "tried": self.tried,
            "seconds": self.seconds,
        }

    def report(self) -> str:
        """Human-readable lines: the candidates and the YAML to paste, or what comes closest."""
        budget = format_bytes(self.budget_bytes)
        current = self.current
        status = "fits" if current.fits(self.budget_bytes) else (
            f"does not fit ({format_bytes(current.peak_bytes - self.budget_bytes)} over)"
        )
        lines = [
            f"fit in {budget} per device, keeping {self.batch_per_step} "
            f"example{'s' if self.batch_per_step > 1 else ''} "
            "per device and optimizer step "
            f"(per_device_train_batch_size x gradient_accumulation_steps); {self.tried} dry runs:",
            f"  as configured: peak {format_bytes(current.peak_bytes)}, {status}",
        ]
        if not self.candidates:
            closest = self.closest or current
            lines.append(
                f"  nothing fits: the closest is {_describe(closest)} at {format_bytes(closest.peak_bytes)}, "
                f"{format_bytes(closest.peak_bytes - self.budget_bytes)} over {budget}. Train less (trainable_layers), "
                "shard over more GPUs (FSDP full shard or ZeRO-3 with --world_size N), or try smaller optimizer "
                "state (--fit_optimizers adafactor,sgd)."
            )
            return "\n".join(lines)
        header = ("#", "batch x accum", "checkpointing", "frozen_dtype", "optim", "peak", "work per step")
        rows = [
            (str(i + 1), f"{c.per_device_train_batch_size} x {c.gradient_accumulation_steps}",
             "on" if c.activation_checkpointing else "off", c.frozen_dtype or "-", c.optim,
             format_bytes(c.peak_bytes), "-" if c.flops_per_step is None else format_flops(c.flops_per_step))
            for i, c in enumerate(self.candidates)
        ]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        render = lambda r: "    " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines.append(
            "  candidates that fit, fastest first (counted FLOPs per optimizer step, then fewer micro-batches):"
        )
        lines += [render(header), *(render(r) for r in rows)]
        lines.append("  paste into the config (candidate 1):")
        lines += [f"    {line}" for line in self.candidates[0].yaml_lines()]
        return "\n".join(lines)


def _describe(c: FitCandidate) -> str:
    parts = [f"batch {c.per_device_train_batch_size} x {c.gradient_accumulation_steps} accumulated",
             f"checkpointing {'on' if c.activation_checkpointing else 'off'}"]
    if c.frozen_dtype:
        parts.append(f"frozen_dtype {c.frozen_dtype}")
    parts.append(c.optim)
    return ", ".join(parts)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _frozen_dtypes(model: nn.Module, context: RunContext) -> list[Optional[str]]:
    """``frozen_dtype`` values worth trying: as configured, and the autocast dtype when it halves frozen weights."""
    options: list[Optional[str]] = [context.strategy_args.frozen_dtype]
    plan = build_plan(model, context=context)
    decision = context.precision
    mode = decision.mode if decision is not None else None
    if decision is None or mode not in _HALF or decision.pure_bf16 or decision.zero3:
        return options
    narrow = torch_dtype(_HALF[mode]).itemsize
    frozen_wider = [d for d in plan if not d.trainable and d.dtype.startswith("torch.float")
                    and torch_dtype(d.dtype).itemsize > narrow]
    if frozen_wider:
        if mode not in options:
            options.append(mode)
    return options


def fit_search(
    model: nn.Module,
    strategy_args: StrategyArguments,
    training_args: "TrainingArguments",
    budget_bytes: int,
    *,
    seq_len: Optional[int] = None,
    world_size: Optional[int] = None,
    optimizers: Sequence[str] = (),
    plugin_manager: Optional["PluginManager"] = None,
    context: Optional[RunContext] = None,
) -> FitResult:
    """Search the settings that trade speed for memory for those whose step fits ``budget_bytes``.

    Args:
        model: the model (the meta device is fine).
        strategy_args, training_args: the configured run; the search changes copies.
        budget_bytes: memory per device.
        seq_len, world_size: as for :func:`estimate_training_memory`.
        optimizers: other ``optim`` values to try beside the configured one.
        plugin_manager, context: the run's manager, or its whole context (then every candidate
            shares its manager and hardware).

    Returns:
        A :class:`FitResult`; its ``candidates`` hold, for every combination of checkpointing,
        ``frozen_dtype`` and optimizer, the largest per-device batch that fits, fastest first.
    """
    import time

    started = time.perf_counter()
    if context is None:
        context = RunContext.create(strategy_args, training_args, model=model, plugin_manager=plugin_manager)
    context = context.variant(strategy_args, training_args, model=model)
    batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    base_optim = str(getattr(training_args.optim, "value", training_args.optim))
    base_ckpt = bool(training_args.activation_checkpointing)
    cache: dict[tuple, FitCandidate] = {}

    def run(per_device: int, ckpt: bool, frozen: Optional[str], optim: str) -> FitCandidate:
        key = (per_device, ckpt, frozen, optim)
        if key not in cache:
            args = dataclasses.replace(
                training_args, per_device_train_batch_size=per_device,
                gradient_accumulation_steps=batch // per_device, activation_checkpointing=ckpt, optim=optim,
            )
            strategy = dataclasses.replace(strategy_args, frozen_dtype=frozen)
            estimate: TrainingMemoryEstimate = estimate_training_memory(
                model, strategy, args, seq_len=seq_len, world_size=world_size, context=context,
            )
            changes = (per_device != training_args.per_device_train_batch_size) + (ckpt != base_ckpt) + (
                frozen != strategy_args.frozen_dtype) + (optim != base_optim)
            cache[key] = FitCandidate(per_device, batch // per_device, ckpt, frozen, optim, estimate.peak_bytes,
                                      estimate.flops_per_step, estimate.simulated, changes)
        return cache[key]

    current = run(training_args.per_device_train_batch_size, base_ckpt, strategy_args.frozen_dtype, base_optim)
    sizes = _divisors(batch)
    found: list[FitCandidate] = []
    smallest: list[FitCandidate] = []
    optims = list(dict.fromkeys([base_optim, *optimizers]))
    for frozen in _frozen_dtypes(model, context):
        for optim in optims:
            for ckpt in (base_ckpt, not base_ckpt):
                best = _largest_fitting(sizes, functools.partial(_at_batch, run, ckpt, frozen, optim), budget_bytes)
                if best is not None:
                    found.append(best)
                else:
                    smallest.append(run(sizes[0], ckpt, frozen, optim))
    found.sort(key=lambda c: (c.flops_per_step if c.flops_per_step is not None else float("inf"),
                              c.gradient_accumulation_steps, c.changes))
    closest = None if found else min([current, *smallest], key=lambda c: c.peak_bytes)
    return FitResult(budget_bytes, batch, current, found, closest, tried=len(cache),
                     seconds=time.perf_counter() - started)


def _at_batch(run: Any, ckpt: bool, frozen: Optional[str], optim: str, per_device: int) -> FitCandidate:
    return run(per_device, ckpt, frozen, optim)


def _largest_fitting(sizes: list[int], run: Any, budget: int) -> Optional[FitCandidate]:
    """The candidate of the largest size that fits, by bisection over ``sizes`` (ascending)."""
    low, high, best = 0, len(sizes) - 1, None
    while low <= high:
        middle = (low + high) // 2
        candidate = run(sizes[middle])
        if candidate.fits(budget):
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best


__all__ = ["FitCandidate", "FitResult", "fit_search", "parse_size"]
