"""What the dynamic schedules share (gradual unfreezing, LISA, and any plugin's): which layers a plan trains,
and how their step-count options are checked.

A schedule decides *when* the layers the static plan trains do train; both built-in schedules
start from the same set of layers and refuse the same kinds of step counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .anatomy import LAYER
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .plan import StrategyPlan


def scheduled_layers(plan: "StrategyPlan") -> list[int]:
    """Decoder layers with at least one parameter the plan trains, bottom to top."""
    return sorted({d.layer for d in plan if d.kind == LAYER and d.trainable and d.layer is not None})


def check_positive_int(option: str, value: Any, what: str) -> None:
    """Raise :class:`InvalidArgumentError` unless ``value`` is ``None`` or an int >= 1."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(option, value, f"a positive integer ({what})")
