"""``RunContext``: one object per run, built once and handed to the hooks that need it.

As pytest hands ``config`` to its hooks, the core hands every plan and training hook the
run's context: its plugin manager (the only one of the run), the strategy arguments, the
``TrainingArguments`` it trains with, the precision decision and the distributed setup.
Nothing of it is stored on the user's objects: ``StrategyTrainer`` and
``StrategyCallback`` hold the context, and :func:`~hf_llama_strategies.build_plan` builds
one when called alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterable, Optional

from .distributed import DistributedSettings
from .plugins import plugin_manager_for
from .precision import HardwareProbe, PrecisionDecision, apply_precision_decision, asks_precision, decide_for_run

if TYPE_CHECKING:
    import pluggy
    from torch import nn
    from transformers import TrainingArguments

    from .arguments import StrategyArguments


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
    """

    plugin_manager: "pluggy.PluginManager"
    strategy_args: "StrategyArguments"
    training_args: Optional["TrainingArguments"] = None
    precision: Optional[PrecisionDecision] = None
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    fixed: bool = False
    hardware: Optional[HardwareProbe] = None

    @classmethod
    def create(
        cls,
        strategy_args: Optional["StrategyArguments"] = None,
        training_args: Optional["TrainingArguments"] = None,
        *,
        model: Optional["nn.Module"] = None,
        plugins: Iterable[object] = (),
        plugin_manager: Optional["pluggy.PluginManager"] = None,
        probe: Optional[HardwareProbe] = None,
        fixed: bool = False,
    ) -> "RunContext":
        """The context of a run: its manager, its strategy checked by every plugin, its precision decided.

        Args:
            strategy_args: the strategy; default: none (full fine-tuning).
            training_args: the arguments the run trains with, if known.
            model: the model, if loaded (its dtype guides ``precision: auto`` on a CPU).
            plugins: plugins passed in code (then the run gets a manager of its own).
            plugin_manager: a ready manager (then ``plugins`` is ignored).
            probe: the hardware, standing in for the ``hfls_hardware_probe`` hook.
            fixed: see :attr:`fixed`.

        Raises:
            InvalidArgumentError: an option a plugin passed in code refuses, or a precision
                the hardware or the arguments refuse.
        """
        if strategy_args is None:
            from .arguments import StrategyArguments  # the arguments validate through the plugins

            strategy_args = StrategyArguments()
        pm = plugin_manager if plugin_manager is not None else plugin_manager_for(plugins)
        context = cls(plugin_manager=pm, strategy_args=strategy_args, fixed=fixed)
        context._validate_with_code_plugins()
        context.use_training_arguments(training_args, model=model, probe=probe)
        return context

    def _validate_with_code_plugins(self) -> None:
        # StrategyArguments.__post_init__ validated against the built-in and installed
        # plugins; only the plugins passed in code have not seen the options yet.
        code_plugins = set(map(id, getattr(self.plugin_manager, "hfls_code_plugins", ())))
        if not code_plugins:
            return
        others = [p for p in self.plugin_manager.get_plugins() if id(p) not in code_plugins]
        caller = self.plugin_manager.subset_hook_caller("hfls_validate_arguments", remove_plugins=others)
        caller(strategy_args=self.strategy_args)

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
        elif self.hardware is None and asks_precision(self.strategy_args):
            self.hardware = self.plugin_manager.hook.hfls_hardware_probe(training_args=training_args)
        self.precision = decide_for_run(
            self.strategy_args, training_args, self.plugin_manager, model=model, probe=self.hardware,
            fixed=self.fixed, distributed=self.distributed,
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
        strategy_args: "StrategyArguments",
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
