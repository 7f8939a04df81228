"""Layer-wise learning rates: a learning rate and an optimizer group for every parameter.

Options (:class:`LayerwiseLrArguments`): ``layer_lr_decay``, ``embedding_lr``, ``head_lr``, ``lr_rules``. Applied
in that order, each overriding the previous one for the parameters it names:

1. ``layer_lr_decay=d``: decoder layer ``i`` of ``L`` at ``learning_rate * d**(L-1-i)``
   (group ``layers.i``), the embeddings below layer 0 at ``learning_rate * d**L``
   (``embeddings``), the final norm and the head at the top, ``learning_rate`` (``norm``,
   ``head``);
2. ``embedding_lr`` / ``head_lr``: absolute rates for those blocks (groups ``embeddings``,
   ``head``);
3. ``lr_rules``, in order: ``PATTERN=LR`` (absolute) or ``PATTERN=xSCALE`` (times
   ``learning_rate``), one group ``rule:PATTERN`` each; a later rule wins.

A parameter none of them names stays in the ``default`` group at ``learning_rate``, so
with no option set the optimizer is exactly the Trainer's. Each decision records which
option set it (``lr_reason``). Relative rates are stored as ``lr_scale`` and resolved into
``lr`` when the plan is built with ``TrainingArguments``; a dry run keeps only the scale.

This runs after freezing (which is ``tryfirst``) and gives a rate to frozen parameters
too, so that a later plugin that unfreezes them finds it; an option whose parameters all
end up frozen is an error, checked on the finished plan.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.anatomy import EMBEDDINGS, HEAD, LAYER, NORM, ModelAnatomy
from ..core.distributed import check_deepspeed_keeps_groups
from ..core.hookspecs import HookContext, hookimpl
from ..core.options import OptionGroup, is_number
from ..core.plan import StrategyPlan
from ..errors import InvalidArgumentError, PlanError, format_choices

RULE_SYNTAX = (
    "a list of 'PATTERN=LR' (absolute, e.g. 'self_attn=2e-5') or 'PATTERN=xSCALE' (times learning_rate, "
    "e.g. 'mlp=x0.5') rules, PATTERN a regular expression searched in parameter names"
)
RULE_GROUP_PREFIX = "rule:"
_OPTIONS = "head_lr, embedding_lr, layer_lr_decay and lr_rules (or a plugin's per-parameter groups)"


@dataclass(frozen=True)
class LrRule:
    """One parsed ``lr_rules`` entry."""

    index: int
    text: str
    pattern: str
    value: float
    relative: bool

    @property
    def label(self) -> str:
        return f"lr_rules[{self.index}]={self.text!r}"

    @property
    def group(self) -> str:
        return RULE_GROUP_PREFIX + self.pattern

    def matches(self, names: tuple[str, ...]) -> bool:
        regex = re.compile(self.pattern)
        return any(regex.search(n) for n in names)


def _positive_rate(text: str) -> Optional[float]:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value > 0 else None


def parse_lr_rules(value: Any) -> list[LrRule]:
    """Parse ``lr_rules`` (a list of strings, or one string for one rule).

    Raises :class:`InvalidArgumentError` naming the bad rule and the syntax.
    """
    if value is None:
        return []
    rules = [value] if isinstance(value, str) else value
    if not isinstance(rules, (list, tuple)):
        raise InvalidArgumentError("lr_rules", value, RULE_SYNTAX)
    parsed = []
    for index, rule in enumerate(rules):
        if not isinstance(rule, str) or "=" not in rule:
            raise InvalidArgumentError(
                "lr_rules", rule, RULE_SYNTAX, f"Rule {index} has no '=' between the pattern and the rate."
            )
        # The rate never holds '='; the pattern may ("(?=...)").
        pattern, _, rate = rule.rpartition("=")
        pattern, rate = pattern.strip(), rate.strip()
        if not pattern:
            raise InvalidArgumentError("lr_rules", rule, RULE_SYNTAX, f"Rule {index} has an empty pattern.")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidArgumentError(
                "lr_rules", rule, RULE_SYNTAX, f"Rule {index}: {pattern!r} is not a valid regular expression ({exc})."
            ) from None
        relative = rate[:1] in ("x", "X")
        number = _positive_rate(rate[1:] if relative else rate)
        if number is None:
            kind = "scale after 'x'" if relative else "learning rate"
            raise InvalidArgumentError(
                "lr_rules", rule, RULE_SYNTAX, f"Rule {index}: the {kind} {rate!r} is not a positive finite number."
            )
        parsed.append(LrRule(index=index, text=rule, pattern=pattern, value=number, relative=relative))
    patterns = [r.pattern for r in parsed]
    repeated = sorted({p for p in patterns if patterns.count(p) > 1})
    if repeated:
        raise InvalidArgumentError(
            "lr_rules", list(rules), "one rule per pattern", f"Repeated pattern(s): {format_choices(repeated)}."
        )
    return parsed


@dataclass
class LayerwiseLrArguments(OptionGroup):
    """A learning rate per block or parameter: the head above the body, a decay down the stack, rules."""

    head_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Learning rate of the task head (lm_head, score, classifier), absolute, e.g. 5e-5 while "
                "`learning_rate` (the body) is 1e-5. Unset: the head follows the other options."
            )
        },
    )
    embedding_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Learning rate of the input embeddings, absolute (axolotl's `embedding_lr`). The embeddings "
                "must train: with restricted layers also set `train_embeddings: true`."
            )
        },
    )
    layer_lr_decay: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Layer-wise LR decay d in (0, 1] (timm's `layer_decay`): decoder layer i of L trains at "
                "learning_rate * d**(L-1-i), the embeddings at learning_rate * d**L, the final norm and the "
                "head at learning_rate. `head_lr`, `embedding_lr` and `lr_rules` override it."
            )
        },
    )
    lr_rules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Per-parameter learning rates, applied in order after the options above (a later rule wins): "
                "'PATTERN=LR' (absolute, e.g. 'self_attn=2e-5') or 'PATTERN=xSCALE' (times `learning_rate`, "
                "e.g. 'mlp=x0.5'). PATTERN is a regex (re.search on full parameter names) and must match a "
                "parameter that trains."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for option in ("head_lr", "embedding_lr"):
            value = getattr(self, option)
            if value is not None and not (_is_finite(value) and value > 0):
                raise InvalidArgumentError(
                    option,
                    value,
                    "a positive learning rate such as 5e-5 (absolute, not a factor), or unset",
                    _number_hint(value),
                )
        decay = self.layer_lr_decay
        if decay is not None and not (_is_finite(decay) and 0 < decay <= 1):
            raise InvalidArgumentError(
                "layer_lr_decay",
                decay,
                "a number in (0, 1], e.g. 0.9 (each layer down trains at 0.9 times the rate of the one above), "
                "or unset",
                _number_hint(decay),
            )
        parse_lr_rules(self.lr_rules)

    @property
    def uses_layerwise_lr(self) -> bool:
        """True when any of this strategy's options is set."""
        return any(
            getattr(self, option) is not None for option in ("head_lr", "embedding_lr", "layer_lr_decay", "lr_rules")
        )


