"""``StrategyTrainer``: a drop-in ``transformers.Trainer`` that trains by a plan.

``StrategyTrainerMixin`` carries the behaviour, for other ``Trainer`` subclasses
(``class MySFTTrainer(StrategyTrainerMixin, SFTTrainer)``).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import get_last_checkpoint

from .arguments import StrategyArguments
from .callback import StrategyCallback
from .optim import build_param_groups
from .plan import StrategyPlan
from .runtime import check_ddp_arguments

# Optimizer kwargs with which transformers' optimizer handlers bring their own parameter
# layout (GaLore, APOLLO, LOMO, layer-wise optimizers).
_OWN_LAYOUT_KWARGS = ("params", "model", "optimizer_dict")


class StrategyTrainerMixin:
    """Plan-driven freezing and optimizer groups for any ``Trainer`` subclass.

    Put it first among the bases. Keyword arguments: ``strategy_args``
    (:class:`StrategyArguments`) and ``strategy_plugins`` (extra plugin objects); every
    other argument goes to the Trainer unchanged.
    """

    def __init__(
        self,
        *args: Any,
        strategy_args: Optional[StrategyArguments] = None,
        strategy_plugins: Iterable[object] = (),
        **kwargs: Any,
    ) -> None:
        self.strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
        self.strategy_callback = StrategyCallback(self.strategy_args, plugins=strategy_plugins)
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if model is not None:
            # Before Trainer.__init__: a bad strategy fails before output_dir is created,
            # and DDP settings are fixed before the Trainer builds its accelerator.
            plan = self.strategy_callback.prepare(model, training_args)
            check_ddp_arguments(plan, training_args, model, can_set=True)
        super().__init__(*args, **kwargs)
        # First in line, so the plan table prints before the progress bar starts.
        self.callback_handler.callbacks.insert(0, self.strategy_callback)

    @property
    def strategy_plan(self) -> StrategyPlan:
        """The plan applied to ``self.model``."""
        assert self.strategy_callback.plan is not None
        return self.strategy_callback.plan

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run is first checked against the checkpoint's plan.

        Raises:
            PlanError: the checkpoint's ``strategy_plan.json`` differs from the current plan
                (unless ``allow_plan_change_on_resume``), before any weight is loaded.
        """
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: the Trainer raises its own error
        if isinstance(checkpoint, str):
            if self.strategy_callback.plan is not None:
                self.strategy_callback.check_resume(checkpoint)
            self.strategy_callback.resume_checkpoint = checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def call_model_init(self, trial: Any = None) -> nn.Module:
        model = super().call_model_init(trial)  # type: ignore[misc]
        self.strategy_callback.prepare(model, getattr(self, "args", None))
        return model

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Build the optimizer from the plan's groups; the class comes from ``optim=``.

        Keeps the ``if self.optimizer is None`` guard (DeepSpeed calls this twice) and
        accepts ``model=`` (FSDP passes the wrapped model).
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or any(k in optimizer_kwargs for k in _OWN_LAYOUT_KWARGS):
            # The optimizer lays out its own parameters: the Trainer's path, on the frozen model.
            return super().create_optimizer(model)  # type: ignore[misc]
        groups = build_param_groups(
            opt_model.named_parameters(),
            self.strategy_plan,
            self.get_decay_parameter_names(opt_model),
            self.args.weight_decay,
        )
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer


class StrategyTrainer(StrategyTrainerMixin, Trainer):
    """``transformers.Trainer`` plus ``strategy_args=StrategyArguments(...)``.

    Every ``Trainer`` argument works as before. The plan is built and applied at
    construction (errors raise before anything is written), printed and saved as
    ``strategy_plan.json`` when training starts, and copied into every checkpoint.
    """
