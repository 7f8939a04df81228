"""Every exception class hf-llama-strategies raises, in one place.

Each subclasses :class:`StrategyError`, itself a :class:`ValueError`, so code that already
catches ``ValueError`` around ``Trainer`` construction keeps working. Errors about the
user's input (options, files, a config) are raised before anything is written; the few
raised later (a plan that cannot resume, a damaged checkpoint met while training) name what
to change. The CLI prints any of them as one line and exits with code 2.
"""

from __future__ import annotations

from typing import Any, Iterable


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


def format_choices(choices: Iterable[str], limit: int = 40) -> str:
    """Render a list of valid values for an error message, shortened when very long."""
    items = list(choices)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown
