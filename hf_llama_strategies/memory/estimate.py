"""What a dry run reports: the peak of one training step and what it is made of, in total and per block."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from ..core.units import format_bytes, format_flops
from .counter import NOT_SEEN


@dataclass
class BlockMemory:
    """One block of the model (embeddings, a decoder layer, the norm, the head) in one step.

    ``activations_bytes`` is what the block's forward left alive for backward (its output
    included), in the first micro-batch.
    """

    block: str
    params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int


@dataclass
class TrainingMemoryEstimate:
    """Peak memory of one training step per device, and what it is made of (bytes).

    Attributes:
        peak_bytes: the peak of live tensor bytes in one steady-state optimizer step, per
            device (per rank, with the sharding of ``distributed`` applied).
        weights_bytes, gradients_bytes, optimizer_state_bytes: parameters as planned, the
            largest live gradient total, the optimizer state at steady state (per rank).
        activations_bytes: the largest total that a forward pass left alive for backward.
        peak_phase: when the peak occurs (``"backward, micro-batch 1 of 2"``...).
        peak_breakdown: bytes by category at the peak (weights, buffers, gradients,
            optimizer_state, inputs, activations: the last is everything else).
        blocks: per-block figures.
        simulated: False when the model's code could not run on fake tensors; the figures
            are then the static estimate (no activations) and ``fallback_reason`` says why.
        flops_per_step: matrix-product and attention FLOPs of the optimizer step (forward,
            backward, recomputation; the global batch of one device).
    """

    peak_bytes: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: Optional[int]
    peak_phase: str
    batch_size: int
    seq_len: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    autocast: Optional[str]
    optimizer: str
    simulated: bool = True
    fallback_reason: Optional[str] = None
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    blocks: list[BlockMemory] = field(default_factory=list)
    flops_per_step: Optional[int] = None
    step: int = 0
    world_size: int = 1
    distributed: Optional[str] = None
    single_device_peak_bytes: Optional[int] = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    not_seen: tuple[str, ...] = NOT_SEEN

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``plan --json``'s ``memory``)."""
        data = asdict(self)
        data["not_seen"] = list(self.not_seen)
        return data

    def table(self) -> str:
        """Human-readable lines (GiB), with the per-block figures, runs of equal layers merged."""
        gib = lambda n: "-" if n is None else format_bytes(n)  # noqa: E731
        how = (
            f"batch {self.batch_size} x {self.seq_len}, gradient accumulation {self.gradient_accumulation_steps}, "
            f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}, "
            f"{self.autocast + ' autocast' if self.autocast else 'no autocast'}, {self.optimizer}"
        )
        if self.distributed:
            how += f", {self.distributed} over {self.world_size} ranks"
        if not self.simulated:
            lines = [
                f"training memory per device (static estimate, no activations; {how}):",
                f"  not simulated: {self.fallback_reason}",
            ]
        else:
            lines = [f"training memory per device, one optimizer step simulated on fake tensors ({how}):"]
        lines += [
            f"  peak             {gib(self.peak_bytes):>14}  ({self.peak_phase})",
            f"  weights          {gib(self.weights_bytes):>14}",
            f"  gradients        {gib(self.gradients_bytes):>14}",
            f"  optimizer state  {gib(self.optimizer_state_bytes):>14}",
            f"  activations      {gib(self.activations_bytes):>14}  (kept for backward at the end of a forward)",
        ]
        if self.simulated and self.peak_breakdown:
            parts = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in self.peak_breakdown.items() if v)
            lines.append(f"  at the peak: {parts}")
        if self.flops_per_step:
            work = format_flops(self.flops_per_step)
            lines.append(f"  work: {work} per optimizer step (matrix products and attention)")
        if self.single_device_peak_bytes is not None and self.distributed:
            lines.append(f"  one device without {self.distributed}: {gib(self.single_device_peak_bytes)}")
        if self.blocks:
            lines.append("  " + _blocks_table(self.blocks).replace("\n", "\n  "))
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append("  not counted (add a margin on a GPU): " + "; ".join(self.not_seen))
        return "\n".join(lines)


def _blocks_table(blocks: list[BlockMemory]) -> str:
    mib = format_bytes
    rows: list[tuple[str, ...]] = []
    run: list[BlockMemory] = []

    def figures(b: BlockMemory) -> tuple:
        return (b.params, b.weights_bytes, b.gradients_bytes, b.optimizer_state_bytes, b.activations_bytes)

    def flush() -> None:
        if not run:
            return
        first, last = run[0].block, run[-1].block
        label = first if len(run) == 1 else f"{first}-{last.rsplit('.', 1)[-1]}"
        each = " each" if len(run) > 1 else ""
        b = run[0]
        rows.append((label + each, mib(b.weights_bytes), mib(b.gradients_bytes), mib(b.optimizer_state_bytes),
                     mib(b.activations_bytes)))
        run.clear()

    for block in blocks:
        layer = block.block.startswith("layers.")
        if run and (not layer or figures(run[-1]) != figures(block)):
            flush()
        run.append(block)
        if not layer:
            flush()
    flush()
    header = ("block", "weights", "gradients", "opt. state", "activations")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    render = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([render(header), *(render(r) for r in rows)])
