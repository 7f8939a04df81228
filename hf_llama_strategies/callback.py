"""``StrategyCallback``: the plan applied to an unmodified ``Trainer``.

A callback can freeze (before the optimizer and any DDP wrapper exist, in
``on_init_end``), print and save the plan, and keep it in every checkpoint. It cannot
build optimizer groups; for per-parameter learning rates use ``StrategyTrainer`` (or
``StrategyTrainerMixin``).
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import pluggy
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .arguments import StrategyArguments
from .errors import PlanError
from .plan import StrategyPlan, build_plan
from .plugins import get_plugin_manager

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
        self._prepared_model: Optional[nn.Module] = None
        self._plugin_manager: Optional[pluggy.PluginManager] = None

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        """The plugin manager of this run: built-in, installed and ``plugins``."""
        if self._plugin_manager is None:
            self._plugin_manager = get_plugin_manager(self.plugins)
        return self._plugin_manager

    def prepare(self, model: nn.Module, training_args: Optional[TrainingArguments] = None) -> StrategyPlan:
        """Build the plan for ``model`` (once) and set its parameters' ``requires_grad``."""
        if self._prepared_model is not model:
            self.plan = build_plan(model, self.strategy_args, training_args, plugin_manager=self.plugin_manager)
            self._prepared_model = model
        assert self.plan is not None
        self.plan.apply(model)
        return self.plan

    def on_init_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        if model is not None:
            self.prepare(model, args)

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kwargs
    ) -> None:
        if model is not None and model is not self._prepared_model:
            raise PlanError(
                "StrategyCallback: the model being trained is not the one the plan was applied to (the Trainer "
                "re-created it with `model_init`, after the optimizer was built). Use StrategyTrainer, which "
                "applies the plan inside `call_model_init`."
            )
        assert self.plan is not None
        if model is not None:
            self.plugin_manager.hook.hfls_on_train_begin(model=model, plan=self.plan, training_args=args)
        if state.is_world_process_zero and self.strategy_args.print_plan:
            print(self.plan.table())
        if args.should_save:
            self.plan.save(args.output_dir)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and self.plan is not None and os.path.isdir(checkpoint):
            self.plan.save(checkpoint)
