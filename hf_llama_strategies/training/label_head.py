"""TRL's fused LM head on a CPU: only the labelled positions scored, each row's softmax kept for the backward.

TRL's ``SFTTrainer`` calls the model with ``fused_lm_head=True``: the backbone runs, then
``ChunkedLogProbFunction`` turns the last hidden states into each label's log-probability, its
entropy and whether it was the top prediction, without building the ``(batch, length, vocab)``
logits. That design is for GPUs. Without Triton (on a CPU) TRL scores *every* position, prompt
and padding included, in ``4096 x 32768`` tiles; it runs each tile's projection again in the
backward; and each elementwise step of a tile allocates a new tile-sized tensor. On a small model
with a large vocabulary (SmolLM2-135M: a 49,152-token head costs as much per token as 8 of its 30
layers) that head took more than half of a training step.

:func:`install_label_head` puts, in front of TRL's fused forward, one that does the same
arithmetic on a CPU in fewer passes: the positions whose label is ``-100`` are left out before the
projection (TRL does that on a GPU too), each row's ``exp(z - max)`` is kept from the forward and
turned into the logits' gradient in place (one projection less, as the model's own loss does), and
the entropy and top-1 flag come from the same pass. The outputs are TRL's ``FusedCausalLMOutput``,
so ``SFTTrainer.compute_loss`` computes the same loss and reports the same ``entropy`` and
``mean_token_accuracy``; the values agree with TRL's to float32 rounding (a sum over the
vocabulary in another order). Anything else (a GPU, autocast, a head with a bias, a soft cap or a
logit scale, MoE router logits, pre-shifted labels) goes to TRL's forward unchanged.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Optional

import torch
from torch import nn
from transformers.utils import logging

logger = logging.get_logger(__name__)

_IGNORE_INDEX = -100
# Rows projected at once: bounds the transient (rows x vocabulary) buffers the forward allocates
# beside the ones it keeps (the model's own forward would hold all of them at once).
_ROWS_PER_BLOCK = 1024
# Config attributes that scale or cap the logits: TRL's head applies them; this one does not.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")


class LabelLogProbs(torch.autograd.Function):
    """Per row of ``hidden @ weight.T``: the target's log-probability, the entropy, whether the target is the argmax.

    Only the log-probabilities are differentiable (TRL's SFT loss reads those; the entropy and the
    top-1 flag are metrics). The forward keeps each row's ``exp(z - max(z))`` and sum, which the
    backward turns into ``d log p_target / dz = onehot(target) - p`` in place, so the backward runs
    one projection (two when the head trains) and allocates no vocabulary-sized tensor.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = hidden.shape[0]
        log_probs = hidden.new_empty(rows)
        entropy = hidden.new_empty(rows)
        is_top1 = torch.empty(rows, dtype=torch.bool, device=hidden.device)
        numerators, sums = [], hidden.new_empty(rows)
        for start in range(0, rows, _ROWS_PER_BLOCK):
            end = min(start + _ROWS_PER_BLOCK, rows)
            target = targets[start:end]
            logits = torch.mm(hidden[start:end], weight.t())
            top = logits.amax(dim=-1)
            target_logit = logits.gather(1, target.unsqueeze(1)).squeeze(1)
            # argmax returns the first maximum: a tie with an earlier token is not a top-1 prediction (as in TRL).
            is_top1[start:end] = logits.argmax(dim=-1) == target
            shifted = logits.sub_(top.unsqueeze(1))
            numerator = torch.exp(shifted)
            total = numerator.sum(dim=-1)
            log_total = torch.log(total)
            log_probs[start:end] = target_logit - (top + log_total)
            # H = log(sum e) - sum(e * (z - max)) / sum e: the max cancels before it can cost precision.
            entropy[start:end] = log_total - torch.linalg.vecdot(numerator, shifted) / total
            sums[start:end] = total
            numerators.append(numerator)
            del logits, shifted
        ctx.save_for_backward(hidden, weight, targets, sums)
        ctx.numerators = numerators
        ctx.mark_non_differentiable(entropy, is_top1)
        return log_probs, entropy, is_top1

    @staticmethod
    def backward(ctx: Any, grad_log_probs: Optional[torch.Tensor], *_: Any) -> tuple:
        hidden, weight, targets, sums = ctx.saved_tensors
        numerators, ctx.numerators = ctx.numerators, None
        if numerators is None:
            raise RuntimeError("LabelLogProbs: backward ran twice through the same graph (retain_graph=True), "
                               "which this head does not support; its buffers were consumed by the first.")
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight) if need_weight else None
        if grad_log_probs is None:
            return grad_hidden, grad_weight, None
        for block, start in enumerate(range(0, hidden.shape[0], _ROWS_PER_BLOCK)):
            end = min(start + _ROWS_PER_BLOCK, hidden.shape[0])
            grad = grad_log_probs[start:end].to(hidden.dtype)
            # grad * (onehot(target) - p), p = e / sum(e): built in the kept numerators.
            logits_grad = numerators[block].mul_((-grad / sums[start:end]).unsqueeze(1))
            logits_grad.scatter_add_(1, targets[start:end].unsqueeze(1), grad.unsqueeze(1))
            numerators[block] = None  # freed block by block
            if grad_hidden is not None:
                torch.mm(logits_grad, weight, out=grad_hidden[start:end])
            if grad_weight is not None:
                grad_weight.addmm_(logits_grad.t(), hidden[start:end])
        return grad_hidden, grad_weight, None


