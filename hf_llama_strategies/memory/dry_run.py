"""The peak memory of one training step, activations included, from a dry run on fake tensors.

:func:`estimate_training_memory` runs one steady-state optimizer step of the model's own code on
fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and lifetimes, no
storage) and counts the bytes of the tensor storages alive after every ATen operator
(:class:`~.counter.LiveTensorCounter`). Its peak is the peak of live tensor bytes a real step
reaches, activations, autocast copies, optimizer temporaries and all. The static estimate
(:mod:`.static`) is what remains when the model's code cannot run on fake tensors.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn
from transformers.utils import logging

from ..arguments import StrategyArguments
from ..context import RunContext
from ..core.options import check_positive_int
from ..core.plan import StrategyPlan
from ..core.plugins import PluginManager
from ..planner import build_plan
from ..training.optimizer import build_optimizer, plan_name
from ..training.schedule_runner import ScheduleRunner
from .counter import (
    ACTIVATIONS,
    BUFFERS,
    GRADIENTS,
    INPUTS,
    OPTIMIZER_STATE,
    WEIGHTS,
    LiveTensorCounter,
)
from .estimate import BlockMemory, TrainingMemoryEstimate
from .sharding import apply_distributed
from .static import estimate_memory

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)


# -- the estimate --------------------------------------------------------------------------------


def default_seq_len(training_args: Optional["TrainingArguments"]) -> int:
    """The sequence length a run trains on when none is given: TRL's ``max_length``, else 128."""
    for name in ("max_length", "max_seq_length"):
        value = getattr(training_args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 128  # the CLI's max_seq_length default


def estimate_training_memory(
    model: nn.Module,
    strategy_args: Optional[StrategyArguments] = None,
    training_args: Optional["TrainingArguments"] = None,
    *,
    batch_size: Optional[int] = None,
    seq_len: Optional[int] = None,
    world_size: Optional[int] = None,
    plugin_manager: Optional[PluginManager] = None,
    context: Optional[RunContext] = None,
) -> TrainingMemoryEstimate:
    """Peak memory of one training step, activations included, from a dry run on fake tensors.

    A copy of ``model`` whose parameters are fake tensors (no storage) trains one steady-state
    optimizer step as the ``Trainer`` runs it: the plan applied (frozen parameters, planned
    dtypes; a dynamic schedule at its largest active set: LISA's heaviest draw, gradual
    unfreezing's last stage), activation checkpointing as ``TrainingArguments`` ask for it with
    the plugins' ``hfls_on_train_begin`` hooks (the frozen prefix skipped), autocast in the dtype
    the precision decision chose, every micro-batch of gradient accumulation (the later ones
    repeat the second, so at most two run), gradient clipping, and the optimizer ``optim=`` names
    holding its state from an earlier step. ``model`` is not changed; it may live on the meta
    device (built from a config).

    Args:
        model: the model to train (real weights, or the meta device).
        strategy_args: the strategy; default: full fine-tuning.
        training_args: batch size, gradient accumulation, checkpointing, optimizer, clipping,
            precision flags; default: ``TrainingArguments``' defaults.
        batch_size: examples per device and micro-batch; default ``per_device_train_batch_size``.
        seq_len: tokens per example; default ``max_length`` of TRL configs, else 128.
        world_size: ranks, for the per-rank figures of DDP, FSDP and DeepSpeed ZeRO; default
            ``training_args.world_size``.
        plugin_manager: the manager the plan is built with (default: built-in and installed).
        context: the run's context (its manager and hardware), shared by a context for other arguments.

    Returns:
        A :class:`TrainingMemoryEstimate`. When the model's code cannot run on fake tensors
        (custom operators), the static estimate, with ``simulated=False`` and the reason.

    Raises:
        InvalidArgumentError: ``batch_size``, ``seq_len`` or ``world_size`` is not a positive integer.
        UnknownArchitectureError, PlanError: as :func:`build_plan`.
    """
    from transformers import TrainingArguments

    started = time.perf_counter()
    if training_args is None:
        training_args = TrainingArguments(output_dir="trainer_output", report_to="none")
    batch_size = check_positive_int(
        "batch_size", training_args.per_device_train_batch_size if batch_size is None else batch_size
    )
    seq_len = check_positive_int("seq_len", default_seq_len(training_args) if seq_len is None else seq_len)
    world_size = check_positive_int("world_size", training_args.world_size if world_size is None else world_size)
    strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
    if context is not None:
        context = context.variant(strategy_args, training_args, model=model)
    else:
        context = RunContext.create(strategy_args, training_args, model=model, plugin_manager=plugin_manager)
    plan = build_plan(model, context=context)
    autocast_dtype = _autocast_dtype(context, training_args)
    step = heaviest_step(plan, context.plugin_manager)
    shape = _StepShape(
        batch_size=batch_size, seq_len=seq_len,
        gradient_accumulation_steps=check_positive_int("gradient_accumulation_steps",
                                                       training_args.gradient_accumulation_steps),
        activation_checkpointing=bool(training_args.activation_checkpointing)
        or bool(getattr(model, "is_activation_checkpointing", False)),
        autocast=None if autocast_dtype is None else str(autocast_dtype)[6:],
        optimizer=str(getattr(training_args.optim, "value", training_args.optim)), step=step,
    )
    try:
        estimate = _simulate(model, plan, context, training_args, autocast_dtype, shape)
    except Exception as exc:  # any failure of foreign model code on fake tensors
        estimate = _static_fallback(plan, shape, exc)
    if plan.is_dynamic:
        estimate.notes.append(f"dynamic plan: simulated at step {step}, its largest active set")
    apply_distributed(estimate, context.distributed, world_size)
    estimate.seconds = time.perf_counter() - started
    return estimate


@dataclass(frozen=True)
class _StepShape:
    """How the simulated step runs (the fields a :class:`TrainingMemoryEstimate` reports)."""

    batch_size: int
    seq_len: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    autocast: Optional[str]
    optimizer: str
    step: int


def _static_fallback(plan: StrategyPlan, shape: _StepShape, exc: Exception) -> TrainingMemoryEstimate:
    """The static estimate, for a model whose code cannot run on fake tensors, with the reason."""
    reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
    logger.warning(f"estimate_training_memory: the step could not run on fake tensors ({reason}); static estimate")
    static = estimate_memory(plan, shape.optimizer)
    weights, grads = sum(static.weights.values()), sum(static.gradients.values())
    return TrainingMemoryEstimate(
        peak_bytes=static.total, weights_bytes=weights, gradients_bytes=grads,
        optimizer_state_bytes=static.optimizer_state, activations_bytes=None,
        peak_phase="static estimate: weights, gradients and optimizer state", simulated=False,
        fallback_reason=f"the step could not run on fake tensors ({reason})",
        peak_breakdown={WEIGHTS: weights, GRADIENTS: grads, OPTIMIZER_STATE: static.optimizer_state},
        **asdict(shape),
    )


def _autocast_dtype(context: RunContext, training_args: "TrainingArguments") -> Optional[torch.dtype]:
    # The run's precision decision; without one, the Trainer's own flags.
    mode = context.precision.mode if context.precision is not None else None
    if mode is None:
        mode = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)


