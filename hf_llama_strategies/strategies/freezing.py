"""Static freezing and full fine-tuning: which parameters train.

Options: ``trainable_layers``, ``trainable_modules``, ``train_embeddings``, ``train_norm``,
``train_head``, ``trainable_params``, ``frozen_params``. With all of them at their
defaults every parameter trains (full fine-tuning). Decisions are made in this order,
each step overriding the previous one:

1. the block defaults and the layer/module selection;
2. a parameter that was already frozen before the plan (PEFT freezes the base weights)
   stays frozen, and a PEFT ``modules_to_save`` copy (which PEFT was asked to train)
   trains unless an explicit option freezes it: a block default does not;
3. ``trainable_params`` regexes make parameters trainable;
4. ``frozen_params`` regexes freeze parameters (the last word).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from ..anatomy import EMBEDDINGS, HEAD, LAYER, NORM, ModelAnatomy
from ..arguments import StrategyArguments
from ..errors import InvalidArgumentError, PlanError, format_choices
from ..hookspecs import hookimpl
from ..layer_selection import parse_layer_selection, restricts_layers, selects_all, selects_none
from ..plan import DEFAULT_REASON, FROZEN_BEFORE_REASON, ParamDecision, StrategyPlan

# Explicit option first; ``None`` means "use the default for this plan".
_BLOCK_OPTIONS = {EMBEDDINGS: "train_embeddings", NORM: "train_norm", HEAD: "train_head"}
_MODULES_EXPECTED = "a comma list of module names inside a decoder layer, e.g. 'mlp,self_attn', or 'all'"


def _restricts(args: StrategyArguments) -> bool:
    return restricts_layers(args.trainable_layers, args.trainable_modules)


def _module_components(anatomy: ModelAnatomy, name: str) -> list[str]:
    return anatomy.layer_relative_name(name).split(".")[:-1]


def _contains_run(components: list[str], wanted: list[str]) -> bool:
    n = len(wanted)
    return any(components[i : i + n] == wanted for i in range(len(components) - n + 1))


def _block_setting(kind: str, args: StrategyArguments) -> tuple[bool, str, bool]:
    """(trainable, reason, explicit) for a non-layer block."""
    option = _BLOCK_OPTIONS.get(kind)
    value = getattr(args, option) if option else None
    if value is not None:
        return value, f"{option}={str(value).lower()}", True
    if not _restricts(args):
        return True, DEFAULT_REASON, False
    if kind in (NORM, HEAD):
        return True, f"default: {option} (true)", False
    return False, f"default: {kind} frozen when trainable_layers/trainable_modules restrict the layers", False


def _check_modules(plan: StrategyPlan, anatomy: ModelAnatomy, modules: list[str], raw: str) -> None:
    layer_names = plan.select(lambda d: d.kind == LAYER)
    components = [_module_components(anatomy, n) for n in layer_names]
    for module in modules:
        wanted = module.split(".")
        if not any(_contains_run(c, wanted) for c in components):
            valid = sorted({part for c in components for part in c if not part.isdigit()})
            raise PlanError(
                f"trainable_modules={raw!r}: no decoder layer of {plan.model_class} has a module named "
                f"{module!r}. Valid module names: {format_choices(valid)} (dotted paths such as "
                "'self_attn.q_proj' also work)."
            )


def _layer_decision(
    decision: ParamDecision, anatomy: ModelAnatomy, args: StrategyArguments, layers: set[int],
    modules: Optional[list[str]],
) -> tuple[bool, str]:
    if not _restricts(args):
        return True, DEFAULT_REASON
    if decision.layer not in layers:
        return False, f"trainable_layers={args.trainable_layers!r}"
    if modules is not None:
        components = _module_components(anatomy, decision.name)
        if not any(_contains_run(components, m.split(".")) for m in modules):
            return False, f"trainable_modules={args.trainable_modules!r}"
        return True, f"trainable_layers={args.trainable_layers!r}, trainable_modules={args.trainable_modules!r}"
    return True, f"trainable_layers={args.trainable_layers!r}"


def _resolve_tied(
    plan: StrategyPlan, decision: ParamDecision, anatomy: ModelAnatomy, args: StrategyArguments
) -> Optional[tuple[bool, str]]:
    """Decide a tensor shared by blocks of different kinds (tied embeddings and head)."""
    kinds = {decision.kind} | {anatomy.classify(alias)[0] for alias in decision.tied_with}
    if len(kinds) == 1:
        return None
    settings = {kind: _block_setting(kind, args) for kind in sorted(kinds)}
    names = ", ".join([decision.name, *decision.tied_with])
    explicit = {kind: s for kind, s in settings.items() if s[2]}
    values = {s[0] for s in explicit.values()}
    if len(values) > 1:
        described = " and ".join(f"{s[1]} ({kind})" for kind, s in explicit.items())
        raise PlanError(
            f"{names} are one tied tensor, but {described} disagree about it. Give them the same value, "
            "or untie the weights (tie_word_embeddings=False) before training."
        )
    if explicit:
        value, reason, _ = next(iter(explicit.values()))
        return value, f"{reason} (tied: {names})"
    if len({s[0] for s in settings.values()}) == 1:
        value, reason, _ = next(iter(settings.values()))
        # No option involved: the tensor stays the user's to freeze or train (Trainer's rule).
        return value, reason if reason == DEFAULT_REASON else f"{reason} (tied: {names})"
    plan.note(
        f"{names} are one tied tensor shared by the {' and the '.join(sorted(kinds))}; it stays frozen because "
        "the embeddings are frozen by default. Set train_head: true (or train_embeddings: true) to train it."
    )
    return False, f"default: tied to frozen embeddings ({names})"


def _is_peft_saved_copy(decision: ParamDecision) -> bool:
    """A trainable copy of a module PEFT's ``modules_to_save`` names (``score.modules_to_save.default.weight``)."""
    return decision.requires_grad_before and ".modules_to_save." in f".{decision.name}"


