"""Gradual unfreezing (ULMFiT): decoder layers start training one stage at a time, from the top.

Options: ``unfreeze_schedule: gradual``, ``unfreeze_interval_steps``,
``unfreeze_layers_per_step``. The layers that the static plan trains (``trainable_layers``,
``trainable_modules``, regexes) start frozen; every ``unfreeze_interval_steps`` optimizer
steps the next ``unfreeze_layers_per_step`` of them, from the top, start training. Blocks
around the layers (head, norm, embeddings) keep their static decision and train from
step 0.

The schedule is written into the plan as each parameter's ``active_from`` step, so the plan
table shows when every layer starts and no hook is needed at run time.
"""

from __future__ import annotations

from typing import Any, Optional

from ..anatomy import LAYER, ModelAnatomy
from ..arguments import StrategyArguments
from ..errors import InvalidArgumentError, PlanError
from ..hookspecs import hookimpl
from ..layer_selection import format_layers
from ..plan import StrategyPlan
from ..schedules import check_step_option, refuse_without_layers, scheduled_layers

GRADUAL = "gradual"
_SCHEDULES = (GRADUAL, "none")


def is_gradual(strategy_args: StrategyArguments) -> bool:
    """Whether ``unfreeze_schedule`` asks for gradual unfreezing."""
    value = strategy_args.unfreeze_schedule
    return isinstance(value, str) and value.strip().lower() == GRADUAL


@hookimpl
def hfls_validate_arguments(strategy_args: StrategyArguments) -> None:
    """Check the gradual unfreezing options."""
    args = strategy_args
    value = args.unfreeze_schedule
    if value is not None and (not isinstance(value, str) or value.strip().lower() not in _SCHEDULES):
        raise InvalidArgumentError("unfreeze_schedule", value, "'gradual', 'none', or unset (null)")
    check_step_option("unfreeze_interval_steps", args.unfreeze_interval_steps, "optimizer steps between two stages")
    check_step_option("unfreeze_layers_per_step", args.unfreeze_layers_per_step, "layers unfrozen per stage")
    if not is_gradual(args):
        for option in ("unfreeze_interval_steps", "unfreeze_layers_per_step"):
            if getattr(args, option) is not None:
                raise InvalidArgumentError(
                    option, getattr(args, option), "unset unless unfreeze_schedule: gradual",
                    f"It has no effect with unfreeze_schedule={value!r}.",
                )
        return
    if args.lisa_layers is not None:
        raise InvalidArgumentError(
            "lisa_layers", args.lisa_layers, "unset when unfreeze_schedule='gradual'",
            "LISA and gradual unfreezing both decide when decoder layers train; use one of them.",
        )
    if args.unfreeze_interval_steps is None:
        raise InvalidArgumentError(
            "unfreeze_interval_steps", None, "a positive integer with unfreeze_schedule: gradual",
            "It is the number of optimizer steps after which one more layer starts training.",
        )
    refuse_without_layers(
        "unfreeze_schedule", value, args,
        "Gradual unfreezing unfreezes the layers trainable_layers selects, and it selects none.",
    )


@hookimpl(trylast=True)
def hfls_plan_parameters(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: StrategyArguments, training_args: Optional[Any]
) -> None:
    """Give every trainable decoder layer its start step (after the static decisions)."""
    args = strategy_args
    if not is_gradual(args):
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
        plan.note(
            f"Gradual unfreezing: layers {format_layers(never)} would start at step {min(start_of[l] for l in never)} "
            f"or later, but training stops at max_steps={max_steps}; they never train. Lower "
            "unfreeze_interval_steps or raise unfreeze_layers_per_step."
        )


__all__ = ["hfls_plan_parameters", "hfls_validate_arguments", "is_gradual"]