def heaviest_step(plan: StrategyPlan, plugin_manager: PluginManager) -> int:
    """The optimizer step at which a dynamic plan trains the most parameters (0 for a static plan).

    Looked for from the last ``active_from`` (gradual unfreezing's last stage) over the next 16
    intervals of each schedule (``interval_steps`` in its spec, LISA's draws); the earliest wins a tie.
    """
    if not plan.is_dynamic:
        return 0
    last = max(d.active_from for d in plan if d.trainable)
    steps = {last}
    for spec in plan.schedules.values():
        interval = spec.get("interval_steps")
        if isinstance(interval, int) and interval > 0:
            first = (last + interval - 1) // interval * interval
            steps.update(first + k * interval for k in range(16))
    numel = {d.name: d.numel for d in plan}
    return max(sorted(steps), key=lambda s: sum(numel[n] for n in plan.active_names(s, plugin_manager)))


# -- the dry run -------------------------------------------------------------------------------------


def fake_copy(model: nn.Module, fake_mode: Any, device: str = "cpu") -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are fake tensors on ``device`` (no storage).

    Tied parameters stay tied; ``model`` is untouched and its weights are never copied.
    """
    convert = fake_mode.fake_tensor_converter
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in memo:
            continue
        fake = convert.from_meta_and_device(fake_mode, tensor.detach().to("meta"), torch.device(device))
        memo[id(tensor)] = nn.Parameter(fake, requires_grad=tensor.requires_grad) if isinstance(
            tensor, nn.Parameter
        ) else fake
    return copy.deepcopy(model, memo)


def dummy_batch(model: nn.Module, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """A batch as the CLI's data gives it: token ids, an attention mask of ones, labels.

    Labels are one class per example for a sequence-classification model, else the tokens.
    """
    config = getattr(model, "config", None)
    vocab = getattr(config, "vocab_size", None) or model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (batch_size, seq_len))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if _is_classifier(model):
        batch["labels"] = torch.randint(0, max(int(getattr(config, "num_labels", 2)), 1), (batch_size,))
    else:
        batch["labels"] = ids.clone()
    return batch


def _is_classifier(model: nn.Module) -> bool:
    return "SequenceClassification" in type(_unwrapped(model)).__name__


def _model_inputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the dry run passes to the model of ``batch`` (the whole batch stays alive, as in a real run).

    Causal-LM blocks are packed full: their mask is all ones, which transformers drops (the causal
    kernel needs none). On fake tensors it cannot read the ones and would build a 4D mask, so the
    mask is not passed. Classification batches are padded: their mask is passed, and becomes the
    4D mask a real run builds too.
    """
    if _is_classifier(model):
        return batch
    return {k: v for k, v in batch.items() if k != "attention_mask"}


