"""Optimizer parameter groups from a plan: small pure functions, names in, groups out.

Groups are deterministic: the same plan gives the same groups in the same order, so an
optimizer checkpoint always loads into a resumed run. Inside every plan group the
Trainer's weight-decay split (``Trainer.get_decay_parameter_names``) is kept. Also here:
the optimizer built from those groups with the class ``optim=`` names (shared by
``StrategyTrainer`` and the callback's optimizer factory), and reading the per-group rates
back for the logs. (That a DeepSpeed config keeps the groups is checked with the other
distributed settings: ``core.distributed.check_deepspeed_keeps_groups``.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.utils import logging

from ..core.decisions import DEFAULT_GROUP, ParamDecision, trains
from ..core.plan import StrategyPlan
from ..errors import PlanError

logger = logging.get_logger(__name__)

if TYPE_CHECKING:
    from transformers import TrainingArguments

# Name components that wrappers insert (FSDP1, activation checkpointing, torch.compile).
_WRAPPER_COMPONENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})
NO_DECAY_SUFFIX = ".no_decay"


def unwrapped_name(name: str) -> str:
    """The name a parameter has in the unwrapped model (DDP's leading ``module.`` included)."""
    parts = [p for p in name.split(".") if p not in _WRAPPER_COMPONENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def resolved_lr(decision: ParamDecision, base_lr: Optional[float]) -> Optional[float]:
    """The absolute learning rate of ``decision``; ``None`` for ``TrainingArguments.learning_rate``.

    A relative rate (``lr_scale``) that the plan could not resolve (built without
    ``TrainingArguments``) is resolved against ``base_lr``.
    """
    if decision.lr is not None or decision.lr_scale is None:
        return decision.lr
    if base_lr is None:
        raise PlanError(
            f"{decision.name}: its learning rate is {decision.lr_scale} x learning_rate ({decision.lr_reason}), "
            "but no base learning rate was given to resolve it."
        )
    return base_lr * decision.lr_scale


def group_key(
    plan: StrategyPlan, name: str, decays: bool, weight_decay: float, base_lr: Optional[float] = None
) -> tuple[str, Optional[float], float]:
    """(group name, lr or None, weight decay) of one trainable parameter."""
    decision = plan[name]
    wd = decision.weight_decay if decision.weight_decay is not None else (weight_decay if decays else 0.0)
    group = decision.group if decays or decision.weight_decay is not None else decision.group + NO_DECAY_SUFFIX
    return group, resolved_lr(decision, base_lr), wd


def build_param_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    plan: StrategyPlan,
    decay_parameter_names: Iterable[str],
    weight_decay: float,
    base_lr: Optional[float] = None,
) -> list[dict[str, Any]]:
    """Optimizer param groups for every parameter the plan trains.

    A parameter no option decided (:attr:`ParamDecision.left_to_user`) is in when it
    requires grad now, as in ``Trainer.create_optimizer``.

    Args:
        named_parameters: ``model.named_parameters()`` of the model being optimised (names
            may carry wrapper prefixes; they are stripped to find the plan's decision).
        plan: the plan; only its trainable parameters get a group.
        decay_parameter_names: names that take weight decay (``Trainer.get_decay_parameter_names``).
        weight_decay: ``TrainingArguments.weight_decay``.
        base_lr: ``TrainingArguments.learning_rate``, for relative rates the plan left
            unresolved (``lr_scale`` without ``lr``).

    Returns:
        A list of ``{"name", "params", "weight_decay"[, "lr"]}`` dicts, ordered by each plan
        group's first parameter in model order, the decaying half before the other; empty
        groups are left out. With one plan group this is exactly the Trainer's own layout.
    """
    decays = {unwrapped_name(n) for n in decay_parameter_names}
    buckets: dict[tuple[str, Optional[float], float], list[nn.Parameter]] = {}
    order: dict[str, int] = {}
    for raw_name, param in named_parameters:
        name = plan_name(plan, raw_name)
        if not trains(plan[name], param):
            continue
        key = group_key(plan, name, name in decays, weight_decay, base_lr)
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


def plan_name(plan: StrategyPlan, name: str) -> str:
    """The plan's name for a parameter named ``name`` in a possibly wrapped model."""
    return name if name in plan.decisions else unwrapped_name(name)


def settle_requires_grad(plan: StrategyPlan, model: nn.Module, warn: bool = True) -> list[str]:
    """Give every parameter an option decided the ``requires_grad`` the plan says; return those changed.

    Run when the optimizer is created: the optimizer then holds exactly what the plan trains
    (every parameter a schedule will train, from step 0), and parameters no option decided
    keep whatever ``requires_grad`` the user gave them. ``warn``: log the parameters set back
    (changed by hand, not by a schedule).
    """
    changed = []
    for raw_name, param in model.named_parameters():
        name = plan_name(plan, raw_name)
        decision = plan.decisions.get(name)
        if decision is None or decision.left_to_user or param.requires_grad == decision.trainable:
            continue
        param.requires_grad_(decision.trainable)
        changed.append(name)
    if changed and warn:
        logger.warning(
            f"requires_grad of {len(changed)} parameter tensors (e.g. {changed[0]}) was changed by hand after the plan "
            f"was built; the plan's options decide them ({plan[changed[0]].reason}), so it is set back."
        )
    return changed


def state_bytes(state: dict) -> int:
    """Bytes held by the tensors of one parameter's optimizer state."""
    return sum(value.numel() * value.element_size() for value in state.values() if torch.is_tensor(value))


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (moments, etc.)."""
    return sum(state_bytes(state) for state in optimizer.state.values())


# Optimizer kwargs with which transformers' optimizer handlers bring their own parameter
# layout (GaLore, APOLLO, LOMO, layer-wise optimizers).
_OWN_LAYOUT_KWARGS = ("params", "model", "optimizer_dict")

OptimizerClsAndKwargs = tuple[Any, dict[str, Any]]


def brings_own_layout(optimizer_cls: Any, optimizer_kwargs: dict[str, Any]) -> bool:
    """True when the optimizer lays out its own parameters (a factory, GaLore, LOMO...)."""
    return is_optimizer_factory(optimizer_cls) or any(k in optimizer_kwargs for k in _OWN_LAYOUT_KWARGS)


def decay_parameter_names(model: nn.Module) -> list[str]:
    """``Trainer.get_decay_parameter_names(model)``, for code that has no Trainer at hand."""
    # The method reads nothing from the Trainer; calling it keeps transformers' own rule
    # (biases and norms do not decay) instead of a copy that could drift.
    return Trainer.get_decay_parameter_names(None, model)  # type: ignore[arg-type]


def create_optimizer_from_plan(
    model: nn.Module,
    plan: StrategyPlan,
    training_args: "TrainingArguments",
    optimizer_cls_and_kwargs: Optional[OptimizerClsAndKwargs] = None,
    decay_names: Optional[Iterable[str]] = None,
    get_optimizer_cls_and_kwargs: Optional[Callable[..., OptimizerClsAndKwargs]] = None,
) -> Optional[torch.optim.Optimizer]:
    """The optimizer over the plan's groups, or ``None`` where ``optim=`` brings its own layout.

    Args:
        model: the model being trained (possibly wrapped: FSDP1 passes the wrapped one).
        plan: the plan applied to it.
        training_args: ``learning_rate``, ``weight_decay`` and ``optim`` come from here.
        optimizer_cls_and_kwargs: a user's ``(class, kwargs)``; wins over ``optim=``.
        decay_names: the parameters that take weight decay; default: the Trainer's rule.
        get_optimizer_cls_and_kwargs: where the class comes from without ``optimizer_cls_and_kwargs``
            (a Trainer's own ``self.get_optimizer_cls_and_kwargs``, which a subclass may override);
            default: ``Trainer.get_optimizer_cls_and_kwargs``.

    Returns ``None`` (the caller then takes the Trainer's own path) when the optimizer
    lays out its own parameters and the plan needs nothing but the default layout.

    Raises:
        PlanError: such an optimizer, with a plan whose groups it would drop.
    """
    if optimizer_cls_and_kwargs is not None:
        optimizer_cls, optimizer_kwargs = optimizer_cls_and_kwargs
    else:
        get = get_optimizer_cls_and_kwargs or Trainer.get_optimizer_cls_and_kwargs
        optimizer_cls, optimizer_kwargs = get(training_args, model)
    if brings_own_layout(optimizer_cls, optimizer_kwargs):
        if plan.has_custom_groups:
            raise PlanError(
                f"optim={getattr(training_args, 'optim', None)!r} "
                f"({getattr(optimizer_cls, '__name__', optimizer_cls)}) "
                f"lays out its own parameter groups, so the plan's groups {plan.group_names()} (per-parameter "
                "learning rates or weight decay) cannot apply. Choose another `optim` (adamw_torch, adafactor, "
                "sgd, ...) or drop head_lr, embedding_lr, layer_lr_decay and lr_rules."
            )
        return None
    groups = build_param_groups(
        model.named_parameters(),
        plan,
        decay_parameter_names(model) if decay_names is None else decay_names,
        training_args.weight_decay,
        base_lr=training_args.learning_rate,
    )
    return optimizer_cls(groups, **optimizer_kwargs)


def build_optimizer(
    model: nn.Module,
    plan: StrategyPlan,
    training_args: "TrainingArguments",
    optimizer_cls_and_kwargs: Optional[OptimizerClsAndKwargs] = None,
) -> torch.optim.Optimizer:
    """The optimizer a run of ``plan`` trains with: the plan's groups, or ``optim=``'s own layout.

    :func:`create_optimizer_from_plan`, and where ``optim=`` lays out its own parameters (and the
    plan needs nothing but the default layout), the optimizer built as the Trainer builds it.
    """
    optimizer = create_optimizer_from_plan(model, plan, training_args, optimizer_cls_and_kwargs)
    if optimizer is not None:
        return optimizer
    cls, kwargs = optimizer_cls_and_kwargs or Trainer.get_optimizer_cls_and_kwargs(training_args, model)
    kwargs = dict(kwargs)
    if is_optimizer_factory(cls):
        return cls()(model, **kwargs)
    layout = next(kwargs.pop(k) for k in _OWN_LAYOUT_KWARGS if k in kwargs)
    return cls(layout, **kwargs)


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current learning rate of every named plan group (``.no_decay`` halves folded in)."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        name = group.get("name")
        if name is None:
            continue
        lr = group["lr"]
        rates.setdefault(name.removesuffix(NO_DECAY_SUFFIX), float(lr.item() if torch.is_tensor(lr) else lr))
    return rates


def base_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> Optional[float]:
    """``learning_rate`` as the scheduler has moved it now, read from the optimizer's groups.

    The default group holds it directly; otherwise group 0's current rate over its
    initial rate is the schedule's factor. ``None`` when neither is known.
    """
    rates = group_learning_rates(optimizer)
    if DEFAULT_GROUP in rates:
        return rates[DEFAULT_GROUP]
    first = optimizer.param_groups[0] if optimizer.param_groups else {}
    initial = first.get("initial_lr")
    if not initial:
        return None
    lr = first["lr"]
    lr = lr.item() if torch.is_tensor(lr) else lr
    initial = initial.item() if torch.is_tensor(initial) else initial
    return learning_rate * (lr / initial)
