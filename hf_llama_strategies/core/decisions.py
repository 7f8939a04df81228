"""``ParamDecision``: what a plan decided for one parameter, and the rules that read one.

The plan (:mod:`.plan`) holds one per parameter; strategies change them through
``StrategyPlan.set``; the runtime reads them (optimizer groups, schedules, the table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..errors import PlanError
from .anatomy import LAYER
from .dtypes import torch_dtype

#: The optimizer group of every parameter no strategy has given a group.
DEFAULT_GROUP = "default"
#: ``ParamDecision.reason`` of a parameter no option decided: it trains as the model holds it.
DEFAULT_REASON = "default: full fine-tuning"
#: ``ParamDecision.reason`` of a parameter frozen before the plan (by PEFT, or by hand) that no option decided.
FROZEN_BEFORE_REASON = "frozen before the plan was built (for example by PEFT)"


@dataclass
class ParamDecision:
    """What the plan decided for one parameter.

    Attributes:
        name: the name ``model.named_parameters()`` yields.
        kind: ``embeddings``, ``layer``, ``norm``, ``head`` or ``other``.
        layer: decoder layer index for ``kind == "layer"``, else ``None``.
        numel: number of elements.
        dtype: the dtype the parameter trains in (``torch.float32`` ...): the loaded dtype
            until a strategy plans otherwise; ``StrategyPlan.apply`` casts to it.
        trainable: whether it trains.
        reason: which option decided ``trainable``.
        lr: absolute learning rate; ``None`` means ``TrainingArguments.learning_rate``, or
            ``learning_rate * lr_scale`` when ``lr_scale`` is set and the plan was built
            without ``TrainingArguments`` (a dry run).
        lr_scale: for a rate relative to ``TrainingArguments.learning_rate`` (``layer_lr_decay``,
            ``PATTERN=xSCALE`` rules), the factor; ``None`` for an absolute or default rate.
            With ``TrainingArguments`` known, ``lr`` holds ``learning_rate * lr_scale``.
        lr_reason: which option decided ``lr``.
        weight_decay: weight decay; ``None`` means the Trainer's rule (decay except biases and norms).
        group: optimizer group name.
        tied_with: other names of the same tensor (tied input/output embeddings).
        requires_grad_before: ``requires_grad`` before the plan was applied (PEFT freezes base weights).
        shape: the tensor's shape.
        dtype_reason: which option decided ``dtype`` (``None``: kept as loaded).
        nbytes: bytes the tensor holds, measured by ``StrategyPlan.apply`` after casting;
            ``None`` until then (the table then estimates ``numel`` x the dtype's size).
        active_from: first optimizer step (``global_step``, 0-based) at which a trainable
            parameter trains; ``0`` for static plans. Gradual unfreezing sets it.
        schedule: name of the dynamic schedule (a key of ``StrategyPlan.schedules``) that
            decides, step by step, whether this trainable parameter trains (LISA); ``None``
            means it trains at every step from ``active_from`` on.

    ``trainable`` means "may ever train": the optimizer and a DDP reducer hold every such
    parameter from step 0; ``active_from`` and ``schedule`` say when it actually trains.
    """

    name: str
    kind: str
    layer: Optional[int]
    numel: int
    dtype: str
    trainable: bool = True
    reason: str = DEFAULT_REASON
    lr: Optional[float] = None
    lr_scale: Optional[float] = None
    lr_reason: Optional[str] = None
    weight_decay: Optional[float] = None
    group: str = DEFAULT_GROUP
    tied_with: tuple[str, ...] = ()
    requires_grad_before: bool = True
    shape: tuple[int, ...] = ()
    dtype_reason: Optional[str] = None
    nbytes: Optional[int] = None
    active_from: int = 0
    schedule: Optional[str] = None

    @property
    def block(self) -> str:
        """Row label in the plan table: ``layers.3`` for a layer, else the kind."""
        return f"layers.{self.layer}" if self.kind == LAYER else self.kind

    @property
    def left_to_user(self) -> bool:
        """True when no option decided whether this parameter trains.

        Then its ``requires_grad`` when the optimizer is created decides, as in a plain
        ``Trainer`` (a parameter frozen or unfrozen by hand after the plan was built).
        """
        return self.reason in (DEFAULT_REASON, FROZEN_BEFORE_REASON) and self.active_from == 0 and self.schedule is None


def is_dynamic(decisions: Iterable[ParamDecision]) -> bool:
    """True when some trainable parameter does not train at every step (a schedule)."""
    return any(d.trainable and (d.active_from > 0 or d.schedule is not None) for d in decisions)


def trains(decision: ParamDecision, param: torch.Tensor) -> bool:
    """Whether ``param`` (of ``decision``) belongs in the optimizer now.

    The plan's word where an option decided, else the parameter's live ``requires_grad``,
    as in a plain ``Trainer``.
    """
    return bool(param.requires_grad) if decision.left_to_user else decision.trainable


def decision_nbytes(decision: ParamDecision) -> int:
    """Bytes of one parameter: measured when the plan was applied, else estimated from its dtype."""
    if decision.nbytes is not None:
        return decision.nbytes
    try:
        return decision.numel * torch_dtype(decision.dtype).itemsize
    except PlanError:
        return 0
