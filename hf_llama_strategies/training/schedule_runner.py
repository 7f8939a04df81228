"""Dynamic plans at run time: which parameters train at each optimizer-step boundary.

The callback stays thin: it calls these at the right Trainer events. Which parameters
train at a step is never remembered, always recomputed from ``(plan, global_step)``
(:meth:`StrategyPlan.active_names`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from transformers.utils import logging

from ..core.plan import StrategyPlan
from .optimizer import plan_name, state_bytes

if TYPE_CHECKING:
    import pluggy


logger = logging.get_logger(__name__)

# Lines of a plan difference shown in an error; the rest is counted.
_MAX_DIFF_LINES = 25


@dataclass
class ActivationChange:
    """What :meth:`ScheduleRunner.apply` changed at one step boundary."""

    global_step: int
    activated: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)
    dropped_state_bytes: int = 0


class ScheduleRunner:
    """Moves a plan's schedules at optimizer-step boundaries.

    For the step about to run it sets ``requires_grad`` of every parameter the plan may
    train (the frozen ones are never touched), clears a gradient left on a parameter that
    stops training, and drops the optimizer state of inactive parameters whose schedule
    asks for it (``drop_optimizer_state`` in the schedule's spec). It never adds or
    removes optimizer groups: the optimizer holds every parameter that may train from
    step 0, and torch optimizers skip a parameter whose ``grad`` is ``None`` (no update,
    no weight decay, no state created).

    Args:
        plan: the plan being trained.
        plugin_manager: the manager the plan was built with (it answers the schedules).
    """

    def __init__(self, plan: StrategyPlan, plugin_manager: Optional["pluggy.PluginManager"] = None) -> None:
        self.plan = plan
        self.plugin_manager = plugin_manager
        self._droppable = {
            d.name
            for d in plan
            if d.trainable and d.schedule is not None and plan.schedules.get(d.schedule, {}).get("drop_optimizer_state")
        }

    def apply(
        self,
        model: nn.Module,
        global_step: int,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> Optional[ActivationChange]:
        """Make ``model`` train exactly the parameters active at ``global_step``.

        Runs in full at every call (one pass over the parameters): ``requires_grad``, a
        gradient or optimizer state may have been set by someone else since the last step
        (a resumed optimizer, ``zero_grad(set_to_none=False)``).

        Args:
            model: the (unwrapped or wrapped) model.
            global_step: optimizer steps already taken; the step about to run.
            optimizer: the Trainer's optimizer (accelerate's wrapper is fine), for dropping state.

        Returns:
            What changed, or ``None`` for a static plan.
        """
        if not self.plan.is_dynamic:
            return None
        active = self.plan.active_names(global_step, self.plugin_manager)
        change = ActivationChange(global_step)
        state = getattr(optimizer, "state", None) if optimizer is not None else None
        for raw_name, param in model.named_parameters():
            name = plan_name(self.plan, raw_name)
            decision = self.plan.decisions.get(name)
            if decision is None or not decision.trainable:
                continue
            wanted = name in active
            if param.requires_grad != wanted:
                param.requires_grad_(wanted)
                (change.activated if wanted else change.deactivated).append(name)
            if not wanted:
                # Normally None already (the Trainer's zero_grad sets None); a left-over
                # gradient would make the optimizer step a parameter that must not train.
                param.grad = None
                if state is not None and name in self._droppable and param in state:
                    change.dropped_state_bytes += state_bytes(state.pop(param))
        if change.activated or change.deactivated or change.dropped_state_bytes:
            dropped = change.dropped_state_bytes
            logger.info(
                f"step {global_step}: {len(active)} parameter tensors train; {_blocks(self.plan, change.activated)} "
                f"start, {_blocks(self.plan, change.deactivated)} stop"
                + (f"; dropped {dropped} bytes of optimizer state" if dropped else "")
            )
        return change


def _blocks(plan: StrategyPlan, names: list[str]) -> str:
    blocks = list(dict.fromkeys(plan[n].block for n in names))
    return ", ".join(blocks) if blocks else "nothing"
