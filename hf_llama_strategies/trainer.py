"""``StrategyTrainer``: a drop-in ``transformers.Trainer`` that trains by a plan.

``StrategyTrainerMixin`` carries the behaviour, for other ``Trainer`` subclasses
(``class MySFTTrainer(StrategyTrainerMixin, SFTTrainer)``).
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from .arguments import StrategyArguments
from .callback import StrategyCallback
from .checkpoints import can_stage, save_checkpoint_staged
from .errors import InvalidArgumentError
from .optim import create_optimizer_from_plan
from .plan import StrategyPlan
from .strategies.precision import copy_precision_decision, resolve_training_arguments
from .runtime import check_ddp_arguments, check_deepspeed_arguments, check_fsdp_arguments
from .validation import check_trainer_arguments, resolve_resume_checkpoint


class StrategyTrainerMixin:
    """Plan-driven freezing and optimizer groups for any ``Trainer`` subclass.

    Put it first among the bases. Keyword arguments: ``strategy_args``
    (:class:`StrategyArguments`) and ``strategy_plugins`` (extra plugin objects); every
    other argument goes to the Trainer unchanged, except ``args``: the Trainer gets
    :func:`resolve_training_arguments`'s copy (``precision`` mapped onto fp16/bf16), which
    is ``self.args``; the object passed in is not modified.

    The plan is built for the model ``Trainer.__init__`` receives: a subclass that wraps or
    loads the model in its own ``__init__`` (TRL's ``SFTTrainer`` with ``peft_config`` or a
    model id) gets the plan of the wrapped model, and a model a subclass replaces after
    ``Trainer.__init__`` is planned again.
    """

    def __init__(
        self,
        *args: Any,
        strategy_args: Optional[StrategyArguments] = None,
        strategy_plugins: Iterable[object] = (),
        **kwargs: Any,
    ) -> None:
        if strategy_args is not None and not isinstance(strategy_args, StrategyArguments):
            raise InvalidArgumentError(
                "strategy_args", type(strategy_args).__name__, "a StrategyArguments (or None for no strategy)"
            )
        self.strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
        self.strategy_callback = StrategyCallback(self.strategy_args, plugins=strategy_plugins)
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is None:
            # What Trainer.__init__ would create, created here so that it can be resolved.
            training_args = TrainingArguments(output_dir="trainer_output")
        # Values no run survives (NaN rate, batch size 0) fail here, before output_dir exists.
        check_trainer_arguments(training_args)
        # Before Trainer.__init__, which sets accelerate up from fp16/bf16: the resolved
        # flags are the ones used, and a bad strategy fails before output_dir is created.
        training_args = resolve_training_arguments(
            training_args,
            self.strategy_args,
            model=model if isinstance(model, nn.Module) else None,
            plugins=self.strategy_callback.plugins,
        )
        self._hfls_resolved_args = training_args
        if len(args) > 1:
            args = (args[0], training_args, *args[2:])
        else:
            kwargs["args"] = training_args
        # TRL's trainers wrap the model in PEFT inside their __init__ when given `peft_config`
        # (and load it when given a model id): the plan is then built for the model that
        # reaches Trainer.__init__ (see create_accelerator_and_postprocess), since rules such
        # as `lora_B=x16` name parameters the bare model does not have.
        wrapped_later = kwargs.get("peft_config") is not None
        if isinstance(model, nn.Module) and not wrapped_later:
            # Before Trainer.__init__: a bad strategy fails before output_dir is created,
            # and DDP settings are fixed before the Trainer builds its accelerator.
            plan = self.strategy_callback.prepare(model, training_args)
            check_ddp_arguments(plan, training_args, model, can_set=True)
            check_fsdp_arguments(plan, training_args, can_set=True)
            check_deepspeed_arguments(plan, training_args)
        super().__init__(*args, **kwargs)
        # A subclass that replaced the model after Trainer.__init__: plan the model it trains.
        self._prepare_trainer_model(can_set=False)
        # First in line, so the plan table prints before the progress bar starts.
        self.callback_handler.callbacks.insert(0, self.strategy_callback)

    def create_accelerator_and_postprocess(self) -> None:
        """Plan ``self.model`` if it is not the model planned so far, then ``Trainer``'s own.

        ``Trainer.__init__`` calls this with ``self.model`` set to the model it will train,
        before it builds the accelerator (DDP settings) and creates ``output_dir``: a model
        that a subclass wrapped or loaded in its own ``__init__`` (TRL's ``SFTTrainer`` with
        ``peft_config``) is planned here, early enough for errors and DDP settings.
        """
        self._prepare_trainer_model(can_set=True)
        super().create_accelerator_and_postprocess()  # type: ignore[misc]
        if self.strategy_callback.plan is not None:
            # What accelerate really set up (an FSDP plugin from `accelerate launch` settings too).
            fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            check_fsdp_arguments(self.strategy_callback.plan, self.args, can_set=False, fsdp_plugin=fsdp_plugin)

    def _prepare_trainer_model(self, can_set: bool) -> None:
        model = getattr(self, "model", None)
        if not isinstance(model, nn.Module) or self.strategy_callback.is_prepared(model):
            return
        # The Trainer's args may be a copy of ours (SFTTrainer rebuilds TrainingArguments
        # as an SFTConfig): keep the precision decision made for them.
        copy_precision_decision(self._hfls_resolved_args, self.args)
        plan = self.strategy_callback.prepare(model, self.args)
        check_ddp_arguments(plan, self.args, model, can_set=can_set)
        check_fsdp_arguments(plan, self.args, can_set=can_set)
        check_deepspeed_arguments(plan, self.args)

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
        # True: the newest *complete* checkpoint (a partial one left by a kill is skipped and
        # named); an explicit one must be complete. Both before any weight is loaded.
        checkpoint = resolve_resume_checkpoint(resume_from_checkpoint, self.args)
        if isinstance(checkpoint, str):
            resume_from_checkpoint = checkpoint
            if self.strategy_callback.plan is not None:
                self.strategy_callback.check_resume(checkpoint)
            self.strategy_callback.resume_checkpoint = checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer._save_checkpoint``, written into a hidden sibling and renamed into place.

        A run killed while it saves leaves no ``checkpoint-N`` (only ``.tmp-checkpoint-N``, which
        nothing reads): a checkpoint is complete, ``strategy_plan.json`` included, or absent.
        The files are the Trainer's; older checkpoints rotate once the new one is in place.
        """
        if not can_stage(self.args, trial):
            return super()._save_checkpoint(model, trial)  # type: ignore[misc]
        write = lambda: super(StrategyTrainerMixin, self)._save_checkpoint(model, trial)  # noqa: E731
        save_checkpoint_staged(self, write, finish=self.strategy_callback.save_plan_into)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """``Trainer``'s, then the current plan's groups and rates where the plan changed on resume."""
        change = self.strategy_callback.plan_change_on_resume
        if checkpoint is None or change is None:
            return super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        from .resume import load_with_changed_plan

        load_with_changed_plan(self, checkpoint, change, super()._load_optimizer_and_scheduler)  # type: ignore[misc]

    def call_model_init(self, trial: Any = None) -> nn.Module:
        model = super().call_model_init(trial)  # type: ignore[misc]
        self.strategy_callback.prepare(model, getattr(self, "args", None))
        return model

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """Build the optimizer from the plan's groups; the class comes from ``optim=``.

        Every plan group becomes an optimizer group named after it (split in two by the
        Trainer's weight-decay rule, ``NAME`` and ``NAME.no_decay``) with its learning rate.
        The class and kwargs come from ``Trainer.get_optimizer_cls_and_kwargs``, or from a
        user's ``optimizer_cls_and_kwargs``, which wins. An optimizer that lays out its own
        parameters (an optimizer factory, GaLore, LOMO) takes the Trainer's path on the
        frozen model, and is refused when the plan needs its own groups.

        Keeps the ``if self.optimizer is None`` guard (DeepSpeed calls this twice) and
        accepts ``model=`` (FSDP passes the wrapped model).
        """
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        optimizer = create_optimizer_from_plan(
            opt_model,
            self.strategy_plan,
            self.args,
            optimizer_cls_and_kwargs=self.optimizer_cls_and_kwargs,
            decay_names=self.get_decay_parameter_names(opt_model),
        )
        if optimizer is None:
            return super().create_optimizer(model)  # type: ignore[misc]
        self.optimizer = optimizer
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """``Trainer.log`` plus ``learning_rate/<group>`` for every optimizer group of the plan.

        Done here and not in a callback's ``on_log``: ``log`` feeds ``log_history`` and
        every reporter from one dict. ``learning_rate`` itself becomes the scheduled
        ``TrainingArguments.learning_rate`` (the stock Trainer reports group 0, which may
        be the embeddings at their own rate). Nothing changes with the default layout.
        """
        if "learning_rate" in logs:
            logs.update(self.strategy_callback.learning_rate_logs())
        super().log(logs, start_time)  # type: ignore[misc]


class StrategyTrainer(StrategyTrainerMixin, Trainer):
    """``transformers.Trainer`` plus ``strategy_args=StrategyArguments(...)``.

    Every ``Trainer`` argument works as before. The plan is built and applied at
    construction (errors raise before anything is written), printed and saved as
    ``strategy_plan.json`` when training starts, and copied into every checkpoint.
    """