@contextlib.contextmanager
def _unpacked_positions() -> Iterator[None]:
    """transformers looks for packed sequences in the position ids it builds (``arange``) when no
    cache is used (activation checkpointing): on fake tensors it cannot see there are none and
    would build a 4D mask a real run does not. Batches here carry no position ids, so none is packed.
    """
    from unittest import mock

    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    if not hasattr(masking_utils, "find_packed_sequence_indices"):
        yield
        return
    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda position_ids: None):
        yield


def _unwrapped(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def enable_checkpointing_as_trainer(model: nn.Module, training_args: "TrainingArguments") -> None:
    """Turn activation checkpointing on as ``Trainer.__init__`` does for ``activation_checkpointing``."""
    kwargs = dict(training_args.activation_checkpointing_kwargs or {})
    every_n_layers = kwargs.pop("every_n_layers", 1)
    offload = kwargs.pop("offload", False)
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload)
    else:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=kwargs or None, every_n_layers=every_n_layers, offload=offload
        )


def _block_modules(model: nn.Module, plan: StrategyPlan) -> dict[str, nn.Module]:
    """Block label -> the module holding all its parameters (their longest common prefix)."""
    names: dict[str, list[list[str]]] = {}
    for decision in plan:
        names.setdefault(decision.block, []).append(decision.name.split(".")[:-1])
    modules = {}
    for block, paths in names.items():
        prefix = paths[0]
        for path in paths[1:]:
            n = 0
            while n < min(len(prefix), len(path)) and prefix[n] == path[n]:
                n += 1
            prefix = prefix[:n]
        if prefix:
            modules[block] = model.get_submodule(".".join(prefix))
    return modules


def _simulate(
    model: nn.Module,
    plan: StrategyPlan,
    context: RunContext,
    training_args: "TrainingArguments",
    autocast_dtype: Optional[torch.dtype],
    shape: _StepShape,
) -> TrainingMemoryEstimate:
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = fake_copy(model, fake_mode)
    config = getattr(fake, "config", None)
    if config is not None and hasattr(training_args, "use_cache"):
        # As Trainer.__init__ does (no KV cache while training, unless asked for).
        config.use_cache = training_args.use_cache
    with fake_mode:
        optimizer = _steady_state(fake, plan, context, training_args, shape.step)
        counter = LiveTensorCounter(count_flops=True)
        params = list(fake.named_parameters(remove_duplicate=True))
        state_bytes = _track_held(counter, fake, params, optimizer)
        block_activations: dict[str, int] = {}
        handles = _watch(counter, fake, plan, params, block_activations)
        with counter:
            activations, gradients, flops = _one_step(counter, fake, optimizer, training_args, autocast_dtype, shape)
        for handle in handles:
            handle.remove()
    accumulation = shape.gradient_accumulation_steps
    peak_phase = counter.peak_phase
    if accumulation == 1:
        peak_phase = peak_phase.replace("forward, micro-batch 1", "forward")
    runs = flops[:-1]
    per_step = runs[0] + (runs[-1] * (accumulation - 1)) + flops[-1]
    return TrainingMemoryEstimate(
        peak_bytes=counter.peak, weights_bytes=sum(p.untyped_storage().nbytes() for _, p in params),
        gradients_bytes=gradients, optimizer_state_bytes=state_bytes, activations_bytes=activations,
        peak_phase=peak_phase, peak_breakdown=dict(counter.peak_breakdown),
        blocks=_block_rows(plan, params, optimizer, block_activations), flops_per_step=per_step, **asdict(shape),
    )


def _steady_state(fake: nn.Module, plan: StrategyPlan, context: RunContext, training_args: "TrainingArguments",
                  step: int) -> torch.optim.Optimizer:
    """The fake model as a run has it at ``step``: plan applied, hooks installed, optimizer state of an earlier step."""
    fake.train()
    plan.apply(fake)
    if training_args.activation_checkpointing:
        enable_checkpointing_as_trainer(fake, training_args)
    optimizer = build_optimizer(fake, plan, training_args)
    context.plugin_manager.hook.hfls_on_train_begin(
        model=fake, plan=plan, training_args=training_args, train_dataloader=None, context=context
    )
    for param in fake.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ScheduleRunner(plan, context.plugin_manager).apply(fake, step, optimizer)
    return optimizer


