"""The ``hf-llama-strategies`` command: ``train``, ``plan`` and ``plugins``.

One flat YAML file holds model, data, ``TrainingArguments`` and ``StrategyArguments`` keys
(as LLaMA-Factory users write them); ``--key value`` on the command line overrides it. Bad
input exits with code 2 and one message, before anything is written.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import sys
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Sequence

from transformers import HfArgumentParser, TrainingArguments
from transformers.utils import logging

from .arguments import StrategyArguments
from .data import CAUSAL_LM, SEQ_CLS, SFT, TASKS, DataArguments
from .errors import InvalidArgumentError, StrategyError
from .llamafactory import is_llamafactory_config, translate_llamafactory
from .sft import SFTArguments
from .validation import check_positive_int

logger = logging.get_logger(__name__)

ASSETS = os.path.join(os.path.dirname(__file__), "assets")
DEMO_DIR = os.path.join(ASSETS, "demo")
CONFIGS_DIR = os.path.join(ASSETS, "configs")
_MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
_PATH_KEYS = ("model_name_or_path", "model_config", "tokenizer_name_or_path", "train_file", "validation_file")


class CliError(StrategyError):
    """A command-line or configuration error: printed as one message, exit code 2."""


@dataclass
class ModelArguments:
    """Which model to fine-tune."""

    model_name_or_path: Optional[str] = field(
        default=None, metadata={"help": "A local model directory or a Hub id: weights are loaded from it."}
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
        default=None, metadata={"help": "Tokenizer directory or Hub id. Default: the model's (or config's) directory."}
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
                "Write into an output_dir that already holds other files. Only new files are added: a run that "
                "would overwrite or delete anything there (an earlier run's checkpoints, model, plan or results) "
                "is refused before it starts; resume such a run with resume_from_checkpoint instead."
            )
        },
    )
    metric: str = field(
        default="accuracy", metadata={"help": "Evaluation metric for seq_cls, a module shipped with the package."}
    )
    #: Set by `resume_from_checkpoint: true` when output_dir holds a run killed before its first checkpoint.
    restart_interrupted: bool = field(default=False, init=False)


@dataclass
class _DataArguments(DataArguments, SFTArguments):
    """The data keys, those of ``task: sft`` (sft.py) included."""


ARGUMENT_CLASSES = (ModelArguments, _DataArguments, TrainingArguments, StrategyArguments, RunArguments)

DEMO_CONFIG: dict[str, Any] = {
    # The classic recipe on a small Llama built from a bundled config: body frozen except the
    # last two layers, the classification head trained at a higher rate.
    "model_config": DEMO_DIR,
    "tokenizer_name_or_path": DEMO_DIR,
    "task": SEQ_CLS,
    "train_file": os.path.join(DEMO_DIR, "train.csv"),
    "validation_file": os.path.join(DEMO_DIR, "validation.csv"),
    "max_seq_length": 48,
    "trainable_layers": "-2:",
    "train_embeddings": True,
    "head_lr": 5e-3,
    "precision": "auto",
    "output_dir": "outputs/demo",
    "num_train_epochs": 2,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 64,
    "learning_rate": 2e-3,
    "warmup_steps": 10,
    "weight_decay": 0.01,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 20,
    "seed": 0,
}

DEMO_SFT_DIR = os.path.join(DEMO_DIR, "sft")
DEMO_SFT_CONFIG: dict[str, Any] = {
    # `train --task sft`: a small Llama learns a shipped instruction set (chat template in the
    # shipped tokenizer), loss on the responses only; last two layers and the head train.
    "model_config": DEMO_SFT_DIR,
    "tokenizer_name_or_path": DEMO_SFT_DIR,
    "task": SFT,
    "train_file": os.path.join(DEMO_SFT_DIR, "train.json"),
    "validation_file": os.path.join(DEMO_SFT_DIR, "validation.jsonl"),
    "max_seq_length": 64,
    "trainable_layers": "-2:",
    "head_lr": 3e-3,
    "precision": "auto",
    "output_dir": "outputs/demo-sft",
    "num_train_epochs": 2,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 1e-3,
    "warmup_steps": 10,
    "eval_strategy": "epoch",
    "save_strategy": "no",
    "logging_steps": 20,
    "seed": 0,
}


def _demo_config(demo: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A demo, into a fresh ``outputs/demo[-N]`` each time (a run never writes over an earlier one)."""
    config = dict(demo)
    if not _given("output_dir", {}, overrides):
        base, n = config["output_dir"], 1
        while os.path.exists(config["output_dir"]) and os.listdir(config["output_dir"]):
            n += 1
            config["output_dir"] = f"{base}-{n}"
    return config