def _static_support(model: nn.Module) -> Optional[str]:
    """Why this head cannot stand in for TRL's on ``model`` (whatever the call), or ``None``."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config") or config.get_text_config() is not config:
        return "not a text-only transformers model"
    transforms = [name for name in _LOGIT_TRANSFORMS if getattr(config, name, None) is not None]
    if transforms:
        return f"its logits are transformed ({', '.join(transforms)})"
    if getattr(model, "base_model", model) is model:
        return "no backbone separate from the head"
    return None


def _runs_here(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether this call is one the CPU head computes exactly as TRL's would."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return (
        isinstance(weight, torch.Tensor) and type(weight) in (torch.Tensor, nn.Parameter)  # not a DTensor
        and weight.device.type == "cpu" and weight.dtype == torch.float32
        and getattr(head, "bias", None) is None and not hasattr(weight, "ds_id")  # DeepSpeed ZeRO-3 shards it
        and not torch.is_autocast_enabled("cpu")
        and not kwargs.get("output_router_logits") and not getattr(model.config, "output_router_logits", False)
    )


def install_label_head(model: nn.Module) -> bool:
    """Route ``model(..., fused_lm_head=True)`` on a CPU through :class:`LabelLogProbs`.

    ``model`` is the one TRL patched with ``add_fused_lm_head`` (the base model of a PEFT model).
    Calls this head cannot compute as TRL's does go to TRL's forward. Returns whether it was
    installed (not when TRL did not patch the model, or the model transforms its logits).
    """
    trl_forward = model.__dict__.get("forward")
    if trl_forward is None or getattr(trl_forward, "_hfls_label_head", False):
        return False
    try:
        from trl.trainer.utils import FusedCausalLMOutput
    except ImportError:  # a TRL without the fused head: nothing to stand in for
        return False
    why_not = _static_support(model)
    if why_not is not None:
        logger.info("TRL's fused LM head kept as it is on this model: %s.", why_not)
        return False

    @functools.wraps(type(model).forward)  # generate() validates its kwargs against this signature
    def forward(self: nn.Module, *args: Any, fused_lm_head: bool = False, labels: Any = None,
                shift_labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any) -> Any:
        if not fused_lm_head or labels is None or shift_labels is not None or not _runs_here(self, kwargs):
            return trl_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                               num_items_in_batch=num_items_in_batch, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        weight = self.get_output_embeddings().weight
        labels = labels[:, 1:].to(weight.device)
        mask = labels != _IGNORE_INDEX
        log_probs, entropy, is_top1 = LabelLogProbs.apply(
            hidden[mask].to(weight.device, torch.float32), weight, labels[mask]
        )
        # masked_scatter keeps an all-ignored batch connected to the model (a zero loss with a gradient).
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                       for x in (log_probs, entropy, is_top1))
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / count, log_probs=log_probs, entropy=entropy,
                                   is_top1=is_top1, label_mask=mask)

    forward._hfls_label_head = True  # type: ignore[attr-defined]
    model.forward = types.MethodType(forward, model)
    return True
