"""``StrategyCallback``: the plan applied to an unmodified ``Trainer``.

A callback can freeze and cast parameters to their planned dtypes (before the optimizer
and any DDP wrapper exist, in ``on_init_end``), print and save the plan, and keep it in
every checkpoint. It cannot build optimizer groups; for per-parameter learning rates use
``StrategyTrainer`` (or ``StrategyTrainerMixin``).

Nor can it change ``TrainingArguments``: by ``on_init_end`` the Trainer has set up
accelerate (autocast, loss scaling) from ``fp16``/``bf16``. So ``precision: auto`` follows
those flags as they are, and an explicit ``precision`` that they do not already say is
refused (see :func:`~hf_llama_strategies.strategies.precision.check_training_arguments`);
pass the arguments through :func:`~hf_llama_strategies.resolve_training_arguments`
before building the Trainer to let ``auto`` choose.
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
from .strategies.precision import check_training_arguments

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

    def prepare(self, model: nn.Module, training_args: Optional[TrainingArguments] = None) -> StrategyPlan:
        """Build the plan for ``model`` (once); set its parameters' ``requires_grad`` and dtype.

        ``training_args`` are taken as final: checked against the precision options (an
        explicit ``precision`` they contradict is refused), never changed.
        """
        if self._prepared_model is not model:
            if training_args is not None:
                training_args = check_training_arguments(
                    training_args, self.strategy_args, model=model, plugins=self.plugins
                )
            self.plan = build_plan(model, self.strategy_args, training_args, plugins=self.plugins)
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
        if state.is_world_process_zero and self.strategy_args.print_plan:
            print(self.plan.table())
        if args.should_save:
            self.plan.save(args.output_dir)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs) -> None:
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and self.plan is not None and os.path.isdir(checkpoint):
            self.plan.save(checkpoint)
