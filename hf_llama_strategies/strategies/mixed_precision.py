"""Mixed precision, the strategy: fp32 master weights, half-precision frozen weights.

Options: ``precision`` (``auto|bf16|fp16|fp32``), ``pure_bf16``, ``frozen_dtype``; TF32 is
``TrainingArguments.tf32``. With none of them set nothing here acts: ``TrainingArguments`` and
the model's dtypes are used as the user gave them.

The options, their checks, and the run's precision decision (which autocast, which
``TrainingArguments`` flags, for which hardware) are the core service
:mod:`hf_llama_strategies.core.precision`: the decision is needed before the ``Trainer`` exists,
and is made once per run and handed here in the run context. This module writes every
parameter's ``dtype`` into the plan:

=============  ===============================  =====================================
mode           trainable parameters             frozen parameters
=============  ===============================  =====================================
bf16 / fp16    float32 (fp32 master weights)    as loaded, or ``frozen_dtype``
fp32           float32                          float32
``pure_bf16``  bfloat16 (no fp32 copy)          bfloat16
ZeRO-3         as loaded (DeepSpeed casts, fp32  as loaded (DeepSpeed casts)
               master weights in its optimizer)
=============  ===============================  =====================================

:meth:`StrategyPlan.apply` casts the parameters before the optimizer exists.
"""

from __future__ import annotations

from ..core.dtypes import SHORT_NAME, TORCH_DTYPE
from ..core.hookspecs import HookContext, hookimpl
from ..core.plan import StrategyPlan
from ..core.precision import PrecisionDecision


@hookimpl(trylast=True)
def hfls_adjust_plan(plan: StrategyPlan, context: HookContext) -> None:
    """Decide every floating-point parameter's dtype, after every strategy decided ``trainable``.

    With no precision option set, every dtype stays as loaded and no decision is recorded.
    """
    if context.precision is not None:
        _plan_dtypes(plan, context.precision)
    if context.distributed.fsdp_version == 1 and len({d.dtype for d in plan}) > 1:
        plan.note(
            "FSDP1 flattens the parameters of each wrapped module into one tensor of one dtype, and this plan "
            "mixes dtypes; use FSDP2 (fsdp_config version 2, the default) or frozen_dtype: fp32."
        )


def _plan_dtypes(plan: StrategyPlan, decision: PrecisionDecision) -> None:
    upcast: set[str] = set()
    frozen_fp16_under_bf16 = False
    for d in plan:
        if d.dtype not in SHORT_NAME or decision.zero3:
            # Integer / quantized / float64 storage is not ours to change; under ZeRO-3
            # DeepSpeed casts (and may already have partitioned) every parameter itself.
            continue
        if decision.pure_bf16:
            target, why = "bf16", "pure_bf16: bf16 weights, no fp32 copy"
        elif decision.mode == "fp32":
            target, why = "fp32", f"fp32 training ({decision.reason})"
            if d.dtype != TORCH_DTYPE["fp32"]:
                upcast.add(d.dtype[len("torch."):])
        elif d.trainable:
            target, why = "fp32", f"{decision.mode} autocast: trainable parameters keep fp32 master weights"
        elif decision.frozen_dtype is not None:
            target, why = decision.frozen_dtype, f"frozen_dtype={decision.frozen_dtype}"
        else:
            frozen_fp16_under_bf16 |= decision.mode == "bf16" and d.dtype == TORCH_DTYPE["fp16"]
            continue  # frozen: kept as loaded
        plan.set([d.name], why, dtype=TORCH_DTYPE[target])

    plan.settings["precision"] = decision.to_dict()
    for note in decision.notes:
        plan.note(note)
    if upcast:
        plan.note(
            f"Parameters loaded in {', '.join(sorted(upcast))} are cast to float32 for fp32 training "
            "(twice their memory); precision: bf16 keeps the frozen ones in half precision."
        )
    if frozen_fp16_under_bf16:
        plan.note(
            "Frozen float16 parameters under bf16 autocast: their matmuls run in bf16, with fewer mantissa bits "
            "than float16. frozen_dtype: fp32 keeps them exact; on a CUDA GPU, precision: fp16 uses them as they are."
        )


__all__ = ["hfls_adjust_plan"]
