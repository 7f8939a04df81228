"""``StrategyArguments``: every strategy option, as one dataclass composed of one group per strategy.

Each strategy declares its options beside its code, with their meaning (``help``) and their
checks (``__post_init__``): :class:`~.strategies.freezing.FreezingArguments`,
:class:`~.strategies.layerwise_lr.LayerwiseLrArguments`,
:class:`~.strategies.gradual_unfreezing.GradualUnfreezingArguments`,
:class:`~.strategies.lisa.LisaArguments`, :class:`~.core.precision.PrecisionArguments` (the core
service that decides precision for the hardware) and
:class:`~.strategies.frozen_prefix_cache.arguments.FrozenPrefixCacheArguments`. This module
composes them, as LLaMA-Factory composes its per-method argument mixins, adds the options of
no one strategy, and checks how the groups combine.

``transformers.HfArgumentParser`` parses it beside ``TrainingArguments`` (no field name collides
with one of ``TrainingArguments``), so one flat YAML file or one command line can hold model,
data, training and strategy keys. Building it checks only its own fields: no plugin is loaded.
Third-party plugins check their ``strategy_options`` (the ``hfls_validate_arguments`` hook) once
per run, when the run's context is built, and when the CLI parses a config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .core.options import OptionGroup, check_bool
from .core.precision import PrecisionArguments
from .errors import InvalidArgumentError
from .strategies.freezing import FreezingArguments
from .strategies.frozen_prefix_cache.arguments import FrozenPrefixCacheArguments
from .strategies.gradual_unfreezing import GradualUnfreezingArguments
from .strategies.layerwise_lr import LayerwiseLrArguments
from .strategies.lisa import LisaArguments
from .strategies.schedules import check_schedules


@dataclass
class ResumeArguments(OptionGroup):
    """What survives a fault: a checkpoint on a stop signal, one run per ``output_dir``, and a resume's plan check.

    Read by ``training/stop_signal.py``, ``training/run_lock.py`` and ``training/resume.py``.
    """

    REFINING = frozenset({"allow_plan_change_on_resume"})

    allow_plan_change_on_resume: bool = field(
        default=False,
        metadata={
            "help": (
                "Resume from a checkpoint whose strategy_plan.json differs from the current plan (by default an "
                "error that shows the difference): the resumed run then no longer equals an uninterrupted one."
            ),
        },
    )
    checkpoint_on_signal: bool = field(
        default=False,
        metadata={
            "help": (
                "On SIGTERM or SIGUSR1 (a scheduler's preemption), finish the optimizer step, save a complete "
                "checkpoint and stop: train() raises TrainingStopped, exit code 128 + the signal (143 for "
                "SIGTERM); resume with resume_from_checkpoint: true. The CLI sets it unless told otherwise."
            ),
        },
    )
    lock_output_dir: bool = field(
        default=False,
        metadata={
            "help": (
                "Hold an exclusive lock on output_dir while the trainer exists: a second run into it is refused, "
                "naming the first (process, host, start time). The CLI sets it unless told otherwise."
            ),
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for option in ("allow_plan_change_on_resume", "checkpoint_on_signal", "lock_output_dir"):
            check_bool(option, getattr(self, option))


# The groups in reverse order of their fields (a dataclass collects its bases' fields from the last base up).
@dataclass
class StrategyArguments(
    FrozenPrefixCacheArguments,
    PrecisionArguments,
    ResumeArguments,
    LisaArguments,
    GradualUnfreezingArguments,
    LayerwiseLrArguments,
    FreezingArguments,
):
    """How to fine-tune: which parameters train, when, at which rate and in which precision.

    With every field at its default nothing is asked for: ``StrategyTrainer`` is then a plain
    ``Trainer`` (see :meth:`options_set`), which is full fine-tuning.
    """

    REFINING = frozenset({"print_plan"})

    strategy_options: Optional[Union[dict, str]] = field(
        default=None,
        metadata={
            "help": (
                "Options for third-party strategy plugins: a mapping (YAML) or a JSON object (command "
                "line), keyed by plugin."
            )
        },
    )
    print_plan: bool = field(
        default=True,
        metadata={"help": "Print the plan table at the start of training (main process only)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.strategy_options = _normalise_options(self.strategy_options)
        check_bool("print_plan", self.print_plan)
        check_schedules(self.trainable_layers, self.gradual, self.unfreeze_schedule, self.lisa_layers)


def _normalise_options(value: Any) -> Optional[dict]:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError("strategy_options", value, "a JSON object", f"({exc}).") from None
        if isinstance(parsed, dict):
            return parsed
    raise InvalidArgumentError("strategy_options", value, "a mapping (YAML) or a JSON object string")
