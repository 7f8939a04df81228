"""``StrategyPlan``: the resolved decision for every parameter, and ``build_plan``.

The plan is the single source of truth: strategies write into it (through the
``hfls_plan_parameters`` and ``hfls_adjust_plan`` hooks), the runtime only applies it.
It prints as a table, serialises to ``strategy_plan.json``, and needs no training.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from transformers.utils import logging

from .anatomy import EMBEDDINGS, HEAD, LAYER, NORM, OTHER, ModelAnatomy
from .arguments import StrategyArguments
from .errors import PlanError, UnknownArchitectureError
from .plugins import get_plugin_manager

if TYPE_CHECKING:
    import pluggy
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)

PLAN_FILE_NAME = "strategy_plan.json"
PLAN_FORMAT_VERSION = 1
#: The optimizer group of every parameter no strategy has given a group.
DEFAULT_GROUP = "default"
_LR_FIELDS = frozenset({"lr", "lr_scale", "group"})


@dataclass
class ParamDecision:
    """What the plan decided for one parameter.

    Attributes:
        name: the name ``model.named_parameters()`` yields.
        kind: ``embeddings``, ``layer``, ``norm``, ``head`` or ``other``.
        layer: decoder layer index for ``kind == "layer"``, else ``None``.
        numel: number of elements.
        dtype: the dtype the parameter trains in (``torch.float32`` ...): the loaded dtype
            until a strategy plans otherwise; :meth:`StrategyPlan.apply` casts to it.
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
        nbytes: bytes the tensor holds, measured by :meth:`StrategyPlan.apply` after casting;
            ``None`` until then (the table then estimates ``numel`` x the dtype's size).
    """

    name: str
    kind: str
    layer: Optional[int]
    numel: int
    dtype: str
    trainable: bool = True
    reason: str = "default: full fine-tuning"
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

    @property
    def block(self) -> str:
        """Row label in the plan table: ``layers.3`` for a layer, else the kind."""
        return f"layers.{self.layer}" if self.kind == LAYER else self.kind


@dataclass
class StrategyPlan:
    """Every parameter's decision, plus what the plan was built from.

    Strategies change decisions with :meth:`set`; the runtime reads them with
    :meth:`trainable_names`, :meth:`apply` and :meth:`__iter__`.
    """

    model_class: str
    num_layers: int
    layers_path: str
    decisions: dict[str, ParamDecision]
    strategy_args: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: Plan-wide decisions of strategies (for example ``"precision"``), JSON-serialisable
    #: dicts keyed by the strategy; a ``"summary"`` entry is shown under the table.
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, anatomy: ModelAnatomy, strategy_args: StrategyArguments) -> "StrategyPlan":
        """A plan where everything trains, in ``named_parameters`` order."""
        aliases_of: dict[str, list[str]] = {}
        for alias, canonical in anatomy.tied_parameters.items():
            aliases_of.setdefault(canonical, []).append(alias)
        decisions = {}
        for name, param in model.named_parameters():
            kind, layer = anatomy.classify(name)
            decisions[name] = ParamDecision(
                name=name,
                kind=kind,
                layer=layer,
                numel=param.numel(),
                dtype=str(param.dtype),
                tied_with=tuple(aliases_of.get(name, ())),
                requires_grad_before=param.requires_grad,
                shape=tuple(param.shape),
            )
        return cls(
            model_class=anatomy.model_class,
            num_layers=anatomy.num_layers,
            layers_path=anatomy.layers_path,
            decisions=decisions,
            strategy_args=strategy_args.to_dict(),
        )

    def set(self, names: Iterable[str], reason: str, **changes: Any) -> None:
        """Change fields of the named decisions, recording ``reason``.

        ``reason`` goes to ``lr_reason`` when only learning-rate fields change (``lr``,
        ``lr_scale``, ``group``), to ``dtype_reason`` when only ``dtype`` changes, else to
        ``reason``.
        """
        valid = {f.name for f in fields(ParamDecision)} - {"name", "kind", "layer", "numel", "nbytes"}
        unknown = set(changes) - valid
        if unknown:
            raise TypeError(f"StrategyPlan.set: unknown decision fields {sorted(unknown)}; valid: {sorted(valid)}")
        reason_field = "reason"
        if changes and set(changes) <= _LR_FIELDS:
            reason_field = "lr_reason"
        elif set(changes) == {"dtype"}:
            reason_field = "dtype_reason"
        for name in names:
            decision = self.decisions[name]
            for key, value in changes.items():
                setattr(decision, key, value)
            if "dtype" in changes:
                decision.nbytes = None  # measured for the old dtype
            setattr(decision, reason_field, reason)

    def select(self, predicate: Callable[[ParamDecision], bool]) -> list[str]:
        """Names of the decisions for which ``predicate`` is true, in model order."""
        return [name for name, d in self.decisions.items() if predicate(d)]

    def note(self, message: str) -> None:
        """Record a remark shown under the table and stored in the JSON (and log it)."""
        self.notes.append(message)
        logger.warning(message)

    # -- reading --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ParamDecision]:
        return iter(self.decisions.values())

    def __getitem__(self, name: str) -> ParamDecision:
        return self.decisions[name]

    def trainable_names(self) -> list[str]:
        """Names of the parameters that train, in model order."""
        return self.select(lambda d: d.trainable)

    def group_names(self) -> list[str]:
        """Optimizer group names of the trainable parameters, in model order, each once."""
        return list(dict.fromkeys(d.group for d in self if d.trainable))

    @property
    def has_custom_groups(self) -> bool:
        """True when the optimizer needs more than the Trainer's default layout.

        That is: a trainable parameter has its own group, learning rate or weight decay.
        """
        return any(
            d.group != DEFAULT_GROUP or d.lr is not None or d.lr_scale is not None or d.weight_decay is not None
            for d in self
            if d.trainable
        )

    @property
    def num_parameters(self) -> int:
        return sum(d.numel for d in self)

    @property
    def num_trainable(self) -> int:
        return sum(d.numel for d in self if d.trainable)

    def apply(self, model: nn.Module) -> None:
        """Set ``requires_grad`` and the dtype of every parameter of ``model`` as planned.

        A parameter whose dtype differs from the planned one is cast in place (its
        ``Parameter`` object is kept, so tied weights stay tied and references held
        elsewhere stay valid); buffers are never touched. This must run before the
        optimizer exists. Records each tensor's measured size in ``nbytes``.

        Raises :class:`PlanError` when the model's parameters are not the plan's.
        """
        params = dict(model.named_parameters())
        if params.keys() != self.decisions.keys():
            missing = sorted(self.decisions.keys() - params.keys())[:5]
            extra = sorted(params.keys() - self.decisions.keys())[:5]
            raise PlanError(
                f"The plan was built for another model: parameters missing from the model {missing}, "
                f"not in the plan {extra}."
            )
        for name, param in params.items():
            decision = self.decisions[name]
            if str(param.dtype) != decision.dtype:
                _cast_parameter(name, param, decision.dtype)
            param.requires_grad_(decision.trainable)
            decision.nbytes = param.numel() * param.element_size()

    # -- output ---------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (what ``strategy_plan.json`` holds)."""
        return {
            "format_version": PLAN_FORMAT_VERSION,
            "model_class": self.model_class,
            "num_layers": self.num_layers,
            "layers_path": self.layers_path,
            "num_parameters": self.num_parameters,
            "num_trainable": self.num_trainable,
            "strategy_args": self.strategy_args,
            "notes": list(self.notes),
            "settings": self.settings,
            "parameters": [{**asdict(d), "tied_with": list(d.tied_with), "shape": list(d.shape)} for d in self],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "StrategyPlan":
        """Inverse of :meth:`to_dict`."""
        decisions = {}
        for entry in data["parameters"]:
            entry = dict(entry, tied_with=tuple(entry.get("tied_with", ())), shape=tuple(entry.get("shape", ())))
            decisions[entry["name"]] = ParamDecision(**entry)
        return cls(
            model_class=data["model_class"],
            num_layers=data["num_layers"],
            layers_path=data["layers_path"],
            decisions=decisions,
            strategy_args=data.get("strategy_args", {}),
            notes=list(data.get("notes", [])),
            settings=dict(data.get("settings", {})),
        )

    def save(self, directory: str) -> str:
        """Write ``strategy_plan.json`` into ``directory`` and return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, PLAN_FILE_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str) -> "StrategyPlan":
        """Read a plan from a ``strategy_plan.json`` file or a directory holding one."""
        if os.path.isdir(path):
            path = os.path.join(path, PLAN_FILE_NAME)
        with open(path, encoding="utf-8") as fh:
            return cls.from_dict(json.load(fh))

    def table(self) -> str:
        """The plan as a text table: one row per block, runs of identical layers merged."""
        return format_plan_table(self)

    def __str__(self) -> str:
        return self.table()


def build_plan(
    model: nn.Module,
    strategy_args: Optional[StrategyArguments] = None,
    training_args: Optional["TrainingArguments"] = None,
    plugins: Iterable[object] = (),
    plugin_manager: Optional["pluggy.PluginManager"] = None,
) -> StrategyPlan:
    """Resolve every parameter of ``model`` under ``strategy_args``, without training.

    Args:
        model: any ``PreTrainedModel`` (or PEFT model, or ``nn.Module`` with a layer stack).
        strategy_args: the strategy; default: full fine-tuning.
        training_args: the ``TrainingArguments`` the plan will train with, for strategies
            that depend on them (learning rate, precision).
        plugins: extra plugin objects, beside built-in and installed ones.
        plugin_manager: a ready manager (then ``plugins`` is ignored).

    Raises:
        UnknownArchitectureError: no plugin could find the model's layers.
        PlanError: the options cannot apply to this model, or nothing would train.
    """
    strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
    pm = plugin_manager if plugin_manager is not None else get_plugin_manager(plugins)
    # Again here: StrategyArguments.__post_init__ cannot see plugins passed in code.
    pm.hook.hfls_validate_arguments(strategy_args=strategy_args)
    anatomy = pm.hook.hfls_model_anatomy(model=model)
    if anatomy is None:
        raise UnknownArchitectureError(
            f"Cannot find the decoder layers of {type(model).__name__}: no nn.ModuleList of identical blocks, "
            "and no installed plugin describes this architecture. Teach it with a plugin that implements "
            "`hfls_model_anatomy` and returns `ModelAnatomy.from_paths(model, layers_path=..., "
            "embedding_paths=[...], norm_paths=[...], head_paths=[...])`."
        )
    plan = StrategyPlan.from_model(model, anatomy, strategy_args)
    hook_kwargs = dict(plan=plan, anatomy=anatomy, strategy_args=strategy_args, training_args=training_args)
    pm.hook.hfls_plan_parameters(**hook_kwargs)
    pm.hook.hfls_adjust_plan(**hook_kwargs)
    pm.hook.hfls_validate_plan(**hook_kwargs)
    if plan.num_trainable == 0:
        raise PlanError(
            "Nothing would train: every parameter is frozen. Check trainable_layers="
            f"{strategy_args.trainable_layers!r}, trainable_modules={strategy_args.trainable_modules!r}, "
            f"train_head={strategy_args.train_head!r} and frozen_params={strategy_args.frozen_params!r}."
        )
    return plan


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` written as ``name`` (``"torch.bfloat16"`` or ``"bfloat16"``)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise PlanError(f"{name!r} is not a torch dtype (expected e.g. 'torch.float32', 'torch.bfloat16').")
    return dtype


def _cast_parameter(name: str, param: nn.Parameter, dtype_name: str) -> None:
    target = torch_dtype(dtype_name)
    if not (param.is_floating_point() and target.is_floating_point):
        raise PlanError(f"The plan casts {name} from {param.dtype} to {target}; only floating-point casts are possible.")
    with torch.no_grad():
        # Assigning .data keeps the Parameter object: tied modules and hooks keep seeing it.
        param.data = param.data.to(target)
    param.grad = None


def decision_nbytes(decision: ParamDecision) -> int:
    """Bytes of one parameter: measured when the plan was applied, else estimated from its dtype."""
    if decision.nbytes is not None:
        return decision.nbytes
    try:
        return decision.numel * torch_dtype(decision.dtype).itemsize
    except PlanError:
        return 0


def _human_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return f"{count}B"


def _human(count: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


def _lr_text(decisions: list[ParamDecision]) -> str:
    trained = [d for d in decisions if d.trainable]
    if not trained:
        return "-"
    # "base": TrainingArguments.learning_rate; "x0.5": relative to it, in a plan built
    # without TrainingArguments; a number: an absolute rate.
    base = any(d.lr is None and d.lr_scale is None for d in trained)
    scales = sorted({d.lr_scale for d in trained if d.lr is None and d.lr_scale is not None})
    rates = sorted({d.lr for d in trained if d.lr is not None})
    texts = ["base"] * base + [f"x{s:.3g}" for s in scales] + [f"{lr:.3g}" for lr in rates]
    if len(texts) <= 2:
        return ", ".join(texts)
    return f"{texts[0]}..{texts[-1]}"


def _row(label: str, decisions: list[ParamDecision]) -> tuple[str, ...]:
    total = sum(d.numel for d in decisions)
    trainable = sum(d.numel for d in decisions if d.trainable)
    if trainable == total:
        trained = "all"
    elif trainable == 0:
        trained = "none"
    else:
        trained = f"{_human(trainable)} ({100 * trainable / total:.0f}%)"
    dtypes = ",".join(sorted({d.dtype.replace("torch.", "") for d in decisions}))
    memory = _human_bytes(sum(decision_nbytes(d) for d in decisions))
    return (label, _human(total), trained, _lr_text(decisions), dtypes, memory)


def _layer_signature(plan: StrategyPlan, decisions: list[ParamDecision]) -> tuple:
    # Layers whose parameters are decided alike (by name inside the layer) share a row.
    skip = len(plan.layers_path) + 1
    return tuple(
        (d.name[skip:].split(".", 1)[-1], d.trainable, d.lr, d.lr_scale, d.dtype, d.weight_decay)
        for d in decisions
    )


def format_plan_table(plan: StrategyPlan) -> str:
    """Render ``plan`` as a fixed-width table (block, params, trainable, lr, dtype, memory).

    ``memory`` is what the block's parameters hold: measured from the tensors once the
    plan was applied, estimated from the planned dtypes before.
    """
    by_block: dict[str, list[ParamDecision]] = {}
    for decision in plan:
        by_block.setdefault(decision.block, []).append(decision)
    rows: list[tuple[str, ...]] = []
    for kind in (EMBEDDINGS,):
        if kind in by_block:
            rows.append(_row(kind, by_block[kind]))
    run: list[int] = []

    def flush() -> None:
        if run:
            label = f"layers.{run[0]}" if len(run) == 1 else f"layers.{run[0]}-{run[-1]}"
            rows.append(_row(label, [d for i in run for d in by_block[f"layers.{i}"]]))
            run.clear()

    for index in range(plan.num_layers):
        block = by_block.get(f"layers.{index}")
        if block is None:
            continue
        if run and _layer_signature(plan, by_block[f"layers.{run[-1]}"]) != _layer_signature(plan, block):
            flush()
        run.append(index)
    flush()
    for kind in (NORM, HEAD, OTHER):
        if kind in by_block:
            rows.append(_row(kind, by_block[kind]))
    rows.append(_row("total", list(plan)))

    header = ("block", "params", "trainable", "lr", "dtype", "memory")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    render = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    body = [render(header), line, *(render(r) for r in rows[:-1]), line, render(rows[-1])]
    title = (
        f"hf-llama-strategies plan for {plan.model_class}: {_human(plan.num_trainable)} of "
        f"{_human(plan.num_parameters)} parameters train ({100 * plan.num_trainable / max(plan.num_parameters, 1):.2f}%)"
    )
    out = [title, *body]
    out.extend(f"{key}: {value['summary']}" for key, value in plan.settings.items() if value.get("summary"))
    out.extend(f"note: {n}" for n in plan.notes)
    return "\n".join(out)
