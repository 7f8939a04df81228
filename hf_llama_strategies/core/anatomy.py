"""Where a model keeps its embeddings, decoder layers, final norm and head.

The built-in finder works from structure, not from lists of class names: the decoder
layers are the homogeneous ``nn.ModuleList`` holding most of the parameters; the backbone
is ``model.base_model``; the head is whatever the task model holds beside its backbone
(``lm_head``, ``score``, ``classifier``, ``cls``...). It sees through PEFT wrappers. An
architecture it cannot read is taught by a plugin implementing ``hfls_model_anatomy``; the
built-in answer (:mod:`.builtin_hooks`) calls :func:`find_anatomy_by_structure` last.

Layer indices come from parsed parameter paths (``model.layers.3.mlp...`` is layer 3),
never from substring matches, so ``experts.3.`` inside layer 0 is still layer 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn

from ..errors import UnknownArchitectureError

EMBEDDINGS = "embeddings"
LAYER = "layer"
NORM = "norm"
HEAD = "head"
OTHER = "other"
#: ``ModelAnatomy.found_by`` of a model whose blocks nobody could find.
NO_ANATOMY = "none"


@dataclass(frozen=True)
class ModelAnatomy:
    """The parts of a model, as dotted module paths of ``model.named_modules()``.

    Attributes:
        model_class: class name of the model that was analysed (the outer wrapper's).
        layers_path: path of the ``nn.ModuleList`` of decoder (or encoder) layers.
        num_layers: how many layers it holds.
        embedding_paths: modules that form the input embeddings (token, position...).
        norm_paths: the final norm after the last layer (empty for post-norm models).
        head_paths: modules of the task head (``lm_head``, ``score``, ``classifier``...).
        tied_parameters: alias -> canonical parameter name, for tensors shared between
            modules (tied input/output embeddings). The canonical name is the one that
            ``model.named_parameters()`` yields.
        found_by: who produced this anatomy (``"structure"`` or a plugin's name;
            :data:`NO_ANATOMY` for a model nobody could read, see :meth:`without_layers`).
    """

    model_class: str
    layers_path: str
    num_layers: int
    embedding_paths: tuple[str, ...] = ()
    norm_paths: tuple[str, ...] = ()
    head_paths: tuple[str, ...] = ()
    tied_parameters: dict[str, str] = field(default_factory=dict)
    found_by: str = "structure"

    @classmethod
    def from_paths(
        cls,
        model: nn.Module,
        layers_path: str,
        embedding_paths: Iterable[str] = (),
        norm_paths: Iterable[str] = (),
        head_paths: Iterable[str] = (),
        found_by: str = "plugin",
    ) -> "ModelAnatomy":
        """Build an anatomy from module paths, checking that each path exists.

        This is what a plugin teaching a new architecture usually calls.
        """
        modules = dict(model.named_modules())
        for path in [layers_path, *embedding_paths, *norm_paths, *head_paths]:
            if path not in modules:
                raise UnknownArchitectureError(
                    f"{found_by}: module path {path!r} does not exist in {type(model).__name__}."
                )
        layers = modules[layers_path]
        if not isinstance(layers, (nn.ModuleList, nn.Sequential)):
            raise UnknownArchitectureError(
                f"{found_by}: {layers_path!r} is a {type(layers).__name__}, expected an nn.ModuleList of layers."
            )
        return cls(
            model_class=type(model).__name__,
            layers_path=layers_path,
            num_layers=len(layers),
            embedding_paths=tuple(embedding_paths),
            norm_paths=tuple(norm_paths),
            head_paths=tuple(head_paths),
            tied_parameters=find_tied_parameters(model),
            found_by=found_by,
        )

    @classmethod
    def without_layers(cls, model: nn.Module) -> "ModelAnatomy":
        """The anatomy of a model whose layers nobody could find: every parameter is ``other``.

        Enough for options that name parameters by regex and for precision; an option that
        needs the layers, embeddings, norm or head calls :meth:`require`, which refuses it.
        """
        return cls(
            model_class=type(model).__name__,
            layers_path="",
            num_layers=0,
            tied_parameters=find_tied_parameters(model),
            found_by=NO_ANATOMY,
        )

    @property
    def is_known(self) -> bool:
        """False for :meth:`without_layers`: the model's blocks are unknown."""
        return self.found_by != NO_ANATOMY

    def require(self, option: str, value: object) -> None:
        """Refuse ``option`` when the model's blocks are unknown (it names layers or blocks).

        Raises:
            UnknownArchitectureError: naming the option, the model and the ways out.
        """
        if self.is_known:
            return
        raise UnknownArchitectureError(
            f"{option}={value!r} needs the decoder layers (and embeddings, final norm, head) of {self.model_class}, "
            "but it has no nn.ModuleList of identical blocks, and no installed plugin describes this architecture. "
            "Teach it with a plugin that implements `hfls_model_anatomy` and returns `ModelAnatomy.from_paths("
            "model, layers_path=..., embedding_paths=[...], norm_paths=[...], head_paths=[...])`, or name "
            "parameters by regex (trainable_params, frozen_params, lr_rules), which works on any model."
        )

    def classify(self, param_name: str) -> tuple[str, Optional[int]]:
        """Return ``(block kind, layer index or None)`` for a parameter name."""
        layers_prefix = self.layers_path + "."
        if self.layers_path and param_name.startswith(layers_prefix):
            index = param_name[len(layers_prefix) :].split(".", 1)[0]
            return LAYER, int(index)
        for kind, paths in ((EMBEDDINGS, self.embedding_paths), (NORM, self.norm_paths), (HEAD, self.head_paths)):
            if any(_is_under(param_name, path) for path in paths):
                return kind, None
        return OTHER, None

    def layer_relative_name(self, param_name: str) -> str:
        """``model.layers.3.mlp.up_proj.weight`` -> ``mlp.up_proj.weight``."""
        rest = param_name[len(self.layers_path) + 1 :]
        return rest.split(".", 1)[1]


def _is_under(name: str, path: str) -> bool:
    return path == "" or name == path or name.startswith(path + ".")


def find_tied_parameters(model: nn.Module) -> dict[str, str]:
    """Map every alias of a shared parameter to its canonical name.

    ``named_parameters()`` yields a shared tensor once, under its first name; tied
    input/output embeddings therefore hide the head's weight. This recovers it.
    """
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        key = id(param)
        if key in canonical:
            aliases[name] = canonical[key]
        else:
            canonical[key] = name
    return aliases


def _module_path(root: nn.Module, target: nn.Module) -> Optional[str]:
    for path, module in root.named_modules():
        if module is target:
            return path
    return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _saved_original(module: nn.Module) -> nn.Module:
    """A layer PEFT trains in full (a ``modules_to_save`` wrapper) counts as the layer it wraps."""
    original = getattr(module, "original_module", None)
    return original if type(module).__name__ == "ModulesToSaveWrapper" and isinstance(original, nn.Module) else module


def _find_layer_list(root: nn.Module) -> Optional[str]:
    """The homogeneous ModuleList of parameterised blocks that holds the most parameters."""
    best: Optional[tuple[int, int, str]] = None
    for path, module in root.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(_saved_original(child)) for child in module}
        if len(kinds) != 1 or not all(_has_params(child) for child in module):
            continue
        numel = sum(parameter_numel(p) for p in module.parameters())
        candidate = (numel, -path.count("."), path)
        if best is None or candidate[:2] > best[:2]:
            best = candidate
    return None if best is None else best[2]


