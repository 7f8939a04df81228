"""The distributed setup of a run, read in one place: DDP, FSDP and DeepSpeed settings, and their one check.

As accelerate keeps one dataclass per integration, :class:`DistributedSettings` holds what
the plan depends on, read from ``TrainingArguments`` (and, once it exists, the
accelerator's FSDP plugin, or the environment ``accelerate launch`` exports) in one place.
:func:`check_distributed` is the one check every entry point calls. It writes nothing:
what must change for the plan to train (DDP's ``find_unused_parameters``, FSDP1's
``use_orig_params``) comes back as :class:`DistributedFixes`, which ``StrategyTrainer``
applies to its own accelerator, so neither the user's ``TrainingArguments`` nor
``os.environ`` is touched.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

from transformers.utils import logging

from ..errors import InvalidArgumentError, PlanError
from .options import TRUE_WORDS

if TYPE_CHECKING:
    from torch import nn
    from transformers import TrainingArguments

    from .plan import StrategyPlan

logger = logging.get_logger(__name__)


def read_deepspeed_config(training_args: Any) -> tuple[Optional[dict[str, Any]], str]:
    """The DeepSpeed config a ``TrainingArguments`` will train with, and where it comes from.

    Reads the parsed config (``hf_deepspeed_config``, or accelerate's plugin when launched
    with ``accelerate launch --use_deepspeed``) when there is one, else ``deepspeed`` as a
    dict, a JSON file path, a JSON string or base64 JSON (what transformers accepts), without
    deepspeed installed too. ``(None, "")`` when DeepSpeed is not configured.
    """
    if training_args is None:
        return None, ""
    source = getattr(training_args, "deepspeed", None)
    for holder, where in (
        (getattr(training_args, "hf_deepspeed_config", None), "TrainingArguments.deepspeed"),
        (getattr(getattr(training_args, "deepspeed_plugin", None), "hf_ds_config", None),
         "accelerate's DeepSpeed plugin"),
    ):
        config = getattr(holder, "config", None)
        if isinstance(config, dict):
            return config, (f"{where} ({source})" if isinstance(source, str) else where)
    if isinstance(source, dict):
        return source, "TrainingArguments.deepspeed (a dict)"
    if isinstance(source, (str, os.PathLike)) and source:
        text = os.fspath(source)
        if os.path.isfile(text):
            with open(text, encoding="utf-8") as fh:
                return json.load(fh), f"the DeepSpeed config file {text}"
        for decode, how in ((lambda t: t, "a JSON string"), (lambda t: base64.urlsafe_b64decode(t).decode("utf-8"),
                                                             "base64 JSON")):
            try:
                parsed = json.loads(decode(text))
            except (ValueError, binascii.Error, UnicodeDecodeError):
                continue
            if isinstance(parsed, dict):
                return parsed, f"TrainingArguments.deepspeed ({how})"
    return None, ""  # transformers reports an unreadable config itself


def _fsdp_settings(training_args: Any, fsdp_plugin: Any) -> tuple[Optional[int], Optional[bool], str]:
    """``(FSDP version or None, use_orig_params, where it is set)``.

    ``use_orig_params`` is ``None`` when nothing sets it (accelerate's plugin then defaults
    to ``False``). Read from the accelerator's plugin when there is one, else from
    ``TrainingArguments.fsdp_config`` (transformers defaults it to ``True``), else from the
    environment ``accelerate launch --use_fsdp`` sets.
    """
    if fsdp_plugin is not None:
        return (int(getattr(fsdp_plugin, "fsdp_version", 1) or 1), bool(fsdp_plugin.use_orig_params),
                "use_orig_params of accelerate's FSDP plugin")
    plugin_args = getattr(training_args, "fsdp_plugin_args", None) if training_args is not None else None
    if plugin_args:
        return (int(plugin_args.get("fsdp_version", 1)), bool(plugin_args.get("use_orig_params", True)),
                "fsdp_config.use_orig_params")
    if training_args is not None and getattr(training_args, "fsdp", None):
        config = getattr(training_args, "fsdp_config", None) or {}
        return int(config.get("version", 2)), bool(config.get("use_orig_params", True)), "fsdp_config.use_orig_params"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in TRUE_WORDS:
        raw = os.environ.get("FSDP_USE_ORIG_PARAMS")
        value = None if raw is None else raw.strip().lower() in TRUE_WORDS
        return (int(os.environ.get("FSDP_VERSION", "1") or 1), value,
                "FSDP_USE_ORIG_PARAMS (accelerate launch --fsdp_use_orig_params)")
    return None, None, ""


def _fsdp_shards_weights(training_args: Any) -> bool:
    """False for FSDP ``reshard_after_forward: false`` / ``shard_grad_op`` (weights stay whole between passes)."""
    fsdp = getattr(training_args, "fsdp", None) if training_args is not None else None
    items = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, (list, tuple)) else []
    config = getattr(training_args, "fsdp_config", None) or {}
    reshard = config.get("reshard_after_forward", "shard_grad_op" not in [str(i) for i in items])
    return str(reshard).lower() not in ("false", "shard_grad_op", "hybrid_shard_zero2")


@dataclass(frozen=True)
class DistributedSettings:
    """What the plan depends on in a run's DDP, FSDP and DeepSpeed setup.

    Attributes:
        world_size: processes that train together.
        deepspeed_config: the DeepSpeed config (``None``: no DeepSpeed), see :func:`read_deepspeed_config`.
        deepspeed_source: where it comes from, for messages.
        fsdp_version: 1 or 2 when FSDP is configured, else ``None``.
        fsdp_use_orig_params: FSDP1's ``use_orig_params`` (``None``: unset, accelerate's default false).
        fsdp_use_orig_params_source: where it is set, for messages.
        ddp_find_unused_parameters: ``TrainingArguments.ddp_find_unused_parameters`` (``None``: the
            Trainer's default).
        activation_checkpointing: activation checkpointing is on (the Trainer then defaults
            ``find_unused_parameters`` to false).
        fsdp_shards_weights: FSDP shards the weights too (full shard), not only gradients and
            optimizer state (``reshard_after_forward: false``, ``shard_grad_op``).
    """

    world_size: int = 1
    deepspeed_config: Optional[dict[str, Any]] = field(default=None, compare=False)
    deepspeed_source: str = ""
    fsdp_version: Optional[int] = None
    fsdp_use_orig_params: Optional[bool] = None
    fsdp_use_orig_params_source: str = ""
    ddp_find_unused_parameters: Optional[bool] = None
    activation_checkpointing: bool = False
    fsdp_shards_weights: bool = True

    @classmethod
    def read(
        cls, training_args: Optional["TrainingArguments"], model: Optional["nn.Module"] = None, fsdp_plugin: Any = None
    ) -> "DistributedSettings":
        """Read the settings of ``training_args`` (and of the accelerator's ``fsdp_plugin``, once it exists)."""
        config, source = read_deepspeed_config(training_args)
        version, orig_params, where = _fsdp_settings(training_args, fsdp_plugin)
        return cls(
            world_size=int(getattr(training_args, "world_size", 1) or 1) if training_args is not None else 1,
            deepspeed_config=config,
            deepspeed_source=source,
            fsdp_version=version,
            fsdp_use_orig_params=orig_params,
            fsdp_use_orig_params_source=where,
            ddp_find_unused_parameters=getattr(training_args, "ddp_find_unused_parameters", None),
            activation_checkpointing=bool(getattr(training_args, "activation_checkpointing", False))
            or bool(getattr(model, "is_activation_checkpointing", False)),
            fsdp_shards_weights=_fsdp_shards_weights(training_args),
        )

    @property
    def zero_stage(self) -> Optional[int]:
        """DeepSpeed's ZeRO stage, when DeepSpeed is configured and says."""
        stage = ((self.deepspeed_config or {}).get("zero_optimization") or {}).get("stage")
        try:
            return int(stage)
        except (TypeError, ValueError):
            return None

    def sharding(self) -> tuple[str, tuple[str, ...]]:
        """How the run shards across ranks: its name, and which of ``weights``, ``gradients`` and
        ``optimizer_state`` each rank holds ``1/world_size`` of.

        FSDP full shard and ZeRO-3 shard all three; FSDP ``reshard_after_forward: false``
        (shard_grad_op) and ZeRO-2 gradients and state; ZeRO-1 the state; DDP nothing.
        """
        if self.deepspeed_config is not None:
            stage = self.zero_stage or 0
            shards = {0: (), 1: ("optimizer_state",), 2: ("gradients", "optimizer_state")}.get(
                stage, ("weights", "gradients", "optimizer_state")
            )
            return f"DeepSpeed ZeRO-{stage}", shards
        if self.fsdp_version is not None:
            if self.fsdp_shards_weights:
                return "FSDP full shard", ("weights", "gradients", "optimizer_state")
            return "FSDP shard_grad_op", ("gradients", "optimizer_state")
        return "DDP", ()

    def deepspeed_enables(self, precision: str) -> bool:
        """True only for an explicit ``"enabled": true`` of ``fp16`` or ``bf16`` (``"auto"`` follows the flags)."""
        config = self.deepspeed_config or {}
        sections = [config.get(precision)] + ([config.get("bfloat16")] if precision == "bf16" else [])
        return any(isinstance(s, dict) and s.get("enabled") is True for s in sections)


@dataclass
class DistributedFixes:
    """Settings the plan needs that the run may still set on its own accelerator (nothing of the user's)."""

    ddp_find_unused_parameters: bool = False
    fsdp_use_orig_params: bool = False

    def applied_to(self, settings: DistributedSettings) -> DistributedSettings:
        """``settings`` as they are once these fixes are applied."""
        return replace(
            settings,
            ddp_find_unused_parameters=True if self.ddp_find_unused_parameters else settings.ddp_find_unused_parameters,
            fsdp_use_orig_params=True if self.fsdp_use_orig_params else settings.fsdp_use_orig_params,
        )

    def apply_to(self, accelerator: Any) -> None:
        """Set them on ``accelerator`` (``Trainer.accelerator``) before it wraps the model."""
        if self.ddp_find_unused_parameters:
            if getattr(accelerator, "ddp_handler", None) is None:
                # A Trainer that gave accelerate no DDP settings: ours are the only ones.
                from accelerate.utils import DistributedDataParallelKwargs

                accelerator.ddp_handler = DistributedDataParallelKwargs()
            accelerator.ddp_handler.find_unused_parameters = True
            logger.info("Dynamic freezing schedule: DDP's find_unused_parameters set to True for this run.")
        plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
        if self.fsdp_use_orig_params and plugin is not None:
            plugin.use_orig_params = True
            logger.info("FSDP1 with a plan that freezes some parameters: use_orig_params set to True for this run.")


def check_distributed(
    plan: "StrategyPlan", settings: DistributedSettings, *, can_set: bool
) -> DistributedFixes:
    """Check that DDP, FSDP and DeepSpeed can train ``plan``; say what the run must set.

    Args:
        plan: the finished plan.
        settings: the run's settings (:meth:`DistributedSettings.read`).
        can_set: the accelerator does not exist yet (``StrategyTrainer`` before
            ``Trainer.__init__`` builds it): an unset value the plan needs is returned as a
            fix instead of refused.

    Raises:
        InvalidArgumentError: a DDP or FSDP setting the plan cannot train with.
        PlanError: a dynamic plan under DeepSpeed.
    """
    fixes = DistributedFixes(
        ddp_find_unused_parameters=_check_ddp(plan, settings, can_set),
        fsdp_use_orig_params=_check_fsdp(plan, settings, can_set),
    )
    _check_deepspeed(plan, settings)
    return fixes


def _check_ddp(plan: "StrategyPlan", settings: DistributedSettings, can_set: bool) -> bool:
    """Make sure DDP expects the parameters a schedule leaves without a gradient.

    Every parameter that may train requires grad when DDP wraps the model, so the reducer
    all-reduces it once it is activated; at a step where it is inactive it gets no
    gradient, which DDP accepts only with ``find_unused_parameters=True`` (all ranks agree
    that it is unused, so its gradient stays ``None`` everywhere). Returns whether the run
    must set it.
    """
    if not plan.is_dynamic:
        return False
    value = settings.ddp_find_unused_parameters
    why = (
        "A dynamic schedule (gradual unfreezing, LISA) leaves the parameters it has not activated without a gradient "
        "at a step, and DDP must expect that."
    )
    if value is False:
        raise InvalidArgumentError(
            "ddp_find_unused_parameters", value, "true or unset (null) with a dynamic freezing schedule", why
        )
    if value is not None:
        return False
    if can_set:
        return True
    if settings.activation_checkpointing and settings.world_size > 1:
        # The Trainer defaults to False under activation checkpointing, and the accelerator
        # already exists: a callback cannot change it any more.
        raise InvalidArgumentError(
            "ddp_find_unused_parameters",
            value,
            "true with a dynamic freezing schedule under activation checkpointing",
            why + " Set it explicitly (StrategyTrainer sets it for you).",
        )
    return False


def _check_fsdp(plan: "StrategyPlan", settings: DistributedSettings, can_set: bool) -> bool:
    """Make sure FSDP1 keeps the original parameters when the plan freezes some of them.

    FSDP1 flattens the parameters of each wrapped module into one ``FlatParameter`` with a
    single ``requires_grad``: without ``use_orig_params`` it cannot hold frozen and trainable
    parameters together (it fails when it wraps the model, after loading), nor toggle
    ``requires_grad`` for a schedule. FSDP2 always keeps the original parameters: nothing
    to check. Returns whether the run must set ``use_orig_params``.
    """
    if settings.fsdp_version != 1:
        return False
    value, where = settings.fsdp_use_orig_params, settings.fsdp_use_orig_params_source
    frozen = sum(1 for d in plan if not d.trainable)
    mixed = (frozen and frozen < len(plan.decisions)) or plan.is_dynamic
    if value or not mixed:
        return False
    if value is None and can_set:
        return True
    trained = len(plan.decisions) - frozen
    raise InvalidArgumentError(
        where,
        value if value is not None else "unset (false)",
        "true with FSDP1 when the plan freezes some parameters or follows a schedule",
        f"FSDP1 flattens each wrapped module's parameters into one FlatParameter with a single requires_grad, so "
        f"without use_orig_params it cannot hold frozen and trainable parameters together ({trained} of "
        f"{len(plan.decisions)} parameter tensors train here). Set use_orig_params: true, or use FSDP2 "
        "(fsdp_config version 2, the default in transformers 5; accelerate launch --fsdp_version 2), which keeps "
        "the original parameters.",
    )


def _check_deepspeed(plan: "StrategyPlan", settings: DistributedSettings) -> None:
    """Refuse a dynamic plan (gradual unfreezing, LISA) under DeepSpeed.

    DeepSpeed's ZeRO optimizers flatten every parameter that requires grad when they are
    built into their own buffers: a parameter that gets no gradient at a step is still
    stepped there (with a zero gradient: its moments and weight decay move it), and its
    optimizer state cannot be dropped. Measured on CPU with ZeRO-2 and LISA: layers that
    were inactive moved. DDP and FSDP2 train such plans exactly.
    """
    if not plan.is_dynamic or settings.deepspeed_config is None:
        return None
    schedules = ", ".join(sorted(plan.schedules)) or "active_from steps (gradual unfreezing)"
    raise PlanError(
        f"This plan trains its layers on a schedule ({schedules}), which DeepSpeed cannot follow "
        f"({settings.deepspeed_source}): its ZeRO optimizers step every parameter that was trainable when they were "
        "built, also at steps where the schedule leaves it without a gradient (its moments and weight decay still "
        "move it). Train dynamic schedules with DDP or FSDP2 (fsdp_config version 2), or use a static plan with "
        "DeepSpeed."
    )


def check_deepspeed_keeps_groups(plan: "StrategyPlan", settings: DistributedSettings, options: str) -> None:
    """Refuse a DeepSpeed config that would replace the plan's optimizer groups.

    With an ``"optimizer"`` block the Trainer lets DeepSpeed build the optimizer over all
    parameters and never calls ``create_optimizer``; with a ``"scheduler"`` block
    DeepSpeed's schedulers (``WarmupLR``, ``WarmupDecayLR``...) set one absolute rate on
    every group. Either way per-group rates would be lost silently.

    Args:
        plan: the finished plan; nothing is checked when it needs only the default layout.
        settings: the run's distributed settings (its DeepSpeed config).
        options: the options that made the groups, for the message.

    Raises:
        PlanError: naming the config, the blocks to remove and the alternative.
    """
    if not plan.has_custom_groups:
        return
    config, where = settings.deepspeed_config, settings.deepspeed_source
    blocks = [key for key in ("optimizer", "scheduler") if isinstance(config, dict) and key in config]
    if not blocks:
        return
    quoted = " and ".join(f'"{b}"' for b in blocks)
    raise PlanError(
        f"{where} has {'an' if blocks[0] == 'optimizer' else 'a'} {quoted} block, which would make DeepSpeed "
        f"replace the plan's optimizer groups {plan.group_names()} (set by {options}) without a word: an "
        '"optimizer" block makes the Trainer skip create_optimizer, a "scheduler" block sets one rate on every '
        f"group. Remove the {quoted} {'blocks' if len(blocks) > 1 else 'block'} from the DeepSpeed config: the "
        "Trainer then builds the optimizer from `optim=` and the plan, and its `lr_scheduler_type` schedule, and "
        f"DeepSpeed wraps them. Or drop {options}."
    )
