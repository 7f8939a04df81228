"""Precision as a core service: the hardware probe, the precision decision, ``resolve_training_arguments``.

The decision maps the ``precision`` option (``auto|bf16|fp16|fp32``), ``pure_bf16`` and
``frozen_dtype`` onto ``TrainingArguments.fp16`` / ``bf16`` for the hardware at hand (a
:class:`HardwareProbe`, which the ``hfls_hardware_probe`` hook can replace), refusing what
would silently train in another precision than asked. It is made once per run, by the
:class:`~hf_llama_strategies.context.RunContext`, and read from there by the precision
strategy (``strategies/precision.py``), which writes every parameter's dtype into the plan.
With no precision option set nothing is decided: ``TrainingArguments`` and the model's dtypes
are used as the user gave them.

Why ``tf32`` is not a field of ``StrategyArguments``: ``TrainingArguments`` already has ``tf32``,
and ``HfArgumentParser`` refuses two dataclasses with one key. The user writes ``tf32: true`` as
the design says; it lands in ``TrainingArguments`` (which turns TF32 on), and the decision
checks it against the hardware and reports it in the plan.
"""

from __future__ import annotations

import copy
import dataclasses
import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch import nn
from transformers.utils import logging

from .anatomy import parameter_numel
from .distributed import DistributedSettings
from .errors import InvalidArgumentError
from .hookspecs import hookimpl
from .plugins import plugin_manager_for

if TYPE_CHECKING:
    from transformers import TrainingArguments

    from .arguments import StrategyArguments

logger = logging.get_logger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
TORCH_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
#: ``"torch.bfloat16"`` -> ``"bf16"``.
SHORT_NAME = {v: k for k, v in TORCH_DTYPE.items()}


# -- hardware --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwareProbe:
    """What the training device can do, as far as precision is concerned.

    Tests (and ``plan`` runs for another machine) build one by hand, e.g.
    ``HardwareProbe("cuda", "Tesla T4", bf16_supported=False, compute_capability=(7, 5))``,
    and pass it as ``probe=`` or return it from an ``hfls_hardware_probe`` hook.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ``"mps"``, ``"xpu"``... (``torch.device.type``).
        device_name: human-readable name, for messages.
        bf16_supported: native bf16 compute (a CUDA GPU of compute capability 8.0 or newer;
            every CPU runs bf16 autocast, fast with AMX/AVX512-BF16).
        tf32_supported: TF32 matmuls (CUDA, Ampere or newer).
        compute_capability: CUDA compute capability, for messages.
    """

    device_type: str
    device_name: str = ""
    bf16_supported: bool = False
    tf32_supported: bool = False
    compute_capability: Optional[tuple[int, int]] = None

    @property
    def cuda_available(self) -> bool:
        """True when training runs on a CUDA (or ROCm) GPU."""
        return self.device_type == "cuda"

    def describe(self) -> str:
        """``"Tesla T4 (cuda, compute capability 7.5)"``."""
        details = [self.device_type]
        if self.compute_capability is not None:
            details.append("compute capability {}.{}".format(*self.compute_capability))
        name = self.device_name or self.device_type
        return f"{name} ({', '.join(details)})" if name != self.device_type else name

    @classmethod
    def detect(cls, training_args: Optional["TrainingArguments"] = None) -> "HardwareProbe":
        """Ask torch about the device ``training_args`` trains on (default: the first GPU, else CPU)."""
        if training_args is not None:
            device = training_args.device
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            with torch.cuda.device(index):
                # Without emulation: on a T4 or V100 bf16 "works" through slow emulation.
                bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            capability = tuple(torch.cuda.get_device_capability(index))
            tf32 = torch.version.hip is None and capability >= (8, 0)
            return cls("cuda", torch.cuda.get_device_name(index), bf16, tf32, capability)  # type: ignore[arg-type]
        if device.type == "cpu":
            return cls("cpu", platform.processor() or platform.machine() or "cpu", bf16_supported=True)
        from transformers.utils import is_torch_bf16_gpu_available

        return cls(device.type, device.type, bf16_supported=is_torch_bf16_gpu_available())


@hookimpl(trylast=True)
def hfls_hardware_probe(training_args: Optional["TrainingArguments"]) -> HardwareProbe:
    """The built-in probe: asks torch (last in line, so any plugin can answer first)."""
    return HardwareProbe.detect(training_args)


