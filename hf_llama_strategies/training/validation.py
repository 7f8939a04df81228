"""One validation pass, before anything is written, over the values a run cannot survive.

``TrainingArguments`` accepts ``learning_rate=nan``, a batch size of 0 and
``gradient_accumulation_steps=0``: the run then fails with a torch traceback after
``output_dir`` was created, or (``inf``) saves an all-NaN model and exits 0. The checks here
refuse such values with an :class:`~hf_llama_strategies.errors.InvalidArgumentError` naming
the option, the value and what would be valid.

Two levels: :func:`check_trainer_arguments` refuses only what no run survives (what
``StrategyTrainer`` checks, so that a plain ``Trainer`` workload keeps working unchanged);
:func:`check_run_arguments` adds what trains silently wrong (``learning_rate: 0``, no epoch,
``max_steps: 0``), for the CLI.
"""

from __future__ import annotations

import math
import os
from typing import Any

from ..core.options import INT_MAX, check_positive_int, is_number, is_whole
from ..errors import InvalidArgumentError

_SEED_MAX = 2**32 - 1


def _finite(option: str, value: Any, expected: str) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise InvalidArgumentError(option, value, expected)
    return float(value)


def _strategy_value(args: Any, name: str) -> Any:
    value = getattr(args, name)
    return getattr(value, "value", value)


def check_trainer_arguments(args: Any) -> None:
    """Refuse ``TrainingArguments`` values that no run survives (crash, or NaN weights saved).

    Raises:
        InvalidArgumentError: naming the option, the value and what would be valid.
    """
    lr = _finite("learning_rate", args.learning_rate, "a finite number > 0, e.g. 2e-5")
    if lr < 0:
        raise InvalidArgumentError("learning_rate", args.learning_rate, "a finite number > 0, e.g. 2e-5")
    for option in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        check_positive_int(option, getattr(args, option), maximum=INT_MAX)
    _finite("num_train_epochs", args.num_train_epochs, "a finite number of epochs > 0 (or max_steps > 0)")
    if not is_whole(args.max_steps) or abs(args.max_steps) > INT_MAX:
        raise InvalidArgumentError("max_steps", args.max_steps, "a whole number: -1 (use num_train_epochs) or >= 1")
    wd = _finite("weight_decay", args.weight_decay, "a finite number >= 0")
    if wd < 0:
        raise InvalidArgumentError("weight_decay", args.weight_decay, "a finite number >= 0")
    if args.max_grad_norm is not None:
        _finite("max_grad_norm", args.max_grad_norm, "a finite number (0 or less: no clipping)")
    for option in ("adam_beta1", "adam_beta2"):
        value = _finite(option, getattr(args, option), "a number in [0, 1)")
        if not 0.0 <= value < 1.0:
            raise InvalidArgumentError(option, getattr(args, option), "a number in [0, 1)")
    if _finite("adam_epsilon", args.adam_epsilon, "a finite number > 0, e.g. 1e-8") <= 0:
        raise InvalidArgumentError("adam_epsilon", args.adam_epsilon, "a finite number > 0, e.g. 1e-8")
    if not is_whole(args.seed) or not 0 <= args.seed <= _SEED_MAX:
        raise InvalidArgumentError("seed", args.seed, f"a whole number in [0, {_SEED_MAX}]")
    # Each worker is a process: a huge count forks until the machine runs out of them.
    workers_max = max(32, 4 * (os.cpu_count() or 1))
    workers = args.dataloader_num_workers
    if not is_whole(workers) or not 0 <= workers <= workers_max:
        raise InvalidArgumentError("dataloader_num_workers", workers, f"a whole number in [0, {workers_max}]")
    for strategy, steps in (("save_strategy", "save_steps"), ("eval_strategy", "eval_steps")):
        value = getattr(args, steps)
        if _strategy_value(args, strategy) == "steps" and value is not None and (not is_number(value) or value <= 0):
            raise InvalidArgumentError(steps, value, f"a number > 0 with {strategy}: steps")
    for option in ("logging_steps", "save_steps", "eval_steps", "warmup_steps"):
        value = getattr(args, option, None)
        if is_number(value) and abs(value) > INT_MAX:
            raise InvalidArgumentError(option, value, f"a number of steps up to {INT_MAX}")
    out = args.output_dir
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise InvalidArgumentError("output_dir", out, "a directory (or a path to create one)", "It is a file.")


def check_run_arguments(args: Any) -> None:
    """:func:`check_trainer_arguments`, plus what would train silently wrong (the CLI's check).

    Raises:
        InvalidArgumentError: ``learning_rate: 0``, ``max_steps: 0`` or below -1, no epoch to
            train, an ``output_dir`` that cannot be created.
    """
    check_trainer_arguments(args)
    if args.learning_rate == 0:
        raise InvalidArgumentError("learning_rate", args.learning_rate, "a finite number > 0, e.g. 2e-5",
                                   "With 0 nothing would train.")
    if args.max_steps == 0 or args.max_steps < -1:
        raise InvalidArgumentError("max_steps", args.max_steps, "-1 (train num_train_epochs) or a number of steps >= 1")
    if args.max_steps == -1 and args.num_train_epochs <= 0:
        raise InvalidArgumentError("num_train_epochs", args.num_train_epochs, "a number > 0 (or max_steps >= 1)",
                                   "Nothing would train.")
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    reporters = args.report_to if isinstance(args.report_to, (list, tuple)) else [args.report_to]
    valid = sorted(INTEGRATION_TO_CALLBACK) + ["all", "none"]
    unknown = [r for r in reporters if r is not None and r not in valid]
    if unknown:
        raise InvalidArgumentError("report_to", unknown[0], f"one of {valid}")
    _check_reporters_installed([r for r in reporters if r not in (None, "all", "none")])
    out = args.output_dir
    if not isinstance(out, str) or not out.strip():
        raise InvalidArgumentError("output_dir", out, "a directory path")
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InvalidArgumentError("output_dir", out, "a directory (or a path to create one)",
                                   f"{parent} is a file.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidArgumentError("output_dir", out, "a writable directory", f"{parent} is not writable.")


#: The package to install for a reporter, where its name is not the reporter's.
_REPORTER_PACKAGES = {"azure_ml": "azureml-core", "flyte": "flytekit", "kubeflow": "kubeflow-training"}


def _check_reporters_installed(reporters: list[str]) -> None:
    """``report_to: wandb`` without wandb fails inside ``Trainer.__init__``: say it first, naming the package."""
    import importlib.util

    from transformers.integrations import get_available_reporting_integrations

    available = set(get_available_reporting_integrations())
    if importlib.util.find_spec("flytekit") is not None:
        available.add("flyte")  # transformers' list leaves it out
    for reporter in reporters:
        if reporter not in available:
            package = _REPORTER_PACKAGES.get(reporter, reporter.replace("_", "-"))
            usable = ", ".join(sorted(available)) or "none of them here"
            raise InvalidArgumentError(
                "report_to", reporter, f"a reporter whose package is installed ({usable}), or none",
                f"Install it (pip install {package}) or remove it from report_to.",
            )
