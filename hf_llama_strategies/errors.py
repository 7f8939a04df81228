"""Exception classes raised by hf-llama-strategies.

Every error subclasses :class:`StrategyError`, itself a :class:`ValueError`, so code that
already catches ``ValueError`` around ``Trainer`` construction keeps working. All of them
are raised before training starts and before anything is written.
"""

from __future__ import annotations

from typing import Any, Iterable


class StrategyError(ValueError):
    """Base class of every error this library raises about a user's configuration."""


class InvalidArgumentError(StrategyError):
    """A :class:`~hf_llama_strategies.StrategyArguments` field holds a value that cannot work.

    The message names the option, the bad value and what would be valid.
    """

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


def format_choices(choices: Iterable[str], limit: int = 40) -> str:
    """Render a list of valid values for an error message, shortened when very long."""
    items = list(choices)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... ({len(items) - limit} more)"
    return shown


class PluginError(StrategyError):
    """A plugin failed, answered a hook wrongly, or could not be loaded; the message names it and the hook."""
