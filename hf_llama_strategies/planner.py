"""The planner: ``build_plan`` asks every plugin, in order, to decide the parameters of a model.

::

    hfls_model_anatomy(model)                  # where the layers, embeddings, norm and head are
    StrategyPlan.from_model(...)               # every parameter trains, as loaded
    hfls_plan_parameters(plan, ..., context)   # each strategy writes its decisions
    hfls_adjust_plan(plan, ..., context)       # cross-cutting policies; precision's dtypes
    hfls_validate_plan(plan, ..., model, context)

The options themselves were checked when the :class:`StrategyArguments` were built (and by
every plugin when the :class:`~hf_llama_strategies.context.RunContext` was).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

from torch import nn
from transformers.utils import logging

from .arguments import StrategyArguments
from .context import RunContext
from .core.anatomy import ModelAnatomy
from .core.decisions import trains
from .core.hardware import HardwareProbe
from .core.plan import StrategyPlan
from .core.plugins import PluginManager
from .errors import PlanError

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)


def build_plan(
    model: nn.Module,
    strategy_args: Optional[StrategyArguments] = None,
    training_args: Optional["TrainingArguments"] = None,
    plugins: Iterable[object] = (),
    plugin_manager: Optional[PluginManager] = None,
    *,
    context: Optional[RunContext] = None,
    probe: Optional[HardwareProbe] = None,
) -> StrategyPlan:
    """Resolve every parameter of ``model`` under ``strategy_args``, without training.

    A model whose layers no plugin can find (an ``nn.Sequential``, a regression model) gets
    a plan where every parameter is ``other``: regex options and precision apply to it, an
    option that names layers, embeddings, norm or head is refused. A plan where nothing
    trains is returned with a note; :func:`check_something_trains` refuses it when training
    starts (evaluation and prediction need nothing to train).

    Args:
        model: any ``nn.Module``: a ``PreTrainedModel``, a PEFT model, anything a ``Trainer`` takes.
        strategy_args: the strategy; default: full fine-tuning.
        training_args: the ``TrainingArguments`` the plan will train with, for strategies
            that depend on them (learning rate, precision).
        plugins: extra plugin objects, beside built-in and installed ones.
        plugin_manager: a ready manager (then ``plugins`` is ignored).
        context: the run's context (``StrategyTrainer``, ``StrategyCallback``); then the
            arguments above are the context's. Without one, one is built for this call:
            the precision decision describes what ``resolve_training_arguments`` would do here.
        probe: the hardware to plan for, standing in for the ``hfls_hardware_probe`` hook
            (a plan for another machine: pass the probe given to ``resolve_training_arguments``).

    Raises:
        UnknownArchitectureError: an option needs the model's layers or blocks, and no plugin
            could find them.
        PlanError: the options cannot apply to this model.
    """
    if context is None:
        context = RunContext.create(
            strategy_args, training_args, model=model, plugins=plugins, plugin_manager=plugin_manager, probe=probe
        )
    pm, strategy_args, training_args = context.plugin_manager, context.strategy_args, context.training_args
    anatomy = pm.hook.hfls_model_anatomy(model=model)
    if anatomy is None:
        # Each option that needs the blocks refuses this (ModelAnatomy.require); the others apply.
        anatomy = ModelAnatomy.without_layers(model)
    plan = StrategyPlan.from_model(model, anatomy, strategy_args)
    if training_args is not None:
        # What a resumed run must share with the interrupted one beyond the per-parameter
        # decisions: the base rate (default-rate parameters store none) and the data-order seed.
        plan.settings["training"] = {
            "learning_rate": float(training_args.learning_rate),
            "seed": int(training_args.seed),
            "decides": ["learning_rate", "seed"],
        }
    hook_kwargs = dict(plan=plan, anatomy=anatomy, **context.hook_kwargs())
    pm.hook.hfls_plan_parameters(**hook_kwargs)
    pm.hook.hfls_adjust_plan(**hook_kwargs)
    problem = plan.bad_number()
    if problem:  # a plugin's guard names it; this catches the rest (a decision edited by hand)
        raise PlanError(f"The plan holds a value no run survives: {problem}.")
    pm.hook.hfls_validate_plan(**hook_kwargs, model=model)
    if plan.num_trainable == 0:
        # Not logged as a warning: training raises this same message, and a refused CLI run prints one line.
        plan.notes.append(_nothing_trains(plan) + " Fine for evaluation and prediction; training refuses it.")
        logger.info(plan.notes[-1])
    if plan.is_dynamic and not plan.active_names(0, pm):
        first = min(d.active_from for d in plan if d.trainable)
        raise PlanError(
            f"Nothing would train at step 0: every trainable parameter waits for its schedule (the first starts at "
            f"step {first}). Train something from the start, e.g. train_head: true or train_norm: true."
        )
    return plan


def _nothing_trains(plan: StrategyPlan) -> str:
    args = plan.strategy_args
    return (
        "Nothing would train: every parameter is frozen. Check trainable_layers="
        f"{args.get('trainable_layers')!r}, trainable_modules={args.get('trainable_modules')!r}, "
        f"train_head={args.get('train_head')!r} and frozen_params={args.get('frozen_params')!r}, and the "
        "requires_grad of the model's parameters (frozen by hand or by PEFT)."
    )


def check_something_trains(plan: StrategyPlan, model: Optional[nn.Module] = None) -> None:
    """Refuse to train when no parameter would train (called when training starts).

    Args:
        plan: the plan applied to ``model``.
        model: the model, for the live ``requires_grad`` of parameters no option decided;
            without it the plan's ``trainable`` counts.

    Raises:
        PlanError: naming the options and ``requires_grad``.
    """
    if model is None:
        if plan.num_trainable:
            return
    else:
        for name, param in model.named_parameters():
            decision = plan.decisions.get(name)
            if param.requires_grad if decision is None else trains(decision, param):
                return
    raise PlanError(_nothing_trains(plan) + " Evaluation and prediction work; training needs a parameter to train.")
