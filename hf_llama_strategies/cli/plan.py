"""``hf-llama-strategies plan``: the plan, the static memory estimate and the step's peak, with no weights loaded."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence

from ..core.hardware import HardwareProbe
from ..core.options import check_positive_int
from ..core.units import format_bytes
from ..errors import CliError
from .config import parse_config
from .models import build_model, configure_for_task, load_model_config, plan_task


@dataclass
class PlanOptions:
    """Options of ``plan`` beside the config keys: ``--plot``, ``--json``, ``--fit``, ``--world_size``, ``--device``...

    ``fit`` is ``FIT_DEVICE_MEMORY`` for a bare ``--fit``: the budget is the device's memory.
    """

    plot: Optional[str] = None
    json: bool = False
    fit: Optional[int] = None
    world_size: Optional[int] = None
    fit_optimizers: tuple[str, ...] = ()
    device: Optional[str] = None
    device_memory: Optional[int] = None
    compute_capability: Optional[str] = None

    def probe(self) -> Optional[HardwareProbe]:
        """The hardware ``--device`` / ``--device_memory`` name; ``None``: this machine's, as ``train`` asks."""
        if self.device is not None:
            return HardwareProbe.for_device(self.device, self.device_memory, self.compute_capability)
        if self.compute_capability is not None:
            raise CliError("--compute_capability needs --device cuda (or name the GPU: --device h100).")
        if self.device_memory is not None:
            return replace(HardwareProbe.detect(), memory_bytes=self.device_memory)
        return None


FIT_DEVICE_MEMORY = -1


def run_plan(
    config: dict[str, Any], overrides: Sequence[str] = (), plot: Optional[str] = None,
    options: Optional[PlanOptions] = None,
) -> Any:
    """Print the plan, the static memory estimate and the step's peak, with no weights loaded (meta device).

    With ``options.json`` one JSON object (``plan``, ``hardware``, ``static_memory``, ``memory``, ``fit``) is
    printed instead; with ``options.fit`` the settings that fit that many bytes are searched; with
    ``options.device`` precision, memory and the fit are planned for that hardware, not this machine's.
    """
    from ..memory.dry_run import estimate_training_memory
    from ..memory.static import estimate_memory

    options = options or PlanOptions(plot=plot)
    # parse_config has refused a batch size, accumulation or max_seq_length below 1 (cli/config.py).
    probe = options.probe()
    if probe is not None and probe.device_type != "cpu" and not _has_gpu():
        # TrainingArguments refuses bf16/fp16 on a machine without a GPU; these are the named GPU's, not this one's.
        overrides = [*overrides, "--use_cpu", "true"]
    model_args, data_args, training_args, strategy_args, run_args = parse_config(config, overrides)
    model, context, plan = _model_and_plan(model_args, data_args, training_args, strategy_args, probe)
    training_args = context.training_args
    hardware = context.hardware or context.plugin_manager.hook.hfls_hardware_probe(training_args=training_args)
    estimate = estimate_memory(plan, str(getattr(training_args.optim, "value", training_args.optim)))
    memory = estimate_training_memory(
        model, strategy_args, training_args, seq_len=data_args.max_seq_length, world_size=options.world_size,
        context=context,
    )
    fit = _fit(model, strategy_args, training_args, data_args, options, context, hardware)
    _print(plan, hardware, estimate, memory, fit, options)
    if options.plot:
        from ..core.plan_plot import plot_plan

        plot_plan(plan, options.plot, base_lr=training_args.learning_rate)
        if not options.json:
            print(f"plot written to {options.plot}")
    return plan


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _model_and_plan(model_args: Any, data_args: Any, training_args: Any, strategy_args: Any,
                    probe: Optional[HardwareProbe]) -> tuple[Any, Any, Any]:
    """The model ``train`` would build (on the meta device), the run's context and its plan."""
    from ..context import RunContext
    from ..planner import build_plan

    model_config = load_model_config(model_args)
    # The model `train` would build: the task (and a classifier's classes) read from the data as `train` reads it.
    task, label_names = plan_task(model_args, data_args, model_config)
    configure_for_task(model_config, task, label_names)
    model = build_model(model_args, model_config, task, meta=True)
    if model_args.use_peft:
        from ..training.peft import meta_peft_model

        model = meta_peft_model(model, model_args, "SEQ_CLS" if task == "seq_cls" else "CAUSAL_LM")
    # As `train` would: precision resolved for the hardware (this machine's, or any installed probe plugin's,
    # or --device's).
    context = RunContext.create(strategy_args, training_args, model=model, probe=probe)
    if probe is None:
        context.resolve_training_arguments(in_place=False)
    # else: TrainingArguments for another machine's GPU cannot be built here (bf16 needs the GPU); the memory
    # estimate reads the precision decision, which was made for that GPU.
    return model, context, build_plan(model, context=context)


