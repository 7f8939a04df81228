"""Where a cached forward starts (the boundary), what lies below it (the prefix), and its fingerprint.

The boundary is the input of the lowest block that ever trains: decoder layer ``i`` (the lowest
layer with a trainable parameter at any step, so gradual unfreezing and LISA are covered), else
the final norm, else the head's input (the head alone trains). The fingerprint hashes everything
that shapes the prefix's output, so a cache made with other weights, another boundary or another
precision is never read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
from torch import nn

from ...core.anatomy import EMBEDDINGS, HEAD, LAYER, NORM, OTHER, ModelAnatomy
from ...core.plan import StrategyPlan
from ...errors import PlanError
from .arguments import MEMORY

if TYPE_CHECKING:
    from transformers import TrainingArguments

#: Bumped whenever keys, values or files change meaning: older caches are then never read.
CACHE_FORMAT_VERSION = 2  # 2: shards carry their fingerprint and a checksum


@dataclass(frozen=True)
class Boundary:
    """Where a cached forward starts.

    Attributes:
        kind: ``layer``, ``norm`` or ``head``: the lowest block with a parameter that ever trains.
        index: for ``layer``, that layer's index; otherwise the number of decoder layers.
        module: path of the module whose input is cached.
        skipped: paths of the modules a cached forward skips (they return their input).
    """

    kind: str
    index: int
    module: str
    skipped: tuple[str, ...]

    def describe(self) -> str:
        return {LAYER: f"layers.{self.index}", NORM: "the final norm", HEAD: "the head"}[self.kind]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Boundary":
        """Inverse of ``dataclasses.asdict``, as ``strategy_plan.json`` stores it."""
        return cls(data["kind"], int(data["index"]), data["module"], tuple(data["skipped"]))


@dataclass
class CacheSettings:
    """What the plan says of the cache (``strategy_plan.json``'s ``settings.frozen_prefix_cache``).

    Attributes:
        mode: ``off``, ``memory`` or ``disk``.
        summary: the line under the plan table.
        boundary: where a cached forward starts (``None`` with ``off``).
        dir: the cache directory (``disk``).
        max_gb: ``frozen_prefix_cache_max_gb``.
        bytes_per_token: the size of one token's cached hidden states.
        prepass: compute the training samples in a pre-pass (``frozen_prefix_cache_prepass``);
            ``False``: when first met.
    """

    mode: str
    summary: str
    boundary: Optional[Boundary] = None
    dir: Optional[str] = None
    max_gb: Optional[float] = None
    bytes_per_token: int = 0
    prepass: bool = True

    KEY = "frozen_prefix_cache"

    def write_to(self, plan: StrategyPlan) -> None:
        """Store these settings in ``plan`` (JSON-serialisable)."""
        data = asdict(self)
        if self.boundary is not None:
            data["boundary"]["skipped"] = list(self.boundary.skipped)
        plan.settings[self.KEY] = data

    @classmethod
    def read_from(cls, plan: StrategyPlan) -> Optional["CacheSettings"]:
        """The settings ``plan`` holds, ``None`` when it holds none."""
        data = plan.settings.get(cls.KEY)
        if not data:
            return None
        boundary = Boundary.from_dict(data["boundary"]) if data.get("boundary") else None
        return cls(**{**data, "boundary": boundary})


def _single_module(names: Iterable[str], what: str) -> str:
    modules = {name.rsplit(".", 1)[0] for name in names}
    if len(modules) != 1:
        raise PlanError(
            f"frozen_prefix_cache: the {what} of this model is not one module ({sorted(modules)}); the cache cannot "
            "tell where it starts. Set frozen_prefix_cache: off."
        )
    return modules.pop()


def find_boundary(plan: StrategyPlan, anatomy: ModelAnatomy, mode: str = MEMORY) -> Boundary:
    """The input of the lowest block that ever trains, as a :class:`Boundary`.

    Raises:
        PlanError: nothing is frozen below the lowest trainable parameter (embeddings train,
            layer 0 trains at some step) or a parameter outside embeddings, layers, norm and head trains.
    """
    option = f"frozen_prefix_cache={mode!r}"
    trainable = [d for d in plan if d.trainable]
    for kind, what in ((EMBEDDINGS, "the input embeddings train"), (OTHER, "a parameter outside the layers trains")):
        found = next((d for d in trainable if d.kind == kind), None)
        if found is not None:
            raise PlanError(
                f"{option} needs a frozen prefix, but {what}: {found.name} ({found.reason}). Freeze it "
                "(train_embeddings: false / frozen_params) or set frozen_prefix_cache: off."
            )
    layers = sorted({d.layer for d in trainable if d.kind == LAYER and d.layer is not None})
    if layers:
        lowest = layers[0]
        if lowest == 0:
            first = next(d for d in trainable if d.kind == LAYER and d.layer == 0)
            raise PlanError(
                f"{option}: nothing is frozen below the lowest trainable parameter: {first.name} in layer 0 trains "
                f"({first.reason}). The cache needs frozen layers at the bottom (for example trainable_layers: "
                "'-2:', or lisa_layers over layers that leave layer 0 out); otherwise set frozen_prefix_cache: off."
            )
        return _layer_boundary(plan, lowest)
    all_layers = tuple(f"{plan.layers_path}.{i}" for i in range(plan.num_layers))
    norms = [d.name for d in plan if d.kind == NORM]
    if any(d.kind == NORM for d in trainable):
        return Boundary(NORM, plan.num_layers, _single_module(norms, "final norm"), all_layers)
    heads = [d.name for d in plan if d.kind == HEAD]
    heads += [alias for d in plan for alias in d.tied_with if anatomy.classify(alias)[0] == HEAD]
    norm_modules = (_single_module(norms, "final norm"),) if norms else ()
    return Boundary(HEAD, plan.num_layers, _single_module(heads, "head"), all_layers + norm_modules)


def _layer_boundary(plan: StrategyPlan, index: int) -> Boundary:
    path = plan.layers_path
    return Boundary(LAYER, index, f"{path}.{index}", tuple(f"{path}.{i}" for i in range(index)))


def boundary_at(plan: StrategyPlan, own: Boundary, index: int) -> Boundary:
    """``frozen_prefix_cache_boundary``: the input of decoder layer ``index`` (the layer count: the final norm's).

    It may lie below ``own``, the plan's boundary (:func:`find_boundary`): the layers between
    then run at every step, without gradients (frozen weights fed cached states that need none
    build no autograd graph), and one cache serves plans whose lowest trained layers differ.

    Raises:
        PlanError: ``index`` lies above ``own`` (the layers between would be skipped, not
            trained) or past the last decoder layer.
    """
    option = f"frozen_prefix_cache_boundary={index}"
    if index > plan.num_layers:
        raise PlanError(
            f"{option}: {plan.model_class} has {plan.num_layers} decoder layers; give a layer index from 1 to "
            f"{plan.num_layers} ({plan.num_layers}: the final norm's input)."
        )
    if index > own.index:
        raise PlanError(
            f"{option} lies above {own.describe()}, the lowest block that trains: the layers between would be "
            f"skipped instead of trained. Give at most {own.index}, or leave it unset."
        )
    if index < plan.num_layers:
        return _layer_boundary(plan, index)
    norms = [d.name for d in plan if d.kind == NORM]
    if own.kind != HEAD or not norms:
        return own  # already the input of whatever follows the last layer
    all_layers = tuple(f"{plan.layers_path}.{i}" for i in range(plan.num_layers))
    return Boundary(NORM, plan.num_layers, _single_module(norms, "final norm"), all_layers)


def dtype_size(name: str) -> int:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def prefix_text(plan: StrategyPlan, boundary: Boundary) -> str:
    layers = "layers 0" if boundary.index == 1 else f"layers 0-{boundary.index - 1}"
    extra = " and the final norm" if boundary.kind == HEAD and any(d.kind == NORM for d in plan) else ""
    return f"the embeddings, {layers}{extra}"


def head_elements(plan: StrategyPlan) -> int:
    """Elements of the weights every token's head projection reads: the head's, else the embeddings it is tied to.

    A tied head is listed once, as the embeddings (``tied_with`` names the head): a lookup on the
    way in, but a full projection on the way out (SmolLM2-135M's 49,152 x 576 costs per token what
    8 of its 30 layers do).
    """
    head = sum(d.numel for d in plan if d.kind == HEAD)
    if head:
        return head
    return sum(d.numel for d in plan if d.kind == EMBEDDINGS and d.tied_with)


def estimated_run_ratio(plan: StrategyPlan, boundary: Boundary, epochs: float) -> tuple[float, float]:
    """``(prefix share of the forward, cached run / uncached run)``, estimated from parameter counts.

    A forward costs about its weights' elements per token (embeddings excepted: a lookup; a head
    tied to them counted, :func:`head_elements`); backward, the trainable weights' gradients plus
    the input gradients of everything at and above the boundary. The cached run pays the prefix
    once (the pre-pass) instead of once per epoch.
    """
    per_layer: dict[int, int] = {}
    for d in plan:
        if d.kind == LAYER and d.layer is not None:
            per_layer[d.layer] = per_layer.get(d.layer, 0) + d.numel
    head = head_elements(plan) + sum(d.numel for d in plan if d.kind == NORM)
    prefix = sum(n for layer, n in per_layer.items() if layer < boundary.index)
    forward = sum(per_layer.values()) + head
    above = forward - prefix
    backward = sum(d.numel for d in plan if d.trainable) + above
    share = prefix / max(forward, 1)
    ratio = 1 - prefix * (epochs - 1) / (epochs * max(forward + backward, 1))
    return share, ratio


def is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def _in_prefix(path: str, boundary: Boundary) -> bool:
    """Whether the module at ``path`` runs below the boundary."""
    if is_under(path, boundary.module):
        return False
    if any(is_under(path, skipped) for skipped in boundary.skipped):
        return True
    layers_path = boundary.skipped[0].rsplit(".", 1)[0] if boundary.skipped else boundary.module.rsplit(".", 1)[0]
    if is_under(path, layers_path):
        return False  # a layer at or above the boundary
    if boundary.kind == HEAD and path.rsplit(".", 1)[0] == boundary.module.rsplit(".", 1)[0]:
        return False  # the head's own dropout, beside it
    return True  # the embeddings and what the backbone runs around its layers


def active_dropout(model: nn.Module, boundary: Boundary) -> list[str]:
    """Dropout in the prefix: ``nn.Dropout`` modules with p > 0, and config dropout rates > 0."""
    found = [
        f"{path} (p={module.p})"
        for path, module in model.named_modules()
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0 and _in_prefix(path, boundary)
    ]
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in sorted(config.to_dict().items()):
            lowered = key.lower()
            if not any(word in lowered for word in ("dropout", "pdrop", "layerdrop")):
                continue
            if lowered.startswith(("classifier", "summary", "head", "final")):
                continue  # applied to the head's input, above the boundary
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found.append(f"config.{key}={value}")
    return found


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b""


def fingerprint(
    model: nn.Module, plan: StrategyPlan, boundary: Boundary, training_args: Optional["TrainingArguments"]
) -> tuple[str, dict]:
    """``(hex digest, its readable inputs)`` of everything that shapes the prefix's output."""
    import transformers

    from ..._version import __version__

    config = getattr(model, "config", None)
    config_dict = config.to_dict() if config is not None else {}
    for key in ("use_cache", "_name_or_path", "transformers_version"):
        config_dict.pop(key, None)
    params = dict(model.named_parameters())
    device = next(iter(params.values())).device.type if params else "cpu"
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "hf_llama_strategies": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "model_class": type(model).__name__,
        "config": config_dict,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "boundary": asdict(boundary) | {"skipped": list(boundary.skipped)},
        "device": device,
        "fp16": bool(getattr(training_args, "fp16", False)),
        "bf16": bool(getattr(training_args, "bf16", False)),
        "precision": plan.settings.get("precision"),
    }
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    prefix = _prefix_names(plan, boundary)
    for name in prefix:
        param = params[name]
        digest.update(f"{name}|{param.dtype}|{tuple(param.shape)}".encode())
        digest.update(tensor_bytes(param))
    for name, buffer in model.named_buffers():
        if _is_above(name, boundary):
            continue
        digest.update(f"buffer {name}|{buffer.dtype}|{tuple(buffer.shape)}".encode())
        digest.update(tensor_bytes(buffer))
    meta["prefix_parameters"] = len(prefix)
    meta["prefix_dtypes"] = sorted({str(params[n].dtype) for n in prefix})
    return digest.hexdigest(), meta


def _is_above(name: str, boundary: Boundary) -> bool:
    return not _in_prefix(name.rsplit(".", 1)[0], boundary)


def _prefix_names(plan: StrategyPlan, boundary: Boundary) -> list[str]:
    def in_prefix(d: Any) -> bool:
        if d.kind in (EMBEDDINGS, OTHER):
            return True
        if d.kind == LAYER:
            return d.layer is not None and d.layer < boundary.index
        return d.kind == NORM and boundary.kind == HEAD

    return [d.name for d in plan if in_prefix(d)]