class _Parser(HfArgumentParser):
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

    if not os.path.isfile(path):
        what = "is a directory, not a file" if os.path.isdir(path) else "does not exist"
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
        value = data.get(key)
        # Next to the config file first (shipped configs), else as given (the current directory, a Hub id).
        if isinstance(value, str) and not os.path.isabs(value) and os.path.exists(os.path.join(base, value)):
            data[key] = os.path.join(base, value)
    return data


def _unknown_key_error(keys: Sequence[str]) -> CliError:
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
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-") and not token.startswith("--"):
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
    return value is True or (isinstance(value, str) and value.strip().lower() in ("true", "yes", "1", "y", "on"))


def _check_precision_flags(config: dict[str, Any], overrides: Sequence[str]) -> None:
    """``precision`` beside a contradicting ``bf16`` / ``fp16``, said before TrainingArguments reads them."""
    precision = _raw_value("precision", config, overrides)
    if not isinstance(precision, str) or precision.strip().lower() in ("", "auto"):
        return
    wanted = precision.strip().lower()
    for flag in ("bf16", "fp16"):
        if _truthy(_raw_value(flag, config, overrides)) and wanted not in (flag, "float16" if flag == "fp16" else "bfloat16"):
            raise InvalidArgumentError(
                flag, True, f"unset (or false) with precision={precision!r}",
                f"precision sets fp16/bf16 itself: remove {flag}, or set precision: {flag}.",
            )


def parse_config(config: dict[str, Any], overrides: Sequence[str] = ()) -> tuple[Any, ...]:
    """Parse a flat config dict plus command-line overrides into the argument dataclasses.

    Returns ``(model_args, data_args, training_args, strategy_args, run_args)``.
    """
    from .validation import check_config_types, check_data_arguments, check_run_arguments

    parser = _Parser()
    unknown = [key for key in config if key not in set(known_keys())]
    if unknown:
        raise _unknown_key_error(unknown)
    config = check_config_types(config, ARGUMENT_CLASSES)
    overrides = _join_dash_values(overrides)
    _check_precision_flags(config, overrides)
    # The file's values become the parser's defaults: they keep their YAML types (lists,
    # bools, mappings), strings still go through each field's type, and the command line
    # overrides them.
    # The CLI picks the precision for the hardware unless told (the library leaves it unset).
    parser.set_defaults(**{"precision": "auto", **config})
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
        raise _unknown_key_error(_override_keys(remaining))
    model_args, data_args, training_args, strategy_args, run_args = parsed
    if model_args.task not in TASKS:
        raise InvalidArgumentError("task", model_args.task, f"one of {list(TASKS)}")
    if model_args.model_dtype not in _MODEL_DTYPES:
        raise InvalidArgumentError("model_dtype", model_args.model_dtype, f"one of {list(_MODEL_DTYPES)}")
    if (model_args.model_name_or_path is None) == (model_args.model_config is None):
        raise CliError(
            "give exactly one of model_name_or_path (load weights) and model_config (build from a config); "
            f"got model_name_or_path={model_args.model_name_or_path!r}, model_config={model_args.model_config!r}."
        )
    check_run_arguments(training_args)
    check_data_arguments(data_args)
    _check_metric_name(run_args.metric)
    training_args.resume_from_checkpoint = _resolve_resume(training_args)
    if training_args.resume_from_checkpoint == _RESTART:
        training_args.resume_from_checkpoint = None
        run_args.restart_interrupted = True
    return model_args, data_args, training_args, strategy_args, run_args


def _check_metric_name(name: Any) -> None:
    from .metrics import metric_path

    try:
        metric_path(name)
    except ValueError as exc:
        raise InvalidArgumentError("metric", name, "the name of a metric shipped with the package", str(exc)) from None