# -- the decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionDecision:
    """How a run trains: autocast mode, flags for ``TrainingArguments``, and why.

    Attributes:
        precision, pure_bf16, frozen_dtype: the strategy options it was decided from
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

    def matches(self, strategy_args: "StrategyArguments") -> bool:
        """Whether this was decided from the same precision options."""
        return (self.precision, self.pure_bf16, self.frozen_dtype) == (
            strategy_args.precision, strategy_args.pure_bf16, strategy_args.frozen_dtype,
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


def _refuse(option: str, value: Any, expected: str, hint: Optional[str] = None) -> InvalidArgumentError:
    return InvalidArgumentError(option, value, expected, hint)


def normalise_dtype_name(option: str, value: Any, allow_auto: bool) -> Optional[str]:
    """``"BF16"``, ``"bfloat16"`` -> ``"bf16"`` (``"auto"`` where allowed); refuses anything else, naming ``option``."""
    valid = "'auto', 'bf16', 'fp16' or 'fp32' (or unset)" if allow_auto else "'bf16', 'fp16', 'fp32' or unset"
    if value is None:
        return None
    if not isinstance(value, str):
        raise _refuse(option, value, valid)
    key = value.strip().lower()
    if allow_auto and key == "auto":
        return "auto"
    if key not in _ALIASES:
        raise _refuse(option, value, valid)
    return _ALIASES[key]


def check_frozen_dtype(mode: str, pure_bf16: bool, frozen_dtype: Optional[str], why: str) -> None:
    """Refuse a ``frozen_dtype`` that cannot work in ``mode`` (``why`` says where the mode comes from)."""
    if frozen_dtype is None:
        return
    if pure_bf16:
        if frozen_dtype != "bf16":
            raise _refuse(
                "frozen_dtype", frozen_dtype, "'bf16' or unset with pure_bf16",
                "pure_bf16 keeps every parameter in bf16.",
            )
    elif mode == "fp32":
        if frozen_dtype != "fp32":
            raise _refuse(
                "frozen_dtype", frozen_dtype, f"'fp32' or unset when training in fp32 ({why})",
                "Without autocast, half-precision frozen weights meet fp32 activations and the forward pass "
                "fails on mixed dtypes. Use precision: bf16 (or fp16 on a GPU without bf16) to keep frozen "
                "weights in half precision.",
            )
    elif frozen_dtype not in (mode, "fp32"):
        raise _refuse(
            "frozen_dtype", frozen_dtype, f"'{mode}', 'fp32' or unset under {mode} autocast ({why})",
            f"Frozen weights in {frozen_dtype} would be converted to {mode} by autocast at every step.",
        )


def asks_precision(strategy_args: "StrategyArguments") -> bool:
    """Whether a precision option is set; without one, precision is the user's ``TrainingArguments``' affair."""
    args = strategy_args
    return args.precision is not None or bool(args.pure_bf16) or args.frozen_dtype is not None


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


def decide_precision(
    strategy_args: "StrategyArguments",
    training_args: Optional["TrainingArguments"] = None,
    *,
    probe: HardwareProbe,
    model_dtype: Optional[str] = None,
    fixed: bool = False,
    distributed: Optional[DistributedSettings] = None,
) -> PrecisionDecision:
    """Decide the training precision, or refuse with an :class:`InvalidArgumentError`.

    Args:
        strategy_args: ``precision``, ``pure_bf16``, ``frozen_dtype``.
        training_args: the user's ``fp16`` / ``bf16`` / ``tf32`` / ``deepspeed`` / ``use_cpu``.
        probe: the training device.
        model_dtype: the dtype holding most of the model (``"torch.bfloat16"``), if known;
            ``auto`` on a CPU picks bf16 autocast for a model loaded in bf16.
        fixed: the ``TrainingArguments`` cannot change any more (``StrategyCallback`` on a
            built Trainer): ``auto`` follows them, and an explicit ``precision`` must agree.
        distributed: the run's DeepSpeed settings (default: read from ``training_args``).
    """
    args = strategy_args
    user_fp16 = bool(getattr(training_args, "fp16", False))
    user_bf16 = bool(getattr(training_args, "bf16", False))
    if not asks_precision(args):
        # No option asked: describe the flags as given, refuse nothing (the Trainer decides).
        flag = "fp16" if user_fp16 else "bf16" if user_bf16 else None
        return PrecisionDecision(
            precision=None, pure_bf16=False, frozen_dtype=None, mode=flag or "fp32", fp16=user_fp16, bf16=user_bf16,
            use_cpu=bool(getattr(training_args, "use_cpu", False)),
            tf32=getattr(training_args, "tf32", None) if training_args is not None else None,
            reason="precision unset: TrainingArguments as given", device=probe.describe(), model_dtype=model_dtype,
            user_fp16=user_fp16, user_bf16=user_bf16,
        )
    # pure_bf16 or frozen_dtype without precision: as `auto`.
    requested = args.precision if args.precision is not None else "auto"
    settings = distributed if distributed is not None else DistributedSettings.read(training_args)
    ds = settings.deepspeed_config
    zero3 = ds is not None and settings.zero_stage == 3
    ds_flag = None
    if ds is not None:
        ds_flag = "fp16" if settings.deepspeed_enables("fp16") else "bf16" if settings.deepspeed_enables("bf16") else None

    flag, source = None, ""
    if user_fp16 or user_bf16:
        flag = "fp16" if user_fp16 else "bf16"
        source = f"TrainingArguments.{flag}=true"
        if ds_flag is not None and ds_flag != flag:
            raise _refuse(
                "deepspeed", f"{{'{ds_flag}': {{'enabled': true}}}}", f"'{flag}' enabled, or 'auto', when {source}",
                "Write \"enabled\": \"auto\" in the DeepSpeed config so that it follows TrainingArguments.",
            )
    elif ds_flag is not None:
        flag, source = ds_flag, f"the DeepSpeed config sets {ds_flag}.enabled=true"

    if args.pure_bf16:
        if flag == "fp16":
            raise _refuse(
                "pure_bf16", True, f"false when {source}",
                "pure_bf16 trains bf16 weights; fp16 autocast would need fp32 master weights.",
            )
        if zero3:
            raise _refuse(
                "pure_bf16", True, "false with DeepSpeed ZeRO-3",
                "ZeRO-3 partitions its own fp32 master weights, so pure bf16 training cannot happen there; "
                "drop pure_bf16 (bf16 autocast with ZeRO-3 already shards the fp32 copy).",
            )

    if requested != "auto":
        if flag is not None and flag != requested:
            raise _refuse(
                "precision", requested, f"'{flag}' or 'auto' when {source}",
                f"Set one of them: precision: {requested} with {flag} off, or precision: auto.",
            )
        mode, reason = requested, f"precision={requested}"
    elif flag is not None:
        mode, reason = flag, f"auto: {source}"
    elif args.pure_bf16:
        mode, reason = "bf16", "pure_bf16 trains bf16 weights (bf16 autocast on top)"
    elif fixed:
        mode, reason = "fp32", (
            "auto with StrategyCallback: the Trainer's TrainingArguments have fp16 and bf16 off (set bf16: true, "
            "or pass them through resolve_training_arguments, to use autocast)"
        )
    else:
        mode, reason = _auto_mode(probe, model_dtype)

    if fixed and mode != (flag or "fp32"):
        option, value = ("pure_bf16", True) if args.pure_bf16 and requested == "auto" else ("precision", requested)
        raise _refuse(
            option, value, f"consistent with the Trainer's TrainingArguments (fp16={user_fp16}, bf16={user_bf16})",
            f"StrategyCallback runs inside a Trainer whose accelerator is already set up from TrainingArguments, "
            f"so it cannot switch to {mode}. Set {mode}: true in TrainingArguments, build them with "
            "resolve_training_arguments(training_args, strategy_args), or use StrategyTrainer.",
        )

    # Name, in a refusal, the option that asked for this mode.
    if requested != "auto":
        option, value = "precision", requested
    elif user_fp16 or user_bf16:
        option, value = flag, True
    elif flag is not None:
        option, value = "deepspeed", f"{{'{flag}': {{'enabled': true}}}}"
    elif args.pure_bf16:
        option, value = "pure_bf16", True
    else:
        option, value = "precision", requested
    if mode == "fp16" and probe.device_type == "cpu":
        raise _refuse(
            option, value, "bf16 or fp32 on a CPU",
            "accelerate has no fp16 autocast on CPU and would train in fp32 without a word. Use precision: bf16 "
            "for bf16 autocast, or fp32.",
        )
    if mode == "bf16" and not probe.bf16_supported:
        raise _refuse(
            option, value, f"fp16 or fp32 on {probe.describe()}, which has no native bf16",
            "bf16 there is emulated (slow) or unavailable. Use precision: fp16 (autocast with loss scaling), "
            "fp32, or auto.",
        )

    tf32 = getattr(training_args, "tf32", None) if training_args is not None else None
    if tf32 and not probe.tf32_supported:
        raise _refuse(
            "tf32", True, f"false or unset on {probe.describe()}",
            "TF32 needs an NVIDIA GPU of the Ampere generation or newer (compute capability 8.0).",
        )
    check_frozen_dtype(mode, args.pure_bf16, args.frozen_dtype, reason)
    if zero3 and args.frozen_dtype is not None:
        raise _refuse(
            "frozen_dtype", args.frozen_dtype, "unset with DeepSpeed ZeRO-3",
            "ZeRO-3 partitions every parameter and casts it to the dtype of its own fp16/bf16 setting (fp32 "
            "without), frozen ones included, so a frozen_dtype could not hold.",
        )

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
    elif ds is not None:
        notes.append(
            "DeepSpeed manages parameter dtypes itself once it takes over the model (with fp16/bf16 enabled it "
            "casts the module and keeps its own fp32 master weights); the dtypes in this plan are the ones the "
            "model holds before that."
        )
    return PrecisionDecision(
        precision=args.precision,
        pure_bf16=args.pure_bf16,
        frozen_dtype=args.frozen_dtype,
        mode=mode,
        fp16=mode == "fp16",
        bf16=mode == "bf16",
        use_cpu=use_cpu,
        tf32=tf32,
        reason=reason,
        device=probe.describe(),
        model_dtype=model_dtype,
        user_fp16=user_fp16,
        user_bf16=user_bf16,
        notes=tuple(notes),
        zero3=zero3,
    )


def decide_for_run(
    strategy_args: "StrategyArguments",
    training_args: Optional["TrainingArguments"],
    plugin_manager: Any,
    *,
    model: Optional[nn.Module] = None,
    probe: Optional[HardwareProbe] = None,
    fixed: bool = False,
    distributed: Optional[DistributedSettings] = None,
) -> Optional[PrecisionDecision]:
    """The run's decision (``None`` when no precision option is set), the hardware asked of ``plugin_manager``.

    ``probe`` stands in for the ``hfls_hardware_probe`` hook; ``model`` gives the dtype it was
    loaded in (``auto`` on a CPU picks bf16 autocast for a bf16 model).
    """
    if not asks_precision(strategy_args):
        return None
    if probe is None:
        probe = plugin_manager.hook.hfls_hardware_probe(training_args=training_args)
    dtype = model_dtype(model) if model is not None else None
    return decide_precision(
        strategy_args, training_args, probe=probe, model_dtype=dtype, fixed=fixed, distributed=distributed
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


def resolve_training_arguments(
    training_args: "TrainingArguments",
    strategy_args: Optional["StrategyArguments"] = None,
    *,
    model: Optional[nn.Module] = None,
    probe: Optional[HardwareProbe] = None,
    plugins: Iterable[object] = (),
    plugin_manager: Any = None,
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
    if strategy_args is None:
        from .arguments import StrategyArguments  # the arguments import this module

        strategy_args = StrategyArguments()
    pm = plugin_manager if plugin_manager is not None else plugin_manager_for(plugins)
    decision = decide_for_run(strategy_args, training_args, pm, model=model, probe=probe)
    return apply_precision_decision(training_args, decision, in_place=in_place)


__all__ = [
    "HardwareProbe",
    "PrecisionDecision",
    "apply_precision_decision",
    "asks_precision",
    "check_frozen_dtype",
    "decide_for_run",
    "decide_precision",
    "hfls_hardware_probe",
    "model_dtype",
    "normalise_dtype_name",
    "resolve_training_arguments",
]
