"""``StrategyPlan``: the resolved decision for every parameter (the data model).

The plan is the single source of truth: strategies write into it (through the
``hfls_plan_parameters`` and ``hfls_adjust_plan`` hooks, called by ``build_plan``), the runtime
only applies it (:meth:`StrategyPlan.apply`). It serialises to ``strategy_plan.json`` and prints
as a table (:mod:`.plan_table`). It imports only the data it is made of (``anatomy``, ``decisions``,
``dtypes``) and its rendering: no strategy, no planner, no plugin manager (``active_names`` asks
the run's manager it is given).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from transformers.utils import logging

from ..errors import PlanError
from .anatomy import ModelAnatomy, parameter_numel
from .decisions import DEFAULT_GROUP, ParamDecision, is_dynamic
from .dtypes import torch_dtype
from .plan_table import format_block_table
from .units import format_count

if TYPE_CHECKING:
    import pluggy

    from .options import OptionGroup

logger = logging.get_logger(__name__)

PLAN_FILE_NAME = "strategy_plan.json"
PLAN_FORMAT_VERSION = 1
_LR_FIELDS = frozenset({"lr", "lr_scale", "group"})


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
    #: Dynamic schedules by name: a JSON-serialisable spec that the plugin owning the
    #: schedule reads in ``hfls_active_parameters``. Keys the core reads:
    #: ``description`` (shown under the table) and ``drop_optimizer_state`` (the runtime
    #: drops the optimizer state of the schedule's parameters while they do not train).
    schedules: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- building -------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model: nn.Module, anatomy: ModelAnatomy, strategy_args: "OptionGroup") -> "StrategyPlan":
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
                numel=parameter_numel(param),
                dtype=str(param.dtype),
                tied_with=tuple(aliases_of.get(name, ())),
                requires_grad_before=param.requires_grad,
                shape=tuple(getattr(param, "ds_shape", param.shape)),
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

    def bad_number(self) -> Optional[str]:
        """The first learning rate, rate scale or weight decay no run survives, described; ``None`` when all are fine.

        A rate must be a finite number > 0 (a frozen parameter's is not read), a weight decay a
        finite number >= 0: a NaN rate trains every weight into NaN without an error.
        """
        for d in self.decisions.values():
            for attr, low, expected in (("lr", 0.0, "a finite number > 0"), ("lr_scale", 0.0, "a finite number > 0"),
                                        ("weight_decay", None, "a finite number >= 0")):
                value = getattr(d, attr)
                if value is None or (attr != "weight_decay" and not d.trainable):
                    continue
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if not ok or (value <= low if low is not None else value < 0):
                    who = d.lr_reason if attr != "weight_decay" else d.reason
                    return f"{d.name}: {attr}={value!r} (set by {who or 'an unnamed decision'}), expected {expected}"
        return None

    def select(self, predicate: Callable[[ParamDecision], bool]) -> list[str]:
        """Names of the decisions for which ``predicate`` is true, in model order."""
        return [name for name, d in self.decisions.items() if predicate(d)]

    def note(self, message: str) -> None:
        """Record a remark shown under the table and stored in the JSON.

        Logged at info level only: a run shows it once, in its plan table (``StrategyCallback``
        logs the notes as warnings instead when ``print_plan: false`` hides the table).
        """
        self.notes.append(message)
        logger.info(message)

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

    @property
    def is_dynamic(self) -> bool:
        """True when some trainable parameter does not train at every step (a schedule)."""
        return is_dynamic(self)

    def active_names(self, global_step: int, plugin_manager: "pluggy.PluginManager") -> frozenset[str]:
        """Names of the parameters that train at optimizer step ``global_step`` (0-based).

        A pure function of the plan and the step: a resumed run and every DDP rank compute
        the same set without communicating. Trainable parameters without a schedule train
        from their ``active_from`` step on; those with a schedule are asked of the plugin
        that owns it, through the ``hfls_active_parameters`` hook.

        Args:
            global_step: optimizer steps already taken (``TrainerState.global_step`` when
                the step begins); with gradient accumulation one step spans several batches.
            plugin_manager: the run's manager (``RunContext.plugin_manager``), whose plugins
                answer the schedules.

        Raises:
            PlanError: no installed plugin implements one of the plan's schedules, or a
                plugin answered with parameters its schedule does not govern.
        """
        if global_step < 0:
            raise ValueError(f"global_step must be >= 0, got {global_step}")
        pm = plugin_manager
        active: set[str] = set()
        governed: dict[str, set[str]] = {name: set() for name in self.schedules}
        for d in self:
            if not d.trainable:
                continue
            if d.schedule is None:
                if global_step >= d.active_from:
                    active.add(d.name)
            else:
                governed.setdefault(d.schedule, set()).add(d.name)
        for schedule, names in governed.items():
            if schedule not in self.schedules:
                raise PlanError(
                    f"Parameters such as {sorted(names)[0]!r} follow the schedule {schedule!r}, which the plan does "
                    f"not define (defined: {sorted(self.schedules) or 'none'})."
                )
            answer = pm.hook.hfls_active_parameters(plan=self, schedule=schedule, global_step=global_step)
            if answer is None:
                raise PlanError(
                    f"No installed plugin implements the schedule {schedule!r} of this plan (hook "
                    "`hfls_active_parameters`). Install or pass the plugin that built the plan."
                )
            chosen = set(answer)
            stray = chosen - names
            if stray:
                raise PlanError(
                    f"The plugin implementing schedule {schedule!r} activated parameters it does not govern: "
                    f"{sorted(stray)[:5]}."
                )
            active.update(n for n in chosen if global_step >= self.decisions[n].active_from)
        return frozenset(active)

    def differences(self, other: "StrategyPlan") -> list[str]:
        """What would train differently under ``other`` than under this plan, one line each.

        Compares what decides training (the model's parameters, and for each: trainable,
        start step, schedule, lr, weight decay, group, dtype) and the schedules' specs, not
        the wording of reasons, notes or descriptions. Parameters that differ alike in one block share a
        line. An empty list means the two plans train identically.
        """
        lines: list[str] = []
        for attr in ("model_class", "num_layers", "layers_path"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine != theirs:
                lines.append(f"{attr}: {mine!r} -> {theirs!r}")
        only_mine = [n for n in self.decisions if n not in other.decisions]
        only_theirs = [n for n in other.decisions if n not in self.decisions]
        if only_mine:
            lines.append(f"{len(only_mine)} parameters only in the first plan, e.g. {only_mine[:3]}")
        if only_theirs:
            lines.append(f"{len(only_theirs)} parameters only in the second plan, e.g. {only_theirs[:3]}")
        counts: dict[tuple[str, str, str, str], int] = {}
        for name, mine in self.decisions.items():
            theirs = other.decisions.get(name)
            if theirs is None:
                continue
            for attr in _COMPARED_FIELDS:
                a, b = getattr(mine, attr), getattr(theirs, attr)
                if a != b:
                    key = (mine.block, attr, repr(a), repr(b))
                    counts[key] = counts.get(key, 0) + 1
        for (block, attr, a, b), count in counts.items():
            lines.append(f"{block}: {attr} {a} -> {b} ({count} parameter{'s' if count > 1 else ''})")
        for key in sorted(set(self.settings) & set(other.settings)):
            # A strategy lists under "decides" the keys of its settings that change the result
            # (precision: the autocast mode; training: the learning rate and the seed). A setting
            # only one plan has (a dry run, an older plan file) cannot be compared.
            mine_set, theirs_set = self.settings[key] or {}, other.settings[key] or {}
            for field_name in sorted(set(mine_set.get("decides", ())) | set(theirs_set.get("decides", ()))):
                if mine_set.get(field_name) != theirs_set.get(field_name):
                    lines.append(f"{key}: {field_name} {mine_set.get(field_name)!r} -> {theirs_set.get(field_name)!r}")
        for name in sorted(set(self.schedules) | set(other.schedules)):
            mine_spec, theirs_spec = self.schedules.get(name), other.schedules.get(name)
            if mine_spec is None or theirs_spec is None:
                lines.append(f"schedule {name!r}: {mine_spec!r} -> {theirs_spec!r}")
                continue
            for key in sorted((set(mine_spec) | set(theirs_spec)) - {"description"}):
                if mine_spec.get(key) != theirs_spec.get(key):
                    lines.append(f"schedule {name!r}: {key} {mine_spec.get(key)!r} -> {theirs_spec.get(key)!r}")
        return lines

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
            decision.nbytes = parameter_numel(param) * param.element_size()

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
            "schedules": self.schedules,
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
            schedules=dict(data.get("schedules", {})),
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
        """The plan as a text table: one row per block, runs of identical layers merged, then its notes."""
        title = (
            f"hf-llama-strategies plan for {self.model_class}: {format_count(self.num_trainable)} of "
            f"{format_count(self.num_parameters)} parameters {'may ' if self.is_dynamic else ''}train "
            f"({100 * self.num_trainable / max(self.num_parameters, 1):.2f}%)"
        )
        footer = [f"{key}: {value['summary']}" for key, value in self.settings.items() if value.get("summary")]
        footer += [f"schedule {name}: {spec['description']}" for name, spec in self.schedules.items()
                   if spec.get("description")]
        footer += [f"note: {n}" for n in self.notes]
        return "\n".join([title, format_block_table(list(self), self.layers_path, self.num_layers), *footer])

    def __str__(self) -> str:
        return self.table()


# What decides training, compared when a run resumes (reasons and notes are wording only).
_COMPARED_FIELDS = ("kind", "layer", "numel", "dtype", "trainable", "active_from", "schedule", "lr", "weight_decay",
                    "group", "tied_with")


def _cast_parameter(name: str, param: nn.Parameter, dtype_name: str) -> None:
    target = torch_dtype(dtype_name)
    if hasattr(param, "ds_id"):
        raise PlanError(
            f"The plan casts {name} from {param.dtype} to {target}, but DeepSpeed ZeRO-3 has partitioned it: "
            "DeepSpeed decides the dtypes of a ZeRO-3 model (its fp16/bf16 settings)."
        )
    if not (param.is_floating_point() and target.is_floating_point):
        raise PlanError(
            f"The plan casts {name} from {param.dtype} to {target}; only floating-point casts are possible."
        )
    with torch.no_grad():
        # Assigning .data keeps the Parameter object: tied modules and hooks keep seeing it.
        param.data = param.data.to(target)
    param.grad = None