def _resolve_resume(training_args: TrainingArguments) -> Optional[str]:
    """``resume_from_checkpoint``: a complete checkpoint directory, or true for the newest complete one."""
    from .checkpoints import check_resume_checkpoint, describe_skipped, latest_complete_checkpoint

    value = training_args.resume_from_checkpoint
    text = str(value).strip().lower() if value is not None else None
    if value is None or value is False or text in ("false", "no", "0", ""):
        return None
    expected = "a checkpoint directory, or true for the last checkpoint in output_dir"
    if value is True or text in ("true", "yes", "1"):
        out = training_args.output_dir
        # save_only_model checkpoints hold no optimizer state by design.
        strict = not training_args.save_only_model
        last, skipped = latest_complete_checkpoint(out, strict) if out and os.path.isdir(out) else (None, [])
        if last is None and out and (not os.path.exists(out) or os.path.isdir(out) and not os.listdir(out)):
            # A run killed before it wrote anything (while loading the model or the data).
            print(f"hf-llama-strategies: {out} holds no earlier run yet; training from the start.")
            return _RESTART
        if last is None and out and os.path.isdir(out) and _interrupted_before_first_checkpoint(out):
            print(
                f"hf-llama-strategies: {out} holds a run interrupted before its first complete checkpoint; "
                "training from the start."
            )
            return _RESTART
        if last is None:
            why = f" Incomplete: {describe_skipped(skipped)}." if skipped else ""
            raise InvalidArgumentError(
                "resume_from_checkpoint", value, expected, f"No complete checkpoint-* folder in {out!r}.{why}"
            )
        if skipped:
            logger.warning(f"resume_from_checkpoint: skipping incomplete {describe_skipped(skipped)}; resuming {last}.")
            print(f"hf-llama-strategies: skipped incomplete {describe_skipped(skipped)}; resuming from {last}")
        return last
    if not os.path.isdir(str(value)):
        raise InvalidArgumentError("resume_from_checkpoint", value, expected, "No such directory.")
    check_resume_checkpoint(str(value), require_optimizer=not training_args.save_only_model)
    return str(value)


_RESTART = "\x00restart"


def _interrupted_before_first_checkpoint(out: str) -> bool:
    """output_dir holds only what a run writes before its first complete checkpoint (nothing to lose)."""
    from .checkpoints import CHECKPOINT_RE, INCOMPLETE_PREFIX, STAGING_PREFIX, checkpoint_problem

    names = os.listdir(out)
    if "strategy_plan.json" not in names:
        return False
    for name in names:
        path = os.path.join(out, name)
        if name in ("strategy_plan.json", "runs") or name.startswith((STAGING_PREFIX, INCOMPLETE_PREFIX)):
            continue
        if CHECKPOINT_RE.match(name) and checkpoint_problem(path) is not None:
            continue
        return False
    return True


#: Files (and patterns) a finished run leaves at the top of output_dir: never overwritten by a fresh run.
_RUN_OUTPUTS = (
    "strategy_plan.json", "trainer_state.json", "training_args.bin", "config.json", "generation_config.json",
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "all_results.json",
    "train_results.json", "eval_results.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt",
)


def _earlier_run_files(out: str) -> list[str]:
    from .checkpoints import CHECKPOINT_RE

    names = sorted(os.listdir(out))
    return [
        n for n in names
        if CHECKPOINT_RE.match(n) or n in _RUN_OUTPUTS or (n.startswith("model-") and n.endswith(".safetensors"))
    ]


