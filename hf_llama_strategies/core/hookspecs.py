"""Hook specifications: the contract between the core and every strategy plugin.

Built-in strategies implement these hooks exactly as a third-party package does. A plugin
is any object or module with functions named like the hooks below and decorated with
:data:`hookimpl`; it is discovered from the ``hf_llama_strategies`` entry-point group, or
passed in code (``StrategyTrainer(..., strategy_plugins=[MyPlugin()])``).

When a run starts (``StrategyTrainer``, ``StrategyCallback``, ``build_plan``, the CLI), its
:class:`~hf_llama_strategies.context.RunContext` is built once and every plugin checks the
options it owns; then the plan is built::

    hfls_validate_arguments(strategy_args)              # every plugin, no model needed
    hfls_hardware_probe(training_args)                  # first non-None answer wins, when precision is asked
    hfls_model_anatomy(model)                           # first non-None answer wins
    hfls_plan_parameters(plan, anatomy, strategy_args, training_args, context)   # every plugin
    hfls_adjust_plan(plan, anatomy, strategy_args, training_args, context)       # every plugin
    hfls_validate_plan(plan, anatomy, strategy_args, training_args, model, context)  # every plugin

``strategy_args`` is the run's ``StrategyArguments`` (the built-in strategies' options are
checked by their own argument groups when it is built; ``hfls_validate_arguments`` is where a
third-party plugin checks its ``strategy_options``). ``context`` is the run's ``RunContext``
(:class:`HookContext` lists what a plugin may read of it), as pytest hands ``config`` to its
hooks. An implementation names only the arguments it uses (pluggy passes those), so a plugin
written before ``context`` existed keeps working.

During training, at every optimizer-step boundary, for each schedule the plan defines::

    hfls_active_parameters(plan, schedule, global_step)  # first non-None answer wins

A plugin that implements ``hfls_plan_parameters`` adds a strategy; ``hfls_model_anatomy``
teaches an architecture; ``hfls_hardware_probe`` describes an accelerator; ``hfls_adjust_plan``
has the last word on any decision; ``hfls_active_parameters`` drives a dynamic schedule (LISA)
that it wrote into the plan; ``hfls_on_train_begin`` changes how the model runs (module hooks,
checkpointing) without changing the plan. It is called in every ``Trainer.train()`` call::

    hfls_on_train_begin(model, plan, training_args, train_dataloader, context)   # every plugin, before the first step

Order: pluggy calls the implementations of a hook from the last registered plugin to the
first: plugins passed in code (registered last) before installed ones, installed ones before
the built-in strategies. Use ``@hookimpl(tryfirst=True)`` / ``trylast=True`` to order a plugin
among the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Protocol

import pluggy

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    from transformers import TrainingArguments

    from .anatomy import ModelAnatomy
    from .distributed import DistributedSettings
    from .hardware import HardwareProbe
    from .options import OptionGroup
    from .plan import StrategyPlan
    from .precision import PrecisionDecision

PROJECT_NAME = "hf_llama_strategies"
ENTRY_POINT_GROUP = "hf_llama_strategies"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


class HookContext(Protocol):
    """What a hook may read of the run's context (``hf_llama_strategies.RunContext`` provides it).

    Attributes:
        plugin_manager: the run's plugin manager (the only one of the run).
        strategy_args: the run's ``StrategyArguments``.
        training_args: the ``TrainingArguments`` the run trains with (``None``: a dry run without them).
        precision: the precision decision; ``None`` when no precision option is set.
        distributed: the run's DDP / FSDP / DeepSpeed settings.
        hardware: the device the precision decision was made for, once one was asked for.
        reports: where a plugin publishes what it did during training, by name, for the caller
            that runs it (the frozen-prefix cache puts its cache, with its counters, there).
    """

    plugin_manager: pluggy.PluginManager
    strategy_args: "OptionGroup"
    training_args: Optional["TrainingArguments"]
    precision: Optional["PrecisionDecision"]
    distributed: "DistributedSettings"
    hardware: Optional["HardwareProbe"]
    reports: dict[str, Any]


@hookspec
def hfls_validate_arguments(strategy_args: "OptionGroup") -> None:
    """Check the options this plugin owns, before any model is seen (once per run, and when the CLI parses).

    Raise :class:`~hf_llama_strategies.errors.InvalidArgumentError` naming the option, the
    bad value and what would be valid. Options of third-party strategies live in
    ``strategy_args.strategy_options`` (a dict), under a key of the plugin's choosing.
    """


@hookspec(firstresult=True)
def hfls_model_anatomy(model: "torch.nn.Module") -> Optional["ModelAnatomy"]:
    """Describe ``model``'s embeddings, decoder layers, final norm and head.

    Return ``None`` to let the next plugin (and finally the built-in structural finder)
    answer. The first non-``None`` answer is used. A plugin that teaches a new
    architecture returns a :class:`~hf_llama_strategies.core.anatomy.ModelAnatomy`, usually
    built with :meth:`ModelAnatomy.from_paths`.
    """


@hookspec
def hfls_plan_parameters(
    plan: "StrategyPlan",
    anatomy: "ModelAnatomy",
    strategy_args: "OptionGroup",
    training_args: Optional["TrainingArguments"],
    context: HookContext,
) -> None:
    """Write this strategy's decisions into ``plan`` (trainable, lr, weight decay, dtype...).

    Every plugin's implementation runs; later implementations see what earlier ones
    decided. Record why through :meth:`StrategyPlan.set`'s ``reason`` so that the plan
    table and ``strategy_plan.json`` can explain every decision.
    """


@hookspec
def hfls_adjust_plan(
    plan: "StrategyPlan",
    anatomy: "ModelAnatomy",
    strategy_args: "OptionGroup",
    training_args: Optional["TrainingArguments"],
    context: HookContext,
) -> None:
    """Change the plan after every strategy has written into it.

    For policies that cut across strategies (for example "never train biases").
    """


@hookspec
def hfls_validate_plan(
    plan: "StrategyPlan",
    anatomy: "ModelAnatomy",
    strategy_args: "OptionGroup",
    training_args: Optional["TrainingArguments"],
    model: Optional["torch.nn.Module"],
    context: HookContext,
) -> None:
    """Refuse a finished plan that cannot train correctly, with a :class:`PlanError`.

    ``model`` is the model the plan was built for (its config, its modules), not yet changed by
    the plan; ``None`` when a caller plans without one.
    """


@hookspec(firstresult=True)
def hfls_hardware_probe(training_args: Optional["TrainingArguments"]) -> Optional["HardwareProbe"]:
    """Describe the device that ``training_args`` will train on (type, name, bf16 and TF32 support).

    Return ``None`` to let the next plugin (and finally the built-in probe, which asks
    torch) answer. Asked once per run context, when a precision option is set (by
    ``StrategyTrainer``, ``StrategyCallback``, ``build_plan`` and ``resolve_training_arguments``),
    to map ``precision`` onto the hardware; a plugin can teach a new accelerator, or a test can stand in for hardware it
    does not have.
    """


@hookspec(firstresult=True)
def hfls_active_parameters(plan: "StrategyPlan", schedule: str, global_step: int) -> Optional["Iterable[str]"]:
    """Which parameters of ``schedule`` train at optimizer step ``global_step`` (0-based).

    A plugin that writes a dynamic schedule into a plan, in ``hfls_plan_parameters``,
    stores its spec as ``plan.schedules[schedule]`` (a JSON-serialisable dict) and marks
    the parameters it governs with ``ParamDecision.schedule = schedule``. At every
    optimizer-step boundary the runtime asks, for each schedule of the plan, which of its
    parameters train; the plugin that owns ``schedule`` answers with their names (a subset
    of the parameters it governs), every other plugin returns ``None``.

    The answer must be a pure function of ``plan`` (its JSON form: the plan may have been
    loaded from ``strategy_plan.json``) and ``global_step``: no state, no global RNG.
    Random draws come from a generator seeded from the spec (for example its seed and
    the interval index), so a resumed run and every DDP rank agree without
    communicating. Parameters without a schedule train from ``ParamDecision.active_from``
    on, with no hook involved.
    """


@hookspec
def hfls_on_train_begin(
    model: "torch.nn.Module",
    plan: "StrategyPlan",
    training_args: Optional["TrainingArguments"],
    train_dataloader: Optional["torch.utils.data.DataLoader"],
    context: HookContext,
) -> None:
    """Prepare ``model`` for the training loop, right before its first step.

    Called from the callback's ``on_train_begin`` in every ``Trainer.train()`` call, with the
    unwrapped model the plan was applied to. By then the Trainer has enabled activation
    checkpointing (``activation_checkpointing_enable``), built the optimizer and wrapped the
    model for DDP/FSDP; no forward pass has run. For changes to how the model runs (module
    hooks, checkpointing functions) that leave ``requires_grad``, parameters and optimizer
    groups alone: those are the plan's, applied before the optimizer existed.

    ``train_dataloader`` is the loader the Trainer will iterate (``None`` for a caller without
    one): its ``dataset`` and ``collate_fn`` give what every step will feed the model (the
    frozen-prefix cache's pre-pass reads them). A plugin must not iterate the loader itself:
    starting an iterator draws from the global RNG and would change the data order.
    """
