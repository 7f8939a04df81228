"""Precision as a core service: the precision options, and the decision that maps them onto the hardware.

:class:`PrecisionArguments` holds ``precision`` (``auto|bf16|fp16|fp32``), ``pure_bf16`` and
``frozen_dtype``. :func:`decide_precision` maps them onto ``TrainingArguments.fp16`` / ``bf16``
for the hardware at hand (a :class:`~.hardware.HardwareProbe`, which the
``hfls_hardware_probe`` hook can replace), refusing what would silently train in another
precision than asked. It is made once per run, by the run context, and read from there by the
mixed-precision strategy (``strategies/mixed_precision.py``), which writes every parameter's
dtype into the plan. With no precision option set nothing is decided: ``TrainingArguments`` and
the model's dtypes are used as the user gave them.

Why ``tf32`` is not a precision option: ``TrainingArguments`` already has ``tf32``, and
``HfArgumentParser`` refuses two dataclasses with one key. The user writes ``tf32: true``; it
lands in ``TrainingArguments`` (which turns TF32 on), and the decision checks it against the
hardware and reports it in the plan.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional

from torch import nn
from transformers.utils import logging

from ..errors import InvalidArgumentError
from .anatomy import parameter_numel
from .distributed import DistributedSettings
from .dtypes import SHORT_NAME, TORCH_DTYPE, check_frozen_dtype, normalise_dtype_name
from .hardware import HardwareProbe
from .options import OptionGroup, check_bool

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)


@dataclass
class PrecisionArguments(OptionGroup):
    """Mixed precision: autocast chosen for the hardware, fp32 master weights, frozen weights kept narrow."""

    precision: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Training precision: 'auto', 'bf16', 'fp16' or 'fp32'; unset (default): TrainingArguments' "
                "fp16/bf16 and the model's dtypes are used as given. Mapped onto TrainingArguments' fp16/bf16 by "
                "resolve_training_arguments (StrategyTrainer does it at construction, on your object). 'auto': bf16 "
                "autocast where the accelerator has native bf16, fp16 autocast on CUDA GPUs without it, and on a "
                "CPU fp32 (bf16 autocast if the model was loaded in bf16). With autocast, trainable parameters "
                "are kept in fp32 and frozen ones stay as loaded. TF32 is TrainingArguments' own `tf32` key."
            )
        },
    )
    pure_bf16: bool = field(
        default=False,
        metadata={
            "help": (
                "Train bf16 weights directly, with no fp32 copy of the trainable parameters (every parameter "
                "is cast to bf16). Less memory, less precise updates. Needs bf16 hardware; refused with fp16 "
                "and with DeepSpeed ZeRO-3 (which keeps its own fp32 master weights)."
            )
        },
    )
    frozen_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Cast frozen parameters to this dtype: 'bf16', 'fp16' or 'fp32' (unset: keep them as loaded). "
                "Under autocast it must be the autocast dtype or fp32; with precision fp32 only fp32."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.precision = normalise_dtype_name("precision", self.precision, allow_auto=True)
        self.frozen_dtype = normalise_dtype_name("frozen_dtype", self.frozen_dtype, allow_auto=False)
        check_bool("pure_bf16", self.pure_bf16)
        if self.pure_bf16 and self.precision in ("fp16", "fp32"):
            raise InvalidArgumentError(
                "pure_bf16", True, f"false with precision={self.precision}",
                "pure_bf16 trains bf16 weights; use precision: bf16 or auto with it.",
            )
        if self.precision not in (None, "auto") or self.pure_bf16:
            mode = "bf16" if self.pure_bf16 else str(self.precision)
            check_frozen_dtype(mode, self.pure_bf16, self.frozen_dtype, f"precision={self.precision}")

    @property
    def asks_precision(self) -> bool:
        """Whether a precision option is set; without one, precision is the user's ``TrainingArguments``' affair."""
        return self.precision is not None or bool(self.pure_bf16) or self.frozen_dtype is not None


@dataclass(frozen=True)
class PrecisionDecision:
    """How a run trains: autocast mode, flags for ``TrainingArguments``, and why.

    Attributes:
        precision, pure_bf16, frozen_dtype: the options it was decided from
            (``precision`` ``None``: unset, the flags as the user gave them).
        mode: ``"bf16"`` or ``"fp16"`` (autocast) or ``"fp32"`` (none).
        fp16, bf16, use_cpu: the ``TrainingArguments`` values it implies.
        tf32: ``TrainingArguments.tf32`` as given (``None``: PyTorch's default).
        reason: why this mode.
        device: the probed device, described.
        model_dtype: the dtype holding most of the model's parameters, if known.
        user_fp16, user_bf16: the flags the user set in ``TrainingArguments``.
        notes: remarks for the plan.
        zero3: DeepSpeed ZeRO-3 is configured: DeepSpeed casts the (partitioned) parameters
            itself and keeps fp32 master weights of the trainable ones, so the plan casts nothing.
    """

    precision: Optional[str]
    pure_bf16: bool
    frozen_dtype: Optional[str]
    mode: str
    fp16: bool
    bf16: bool
    use_cpu: bool
    tf32: Optional[bool]
    reason: str
    device: str
    model_dtype: Optional[str] = None
    user_fp16: bool = False
    user_bf16: bool = False
    notes: tuple[str, ...] = ()
    zero3: bool = False

    def matches(self, options: PrecisionArguments) -> bool:
        """Whether this was decided from the same precision options."""
        return (self.precision, self.pure_bf16, self.frozen_dtype) == (
            options.precision, options.pure_bf16, options.frozen_dtype,
        )

    def summary(self) -> str:
        """One line for the plan table."""
        if self.zero3:
            weights = "parameters as loaded (DeepSpeed ZeRO-3 casts them and keeps fp32 master weights)"
        elif self.pure_bf16:
            weights = "every parameter bfloat16 (pure_bf16: no fp32 copy)"
        elif self.precision is None and self.frozen_dtype is None:
            weights = "parameters as loaded"
        elif self.mode == "fp32":
            weights = "every parameter float32"
        else:
            frozen = TORCH_DTYPE[self.frozen_dtype][6:] if self.frozen_dtype else "as loaded"
            weights = f"trainable float32, frozen {frozen}"
        mode = "fp32 (no autocast)" if self.mode == "fp32" else f"{self.mode} autocast"
        tf32 = {None: "default", True: "on", False: "off"}[self.tf32]
        return f"{mode}, {weights}; tf32 {tf32}; on {self.device}. Why: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``strategy_plan.json``'s ``settings.precision``)."""
        # "decides": what a resumed run must share (StrategyPlan.differences); not the device.
        return {
            **dataclasses.asdict(self), "notes": list(self.notes), "summary": self.summary(),
            "decides": ["mode", "pure_bf16", "frozen_dtype"],
        }


def dominant_dtype(dtypes_and_sizes: Iterable[tuple[str, int]]) -> Optional[str]:
    """The floating dtype (``"torch.bfloat16"`` ...) holding most elements, or ``None``."""
    totals: dict[str, int] = {}
    for dtype, numel in dtypes_and_sizes:
        if dtype in SHORT_NAME:
            totals[dtype] = totals.get(dtype, 0) + numel
    return max(totals, key=lambda d: totals[d]) if totals else None


def model_dtype(model: nn.Module) -> Optional[str]:
    """The floating dtype that holds most of ``model``'s parameters."""
    return dominant_dtype((str(p.dtype), parameter_numel(p)) for p in model.parameters())


# -- the decision, step by step ------------------------------------------------------------------


@dataclass(frozen=True)
class _Flags:
    """The precision the user's ``TrainingArguments`` or DeepSpeed config already ask for."""

    user_fp16: bool
    user_bf16: bool
    flag: Optional[str]  # "fp16" / "bf16" asked by TrainingArguments or DeepSpeed, else None
    source: str  # where it is asked, for messages
    zero3: bool


def _read_flags(training_args: Optional["TrainingArguments"], settings: DistributedSettings) -> _Flags:
    user_fp16 = bool(getattr(training_args, "fp16", False))
    user_bf16 = bool(getattr(training_args, "bf16", False))
    ds = settings.deepspeed_config
    ds_flag = None
    if ds is not None:
        ds_flag = next((flag for flag in ("fp16", "bf16") if settings.deepspeed_enables(flag)), None)
    flag, source = None, ""
    if user_fp16 or user_bf16:
        flag = "fp16" if user_fp16 else "bf16"
        source = f"TrainingArguments.{flag}=true"
        if ds_flag is not None and ds_flag != flag:
            raise InvalidArgumentError(
                "deepspeed", f"{{'{ds_flag}': {{'enabled': true}}}}", f"'{flag}' enabled, or 'auto', when {source}",
                "Write \"enabled\": \"auto\" in the DeepSpeed config so that it follows TrainingArguments.",
            )
    elif ds_flag is not None:
        flag, source = ds_flag, f"the DeepSpeed config sets {ds_flag}.enabled=true"
    return _Flags(user_fp16, user_bf16, flag, source, ds is not None and settings.zero_stage == 3)


def _check_pure_bf16(options: PrecisionArguments, flags: _Flags) -> None:
    if not options.pure_bf16:
        return
    if flags.flag == "fp16":
        raise InvalidArgumentError(
            "pure_bf16", True, f"false when {flags.source}",
            "pure_bf16 trains bf16 weights; fp16 autocast would need fp32 master weights.",
        )
    if flags.zero3:
        raise InvalidArgumentError(
            "pure_bf16", True, "false with DeepSpeed ZeRO-3",
            "ZeRO-3 partitions its own fp32 master weights, so pure bf16 training cannot happen there; "
            "drop pure_bf16 (bf16 autocast with ZeRO-3 already shards the fp32 copy).",
        )


def _auto_mode(probe: HardwareProbe, model_dtype_: Optional[str]) -> tuple[str, str]:
    device = probe.describe()
    if probe.cuda_available:
        if probe.bf16_supported:
            return "bf16", f"auto: {device} supports bf16"
        return "fp16", f"auto: {device} has no native bf16, so fp16 autocast with loss scaling"
    if probe.device_type == "cpu":
        if model_dtype_ == "torch.bfloat16":
            return "bf16", (
                "auto: CPU, and the model was loaded in bfloat16: bf16 autocast keeps the frozen weights in "
                "bfloat16 (fp32 would double them)"
            )
        return "fp32", (
            "auto: CPU, where autocast pays only with AMX/AVX512-BF16 and fp16 autocast does not exist; write "
            "precision: bf16 for bf16 autocast"
        )
    if probe.bf16_supported:
        return "bf16", f"auto: {device} supports bf16"
    return "fp32", f"auto: {device} has no bf16 (fp16 autocast is chosen automatically on CUDA GPUs only)"


def _choose_mode(
    options: PrecisionArguments, flags: _Flags, probe: HardwareProbe, model_dtype_: Optional[str], fixed: bool
) -> tuple[str, str]:
    """``(mode, reason)``: the requested precision, else the flags the user set, else what the hardware does best."""
    requested = options.precision if options.precision is not None else "auto"
    if requested != "auto":
        if flags.flag is not None and flags.flag != requested:
            raise InvalidArgumentError(
                "precision", requested, f"'{flags.flag}' or 'auto' when {flags.source}",
                f"Set one of them: precision: {requested} with {flags.flag} off, or precision: auto.",
            )
        return requested, f"precision={requested}"
    if flags.flag is not None:
        return flags.flag, f"auto: {flags.source}"
    if options.pure_bf16:
        return "bf16", "pure_bf16 trains bf16 weights (bf16 autocast on top)"
    if fixed:
        return "fp32", (
            "auto with StrategyCallback: the Trainer's TrainingArguments have fp16 and bf16 off (set bf16: true, "
            "or pass them through resolve_training_arguments, to use autocast)"
        )
    return _auto_mode(probe, model_dtype_)


def _asking_option(options: PrecisionArguments, flags: _Flags) -> tuple[str, Any]:
    """The option that asked for the mode, for a refusal to name."""
    requested = options.precision if options.precision is not None else "auto"
    if requested != "auto":
        return "precision", requested
    if flags.user_fp16 or flags.user_bf16:
        return str(flags.flag), True
    if flags.flag is not None:
        return "deepspeed", f"{{'{flags.flag}': {{'enabled': true}}}}"
    if options.pure_bf16:
        return "pure_bf16", True
    return "precision", requested


def _check_mode_runs_here(
    mode: str, options: PrecisionArguments, flags: _Flags, probe: HardwareProbe, fixed: bool
) -> None:
    """Refuse a mode that the Trainer's fixed flags or the hardware would silently change."""
    if fixed and mode != (flags.flag or "fp32"):
        requested = options.precision if options.precision is not None else "auto"
        option, value = ("pure_bf16", True) if options.pure_bf16 and requested == "auto" else ("precision", requested)
        raise InvalidArgumentError(
            option, value,
            f"consistent with the Trainer's TrainingArguments (fp16={flags.user_fp16}, bf16={flags.user_bf16})",
            f"StrategyCallback runs inside a Trainer whose accelerator is already set up from TrainingArguments, "
            f"so it cannot switch to {mode}. Set {mode}: true in TrainingArguments, build them with "
            "resolve_training_arguments(training_args, strategy_args), or use StrategyTrainer.",
        )
    option, value = _asking_option(options, flags)
    if mode == "fp16" and probe.device_type == "cpu":
        raise InvalidArgumentError(
            option, value, "bf16 or fp32 on a CPU",
            "accelerate has no fp16 autocast on CPU and would train in fp32 without a word. Use precision: bf16 "
            "for bf16 autocast, or fp32.",
        )
    if mode == "bf16" and not probe.bf16_supported:
        raise InvalidArgumentError(
            option, value, f"fp16 or fp32 on {probe.describe()}, which has no native bf16",
            "bf16 there is emulated (slow) or unavailable. Use precision: fp16 (autocast with loss scaling), "
            "fp32, or auto.",
        )


def _check_tf32_and_frozen(
    options: PrecisionArguments, mode: str, reason: str, tf32: Optional[bool], probe: HardwareProbe, zero3: bool
) -> None:
    if tf32 and not probe.tf32_supported:
        raise InvalidArgumentError(
            "tf32", True, f"false or unset on {probe.describe()}",
            "TF32 needs an NVIDIA GPU of the Ampere generation or newer (compute capability 8.0).",
        )
    check_frozen_dtype(mode, options.pure_bf16, options.frozen_dtype, reason)
    if zero3 and options.frozen_dtype is not None:
        raise InvalidArgumentError(
            "frozen_dtype", options.frozen_dtype, "unset with DeepSpeed ZeRO-3",
            "ZeRO-3 partitions every parameter and casts it to the dtype of its own fp16/bf16 setting (fp32 "
            "without), frozen ones included, so a frozen_dtype could not hold.",
        )


def _notes(mode: str, probe: HardwareProbe, training_args: Optional["TrainingArguments"], fixed: bool,
           settings: DistributedSettings, zero3: bool) -> tuple[bool, list[str]]:
    """``(use_cpu, notes)`` for the plan."""
    notes: list[str] = []
    use_cpu = bool(getattr(training_args, "use_cpu", False))
    if mode == "bf16" and probe.device_type == "cpu" and training_args is not None and not use_cpu and not fixed:
        # TrainingArguments refuses bf16 without a bf16 GPU unless use_cpu is set; the device is the CPU anyway.
        use_cpu = True
        notes.append("use_cpu set to true: bf16 autocast on the CPU (no GPU was found).")
    if zero3:
        notes.append(
            "DeepSpeed ZeRO-3: no parameter is cast here (no fp32 upcast of the trainable ones). ZeRO-3 "
            "partitions the parameters, casts them to its fp16/bf16 setting and keeps fp32 master weights of "
            "the trainable ones in its optimizer; the dtypes in this plan are the ones the model was loaded in."
        )
    elif settings.deepspeed_config is not None:
        notes.append(
            "DeepSpeed manages parameter dtypes itself once it takes over the model (with fp16/bf16 enabled it "
            "casts the module and keeps its own fp32 master weights); the dtypes in this plan are the ones the "
            "model holds before that."
        )
    return use_cpu, notes


def _as_given(training_args: Optional["TrainingArguments"], probe: HardwareProbe,
              model_dtype_: Optional[str]) -> PrecisionDecision:
    """No option asked: the flags described as given, nothing refused (the Trainer decides)."""
    user_fp16 = bool(getattr(training_args, "fp16", False))
    user_bf16 = bool(getattr(training_args, "bf16", False))
    flag = "fp16" if user_fp16 else "bf16" if user_bf16 else None
    return PrecisionDecision(
        precision=None, pure_bf16=False, frozen_dtype=None, mode=flag or "fp32", fp16=user_fp16, bf16=user_bf16,
        use_cpu=bool(getattr(training_args, "use_cpu", False)),
        tf32=getattr(training_args, "tf32", None) if training_args is not None else None,
        reason="precision unset: TrainingArguments as given", device=probe.describe(), model_dtype=model_dtype_,
        user_fp16=user_fp16, user_bf16=user_bf16,
    )


def decide_precision(
    options: PrecisionArguments,
    training_args: Optional["TrainingArguments"] = None,
    *,
    probe: HardwareProbe,
    model_dtype: Optional[str] = None,
    fixed: bool = False,
    distributed: Optional[DistributedSettings] = None,
) -> PrecisionDecision:
    """Decide the training precision, or refuse with an :class:`InvalidArgumentError`.

    Args:
        options: ``precision``, ``pure_bf16``, ``frozen_dtype`` (the run's ``StrategyArguments``).
        training_args: the user's ``fp16`` / ``bf16`` / ``tf32`` / ``deepspeed`` / ``use_cpu``.
        probe: the training device.
        model_dtype: the dtype holding most of the model (``"torch.bfloat16"``), if known;
            ``auto`` on a CPU picks bf16 autocast for a model loaded in bf16.
        fixed: the ``TrainingArguments`` cannot change any more (``StrategyCallback`` on a
            built Trainer): ``auto`` follows them, and an explicit ``precision`` must agree.
        distributed: the run's DeepSpeed settings (default: read from ``training_args``).
    """
    if not options.asks_precision:
        return _as_given(training_args, probe, model_dtype)
    settings = distributed if distributed is not None else DistributedSettings.read(training_args)
    flags = _read_flags(training_args, settings)
    _check_pure_bf16(options, flags)
    mode, reason = _choose_mode(options, flags, probe, model_dtype, fixed)
    _check_mode_runs_here(mode, options, flags, probe, fixed)
    tf32 = getattr(training_args, "tf32", None) if training_args is not None else None
    _check_tf32_and_frozen(options, mode, reason, tf32, probe, flags.zero3)
    use_cpu, notes = _notes(mode, probe, training_args, fixed, settings, flags.zero3)
    return PrecisionDecision(
        precision=options.precision, pure_bf16=options.pure_bf16, frozen_dtype=options.frozen_dtype, mode=mode,
        fp16=mode == "fp16", bf16=mode == "bf16", use_cpu=use_cpu, tf32=tf32, reason=reason,
        device=probe.describe(), model_dtype=model_dtype, user_fp16=flags.user_fp16, user_bf16=flags.user_bf16,
        notes=tuple(notes), zero3=flags.zero3,
    )


def apply_precision_decision(
    training_args: "TrainingArguments", decision: Optional[PrecisionDecision], in_place: bool = False
) -> "TrainingArguments":
    """``training_args`` with the fp16/bf16/use_cpu flags of ``decision`` (a copy unless ``in_place``).

    A changed flag is applied through ``dataclasses.replace``, so ``__post_init__`` runs again and
    accelerate's ``mixed_precision`` and a DeepSpeed config's ``"auto"`` fields follow it.
    """
    if decision is None:
        return training_args if in_place else copy.copy(training_args)
    changes: dict[str, Any] = {}
    if bool(training_args.fp16) != decision.fp16:
        changes["fp16"] = decision.fp16
    if bool(training_args.bf16) != decision.bf16:
        changes["bf16"] = decision.bf16
    if decision.use_cpu and not training_args.use_cpu:
        changes["use_cpu"] = True
    resolved = dataclasses.replace(training_args, **changes) if changes else copy.copy(training_args)
    logger.info(f"hf-llama-strategies precision: {decision.summary()}")
    if not in_place:
        return resolved
    if changes:
        logger.warning(
            "hf-llama-strategies precision: TrainingArguments changed in place ("
            + ", ".join(f"{key}={value}" for key, value in changes.items())
            + f"), as the precision options ask: {decision.reason}."
        )
    # Everything __post_init__ derived from the new flags (accelerate's mixed_precision, a
    # DeepSpeed config's "auto" fields) comes along.
    vars(training_args).update(vars(resolved))
    return training_args
