"""Frozen-prefix cache: run the frozen bottom of the model once per distinct sample.

Options: ``frozen_prefix_cache: off|memory|disk`` (default ``off``), ``frozen_prefix_cache_dir``
and ``frozen_prefix_cache_max_gb``. While the weights below the lowest parameter the plan ever
trains do not change, their output for a sample does not change either: every epoch after the
first, and every run of a learning-rate sweep, recomputes it for nothing. With the cache,

* the **boundary** is the input of the lowest block that ever trains: decoder layer ``i`` (the
  lowest layer with a trainable parameter at any step, so gradual unfreezing and LISA are
  covered), else the final norm, else the head's input (the head alone trains);
* a **pre-pass** (in inference mode, with ``per_device_eval_batch_size``, a progress bar) runs
  the prefix once for every distinct training sample and keeps its hidden states at the boundary;
  evaluation samples, and anything the pre-pass did not see, are computed when first met;
* each forward then skips the prefix's layers (they return their input) and starts at the
  boundary from the cached states.

Entries are **content-addressed**: a sample's key is a hash of what reaches the model for it
(input ids, attention mask, position ids, token type ids, any other per-sample tensor), so
shuffling, new epochs, a resumed run and every DDP rank hit it. The cache as a whole is keyed by
a **fingerprint** of everything that shapes the prefix: the library, torch and transformers
versions, the model class and config, the attention implementation, the boundary, the device
type, fp16/bf16, and the bytes, dtypes and shapes of every prefix parameter and buffer. A cache
made with other weights, another boundary or another precision is never read.

**Padding.** Real tokens never attend to padding (the attention mask), so their states do not
depend on how much padding follows them: trailing padding is cut off before the key is taken and
the stored row, and refilled with zeros when the row is put back into a batch of any length. That
is exact as long as nothing reads the outputs at trailing padding positions, which is checked
per batch (token labels there are all -100; for sequence-level labels or none, the padding holds
``pad_token_id``, where a classification head's pooling looks for it); a batch that fails the
check keeps its padding in the key. Leading (left) padding is kept: without explicit
``position_ids`` it moves the real tokens' positions, so a left-padded sample hits only when it
arrives with the same padding (pad to a fixed length, or pad on the right, for full use).

Logits at padding positions are not the uncached model's (no loss reads them). Refused, before
training, where the result would change: dropout or NEFTune noise in the prefix, a collator or
dataset that changes a sample between epochs (random masking or cropping: the first batch is
collated twice), trainable embeddings or a plan whose layer 0 trains (LISA or gradual unfreezing
over every layer), DeepSpeed ZeRO, FSDP and ``torch_compile``; an unwritable cache directory and a
cache larger than ``frozen_prefix_cache_max_gb`` (with the figure).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch
from torch import nn
from transformers.utils import logging

from ..anatomy import EMBEDDINGS, HEAD, LAYER, NORM, OTHER, ModelAnatomy
from ..arguments import StrategyArguments
from ..errors import InvalidArgumentError, PlanError
from ..hookspecs import hookimpl
from ..layer_selection import restricts_layers
from ..plan import StrategyPlan
from ..plan_report import format_bytes

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)

OFF, MEMORY, DISK = "off", "memory", "disk"
MODES = (OFF, MEMORY, DISK)
SETTINGS_KEY = "frozen_prefix_cache"
#: Bumped whenever keys, values or files change meaning: older caches are then never read.
CACHE_FORMAT_VERSION = 1
_GB = 10**9
_ATTRIBUTE = "_hfls_frozen_prefix_cache"
# Keyword arguments the Trainer passes that do not shape the prefix. TRL's SFTTrainer adds
# ``fused_lm_head`` (its head reads the backbone's ``last_hidden_state``; only the head's arithmetic
# changes), ``output_router_logits`` (an extra output) and, under sequence parallelism, ``shift_labels``.
_NOT_INPUTS = frozenset({"labels", "shift_labels", "num_items_in_batch"})
_FLAGS = frozenset({"return_dict", "output_attentions", "output_hidden_states", "use_cache", "logits_to_keep",
                    "return_loss", "fused_lm_head", "output_router_logits"})
# Keys of padding-free batches (TRL's packing "bfd" or padding_free=True): one row holding the whole batch.
_PADDING_FREE_KEYS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})
_IGNORE_INDEX = -100

__all__ = [
    "Boundary",
    "FrozenPrefixCache",
    "cache_mode",
    "default_cache_dir",
    "find_boundary",
    "get_frozen_prefix_cache",
    "hfls_adjust_plan",
    "hfls_on_train_begin",
    "hfls_validate_arguments",
    "hfls_validate_plan",
    "remove_frozen_prefix_cache",
]


# -- options ----------------------------------------------------------------------------------


def cache_mode(strategy_args: StrategyArguments) -> str:
    """``off``, ``memory`` or ``disk``: ``frozen_prefix_cache`` normalised."""
    value = strategy_args.frozen_prefix_cache
    return OFF if value is None else str(value).strip().lower()


def default_cache_dir() -> str:
    """Where ``frozen_prefix_cache: disk`` keeps caches without ``frozen_prefix_cache_dir``."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "hf_llama_strategies", "frozen_prefix_cache")


