"""Option groups: the base of each strategy's arguments dataclass, and the value checks they share.

``StrategyArguments`` is composed of one dataclass per strategy (``FreezingArguments``,
``LisaArguments``...), each declared beside the strategy it configures, as LLaMA-Factory composes
its per-method argument mixins. A group's fields say what they mean in their ``help`` metadata
(shown by ``--help`` and in the generated reference; ``HfArgumentParser`` hands field metadata
to ``argparse``, so it holds nothing else). Two class attributes complete it:

* ``REFINING``: options that only refine another one or the report (they ask for nothing alone,
  see :meth:`OptionGroup.options_set`);
* ``UNSET_WORDS``: option -> a word that spells "unset" beside null (``unfreeze_schedule: none``).

A group checks its own fields' types and spellings in ``__post_init__`` and calls
``super().__post_init__()``, so every group of the composed dataclass checks its own.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional

from ..errors import InvalidArgumentError

#: How a config file, the command line or an environment variable spells "true".
TRUE_WORDS = frozenset({"1", "true", "yes", "y", "on"})
#: Step counts and batch sizes end up in torch/numpy int64 and ``itertools.islice``: a larger
#: integer crashes deep in the loop or never finishes.
INT_MAX = 2**63 - 1


class OptionGroup:
    """Base of the option dataclasses that compose ``StrategyArguments``."""

    REFINING: ClassVar[frozenset[str]] = frozenset()
    UNSET_WORDS: ClassVar[dict[str, str]] = {}

    def __post_init__(self) -> None:
        """The end of the cooperative chain: each group calls ``super()`` first, then checks its own fields."""

    def options_set(self) -> list[str]:
        """Names of the options that ask for something, in field order; empty: nothing asked for.

        An option counts when it differs from its default. A text option's default written
        otherwise (its own word in any case, its ``UNSET_WORDS`` entry, or null for a worded
        default) does not count, nor does an option a group lists as ``REFINING``.
        """
        refining: set[str] = set()
        unset_words: dict[str, str] = {}
        for cls in type(self).__mro__:
            refining.update(vars(cls).get("REFINING", ()))
            unset_words.update(vars(cls).get("UNSET_WORDS", {}))
        names = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name in refining:
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if not _spells_default(value, default, unset_words.get(f.name)) and value != default:
                names.append(f.name)
        return names

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, as stored in ``strategy_plan.json``."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]


def _spells_default(value: Any, default: Any, unset_word: Optional[str]) -> bool:
    if isinstance(value, str) and isinstance(default, str):
        return value.strip().lower() == default
    if isinstance(value, str) and default is None:
        return unset_word is not None and value.strip().lower() == unset_word
    return value is None and isinstance(default, str)


def check_bool(option: str, value: Any, unset_allowed: bool = False) -> None:
    """``value`` is ``True`` or ``False`` (or ``None`` when ``unset_allowed``), else an error naming ``option``."""
    if isinstance(value, bool) or (unset_allowed and value is None):
        return
    expected = "true, false, or unset (null) for the default" if unset_allowed else "true or false"
    raise InvalidArgumentError(option, value, expected)


def check_word(option: str, value: Any, words: tuple[str, ...], expected: str) -> Optional[str]:
    """``value`` (any case and spacing) as one of ``words``, ``None`` when unset; else an error naming ``option``."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() in words:
        return value.strip().lower()
    raise InvalidArgumentError(option, value, expected)


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
        what: what the number counts, added to the message in parentheses.
        maximum: the largest value accepted, named in the message; default: no bound.
        expected: the message's words for a valid value, where the caller's users know
            other ones (LLaMA-Factory's "a whole number of at least 1").
        from_text: also accept a command-line string of ASCII digits and return its number.

    Raises:
        InvalidArgumentError: ``value`` is not such a number.
    """
    number = value
    if from_text and isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        number = int(value)
    if not is_whole(number) or number < 1 or (maximum is not None and number > maximum):
        bound = f" up to {maximum}" if maximum is not None else ""
        counted = f" ({what})" if what else ""
        raise InvalidArgumentError(option, value, f"{expected}{bound}{counted}")
    return number


def check_optional_positive_int(option: str, value: Any, what: str) -> None:
    """An unset (``None``) or positive whole number, else an :class:`InvalidArgumentError`."""
    if value is not None:
        check_positive_int(option, value, what)


def is_whole(value: Any) -> bool:
    """An ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An ``int`` or ``float`` that is not a ``bool``."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
