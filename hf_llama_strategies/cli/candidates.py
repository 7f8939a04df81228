"""The candidates of ``compare``: the user's (YAML) or the default list, each at each learning rate of its grid.

A candidate is a set of strategy keys (plus a few optimizer keys, which leave the data, its
order and the budget alone) laid over the config; every run is parsed and checked exactly as
``train`` checks a config, before anything trains.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..arguments import FreezingArguments, GradualUnfreezingArguments, LisaArguments, StrategyArguments
from ..core.options import is_number
from ..errors import CliError, StrategyError
from .config import ARGUMENT_CLASSES, ParsedConfig, _join_dash_values, known_keys, parse_config, unknown_key_error

#: Keys of ``TrainingArguments`` a candidate may set: they change the optimizer, never the data,
#: its order, the batches or the budget that every candidate shares.
OPTIMIZER_KEYS = ("learning_rate", "weight_decay", "optim", "optim_args", "lr_scheduler_type", "warmup_ratio",
                  "warmup_steps", "max_grad_norm", "activation_checkpointing")
#: What decides which parameters train: a default candidate sets all of it (unset keys at their
#: defaults), so that "last 2" means the last 2 layers whatever the config's own freezing keys.
STRUCTURE_KEYS = tuple(
    f.name for group in (FreezingArguments, GradualUnfreezingArguments, LisaArguments)
    for f in dataclasses.fields(group) if f.init and f.name != "lisa_drop_optimizer_state"
) + ("layer_lr_decay",)


@dataclass
class Candidate:
    """One strategy to compare.

    Attributes:
        name: how tables and plots call it.
        keys: the keys it sets (what the recommendation's YAML holds).
        resets: keys a default candidate puts back to their defaults (not shown).
        learning_rates: its learning-rate grid (``None``: the config's rate).
    """

    name: str
    keys: dict[str, Any]
    resets: dict[str, Any] = field(default_factory=dict)
    learning_rates: Optional[list[float]] = None


@dataclass
class Run:
    """One candidate at one learning rate: the config it trains with, parsed and checked.

    Attributes:
        index: its place in the order given (1-based).
        name: the candidate's name, with ``@ lr=...`` for a grid.
        candidate: what it comes from.
        keys: the keys it sets (the candidate's, and ``learning_rate`` of the grid).
        config: the config file's keys with the run's laid over them.
        overrides: the command line's ``--key value`` pairs, less those the run sets.
        parsed: ``config`` and ``overrides`` parsed and checked.
        settings: the keys ``compare`` sets itself (its folder, its evaluations...).
    """

    index: int
    name: str
    candidate: Candidate
    keys: dict[str, Any]
    config: dict[str, Any]
    overrides: list[str]
    parsed: ParsedConfig
    settings: dict[str, Any] = field(default_factory=dict)


def read_candidates(source: Any, origin: str) -> list[Candidate]:
    """The user's candidates: a YAML list of mappings (``source``: the config's ``candidates`` value, or
    ``--candidates``: a YAML file holding such a list or a ``candidates:`` key, or the list written inline).

    Raises:
        CliError: not a non-empty list of mappings, a key a candidate may not set, a bad grid.
    """
    if isinstance(source, str):
        source = _load_candidates_text(source)
    if isinstance(source, dict) and "candidates" in source:
        source = source["candidates"]
    if not isinstance(source, list) or not source:
        raise CliError(f"{origin}: a non-empty YAML list of candidates (mappings of strategy keys), e.g. "
                       '[{trainable_layers: "-2:"}, {trainable_layers: all, layer_lr_decay: 0.9}]; got '
                       f"{type(source).__name__}.")
    return [_candidate(i, item, origin) for i, item in enumerate(source, start=1)]


def _load_candidates_text(text: str) -> Any:
    import yaml

    if os.path.isfile(text):
        try:
            with open(text, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise CliError(f"--candidates: the file {text!r} cannot be read as text ({exc}).") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"--candidates: neither a file nor valid YAML ({str(exc).splitlines()[0]}).") from None


def _candidate(index: int, item: Any, origin: str) -> Candidate:
    where = f"{origin}: candidate {index}"
    if not isinstance(item, dict) or not all(isinstance(k, str) for k in item):
        raise CliError(f"{where}: a mapping of strategy keys, e.g. {{trainable_layers: '-2:'}}; got {item!r}.")
    keys = dict(item)
    name = keys.pop("name", None)
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise CliError(f"{where}: name must be a text, got {name!r}.")
    strategy_keys = {f.name for f in dataclasses.fields(StrategyArguments) if f.init}
    for key in keys:
        if key in strategy_keys or key in OPTIMIZER_KEYS:
            continue
        if key in known_keys():
            raise CliError(
                f"{where}: {key} is a key every candidate shares (the data, its order, the batches and the budget "
                f"are the same for all): set it in the config. A candidate sets strategy keys and "
                f"{', '.join(OPTIMIZER_KEYS)}."
            )
        raise CliError(f"{where}: {parse_error_text(key)}")
    grid = _grid(keys.pop("learning_rate", None), f"{where}: learning_rate")
    if grid is not None and len(grid) == 1:
        keys["learning_rate"], grid = grid[0], None
    label = name.strip() if name else describe_keys(keys) or "the config as it is"
    return Candidate(label, keys, learning_rates=grid)


def parse_error_text(key: str) -> str:
    """The "unknown key" line ``train`` gives for ``key`` (with its "did you mean")."""
    return str(unknown_key_error([key]))


def _grid(value: Any, option: str) -> Optional[list[float]]:
    """A learning rate or a list of them, each a finite positive number."""
    if value is None:
        return None
    values = value if isinstance(value, list) else [value]
    rates = []
    for v in values:
        number = _number(v)
        if number is None or not math.isfinite(number) or number <= 0:
            raise CliError(f"{option}: {v!r} is not a learning rate (a finite number > 0, or a list of them).")
        rates.append(number)
    if not rates:
        raise CliError(f"{option}: an empty grid; give one learning rate or a list of them.")
    return rates


def _number(value: Any) -> Optional[float]:
    if is_number(value):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_lr_grid(text: str) -> list[float]:
    """``--lr_grid 1e-4,3e-4``: the learning rates every candidate without its own is tried at."""
    return _grid([t.strip() for t in str(text).split(",") if t.strip()], "--lr_grid") or []


def describe_keys(keys: dict[str, Any]) -> str:
    """``trainable_layers=-2:, layer_lr_decay=0.9``: a candidate named by its keys."""
    return ", ".join(f"{k}={v}" for k, v in keys.items())


def default_candidates(num_layers: int) -> list[Candidate]:
    """Head only, the last 2 layers, the last 25% and 50%, full fine-tuning, layer-wise LR decay, LISA.

    Each sets every key that decides what trains (``STRUCTURE_KEYS``); the ones a model this deep
    makes equal to an earlier one (the last 50% of 4 layers is the last 2) are left out.
    """
    reset = {f.name: f.default for f in dataclasses.fields(StrategyArguments) if f.name in STRUCTURE_KEYS}
    specs: list[tuple[str, dict[str, Any]]] = [("head only", {"trainable_layers": "none", "train_norm": False})]
    seen = {0, num_layers}
    lasts = (("last 2", 2), ("last 25%", math.ceil(num_layers / 4)), ("last 50%", math.ceil(num_layers / 2)))
    for label, count in lasts:
        if count not in seen:
            seen.add(count)
            specs.append((f"{label} ({count} of {num_layers} layers)" if "%" in label else label,
                          {"trainable_layers": f"-{count}:"}))
    specs += [("full", {"trainable_layers": "all"}),
              ("layer-wise LR decay 0.9", {"trainable_layers": "all", "layer_lr_decay": 0.9})]
    if num_layers > 2:
        specs.append(("LISA, 2 layers", {"trainable_layers": "all", "lisa_layers": 2}))
    return [Candidate(name, keys, resets={k: v for k, v in reset.items() if k not in keys}) for name, keys in specs]


def expand(candidates: Sequence[Candidate], lr_grid: Optional[list[float]]) -> list[tuple[str, Candidate, dict]]:
    """Each candidate at each rate of its grid (its own, else ``--lr_grid``): ``(name, candidate, keys)``."""
    runs = []
    for candidate in candidates:
        own = "learning_rate" in candidate.keys
        grid = candidate.learning_rates or (None if own else lr_grid)
        for rate in grid or [None]:
            keys = dict(candidate.keys)
            if rate is not None:
                keys["learning_rate"] = rate
            name = candidate.name if rate is None or len(grid or ()) < 2 else f"{candidate.name} @ lr={rate:g}"
            runs.append((name, candidate, keys))
    return runs


def build_runs(
    specs: Sequence[tuple[str, Candidate, dict]], config: dict[str, Any], overrides: Sequence[str],
    settings: Callable[[int, str], dict[str, Any]],
) -> list[Run]:
    """Every run's config (``config`` < the run's keys < ``settings(index, name)``, compare's own), checked.

    Raises:
        CliError: a run's keys or values refused, naming the candidate and what ``train`` would say.
    """
    return [build_run(i, name, candidate, keys, config, overrides, settings(i, name))
            for i, (name, candidate, keys) in enumerate(specs, start=1)]


def build_run(index: int, name: str, candidate: Candidate, keys: dict[str, Any], config: dict[str, Any],
              overrides: Sequence[str], settings: dict[str, Any]) -> Run:
    """One run, parsed and checked as ``train`` checks a config (see :func:`build_runs`)."""
    laid = {**candidate.resets, **keys, **settings}
    run_config = {**config, **laid}
    run_overrides = without_keys(overrides, laid)
    try:
        parsed = parse_config(run_config, run_overrides)
    except StrategyError as exc:
        raise CliError(f"candidate {index} ({name}): {exc}") from None
    return Run(index, name, candidate, keys, run_config, run_overrides, parsed, settings)


def without_keys(overrides: Sequence[str], keys: dict[str, Any]) -> list[str]:
    """The ``--key value`` overrides less those of ``keys`` (a run's own keys win over the command line)."""
    out: list[str] = []
    skip_value = False
    for token in _join_dash_values(overrides):
        if skip_value and not token.startswith("--"):
            skip_value = False
            continue
        skip_value = False
        if token.startswith("--"):
            name, eq, _ = token[2:].partition("=")
            if name.replace("-", "_") in keys:
                skip_value = not eq
                continue
        out.append(token)
    return out


def strategy_fields() -> dict[str, Any]:
    """Every strategy key and its default."""
    return {f.name: f.default for f in dataclasses.fields(StrategyArguments) if f.init}


def yaml_lines(run: Run, config: dict[str, Any]) -> str:
    """The keys to paste into the config to train ``run`` with ``train``: what it sets that the config does not."""
    import yaml

    defaults = {**strategy_fields(), **_training_defaults()}
    wanted = {**run.candidate.resets, **run.keys}
    lines = {k: v for k, v in wanted.items() if config.get(k, defaults.get(k)) != v}
    if not lines:
        return "# nothing to change: the config as it is"
    return yaml.safe_dump(lines, sort_keys=False, default_flow_style=False).strip()


def _training_defaults() -> dict[str, Any]:
    training = ARGUMENT_CLASSES[2]
    return {f.name: f.default for f in dataclasses.fields(training) if f.name in OPTIMIZER_KEYS}
