"""``StrategyCallback``: the plan applied to an unmodified ``Trainer``.

A callback can freeze (before the optimizer and any DDP wrapper exist, in
``on_init_end``), print and save the plan, keep it in every checkpoint, move dynamic
schedules at step boundaries and check a resumed run's plan. It cannot build optimizer
groups; for per-parameter learning rates use ``StrategyTrainer`` (or
``StrategyTrainerMixin``).

Resume check: a callback does not see ``resume_from_checkpoint``. When training begins at
``global_step > 0`` (a resumed run) it checks ``output_dir/checkpoint-<global_step>``, the
checkpoint ``resume_from_checkpoint=True`` picks; ``StrategyTrainer`` checks the exact
checkpoint passed, before any weight is loaded.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .arguments import StrategyArguments
from .errors import PlanError
from .plan import StrategyPlan, build_plan
from .plugins import get_plugin_manager
from .runtime import ScheduleRunner, check_ddp_arguments, check_resumed_plan

logger = logging.get_logger(__name__)


class StrategyCallback(TrainerCallback):
    """Apply a strategy to any ``Trainer`` (or subclass) without subclassing it.

    Example::

        trainer = Trainer(model=model, args=training_args, train_dataset=ds,
                          callbacks=[StrategyCallback(StrategyArguments(trainable_layers="-2:"))])

    Args:
        strategy_args: the strategy; default: full fine-tuning.
        plugins: extra plugin objects, beside built-in and installed ones.
    """

    def __init__(self, strategy_args: Optional[StrategyArguments] = None, plugins: Iterable[object] = ()) -> None:
        self.strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
        self.plugins = tuple(plugins)
        self.plan: Optional[StrategyPlan] = None
        self.runner: Optional[ScheduleRunner] = None
        #: The checkpoint a resumed run starts from, when known (StrategyTrainer sets it).
        self.resume_checkpoint: Optional[str] = None
        self._prepared_model: Optional[nn.Module] = None
        self._plugin_manager = None
        self._checked: Optional[tuple[str, int]] = None

    def check_resume(self, checkpoint: str) -> None:
        """Compare the plan with the one saved in ``checkpoint`` (once per checkpoint and plan).

        Raises:
            PlanError: they differ and ``allow_plan_change_on_resume`` is not set.
        """
        assert self.plan is not None
        if self._checked != (checkpoint, id(self.plan)):
            check_resumed_plan(self.plan, checkpoint, self.strategy_args.allow_plan_change_on_resume)
            self._checked = (checkpoint, id(self.plan))

    def prepare(self, model: nn.Module, training_args: Optional[TrainingArguments] = None) -> StrategyPlan:
        """Build the plan for ``model`` (once) and set its parameters' ``requires_grad``.

        Every parameter that may ever train requires grad afterwards (what the optimizer
        and a DDP reducer must see); schedules take over when training begins.
        """
        if self._plugin_manager is None:
            self._plugin_manager = get_plugin_manager(self.plugins)
        if self._prepared_model is not model:
            self.plan = build_plan(model, self.strategy_args, training_args, plugin_manager=self._plugin_manager)
            self.runner = ScheduleRunner(self.plan, self._plugin_manager)
            self._prepared_model = model
        assert self.plan is not None
        self.plan.apply(model)
        return self.plan

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        if model is not None:
            self.prepare(model, args)
            check_ddp_arguments(self.plan, args, model, can_set=False)

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
        if state.global_step > 0:
            checkpoint = self.resume_checkpoint or os.path.join(
                args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            )
            self.check_resume(checkpoint)
        if state.is_world_process_zero and self.strategy_args.print_plan:
            print(self.plan.table())
        if args.should_save:
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
        if self.plan is not None and model is not None and self.plan.is_dynamic:
            self.plan.apply(model)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and self.plan is not None and os.path.isdir(checkpoint):
            self.plan.save(checkpoint)
