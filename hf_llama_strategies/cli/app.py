"""The ``hf-llama-strategies`` command: ``train``, ``plan``, ``compare``, ``chat``, ``export`` and ``plugins``; bad
input is one line and exit code 2."""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any, Optional, Sequence

from ..core.faults import machine_fault
from ..data.local import SFT
from ..errors import EXIT_STORAGE, CliError, StorageError, StrategyError, TrainingStopped
from .chat import run_chat
from .compare import CompareOptions, run_compare, split_compare_options
from .config import ArgumentsParser, load_config_file, one_line
from .demo import CONFIGS_DIR, DEMO_CONFIG, DEMO_SFT_CONFIG, demo_config, demo_task
from .llamafactory import (
    is_llamafactory_config,
    leave_idle_deepspeed_out,
    render_translation,
    translate_llamafactory,
)
from .plan import PlanOptions, run_plan, split_plan_options
from .train import run_train


def run_plugins() -> list[dict[str, object]]:
    """Print the installed and active plugins with their hooks."""
    from ..core.plugins import describe_plugins, get_plugin_manager

    rows = describe_plugins(get_plugin_manager(strict=False))
    width = max(len(str(r["name"])) for r in rows)
    for row in rows:
        print(f"{str(row['name']).ljust(width)}  {row['source']}")
        print(f"{' ' * width}  hooks: {', '.join(row['hooks']) or '-'}")
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
  compare CONFIG.yaml [--candidates YAML] [--budget 10m | --max_steps N] [--device_memory 80GiB]
          [--plot PNG] [--json] [--lr_grid 1e-4,3e-4] [--eval_points 4] [--keep_runs]
          [--share_prefix false] [--key value ...]
                                          train candidate strategies (default: head only, last 2, last 25%,
                                          last 50%, full, layer-wise LR decay, LISA) on the same data and
                                          budget; a table, a plot, a recommendation (docs/compare.md)
  chat MODEL [--prompt TEXT | --prompts FILE] [--system TEXT] [--max_new_tokens N] [--compare BASE]
                                          greedy answers of a model folder or .gguf file through its
                                          chat template (no --prompt: type prompts, an empty line ends);
                                          --compare prints BASE's answer beside each one
  export CONFIG.yaml [--key value ...]   merge LoRA adapter(s) into their base model and save it (a
                                          LLaMA-Factory merge YAML, or model_name_or_path,
                                          adapter_name_or_path and export_dir)
  plugins                                 list installed and active plugins with their hooks

`hf-llama-strategies train --help` lists every key a config file or the command line may set.
"""
_COMMANDS = ("train", "plan", "compare", "chat", "export", "plugins")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``hf-llama-strategies``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, end="")
        return 0 if argv else 2
    try:
        _run(argv[0], argv[1:])
        return 0
    except StrategyError as exc:
        print(f"hf-llama-strategies: error: {one_line(str(exc))}", file=sys.stderr)
        return 2
    except TrainingStopped as stopped:
        print(f"hf-llama-strategies: {stopped_line(stopped)}", file=sys.stderr)
        return int(stopped.code)
    except KeyboardInterrupt:
        print("hf-llama-strategies: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        fault = machine_fault(exc)
        if fault is not None:
            # The machine's, not ours nor the user's input: one line, its own exit code.
            filename = getattr(exc, "filename", None)
            where = str(exc) if isinstance(exc, StorageError) else (
                f"{argv[0]} failed: {fault[0]}" + (f" ({filename})" if filename else ""))
            print(f"hf-llama-strategies: error: {one_line(where)}", file=sys.stderr)
            return EXIT_STORAGE
        # Bad input is refused above with one line; anything else is ours to fix.
        import traceback

        traceback.print_exc()
        print(
            "hf-llama-strategies: internal error: this is a bug in hf-llama-strategies (or a library it calls), "
            "not a problem with your input; please report it with the traceback above.",
            file=sys.stderr,
        )
        return 1


def _run(command: str, rest: list[str]) -> None:
    if command not in _COMMANDS:
        close = difflib.get_close_matches(command, _COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise CliError(f"unknown command {command!r}{hint} Commands: {', '.join(_COMMANDS)}.")
    if command == "plugins":
        if rest:
            raise CliError(f"plugins takes no arguments, got {' '.join(rest)!r}.")
        run_plugins()
        return
    if command == "chat":
        if "-h" in rest or "--help" in rest:
            print(_USAGE, end="")
            return
        run_chat(rest)
        return
    if "-h" in rest or "--help" in rest:
        print(_USAGE)
        ArgumentsParser().print_help()
        return
    if command == "export":
        _export(rest)
        return
    # The config file is the first word that is not a --key or its value.
    config_path = rest[0] if rest and not rest[0].startswith("-") else None
    overrides = rest[1:] if config_path is not None else rest
    plan_options = PlanOptions()
    compare_options = CompareOptions()
    if command == "plan":
        plan_options, overrides = split_plan_options(overrides)
        if config_path is None:
            raise CliError(f"plan needs a config file, e.g. {os.path.join(CONFIGS_DIR, 'llama3-8b.yaml')}")
    if command == "compare":
        compare_options, overrides = split_compare_options(overrides)
        if config_path is None:
            raise CliError("compare needs a config file (model, data with an eval split, training keys); "
                           "see docs/compare.md")
    # `plan --json` and `compare --json` print JSON alone.
    config = _config(config_path, overrides, echo=not (plan_options.json or compare_options.json))
    if command == "train":
        run_train(config, overrides, config_file=config_path)
    elif command == "compare":
        run_compare(config, overrides, compare_options)
    else:
        run_plan(config, overrides, options=plan_options)


def _export(rest: list[str]) -> None:
    from .export import run_export

    if not rest or rest[0].startswith("-"):
        raise CliError("export needs a config file (LLaMA-Factory's examples/merge_lora/*.yaml, or model_name_or_path, "
                       "adapter_name_or_path and export_dir)")
    out = run_export(load_config_file(rest[0]), rest[1:])
    print(f"hf-llama-strategies: merged model and tokenizer saved in {out}")


def _config(path: Optional[str], overrides: list[str], echo: bool) -> dict[str, Any]:
    """The config file (a LLaMA-Factory one translated, and shown when ``echo``), or a bundled demo's."""
    if path is None:
        return demo_config(DEMO_SFT_CONFIG if demo_task(overrides) == SFT else DEMO_CONFIG, overrides)
    config = load_config_file(path)
    if not is_llamafactory_config(config):
        return config
    notes: list[str] = []
    native = leave_idle_deepspeed_out(translate_llamafactory(config, os.path.dirname(os.path.abspath(path)), notes),
                                      notes)
    if echo:
        print(render_translation(native, notes))
    return native


def stopped_line(stopped: TrainingStopped) -> str:
    """``stopped by SIGTERM at step 4; checkpoint-4 saved; resume with `--resume_from_checkpoint true```."""
    if stopped.step == 0 and stopped.checkpoint is None:
        return f"stopped by {stopped.signal_name} before training began; nothing of this run was kept"
    saved = f"{os.path.basename(stopped.checkpoint)} saved" if stopped.checkpoint else "no checkpoint could be saved"
    return (f"stopped by {stopped.signal_name} at step {stopped.step}; {saved}; resume with "
            "`--resume_from_checkpoint true`")
