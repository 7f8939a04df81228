"""The ``hf-llama-strategies`` command: ``train``, ``plan`` and ``plugins``.

One flat YAML file holds model, data, ``TrainingArguments`` and ``StrategyArguments`` keys
(as LLaMA-Factory users write them); ``--key value`` on the command line overrides it. Bad
input exits with code 2 and one message, before anything is written.
"""

from __future__ import annotations

import difflib
import json
import os
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
        metadata={"help": "Write into an output_dir that already holds files (nothing is deleted)."},
    )
    metric: str = field(
        default="accuracy", metadata={"help": "Evaluation metric for seq_cls, a module shipped with the package."}
    )


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
    "overwrite_output_dir": True,
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
    "overwrite_output_dir": True,
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
        raise CliError(f"config file {path!r} does not exist.")
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            raise CliError(f"config file {path!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise CliError(f"config file {path!r} must hold a mapping of keys to values, not a {type(data).__name__}.")
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
    keys = []
    for token in remaining:
        if not token.startswith("--"):
            raise CliError(f"unexpected value {token!r} on the command line (values follow a --key).")
        keys.append(token[2:].split("=", 1)[0].replace("-", "_"))
    return keys


def parse_config(config: dict[str, Any], overrides: Sequence[str] = ()) -> tuple[Any, ...]:
    """Parse a flat config dict plus command-line overrides into the argument dataclasses.

    Returns ``(model_args, data_args, training_args, strategy_args, run_args)``.
    """
    parser = _Parser()
    unknown = [key for key in config if key not in set(known_keys())]
    if unknown:
        raise _unknown_key_error(unknown)
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
        raise CliError(str(exc)) from None
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
    training_args.resume_from_checkpoint = _resolve_resume(training_args)
    return model_args, data_args, training_args, strategy_args, run_args


def _resolve_resume(training_args: TrainingArguments) -> Optional[str]:
    """``resume_from_checkpoint``: a checkpoint directory, or true for the last one in output_dir."""
    from transformers.trainer_utils import get_last_checkpoint

    value = training_args.resume_from_checkpoint
    text = str(value).strip().lower() if value is not None else None
    if value is None or value is False or text in ("false", "no", "0", ""):
        return None
    expected = "a checkpoint directory, or true for the last checkpoint in output_dir"
    if value is True or text in ("true", "yes", "1"):
        out = training_args.output_dir
        last = get_last_checkpoint(out) if out and os.path.isdir(out) else None
        if last is None:
            raise InvalidArgumentError("resume_from_checkpoint", value, expected, f"No checkpoint-* folder in {out!r}.")
        return last
    if not os.path.isdir(str(value)):
        raise InvalidArgumentError("resume_from_checkpoint", value, expected, "No such directory.")
    return str(value)


def _check_output_dir(training_args: TrainingArguments, run_args: RunArguments) -> None:
    out = training_args.output_dir
    if not out or not os.path.isdir(out) or not os.listdir(out):
        return
    if training_args.resume_from_checkpoint or run_args.overwrite_output_dir:
        return
    raise CliError(
        f"output_dir={out!r} already holds files ({', '.join(sorted(os.listdir(out))[:5])}); nothing was written. "
        "Choose another output_dir, resume with --resume_from_checkpoint, or pass --overwrite_output_dir true "
        "to write into it."
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
    import math

    from transformers import DataCollatorWithPadding, default_data_collator

    from .data import detect_task, load_raw, prepare
    from .sft import build_sft_trainer, load_sft_data, looks_like_sft, require_trl
    from .trainer import StrategyTrainer

    import datasets

    model_args, data_args, training_args, strategy_args, run_args = parse_config(config, overrides)
    _check_output_dir(training_args, run_args)
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
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
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


def _positive(option: str, value: Any) -> int:
    try:
        number = int(str(value))
    except ValueError:
        number = 0
    if isinstance(value, bool) or str(number) != str(value).strip() or number < 1:
        raise InvalidArgumentError(option, value, "a positive integer")
    return number


def _check_step_shape(training_args: TrainingArguments, data_args: DataArguments) -> None:
    """The batch shape the estimate simulates: positive integers, named by their keys."""
    for option, value in (
        ("per_device_train_batch_size", training_args.per_device_train_batch_size),
        ("gradient_accumulation_steps", training_args.gradient_accumulation_steps),
        ("max_seq_length", data_args.max_seq_length),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(option, value, "a positive integer")


def run_plan(
    config: dict[str, Any], overrides: Sequence[str] = (), plot: Optional[str] = None,
    options: Optional[PlanOptions] = None,
) -> Any:
    """Print the plan, the static memory estimate and the step's peak, with no weights loaded (meta device).

    With ``options.json`` one JSON object (``plan``, ``static_memory``, ``memory``, ``fit``) is printed
    instead; with ``options.fit`` the settings that fit that many bytes are searched.
    """
    from .memory import estimate_memory, estimate_training_memory
    from .plan import build_plan
    from .strategies.precision import resolve_training_arguments

    options = options or PlanOptions(plot=plot)
    model_args, data_args, training_args, strategy_args, run_args = parse_config(config, overrides)
    _check_step_shape(training_args, data_args)
    model_config = load_model_config(model_args)
    task = _task_from_config(model_config) if model_args.task == "auto" else model_args.task
    model = build_model(model_args, model_config, task, meta=True)
    # As `train` would: precision resolved for this machine (and by any installed probe plugin).
    training_args = resolve_training_arguments(training_args, strategy_args, model=model)
    plan = build_plan(model, strategy_args, training_args)
    estimate = estimate_memory(plan, str(getattr(training_args.optim, "value", training_args.optim)))
    memory = estimate_training_memory(
        model, strategy_args, training_args, seq_len=data_args.max_seq_length, world_size=options.world_size
    )
    fit = None
    if options.fit is not None:
        from .fit import fit_search

        fit = fit_search(
            model, strategy_args, training_args, options.fit, seq_len=data_args.max_seq_length,
            world_size=options.world_size, optimizers=options.fit_optimizers,
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
        from .report import plot_plan

        plot_plan(plan, options.plot, base_lr=training_args.learning_rate)
        if not options.json:
            print(f"plot written to {options.plot}")
    return plan


def run_plugins() -> list[dict[str, object]]:
    """Print the installed and active plugins with their hooks."""
    from .plugins import describe_plugins, get_plugin_manager

    rows = describe_plugins(get_plugin_manager())
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
            options.world_size = _positive("--world_size", value)
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
            config = dict(DEMO_SFT_CONFIG if _demo_task(overrides) == SFT else DEMO_CONFIG)
        if command == "train":
            run_train(config, overrides)
        else:
            run_plan(config, overrides, options=plan_options)
        return 0
    except StrategyError as exc:
        print(f"hf-llama-strategies: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
