"""``StrategyCallback``: the plan applied to an unmodified ``Trainer``.

A callback can freeze and cast parameters to their planned dtypes (before the optimizer
and any DDP wrapper exist, in ``on_init_end``), print and save the plan, and keep it in
every checkpoint. A callback cannot build the optimizer;
:meth:`StrategyCallback.optimizer_cls_and_kwargs` gives the Trainer the plan's groups
through ``Trainer(optimizer_cls_and_kwargs=...)`` (its optimizer-factory form), and the
callback refuses to train when the plan's groups did not reach the optimizer.

Nor can it change ``TrainingArguments``: by ``on_init_end`` the Trainer has set up
accelerate (autocast, loss scaling) from ``fp16``/``bf16``. So ``precision: auto`` follows
those flags as they are, and an explicit ``precision`` that they do not already say is
refused (the run context decides with ``fixed=True``, see
:class:`~hf_llama_strategies.context.RunContext`); pass the arguments through
:func:`~hf_llama_strategies.resolve_training_arguments` before building the Trainer to let
``auto`` choose.

It also moves dynamic schedules at step boundaries and checks a resumed run's plan. Resume
check: a callback does not see ``resume_from_checkpoint``. When training begins at
``global_step > 0`` (a resumed run) it checks ``output_dir/checkpoint-<global_step>``, the
checkpoint ``resume_from_checkpoint=True`` picks; ``StrategyTrainer`` checks the exact
checkpoint passed, before any weight is loaded.
"""

from __future__ import annotations

import functools
import logging as std_logging
import os
import sys
from typing import Any, Callable, Iterable, Optional

import pluggy
import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from ..arguments import StrategyArguments
from ..context import RunContext
from ..core.decisions import DEFAULT_GROUP
from ..core.distributed import check_distributed
from ..core.faults import writing
from ..core.plan import StrategyPlan
from ..core.plugins import plugin_manager_for
from ..errors import PlanError
from ..planner import build_plan, check_something_trains
from .optimizer import (
    NO_DECAY_SUFFIX,
    OptimizerClsAndKwargs,
    base_learning_rate,
    build_optimizer,
    group_learning_rates,
    settle_requires_grad,
)
from .resume import check_resumed_plan
from .schedule_runner import ScheduleRunner

logger = logging.get_logger(__name__)


class _StandardOutput(std_logging.Handler):
    """Writes records to the ``sys.stdout`` of the moment (a redirected or captured one too)."""

    def emit(self, record: std_logging.LogRecord) -> None:
        sys.stdout.write(self.format(record) + "\n")


#: Where the plan table goes at the start of training: standard output, beside the Trainer's progress and
#: metrics lines (as the Trainer's own PrinterCallback writes them). An application routes it elsewhere by
#: configuring this logger (its handlers, ``propagate``); ``print_plan: false`` turns it off.
plan_report = logging.get_logger("hf_llama_strategies.plan_table")
if not plan_report.handlers:
    plan_report.addHandler(_StandardOutput())
    plan_report.setLevel(std_logging.INFO)
    plan_report.propagate = False


