"""Resuming with ``allow_plan_change_on_resume``: the new plan's groups and rates take effect.

``optimizer.load_state_dict`` restores every group's hyperparameters (``lr``, ``weight_decay``,
``initial_lr``) from the checkpoint, and the scheduler restores its ``base_lrs``: left alone, a
changed ``head_lr`` is announced and then silently not used. And when the trainable set or
the groups changed, the saved state does not fit the new groups at all (torch raises mid-load).
So, once the checkpoint is known to differ:

* same groups and parameters, other rates or weight decay: the optimizer state (moments) is
  loaded, then every group gets the new plan's rate, at the point of the schedule reached;
* other trainable parameters or groups: the optimizer state is reset (a message says so)
  and the schedule continues from the checkpoint's step at the new plan's rates.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from transformers.utils import logging

from .errors import PlanError
from .plan import StrategyPlan

logger = logging.get_logger(__name__)


@dataclass
class PlanChange:
    """How the current plan differs from the one a checkpoint was trained with."""

    saved: StrategyPlan
    #: The optimizer groups (which parameters, in which group) differ: state cannot be mapped.
    reset_optimizer: bool


def _layout(plan: StrategyPlan) -> list[tuple[str, str]]:
    return [(d.name, d.group) for d in plan if d.trainable]


def plan_change(saved: StrategyPlan, current: StrategyPlan, training_args: Any = None) -> PlanChange:
    """Classify a change; refuse up front what a resumed run could not follow.

    Raises:
        PlanError: the schedule has no closed form to continue from (``reduce_lr_on_plateau``),
            or DeepSpeed owns the optimizer state.
    """
    change = PlanChange(saved, reset_optimizer=_layout(saved) != _layout(current))
    if training_args is not None:
        scheduler = str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type))
        if scheduler == "reduce_lr_on_plateau":
            raise PlanError(
                "allow_plan_change_on_resume cannot carry the new plan's learning rates into a "
                "reduce_lr_on_plateau schedule (it has no closed form to continue from). Resume with the plan the "
                "checkpoint was trained with, or use another lr_scheduler_type."
            )
        if getattr(training_args, "deepspeed", None):
            raise PlanError(
                "allow_plan_change_on_resume with DeepSpeed: DeepSpeed restores its own optimizer state and groups. "
                "Resume with the plan the checkpoint was trained with."
            )
    return change


def _schedule_factor(scheduler: Any, index: int) -> Optional[float]:
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is None or index >= len(lambdas):
        return None
    return float(lambdas[index](scheduler.last_epoch))


def load_with_changed_plan(
    trainer: Any, checkpoint: str, change: PlanChange, load: Callable[[str], None]
) -> None:
    """Load ``checkpoint``'s optimizer and scheduler state as far as the new plan allows (see module doc)."""
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    groups = optimizer.param_groups
    new_rates = [g.get("initial_lr", g["lr"]) for g in groups]
    new_decay = [g.get("weight_decay") for g in groups]
    if change.reset_optimizer:
        logger.warning(
            f"Resuming from {checkpoint} with a plan whose trainable parameters or optimizer groups differ: the "
            "optimizer state (moments) is reset; the learning-rate schedule continues from the checkpoint's step."
        )
        path = os.path.join(checkpoint, "scheduler.pt")
        if scheduler is not None and os.path.isfile(path):
            saved = torch.load(path, map_location="cpu", weights_only=True)
            scheduler.last_epoch = int(saved.get("last_epoch", scheduler.last_epoch))
            if "_step_count" in saved:
                scheduler._step_count = saved["_step_count"]
    else:
        load(checkpoint)
        logger.warning(
            f"Resuming from {checkpoint} with a changed plan: optimizer state loaded, the new plan's learning rates "
            "and weight decay take effect."
        )
    if scheduler is not None:
        scheduler.base_lrs = list(new_rates)
    # optimizer.load_state_dict replaced the group dicts: read them again.
    groups = optimizer.param_groups
    for i, group in enumerate(groups):
        factor = _schedule_factor(scheduler, i) if scheduler is not None else 1.0
        if factor is None:
            old_base = group.get("initial_lr") or 0.0
            factor = group["lr"] / old_base if old_base else 1.0
        group["initial_lr"] = new_rates[i]
        group["lr"] = new_rates[i] * factor
        if new_decay[i] is not None:
            group["weight_decay"] = new_decay[i]
    if scheduler is not None:
        scheduler._last_lr = [g["lr"] for g in groups]