def _cache_dir(strategy_args: StrategyArguments) -> str:
    return os.path.abspath(os.path.expanduser(strategy_args.frozen_prefix_cache_dir or default_cache_dir()))


@hookimpl
def hfls_validate_arguments(strategy_args: StrategyArguments) -> None:
    """Check ``frozen_prefix_cache``, ``frozen_prefix_cache_dir`` and ``frozen_prefix_cache_max_gb``."""
    args = strategy_args
    value = args.frozen_prefix_cache
    if value is not None and (not isinstance(value, str) or value.strip().lower() not in MODES):
        raise InvalidArgumentError("frozen_prefix_cache", value, "'off', 'memory' or 'disk'")
    mode = cache_mode(args)  # null in a YAML file spells the default, off
    directory = args.frozen_prefix_cache_dir
    if directory is not None and (not isinstance(directory, str) or not directory.strip()):
        raise InvalidArgumentError("frozen_prefix_cache_dir", directory, "a directory path")
    if directory is not None and mode != DISK:
        raise InvalidArgumentError(
            "frozen_prefix_cache_dir", directory, "unset unless frozen_prefix_cache: disk",
            f"It has no effect with frozen_prefix_cache={mode!r}.",
        )
    limit = args.frozen_prefix_cache_max_gb
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise InvalidArgumentError(
                "frozen_prefix_cache_max_gb", limit, "a positive number of gigabytes (1e9 bytes)"
            )
        if mode == OFF:
            raise InvalidArgumentError(
                "frozen_prefix_cache_max_gb", limit, "unset unless frozen_prefix_cache is 'memory' or 'disk'"
            )


# -- the boundary -----------------------------------------------------------------------------


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
        path = plan.layers_path
        return Boundary(LAYER, lowest, f"{path}.{lowest}", tuple(f"{path}.{i}" for i in range(lowest)))
    all_layers = tuple(f"{plan.layers_path}.{i}" for i in range(plan.num_layers))
    norms = [d.name for d in plan if d.kind == NORM]
    if any(d.kind == NORM for d in trainable):
        return Boundary(NORM, plan.num_layers, _single_module(norms, "final norm"), all_layers)
    heads = [d.name for d in plan if d.kind == HEAD]
    heads += [alias for d in plan for alias in d.tied_with if anatomy.classify(alias)[0] == HEAD]
    norm_modules = (_single_module(norms, "final norm"),) if norms else ()
    return Boundary(HEAD, plan.num_layers, _single_module(heads, "head"), all_layers + norm_modules)


def _boundary_from_settings(settings: Mapping[str, Any]) -> Boundary:
    b = settings["boundary"]
    return Boundary(b["kind"], int(b["index"]), b["module"], tuple(b["skipped"]))


def _dtype_size(name: str) -> int:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 4


def _prefix_text(plan: StrategyPlan, boundary: Boundary) -> str:
    layers = "layers 0" if boundary.index == 1 else f"layers 0-{boundary.index - 1}"
    extra = " and the final norm" if boundary.kind == HEAD and any(d.kind == NORM for d in plan) else ""
    return f"the embeddings, {layers}{extra}"


def estimated_run_ratio(plan: StrategyPlan, boundary: Boundary, epochs: float) -> tuple[float, float]:
    """``(prefix share of the forward, cached run / uncached run)``, estimated from parameter counts.

    A forward costs about its weights' elements per token (embeddings excepted: a lookup); backward,
    the trainable weights' gradients plus the input gradients of everything at and above the
    boundary. The cached run pays the prefix once (the pre-pass) instead of once per epoch.
    """
    per_layer: dict[int, int] = {}
    for d in plan:
        if d.kind == LAYER and d.layer is not None:
            per_layer[d.layer] = per_layer.get(d.layer, 0) + d.numel
    head = sum(d.numel for d in plan if d.kind in (HEAD, NORM)) or sum(
        d.numel for d in plan if d.kind == EMBEDDINGS and d.tied_with
    )
    prefix = sum(n for layer, n in per_layer.items() if layer < boundary.index)
    forward = sum(per_layer.values()) + head
    above = forward - prefix
    backward = sum(d.numel for d in plan if d.trainable) + above
    share = prefix / max(forward, 1)
    ratio = 1 - prefix * (epochs - 1) / (epochs * max(forward + backward, 1))
    return share, ratio


def _epochs(training_args: Optional["TrainingArguments"]) -> Optional[float]:
    if training_args is None or getattr(training_args, "max_steps", -1) > 0:
        return None
    epochs = getattr(training_args, "num_train_epochs", None)
    return float(epochs) if isinstance(epochs, (int, float)) else None


