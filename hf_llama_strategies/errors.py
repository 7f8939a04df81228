"""Every exception class hf-llama-strategies raises, in one place.

Each subclasses :class:`StrategyError`, itself a :class:`ValueError`, so code that already
catches ``ValueError`` around ``Trainer`` construction keeps working. Errors about the
user's input (options, files, a config) are raised before anything is written; the few
raised later (a plan that cannot resume, a damaged checkpoint met while training) name what
to change. The CLI prints any of them as one line and exits with code 2.

Two more are not the user's input and not a :class:`StrategyError`: :class:`StorageError`
(an ``OSError``: the machine failed a write, such as a full disk; the CLI exits with
:data:`EXIT_STORAGE`) and :class:`TrainingStopped` (a ``SystemExit``: a signal stopped the run
after a complete checkpoint; the exit code is 128 + the signal's number, as a shell reports it).
"""

from __future__ import annotations

import errno as _errno
import os
from typing import Any, Iterable, Optional

#: Exit code of a run stopped by the machine (disk full, quota, read-only or failing disk): sysexits' EX_IOERR.
EXIT_STORAGE = 74


class StrategyError(ValueError):
    """Base class of every error this library raises about a user's configuration or files."""


class InvalidArgumentError(StrategyError):
    """An option holds a value that cannot work: the message names the option, the value and what is valid."""

    def __init__(self, option: str, value: Any, expected: str, hint: str | None = None) -> None:
        self.option = option
        self.value = value
        self.expected = expected
        message = f"{option}={value!r} is not valid: expected {expected}."
        if hint:
            message += f" {hint}"
        super().__init__(message)


class UnknownArchitectureError(StrategyError):
    """The model's structure (embeddings, decoder layers, norm, head) could not be found."""


class PlanError(StrategyError):
    """The strategy arguments are valid on their own but cannot be applied to this model."""


class PluginError(StrategyError):
    """A plugin failed, answered a hook wrongly, or could not be loaded; the message names it and the hook."""


class CheckpointError(StrategyError):
    """A checkpoint to resume from is incomplete or damaged (found before anything is written)."""


class CliError(StrategyError):
    """A command-line or configuration-file error: printed as one message, exit code 2."""


class UnsupportedKeyError(StrategyError):
    """A LLaMA-Factory key whose meaning this library does not have: names the key, its value and why."""


class BadRecordError(StrategyError):
    """A record of an SFT data file cannot be trained on: names the file, the record and the fix."""


class DataFileError(InvalidArgumentError):
    """A data file that cannot be read as its format: the message names the file and what is wrong."""

    def __init__(self, option: str, path: str, problem: str) -> None:
        super().__init__(option, path, "a readable data file", problem)


class OutputDirBusyError(StrategyError):
    """Another live run holds ``output_dir`` (or a cache directory): the message names it (process, host, start)."""


class StorageError(OSError):
    """A write failed for a reason of the machine (disk full, quota, read-only file system, I/O error).

    An ``OSError`` with the cause's ``errno`` (code that catches ``OSError`` keeps working); its
    message names the operation and the path, in one line.

    Attributes:
        operation: what was being written ("saving checkpoint-4").
        path: the file or folder being written.
        cause: the cause in words ("No space left on device").
    """

    def __init__(self, operation: str, path: str, cause: str, code: Optional[int] = None) -> None:
        self.operation = operation
        self.path = path
        self.cause = cause
        super().__init__(code, f"{operation} failed: {cause} ({path})")

    def __str__(self) -> str:
        return str(self.strerror)


class TrainingStopped(SystemExit):
    """A signal (SIGTERM, SIGUSR1) stopped training after a complete checkpoint was saved.

    A ``SystemExit`` whose code is 128 + the signal's number: a script that does not catch it
    exits as a process killed by that signal is reported, so a scheduler sees the preemption
    and a requeued job resumes (``resume_from_checkpoint=True``). Nothing after ``train()`` in
    the script runs (no final model is saved from a half-trained run).

    Attributes:
        signal_name: ``"SIGTERM"``, ``"SIGUSR1"``, ...
        step: the optimizer step the run stopped after.
        checkpoint: the checkpoint saved at ``step`` (``None`` when none could be: not the main process).
    """

    def __init__(self, signum: int, signal_name: str, step: int, checkpoint: Optional[str]) -> None:
        super().__init__(128 + signum)
        self.signum = signum
        self.signal_name = signal_name
        self.step = step
        self.checkpoint = checkpoint

    def __str__(self) -> str:
        saved = f"{os.path.basename(self.checkpoint)} saved" if self.checkpoint else "no checkpoint saved"
        return f"stopped by {self.signal_name} at step {self.step}; {saved}; resume with resume_from_checkpoint=True"


#: errno values that are the machine's, never a bug: a write that failed for them is a StorageError.
MACHINE_ERRNOS = frozenset(
    getattr(_errno, name) for name in (
        "ENOSPC", "EDQUOT", "EIO", "EROFS", "EFBIG", "EMFILE", "ENFILE", "ENOMEM", "ESTALE", "EACCES", "EPERM",
    ) if hasattr(_errno, name)
)


def format_choices(choices: Iterable[str], limit: int = 40) -> str:
    """Render a list of valid values for an error message, shortened when very long."""
    items = list(choices)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown
