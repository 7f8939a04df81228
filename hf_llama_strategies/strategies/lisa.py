"""LISA (layer-wise importance sampling, as in LMFlow): K decoder layers train at a time.

Options (:class:`LisaArguments`): ``lisa_layers`` (K), ``lisa_interval_steps`` (default 20),
``lisa_drop_optimizer_state`` (default true). Among the decoder layers the static plan trains, K are drawn at step 0 and
anew every ``lisa_interval_steps`` optimizer steps; the other trainable blocks (embeddings,
norm, head) keep their static decision and train throughout.

The draw for interval ``i`` is a pure function of the seed (``TrainingArguments.seed``) and
``i``: each candidate layer gets the key ``sha256("<seed>:<i>:<layer>")`` and the K smallest
keys win. It uses no global RNG (a run's data order and dropout are untouched) and no
library whose algorithm could change between versions, so a resumed run, every DDP rank
and a later release draw the same layers.

With ``lisa_drop_optimizer_state`` the runtime drops the optimizer state (Adam moments) of
layers that stop training, so optimizer memory stays bounded by the active layers plus the
always-trained blocks; a layer drawn again starts from fresh state, as a newly created
optimizer would. LMFlow keeps the state of every layer ever drawn.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from ..core.anatomy import LAYER, ModelAnatomy
from ..core.hookspecs import hookimpl
from ..core.layer_selection import format_layers
from ..core.options import OptionGroup, check_bool, check_optional_positive_int
from ..core.plan import StrategyPlan
from ..errors import InvalidArgumentError, PlanError
from .schedules import scheduled_layers

SCHEDULE = "lisa"
DEFAULT_INTERVAL_STEPS = 20
#: ``TrainingArguments.seed``'s default, for plans built without training arguments.
DEFAULT_SEED = 42


def draw_layers(layers: Iterable[int], num_active: int, seed: int, interval_index: int) -> list[int]:
    """The ``num_active`` layers of ``layers`` that train during interval ``interval_index``, sorted."""

    def key(layer: int) -> bytes:
        return hashlib.sha256(f"{seed}:{interval_index}:{layer}".encode()).digest()

    return sorted(sorted(layers, key=key)[:num_active])


@dataclass
class LisaArguments(OptionGroup):
    """LISA: K decoder layers train at a time, drawn anew at fixed intervals."""

    REFINING = frozenset({"lisa_drop_optimizer_state"})

    lisa_layers: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "LISA (layer-wise importance sampling, as in LMFlow): train this many decoder layers at a time, "
                "drawn anew every `lisa_interval_steps` among the layers `trainable_layers` selects; embeddings "
                "and head train throughout unless the static plan freezes them. Unset: no LISA."
            )
        },
    )
    lisa_interval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Optimizer steps between two LISA draws. Default: 20 (LMFlow's)."},
    )
    lisa_drop_optimizer_state: bool = field(
        default=True,
        metadata={
            "help": (
                "Drop the optimizer state (Adam moments) of the layers LISA deactivates, so optimizer memory is "
                "bounded by the active layers; a layer drawn again starts with fresh state. false keeps it, as "
                "LMFlow does."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("lisa_drop_optimizer_state", self.lisa_drop_optimizer_state)
        check_optional_positive_int("lisa_layers", self.lisa_layers, "decoder layers trained at a time")
        check_optional_positive_int(
            "lisa_interval_steps", self.lisa_interval_steps, "optimizer steps between two draws"
        )
        if self.lisa_layers is None and self.lisa_interval_steps is not None:
            raise InvalidArgumentError(
                "lisa_interval_steps", self.lisa_interval_steps, "unset unless lisa_layers is set",
                "It has no effect without LISA.",
            )


@hookimpl(trylast=True)
def hfls_plan_parameters(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: LisaArguments, training_args: Optional[Any]
) -> None:
    """Put the trainable decoder layers under the LISA schedule and store its spec in the plan."""
    args = strategy_args
    if args.lisa_layers is None:
        return
    anatomy.require("lisa_layers", args.lisa_layers)
    layers = scheduled_layers(plan)
    if not layers:
        raise PlanError(
            f"lisa_layers={args.lisa_layers}: the plan trains none of the {plan.num_layers} decoder layers of "
            f"{plan.model_class}, so LISA has nothing to draw from (trainable_layers={args.trainable_layers!r}, "
            f"frozen_params={args.frozen_params!r})."
        )
    if args.lisa_layers > len(layers):
        raise InvalidArgumentError(
            "lisa_layers", args.lisa_layers,
            f"at most {len(layers)}, the decoder layers the plan trains ({format_layers(layers)} of "
            f"{plan.model_class}'s {plan.num_layers})",
        )
    interval = args.lisa_interval_steps or DEFAULT_INTERVAL_STEPS
    seed = getattr(training_args, "seed", None) if training_args is not None else None
    seed = DEFAULT_SEED if seed is None else int(seed)
    drop = args.lisa_drop_optimizer_state
    plan.schedules[SCHEDULE] = {
        "description": (
            f"{args.lisa_layers} of decoder layers {format_layers(layers)} train at a time, drawn every {interval} "
            f"optimizer steps (seed {seed}); optimizer state of inactive layers {'dropped' if drop else 'kept'}"
        ),
        "drop_optimizer_state": drop,
        "layers": layers,
        "num_active": args.lisa_layers,
        "interval_steps": interval,
        "seed": seed,
    }
    for decision in plan:
        if decision.kind == LAYER and decision.trainable and decision.layer in layers:
            plan.set([decision.name], f"{decision.reason}; lisa_layers={args.lisa_layers}", schedule=SCHEDULE)
    if args.lisa_layers == len(layers):
        plan.note(
            f"lisa_layers={args.lisa_layers} equals the number of trainable decoder layers: every layer trains at "
            "every step, as without LISA."
        )


@hookimpl
def hfls_active_parameters(plan: StrategyPlan, schedule: str, global_step: int) -> Optional[list[str]]:
    """The parameters of the layers drawn for the interval that holds ``global_step``."""
    if schedule != SCHEDULE:
        return None
    spec = plan.schedules[SCHEDULE]
    chosen = set(
        draw_layers(spec["layers"], spec["num_active"], spec["seed"], global_step // spec["interval_steps"])
    )
    return [d.name for d in plan if d.schedule == SCHEDULE and d.layer in chosen]


__all__ = ["LisaArguments", "draw_layers", "hfls_active_parameters", "hfls_plan_parameters"]
