"""What the dynamic schedules share (gradual unfreezing, LISA, and any plugin's): which layers a plan
trains, and the rule that a schedule of decoder layers needs some and excludes the other.

A schedule decides *when* the layers the static plan trains do train; both built-in schedules
start from the same set of layers.
"""

from __future__ import annotations

from typing import Any, Optional

from ..core.anatomy import LAYER
from ..core.layer_selection import selects_none
from ..core.plan import StrategyPlan
from ..errors import InvalidArgumentError


def scheduled_layers(plan: StrategyPlan) -> list[int]:
    """Decoder layers with at least one parameter the plan trains, bottom to top."""
    return sorted({d.layer for d in plan if d.kind == LAYER and d.trainable and d.layer is not None})


def check_schedules(trainable_layers: Any, gradual: bool, unfreeze_schedule: Any, lisa_layers: Optional[int]) -> None:
    """LISA and gradual unfreezing both decide when decoder layers train: one at a time, and over some layers.

    Raises:
        InvalidArgumentError: both are set, or one is set while ``trainable_layers`` is ``none``.
    """
    if gradual and lisa_layers is not None:
        raise InvalidArgumentError(
            "lisa_layers", lisa_layers, "unset when unfreeze_schedule='gradual'",
            "LISA and gradual unfreezing both decide when decoder layers train; use one of them.",
        )
    if not selects_none(trainable_layers):
        return
    if gradual:
        raise InvalidArgumentError(
            "unfreeze_schedule", unfreeze_schedule, "unset when trainable_layers='none'",
            "Gradual unfreezing unfreezes the layers trainable_layers selects, and it selects none.",
        )
    if lisa_layers is not None:
        raise InvalidArgumentError(
            "lisa_layers", lisa_layers, "unset when trainable_layers='none'",
            "LISA draws among the layers trainable_layers selects, and it selects none.",
        )