def _fit(model: Any, strategy_args: Any, training_args: Any, data_args: Any, options: PlanOptions, context: Any,
         hardware: HardwareProbe) -> Any:
    if options.fit is None:
        return None
    from ..memory.fit import fit_search

    budget = options.fit
    if budget == FIT_DEVICE_MEMORY:
        if hardware.memory_bytes is None:
            raise CliError(f"--fit needs a memory size (e.g. --fit 80GiB): the memory of {hardware.describe()} "
                           "is not known; or give --device h100 / --device_memory 80GiB.")
        budget = hardware.memory_bytes
    return fit_search(
        model, strategy_args, training_args, budget, seq_len=data_args.max_seq_length,
        world_size=options.world_size, optimizers=options.fit_optimizers, context=context,
    )


def _print(plan: Any, hardware: HardwareProbe, estimate: Any, memory: Any, fit: Any, options: PlanOptions) -> None:
    if options.json:
        print(json.dumps({
            "plan": plan.to_dict(), "hardware": {**asdict(hardware), "description": hardware.describe()},
            "static_memory": estimate.to_dict(), "memory": memory.to_dict(),
            "fit": None if fit is None else fit.to_dict(),
        }, indent=2))
        return
    print(plan.table())
    print(f"planned for: {hardware.describe()}" + ("" if options.device else " (this machine; --device h100 plans "
                                                   "for another)"))
    print(estimate.table())
    print(memory.table())
    if hardware.memory_bytes is not None:
        fits = "fits" if memory.peak_bytes <= hardware.memory_bytes else "does NOT fit"
        peak = format_bytes(memory.peak_bytes)
        print(f"device memory: {format_bytes(hardware.memory_bytes)}; the step's peak {peak} {fits} (per device)")
    if fit is not None:
        print(fit.report())


def split_plan_options(overrides: list[str]) -> tuple[PlanOptions, list[str]]:
    """Take ``plan``'s own options out of the ``--key value`` overrides."""
    from ..memory.fit import parse_size

    rest: list[str] = []
    options = PlanOptions()
    valued = {"plot": "a file name, e.g. --plot plan.png", "fit": "a memory size, e.g. --fit 80GiB",
              "world_size": "a number of ranks, e.g. --world_size 8",
              "fit_optimizers": "optim values, e.g. --fit_optimizers adafactor,sgd",
              "device": "a device, e.g. --device h100 or --device cuda --compute_capability 8.0",
              "device_memory": "a memory size, e.g. --device_memory 80GiB",
              "compute_capability": "MAJOR.MINOR, e.g. --compute_capability 8.0"}
    i = 0
    while i < len(overrides):
        token = overrides[i]
        i += 1
        name, eq, value = token.partition("=")
        key = name[2:].replace("-", "_") if name.startswith("--") else None
        if key == "json" and not eq:
            options.json = True
            continue
        if key not in valued:
            rest.append(token)
            continue
        if not eq:
            if i >= len(overrides) or overrides[i].startswith("--"):
                if key != "fit":
                    raise CliError(f"--{key} needs {valued[key]}")
                # A bare --fit: the budget is the device's memory (--device h100, --device_memory, this GPU).
                options.fit = FIT_DEVICE_MEMORY
                continue
            value = overrides[i]
            i += 1
        _set_plan_option(options, key, value, parse_size)
    if options.fit_optimizers and options.fit is None:
        raise CliError("--fit_optimizers needs --fit BUDGET (the optimizers are tried in the fit search).")
    return options, rest


def _set_plan_option(options: PlanOptions, key: str, value: str, parse_size: Any) -> None:
    if key == "plot":
        options.plot = value
    elif key == "fit":
        options.fit = parse_size(value, "--fit")
    elif key == "world_size":
        options.world_size = check_positive_int("--world_size", value, from_text=True)
    elif key == "device":
        options.device = value
    elif key == "device_memory":
        options.device_memory = parse_size(value, "--device_memory")
    elif key == "compute_capability":
        options.compute_capability = value
    else:
        options.fit_optimizers = tuple(v.strip() for v in value.split(",") if v.strip())
