"""One validation pass, before anything is written, over the values a run cannot survive.

``TrainingArguments`` accepts ``learning_rate=nan``, a batch size of 0 and
``gradient_accumulation_steps=0``: the run then fails with a torch traceback after
``output_dir`` was created, or (``inf``) saves an all-NaN model and exits 0. The checks here
refuse such values with an :class:`~hf_llama_strategies.errors.InvalidArgumentError` naming
the option, the value and what would be valid.

Two levels: :func:`check_trainer_arguments` refuses only what no run survives (what
``StrategyTrainer`` checks, so that a plain ``Trainer`` workload keeps working unchanged);
:func:`check_run_arguments` adds what trains silently wrong (``learning_rate: 0``, no epoch,
``max_steps: 0``), for the CLI. :func:`check_config_types` checks a YAML file's non-string values
against each field's type (``HfArgumentParser`` converts only strings).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import types
import typing
from typing import Any, Iterable, Optional, Union

from transformers.utils import logging

from .checkpoints import (
    CheckpointError,
    check_resume_checkpoint,
    checkpoint_problem,
    describe_skipped,
    latest_complete_checkpoint,
)
from .errors import InvalidArgumentError

logger = logging.get_logger(__name__)

_SEED_MAX = 2**32 - 1
# Step counts and batch sizes end up in torch/numpy int64 and itertools.islice (sys.maxsize):
# a larger YAML integer crashes deep in the loop or never finishes.
_INT_MAX = 2**63 - 1


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(option: str, value: Any, expected: str) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise InvalidArgumentError(option, value, expected)
    return float(value)


def check_positive_int(
    option: str,
    value: Any,
    what: Optional[str] = None,
    maximum: Optional[int] = None,
    *,
    expected: str = "a positive integer",
    from_text: bool = False,
) -> int:
    """``value`` as an ``int`` of at least 1 (and at most ``maximum``), else an error naming ``option``.

    The one positive-integer check of the library (batch sizes, step counts, schedule sizes,
    ``--world_size``). ``True`` is refused although Python counts it as 1: a YAML ``yes``
    is no count.

    Args:
        option: the option's name, as the user wrote it (``"--world_size"``, ``"lisa_layers"``).
        value: the value to check; the error shows it as given.
        what: what the number counts, added to the message in parentheses
            (``"optimizer steps between two stages"``).
        maximum: the largest value accepted, named in the message; default: no bound.
        expected: the message's words for a valid value, where the caller's users know
            other ones (LLaMA-Factory's "a whole number of at least 1").
        from_text: also accept a command-line string of ASCII digits (``"8"``, spaces around
            it allowed) and return its number.

    Returns:
        The number.

    Raises:
        InvalidArgumentError: ``value`` is not such a number (a bool, a float, a string
            unless ``from_text``, 0 or less, above ``maximum``).
    """
    number = value
    if from_text and isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value)
    if not _is_whole(number) or number < 1 or (maximum is not None and number > maximum):
        bound = f" up to {maximum}" if maximum is not None else ""
        counted = f" ({what})" if what else ""
        raise InvalidArgumentError(option, value, f"{expected}{bound}{counted}")
    return number


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
        check_positive_int(option, getattr(args, option), maximum=_INT_MAX)
    _finite("num_train_epochs", args.num_train_epochs, "a finite number of epochs > 0 (or max_steps > 0)")
    if not _is_whole(args.max_steps) or abs(args.max_steps) > _INT_MAX:
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
    if not _is_whole(args.seed) or not 0 <= args.seed <= _SEED_MAX:
        raise InvalidArgumentError("seed", args.seed, f"a whole number in [0, {_SEED_MAX}]")
    # Each worker is a process: a huge count forks until the machine runs out of them.
    workers_max = max(32, 4 * (os.cpu_count() or 1))
    workers = args.dataloader_num_workers
    if not _is_whole(workers) or not 0 <= workers <= workers_max:
        raise InvalidArgumentError("dataloader_num_workers", workers, f"a whole number in [0, {workers_max}]")
    for strategy, steps in (("save_strategy", "save_steps"), ("eval_strategy", "eval_steps")):
        value = getattr(args, steps)
        if _strategy_value(args, strategy) == "steps" and value is not None and (not _is_number(value) or value <= 0):
            raise InvalidArgumentError(steps, value, f"a number > 0 with {strategy}: steps")
    for option in ("logging_steps", "save_steps", "eval_steps", "warmup_steps"):
        value = getattr(args, option, None)
        if _is_number(value) and abs(value) > _INT_MAX:
            raise InvalidArgumentError(option, value, f"a number of steps up to {_INT_MAX}")
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


def check_data_arguments(data_args: Any) -> None:
    """Refuse data options that cannot work (the CLI's ``DataArguments``)."""
    check_positive_int("max_seq_length", data_args.max_seq_length, maximum=_INT_MAX)
    for option in ("max_train_samples", "max_eval_samples"):
        value = getattr(data_args, option)
        if value is not None:
            check_positive_int(option, value, maximum=_INT_MAX)
    split = data_args.validation_split
    if not _is_number(split) or not 0.0 <= split < 1.0:
        raise InvalidArgumentError("validation_split", split, "a fraction in [0, 1)")
    for option in ("text_column", "label_column"):
        value = getattr(data_args, option)
        if not isinstance(value, str) or not value.strip():
            raise InvalidArgumentError(option, value, "a column name")
    for option in ("train_file", "validation_file"):
        value = getattr(data_args, option)
        if value is not None and not isinstance(value, str):
            raise InvalidArgumentError(option, value, "a path to a .txt, .json, .jsonl or .csv file")


# -- YAML types -----------------------------------------------------------------------------


def _is_union(hint: Any) -> bool:
    """``Optional[X]``, ``Union[X, Y]`` or ``X | Y``."""
    return typing.get_origin(hint) is Union or (hasattr(types, "UnionType") and isinstance(hint, types.UnionType))


def _allowed(hint: Any, value: Any) -> bool:
    """Whether a non-string YAML ``value`` fits the annotation ``hint`` (strings go through argparse)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if _is_union(hint):
        return any(_allowed(arg, value) for arg in typing.get_args(hint))
    if value is None:
        return hint is type(None)
    if origin in (list, tuple, Iterable) or hint in (list, tuple):
        inner = typing.get_args(hint)
        return isinstance(value, (list, tuple)) and all(
            isinstance(v, str) or not inner or _allowed(inner[0], v) for v in value
        )
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_whole(value)
    if hint is float:
        return _is_number(value)
    if hint is str:
        return False
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return isinstance(value, hint)
    return not isinstance(hint, type) or isinstance(value, hint)


def _describe(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "null")
    return text.replace("<class '", "").replace("'>", "")


def check_config_types(config: dict[str, Any], classes: Iterable[type]) -> dict[str, Any]:
    """Check and normalise a flat config's non-string values against the dataclasses' field types.

    ``HfArgumentParser`` takes a file's values as defaults and converts only strings: a list,
    a mapping or ``null`` given for a number reaches the run as it is. Numbers given for a
    string field become strings (as on the command line).

    Returns:
        The config with numbers for string fields turned into strings.

    Raises:
        InvalidArgumentError: naming the key, the value and the expected type.
    """
    hints: dict[str, tuple[Any, Any]] = {}
    for cls in classes:
        try:
            resolved = typing.get_type_hints(cls)
        except Exception:  # an annotation this Python cannot evaluate: leave it to the parser
            resolved = {}
        # StrategyArguments checks its text options itself (`trainable_layers: 2` is refused with
        # LLaMA-Factory's meaning explained, not read as layer 2).
        own_checks = cls.__name__ == "StrategyArguments"
        for f in dataclasses.fields(cls):
            if f.init and f.name in resolved and not (own_checks and _accepts_str(resolved[f.name])):
                hints[f.name] = (resolved[f.name], f.default)
    out = dict(config)
    for key, value in config.items():
        if isinstance(value, str) or key not in hints:
            continue
        hint, default = hints[key]
        if _allowed(hint, value):
            continue
        if value is None and default is None:
            continue
        if isinstance(value, bool) and _accepts_str(hint) and key not in _FLAG_TEXT_OPTIONS:
            # `tokenizer_name_or_path: true` would become the Hub repository "true".
            raise InvalidArgumentError(key, value, f"a value of type {_describe(hint)}")
        if isinstance(value, (int, float)) and _accepts_str(hint):
            # As the command line would give it (`resume_from_checkpoint: true`, `trainable_layers: 2`).
            out[key] = str(value).lower() if isinstance(value, bool) else str(value)
            continue
        if key in _STRUCTURED_TEXT_OPTIONS and value is not None:
            # These normalise YAML lists and mappings themselves (sft_datasets from LLaMA-Factory)
            # and refuse what they cannot use.
            continue
        raise InvalidArgumentError(key, value, f"a value of type {_describe(hint)}")
    return out


# Text options outside StrategyArguments that take a YAML list or mapping as well (sft.py).
_STRUCTURED_TEXT_OPTIONS = frozenset({"sft_datasets", "sft_eval_datasets"})
# Text options whose value may be a YAML boolean (`resume_from_checkpoint: true`).
_FLAG_TEXT_OPTIONS = frozenset({"resume_from_checkpoint"})


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    if _is_union(hint):
        return any(_accepts_str(a) for a in typing.get_args(hint))
    return False


# -- resume -----------------------------------------------------------------------------------


def resolve_resume_checkpoint(value: Any, args: Any, strict: bool = False) -> Any:
    """The checkpoint a run resumes from: ``True`` means the newest *complete* one in ``output_dir``.

    Incomplete checkpoints (a save interrupted by a kill) are skipped and named in a warning.
    An explicit path is checked (``strict``: also for missing optimizer or scheduler state).
    Returns ``value`` unchanged when nothing applies (``None``, ``False``, or no complete
    checkpoint: the Trainer then raises its own error).

    Raises:
        CheckpointError: an explicit checkpoint is incomplete or damaged.
    """
    require_optimizer = strict and not getattr(args, "save_only_model", False)
    if value is True:
        folder = args.output_dir
        found, skipped = latest_complete_checkpoint(folder, require_optimizer) if folder else (None, [])
        if skipped:
            logger.warning(
                f"resume_from_checkpoint: true skips incomplete checkpoints in {folder}: {describe_skipped(skipped)}."
                + (f" Resuming from {found}." if found else "")
            )
        if found is None and skipped:
            raise CheckpointError(
                f"resume_from_checkpoint=True: no complete checkpoint in {folder}; incomplete: "
                f"{describe_skipped(skipped)}."
            )
        return found if found is not None else value
    if isinstance(value, (str, os.PathLike)):
        path = os.fspath(value)
        if not os.path.isdir(path):
            # The Trainer's ValueError ("Can't find a valid checkpoint") came after the callbacks
            # ran on_init; still a ValueError, now naming the option.
            raise CheckpointError(
                f"resume_from_checkpoint={path!r} cannot be resumed from: "
                f"{'it is a file' if os.path.exists(path) else 'no such directory'}. Give a checkpoint directory, "
                "or resume_from_checkpoint=True for the newest complete one in output_dir."
            )
        if os.path.isdir(path):
            check_resume_checkpoint(path, require_optimizer=require_optimizer)
            if not require_optimizer and checkpoint_problem(path) is not None:
                logger.warning(f"Resuming from {path}, which cannot resume exactly: {checkpoint_problem(path)}.")
        return path
    return value


__all__ = [
    "CheckpointError",
    "check_config_types",
    "check_data_arguments",
    "check_positive_int",
    "check_run_arguments",
    "check_trainer_arguments",
    "resolve_resume_checkpoint",
]