def _check_output_dir(training_args: TrainingArguments, run_args: RunArguments) -> None:
    """Nothing in output_dir is overwritten or deleted (rotation then only sees this run's checkpoints).

    A fresh run goes into an empty (or new) output_dir, or, with ``overwrite_output_dir``, one
    that holds none of the files a run writes. A resumed run may not start behind a newer
    complete checkpoint of output_dir (it would write over it).
    """
    from .checkpoints import checkpoint_problem, checkpoint_step, list_checkpoints

    out = training_args.output_dir
    if not out or not os.path.isdir(out) or not os.listdir(out):
        return
    resume = training_args.resume_from_checkpoint
    if run_args.restart_interrupted:
        return
    if resume:
        step = checkpoint_step(resume)
        if step is None:
            return
        newer = [
            os.path.basename(p) for p in list_checkpoints(out)
            if (checkpoint_step(p) or 0) > step and checkpoint_problem(p) is None
        ]
        if newer:
            raise CliError(
                f"resuming from {resume} would write over the newer checkpoints {', '.join(newer)} of "
                f"output_dir={out!r}; nothing was written. Resume from the newest (resume_from_checkpoint: true), or "
                "give another output_dir."
            )
        return
    held = sorted(os.listdir(out))
    if not run_args.overwrite_output_dir:
        raise CliError(
            f"output_dir={out!r} already holds files ({', '.join(held[:5])}{', ...' if len(held) > 5 else ''}); "
            "nothing was written. Choose another output_dir, resume with --resume_from_checkpoint, or pass "
            "--overwrite_output_dir true to add this run's files beside them."
        )
    clash = _earlier_run_files(out)
    if clash:
        raise CliError(
            f"output_dir={out!r} holds an earlier run ({', '.join(clash[:6])}{', ...' if len(clash) > 6 else ''}), "
            "which this run would overwrite or rotate away; overwrite_output_dir only adds new files. Nothing was "
            "written. Choose another output_dir, move those files away, or resume with resume_from_checkpoint: true."
        )


def _config_source(model_args: ModelArguments) -> str:
    return model_args.model_config or model_args.model_name_or_path  # type: ignore[return-value]


def load_model_config(model_args: ModelArguments) -> Any:
    """The model's ``PretrainedConfig`` from ``model_config`` or ``model_name_or_path``."""
    from transformers import AutoConfig

    source = _config_source(model_args)
    option = "model_config" if model_args.model_config else "model_name_or_path"
    if model_args.model_config and not os.path.exists(source):
        raise InvalidArgumentError(option, source, "a config.json file or a directory holding one", "No such path.")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(option, source, "a model directory, a config.json or a reachable Hub id", str(exc))


def _auto_model_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == SEQ_CLS else AutoModelForCausalLM


def _task_from_config(config: Any) -> str:
    architectures = getattr(config, "architectures", None) or []
    return SEQ_CLS if any("SequenceClassification" in a for a in architectures) else CAUSAL_LM


def _dtype(model_args: ModelArguments) -> Any:
    import torch

    return "auto" if model_args.model_dtype == "auto" else getattr(torch, model_args.model_dtype)


def build_model(model_args: ModelArguments, config: Any, task: str, meta: bool = False) -> Any:
    """The model for ``task``: loaded with weights, or built from the config (on the meta device for ``meta``)."""
    import torch

    auto = _auto_model_class(task)
    if model_args.model_config is not None or meta:
        dtype = _dtype(model_args)
        if dtype == "auto":
            dtype = getattr(config, "dtype", None) or torch.float32
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if meta:
            with torch.device("meta"):
                return auto.from_config(config, dtype=dtype, trust_remote_code=model_args.trust_remote_code)
        torch.manual_seed(0)
        return auto.from_config(config, dtype=dtype, trust_remote_code=model_args.trust_remote_code)
    return auto.from_pretrained(
        model_args.model_name_or_path, config=config, dtype=_dtype(model_args),
        trust_remote_code=model_args.trust_remote_code,
    )


