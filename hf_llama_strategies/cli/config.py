"""The configuration of a CLI run: one flat YAML file (and ``--key value`` overrides) into the argument dataclasses.

One file holds model, data, ``TrainingArguments`` and ``StrategyArguments`` keys, as LLaMA-Factory
users write them; the command line overrides it. Everything is checked here, before anything is
written: unknown keys (with a "did you mean"), wrong YAML types, values no run survives, and the
options plugins own (their ``hfls_validate_arguments`` hook). Bad input is a :class:`CliError`
or an :class:`InvalidArgumentError`, one line, exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, NamedTuple, Optional, Sequence, Union

from transformers import HfArgumentParser, TrainingArguments

from ..arguments import StrategyArguments
from ..core.dtypes import normalise_dtype_name
from ..core.options import TRUE_WORDS, is_number, is_whole
from ..core.plugins import default_plugin_manager
from ..data.local import TASKS, DataArguments, check_data_arguments, not_a_file
from ..data.metrics import metric_path
from ..data.sft import SFTArguments
from ..errors import CliError, InvalidArgumentError, StrategyError
from ..training.peft import PeftArguments, check_peft_arguments
from ..training.resume import resolve_resume
from ..training.validation import check_run_arguments
from .gguf import cached_model_folder, check_gguf_file, resolve_gguf_file

#: What the CLI sets unless the config or the command line says otherwise.
_CLI_DEFAULTS = {"precision": "auto", "checkpoint_on_signal": True, "lock_output_dir": True}
_MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
_PATH_KEYS = (
    "model_name_or_path", "gguf_file", "model_config", "tokenizer_name_or_path", "train_file", "validation_file",
)


@dataclass
class ModelArguments(PeftArguments):
    """Which model to fine-tune, and (TRL's keys) whether through LoRA adapters."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local model directory or a Hub id: weights are loaded from it."}
    )
    gguf_file: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "A GGUF file (llama.cpp's format) holding the model and its tokenizer: a file name inside "
                "model_name_or_path (a folder or a Hub repository), or a path. A model_name_or_path ending in .gguf "
                "is such a file. Converted once into an ordinary model folder, kept under "
                "$HF_HOME/hf_llama_strategies/gguf; needs the [gguf] extra."
            )
        },
    )
    model_config: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "A config.json (or a directory holding one) to build the model from, with fresh weights. "
                "`plan` builds it on the meta device, so even a 70B config costs no memory."
            )
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "Tokenizer directory or Hub id. Default: the model's (or config's, or GGUF file's)."},
    )
    task: str = field(
        default="auto",
        metadata={
            "help": "causal_lm, seq_cls, sft (instruction/chat records, through TRL), or auto: sft for such "
            "records, seq_cls when the data has `label_column`, else causal_lm."
        },
    )
    model_dtype: str = field(
        default="auto",
        metadata={"help": "dtype to load the weights in: auto (as saved), float32, bfloat16 or float16."},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow models with code from their repository."})


@dataclass
class RunArguments:
    """How the CLI treats its outputs."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": (
                "Start afresh in an output_dir that already holds files: its contents are first moved, in one "
                "rename, to a sibling folder (<output_dir>.earlier-<date>-<time>, named in one line); nothing is "
                "deleted. Without it such a run is refused (resume it with resume_from_checkpoint instead)."
            )
        },
    )
    metric: str = field(
        default="accuracy", metadata={"help": "Evaluation metric for seq_cls, a module shipped with the package."}
    )
    #: Set by `resume_from_checkpoint: true` when output_dir holds a run killed before its first checkpoint.
    restart_interrupted: bool = field(default=False, init=False)
    #: What resolving `resume_from_checkpoint` decided that the user should hear (printed by `train`).
    resume_note: Optional[str] = field(default=None, init=False)


@dataclass
class CliDataArguments(DataArguments, SFTArguments):
    """The data keys, those of ``task: sft`` included."""


ARGUMENT_CLASSES = (ModelArguments, CliDataArguments, TrainingArguments, StrategyArguments, RunArguments)


class ParsedConfig(NamedTuple):
    """A parsed, checked configuration: one dataclass per group of keys."""

    model: ModelArguments
    data: CliDataArguments
    training: TrainingArguments
    strategy: StrategyArguments
    run: RunArguments


class ArgumentsParser(HfArgumentParser):
    """HfArgumentParser that raises instead of printing the whole usage and exiting."""

    def __init__(self) -> None:
        super().__init__(ARGUMENT_CLASSES, allow_abbrev=False)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message)


def known_keys() -> list[str]:
    """Every key a config file may hold."""
    return [f.name for cls in ARGUMENT_CLASSES for f in fields(cls) if f.init]


def load_config_file(path: str) -> dict[str, Any]:
    """Read a flat YAML (or JSON) config file into a dict."""
    import yaml

    problem = not_a_file(path)
    if problem:
        what = "is a directory, not a file" if os.path.isdir(path) else (
            "does not exist" if problem == "No such file." else problem[0].lower() + problem[1:].rstrip("."))
        raise CliError(f"config file {path!r} {what}.")
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if b"\x00" in raw:
            raise CliError(f"config file {path!r} is a binary file, not YAML.")
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CliError(f"config file {path!r} is not UTF-8 text (byte {exc.start}).") from None
    except OSError as exc:
        raise CliError(f"config file {path!r} cannot be read: {exc.strerror}.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise CliError(f"config file {path!r} is not valid YAML{at}: {problem}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"config file {path!r} must hold a mapping of keys to values, not a {type(data).__name__}.")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise CliError(f"config file {path!r}: keys must be names, got {bad_keys[0]!r}.")
    base = os.path.dirname(os.path.abspath(path))
    for key in _PATH_KEYS:
        if key in data:
            data[key] = _next_to(base, data[key])
    for key in _STRUCTURED_TEXT_OPTIONS:  # the files of `sft_datasets: [{file: ...}, ...]`
        if isinstance(data.get(key), list):
            data[key] = [
                {**entry, "file": _next_to(base, entry["file"])} if isinstance(entry, dict) and "file" in entry
                else _next_to(base, entry) for entry in data[key]
            ]
    return data


def _next_to(base: str, value: Any) -> Any:
    """A relative path next to the config file when it is there (shipped configs), else as given (a Hub id)."""
    if isinstance(value, str) and not os.path.isabs(value) and os.path.exists(os.path.join(base, value)):
        return os.path.join(base, value)
    return value


def unknown_key_error(keys: Sequence[str]) -> CliError:
    valid = known_keys()
    messages = []
    for key in keys:
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        messages.append(f"unknown key {key!r}{hint}")
    return CliError("; ".join(messages) + ". `hf-llama-strategies train --help` lists every key.")


def _override_keys(remaining: Sequence[str]) -> list[str]:
    keys: list[str] = []
    for token in remaining:
        if token.startswith("--"):
            keys.append(token[2:].split("=", 1)[0].replace("-", "_"))
        elif not keys:
            # A value with no --key before it (a --key before it is unknown and reported instead).
            raise CliError(f"unexpected value {token!r} on the command line (values follow a --key).")
    return keys


def _join_dash_values(overrides: Sequence[str]) -> list[str]:
    """``--key -2:`` as ``--key=-2:``: argparse takes a value starting with '-' (``-inf``, ``-2:``) for an option."""
    out: list[str] = []
    for token in overrides:
        after_key = out and out[-1].startswith("--") and "=" not in out[-1]
        if after_key and token.startswith("-") and not token.startswith("--"):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _raw_value(key: str, config: dict[str, Any], overrides: Sequence[str]) -> Any:
    """The value the user gave ``key`` (the command line wins), as written; ``None`` when not given."""
    value = config.get(key)
    tokens = list(overrides)
    for i, token in enumerate(tokens):
        name, eq, rest = token.lstrip("-").partition("=")
        if token.startswith("--") and name.replace("-", "_") == key:
            if eq:
                value = rest
            elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                value = tokens[i + 1]
            else:
                value = True
    return value


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in TRUE_WORDS)


def _check_precision_flags(config: dict[str, Any], overrides: Sequence[str]) -> None:
    """``precision`` beside a contradicting ``bf16`` / ``fp16``, said before TrainingArguments reads them."""
    precision = _raw_value("precision", config, overrides)
    if not isinstance(precision, str) or precision.strip().lower() in ("", "auto"):
        return
    wanted = normalise_dtype_name("precision", precision, allow_auto=True)  # the one alias table ("half" is fp16)
    for flag in ("bf16", "fp16"):
        if _truthy(_raw_value(flag, config, overrides)) and wanted != flag:
            raise InvalidArgumentError(
                flag, True, f"unset (or false) with precision={precision!r}",
                f"precision sets fp16/bf16 itself: remove {flag}, or set precision: {flag}.",
            )


def parse_config(config: dict[str, Any], overrides: Sequence[str] = ()) -> ParsedConfig:
    """Parse a flat config dict plus command-line overrides into the argument dataclasses, all checked.

    Unpacks as ``model_args, data_args, training_args, strategy_args, run_args``.

    Raises:
        CliError, InvalidArgumentError: naming the key, the value and what is valid.
        PluginError: an installed plugin cannot be loaded.
    """
    unknown = [key for key in config if key not in set(known_keys())]
    if unknown:
        raise unknown_key_error(unknown)
    config = check_config_types(config, ARGUMENT_CLASSES)
    overrides = _join_dash_values(overrides)
    _check_precision_flags(config, overrides)
    _check_lora_keys(config, overrides)
    parsed = ParsedConfig(*_parse(config, overrides))
    _check_model_keys(parsed.model)
    check_run_arguments(parsed.training)
    check_data_arguments(parsed.data)
    _check_metric_name(parsed.run.metric)
    # The options plugins own, checked by every plugin (the run's context checks them again, with
    # plugins passed in code, once it exists).
    default_plugin_manager().hook.hfls_validate_arguments(strategy_args=parsed.strategy)
    training = parsed.training
    point = resolve_resume(training.resume_from_checkpoint, training.output_dir,
                           require_optimizer=not training.save_only_model, from_config=True)
    training.resume_from_checkpoint = point.checkpoint
    parsed.run.restart_interrupted = point.restart
    parsed.run.resume_note = point.note
    return parsed


def _parse(config: dict[str, Any], overrides: Sequence[str]) -> list[Any]:
    parser = ArgumentsParser()
    # The file's values become the parser's defaults: they keep their YAML types (lists, bools,
    # mappings), strings still go through each field's type, and the command line overrides them.
    # The CLI picks the precision for the hardware, saves a checkpoint when a scheduler stops it and
    # locks output_dir, unless told otherwise (the library leaves all three off).
    parser.set_defaults(**{**_CLI_DEFAULTS, **config})
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(args=list(overrides), return_remaining_strings=True)
    except (CliError, StrategyError):
        raise
    except ValueError as exc:
        message = str(exc)
        if "use_cpu" in message and ("bf16" in message or "fp16" in message):
            message = (
                "bf16/fp16: true needs a GPU with that precision; on this machine set precision: auto (it "
                "chooses what the hardware has) or use_cpu: true with bf16."
            )
        raise CliError(message) from None
    except TypeError as exc:
        raise CliError(f"a value has the wrong type: {exc}") from None
    if remaining:
        raise unknown_key_error(_override_keys(remaining))
    return parsed


_LORA_KEYS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_rslora",
              "use_dora")


def _check_lora_keys(config: dict[str, Any], overrides: Sequence[str]) -> None:
    """A LoRA key without ``use_peft`` would be silently ignored (as TRL ignores it): refused instead."""
    if _truthy(_raw_value("use_peft", config, overrides)):
        return
    for key in _LORA_KEYS:
        value = _raw_value(key, config, overrides)
        if value is not None and value is not False:
            raise InvalidArgumentError(key, value, "unset without use_peft: true (it configures the LoRA adapters)")


def _check_model_keys(model_args: ModelArguments) -> None:
    check_peft_arguments(model_args)
    if model_args.task not in TASKS:
        raise InvalidArgumentError("task", model_args.task, f"one of {list(TASKS)}")
    if model_args.model_dtype not in _MODEL_DTYPES:
        raise InvalidArgumentError("model_dtype", model_args.model_dtype, f"one of {list(_MODEL_DTYPES)}")
    weights = model_args.model_name_or_path or model_args.gguf_file
    if (weights is None) == (model_args.model_config is None):
        raise CliError(
            "give exactly one of model_name_or_path (or gguf_file: load weights) and model_config (build from a "
            f"config); got model_name_or_path={model_args.model_name_or_path!r}, gguf_file={model_args.gguf_file!r}, "
            f"model_config={model_args.model_config!r}."
        )
    _check_gguf(model_args)


def _check_gguf(model_args: ModelArguments) -> None:
    """A GGUF model named by ``gguf_file`` or a ``.gguf`` model_name_or_path: resolved to its path and checked.

    ``gguf_file`` then holds the file's path for the loaders; a file converted before (cached) was
    checked then and is not read again.
    """
    option = "gguf_file" if model_args.gguf_file is not None else "model_name_or_path"
    path = resolve_gguf_file(model_args.model_name_or_path, model_args.gguf_file)
    if path is None:
        return
    if cached_model_folder(path) is None:
        check_gguf_file(path, option)
    model_args.gguf_file = os.path.abspath(path)


def _check_metric_name(name: Any) -> None:
    try:
        metric_path(name)
    except ValueError as exc:
        raise InvalidArgumentError("metric", name, "the name of a metric shipped with the package", str(exc)) from None


def given(key: str, config: dict[str, Any], overrides: Sequence[str]) -> bool:
    """Whether the user set ``key``, in the file or on the command line."""
    return key in config or any(o.lstrip("-").split("=", 1)[0].replace("-", "_") == key for o in overrides)


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
        return is_whole(value)
    if hint is float:
        return is_number(value)
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
        own_checks = issubclass(cls, StrategyArguments)
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


def _accepts_str(hint: Any) -> bool:
    if hint is str:
        return True
    if _is_union(hint):
        return any(_accepts_str(a) for a in typing.get_args(hint))
    return False


# Text options outside StrategyArguments that take a YAML list or mapping as well (data/sft.py).
_STRUCTURED_TEXT_OPTIONS = frozenset({"sft_datasets", "sft_eval_datasets"})
# Text options whose value may be a YAML boolean (`resume_from_checkpoint: true`).
_FLAG_TEXT_OPTIONS = frozenset({"resume_from_checkpoint"})


#: The longest error line printed: a value quoted from a file (a 64 MB CSV header) is cut.
MAX_LINE = 1000


def one_line(message: str) -> str:
    """A multi-line message (a plan difference) as one line: its lines joined by ' | ', cut to :data:`MAX_LINE`."""
    parts = [re.sub(r"^-\s+", "", p.strip()) for p in message.splitlines()]
    line = " | ".join(p for p in parts if p)
    if len(line) > MAX_LINE:
        cut = len(line) - MAX_LINE
        line = f"{line[:MAX_LINE // 2]} ... [{cut} characters cut] ... {line[-MAX_LINE // 2:]}"
    return line