def _regex_matches(plan: StrategyPlan, option: str, patterns: list[str]) -> list[tuple[str, list[str]]]:
    result = []
    for pattern in patterns:
        regex = re.compile(pattern)
        matched = plan.select(lambda d: any(regex.search(n) for n in (d.name, *d.tied_with)))
        if not matched:
            examples = list(plan.decisions)[:3] + list(plan.decisions)[-2:]
            raise PlanError(
                f"{option}: the regex {pattern!r} matches no parameter of {plan.model_class}. Parameter names look "
                f"like {format_choices(examples)}."
            )
        result.append((pattern, matched))
    return result


def _require_blocks(anatomy: ModelAnatomy, args: StrategyArguments) -> None:
    """Options naming layers or blocks need the model's anatomy; the regex options do not."""
    if _restricts(args):
        option = "trainable_modules" if selects_all(args.trainable_layers) else "trainable_layers"
        anatomy.require(option, getattr(args, option))
    for option in _BLOCK_OPTIONS.values():
        if getattr(args, option) is not None:
            anatomy.require(option, getattr(args, option))


def _check_module_names(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or any(not n or not re.fullmatch(r"[\w.]+", n) for n in value.split(",")):
        raise InvalidArgumentError("trainable_modules", value, _MODULES_EXPECTED)


def _check_regexes(option: str, patterns: list[str]) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidArgumentError(option, pattern, "a valid Python regular expression", f"({exc}).") from None
    if len(set(patterns)) != len(patterns):
        raise InvalidArgumentError(option, patterns, "a list without repeated regexes")


@hookimpl
def hfls_validate_arguments(strategy_args: StrategyArguments) -> None:
    """The freezing options, before any model is seen: syntax, then how they combine."""
    args = strategy_args
    parse_layer_selection(args.trainable_layers, None)  # the syntax; the range needs the model
    for option in _BLOCK_OPTIONS.values():
        value = getattr(args, option)
        if value is not None and not isinstance(value, bool):
            raise InvalidArgumentError(option, value, "true, false, or unset (null) for the default")
    _check_module_names(args.trainable_modules)
    for option in ("trainable_params", "frozen_params"):
        _check_regexes(option, getattr(args, option) or [])
    if args.trainable_modules is not None and selects_none(args.trainable_layers):
        raise InvalidArgumentError(
            "trainable_modules",
            args.trainable_modules,
            "unset when trainable_layers='none'",
            "trainable_modules picks modules inside the selected layers, and no layer is selected.",
        )


@hookimpl(tryfirst=True)
def hfls_plan_parameters(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: StrategyArguments, training_args: object
) -> None:
    """Decide ``trainable`` for every parameter (runs before the other strategies)."""
    args = strategy_args
    _require_blocks(anatomy, args)
    layers = set(parse_layer_selection(args.trainable_layers, anatomy.num_layers) or ())
    modules = args.trainable_modules.split(",") if args.trainable_modules else None
    if modules is not None:
        _check_modules(plan, anatomy, modules, args.trainable_modules)

    for decision in plan:
        if decision.kind == LAYER:
            trainable, reason = _layer_decision(decision, anatomy, args, layers, modules)
        else:
            trainable, reason, explicit = _block_setting(decision.kind, args)
            if not trainable and not explicit and _is_peft_saved_copy(decision):
                trainable, reason = True, f"PEFT modules_to_save (the default would freeze the {decision.kind})"
        if decision.tied_with:
            trainable, reason = _resolve_tied(plan, decision, anatomy, args) or (trainable, reason)
        plan.set([decision.name], reason, trainable=trainable)

    plan.set(
        plan.select(lambda d: not d.requires_grad_before and d.trainable),
        FROZEN_BEFORE_REASON,
        trainable=False,
    )
    for option, value in (("trainable_params", True), ("frozen_params", False)):
        for pattern, names in _regex_matches(plan, option, getattr(args, option) or []):
            plan.set(names, f"{option}: {pattern!r}", trainable=value)


__all__ = ["hfls_plan_parameters", "hfls_validate_arguments"]
