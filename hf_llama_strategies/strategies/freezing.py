"""Static freezing and full fine-tuning: which parameters train.

Options (:class:`FreezingArguments`): ``trainable_layers``, ``trainable_modules``,
``train_embeddings``, ``train_norm``, ``train_head``, ``trainable_params``, ``frozen_params``.
With all of them at their defaults every parameter trains (full fine-tuning). Decisions are made in this order,
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
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.anatomy import EMBEDDINGS, HEAD, LAYER, NORM, ModelAnatomy
from ..core.decisions import DEFAULT_REASON, FROZEN_BEFORE_REASON, ParamDecision
from ..core.hookspecs import hookimpl
from ..core.layer_selection import parse_layer_selection, restricts_layers, selects_all, selects_none
from ..core.options import OptionGroup, check_bool
from ..core.plan import StrategyPlan
from ..errors import InvalidArgumentError, PlanError, format_choices

# Explicit option first; ``None`` means "use the default for this plan".
_BLOCK_OPTIONS = {EMBEDDINGS: "train_embeddings", NORM: "train_norm", HEAD: "train_head"}
_MODULES_EXPECTED = "a comma list of module names inside a decoder layer, e.g. 'mlp,self_attn', or 'all'"


@dataclass
class FreezingArguments(OptionGroup):
    """Which parameters train. With every option at its default, all of them (full fine-tuning).

    The layer and module selection decides the decoder layers; ``train_embeddings``,
    ``train_norm`` and ``train_head`` decide the parts around them; ``trainable_params`` then
    adds parameters by regex and ``frozen_params`` removes them (it wins over all).
    """

    trainable_layers: str = field(
        default="all",
        metadata={
            "help": (
                "Decoder layers to train: 'all' (default), 'none', or a comma list of layer indices and "
                "Python slices, e.g. '-2:' (last two), ':4' (first four), '0,5,10:12', '::2'. Negative "
                "indices count from the top. Note: LLaMA-Factory's `freeze_trainable_layers: 2` is '-2:' here."
            )
        },
    )
    trainable_modules: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Within the selected layers, train only these modules: a comma list of module names as they "
                "appear inside a layer, e.g. 'mlp,self_attn' or 'q_proj,v_proj' or 'self_attn.o_proj'. "
                "Unset or 'all' trains every module of the selected layers."
            )
        },
    )
    train_embeddings: Optional[bool] = field(
        default=None,
        metadata={
            "help": (
                "Train the input embeddings (token, and position embeddings where the model has them). "
                "Default: true for full fine-tuning, false as soon as `trainable_layers` or "
                "`trainable_modules` restricts the layers."
            )
        },
    )
    train_norm: Optional[bool] = field(
        default=None,
        metadata={"help": "Train the final norm after the last layer. Default: true."},
    )
    train_head: Optional[bool] = field(
        default=None,
        metadata={
            "help": (
                "Train the task head (lm_head, score, classifier, a BERT pooler). Default: true, except that "
                "a head tied to frozen input embeddings stays frozen (the plan says so); set true to train "
                "the shared tensor."
            )
        },
    )
    trainable_params: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Regexes (re.search on full parameter names) of parameters to train in addition to the "
                "selection above, like axolotl's `unfrozen_parameters`. Each must match a parameter."
            )
        },
    )
    frozen_params: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Regexes (re.search on full parameter names) of parameters to freeze; wins over every other "
                "option. Each must match a parameter."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # One spelling each (a comma string without spaces, None for "all"; lists of regexes), then the checks.
        self.trainable_modules = _normalise_module_list(self.trainable_modules)
        self.trainable_params = _normalise_regex_list("trainable_params", self.trainable_params)
        self.frozen_params = _normalise_regex_list("frozen_params", self.frozen_params)
        parse_layer_selection(self.trainable_layers, None)  # the syntax; the range needs the model
        for option in _BLOCK_OPTIONS.values():
            check_bool(option, getattr(self, option), unset_allowed=True)
        _check_module_names(self.trainable_modules)
        for option in ("trainable_params", "frozen_params"):
            _check_regexes(option, getattr(self, option) or [])
        if self.trainable_modules is not None and selects_none(self.trainable_layers):
            raise InvalidArgumentError(
                "trainable_modules",
                self.trainable_modules,
                "unset when trainable_layers='none'",
                "trainable_modules picks modules inside the selected layers, and no layer is selected.",
            )

    @property
    def restricts_layers(self) -> bool:
        """True when only some decoder layers or modules train (anything but every module of every layer)."""
        return restricts_layers(self.trainable_layers, self.trainable_modules)


def _normalise_module_list(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        return value
    if selects_all(value):
        return None
    return ",".join(n.strip() for n in value.split(","))


def _normalise_regex_list(option: str, value: Any) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        # One regex; never split on commas, which regexes use ("a{1,3}").
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgumentError(option, value, "a list of non-empty regular expressions")
    return list(value)


def _module_components(anatomy: ModelAnatomy, name: str) -> list[str]:
    return anatomy.layer_relative_name(name).split(".")[:-1]


def _contains_run(components: list[str], wanted: list[str]) -> bool:
    n = len(wanted)
    return any(components[i : i + n] == wanted for i in range(len(components) - n + 1))


def _block_setting(kind: str, args: FreezingArguments) -> tuple[bool, str, bool]:
    """(trainable, reason, explicit) for a non-layer block."""
    option = _BLOCK_OPTIONS.get(kind)
    value = getattr(args, option) if option else None
    if value is not None:
        return value, f"{option}={str(value).lower()}", True
    if not args.restricts_layers:
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
    decision: ParamDecision, anatomy: ModelAnatomy, args: FreezingArguments, layers: set[int],
    modules: Optional[list[str]],
) -> tuple[bool, str]:
    if not args.restricts_layers:
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
    plan: StrategyPlan, decision: ParamDecision, anatomy: ModelAnatomy, args: FreezingArguments
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
        matched = [d.name for d in plan if any(regex.search(n) for n in (d.name, *d.tied_with))]
        if not matched:
            examples = list(plan.decisions)[:3] + list(plan.decisions)[-2:]
            raise PlanError(
                f"{option}: the regex {pattern!r} matches no parameter of {plan.model_class}. Parameter names look "
                f"like {format_choices(examples)}."
            )
        result.append((pattern, matched))
    return result


def _require_blocks(anatomy: ModelAnatomy, args: FreezingArguments) -> None:
    """Options naming layers or blocks need the model's anatomy; the regex options do not."""
    if args.restricts_layers:
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


@hookimpl(tryfirst=True)
def hfls_plan_parameters(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: FreezingArguments, training_args: object
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


__all__ = ["FreezingArguments", "hfls_plan_parameters"]
