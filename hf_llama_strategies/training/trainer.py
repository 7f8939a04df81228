"""``StrategyTrainer``: a drop-in ``transformers.Trainer`` that trains by a plan.

``StrategyTrainerMixin`` carries the behaviour, for other ``Trainer`` subclasses
(``class MySFTTrainer(StrategyTrainerMixin, SFTTrainer)``).
"""

from __future__ import annotations

import os
import weakref
from typing import TYPE_CHECKING, Any, Iterable, Optional, Union

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments
from transformers.utils import CONFIG_NAME, logging

from ..arguments import StrategyArguments
from ..context import RunContext
from ..core.distributed import DistributedFixes, DistributedSettings, check_distributed
from ..core.dtypes import torch_dtype
from ..core.plan import StrategyPlan
from ..core.precision import PrecisionDecision
from ..errors import InvalidArgumentError, TrainingStopped
from ..planner import build_plan, check_something_trains
from .callback import StrategyCallback
from .checkpoints import can_stage, save_checkpoint_staged
from .optimizer import create_optimizer_from_plan, settle_requires_grad
from .resume import resolve_resume
from .run_lock import acquire_run_lock, release_run_lock
from .stop_signal import SignalStop, StopOnSignalCallback, signal_name
from .validation import check_trainer_arguments

logger = logging.get_logger(__name__)

if TYPE_CHECKING:
    _TrainerBase = Trainer  # what the mixin is mixed into, for the type checker
else:
    _TrainerBase = object


