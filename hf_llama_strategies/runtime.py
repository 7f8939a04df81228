"""Dynamic plans at run time: step-boundary activation, resume checks, DDP settings.

The callback stays thin: it calls these at the right Trainer events. Which parameters
train at a step is never remembered, always recomputed from ``(plan, global_step)``
(:meth:`StrategyPlan.active_names`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from transformers.utils import logging

from .errors import InvalidArgumentError, PlanError
from .optim import plan_name, state_bytes
from .plan import PLAN_FILE_NAME, StrategyPlan

if TYPE_CHECKING:
    import pluggy
    from transformers import TrainingArguments

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


# -- resume -------------------------------------------------------------------------------


def check_resumed_plan(plan: StrategyPlan, checkpoint: str, allow_change: bool) -> None:
    """Compare ``plan`` with the ``strategy_plan.json`` saved in ``checkpoint``.

    Raises:
        PlanError: the plans differ and ``allow_change`` is false; the message lists the
            differences (checkpoint -> now) and how to resume anyway.
    """
    path = os.path.join(checkpoint, PLAN_FILE_NAME)
    if not os.path.isdir(checkpoint):
        logger.warning(
            f"The run resumes, but {checkpoint} does not exist: the plan it was trained with cannot be checked "
            "(StrategyCallback does not see resume_from_checkpoint; StrategyTrainer checks the checkpoint passed)."
        )
        return
    if not os.path.isfile(path):
        logger.warning(
            f"Resuming from {checkpoint}, which holds no {PLAN_FILE_NAME} (saved without hf-llama-strategies?): "
            "the plan it was trained with cannot be checked."
        )
        return
    saved = StrategyPlan.load(path)
    lines = saved.differences(plan)
    if not lines:
        return
    shown = [f"  - {line}" for line in lines[:_MAX_DIFF_LINES]]
    if len(lines) > _MAX_DIFF_LINES:
        shown.append(f"  ... and {len(lines) - _MAX_DIFF_LINES} more")
    message = (
        f"The strategy plan differs from the one {checkpoint} was trained with (checkpoint -> now):\n"
        + "\n".join(shown)
    )
    if allow_change:
        logger.warning(message + "\nallow_plan_change_on_resume is set: resuming with the new plan.")
        return
    raise PlanError(
        message + "\nA resumed run must train by the same plan to continue the interrupted one (optimizer groups, "
        "schedules, learning rates). Restore the options the checkpoint was trained with, or set "
        "allow_plan_change_on_resume: true to resume with the new plan anyway."
    )


# -- DDP ----------------------------------------------------------------------------------


def check_ddp_arguments(
    plan: StrategyPlan, training_args: Optional["TrainingArguments"], model: Optional[nn.Module], can_set: bool
) -> None:
    """Make sure DDP expects the parameters a schedule leaves without a gradient.

    Every parameter that may train requires grad when DDP wraps the model, so the reducer
    all-reduces it once it is activated; at a step where it is inactive it gets no
    gradient, which DDP accepts only with ``find_unused_parameters=True`` (all ranks agree
    that it is unused, so its gradient stays ``None`` everywhere).

    Args:
        can_set: ``ddp_find_unused_parameters`` may still be changed (before the Trainer
            builds its accelerator); then an unset value becomes ``True``.

    Raises:
        InvalidArgumentError: the user set ``ddp_find_unused_parameters=False``, or it is
            unset, cannot be set any more and the Trainer's default would be ``False``.
    """
    if training_args is None or not plan.is_dynamic:
        return
    value = training_args.ddp_find_unused_parameters
    why = (
        "A dynamic schedule (gradual unfreezing, LISA) leaves the parameters it has not activated without a gradient "
        "at a step, and DDP must expect that."
    )
    if value is False:
        raise InvalidArgumentError(
            "ddp_find_unused_parameters", value, "true or unset (null) with a dynamic freezing schedule", why
        )
    if value is not None:
        return
    if can_set:
        training_args.ddp_find_unused_parameters = True
        logger.info("Dynamic freezing schedule: ddp_find_unused_parameters set to True.")
        return
    checkpointing = bool(getattr(training_args, "activation_checkpointing", False)) or bool(
        getattr(model, "is_activation_checkpointing", False)
    )
    if checkpointing and training_args.world_size > 1:
        # The Trainer defaults to False under activation checkpointing, and the accelerator
        # already exists: a callback cannot change it any more.
        raise InvalidArgumentError(
            "ddp_find_unused_parameters",
            value,
            "true with a dynamic freezing schedule under activation checkpointing",
            why + " Set it explicitly (StrategyTrainer sets it for you).",
        )
