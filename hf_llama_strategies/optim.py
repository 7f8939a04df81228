"""Optimizer parameter groups from a plan: small pure functions, names in, groups out.

Groups are deterministic: the same plan gives the same groups in the same order, so an
optimizer checkpoint always loads into a resumed run. Inside every plan group the
Trainer's weight-decay split (``Trainer.get_decay_parameter_names``) is kept.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional

import torch
from torch import nn

from .plan import StrategyPlan

# Name components that wrappers insert (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
NO_DECAY_SUFFIX = ".no_decay"


def unwrapped_name(name: str) -> str:
    """The name a parameter has in the unwrapped model (DDP's leading ``module.`` included)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_COMPONENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def group_key(plan: StrategyPlan, name: str, decays: bool, weight_decay: float) -> tuple[str, Optional[float], float]:
    """(group name, lr or None, weight decay) of one trainable parameter."""
    decision = plan[name]
    wd = decision.weight_decay if decision.weight_decay is not None else (weight_decay if decays else 0.0)
    group = decision.group if decays or decision.weight_decay is not None else decision.group + NO_DECAY_SUFFIX
    return group, decision.lr, wd


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    plan: StrategyPlan,
    decay_parameter_names: Iterable[str],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer param groups for every parameter the plan trains.

    Args:
        named_parameters: ``model.named_parameters()`` of the model being optimised (names
            may carry wrapper prefixes; they are stripped to find the plan's decision).
        plan: the plan; only its trainable parameters get a group.
        decay_parameter_names: names that take weight decay (``Trainer.get_decay_parameter_names``).
        weight_decay: ``TrainingArguments.weight_decay``.

    Returns:
        A list of ``{"name", "params", "weight_decay"[, "lr"]}`` dicts, ordered by each plan
        group's first parameter in model order, the decaying half before the other; empty
        groups are left out. With one plan group this is exactly the Trainer's own layout.
    """
    decays = {unwrapped_name(n) for n in decay_parameter_names}
    buckets: dict[tuple[str, Optional[float], float], list[nn.Parameter]] = {}
    order: dict[str, int] = {}
    for raw_name, param in named_parameters:
        name = raw_name if raw_name in plan.decisions else unwrapped_name(raw_name)
        if not plan[name].trainable:
            continue
        key = group_key(plan, name, name in decays, weight_decay)
        order.setdefault(plan[name].group, len(order))
        buckets.setdefault(key, []).append(param)

    def sort_key(key: tuple[str, Optional[float], float]) -> tuple[int, bool, str]:
        base = key[0].removesuffix(NO_DECAY_SUFFIX)
        return order[base], key[0].endswith(NO_DECAY_SUFFIX), key[0]

    groups = []
    for key in sorted(buckets, key=sort_key):
        group_name, lr, wd = key
        group: dict[str, Any] = {"name": group_name, "params": buckets[key], "weight_decay": wd}
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
    return groups


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, etc.)."""
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )
