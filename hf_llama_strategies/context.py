"""``RunContext``: one object per run, built once and handed to the hooks that need it.

As pytest hands ``config`` to its hooks, the core hands every plan and training hook the
run's context: its plugin manager (the only one of the run), the strategy arguments, the
``TrainingArguments`` it trains with, the precision decision and the distributed setup.
Nothing of it is stored on the user's objects: ``StrategyTrainer`` and
``StrategyCallback`` hold the context, and :func:`~hf_llama_strategies.build_plan` builds
one when called alone. Building one is where every plugin checks the options it owns
(``hfls_validate_arguments``): once per run.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Optional

from .arguments import StrategyArguments
from .core.distributed import DistributedSettings
from .core.hardware import HardwareProbe
from .core.plugins import PluginManager, plugin_manager_for
from .core.precision import PrecisionDecision, apply_precision_decision, decide_precision, model_dtype

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainingArguments


@dataclass
class RunContext:
    """The state one run shares between the core, the strategies and the integrations.

    Attributes:
        plugin_manager: the run's plugin manager: built-in, installed and in-code plugins.
        strategy_args: the strategy.
        training_args: the ``TrainingArguments`` the run trains with (``None``: a dry run
            without them); the Trainer's own once it exists (TRL rebuilds them).
        precision: the precision decision, ``None`` when no precision option is set
            (``TrainingArguments`` and the model's dtypes are then used as given).
        distributed: the DDP / FSDP / DeepSpeed settings of ``training_args``.
        fixed: the ``TrainingArguments`` can no longer change (``StrategyCallback`` inside a
            built ``Trainer``): ``precision: auto`` follows their flags, and an explicit
            ``precision`` must agree with them.
        hardware: the device the decision was made for (the ``hfls_hardware_probe`` hook's
            answer, or the ``probe`` given), once a precision option asked for it.
        reports: what plugins publish of the run while it trains, by name, for the caller
            that runs it (``"frozen_prefix_cache"``: the installed cache and its counters).
    """

    plugin_manager: PluginManager
    strategy_args: StrategyArguments
    training_args: Optional["TrainingArguments"] = None
    precision: Optional[PrecisionDecision] = None
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    fixed: bool = False
    hardware: Optional[HardwareProbe] = None
    reports: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(
        cls,
        strategy_args: Optional[StrategyArguments] = None,
        training_args: Optional["TrainingArguments"] = None,
        *,
        model: Optional["nn.Module"] = None,
        plugins: Iterable[object] = (),
        plugin_manager: Optional[PluginManager] = None,
        probe: Optional[HardwareProbe] = None,
        fixed: bool = False,
    ) -> "RunContext":
        """The context of a run: its manager, its strategy checked by every plugin, its precision decided.

        Args:
            strategy_args: the strategy; default: none (full fine-tuning).
            training_args: the arguments the run trains with, if known.
            model: the model, if loaded (its dtype guides ``precision: auto`` on a CPU).
            plugins: plugins passed in code (then the run gets a manager of its own; without them and
                without any option set, the built-in plugins alone: installed ones act through options).
            plugin_manager: a ready manager (then ``plugins`` is ignored).
            probe: the hardware, standing in for the ``hfls_hardware_probe`` hook.
            fixed: see :attr:`fixed`.

        Raises:
            PluginError: an installed plugin cannot be loaded.
            InvalidArgumentError: an option a plugin refuses, or a precision the hardware or the
                arguments refuse.
        """
        strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
        if plugin_manager is None:
            plugin_manager = plugin_manager_for(plugins, options_set=bool(strategy_args.options_set()))
        pm = plugin_manager
        context = cls(plugin_manager=pm, strategy_args=strategy_args, fixed=fixed)
        pm.hook.hfls_validate_arguments(strategy_args=strategy_args)
        context.use_training_arguments(training_args, model=model, probe=probe)
        return context

    def use_training_arguments(
        self,
        training_args: Optional["TrainingArguments"],
        *,
        model: Optional["nn.Module"] = None,
        probe: Optional[HardwareProbe] = None,
    ) -> None:
        """Train with ``training_args`` from now on: read their distributed setup, decide the precision.

        Nothing is read again for the arguments already in use. A decision already made stays
        when ``training_args`` carry its flags (TRL's trainers rebuild the resolved arguments as
        their own config class); otherwise it is made again for these arguments.
        """
        if training_args is self.training_args and training_args is not None:
            return
        previous = self.precision
        self.training_args = training_args
        self.distributed = DistributedSettings.read(training_args, model)
        if previous is not None and training_args is not None and previous.matches(self.strategy_args) and (
            bool(training_args.fp16), bool(training_args.bf16)) == (previous.fp16, previous.bf16):
            return
        if probe is not None:
            self.hardware = probe
        if not self.strategy_args.asks_precision:
            self.precision = None
            return
        if self.hardware is None:
            self.hardware = self.plugin_manager.hook.hfls_hardware_probe(training_args=training_args)
        assert self.hardware is not None  # the built-in probe always answers
        self.precision = decide_precision(
            self.strategy_args, training_args, probe=self.hardware,
            model_dtype=model_dtype(model) if model is not None else None, fixed=self.fixed,
            distributed=self.distributed,
        )

    def resolve_training_arguments(self, in_place: bool = True) -> "TrainingArguments":
        """The run's ``TrainingArguments`` with the precision decision's fp16/bf16/use_cpu.

        ``in_place`` (what ``StrategyTrainer`` does, before ``Trainer.__init__`` sets accelerate
        up from those flags): written into the user's object, logged; the user asked for it by
        setting a precision option. Otherwise a copy, which the run then uses. Nothing changes
        without a precision option.
        """
        assert self.training_args is not None
        before = self.training_args
        flags = (before.fp16, before.bf16, before.use_cpu)
        resolved = apply_precision_decision(before, self.precision, in_place=in_place)
        if (resolved.fp16, resolved.bf16, resolved.use_cpu) != flags:
            # The flags changed: a DeepSpeed config's "auto" fields were filled anew.
            checkpointing = self.distributed.activation_checkpointing
            self.distributed = DistributedSettings.read(resolved)
            if checkpointing and not self.distributed.activation_checkpointing:
                self.distributed = replace(self.distributed, activation_checkpointing=True)
        self.training_args = resolved
        return resolved

    def variant(
        self,
        strategy_args: StrategyArguments,
        training_args: Optional["TrainingArguments"],
        *,
        model: Optional["nn.Module"] = None,
    ) -> "RunContext":
        """This context, or for other arguments (``plan --fit``'s candidates) one with its manager and hardware."""
        if strategy_args is self.strategy_args and training_args is self.training_args:
            return self
        return RunContext.create(
            strategy_args, training_args, model=model, plugin_manager=self.plugin_manager, probe=self.hardware,
            fixed=self.fixed,
        )

    def hook_kwargs(self) -> dict[str, Any]:
        """What every plan hook receives besides the plan and the anatomy."""
        return {"strategy_args": self.strategy_args, "training_args": self.training_args, "context": self}


def resolve_training_arguments(
    training_args: "TrainingArguments",
    strategy_args: Optional[StrategyArguments] = None,
    *,
    model: Optional["nn.Module"] = None,
    probe: Optional[HardwareProbe] = None,
    plugins: Iterable[object] = (),
    plugin_manager: Optional[PluginManager] = None,
    in_place: bool = False,
) -> "TrainingArguments":
    """Map ``precision`` onto ``fp16`` / ``bf16`` (and check ``tf32``) for the hardware at hand.

    Returns a new ``TrainingArguments`` (the input is not modified): when a flag changes it
    is built with ``dataclasses.replace``, so ``__post_init__`` runs again and accelerate's
    ``mixed_precision`` and a DeepSpeed config's ``"auto"`` fp16/bf16 fields follow it.
    With ``in_place=True`` that result is written into ``training_args`` itself, which is
    returned: what ``StrategyTrainer`` does, so that the object the user holds says how the
    run trains. Call it yourself before building a plain ``Trainer`` (with
    :class:`StrategyCallback`) or when writing a training script. With no precision option
    set (``precision``, ``pure_bf16``, ``frozen_dtype``) nothing is decided or changed.

    Args:
        training_args: the user's arguments; an explicit ``fp16``/``bf16`` is honoured by
            ``precision: auto`` and must agree with any other ``precision``.
        strategy_args: ``precision``, ``pure_bf16``, ``frozen_dtype`` (default: none set, nothing to do).
        model: the model to train, if loaded: on a CPU, ``auto`` picks bf16 autocast for a
            model loaded in bfloat16 (fp32 otherwise).
        probe: the hardware; default: the ``hfls_hardware_probe`` hook (torch's answer).
        plugins, plugin_manager: where the hook is looked up.
        in_place: update ``training_args`` instead of returning a new object.

    Raises:
        InvalidArgumentError: fp16 on a CPU, bf16 where the GPU has none, ``precision``
            against an explicit ``fp16``/``bf16`` flag or DeepSpeed setting, ``pure_bf16``
            with fp16 or ZeRO-3, ``tf32`` without TF32 hardware, a ``frozen_dtype`` that
            cannot work in the chosen mode.
    """
    if strategy_args is None or not strategy_args.asks_precision:
        return apply_precision_decision(training_args, None, in_place=in_place)  # nothing asked: no plugin needed
    context = RunContext.create(
        strategy_args, training_args, model=model, plugins=plugins, plugin_manager=plugin_manager, probe=probe
    )
    return context.resolve_training_arguments(in_place=in_place)