def _load_tokenizer(model_args: ModelArguments) -> Any:
    from transformers import AutoTokenizer

    source = model_args.tokenizer_name_or_path or _config_source(model_args)
    if source and os.path.isfile(source):
        source = os.path.dirname(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=model_args.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(
            "tokenizer_name_or_path", source, "a tokenizer directory or a reachable Hub id", str(exc)
        ) from None
    if tokenizer.pad_token is None:
        # Llama tokenizers ship without a pad token; EOS padding is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _compute_metrics_for(metric_name: str) -> Any:
    import numpy as np

    from .metrics import load_metric

    try:
        metric = load_metric(metric_name)
    except ValueError as exc:
        raise InvalidArgumentError("metric", metric_name, "a metric shipped with the package", str(exc)) from None

    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        return metric.compute(predictions=np.argmax(logits, axis=-1), references=prediction.label_ids)

    return compute_metrics


def run_train(config: dict[str, Any], overrides: Sequence[str] = ()) -> dict[str, float]:
    """Fine-tune as ``config`` says; returns the final metrics. Everything is checked before writing."""
    model_args, data_args, training_args, strategy_args, run_args = parse_config(config, overrides)
    _check_output_dir(training_args, run_args)
    created = _missing_dirs(training_args.output_dir)
    try:
        try:
            os.makedirs(training_args.output_dir, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(
                "output_dir", training_args.output_dir, "a directory that can be created", exc.strerror
            ) from None
        return _train(config, overrides, model_args, data_args, training_args, strategy_args, run_args)
    finally:
        # A run that failed before writing anything leaves no empty output_dir behind.
        for path in created:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)


def _missing_dirs(path: str) -> list[str]:
    """``path`` and its parents that do not exist yet, deepest first."""
    missing = []
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def _train(
    config: dict[str, Any], overrides: Sequence[str], model_args: Any, data_args: Any, training_args: Any,
    strategy_args: Any, run_args: Any,
) -> dict[str, float]:
    import math

    from transformers import DataCollatorWithPadding, default_data_collator

    from .data import detect_task, load_raw, prepare
    from .sft import build_sft_trainer, load_sft_data, looks_like_sft, require_trl
    from .trainer import StrategyTrainer

    import datasets

    # Local files load in moments; their progress bars would bury the plan and any error.
    datasets.disable_progress_bars()
    model_config = load_model_config(model_args)
    task = model_args.task
    if task == SFT or (task == "auto" and looks_like_sft(data_args)):
        task, tokenizer = SFT, _load_tokenizer(model_args)
        require_trl()
        data = load_sft_data(data_args, data_args, tokenizer, seed=training_args.seed)
    else:
        raw = load_raw(data_args)
        task = detect_task(raw, data_args) if task == "auto" else task
        tokenizer = _load_tokenizer(model_args)
        data = prepare(raw, task, tokenizer, data_args)
    compute_metrics = None
    if task == SEQ_CLS:
        model_config.num_labels = len(data.label_names)
        model_config.id2label = dict(enumerate(data.label_names))
        model_config.label2id = {name: i for i, name in enumerate(data.label_names)}
        model_config.pad_token_id = tokenizer.pad_token_id
        compute_metrics = _compute_metrics_for(run_args.metric)
    model = build_model(model_args, model_config, task)
    if training_args.eval_strategy != "no" and data.eval is None:
        raise InvalidArgumentError(
            "eval_strategy", getattr(training_args.eval_strategy, "value", training_args.eval_strategy),
            "'no' when there is no validation data",
            "Give validation_file or validation_split.",
        )
    if not _given("report_to", config, overrides):
        # The CLI promises TensorBoard logs unless the user chose reporters.
        training_args.report_to = _default_reporters()
    if not _given("dataloader_pin_memory", config, overrides) and training_args.device.type == "cpu":
        # Pinned memory only helps host-to-GPU copies; on a CPU run it only warns.
        training_args.dataloader_pin_memory = False
    collator = DataCollatorWithPadding(tokenizer) if task == SEQ_CLS else default_data_collator

    # StrategyTrainer builds and checks the plan before Trainer.__init__ creates output_dir.
    if task == SFT:
        trainer = build_sft_trainer(model, training_args, data_args, data_args, data, tokenizer, strategy_args)
    else:
        trainer = StrategyTrainer(
            model=model, args=training_args, train_dataset=data.train, eval_dataset=data.eval,
            processing_class=tokenizer, data_collator=collator, compute_metrics=compute_metrics,
            strategy_args=strategy_args,
        )
    resume = training_args.resume_from_checkpoint
    if resume:
        from .checkpoints import checkpoint_finished, set_aside_incomplete

        # The plan check first: a refused resume changes nothing in output_dir.
        if trainer.strategy_callback.plan is not None:
            trainer.strategy_callback.check_resume(resume)
        set_aside_incomplete(training_args.output_dir)
    if resume and checkpoint_finished(resume, training_args):
        # Killed after its last checkpoint: its weights are the result (training again would add a step).
        from transformers import TrainerState

        print(f"hf-llama-strategies: {resume} is the end of this run; saving its final outputs")
        trainer._load_from_checkpoint(resume)
        trainer.state = TrainerState.load_from_json(os.path.join(resume, "trainer_state.json"))
        trainer.save_model()
        metrics: dict[str, float] = {}
    else:
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()
        metrics = dict(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
    if data.eval is not None:
        eval_metrics = trainer.evaluate()
        if task in (CAUSAL_LM, SFT) and "eval_loss" in eval_metrics:
            eval_metrics["perplexity"] = math.exp(min(eval_metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    trainer.save_state()
    print(f"model, tokenizer, strategy_plan.json, metrics and logs saved in {training_args.output_dir}")
    return metrics


def _demo_task(overrides: Sequence[str]) -> Optional[str]:
    """The ``--task`` of a run with no config file (``train --task sft``: the SFT demo)."""
    tokens = list(overrides)
    for i, token in enumerate(tokens):
        if token.startswith("--task="):
            return token.split("=", 1)[1]
        if token == "--task" and i + 1 < len(tokens):
            return tokens[i + 1]
    return None


def _given(key: str, config: dict[str, Any], overrides: Sequence[str]) -> bool:
    """Whether the user set ``key``, in the file or on the command line."""
    return key in config or any(o.lstrip("-").split("=", 1)[0].replace("-", "_") == key for o in overrides)


def _default_reporters() -> list[str]:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return ["none"]
    return ["tensorboard"]


@dataclass
class PlanOptions:
    """Options of ``plan`` beside the config keys: ``--plot``, ``--json``, ``--fit``, ``--world_size``..."""

    plot: Optional[str] = None
    json: bool = False
    fit: Optional[int] = None
    world_size: Optional[int] = None
    fit_optimizers: tuple[str, ...] = ()


def run_plan(
    config: dict[str, Any], overrides: Sequence[str] = (), plot: Optional[str] = None,
    options: Optional[PlanOptions] = None,
) -> Any:
    """Print the plan, the static memory estimate and the step's peak, with no weights loaded (meta device).

    With ``options.json`` one JSON object (``plan``, ``static_memory``, ``memory``, ``fit``) is printed
    instead; with ``options.fit`` the settings that fit that many bytes are searched.
    """
    from .context import RunContext
    from .memory import estimate_memory, estimate_training_memory
    from .planner import build_plan

    options = options or PlanOptions(plot=plot)
    # parse_config has refused a batch size, accumulation or max_seq_length below 1 (validation.py).
    model_args, data_args, training_args, strategy_args, run_args = parse_config(config, overrides)
    model_config = load_model_config(model_args)
    task = _task_from_config(model_config) if model_args.task == "auto" else model_args.task
    model = build_model(model_args, model_config, task, meta=True)
    # As `train` would: precision resolved for this machine (and by any installed probe plugin).
    context = RunContext.create(strategy_args, training_args, model=model)
    training_args = context.resolve_training_arguments(in_place=False)
    plan = build_plan(model, context=context)
    estimate = estimate_memory(plan, str(getattr(training_args.optim, "value", training_args.optim)))
    memory = estimate_training_memory(
        model, strategy_args, training_args, seq_len=data_args.max_seq_length, world_size=options.world_size,
        context=context,
    )
    fit = None
    if options.fit is not None:
        from .fit import fit_search

        fit = fit_search(
            model, strategy_args, training_args, options.fit, seq_len=data_args.max_seq_length,
            world_size=options.world_size, optimizers=options.fit_optimizers, context=context,
        )
    if options.json:
        print(json.dumps({
            "plan": plan.to_dict(), "static_memory": estimate.to_dict(), "memory": memory.to_dict(),
            "fit": None if fit is None else fit.to_dict(),
        }, indent=2))
    else:
        print(plan.table())
        print(estimate.table())
        print(memory.table())
        if fit is not None:
            print(fit.report())
    if options.plot:
        from .plan_report import plot_plan

        plot_plan(plan, options.plot, base_lr=training_args.learning_rate)
        if not options.json:
            print(f"plot written to {options.plot}")
    return plan


def run_plugins() -> list[dict[str, object]]:
    """Print the installed and active plugins with their hooks."""
    from .plugins import describe_plugins, get_plugin_manager

    rows = describe_plugins(get_plugin_manager(strict=False))
    width = max(len(str(r["name"])) for r in rows)
    for row in rows:
        print(f"{str(row['name']).ljust(width)}  {row['source']}")
        print(f"{' ' * width}  hooks: {', '.join(row['hooks']) or '-'}")  # type: ignore[arg-type]
    return rows


_USAGE = """usage: hf-llama-strategies COMMAND [CONFIG.yaml] [--key value ...]

commands:
  train [CONFIG.yaml] [--key value ...]   fine-tune (no config: the bundled offline demo; --task sft: its
                                          instruction-tuning variant); a LLaMA-Factory YAML is translated
  plan CONFIG.yaml [--json] [--fit 80GiB [--fit_optimizers adafactor,sgd]] [--world_size N]
       [--plot PNG] [--key value ...]
                                          print the plan and the peak memory of a training step
                                          (dry run on fake tensors: loads no weights); --fit finds
                                          settings that fit, --json prints one JSON object
  plugins                                 list installed and active plugins with their hooks

`hf-llama-strategies train --help` lists every key a config file or the command line may set.
"""
_COMMANDS = ("train", "plan", "plugins")


def _split_plan_options(overrides: list[str]) -> tuple[PlanOptions, list[str]]:
    """Take ``plan``'s own options out of the ``--key value`` overrides."""
    from .fit import parse_size

    rest: list[str] = []
    options = PlanOptions()
    valued = {"plot": "a file name, e.g. --plot plan.png", "fit": "a memory size, e.g. --fit 80GiB",
              "world_size": "a number of ranks, e.g. --world_size 8",
              "fit_optimizers": "optim values, e.g. --fit_optimizers adafactor,sgd"}
    tokens = iter(overrides)
    for token in tokens:
        name, eq, value = token.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key == "json" and not eq:
            options.json = True
            continue
        if key not in valued:
            rest.append(token)
            continue
        if not eq:
            value = next(tokens, None)
            if value is None or value.startswith("--"):
                raise CliError(f"--{key} needs {valued[key]}")
        if key == "plot":
            options.plot = value
        elif key == "fit":
            options.fit = parse_size(value, "--fit")
        elif key == "world_size":
            options.world_size = check_positive_int("--world_size", value, from_text=True)
        else:
            options.fit_optimizers = tuple(v.strip() for v in value.split(",") if v.strip())
    if options.fit_optimizers and options.fit is None:
        raise CliError("--fit_optimizers needs --fit BUDGET (the optimizers are tried in the fit search).")
    return options, rest


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hf-llama-strategies``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command not in _COMMANDS:
            close = difflib.get_close_matches(command, _COMMANDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise CliError(f"unknown command {command!r}{hint} Commands: {', '.join(_COMMANDS)}.")
        if command == "plugins":
            if rest:
                raise CliError(f"plugins takes no arguments, got {' '.join(rest)!r}.")
            run_plugins()
            return 0
        if "-h" in rest or "--help" in rest:
            print(_USAGE)
            _Parser().print_help()
            return 0
        # The config file is the first word that is not a --key or its value.
        config_path = rest[0] if rest and not rest[0].startswith("-") else None
        overrides = rest[1:] if config_path is not None else rest
        plan_options = PlanOptions()
        if command == "plan":
            plan_options, overrides = _split_plan_options(overrides)
            if config_path is None:
                raise CliError(f"plan needs a config file, e.g. {os.path.join(CONFIGS_DIR, 'llama3-8b.yaml')}")
        if config_path:
            config = load_config_file(config_path)
            if is_llamafactory_config(config):
                # `plan --json` prints one JSON object and nothing else.
                config = translate_llamafactory(
                    config, os.path.dirname(os.path.abspath(config_path)), echo=not plan_options.json
                )
        else:
            config = _demo_config(DEMO_SFT_CONFIG if _demo_task(overrides) == SFT else DEMO_CONFIG, overrides)
        if command == "train":
            run_train(config, overrides)
        else:
            run_plan(config, overrides, options=plan_options)
        return 0
    except StrategyError as exc:
        print(f"hf-llama-strategies: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-llama-strategies: interrupted", file=sys.stderr)
        return 130
    except Exception:
        # Bad input is refused above with one line; anything else is ours to fix.
        import traceback

        traceback.print_exc()
        print(
            "hf-llama-strategies: internal error: this is a bug in hf-llama-strategies (or a library it calls), "
            "not a problem with your input; please report it with the traceback above.",
            file=sys.stderr,
        )
        return 1


def one_line(message: str) -> str:
    """A multi-line message (a plan difference) as one line: its lines joined by ' | '."""
    parts = [re.sub(r"^-\s+", "", p.strip()) for p in message.splitlines()]
    return " | ".join(p for p in parts if p)


if __name__ == "__main__":
    sys.exit(main())