class StrategyTrainerMixin(_TrainerBase):
    """Plan-driven freezing and optimizer groups for any ``Trainer`` subclass.

    Put it first among the bases. Keyword arguments: ``strategy_args``
    (:class:`StrategyArguments`) and ``strategy_plugins`` (extra plugin objects); every
    other argument goes to the Trainer unchanged.

    With no option set (:meth:`StrategyArguments.options_set` empty) and no plugin passed,
    this is the Trainer it is mixed into, in every observable way: no plan is applied or
    saved, no callback is added, and every method is the Trainer's own.

    Otherwise the run has one :class:`~hf_llama_strategies.context.RunContext`
    (``trainer.strategy_callback.context``): one plugin manager, one precision decision, the
    distributed setup read from the arguments (and once more from the accelerator).
    ``self.args`` is the object passed in (``trainer.args is args``): when a precision option
    asks for other fp16/bf16 flags, they are set on that very object (logged), so the
    arguments the user holds say how the run trains. Nothing else of the user's changes (no
    other ``TrainingArguments`` field, no environment variable): what DDP or FSDP1 must do for
    the plan (``find_unused_parameters``, ``use_orig_params``) is set on the Trainer's own
    accelerator.

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
        self._hfls_save_dtype: Optional[torch.dtype] = None
        self._hfls_fixes = DistributedFixes()
        # Nothing asked for: the Trainer itself (no plan, no callback, no file).
        self._hfls_active = bool(self.strategy_args.options_set() or self.strategy_callback.plugins)
        if not self._hfls_active:
            super().__init__(*args, **kwargs)
            return
        model = kwargs.get("model", args[0] if args else None)
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is None:
            # What Trainer.__init__ would create, created here so that it can be resolved.
            training_args = TrainingArguments(output_dir="trainer_output")
            if len(args) > 1:
                args = (args[0], training_args, *args[2:])
            else:
                kwargs["args"] = training_args
        # Values no run survives (NaN rate, batch size 0) fail here, before output_dir exists.
        check_trainer_arguments(training_args)
        # Before Trainer.__init__, which sets accelerate up from fp16/bf16: the resolved
        # flags are the ones used, and a bad strategy fails before output_dir is created.
        context = RunContext.create(
            self.strategy_args, training_args, model=model if isinstance(model, nn.Module) else None,
            plugins=self.strategy_callback.plugins,
        )
        context.resolve_training_arguments()
        context.fixed = True  # from here on the flags are the run's: a rebuilt copy (TRL) must agree
        self.strategy_callback.context = context
        # TRL's trainers wrap the model in PEFT inside their __init__ when given `peft_config`
        # (and load it when given a model id): the plan is then built for the model that
        # reaches Trainer.__init__ (see create_accelerator_and_postprocess), since rules such
        # as `lora_B=x16` name parameters the bare model does not have.
        wrapped_later = kwargs.get("peft_config") is not None
        if isinstance(model, nn.Module) and not wrapped_later:
            # Before Trainer.__init__: a bad strategy fails before output_dir is created,
            # and DDP settings are known before the Trainer builds its accelerator.
            self._prepare_trainer_model_for(model, training_args, can_set=True)
        self._lock_output_dir(training_args)
        super().__init__(*args, **kwargs)
        # A subclass that replaced the model after Trainer.__init__: plan the model it trains.
        self._prepare_trainer_model(can_set=False)
        # First in line, so the plan table prints before the progress bar starts.
        self.callback_handler.callbacks.insert(0, self.strategy_callback)
        self._set_up_signals()

    def _lock_output_dir(self, training_args: TrainingArguments) -> None:
        """``lock_output_dir``: lock it before Trainer.__init__ creates it; released with the trainer."""
        if not self.strategy_args.lock_output_dir or not training_args.should_save:
            return
        note = acquire_run_lock(training_args.output_dir)
        if note:
            logger.warning(f"lock_output_dir: {note}.")
        weakref.finalize(self, release_run_lock, training_args.output_dir)

    def _set_up_signals(self) -> None:
        """``checkpoint_on_signal``: the stop callback; transformers' ``enable_jit_checkpoint`` handler stood down."""
        self._hfls_stop: Optional[SignalStop] = None
        self._hfls_jit_step: Optional[int] = None
        jit = next((c for c in self.callback_handler.callbacks if type(c).__name__ == "JITCheckpointCallback"), None)
        manager = getattr(jit, "jit_manager", None)
        if self.strategy_args.checkpoint_on_signal:
            self.add_callback(StopOnSignalCallback(self._stop_requested))
            if manager is not None:
                # One handler for SIGTERM: this one saves through the staged path and stops alike.
                import signal

                if manager._original_sigterm_handler is not None:
                    signal.signal(signal.SIGTERM, manager._original_sigterm_handler)
                jit.jit_manager = None
                logger.info("enable_jit_checkpoint: SIGTERM is handled by checkpoint_on_signal (the same checkpoint).")
        elif manager is not None:
            execute = manager.execute_jit_checkpoint

            def execute_and_record() -> None:
                execute()
                self._hfls_jit_step = self.state.global_step

            manager.execute_jit_checkpoint = execute_and_record

    @property
    def jit_checkpoint_step(self) -> Optional[int]:
        """The step at which transformers' ``enable_jit_checkpoint`` saved and stopped training (``None``: none)."""
        return getattr(self, "_hfls_jit_step", None)

    def _stop_requested(self) -> Optional[int]:
        """The stop signal, agreed by every process (the first that saw one decides for all)."""
        stop = self._hfls_stop
        local = stop.signum if stop is not None and stop.signum is not None else 0
        if getattr(self.args, "world_size", 1) > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                flag = torch.tensor([local], device=self.args.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                local = int(flag.item())
        return local or None

    def create_accelerator_and_postprocess(self) -> None:
        """Plan ``self.model`` if it is not the model planned so far, then ``Trainer``'s own.

        ``Trainer.__init__`` calls this with ``self.model`` set to the model it will train,
        before it builds the accelerator (DDP settings) and creates ``output_dir``: a model
        that a subclass wrapped or loaded in its own ``__init__`` (TRL's ``SFTTrainer`` with
        ``peft_config``) is planned here, early enough for errors and DDP settings. Once the
        accelerator exists, it gets what the plan needs (``find_unused_parameters``, FSDP1's
        ``use_orig_params``), and the settings it really has are checked again.
        """
        if not self._hfls_active:
            return super().create_accelerator_and_postprocess()
        context = self.strategy_callback.context
        if context is not None and self.args is not context.training_args:
            # A subclass rebuilt the arguments (TRL's SFTConfig): the run trains with those.
            context.use_training_arguments(self.args, model=self.model)
        self._prepare_trainer_model(can_set=True)
        super().create_accelerator_and_postprocess()
        plan = self.strategy_callback.plan
        if plan is not None:
            self._hfls_fixes.apply_to(self.accelerator)
            # What accelerate really set up (an FSDP plugin from `accelerate launch` settings too).
            fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
            settings = DistributedSettings.read(self.args, self.model, fsdp_plugin=fsdp_plugin)
            check_distributed(plan, self._hfls_fixes.applied_to(settings), can_set=False)

    def _prepare_trainer_model(self, can_set: bool) -> None:
        model = getattr(self, "model", None)
        if isinstance(model, nn.Module) and not self.strategy_callback.is_prepared(model):
            # The Trainer's args may be a copy of ours (SFTTrainer rebuilds TrainingArguments
            # as an SFTConfig): the context keeps its precision decision when the flags agree.
            self._prepare_trainer_model_for(model, self.args, can_set=can_set)

    def _prepare_trainer_model_for(self, model: nn.Module, training_args: TrainingArguments, can_set: bool) -> None:
        plan = self.strategy_callback.prepare(model, training_args)
        context = self.strategy_callback.context
        assert context is not None
        if can_set:
            self._hfls_fixes = check_distributed(plan, context.distributed, can_set=True)
        else:
            # The accelerator exists: what was set on it counts.
            check_distributed(plan, self._hfls_fixes.applied_to(context.distributed), can_set=False)

    @property
    def strategy_plan(self) -> StrategyPlan:
        """The plan applied to ``self.model``.

        With no option set nothing is applied: this is then the plan ``self.model`` trains
        by as it is (built on each access, for inspection).
        """
        if not self._hfls_active:
            return build_plan(
                self.model, self.strategy_args, self.args, plugin_manager=self.strategy_callback.plugin_manager
            )
        assert self.strategy_callback.plan is not None
        return self.strategy_callback.plan

    def train(self, resume_from_checkpoint: Optional[Union[str, bool]] = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run is first checked against the checkpoint's plan.

        Raises:
            PlanError: the checkpoint's ``strategy_plan.json`` differs from the current plan
                (unless ``allow_plan_change_on_resume``), before any weight is loaded; or
                nothing would train.
        """
        if not self._hfls_active:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        if self.model_init is None and self.strategy_callback.plan is not None:
            # Here and not at construction: a frozen model evaluates and predicts.
            check_something_trains(self.strategy_callback.plan, self.model)
        # True: the newest *complete* checkpoint (a partial one left by a kill is skipped and
        # named); an explicit one must be complete. Both before any weight is loaded.
        checkpoint = resolve_resume(resume_from_checkpoint, self.args.output_dir, require_optimizer=False).checkpoint
        if checkpoint is not None:
            resume_from_checkpoint = checkpoint
            if self.strategy_callback.plan is not None:
                self.strategy_callback.check_resume(checkpoint)
            self.strategy_callback.resume_checkpoint = checkpoint
        if not self.strategy_args.checkpoint_on_signal:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        self._hfls_stop = SignalStop(defer=True).install()
        try:
            result = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self._hfls_stop.uninstall()
        signum = self._stop_requested()
        if signum is None:
            return result
        raise self._stopped(signum)

    def _stopped(self, signum: int) -> TrainingStopped:
        """What ``train()`` raises after a stop signal: the step and the checkpoint saved at it (logged)."""
        path = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        step = self.state.global_step
        stopped = TrainingStopped(signum, signal_name(signum), step, path if os.path.isdir(path) else None)
        logger.warning(f"{stopped}.")
        return stopped

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """``Trainer._save_checkpoint``, written into a hidden sibling and renamed into place.

        A run killed while it saves leaves no ``checkpoint-N`` (only ``.tmp-checkpoint-N``, which
        nothing reads): a checkpoint is complete, ``strategy_plan.json`` included, or absent.
        The files are the Trainer's; older checkpoints rotate once the new one is in place.
        """
        if not self._hfls_active or not can_stage(self.args, trial):
            return super()._save_checkpoint(model, trial)
        write = lambda: super(StrategyTrainerMixin, self)._save_checkpoint(model, trial)  # noqa: E731
        save_checkpoint_staged(self, write, finish=self.strategy_callback.save_plan_into)

    def _load_optimizer_and_scheduler(self, checkpoint: Optional[str]) -> None:
        """``Trainer``'s, then the current plan's groups and rates where the plan changed on resume."""
        change = self.strategy_callback.plan_change_on_resume if self._hfls_active else None
        if checkpoint is None or change is None:
            return super()._load_optimizer_and_scheduler(checkpoint)
        from .resume import load_with_changed_plan

        load_with_changed_plan(self, checkpoint, change, super()._load_optimizer_and_scheduler)

    def call_model_init(self, trial: Any = None) -> nn.Module:
        model = super().call_model_init(trial)
        if self._hfls_active:
            self.strategy_callback.prepare(model, getattr(self, "args", None))
        return model

    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, or one over the plan's groups when the plan has its own.

        Parameters that an option decided train as the plan says; the others as their
        ``requires_grad`` says now (as in ``Trainer``). A plan with nothing but the default
        layout takes ``Trainer.create_optimizer`` itself (its two weight-decay groups). A
        plan with its own groups makes every plan group an optimizer group named after it
        (split in two by the Trainer's weight-decay rule, ``NAME`` and ``NAME.no_decay``) with
        its learning rate. The class and kwargs come from ``self.get_optimizer_cls_and_kwargs``
        (a subclass's override included), or from a user's ``optimizer_cls_and_kwargs``, which
        wins. An optimizer that lays out its own parameters (an optimizer factory, GaLore,
        LOMO) takes the Trainer's path on the frozen model, and is refused when the plan needs
        its own groups.

        Keeps the ``if self.optimizer is None`` guard (DeepSpeed calls this twice) and
        accepts ``model=`` (FSDP passes the wrapped model).
        """
        if not self._hfls_active or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        plan = self.strategy_plan
        check_something_trains(plan, opt_model)
        settle_requires_grad(plan, opt_model)
        if not plan.has_custom_groups:
            return super().create_optimizer(model)
        optimizer = create_optimizer_from_plan(
            opt_model,
            plan,
            self.args,
            optimizer_cls_and_kwargs=self.optimizer_cls_and_kwargs,
            decay_names=self.get_decay_parameter_names(opt_model),
            get_optimizer_cls_and_kwargs=self.get_optimizer_cls_and_kwargs,
        )
        if optimizer is None:
            return super().create_optimizer(model)
        self.optimizer = optimizer
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: Optional[float] = None) -> None:
        """``Trainer.log`` plus ``learning_rate/<group>`` for every optimizer group of the plan.

        Done here and not in a callback's ``on_log``: ``log`` feeds ``log_history`` and
        every reporter from one dict. ``learning_rate`` itself becomes the scheduled
        ``TrainingArguments.learning_rate`` (the stock Trainer reports group 0, which may
        be the embeddings at their own rate). Nothing changes with the default layout.
        """
        if self._hfls_active and "learning_rate" in logs:
            logs.update(self.strategy_callback.learning_rate_logs())
        super().log(logs, start_time)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``; a final model that the plan left in mixed dtypes is saved in one.

        With autocast the plan keeps trainable parameters in fp32 beside frozen ones as
        loaded (bf16, say). Checkpoints (``_internal_call``) keep those fp32 master weights,
        so a resumed run continues exactly. The model you save yourself is written in the
        dtype it was loaded in, with a ``config.json`` that says so, so ``from_pretrained``
        loads what was saved (trained tensors are rounded once, here, and said to be).
        """
        dtype = None
        if self._hfls_active and not _internal_call:
            context = self.strategy_callback.context
            decision = context.precision if context is not None else None
            dtype = _final_dtype(self.strategy_callback.plan, self.model, decision)
        if dtype is None:
            return super().save_model(output_dir, _internal_call)
        logger.warning(
            f"Saving the final model in {dtype} (the dtype it was loaded in; the plan trained some parameters in "
            "another), config.json included; checkpoints keep the trained dtypes."
        )
        self._hfls_save_dtype = dtype
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._hfls_save_dtype = None

    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        dtype = self._hfls_save_dtype
        if dtype is None:
            return super()._save(output_dir, state_dict)
        if state_dict is None:
            state_dict = self.accelerator.unwrap_model(self.model).state_dict()
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
        super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        config = getattr(self.accelerator.unwrap_model(self.model), "config", None)
        written = os.path.isfile(os.path.join(output_dir, CONFIG_NAME))
        if self.args.should_save and isinstance(config, PretrainedConfig) and written:
            # save_pretrained wrote the dtype of the model's first parameter, not of the tensors saved.
            config.dtype = str(dtype).removeprefix("torch.")
            config.save_pretrained(output_dir)


def _final_dtype(
    plan: Optional[StrategyPlan], model: nn.Module, decision: Optional[PrecisionDecision]
) -> Optional[torch.dtype]:
    """The one dtype to save a final model in, or ``None`` to save it as it is.

    Only for a ``PreTrainedModel`` whose parameters the plan cast into more than one dtype:
    then the dtype the model was loaded in (most of its parameters, before the plan).
    """
    if plan is None or decision is None or not isinstance(model, PreTrainedModel):
        return None
    if len({p.dtype for p in model.parameters() if p.is_floating_point()}) <= 1:
        return None
    if not any(d.dtype_reason for d in plan):
        return None  # the mix is the user's, not the plan's
    return torch_dtype(decision.model_dtype) if decision.model_dtype else None


class StrategyTrainer(StrategyTrainerMixin, Trainer):
    """``transformers.Trainer`` plus ``strategy_args=StrategyArguments(...)``.

    Every ``Trainer`` argument works as before. With no option set it is a ``Trainer``:
    same losses, weights, files, callbacks and optimizer. With options, the plan is built
    and applied at construction (errors raise before anything is written), printed and
    saved as ``strategy_plan.json`` when training starts, and copied into every checkpoint.
    """
