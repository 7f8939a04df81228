"""Dynamic plans at run time: step-boundary activation, resume checks, DDP, FSDP and DeepSpeed settings.

The callback stays thin: it calls these at the right Trainer events. Which parameters
train at a step is never remembered, always recomputed from ``(plan, global_step)``
(:meth:`StrategyPlan.active_names`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from transformers.utils import logging

from .errors import InvalidArgumentError, PlanError
from .optim import deepspeed_config, plan_name, state_bytes
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


# -- FSDP ---------------------------------------------------------------------------------

_TRUE = frozenset({"1", "true", "yes", "y", "on"})


def _fsdp1_orig_params(
    training_args: Optional["TrainingArguments"], fsdp_plugin: Any = None
) -> Optional[tuple[Optional[bool], str]]:
    """``(use_orig_params, where it is set)`` when FSDP1 is configured, else ``None``.

    ``use_orig_params`` is ``None`` when nothing sets it (accelerate's plugin then defaults
    to ``False``). Read from the accelerator's plugin when there is one, else from
    ``TrainingArguments.fsdp_config`` (transformers defaults it to ``True``), else from the
    environment ``accelerate launch --use_fsdp`` sets.
    """
    if fsdp_plugin is not None:
        if int(getattr(fsdp_plugin, "fsdp_version", 1) or 1) != 1:
            return None
        return bool(fsdp_plugin.use_orig_params), "use_orig_params of accelerate's FSDP plugin"
    plugin_args = getattr(training_args, "fsdp_plugin_args", None) if training_args is not None else None
    if plugin_args:
        if int(plugin_args.get("fsdp_version", 1)) != 1:
            return None
        return bool(plugin_args.get("use_orig_params", True)), "fsdp_config.use_orig_params"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in _TRUE:
        if int(os.environ.get("FSDP_VERSION", "1") or 1) != 1:
            return None
        raw = os.environ.get("FSDP_USE_ORIG_PARAMS")
        value = None if raw is None else raw.strip().lower() in _TRUE
        return value, "FSDP_USE_ORIG_PARAMS (accelerate launch --fsdp_use_orig_params)"
    return None


def check_fsdp_arguments(
    plan: StrategyPlan,
    training_args: Optional["TrainingArguments"],
    can_set: bool,
    fsdp_plugin: Any = None,
) -> None:
    """Make sure FSDP1 keeps the original parameters when the plan freezes some of them.

    FSDP1 flattens the parameters of each wrapped module into one ``FlatParameter`` with a
    single ``requires_grad``: without ``use_orig_params`` it cannot hold frozen and trainable
    parameters together (it fails when it wraps the model, after loading), nor toggle
    ``requires_grad`` for a schedule. FSDP2 always keeps the original parameters: nothing
    to check.

    Args:
        can_set: the setting may still change (before the Trainer builds its accelerator):
            an unset ``FSDP_USE_ORIG_PARAMS`` (accelerate's default: false) becomes ``true``.
        fsdp_plugin: the accelerator's FSDP plugin, once it exists.

    Raises:
        InvalidArgumentError: ``use_orig_params`` is false (or unset where it cannot be set
            any more) and the plan mixes frozen and trainable parameters or is dynamic.
    """
    found = _fsdp1_orig_params(training_args, fsdp_plugin)
    if found is None:
        return
    value, where = found
    frozen = sum(1 for d in plan if not d.trainable)
    mixed = (frozen and frozen < len(plan.decisions)) or plan.is_dynamic
    if value or not mixed:
        return
    if value is None and can_set:
        os.environ["FSDP_USE_ORIG_PARAMS"] = "true"
        logger.info("FSDP1 with a plan that freezes some parameters: FSDP_USE_ORIG_PARAMS set to true.")
        return
    trained = len(plan.decisions) - frozen
    raise InvalidArgumentError(
        where,
        value if value is not None else "unset (false)",
        "true with FSDP1 when the plan freezes some parameters or follows a schedule",
        f"FSDP1 flattens each wrapped module's parameters into one FlatParameter with a single requires_grad, so "
        f"without use_orig_params it cannot hold frozen and trainable parameters together ({trained} of "
        f"{len(plan.decisions)} parameter tensors train here). Set use_orig_params: true, or use FSDP2 "
        "(fsdp_config version 2, the default in transformers 5; accelerate launch --fsdp_version 2), which keeps "
        "the original parameters.",
    )


# -- DeepSpeed ----------------------------------------------------------------------------


def check_deepspeed_arguments(plan: StrategyPlan, training_args: Optional["TrainingArguments"]) -> None:
    """Refuse a dynamic plan (gradual unfreezing, LISA) under DeepSpeed.

    DeepSpeed's ZeRO optimizers flatten every parameter that requires grad when they are
    built into their own buffers: a parameter that gets no gradient at a step is still
    stepped there (with a zero gradient: its moments and weight decay move it), and its
    optimizer state cannot be dropped. Measured on CPU with ZeRO-2 and LISA: layers that
    were inactive moved. DDP and FSDP2 train such plans exactly.

    Raises:
        PlanError: naming the DeepSpeed config and the alternatives.
    """
    if not plan.is_dynamic:
        return
    config, where = deepspeed_config(training_args)
    if config is None:
        return
    schedules = ", ".join(sorted(plan.schedules)) or "active_from steps (gradual unfreezing)"
    raise PlanError(
        f"This plan trains its layers on a schedule ({schedules}), which DeepSpeed cannot follow ({where}): its ZeRO "
        "optimizers step every parameter that was trainable when they were built, also at steps where the schedule "
        "leaves it without a gradient (its moments and weight decay still move it). Train dynamic schedules with "
        "DDP or FSDP2 (fsdp_config version 2), or use a static plan with DeepSpeed."
    )
