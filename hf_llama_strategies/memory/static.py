"""The static memory estimate: what training by a plan holds for good, from the plan alone (no activations)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.dtypes import dtype_bytes
from ..core.plan import StrategyPlan

# Optimizer state as (bytes per element when kept in the parameter's dtype, fixed bytes per element).
# AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype; 8-bit variants keep 2 bytes.
_STATE_PER_ELEMENT = {
    "adamw_torch": (2, 0), "adamw_torch_fused": (2, 0), "adamw_torch_xla": (2, 0), "adamw_torch_npu_fused": (2, 0),
    "adamw_anyprecision": (2, 0), "ademamix": (3, 0), "stable_adamw": (2, 0), "rmsprop": (1, 0),
    "adagrad": (1, 0), "sgd": (0, 0), "lomo": (0, 0), "adalomo": (0, 0),
    "adamw_bnb_8bit": (0, 2), "adamw_8bit": (0, 2), "paged_adamw_8bit": (0, 2), "adamw_torch_8bit": (0, 2),
    "adamw_torch_4bit": (0, 1), "lion_8bit": (0, 1), "lion_32bit": (0, 4), "paged_lion_8bit": (0, 1),
    "paged_adamw_32bit": (0, 8), "paged_lion_32bit": (0, 4),
}


@dataclass
class MemoryEstimate:
    """Bytes for weights and gradients by dtype, and for optimizer state."""

    weights: dict[str, int] = field(default_factory=dict)
    gradients: dict[str, int] = field(default_factory=dict)
    optimizer_state: int = 0
    optimizer: str = "adamw_torch"
    assumed_optimizer: bool = False

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + sum(self.gradients.values()) + self.optimizer_state

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``plan --json``'s ``static_memory``)."""
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        """Human-readable lines, GiB."""
        gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
        by_dtype = lambda d: ", ".join(f"{k.replace('torch.', '')} {gib(v)}" for k, v in sorted(d.items()))  # noqa: E731
        note = " (assumed AdamW-like: unknown optimizer)" if self.assumed_optimizer else ""
        return "\n".join(
            [
                "memory estimate (without activations):",
                f"  weights          {gib(sum(self.weights.values())):>14}  ({by_dtype(self.weights) or '-'})",
                f"  gradients        {gib(sum(self.gradients.values())):>14}  ({by_dtype(self.gradients) or '-'})",
                f"  optimizer state  {gib(self.optimizer_state):>14}  ({self.optimizer}{note})",
                f"  total            {gib(self.total):>14}",
            ]
        )


def estimate_memory(plan: StrategyPlan, optim: str = "adamw_torch") -> MemoryEstimate:
    """Estimate what training by ``plan`` holds in memory with optimizer ``optim``.

    Gradients take the parameter's dtype and exist only for trainable parameters;
    optimizer state follows ``optim`` (a ``TrainingArguments.optim`` value). Adafactor's
    factored second moment is counted per matrix (rows + columns).
    """
    estimate = MemoryEstimate(optimizer=optim)
    factored = optim.startswith("adafactor") or optim == "galore_adafactor"
    per_dtype, fixed = _STATE_PER_ELEMENT.get(optim, (2, 0))
    estimate.assumed_optimizer = optim not in _STATE_PER_ELEMENT and not factored
    for decision in plan:
        size = decision.numel * dtype_bytes(decision.dtype)
        estimate.weights[decision.dtype] = estimate.weights.get(decision.dtype, 0) + size
        if not decision.trainable:
            continue
        estimate.gradients[decision.dtype] = estimate.gradients.get(decision.dtype, 0) + size
        if factored:
            shape = decision.shape if decision.shape else (decision.numel,)
            elements = sum(shape[-2:]) if len(shape) >= 2 else decision.numel
            estimate.optimizer_state += elements * dtype_bytes(decision.dtype)
        else:
            estimate.optimizer_state += decision.numel * (per_dtype * dtype_bytes(decision.dtype) + fixed)
    return estimate
