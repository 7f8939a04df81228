"""The installed cache of one model: forward hooks, content-addressed entries, hits and misses.

A sample's key is a hash of what reaches the model for it (input ids, attention mask, position
ids, token type ids, any other per-sample tensor) up to its last real token, so shuffling, new
epochs, a resumed run and every DDP rank hit it. Each forward then skips the prefix's layers
(they return their input) and starts at the boundary from the cached states.
"""

from __future__ import annotations

import hashlib
import struct
import time
import weakref
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn
from transformers.utils import logging

from ...core.anatomy import HEAD
from ...core.units import format_bytes
from .boundary import CACHE_FORMAT_VERSION, Boundary, is_under, tensor_bytes
from .storage import ShardStore

logger = logging.get_logger(__name__)

# Keyword arguments the Trainer passes that do not shape the prefix. TRL's SFTTrainer adds
# ``fused_lm_head`` (its head reads the backbone's ``last_hidden_state``; only the head's arithmetic
# changes), ``output_router_logits`` (an extra output) and, under sequence parallelism, ``shift_labels``.
_NOT_INPUTS = frozenset({"labels", "shift_labels", "num_items_in_batch"})
_FLAGS = frozenset({"return_dict", "output_attentions", "output_hidden_states", "use_cache", "logits_to_keep",
                    "return_loss", "fused_lm_head", "output_router_logits"})
# Keys of padding-free batches (TRL's packing "bfd" or padding_free=True): one row holding the whole batch.
_PADDING_FREE_KEYS = frozenset({"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"})
_IGNORE_INDEX = -100


class _Captured(Exception):
    """Raised by the boundary's pre-hook while the prefix is computed: carries its input."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden


class FrozenPrefixCache:
    """The installed cache of one model: entries, hooks, and what they did.

    Attributes:
        hits: rows served from the cache.
        misses: rows whose prefix was computed (pre-pass rows included).
        prepass_seconds: time of the last pre-pass (``None`` before it ran).
        prepass_samples: samples the last pre-pass computed.
        loaded_entries: entries read from disk when training began.
        compute_seconds: time spent computing missing rows (the prefix's forward and the copy to
            the host; the pre-pass included).
        store_seconds: time spent storing them (in memory, and on disk for ``disk``).
    """

    def __init__(self, model: nn.Module, boundary: Boundary, digest: str, store: Optional[ShardStore],
                 max_bytes: Optional[int]) -> None:
        # Weak: the registry of installed caches is keyed by the model, and must not keep it alive.
        self._model = weakref.ref(model)
        self.boundary = boundary
        self.digest = digest
        self.store = store
        self.max_bytes = max_bytes
        self.entries: dict[bytes, torch.Tensor] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self.prepass_seconds: Optional[float] = None
        self.prepass_samples = 0
        self.loaded_entries = 0
        self.compute_seconds = 0.0
        self.store_seconds = 0.0
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

    @property
    def model(self) -> nn.Module:
        """The model the cache serves."""
        model = self._model()
        if model is None:
            raise RuntimeError("frozen_prefix_cache: the model this cache served no longer exists.")
        return model

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
                digest.update(tensor_bytes(part))
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

    def load(self) -> int:
        """Read the entries of the disk store (``frozen_prefix_cache: disk``); return how many."""
        count = 0
        if self.store is not None:
            for key, value in self.store.read():
                if key not in self.entries and self._store(key, value):
                    count += 1
        self.loaded_entries = count
        return count

    def fill(self, inputs: Mapping[str, torch.Tensor], keys: list[bytes], ends: list[int]) -> dict[bytes, torch.Tensor]:
        """Compute the rows whose keys are missing (each distinct key once); store them; return them."""
        first_row: dict[bytes, int] = {}
        for r, key in enumerate(keys):
            if key not in self.entries:
                first_row.setdefault(key, r)
        if not first_row:
            return {}
        started = time.perf_counter()
        rows = list(first_row.values())
        # Out of inference mode, a clone is an ordinary tensor, which autograd may save.
        hidden = self.compute(inputs, rows).to("cpu").clone()
        new = {key: hidden[i, : ends[r]].clone() for i, (key, r) in enumerate(first_row.items())}
        computed = time.perf_counter()
        self.compute_seconds += computed - started
        self.misses += len(rows)
        stored = {key: value for key, value in new.items() if self._store(key, value)}
        if stored and self.store is not None:
            self.store.write(stored)
        self.store_seconds += time.perf_counter() - computed
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
    if not path or is_under(boundary.module, path) or not all(is_under(s, path) for s in boundary.skipped):
        return None
    import inspect

    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None
    return backbone if "last_hidden_state" in source else None


_INSTALLED: "weakref.WeakKeyDictionary[nn.Module, FrozenPrefixCache]" = weakref.WeakKeyDictionary()


def install_frozen_prefix_cache(model: nn.Module, cache: FrozenPrefixCache) -> None:
    """Hook ``cache`` into ``model`` (in place of any cache installed before)."""
    remove_frozen_prefix_cache(model)
    cache.install()
    _INSTALLED[model] = cache


def get_frozen_prefix_cache(model: nn.Module) -> Optional[FrozenPrefixCache]:
    """The cache installed on ``model`` (``None`` when none is)."""
    return _INSTALLED.get(model)


def remove_frozen_prefix_cache(model: nn.Module) -> None:
    """Uninstall the cache from ``model`` and free its entries."""
    cache = _INSTALLED.pop(model, None)
    if cache is not None:
        cache.uninstall()
