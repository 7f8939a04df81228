"""What the dynamic schedules share (gradual unfreezing, LISA, and any plugin's): which layers a plan trains,
and how their step-count options are checked.

A schedule decides *when* the layers the static plan trains do train; both built-in schedules
start from the same set of layers and refuse the same kinds of step counts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .anatomy import LAYER
from .errors import InvalidArgumentError
from .layer_selection import selects_none
from .validation import check_positive_int

if TYPE_CHECKING:
    from .arguments import StrategyArguments
    from .plan import StrategyPlan


def scheduled_layers(plan: "StrategyPlan") -> list[int]:
    """Decoder layers with at least one parameter the plan trains, bottom to top."""
    return sorted({d.layer for d in plan if d.kind == LAYER and d.trainable and d.layer is not None})


def check_step_option(option: str, value: Any, what: str) -> None:
    """An unset (``None``) or positive whole number of steps or layers, else an :class:`InvalidArgumentError`."""
    if value is not None:
        check_positive_int(option, value, what)


def refuse_without_layers(option: str, value: Any, strategy_args: "StrategyArguments", why: str) -> None:
    """A schedule of decoder layers needs some: refuse ``option`` when ``trainable_layers`` is ``none``."""
    if selects_none(strategy_args.trainable_layers):
        raise InvalidArgumentError(option, value, "unset when trainable_layers='none'", why)
