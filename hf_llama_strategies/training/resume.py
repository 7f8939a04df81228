"""Resuming a run, in one place: which checkpoint, whether its plan is this run's, and a changed plan.

* :func:`resolve_resume`: ``resume_from_checkpoint`` (``true``, a path, text from a config) as the
  checkpoint to resume from: the newest *complete* one for ``true`` (a partial one left by a kill
  is skipped and named), an explicit one checked, or "nothing to resume: train from the start"
  where the CLI allows it. ``StrategyTrainer.train`` and the CLI both ask it.
* :func:`check_resumed_plan`: the plan saved in the checkpoint against this run's.
* ``allow_plan_change_on_resume``: the new plan's groups and rates take effect
  (:func:`plan_change`, :func:`load_with_changed_plan`). ``optimizer.load_state_dict`` restores
  every group's hyperparameters (``lr``, ``weight_decay``, ``initial_lr``) from the checkpoint,
  and the scheduler restores its ``base_lrs``: left alone, a changed ``head_lr`` is announced and
  then silently not used. And when the trainable set or the groups changed, the saved state does
  not fit the new groups at all (torch raises mid-load). So, once the checkpoint is known to differ:
  same groups and parameters, other rates or weight decay: the optimizer state (moments) is
  loaded, then every group gets the new plan's rate, at the point of the schedule reached; other
  trainable parameters or groups: the optimizer state is reset (a message says so) and the
  schedule continues from the checkpoint's step at the new plan's rates.
* After a kill: incomplete checkpoints are set aside (never deleted), and a checkpoint that
  already holds the end of the run is recognised.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
from transformers.utils import logging

from ..core.plan import PLAN_FILE_NAME, StrategyPlan
from ..errors import CheckpointError, InvalidArgumentError, PlanError
from .checkpoints import (
    CHECKPOINT_RE,
    INCOMPLETE_PREFIX,
    STAGING_PREFIX,
    TRAINER_STATE,
    checkpoint_problem,
    latest_complete_checkpoint,
    list_checkpoints,
)
from .run_lock import LOCK_FILE_NAME

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)


# Lines of a plan difference shown in an error; the rest is counted.
_MAX_DIFF_LINES = 25
# How a config file or the command line spells resume_from_checkpoint (the library takes True or a path).
_CONFIG_YES = ("true", "yes", "1")
_CONFIG_NO = ("false", "no", "0", "")
_CONFIG_EXPECTED = "a checkpoint directory, or true for the last checkpoint in output_dir"


@dataclass(frozen=True)
class ResumePoint:
    """Where a run resumes from, as :func:`resolve_resume` decided.

    Attributes:
        checkpoint: the checkpoint to resume from; ``None``: no resume (see ``restart``).
        restart: resuming was asked, but ``output_dir`` holds nothing a fresh run would lose (a run
            killed before its first complete checkpoint, or nothing at all): train from the start.
        note: what the user should hear of the decision (the CLI prints it, the library logs it).
    """

    checkpoint: Optional[str] = None
    restart: bool = False
    note: Optional[str] = None


def resolve_resume(value: Any, output_dir: Optional[str], *, require_optimizer: bool = True,
                   from_config: bool = False) -> ResumePoint:
    """The checkpoint ``resume_from_checkpoint`` points at: ``True`` is the newest *complete* one in ``output_dir``.

    An incomplete checkpoint (a save interrupted by a kill) is skipped and named; an explicit one
    must be complete. Asked by ``StrategyTrainer.train`` (``True`` or a path, as ``Trainer.train``
    takes) and by the CLI (``from_config``: also the words of a config file, ``true``/``yes``/``1``
    and ``false``/``no``/``0``, and "train from the start" when ``output_dir`` holds nothing to lose).

    Args:
        value: the option as given.
        output_dir: where ``True`` looks.
        require_optimizer: a checkpoint without optimizer and scheduler state is incomplete (it
            cannot resume exactly); ``False``: accepted with a warning.
        from_config: the CLI's reading (see above); its errors name the option as the config does.

    Raises:
        CheckpointError: an explicit checkpoint that is missing, a file, incomplete or damaged;
            ``True`` where every checkpoint is incomplete (the CLI: where none is complete and an
            earlier run would be lost) — an ``InvalidArgumentError`` for the CLI.
    """
    text = value.strip().lower() if from_config and isinstance(value, str) else None
    if value is None or value is False or text in _CONFIG_NO:
        return ResumePoint()
    if value is True or text in _CONFIG_YES:
        return _newest_complete(output_dir, require_optimizer, from_config)
    return ResumePoint(_checked(os.fspath(value), require_optimizer, from_config))


def _newest_complete(output_dir: Optional[str], require_optimizer: bool, from_config: bool) -> ResumePoint:
    found, skipped = latest_complete_checkpoint(output_dir, require_optimizer) if output_dir else (None, [])
    if found is not None:
        note = f"skipped incomplete {describe_skipped(skipped)}; resuming from {found}" if skipped else None
        if note:
            logger.warning(f"resume_from_checkpoint: {note}.")
        return ResumePoint(found, note=note)
    if from_config and output_dir:
        restart = _restart_note(output_dir)
        if restart:
            return ResumePoint(restart=True, note=restart)
        why = f" Incomplete: {describe_skipped(skipped)}." if skipped else ""
        raise InvalidArgumentError(
            "resume_from_checkpoint", True, _CONFIG_EXPECTED, f"No complete checkpoint-* folder in {output_dir!r}.{why}"
        )
    if skipped:
        raise CheckpointError(
            f"resume_from_checkpoint=True: no complete checkpoint in {output_dir}; incomplete: "
            f"{describe_skipped(skipped)}."
        )
    return ResumePoint()  # the Trainer says it in its own words


def _checked(path: str, require_optimizer: bool, from_config: bool) -> str:
    if not os.path.isdir(path):
        if from_config:
            raise InvalidArgumentError("resume_from_checkpoint", path, _CONFIG_EXPECTED, "No such directory.")
        # The Trainer's ValueError ("Can't find a valid checkpoint") came after the callbacks ran on_init.
        raise CheckpointError(
            f"resume_from_checkpoint={path!r} cannot be resumed from: "
            f"{'it is a file' if os.path.exists(path) else 'no such directory'}. Give a checkpoint directory, "
            "or resume_from_checkpoint=True for the newest complete one in output_dir."
        )
    problem = checkpoint_problem(path, require_optimizer)
    if problem is not None:
        raise CheckpointError(
            f"resume_from_checkpoint={path!r} cannot be resumed from: {problem}. Give a complete checkpoint, or "
            "resume_from_checkpoint: true for the newest complete one in output_dir."
        )
    if not require_optimizer and checkpoint_problem(path) is not None:
        logger.warning(f"Resuming from {path}, which cannot resume exactly: {checkpoint_problem(path)}.")
    return path


def _restart_note(output_dir: str) -> Optional[str]:
    """Why a CLI run asked to resume trains from the start, or ``None`` when an earlier run would be lost.

    Nothing to lose: ``output_dir`` is missing or empty (killed while loading), or it holds only what
    a run writes before its first complete checkpoint (its plan, logs, staged or incomplete checkpoints).
    """
    # This run's own lock (the CLI checks again once it holds it) is no earlier run.
    names = [n for n in os.listdir(output_dir) if n != LOCK_FILE_NAME] if os.path.isdir(output_dir) else None
    if not os.path.exists(output_dir) or names == []:
        return f"{output_dir} holds no earlier run yet; training from the start."
    names = names or []
    if PLAN_FILE_NAME not in names:
        return None
    for name in names:
        if name in (PLAN_FILE_NAME, "runs") or name.startswith((STAGING_PREFIX, INCOMPLETE_PREFIX)):
            continue
        if CHECKPOINT_RE.match(name) and checkpoint_problem(os.path.join(output_dir, name)) is not None:
            continue
        return None
    return f"{output_dir} holds a run interrupted before its first complete checkpoint; training from the start."


def nothing_to_lose(output_dir: str) -> bool:
    """``output_dir`` is missing, empty, or holds only what a run writes before its first complete checkpoint."""
    return _restart_note(output_dir) is not None


def describe_skipped(skipped: list[tuple[str, str]]) -> str:
    """``checkpoint-8 (no trainer_state.json ...)`` for a message."""
    return "; ".join(f"{os.path.basename(p)} ({why})" for p, why in skipped)


def check_resumed_plan(
    plan: StrategyPlan, checkpoint: str, allow_change: bool, training_args: Optional["TrainingArguments"] = None
) -> Optional["PlanChange"]:
    """Compare ``plan`` with the ``strategy_plan.json`` saved in ``checkpoint``.

    Compares every per-parameter decision, the schedules, and the settings that change the
    result (precision mode, base learning rate, seed).

    Returns:
        ``None`` when the plans train alike (or the checkpoint holds no plan), else the
        :class:`~hf_llama_strategies.training.resume.PlanChange` the resumed run must follow
        (``allow_change`` only).

    Raises:
        PlanError: the plans differ and ``allow_change`` is false; the message lists the
            differences (checkpoint -> now) and how to resume anyway. Also a change that
            ``allow_change`` cannot follow (see :func:`~hf_llama_strategies.training.resume.plan_change`).
    """
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


def set_aside_incomplete_once(folder: str, trainer: Any) -> list[str]:
    """:func:`set_aside_incomplete` by the main process only; every other process waits for it at a barrier.

    Under DDP/FSDP/DeepSpeed every process runs the resume: two renaming one folder at once
    fail (the second finds it gone). The main process is the one that saves
    (``TrainingArguments.should_save``).
    """
    moved = set_aside_incomplete(folder) if trainer.args.should_save else []
    if getattr(trainer.args, "world_size", 1) > 1:
        trainer.accelerator.wait_for_everyone()
    return moved


def set_aside_incomplete(folder: str) -> list[str]:
    """Rename every incomplete ``checkpoint-N`` of ``folder`` to ``incomplete-checkpoint-N`` (kept, never deleted).

    A partial directory a kill left behind (or one half deleted by an interrupted rotation)
    would otherwise count as a checkpoint for rotation and for ``resume_from_checkpoint``. One
    process only (see :func:`set_aside_incomplete_once`).

    Returns:
        The new paths.
    """
    moved = []
    for path in list_checkpoints(folder):
        if checkpoint_problem(path, require_optimizer=False) is None:
            continue
        target = os.path.join(folder, INCOMPLETE_PREFIX + os.path.basename(path))
        n = 1
        while os.path.exists(target):
            n += 1
            target = os.path.join(folder, f"{INCOMPLETE_PREFIX}{n}-{os.path.basename(path)}")
        os.rename(path, target)
        moved.append(target)
    if moved:
        logger.warning(f"Incomplete checkpoints set aside (not deleted): {', '.join(moved)}.")
    return moved


def checkpoint_finished(checkpoint: str, training_args: Any) -> bool:
    """Whether ``checkpoint`` already holds the end of the run ``training_args`` describe.

    transformers 5 resumed at the last step trains one step more than the uninterrupted run
    (it skips the trained batches and steps once before it checks ``max_steps``).
    """
    with open(os.path.join(checkpoint, TRAINER_STATE), encoding="utf-8") as fh:
        state = json.load(fh)
    step = int(state.get("global_step", 0))
    if training_args.max_steps > 0:
        return step >= training_args.max_steps
    return (
        step >= int(state.get("max_steps") or 0) > 0
        and state.get("num_train_epochs") == training_args.num_train_epochs
    )


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
