"""Dynamic plans at run time: step-boundary activation and resume checks (DDP, FSDP, DeepSpeed: ``distributed.py``).

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

from .errors import PlanError
from .optim import plan_name, state_bytes
from .plan import PLAN_FILE_NAME, StrategyPlan

if TYPE_CHECKING:
    import pluggy

    from .resume import PlanChange
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


def check_resumed_plan(
    plan: StrategyPlan, checkpoint: str, allow_change: bool, training_args: Optional["TrainingArguments"] = None
) -> Optional["PlanChange"]:
    """Compare ``plan`` with the ``strategy_plan.json`` saved in ``checkpoint``.

    Compares every per-parameter decision, the schedules, and the settings that change the
    result (precision mode, base learning rate, seed).

    Returns:
        ``None`` when the plans train alike (or the checkpoint holds no plan), else the
        :class:`~hf_llama_strategies.resume.PlanChange` the resumed run must follow
        (``allow_change`` only).

    Raises:
        PlanError: the plans differ and ``allow_change`` is false; the message lists the
            differences (checkpoint -> now) and how to resume anyway. Also a change that
            ``allow_change`` cannot follow (see :func:`~hf_llama_strategies.resume.plan_change`).
    """
    from .resume import plan_change

    path = os.path.join(checkpoint, PLAN_FILE_NAME)
    if not os.path.isdir(checkpoint):
        logger.warning(
            f"The run resumes, but {checkpoint} does not exist: the plan it was trained with cannot be checked "
            "(StrategyCallback does not see resume_from_checkpoint; StrategyTrainer checks the checkpoint passed)."
        )
        return None
    if not os.path.isfile(path):
        logger.warning(
            f"Resuming from {checkpoint}, which holds no {PLAN_FILE_NAME} (a plain Trainer checkpoint): "
            "the plan it was trained with cannot be checked."
        )
        return None
    try:
        saved = StrategyPlan.load(path)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path} is damaged ({type(exc).__name__}: {exc}); the checkpoint cannot be resumed.") from None
    lines = saved.differences(plan)
    if not lines:
        return None
    shown = [f"  - {line}" for line in lines[:_MAX_DIFF_LINES]]
    if len(lines) > _MAX_DIFF_LINES:
        shown.append(f"  ... and {len(lines) - _MAX_DIFF_LINES} more")
    message = (
        f"The strategy plan differs from the one {checkpoint} was trained with (checkpoint -> now):\n"
        + "\n".join(shown)
    )
    if allow_change:
        change = plan_change(saved, plan, training_args)
        logger.warning(message + "\nallow_plan_change_on_resume is set: resuming with the new plan.")
        return change
    raise PlanError(
        message + "\nA resumed run must train by the same plan to continue the interrupted one (optimizer groups, "
        "schedules, learning rates, precision, seed). Restore the options the checkpoint was trained with, or set "
        "allow_plan_change_on_resume: true to resume with the new plan anyway."
    )
