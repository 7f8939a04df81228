"""``hf-llama-strategies plan``: the plan, the static memory estimate and the step's peak, with no weights loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from ..core.options import check_positive_int
from ..errors import CliError
from .config import parse_config
from .models import build_model, load_model_config, task_from_config


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
    from ..context import RunContext
    from ..memory.dry_run import estimate_training_memory
    from ..memory.static import estimate_memory
    from ..planner import build_plan

    options = options or PlanOptions(plot=plot)
    # parse_config has refused a batch size, accumulation or max_seq_length below 1 (cli/config.py).
    model_args, data_args, training_args, strategy_args, run_args = parse_config(config, overrides)
    model_config = load_model_config(model_args)
    task = task_from_config(model_config) if model_args.task == "auto" else model_args.task
    model = build_model(model_args, model_config, task, meta=True)
    if model_args.use_peft:
        from ..training.peft import meta_peft_model

        model = meta_peft_model(model, model_args, "SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM")
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
        from ..memory.fit import fit_search

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
        from ..core.plan_plot import plot_plan

        plot_plan(plan, options.plot, base_lr=training_args.learning_rate)
        if not options.json:
            print(f"plot written to {options.plot}")
    return plan


def split_plan_options(overrides: list[str]) -> tuple[PlanOptions, list[str]]:
    """Take ``plan``'s own options out of the ``--key value`` overrides."""
    from ..memory.fit import parse_size

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
