"""Gradual unfreezing (ULMFiT): decoder layers start training one stage at a time, from the top.

Options (:class:`GradualUnfreezingArguments`): ``unfreeze_schedule: gradual``,
``unfreeze_interval_steps``, ``unfreeze_layers_per_step``. The layers that the static plan trains (``trainable_layers``,
``trainable_modules``, regexes) start frozen; every ``unfreeze_interval_steps`` optimizer
steps the next ``unfreeze_layers_per_step`` of them, from the top, start training. Blocks
around the layers (head, norm, embeddings) keep their static decision and train from
step 0.

The schedule is written into the plan as each parameter's ``active_from`` step, so the plan
table shows when every layer starts and no hook is needed at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.anatomy import LAYER, ModelAnatomy
from ..core.hookspecs import hookimpl
from ..core.layer_selection import format_layers
from ..core.options import OptionGroup, check_optional_positive_int, check_word
from ..core.plan import StrategyPlan
from ..errors import InvalidArgumentError, PlanError
from .schedules import scheduled_layers

GRADUAL = "gradual"
_SCHEDULES = (GRADUAL, "none")


@dataclass
class GradualUnfreezingArguments(OptionGroup):
    """Gradual unfreezing (ULMFiT): the selected decoder layers start training one stage at a time, from the top."""

    UNSET_WORDS = {"unfreeze_schedule": "none"}

    unfreeze_schedule: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "'gradual' (ULMFiT-style gradual unfreezing): the decoder layers start frozen (head, and norm/"
                "embeddings as configured, train from step 0) and one more layer from the top (or "
                "`unfreeze_layers_per_step`) starts training every `unfreeze_interval_steps` optimizer steps, "
                "until every layer `trainable_layers` selects trains. Unset or 'none': no schedule."
            ),
        },
    )
    unfreeze_interval_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Optimizer steps between two unfreezing stages of `unfreeze_schedule: gradual` (required with "
                "it). With gradient accumulation a step is an optimizer step, as `global_step` counts them."
            )
        },
    )
    unfreeze_layers_per_step: Optional[int] = field(
        default=None,
        metadata={"help": "Decoder layers unfrozen at each stage of `unfreeze_schedule: gradual`. Default: 1."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_word("unfreeze_schedule", self.unfreeze_schedule, _SCHEDULES, "'gradual', 'none', or unset (null)")
        check_optional_positive_int(
            "unfreeze_interval_steps", self.unfreeze_interval_steps, "optimizer steps between two stages"
        )
        check_optional_positive_int(
            "unfreeze_layers_per_step", self.unfreeze_layers_per_step, "layers unfrozen per stage"
        )
        if not self.gradual:
            for option in ("unfreeze_interval_steps", "unfreeze_layers_per_step"):
                if getattr(self, option) is not None:
                    raise InvalidArgumentError(
                        option, getattr(self, option), "unset unless unfreeze_schedule: gradual",
                        f"It has no effect with unfreeze_schedule={self.unfreeze_schedule!r}.",
                    )
        elif self.unfreeze_interval_steps is None:
            raise InvalidArgumentError(
                "unfreeze_interval_steps", None, "a positive integer with unfreeze_schedule: gradual",
                "It is the number of optimizer steps after which one more layer starts training.",
            )

    @property
    def gradual(self) -> bool:
        """Whether ``unfreeze_schedule`` asks for gradual unfreezing."""
        value = self.unfreeze_schedule
        return isinstance(value, str) and value.strip().lower() == GRADUAL


@hookimpl(trylast=True)
def hfls_plan_parameters(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: GradualUnfreezingArguments, training_args: Optional[Any]
) -> None:
    """Give every trainable decoder layer its start step (after the static decisions)."""
    args = strategy_args
    if not args.gradual:
        return
    anatomy.require("unfreeze_schedule", args.unfreeze_schedule)
    layers = scheduled_layers(plan)
    if not layers:
        raise PlanError(
            f"unfreeze_schedule='gradual' has no decoder layer left to unfreeze: the plan trains none of the "
            f"{plan.num_layers} layers of {plan.model_class} (trainable_layers={args.trainable_layers!r}, "
            f"trainable_modules={args.trainable_modules!r}, frozen_params={args.frozen_params!r}). Select layers, "
            "or drop unfreeze_schedule."
        )
    per_stage = args.unfreeze_layers_per_step or 1
    if per_stage > len(layers):
        raise InvalidArgumentError(
            "unfreeze_layers_per_step", per_stage,
            f"at most {len(layers)}, the decoder layers the plan trains ({format_layers(layers)})",
        )
    interval = args.unfreeze_interval_steps
    top_down = sorted(layers, reverse=True)
    start_of = {layer: (rank // per_stage + 1) * interval for rank, layer in enumerate(top_down)}
    for decision in plan:
        if decision.kind == LAYER and decision.trainable and decision.layer in start_of:
            start = start_of[decision.layer]
            plan.set(
                [decision.name], f"{decision.reason}; unfreeze_schedule=gradual: from step {start}", active_from=start
            )
    last = max(start_of.values())
    max_steps = getattr(training_args, "max_steps", -1) if training_args is not None else -1
    if isinstance(max_steps, int) and 0 < max_steps <= last:
        never = [layer for layer, start in start_of.items() if start >= max_steps]
        first = min(start_of[layer] for layer in never)
        plan.note(
            f"Gradual unfreezing: layers {format_layers(never)} would start at step {first} "
            f"or later, but training stops at max_steps={max_steps}; they never train. Lower "
            "unfreeze_interval_steps or raise unfreeze_layers_per_step."
        )


__all__ = ["GradualUnfreezingArguments", "hfls_plan_parameters"]