def _number_hint(value: Any) -> Optional[str]:
    if isinstance(value, str) and _positive_rate(value) is not None:
        # PyYAML reads 5e-5 (no dot) as a string; HfArgumentParser.parse_dict passes it on.
        return f"Got the string {value!r}: write a number (in YAML with a dot, 5.0e-5; PyYAML reads 5e-5 as text)."
    return None


def _is_finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def _block_names(plan: StrategyPlan, anatomy: ModelAnatomy, kind: str) -> list[str]:
    """Parameters of a block, counting a tensor tied into it (Gemma's lm_head is embed_tokens)."""
    return plan.select(lambda d: d.kind == kind or any(anatomy.classify(a)[0] == kind for a in d.tied_with))


def _rule_names(plan: StrategyPlan, rule: LrRule) -> list[str]:
    return plan.select(lambda d: rule.matches((d.name, *d.tied_with)))


def _base_lr(training_args: Any) -> Optional[float]:
    lr = getattr(training_args, "learning_rate", None)
    return float(lr) if isinstance(lr, (int, float)) and not isinstance(lr, bool) else None


def _targets(plan: StrategyPlan, anatomy: ModelAnatomy, args: LayerwiseLrArguments) -> list[tuple[str, str, list[str]]]:
    """(option label, what it names, parameter names) for every explicit rate."""
    targets = []
    for option, kind in (("embedding_lr", EMBEDDINGS), ("head_lr", HEAD)):
        value = getattr(args, option)
        if value is not None:
            targets.append((f"{option}={value!r}", f"the {kind}", _block_names(plan, anatomy, kind)))
    for rule in parse_lr_rules(args.lr_rules):
        targets.append((rule.label, f"pattern {rule.pattern!r}", _rule_names(plan, rule)))
    return targets