@hookimpl(trylast=True)
def hfls_adjust_plan(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: StrategyArguments,
    training_args: Optional["TrainingArguments"],
) -> None:
    """Write the boundary and the cache's size per token into the plan; say when a run would gain."""
    mode = cache_mode(strategy_args)
    epochs = _epochs(training_args)
    if mode == OFF:
        restricted = restricts_layers(strategy_args.trainable_layers, strategy_args.trainable_modules)
        if epochs is None or epochs <= 1 or not restricted:
            return
        try:
            boundary = find_boundary(plan, anatomy)
        except PlanError:
            return
        share, ratio = estimated_run_ratio(plan, boundary, epochs)
        plan.settings[SETTINGS_KEY] = {
            "mode": OFF,
            "summary": (
                f"off; {_prefix_text(plan, boundary)} are frozen ({100 * share:.0f}% of the forward's weights) and "
                f"run again every epoch: frozen_prefix_cache: memory would run them once, an estimated "
                f"{ratio:.2f} of this run's compute over {epochs:g} epochs"
            ),
        }
        return
    boundary = find_boundary(plan, anatomy, mode)
    embedding = next((d for d in plan if d.kind == EMBEDDINGS and len(d.shape) == 2), None)
    hidden = embedding.shape[1] if embedding is not None else 0
    itemsize = _dtype_size(embedding.dtype) if embedding is not None else 4
    summary = (
        f"{mode}; {_prefix_text(plan, boundary)} run once per distinct sample, each forward starts at "
        f"{boundary.describe()} from cached states ({format_bytes(hidden * itemsize)} per token)"
    )
    if epochs is not None and epochs > 1:
        share, ratio = estimated_run_ratio(plan, boundary, epochs)
        summary += f"; estimated {ratio:.2f} of the uncached run's compute over {epochs:g} epochs"
    if strategy_args.frozen_prefix_cache_max_gb is not None:
        summary += f"; limit {strategy_args.frozen_prefix_cache_max_gb:g} GB"
    plan.settings[SETTINGS_KEY] = {
        "mode": mode,
        "dir": _cache_dir(strategy_args) if mode == DISK else None,
        "max_gb": strategy_args.frozen_prefix_cache_max_gb,
        "boundary": {"kind": boundary.kind, "index": boundary.index, "module": boundary.module,
                     "skipped": list(boundary.skipped)},
        "bytes_per_token": hidden * itemsize,
        "summary": summary,
    }


# -- checks that need the model or the training arguments --------------------------------------


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


def _in_prefix(path: str, boundary: Boundary) -> bool:
    """Whether the module at ``path`` runs below the boundary."""
    if _is_under(path, boundary.module):
        return False
    if any(_is_under(path, skipped) for skipped in boundary.skipped):
        return True
    layers_path = boundary.skipped[0].rsplit(".", 1)[0] if boundary.skipped else boundary.module.rsplit(".", 1)[0]
    if _is_under(path, layers_path):
        return False  # a layer at or above the boundary
    if boundary.kind == HEAD and path.rsplit(".", 1)[0] == boundary.module.rsplit(".", 1)[0]:
        return False  # the head's own dropout, beside it
    return True  # the embeddings and what the backbone runs around its layers


def _active_dropout(model: nn.Module, boundary: Boundary) -> list[str]:
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


def _check_writable(directory: str) -> None:
    probe = directory
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise InvalidArgumentError(
            "frozen_prefix_cache_dir", directory, "a directory this process can create and write",
            f"{probe!r} is {'not a directory' if not os.path.isdir(probe) else 'not writable'}.",
        )


@hookimpl
def hfls_validate_plan(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: StrategyArguments,
    training_args: Optional["TrainingArguments"], model: Optional[nn.Module],
) -> None:
    """Refuse a cache that would change the result, or that cannot be written."""
    settings = plan.settings.get(SETTINGS_KEY)
    if not settings or settings["mode"] == OFF:
        return
    mode = settings["mode"]
    option = f"frozen_prefix_cache={mode!r}"
    boundary = _boundary_from_settings(settings)
    if model is not None:
        dropout = _active_dropout(model, boundary)
        if dropout:
            raise PlanError(
                f"{option}: dropout is active below {boundary.describe()} ({', '.join(dropout[:4])}): the frozen "
                "prefix's output is random, and a cached one would not be. Set those rates to 0 (for example "
                "attention_dropout: 0) or frozen_prefix_cache: off."
            )
    if training_args is not None:
        refusals = {
            "neftune_noise_alpha": "adds random noise to the embeddings at every step",
            "torch_compile": "compiles the forward, which the cache changes between calls",
            "deepspeed": "partitions the prefix's weights, which the cache's fingerprint reads",
            "fsdp": "shards the prefix's weights, which the cache's fingerprint reads",
        }
        for key, why in refusals.items():
            value = getattr(training_args, key, None)
            if value:
                raise PlanError(
                    f"{option} cannot be combined with TrainingArguments.{key}={value!r}: it {why}. Set "
                    f"frozen_prefix_cache: off or drop {key}."
                )
    if mode == DISK:
        _check_writable(settings["dir"])