def _is_norm(name: str, module: nn.Module) -> bool:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))):
        return True
    return "norm" in type(module).__name__.lower() or "norm" in name.lower() or name.startswith("ln")


def _unwrap_peft(model: nn.Module) -> tuple[nn.Module, str]:
    """Return the task model inside a PEFT wrapper and its path, or the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    if callable(get_base_model) and hasattr(model, "peft_config"):
        inner = get_base_model()
        path = _module_path(model, inner)
        if path is not None:
            return inner, path
    return model, ""


def find_anatomy_by_structure(model: nn.Module) -> Optional[ModelAnatomy]:
    """The built-in finder; ``None`` when the model has no recognisable layer stack."""
    task_model, prefix = _unwrap_peft(model)
    layers_rel = _find_layer_list(task_model)
    if layers_rel is None:
        return None
    layers_path = _join(prefix, layers_rel)
    layers = task_model.get_submodule(layers_rel)

    backbone = getattr(task_model, "base_model", None)
    if not isinstance(backbone, nn.Module) or not layers_rel.startswith(_module_path(task_model, backbone) or ""):
        # A plain nn.Module: the backbone is whatever directly holds the layer list.
        backbone = task_model.get_submodule(layers_rel.rsplit(".", 1)[0]) if "." in layers_rel else task_model
    backbone_rel = _module_path(task_model, backbone) or ""

    input_embeddings: Optional[nn.Module] = None
    get_input_embeddings = getattr(task_model, "get_input_embeddings", None)
    if callable(get_input_embeddings):
        try:
            input_embeddings = get_input_embeddings()
        except (NotImplementedError, AttributeError):
            input_embeddings = None

    embedding_rel: list[str] = []
    if input_embeddings is not None:
        emb_path = _module_path(task_model, input_embeddings)
        if emb_path is not None:
            parent = emb_path.rsplit(".", 1)[0] if "." in emb_path else ""
            # BERT-style models keep token, position and type embeddings (and a norm) in
            # one submodule of the backbone: that whole submodule is the embeddings block.
            if parent != backbone_rel and parent.startswith(backbone_rel) and not layers_rel.startswith(parent):
                embedding_rel.append(parent)
            else:
                embedding_rel.append(emb_path)

    norm_rel: list[str] = []
    head_rel: list[str] = []
    layers_parent_rel = layers_rel.rsplit(".", 1)[0] if "." in layers_rel else ""
    is_task_model = backbone is not task_model
    for container_rel in dict.fromkeys([backbone_rel, layers_parent_rel]):
        container = task_model.get_submodule(container_rel) if container_rel else task_model
        after_layers = False
        for name, child in container.named_children():
            child_rel = _join(container_rel, name)
            if layers_rel.startswith(child_rel + ".") or layers_rel == child_rel:
                after_layers = True
                continue
            if not _has_params(child):
                continue
            if any(_is_under(child_rel, e) or _is_under(e, child_rel) for e in embedding_rel):
                continue
            if isinstance(child, nn.Embedding):
                embedding_rel.append(child_rel)
            elif name == "pooler":
                # The pooler only feeds a classification head; it is part of that head.
                head_rel.append(child_rel)
            elif _is_norm(name, child):
                norm_rel.append(child_rel)
            elif after_layers and not is_task_model:
                # A model that is its own backbone (a plain nn.Module): what follows the
                # layers and is not a norm is the output head.
                head_rel.append(child_rel)

    if is_task_model:
        for name, child in task_model.named_children():
            if child is backbone or not _has_params(child):
                continue
            head_rel.append(name)

    return ModelAnatomy(
        model_class=type(model).__name__,
        layers_path=layers_path,
        num_layers=len(layers),
        embedding_paths=tuple(_join(prefix, p) for p in embedding_rel),
        norm_paths=tuple(_join(prefix, p) for p in norm_rel),
        head_paths=tuple(_join(prefix, p) for p in head_rel),
        tied_parameters=find_tied_parameters(model),
        found_by="structure",
    )


def parameter_numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also one that DeepSpeed ZeRO-3 has partitioned (its local tensor is empty)."""
    ds_numel = getattr(param, "ds_numel", None)
    return int(ds_numel) if ds_numel is not None else param.numel()