@hookimpl
def hfls_plan_parameters(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: LayerwiseLrArguments, training_args: Any
) -> None:
    """Write ``lr``, ``lr_scale``, ``lr_reason`` and ``group`` for the parameters the options name."""
    args = strategy_args
    if not args.uses_layerwise_lr:
        return
    for option in ("layer_lr_decay", "embedding_lr", "head_lr"):
        if getattr(args, option) is not None:
            anatomy.require(option, getattr(args, option))  # lr_rules (regexes) work on any model
    base = _base_lr(training_args)

    def assign(names: list[str], reason: str, group: str, lr: Optional[float] = None, scale: Optional[float] = None):
        absolute = lr if scale is None else (None if base is None else base * scale)
        plan.set(names, reason, lr=absolute, lr_scale=scale, group=group)

    if args.layer_lr_decay is not None:
        d, top = args.layer_lr_decay, plan.num_layers
        for decision in plan:
            if decision.kind == LAYER:
                depth, where = top - 1 - decision.layer, f"layer {decision.layer} of {top}"
                group = f"layers.{decision.layer}"
            elif decision.kind == EMBEDDINGS:
                depth, where, group = top, "embeddings, below layer 0", EMBEDDINGS
            elif decision.kind in (NORM, HEAD):
                depth, where, group = 0, f"{decision.kind}, at the top", decision.kind
            else:
                continue
            assign([decision.name], f"layer_lr_decay={d}: {where} (x{d}**{depth})", group, scale=d**depth)
        for name in _block_names(plan, anatomy, HEAD):
            decision = plan[name]
            if decision.kind != HEAD and decision.trainable and args.head_lr is None and args.embedding_lr is None:
                plan.note(
                    f"{', '.join([name, *decision.tied_with])} are one tied tensor: under layer_lr_decay it trains at "
                    "the embeddings' rate (the lowest). Set head_lr or embedding_lr to choose its rate."
                )

    explicit: dict[str, tuple[str, float]] = {}
    for option, kind in (("embedding_lr", EMBEDDINGS), ("head_lr", HEAD)):
        value = getattr(args, option)
        if value is None:
            continue
        names = _block_names(plan, anatomy, kind)
        if not names:
            raise PlanError(
                f"{option}={value!r}: {plan.model_class} has no {kind} that the plan can find. Use lr_rules with a "
                "pattern of its parameter names instead."
            )
        for name in names:
            if name in explicit and explicit[name][1] != value:
                other = explicit[name][0]
                raise PlanError(
                    f"{', '.join([name, *plan[name].tied_with])} are one tied tensor, but "
                    f"{other}={explicit[name][1]!r} "
                    f"and {option}={value!r} disagree about its learning rate. Give them the same value, or untie "
                    "the weights (tie_word_embeddings=False) before training."
                )
            explicit[name] = (option, value)
        assign(names, f"{option}={value!r}", kind, lr=float(value))

    for rule in parse_lr_rules(args.lr_rules):
        names = _rule_names(plan, rule)
        if not names:
            examples = list(plan.decisions)[:3] + list(plan.decisions)[-2:]
            raise PlanError(
                f"{rule.label}: the pattern {rule.pattern!r} matches no parameter of {plan.model_class}. Parameter "
                f"names look like {format_choices(examples)}."
            )
        if rule.relative:
            assign(names, rule.label, rule.group, scale=rule.value)
        else:
            assign(names, rule.label, rule.group, lr=rule.value)

    for label, _, names in _targets(plan, anatomy, args):
        if not any(plan[n].lr_reason == label for n in names):
            plan.note(f"{label} has no effect: later lr_rules override it for every parameter it names.")


@hookimpl
def hfls_validate_plan(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: LayerwiseLrArguments, context: HookContext
) -> None:
    """No rate for parameters that do not train; one rate per group; no DeepSpeed optimizer block."""
    for label, what, names in _targets(plan, anatomy, strategy_args):
        if names and not any(plan[n].trainable for n in names):
            reasons = sorted({plan[n].reason for n in names})
            raise PlanError(
                f"{label} sets a learning rate for {what} ({format_choices(names, 4)}), but the plan freezes "
                f"{'it' if len(names) == 1 else 'all of them'} ({'; '.join(reasons)}). Train them (for example "
                "train_head: true, train_embeddings: true, trainable_params) or remove the option."
            )
    rates: dict[str, set[tuple[Optional[float], Optional[float]]]] = {}
    for decision in plan:
        if decision.trainable:
            rates.setdefault(decision.group, set()).add((decision.lr, decision.lr_scale))
    mixed = sorted(group for group, values in rates.items() if len(values) > 1)
    if mixed:
        # A plugin changed rates after this strategy named the groups: a group's rate would
        # be ambiguous in the logs and in a resumed optimizer.
        raise PlanError(
            f"Optimizer group(s) {mixed} hold parameters with different learning rates; give each rate its own "
            "`group` in the plan."
        )
    check_deepspeed_keeps_groups(plan, context.distributed, _OPTIONS)


__all__ = [
    "LrRule",
    "LayerwiseLrArguments",
    "hfls_plan_parameters",
    "hfls_validate_plan",
    "parse_lr_rules",
]