# -- the cache ---------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the boundary's pre-hook while the prefix is computed: carries its input."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).cpu().numpy().tobytes() if flat.numel() else b""


def fingerprint(model: nn.Module, plan: StrategyPlan, training_args: Optional["TrainingArguments"]) -> tuple[str, dict]:
    """``(hex digest, its readable inputs)`` of everything that shapes the prefix's output."""
    import transformers

    from .. import __version__

    settings = plan.settings[SETTINGS_KEY]
    boundary = _boundary_from_settings(settings)
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
        "boundary": settings["boundary"],
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
        digest.update(_tensor_bytes(param))
    for name, buffer in model.named_buffers():
        if _is_above(name, boundary):
            continue
        digest.update(f"buffer {name}|{buffer.dtype}|{tuple(buffer.shape)}".encode())
        digest.update(_tensor_bytes(buffer))
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


class FrozenPrefixCache:
    """The installed cache of one model: entries, hooks, and what they did.

    Attributes:
        hits: rows served from the cache.
        misses: rows whose prefix was computed (pre-pass rows included).
        prepass_seconds: time of the last pre-pass (``None`` before it ran).
        prepass_samples: samples the last pre-pass computed.
        loaded_entries: entries read from disk when training began.
    """

    def __init__(self, model: nn.Module, boundary: Boundary, digest: str, meta: dict[str, Any],
                 directory: Optional[str], max_bytes: Optional[int]) -> None:
        self.model = model
        self.boundary = boundary
        self.digest = digest
        self.meta = meta
        self.directory = None if directory is None else os.path.join(directory, digest[:40])
        self.max_bytes = max_bytes
        self.entries: dict[bytes, torch.Tensor] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.prepass_seconds: Optional[float] = None
        self.prepass_samples = 0
        self.loaded_entries = 0
        self._computing = False
        self._bypass = True
        self._stash: Optional[torch.Tensor] = None
        self._pending: Optional[Callable[[], None]] = None
        self._warned_full = False
        self._warned_bypass = False
        self._used = False
        self._handles: list[Any] = []
        self._patched: list[tuple[nn.Module, Any]] = []
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        self._pad_token_id = pad if isinstance(pad, int) else None

    # -- hooks ----------------------------------------------------------------------------

    def install(self) -> None:
        """Hook the model: its call keys the batch, skipped modules pass through, the boundary reads the cache."""
        modules = dict(self.model.named_modules())
        for path in self.boundary.skipped:
            module = modules[path]
            # Kept to put back: a forward someone else set on the instance (accelerate's hooks).
            own = module.__dict__.get("forward")
            module.forward = self._passthrough(module.forward)
            self._patched.append((module, own))
        backbone = _skippable_backbone(self.model, self.boundary)
        if backbone is not None:
            # Only the head trains: the backbone's embedding lookup, masks and rotary tables are not
            # needed either; it hands the cached states on as its output.
            own = backbone.__dict__.get("forward")
            backbone.forward = self._cached_backbone(backbone.forward)
            self._patched.append((backbone, own))
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._after_model_call))
        boundary = modules[self.boundary.module]
        self._handles.append(boundary.register_forward_pre_hook(self._on_boundary, with_kwargs=True))

    def uninstall(self) -> None:
        """Remove every hook; the model runs as before (entries are dropped)."""
        for handle in self._handles:
            handle.remove()
        for module, own in self._patched:
            if own is None:
                del module.forward  # the class's forward shows again
            else:
                module.forward = own
        self._handles, self._patched = [], []
        self.entries.clear()
        self.nbytes = 0

    def _passthrough(self, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._computing or self._bypass:
                return original(*args, **kwargs)
            # Its output is replaced at the boundary: any tensor of the right shape will do.
            return args[0] if args else kwargs["hidden_states"]

        return forward

    def _cached_backbone(self, original: Callable[..., Any]) -> Callable[..., Any]:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        def forward(*args: Any, **kwargs: Any) -> Any:
            if self._computing or self._bypass or self._stash is None:
                return original(*args, **kwargs)
            self._used = True
            return BaseModelOutputWithPast(last_hidden_state=self._stash)

        return forward

    def _on_boundary(self, module: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if self._computing:
            raise _Captured(hidden)
        if self._bypass or self._stash is None:
            return None
        if hidden is None or hidden.shape != self._stash.shape:
            shape = None if hidden is None else tuple(hidden.shape)
            raise RuntimeError(
                f"frozen_prefix_cache: {self.boundary.module} received {shape}, the cached batch is "
                f"{tuple(self._stash.shape)}: this model calls its layers in a way the cache does not support. "
                "Set frozen_prefix_cache: off."
            )
        self._used = True
        if args:
            return (self._stash, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._stash}

    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._computing:
            return None
        inputs, labels = self._model_inputs(args, kwargs)
        if inputs is None:
            # Generation (a KV cache), inputs_embeds, positional inputs: run the model as it is.
            self._bypass, self._stash = True, None
            if module.training and not self._warned_bypass:
                # Not silent: a training run whose batches all pass here would gain nothing.
                logger.warning(
                    "frozen_prefix_cache: a training batch with inputs %s (positional: %d) is not one the cache can "
                    "key; such batches run the whole model uncached.", sorted(kwargs), len(args),
                )
                self._warned_bypass = True
            return None
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending()
        self._stash = self.lookup(inputs, labels)
        self._bypass, self._used = False, False
        return None

    def _after_model_call(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._computing or self._bypass or self._stash is None or self._used:
            return None
        # The skipped modules returned placeholders: a forward that reached neither the boundary nor the
        # skipped backbone (say, a head that reads its weight directly after the final norm) used them.
        raise RuntimeError(
            f"frozen_prefix_cache: the model's forward never called {self.boundary.module} (nor its skipped "
            "backbone), so the cached states were not used and the output is wrong. Set frozen_prefix_cache: off."
        )

    @staticmethod
    def _model_inputs(args: tuple, kwargs: dict) -> tuple[Optional[dict[str, torch.Tensor]], Any]:
        if args or kwargs.get("inputs_embeds") is not None:
            return None, None
        for key in ("cache", "past_key_values"):
            if kwargs.get(key) is not None:
                return None, None
        if kwargs.get("use_cache") is True:
            return None, None
        inputs: dict[str, torch.Tensor] = {}
        for key, value in kwargs.items():
            if key in _NOT_INPUTS or key in _FLAGS or value is None:
                continue
            if not isinstance(value, torch.Tensor):
                return None, None  # an input whose effect on the prefix is unknown
            inputs[key] = value
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is None or ids.ndim != 2 or (mask is not None and mask.shape != ids.shape):
            return None, None
        labels = kwargs.get("labels")
        return inputs, labels if labels is not None else kwargs.get("shift_labels")

    # -- keys and entries -----------------------------------------------------------------

    def row_ends(self, inputs: Mapping[str, torch.Tensor], labels: Any = None) -> list[int]:
        """Per row, where its stored part ends: after its last real token when trailing padding is unread."""
        ids = inputs["input_ids"]
        batch, length = ids.shape
        mask = inputs.get("attention_mask")
        if mask is None:
            return [length] * batch
        real = mask.detach().cpu() != 0
        has_real = real.any(dim=1)
        last = length - torch.flip(real, dims=[1]).int().argmax(dim=1)
        positions = torch.arange(length).unsqueeze(0)
        trailing = positions >= last.unsqueeze(1)
        if isinstance(labels, torch.Tensor) and labels.shape == ids.shape:
            ok = ~(trailing & (labels.detach().cpu() != _IGNORE_INDEX)).any(dim=1)
        elif self._pad_token_id is not None:
            # Sequence-level labels (or none): a classification head pools at the last token that is
            # not pad_token_id, which must then be a real one.
            ok = ~(trailing & (ids.detach().cpu() != self._pad_token_id)).any(dim=1)
        else:
            ok = torch.zeros(batch, dtype=torch.bool)
        ok &= has_real
        return [int(last[r]) if ok[r] else length for r in range(batch)]

    @staticmethod
    def row_keys(inputs: Mapping[str, torch.Tensor], ends: list[int]) -> list[bytes]:
        """Per row, the hash of what reaches the model for it, up to its end."""
        ids = inputs["input_ids"]
        batch, length = ids.shape
        cpu = {name: value.detach().cpu() for name, value in sorted(inputs.items())}
        keys = []
        for r in range(batch):
            digest = hashlib.sha256(struct.pack("<qq", CACHE_FORMAT_VERSION, ends[r]))
            for name, value in cpu.items():
                if value.ndim >= 2 and value.shape[1] == length and value.shape[0] in (1, batch):
                    part = value[min(r, value.shape[0] - 1), : ends[r]]
                elif value.ndim >= 1 and value.shape[0] == batch:
                    part = value[r]
                else:
                    part = value
                digest.update(f"{name}|{part.dtype}|{tuple(part.shape)}|".encode())
                digest.update(_tensor_bytes(part))
            keys.append(digest.digest())
        return keys

    def compute(self, inputs: Mapping[str, torch.Tensor], rows: list[int]) -> torch.Tensor:
        """The boundary's input for ``rows`` of ``inputs``, computed by the model's own prefix."""
        batch = inputs["input_ids"].shape[0]
        index = torch.tensor(rows, device=inputs["input_ids"].device)
        sub = {}
        for name, value in inputs.items():
            sub[name] = value.index_select(0, index.to(value.device)) if value.ndim >= 1 and value.shape[0] == batch \
                and batch > 1 else value
        self._computing = True
        try:
            with torch.inference_mode():
                self.model(**sub)
        except _Captured as captured:
            return captured.hidden
        finally:
            self._computing = False
        raise RuntimeError(f"frozen_prefix_cache: the model never called {self.boundary.module}.")

    def _store(self, key: bytes, value: torch.Tensor) -> bool:
        size = value.numel() * value.element_size()
        if self.max_bytes is not None and self.nbytes + size > self.max_bytes:
            if not self._warned_full:
                logger.warning(
                    "frozen_prefix_cache: the cache is full (%s, frozen_prefix_cache_max_gb); further samples are "
                    "computed each time.", format_bytes(self.nbytes),
                )
                self._warned_full = True
            return False
        self.entries[key] = value
        self.nbytes += size
        return True

    def fill(self, inputs: Mapping[str, torch.Tensor], keys: list[bytes], ends: list[int]) -> dict[bytes, torch.Tensor]:
        """Compute the rows whose keys are missing (each distinct key once); store them; return them."""
        first_row: dict[bytes, int] = {}
        for r, key in enumerate(keys):
            if key not in self.entries:
                first_row.setdefault(key, r)
        if not first_row:
            return {}
        rows = list(first_row.values())
        # Out of inference mode, a clone is an ordinary tensor, which autograd may save.
        hidden = self.compute(inputs, rows).to("cpu").clone()
        new = {key: hidden[i, : ends[r]].clone() for i, (key, r) in enumerate(first_row.items())}
        self.misses += len(rows)
        stored = {key: value for key, value in new.items() if self._store(key, value)}
        if stored and self.directory is not None:
            self._write_shard(stored)
        return new

    def lookup(self, inputs: Mapping[str, torch.Tensor], labels: Any = None) -> torch.Tensor:
        """The boundary's input for a batch: cached rows, missing ones computed, trailing padding zero."""
        ids = inputs["input_ids"]
        batch, length = ids.shape
        ends = self.row_ends(inputs, labels)
        keys = self.row_keys(inputs, ends)
        new = self.fill(inputs, keys, ends)
        self.hits += sum(1 for key in keys if key not in new)
        values = [self.entries.get(key, None) if key not in new else new[key] for key in keys]
        sample = values[0]
        if all(end == length for end in ends):
            return torch.stack(values).to(ids.device, non_blocking=True)
        out = torch.zeros((batch, length, *sample.shape[1:]), dtype=sample.dtype)
        for r, value in enumerate(values):
            out[r, : value.shape[0]] = value
        return out.to(ids.device, non_blocking=True)

    # -- disk -------------------------------------------------------------------------------

    def load(self) -> int:
        """Read every shard of this fingerprint's directory; return the entries read."""
        if self.directory is None or not os.path.isdir(self.directory):
            return 0
        from safetensors.torch import load_file

        count = 0
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".safetensors"):
                continue
            for key, value in load_file(os.path.join(self.directory, name)).items():
                raw = bytes.fromhex(key)
                if raw not in self.entries and self._store(raw, value):
                    count += 1
        self.loaded_entries = count
        return count

    def _write_shard(self, entries: Mapping[bytes, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        assert self.directory is not None
        os.makedirs(self.directory, exist_ok=True)
        meta_path = os.path.join(self.directory, "fingerprint.json")
        if not os.path.exists(meta_path):
            _atomic_write(meta_path, lambda tmp: _write_json(tmp, self.meta))
        name = hashlib.sha256(b"".join(sorted(entries))).hexdigest()[:32]
        path = os.path.join(self.directory, f"shard-{name}.safetensors")
        if not os.path.exists(path):
            tensors = {key.hex(): value.contiguous() for key, value in entries.items()}
            _atomic_write(path, lambda tmp: save_file(tensors, tmp))

    # -- the pre-pass -----------------------------------------------------------------------

    def prepare(self, dataset: Any, collate: Callable[[list], Any], batch_size: int, show_progress: bool,
                option: str, estimate_per_token: int, prepass: bool = True) -> tuple[int, int]:
        """Check the data, size the cache, and schedule the pre-pass for the first forward.

        With ``prepass=False`` nothing is scheduled: samples are computed when training first meets them.

        Returns ``(distinct samples not yet cached, their estimated bytes)``.

        Raises:
            PlanError: the collator or dataset gives a sample other inputs each time, or the cache would
                exceed ``frozen_prefix_cache_max_gb``.
        """
        chunks = [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]
        if not chunks:
            return 0, 0
        pending: list[list[int]] = []
        seen: set[bytes] = set()
        missing_tokens = 0
        with _preserved_rng():
            for chunk in chunks[:3]:  # a random collator could repeat itself once by chance
                _check_deterministic(dataset, collate, chunk, option, self)
            for chunk in chunks:
                inputs, labels = _collate(dataset, collate, chunk, option)
                ends = self.row_ends(inputs, labels)
                keys = self.row_keys(inputs, ends)
                new = [(k, e) for k, e in zip(keys, ends) if k not in self.entries and k not in seen]
                seen.update(k for k, _ in new)
                missing_tokens += sum(e for _, e in new)
                if new:
                    pending.append(chunk)
        estimate = missing_tokens * estimate_per_token
        if self.max_bytes is not None and self.nbytes + estimate > self.max_bytes:
            total = self.nbytes + estimate
            raise PlanError(
                f"frozen_prefix_cache_max_gb={self.max_bytes / _GB:g}: the cache of this run's training data would "
                f"hold {total / _GB:.3f} GB ({format_bytes(total)}: {len(seen)} samples to compute, "
                f"{missing_tokens} tokens x {estimate_per_token} bytes, plus {format_bytes(self.nbytes)} already "
                f"cached). Raise frozen_prefix_cache_max_gb to at least {math.ceil(total / _GB * 1000) / 1000:g}, "
                "or set frozen_prefix_cache: off."
            )
        if pending and prepass:
            self._pending = lambda: self._prepass(dataset, collate, pending, show_progress, option)
        return len(seen), estimate

    def _prepass(self, dataset: Any, collate: Callable[[list], Any], chunks: list[list[int]], show_progress: bool,
                 option: str) -> None:
        from tqdm.auto import tqdm

        device = self._device()
        started = time.perf_counter()
        before = self.misses
        with _preserved_rng():
            for chunk in tqdm(chunks, desc="frozen prefix cache: pre-pass", disable=not show_progress,
                              unit="batch"):
                inputs, labels = _collate(dataset, collate, chunk, option)
                inputs = {k: v.to(device) for k, v in inputs.items()}
                ends = self.row_ends(inputs, labels)
                self.fill(inputs, self.row_keys(inputs, ends), ends)
        self.prepass_seconds = time.perf_counter() - started
        self.prepass_samples = self.misses - before
        logger.warning(
            "frozen_prefix_cache: pre-pass computed %d samples in %.2f s; the cache holds %d samples, %s.",
            self.prepass_samples, self.prepass_seconds, len(self.entries), format_bytes(self.nbytes),
        )

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")


def _skippable_backbone(model: nn.Module, boundary: Boundary) -> Optional[nn.Module]:
    """The backbone a head-only cache can skip whole: a transformers base model whose output the head reads.

    That is a ``PreTrainedModel`` task model whose ``base_model`` holds every skipped module and not
    the head, and whose forward reads ``last_hidden_state`` (Llama-family ``...ForCausalLM`` and
    ``...ForSequenceClassification`` do); anything else keeps the per-module skipping.
    """
    from transformers import PreTrainedModel

    backbone = getattr(model, "base_model", None)
    if boundary.kind != HEAD or not isinstance(model, PreTrainedModel) or backbone is model:
        return None
    if not isinstance(backbone, nn.Module) or type(model).__name__.startswith("Peft"):
        return None
    path = next((p for p, m in model.named_modules() if m is backbone), None)
    if not path or _is_under(boundary.module, path) or not all(_is_under(s, path) for s in boundary.skipped):
        return None
    import inspect

    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    return backbone if "last_hidden_state" in source else None


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)


class _preserved_rng:
    """Leaves torch's, Python's and NumPy's global RNG as it found them (the data order depends on them)."""

    def __enter__(self) -> None:
        import numpy as np

        self._torch = torch.get_rng_state()
        self._cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self._python = random.getstate()
        self._numpy = np.random.get_state()

    def __exit__(self, *exc: Any) -> None:
        import numpy as np

        torch.set_rng_state(self._torch)
        if self._cuda is not None:
            torch.cuda.set_rng_state_all(self._cuda)
        random.setstate(self._python)
        np.random.set_state(self._numpy)


def _collate(dataset: Any, collate: Callable[[list], Any], chunk: list[int], option: str) -> tuple[dict, Any]:
    batch = collate([dataset[i] for i in chunk])
    if not isinstance(batch, Mapping):
        raise PlanError(f"{option}: the data collator returns {type(batch).__name__}, not a dict of model inputs.")
    if _PADDING_FREE_KEYS & set(batch):
        raise PlanError(
            f"{option}: the data collator builds padding-free batches (keys {sorted(_PADDING_FREE_KEYS & set(batch))}"
            ": TRL's padding_free=True, or packing with packing_strategy 'bfd'), which concatenate a whole batch into "
            "one row: a sample's prefix is then keyed with whichever samples share its shuffled batch and never hits. "
            "Use padding_free=False (with packing: packing_strategy='wrapped'), or set frozen_prefix_cache: off."
        )
    inputs, labels = FrozenPrefixCache._model_inputs((), dict(batch))
    if inputs is None:
        raise PlanError(
            f"{option}: the batches hold no 2-D input_ids (keys {sorted(batch)}): the cache keys samples by what "
            "reaches the model. Set frozen_prefix_cache: off."
        )
    return inputs, labels


def _unwrap_collator(collate: Any) -> Any:
    # The Trainer wraps the user's collator to drop unused columns (RemoveColumnsCollator).
    return getattr(collate, "data_collator", collate)


def _check_deterministic(dataset: Any, collate: Callable[[list], Any], chunk: list[int], option: str,
                         cache: FrozenPrefixCache) -> None:
    user = _unwrap_collator(collate)
    if getattr(user, "mlm", False):
        raise PlanError(
            f"{option}: the data collator {type(user).__name__} masks tokens at random (mlm=True): a sample reaches "
            "the model differently every epoch, so its frozen prefix cannot be cached. Set frozen_prefix_cache: off."
        )
    first, labels = _collate(dataset, collate, chunk, option)
    second, labels2 = _collate(dataset, collate, chunk, option)
    keys = cache.row_keys(first, cache.row_ends(first, labels))
    if first.keys() != second.keys() or any(a.shape != b.shape for a, b in zip(first.values(), second.values())) \
            or keys != cache.row_keys(second, cache.row_ends(second, labels2)):
        raise PlanError(
            f"{option}: the same samples, fetched and collated twice, reached the model differently (random masking, "
            f"cropping or augmentation in {type(user).__name__} or the dataset): their frozen prefix's output changes "
            "between epochs and cannot be cached. Make the data deterministic or set frozen_prefix_cache: off."
        )


# -- the Trainer integration -------------------------------------------------------------------


def get_frozen_prefix_cache(model: nn.Module) -> Optional[FrozenPrefixCache]:
    """The cache installed on ``model`` (``None`` when none is)."""
    return getattr(model, _ATTRIBUTE, None)


def remove_frozen_prefix_cache(model: nn.Module) -> None:
    """Uninstall the cache from ``model`` and free its entries."""
    cache = get_frozen_prefix_cache(model)
    if cache is not None:
        cache.uninstall()
        delattr(model, _ATTRIBUTE)


@hookimpl
def hfls_on_train_begin(
    model: nn.Module, plan: StrategyPlan, training_args: Optional["TrainingArguments"], train_dataloader: Any
) -> None:
    """Install the cache (reusing a compatible one), size it from the training data, schedule the pre-pass."""
    settings = plan.settings.get(SETTINGS_KEY)
    if not settings or settings["mode"] == OFF:
        remove_frozen_prefix_cache(model)
        return
    mode = settings["mode"]
    option = f"frozen_prefix_cache={mode!r}"
    boundary = _boundary_from_settings(settings)
    digest, meta = fingerprint(model, plan, training_args)
    cache = get_frozen_prefix_cache(model)
    if cache is None or cache.digest != digest or cache.boundary != boundary:
        remove_frozen_prefix_cache(model)
        max_gb = settings.get("max_gb")
        directory = settings.get("dir") if mode == DISK else None
        if directory is not None:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:  # os.access passes on /proc, a read-only mount, for root
                raise InvalidArgumentError(
                    "frozen_prefix_cache_dir", directory, "a directory this process can create and write",
                    f"Creating it failed: {exc.strerror}.",
                ) from exc
        cache = FrozenPrefixCache(model, boundary, digest, meta, directory,
                                  None if max_gb is None else int(max_gb * _GB))
        cache.install()
        setattr(model, _ATTRIBUTE, cache)
        cache.load()
    dataset = getattr(train_dataloader, "dataset", None)
    collate = getattr(train_dataloader, "collate_fn", None)
    if dataset is None or collate is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        logger.warning("%s: the training data cannot be indexed; samples are cached as they first arrive.", option)
        return
    batch_size = getattr(training_args, "per_device_eval_batch_size", None) or 8
    show = training_args is None or (not training_args.disable_tqdm and training_args.process_index == 0)
    # Under DDP a rank trains on 1/world_size of the data per epoch: a pre-pass over all of it would cost
    # each rank world_size epochs of the prefix. Each rank caches what its shard brings as it first arrives.
    world_size = getattr(training_args, "world_size", 1) or 1
    count, estimate = cache.prepare(dataset, collate, batch_size, show, option, int(settings["bytes_per_token"]),
                                    prepass=world_size <= 1)
    if world_size > 1:
        logger.info("%s: %d processes: no pre-pass; each rank caches its samples when it first trains on them.",
                    option, world_size)
    figure = (
        f"{len(dataset)} training samples, {count} to compute (~{format_bytes(estimate)}), "
        f"{cache.loaded_entries} read from {cache.directory}" if cache.directory else
        f"{len(dataset)} training samples, {count} to compute (~{format_bytes(estimate)})"
    )
    settings["summary"] = settings["summary"].split("; cache: ")[0] + f"; cache: {figure}"
    logger.info("%s: %s", option, figure)