def _track_held(counter: LiveTensorCounter, fake: nn.Module, params: list, optimizer: torch.optim.Optimizer) -> int:
    """Count what exists before the step (weights, buffers, optimizer state); return the state's bytes."""
    for _, param in params:
        counter.track(param, WEIGHTS)
    for buffer in fake.buffers():
        counter.track(buffer, BUFFERS)
    seen: set[int] = set()
    state_bytes = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in seen:
                seen.add(value.untyped_storage()._cdata)
                counter.track(value, OPTIMIZER_STATE)
                state_bytes += value.untyped_storage().nbytes()
    return state_bytes


def _watch(counter: LiveTensorCounter, fake: nn.Module, plan: StrategyPlan, params: list,
           block_activations: dict[str, int]) -> list:
    """Hooks: gradients counted as such, and what each block's first forward leaves alive for backward."""
    handles = [
        p.register_post_accumulate_grad_hook(lambda p: counter.retag(p.grad, GRADIENTS))
        for _, p in params if p.requires_grad
    ]
    entered: dict[str, int] = {}

    def enter(label: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if counter.phase.startswith("forward"):
                entered[label] = counter.totals[ACTIVATIONS]
        return hook

    def leave(label: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if counter.phase.startswith("forward, micro-batch 1") and label in entered:
                kept = max(counter.totals[ACTIVATIONS] - entered.pop(label), 0)
                block_activations[label] = block_activations.get(label, 0) + kept
        return hook

    for label, module in _block_modules(fake, plan).items():
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave(label)))
    return handles


def _one_step(counter: LiveTensorCounter, fake: nn.Module, optimizer: torch.optim.Optimizer,
              training_args: "TrainingArguments", autocast_dtype: Optional[torch.dtype],
              shape: _StepShape) -> tuple[int, int, list[int]]:
    """One optimizer step as the Trainer runs it; ``(activations, gradients, FLOPs per micro-batch and the update)``."""
    accumulation = shape.gradient_accumulation_steps
    # The Trainer fetches every micro-batch of the optimizer step before the first forward.
    counter.phase = "loading the batches"
    batches = [dummy_batch(fake, shape.batch_size, shape.seq_len) for _ in range(accumulation)]
    for batch in batches:
        for tensor in batch.values():
            counter.retag(tensor, INPUTS)
    activations = gradients = 0
    flops: list[int] = []
    for index in range(min(accumulation, 2)):  # micro-batches 3.. repeat the second exactly
        of = f"micro-batch {index + 1}" + (f" of {accumulation}" if accumulation > 1 else "")
        before = counter.flops
        counter.phase = f"forward, {of}" if accumulation > 1 else "forward, micro-batch 1"
        autocast = contextlib.nullcontext() if autocast_dtype is None else torch.autocast("cpu", dtype=autocast_dtype)
        with autocast, _unpacked_positions():
            loss = fake(**_model_inputs(fake, batches[index])).loss
        if accumulation > 1 and not getattr(fake, "accepts_loss_kwargs", False):
            loss = loss / accumulation
        activations = max(activations, counter.totals[ACTIVATIONS])
        counter.phase = f"backward, {of}"
        loss.backward()
        del loss
        gradients = max(gradients, counter.totals[GRADIENTS])
        flops.append(counter.flops - before)
    counter.phase = "optimizer step"
    before = counter.flops
    if training_args.max_grad_norm is not None and training_args.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in fake.parameters()], training_args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    flops.append(counter.flops - before)
    return activations, gradients, flops


def _block_rows(plan: StrategyPlan, params: list, optimizer: torch.optim.Optimizer,
                block_activations: dict[str, int]) -> list[BlockMemory]:
    state_by_param = {id(p): sum(v.untyped_storage().nbytes() for v in s.values() if isinstance(v, torch.Tensor))
                      for p, s in optimizer.state.items()}
    by_block: dict[str, list] = {}
    for name, param in params:
        by_block.setdefault(plan[plan_name(plan, name)].block, []).append(param)
    rows = [
        BlockMemory(
            block=label,
            params=sum(p.numel() for p in members),
            weights_bytes=sum(p.untyped_storage().nbytes() for p in members),
            gradients_bytes=sum(p.numel() * p.element_size() for p in members if p.requires_grad),
            optimizer_state_bytes=sum(state_by_param.get(id(p), 0) for p in members),
            activations_bytes=block_activations.get(label, 0),
        )
        for label, members in by_block.items()
    ]
    order = {b: i for i, b in enumerate(["embeddings", *(f"layers.{i}" for i in range(plan.num_layers)), "norm",
                                         "head", "other"])}
    return sorted(rows, key=lambda r: order.get(r.block, len(order)))
