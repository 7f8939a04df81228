"""Activation checkpointing that stops at the lowest trainable parameter.

transformers 5 enables activation checkpointing (``TrainingArguments.activation_checkpointing``,
or its deprecated alias ``gradient_checkpointing``, or ``model.activation_checkpointing_enable()``)
by wrapping every decoder layer's forward in ``torch.utils.checkpoint`` and by calling
``enable_input_require_grads``, a hook that makes the embedding output require grad. That hook
exists for ``use_reentrant=True``: a reentrant checkpoint's output requires grad only if one of
its tensor *inputs* does, so without it a layer whose input needs no grad would hand no gradient
to its own parameters. Its cost, with a frozen prefix (embeddings and the first layers frozen):
backward runs through every frozen layer, and every frozen layer is recomputed.

This plugin replaces, on every ``GradientCheckpointingLayer``, the function that checkpoints the
layer with :class:`FrozenPrefixCheckpoint`, which decides per call, from ``requires_grad`` at
that moment (so dynamic freezing schedules are followed without being known):

* nothing entering the layer requires grad and none of its parameters does (a layer of the
  frozen prefix): the layer runs once, under ``no_grad``. Its output needs no grad, so it is
  neither recomputed nor back-propagated through, and it keeps no activations;
* nothing entering the layer requires grad but some of its parameters do (the first trainable
  layer): the layer is checkpointed with one extra, empty input that requires grad, so its
  output requires grad under ``use_reentrant`` true or false, while the recomputed layer sees
  its real input, which needs no grad: backward stops at the layer's lowest trainable module;
* otherwise: transformers' checkpointing, unchanged.

Then the input-require-grads hooks are removed: nothing needs them any more. The gradients of
trainable parameters are those of training without checkpointing, bit for bit on CPU.

It needs no option and does nothing when activation checkpointing is off. Models whose decoder
layers are not ``GradientCheckpointingLayer`` instances (remote code written for transformers 4)
keep transformers' behaviour, with a log message.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from ..core.hookspecs import hookimpl
from ..core.plan import StrategyPlan

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)

__all__ = [
    "FrozenPrefixCheckpoint",
    "skip_frozen_prefix",
    "hfls_on_train_begin",
]


def _any_tensor_requires_grad(values: Iterable[Any]) -> bool:
    for value in values:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif isinstance(value, (tuple, list)):
            if _any_tensor_requires_grad(value):
                return True
        elif isinstance(value, dict):
            if _any_tensor_requires_grad(value.values()):
                return True
    return False


class _WithoutLastArgument:
    """Calls ``function`` without its last positional argument (the grad anchor)."""

    __slots__ = ("function",)

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any) -> Any:
        return self.function(*args[:-1])


class FrozenPrefixCheckpoint:
    """Stands in for a layer's ``_gradient_checkpointing_func``: checkpoint only what backward needs.

    ``GradientCheckpointingLayer`` calls it as ``func(partial(forward, layer, **kwargs), *args)``
    when the layer checkpoints (training, grad enabled, checkpointing on for that layer).

    Args:
        layer: the layer whose parameters decide whether it is part of the frozen prefix.
        checkpoint_func: the function transformers installed (``torch.utils.checkpoint.checkpoint``
            with the user's ``activation_checkpointing_kwargs``, possibly with CPU offload).

    Attributes:
        plain_calls: how many times the layer ran without checkpointing (frozen prefix).
        anchored_calls: how many times it was checkpointed with the grad anchor (first trainable layer).
        checkpointed_calls: how many times transformers' checkpointing ran unchanged.
    """

    def __init__(self, layer: nn.Module, checkpoint_func: Callable[..., Any]) -> None:
        self.checkpoint_func = checkpoint_func
        # Parameters never change identity during training; only requires_grad does.
        self._params = tuple(layer.parameters())
        self.plain_calls = 0
        self.anchored_calls = 0
        self.checkpointed_calls = 0

    def __call__(self, function: Callable[..., Any], *args: Any) -> Any:
        keywords = function.keywords if isinstance(function, functools.partial) else {}
        if _any_tensor_requires_grad(args) or _any_tensor_requires_grad(keywords.values()):
            self.checkpointed_calls += 1
            return self.checkpoint_func(function, *args)
        if not any(p.requires_grad for p in self._params):
            # The output cannot require grad: nothing to recompute, nothing to back-propagate, and
            # no_grad spares autograd's bookkeeping without changing a single value.
            self.plain_calls += 1
            with torch.no_grad():
                return function(*args)
        # A reentrant checkpoint's output requires grad only if a tensor input does. An empty anchor
        # provides one, without making the real input require grad (which would extend backward
        # below this layer's lowest trainable module).
        self.anchored_calls += 1
        anchor = torch.empty(0, device=self._params[0].device, requires_grad=True)
        return self.checkpoint_func(_WithoutLastArgument(function), *args, anchor)


def _checkpointing_layers(model: nn.Module) -> list[GradientCheckpointingLayer]:
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _is_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def skip_frozen_prefix(model: nn.Module, layers: Optional[nn.Module] = None) -> int:
    """Make activation checkpointing skip the frozen prefix of ``model``; idempotent.

    Call it after checkpointing was enabled (``model.activation_checkpointing_enable()``) and
    before the forward pass; the ``Trainer`` integration does it in ``on_train_begin``. Needed
    again after checkpointing is re-enabled (which installs new functions and hooks).

    Args:
        model: the model (a ``PreTrainedModel``, a PEFT wrapper, or any module holding one).
        layers: the decoder-layer stack (for example ``model.model.layers``). When given and one
            of its layers is not a ``GradientCheckpointingLayer``, nothing is changed.

    Returns:
        The number of layers whose checkpointing function was replaced (0 when checkpointing is
        off or the model is not supported).
    """
    if not _is_checkpointing(model):
        return 0
    if layers is not None and not all(isinstance(layer, GradientCheckpointingLayer) for layer in layers):
        logger.info(
            "Activation checkpointing: the decoder layers of %s are not GradientCheckpointingLayer instances; "
            "transformers' checkpointing is kept as is (backward runs through the frozen layers).",
            type(model).__name__,
        )
        return 0
    replaced = 0
    for layer in _checkpointing_layers(model):
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if func is None:
            continue
        if not isinstance(func, FrozenPrefixCheckpoint):
            layer._gradient_checkpointing_func = FrozenPrefixCheckpoint(layer, func)
        replaced += 1
    if replaced:
        for module in model.modules():
            if isinstance(module, PreTrainedModel) and getattr(module, "_require_grads_hooks", None):
                module.disable_input_require_grads()
    return replaced


@hookimpl
def hfls_on_train_begin(model: nn.Module, plan: StrategyPlan, training_args: Optional["TrainingArguments"]) -> None:
    """Skip the frozen prefix when the Trainer (or the user) enabled activation checkpointing."""
    if not plan.layers_path:
        return  # no layer stack known: transformers' checkpointing as it is
    layers = _get_submodule(model, plan.layers_path)
    replaced = skip_frozen_prefix(model, layers)
    if replaced:
        logger.info(
            "Activation checkpointing: %d layers checkpoint only when backward needs them; frozen layers "
            "below the lowest trainable parameter run once and take no part in backward.",
            replaced,
        )


def _get_submodule(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None