class StrategyCallback(TrainerCallback):
    """Apply a strategy to any ``Trainer`` (or subclass) without subclassing it.

    Example::

        trainer = Trainer(model=model, args=training_args, train_dataset=ds,
                          callbacks=[StrategyCallback(StrategyArguments(trainable_layers="-2:"))])

    With per-parameter learning rates, also hand the Trainer the plan's optimizer::

        callback = StrategyCallback(StrategyArguments(head_lr=5e-5))
        trainer = Trainer(model=model, args=training_args, train_dataset=ds, callbacks=[callback],
                          optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs())

    Args:
        strategy_args: the strategy; default: full fine-tuning.
        plugins: extra plugin objects, beside built-in and installed ones.
        context: the run's context, when the caller has one (``StrategyTrainer``); by default the
            callback builds it when the Trainer hands it the model (``on_init_end``), taking
            the Trainer's ``TrainingArguments`` as they are.
    """

    def __init__(
        self,
        strategy_args: Optional[StrategyArguments] = None,
        plugins: Iterable[object] = (),
        *,
        context: Optional[RunContext] = None,
    ) -> None:
        self.strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
        self.plugins = tuple(plugins)
        #: The run's context (plugin manager, precision decision, distributed setup), once known.
        self.context = context
        self._plugin_manager: Optional[pluggy.PluginManager] = None
        self.plan: Optional[StrategyPlan] = None
        self.runner: Optional[ScheduleRunner] = None
        #: The checkpoint a resumed run starts from, when known (StrategyTrainer sets it).
        self.resume_checkpoint: Optional[str] = None
        self._prepared_model: Optional[nn.Module] = None
        self._prepared_args: Optional[TrainingArguments] = None
        self._training_args: Optional[TrainingArguments] = None
        # Rates of the last optimizer step, read before the scheduler moves them.
        self._step_lrs: dict[str, float] = {}
        self._step_base_lr: Optional[float] = None
        self._checked: Optional[tuple[str, int]] = None
        #: How the plan differs from the resumed checkpoint's (allow_plan_change_on_resume), else None.
        self.plan_change_on_resume: Any = None

    def check_resume(self, checkpoint: str) -> None:
        """Compare the plan with the one saved in ``checkpoint`` (once per checkpoint and plan).

        Raises:
            PlanError: they differ and ``allow_plan_change_on_resume`` is not set.
        """
        assert self.plan is not None
        if self._checked != (checkpoint, id(self.plan)):
            self.plan_change_on_resume = check_resumed_plan(
                self.plan, checkpoint, self.strategy_args.allow_plan_change_on_resume, self._prepared_args
            )
            self._checked = (checkpoint, id(self.plan))

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The plugin manager of this run: built-in, installed and ``plugins`` (see ``RunContext.create``)."""
        if self.context is not None:
            return self.context.plugin_manager
        if self._plugin_manager is None:
            self._plugin_manager = plugin_manager_for(self.plugins, bool(self.strategy_args.options_set()))
        return self._plugin_manager

    def prepare(self, model: nn.Module, training_args: Optional[TrainingArguments] = None) -> StrategyPlan:
        """Build the plan for ``model`` (once); set its parameters' ``requires_grad`` and dtype.

        ``training_args`` are taken as final: checked against the precision options (an
        explicit ``precision`` they contradict is refused), never changed; the run context
        is built on the first call (unless given). Every parameter
        that may ever train requires grad afterwards (what the optimizer and a DDP reducer
        must see); schedules take over when training begins.
        """
        # A plan holds rates and a seed resolved from the TrainingArguments: another model,
        # or the same callback reused with other arguments, gets a plan of its own.
        if self._prepared_model is not model or (
            training_args is not None and training_args is not self._prepared_args
        ):
            self._prepared_args = training_args
            if self.context is None:
                self.context = RunContext.create(
                    self.strategy_args, training_args, model=model, plugin_manager=self.plugin_manager, fixed=True
                )
            else:
                self.context.use_training_arguments(training_args, model=model)
            self.plan = build_plan(model, context=self.context)
            self.runner = ScheduleRunner(self.plan, self.context.plugin_manager)
            self._prepared_model = model
        assert self.plan is not None
        self.plan.apply(model)
        return self.plan

    def is_prepared(self, model: nn.Module) -> bool:
        """Whether the current plan was built for ``model`` (this very object)."""
        return self.plan is not None and self._prepared_model is model

    # -- the optimizer, for an unmodified Trainer --------------------------------------------

    def optimizer_cls_and_kwargs(
        self,
        training_args: Optional[TrainingArguments] = None,
        optimizer_cls_and_kwargs: Optional[OptimizerClsAndKwargs] = None,
    ) -> tuple[Callable[[], Callable[..., torch.optim.Optimizer]], dict[str, Any]]:
        """``Trainer(optimizer_cls_and_kwargs=...)`` value that builds the plan's optimizer.

        transformers 5 accepts an optimizer factory there: a callable that the Trainer
        calls with no argument, then calls the result with the model. Ours builds the same
        groups as ``StrategyTrainer.create_optimizer``, with the class and kwargs from
        ``optim=`` (``Trainer.get_optimizer_cls_and_kwargs``).

        Args:
            training_args: the Trainer's arguments; default: those the callback sees in
                ``on_init_end``.
            optimizer_cls_and_kwargs: your own ``(optimizer class, kwargs)``, which wins
                over ``optim=`` as it does in the Trainer.
        """

        def factory() -> Callable[..., torch.optim.Optimizer]:
            return functools.partial(
                self.create_optimizer, training_args=training_args, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs
            )

        return factory, {}

    def create_optimizer(
        self,
        model: nn.Module,
        training_args: Optional[TrainingArguments] = None,
        optimizer_cls_and_kwargs: Optional[OptimizerClsAndKwargs] = None,
    ) -> torch.optim.Optimizer:
        """The optimizer over the plan's groups for ``model`` (what the factory above calls).

        Raises:
            PlanError: the callback was not given to the Trainer (no plan), or ``optim=``
                lays out its own groups while the plan needs its own.
        """
        args = training_args if training_args is not None else self._training_args
        if self.plan is None or args is None:
            raise PlanError(
                "StrategyCallback.optimizer_cls_and_kwargs: the Trainer never ran this callback's on_init_end. Pass "
                "the same StrategyCallback in `callbacks=`."
            )
        check_something_trains(self.plan, model)
        settle_requires_grad(self.plan, model)
        return build_optimizer(model, self.plan, args, optimizer_cls_and_kwargs)

    # -- per-group learning rates -------------------------------------------------------------

    def learning_rate_logs(self) -> dict[str, float]:
        """``learning_rate/<group>`` of the last optimizer step, plus the scheduled base ``learning_rate``.

        Empty with the default layout (one group: nothing to add to the stock log).
        """
        if set(self._step_lrs) <= {DEFAULT_GROUP}:
            return {}
        logs = {f"learning_rate/{name}": lr for name, lr in self._step_lrs.items()}
        if self._step_base_lr is not None:
            logs["learning_rate"] = self._step_base_lr
        return logs

    def on_optimizer_step(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Optional[torch.optim.Optimizer] = None,
        **kwargs,
    ) -> None:
        # After optimizer.step and before lr_scheduler.step: the rates this step used, which
        # is also when the Trainer reads the `learning_rate` it logs.
        if optimizer is not None:
            self._step_lrs = group_learning_rates(optimizer)
            self._step_base_lr = base_learning_rate(optimizer, args.learning_rate)

    # -- events ------------------------------------------------------------------------------

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        self._training_args = args
        if model is not None:
            plan = self.prepare(model, args)
            assert self.context is not None
            check_distributed(plan, self.context.distributed, can_set=False)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        if model is not None and model is not self._prepared_model:
            raise PlanError(
                "StrategyCallback: the model being trained is not the one the plan was applied to (the Trainer "
                "re-created it with `model_init`, after the optimizer was built). Use StrategyTrainer, which "
                "applies the plan inside `call_model_init`."
            )
        assert self.plan is not None and self.runner is not None
        if model is not None:
            check_something_trains(self.plan, model)
        self._check_optimizer_groups(kwargs.get("optimizer"))
        if state.global_step > 0:
            checkpoint = self.resume_checkpoint or os.path.join(
                args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            )
            self.check_resume(checkpoint)
        if model is not None:
            self.plugin_manager.hook.hfls_on_train_begin(
                model=model, plan=self.plan, training_args=args, train_dataloader=kwargs.get("train_dataloader"),
                context=self.context,
            )
        if state.is_world_process_zero and self.strategy_args.print_plan:
            plan_report.info(self.plan.table())  # the notes are under it: each said once
        elif state.is_world_process_zero:
            for note in self.plan.notes:
                logger.warning(note)
        if args.should_save:
            with writing("saving strategy_plan.json", args.output_dir):
                self.plan.save(args.output_dir)
        # The optimizer (and its resumed state) exists now; the step about to run decides.
        self.runner.apply(model, state.global_step, kwargs.get("optimizer"))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        # Called once per optimizer step, before its first micro-batch: schedules move
        # at optimizer-step boundaries, also under gradient accumulation.
        if self.runner is not None and model is not None:
            self.runner.apply(model, state.global_step, kwargs.get("optimizer"))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        # Back to "every parameter that may train requires grad", the state a next
        # train() call (and its optimizer or DDP wrapper) must start from.
        self.resume_checkpoint = None
        self._checked = None
        self.plan_change_on_resume = None
        if self.plan is not None and model is not None and self.plan.is_dynamic:
            settle_requires_grad(self.plan, model, warn=False)

    def _check_optimizer_groups(self, optimizer: Optional[torch.optim.Optimizer]) -> None:
        assert self.plan is not None
        if optimizer is None or not self.plan.has_custom_groups:
            return
        found = {str(g.get("name", "")).removesuffix(NO_DECAY_SUFFIX) for g in optimizer.param_groups}
        missing = [name for name in self.plan.group_names() if name not in found]
        if missing:
            raise PlanError(
                f"The plan gives parameters their own optimizer groups {self.plan.group_names()} (head_lr, "
                f"embedding_lr, layer_lr_decay, lr_rules), but the optimizer has no group {missing}: it was not "
                "built from the plan. With a plain Trainer pass "
                "`optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs()` (and no `optimizers=`), or use "
                "StrategyTrainer."
            )

    def save_plan_into(self, checkpoint: str) -> None:
        """Write the plan into a checkpoint directory (StrategyTrainer: before the checkpoint is published)."""
        if self.plan is not None and (self._training_args is None or self._training_args.should_save):
            self.plan.save(checkpoint)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and self.plan is not None and os.path.isdir(checkpoint):
            self.plan.save(checkpoint)
