"""Training memory: a static estimate from the plan, and the peak of one step from a dry run.

Two estimates, both without weights:

* :func:`estimate_memory` counts, from the plan alone, what training holds for good: weights
  and gradients by dtype, and optimizer state. No activations.
* :func:`estimate_training_memory` runs one steady-state optimizer step of the model's own code
  on fake tensors (``torch._subclasses.fake_tensor.FakeTensorMode``: shapes, dtypes and
  lifetimes, no storage) and counts the bytes of the tensor storages alive after every ATen
  operator (:class:`LiveTensorCounter`). Its peak is the peak of live tensor bytes a real step
  reaches, activations, autocast copies, optimizer temporaries and all.
"""

from __future__ import annotations

import contextlib
import copy
import time
import weakref
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.utils import logging

from .arguments import StrategyArguments
from .plan import StrategyPlan, torch_dtype
from .context import RunContext
from .plan_report import format_bytes, format_flops
from .planner import build_plan
from .validation import check_positive_int

if TYPE_CHECKING:
    import pluggy
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)


# Optimizer state as (bytes per element when kept in the parameter's dtype, fixed bytes per element).
# AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype; 8-bit variants keep 2 bytes.
_STATE_PER_ELEMENT = {
    "adamw_torch": (2, 0), "adamw_torch_fused": (2, 0), "adamw_torch_xla": (2, 0), "adamw_torch_npu_fused": (2, 0),
    "adamw_anyprecision": (2, 0), "ademamix": (3, 0), "stable_adamw": (2, 0), "rmsprop": (1, 0),
    "adagrad": (1, 0), "sgd": (0, 0), "lomo": (0, 0), "adalomo": (0, 0),
    "adamw_bnb_8bit": (0, 2), "adamw_8bit": (0, 2), "paged_adamw_8bit": (0, 2), "adamw_torch_8bit": (0, 2),
    "adamw_torch_4bit": (0, 1), "lion_8bit": (0, 1), "lion_32bit": (0, 4), "paged_lion_8bit": (0, 1),
    "paged_adamw_32bit": (0, 8), "paged_lion_32bit": (0, 4),
}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype written as ``str(torch.dtype)``."""
    return torch_dtype(dtype).itemsize


@dataclass
class MemoryEstimate:
    """Bytes for weights and gradients by dtype, and for optimizer state."""

    weights: dict[str, int] = field(default_factory=dict)
    gradients: dict[str, int] = field(default_factory=dict)
    optimizer_state: int = 0
    optimizer: str = "adamw_torch"
    assumed_optimizer: bool = False

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + sum(self.gradients.values()) + self.optimizer_state

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``plan --json``'s ``static_memory``)."""
        return {**asdict(self), "total": self.total}

    def table(self) -> str:
        """Human-readable lines, GiB."""
        gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
        by_dtype = lambda d: ", ".join(f"{k.replace('torch.', '')} {gib(v)}" for k, v in sorted(d.items()))  # noqa: E731
        note = " (assumed AdamW-like: unknown optimizer)" if self.assumed_optimizer else ""
        return "\n".join(
            [
                "memory estimate (without activations):",
                f"  weights          {gib(sum(self.weights.values())):>14}  ({by_dtype(self.weights) or '-'})",
                f"  gradients        {gib(sum(self.gradients.values())):>14}  ({by_dtype(self.gradients) or '-'})",
                f"  optimizer state  {gib(self.optimizer_state):>14}  ({self.optimizer}{note})",
                f"  total            {gib(self.total):>14}",
            ]
        )


def estimate_memory(plan: StrategyPlan, optim: str = "adamw_torch") -> MemoryEstimate:
    """Estimate what training by ``plan`` holds in memory with optimizer ``optim``.

    Gradients take the parameter's dtype and exist only for trainable parameters;
    optimizer state follows ``optim`` (a ``TrainingArguments.optim`` value). Adafactor's
    factored second moment is counted per matrix (rows + columns).
    """
    estimate = MemoryEstimate(optimizer=optim)
    factored = optim.startswith("adafactor") or optim == "galore_adafactor"
    per_dtype, fixed = _STATE_PER_ELEMENT.get(optim, (2, 0))
    estimate.assumed_optimizer = optim not in _STATE_PER_ELEMENT and not factored
    for decision in plan:
        size = decision.numel * dtype_bytes(decision.dtype)
        estimate.weights[decision.dtype] = estimate.weights.get(decision.dtype, 0) + size
        if not decision.trainable:
            continue
        estimate.gradients[decision.dtype] = estimate.gradients.get(decision.dtype, 0) + size
        if factored:
            shape = decision.shape if decision.shape else (decision.numel,)
            elements = sum(shape[-2:]) if len(shape) >= 2 else decision.numel
            estimate.optimizer_state += elements * dtype_bytes(decision.dtype)
        else:
            estimate.optimizer_state += decision.numel * (per_dtype * dtype_bytes(decision.dtype) + fixed)
    return estimate


# -- counting live tensors --------------------------------------------------------------------

WEIGHTS = "weights"
BUFFERS = "buffers"
GRADIENTS = "gradients"
OPTIMIZER_STATE = "optimizer_state"
INPUTS = "inputs"
#: Everything else: what forward keeps for backward, autocast copies, temporaries.
ACTIVATIONS = "activations"
_CATEGORIES = (WEIGHTS, BUFFERS, GRADIENTS, OPTIMIZER_STATE, INPUTS, ACTIVATIONS)

#: What a count of live tensor storages cannot see, on a GPU.
NOT_SEEN = (
    "the CUDA context (a few hundred MiB per process)",
    "the caching allocator's reserve and fragmentation (torch.cuda.max_memory_reserved above max_memory_allocated)",
    "library workspaces (cuBLAS, cuDNN, flash-attention, NCCL buffers)",
)


class LiveTensorCounter(TorchDispatchMode):
    """Counts the bytes of the tensor storages alive, after every ATen operator; keeps the peak.

    A storage is counted once however many views share it, from the operator that created it
    until it is freed (a weak reference tells). Tensors that existed before the counter (the
    weights, the optimizer state) are counted once :meth:`track`-ed. Every storage has a
    category; :meth:`retag` moves one (a tensor becoming a parameter's gradient).

    It works alike on real and on fake tensors, which is what lets a dry run on fake tensors
    and a real step be compared byte for byte.

    Attributes:
        phase: a label the caller sets ("forward", "backward"...), recorded with the peak.
        peak: the largest live total seen; ``peak_phase`` and ``peak_breakdown`` (bytes by
            category) say when and of what.
        flops: matrix-product and attention FLOPs of the operators run (``count_flops``).
    """

    def __init__(self, count_flops: bool = False) -> None:
        super().__init__()
        self._live: dict[int, list] = {}
        self.totals = dict.fromkeys(_CATEGORIES, 0)
        self.total = 0
        self.peak = 0
        self.peak_phase = ""
        self.peak_breakdown = dict(self.totals)
        self.phase = ""
        self.count_flops = count_flops
        self.flops = 0

    def track(self, tensor: Any, category: str = ACTIVATIONS) -> None:
        """Count ``tensor``'s storage (once), under ``category``."""
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._live:
            return
        size = storage.nbytes()
        self._live[key] = [size, category]
        self.totals[category] += size
        self.total += size
        weakref.finalize(storage, self._free, key)
        if self.total > self.peak:
            self.peak = self.total
            self.peak_phase = self.phase
            self.peak_breakdown = dict(self.totals)

    def retag(self, tensor: Any, category: str) -> None:
        """Count ``tensor``'s storage under ``category`` from now on."""
        if not isinstance(tensor, torch.Tensor):
            return
        entry = self._live.get(tensor.untyped_storage()._cdata)
        if entry is None:
            self.track(tensor, category)
        elif entry[1] != category:
            self.totals[entry[1]] -= entry[0]
            self.totals[category] += entry[0]
            entry[1] = category

    def _free(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is not None:
            self.totals[entry[1]] -= entry[0]
            self.total -= entry[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for value in torch.utils._pytree.tree_leaves(out):
            self.track(value)
        if self.count_flops:
            self.flops += _operator_flops(func, args, kwargs, out)
        return out


def _operator_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

    packet = func._overloadpacket
    if packet in flop_registry:
        return int(flop_registry[packet](*args, **kwargs, out_val=out))
    # The CPU flash-attention kernels (what fake tensors on the CPU run) are not in torch's registry.
    if packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        return int(sdpa_flop_count(args[0].shape, args[1].shape, args[2].shape))
    if packet is torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        return int(sdpa_backward_flop_count(args[0].shape, args[1].shape, args[2].shape, args[3].shape))
    return 0


# -- the estimate --------------------------------------------------------------------------------


@dataclass
class BlockMemory:
    """One block of the model (embeddings, a decoder layer, the norm, the head) in one step.

    ``activations_bytes`` is what the block's forward left alive for backward (its output
    included), in the first micro-batch.
    """

    block: str
    params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: int


@dataclass
class TrainingMemoryEstimate:
    """Peak memory of one training step per device, and what it is made of (bytes).

    Attributes:
        peak_bytes: the peak of live tensor bytes in one steady-state optimizer step, per
            device (per rank, with the sharding of ``distributed`` applied).
        weights_bytes, gradients_bytes, optimizer_state_bytes: parameters as planned, the
            largest live gradient total, the optimizer state at steady state (per rank).
        activations_bytes: the largest total that a forward pass left alive for backward.
        peak_phase: when the peak occurs (``"backward, micro-batch 1 of 2"``...).
        peak_breakdown: bytes by category at the peak (weights, buffers, gradients,
            optimizer_state, inputs, activations: the last is everything else).
        blocks: per-block figures.
        simulated: False when the model's code could not run on fake tensors; the figures
            are then the static estimate (no activations) and ``fallback_reason`` says why.
        flops_per_step: matrix-product and attention FLOPs of the optimizer step (forward,
            backward, recomputation; the global batch of one device).
    """

    peak_bytes: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_state_bytes: int
    activations_bytes: Optional[int]
    peak_phase: str
    batch_size: int
    seq_len: int
    gradient_accumulation_steps: int
    activation_checkpointing: bool
    autocast: Optional[str]
    optimizer: str
    simulated: bool = True
    fallback_reason: Optional[str] = None
    peak_breakdown: dict[str, int] = field(default_factory=dict)
    blocks: list[BlockMemory] = field(default_factory=list)
    flops_per_step: Optional[int] = None
    step: int = 0
    world_size: int = 1
    distributed: Optional[str] = None
    single_device_peak_bytes: Optional[int] = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    not_seen: tuple[str, ...] = NOT_SEEN

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (``plan --json``'s ``memory``)."""
        data = asdict(self)
        data["not_seen"] = list(self.not_seen)
        return data

    def table(self) -> str:
        """Human-readable lines (GiB), with the per-block figures, runs of equal layers merged."""
        gib = lambda n: "-" if n is None else format_bytes(n)  # noqa: E731
        how = (
            f"batch {self.batch_size} x {self.seq_len}, gradient accumulation {self.gradient_accumulation_steps}, "
            f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}, "
            f"{self.autocast + ' autocast' if self.autocast else 'no autocast'}, {self.optimizer}"
        )
        if self.distributed:
            how += f", {self.distributed} over {self.world_size} ranks"
        if not self.simulated:
            lines = [
                f"training memory per device (static estimate, no activations; {how}):",
                f"  not simulated: {self.fallback_reason}",
            ]
        else:
            lines = [f"training memory per device, one optimizer step simulated on fake tensors ({how}):"]
        lines += [
            f"  peak             {gib(self.peak_bytes):>14}  ({self.peak_phase})",
            f"  weights          {gib(self.weights_bytes):>14}",
            f"  gradients        {gib(self.gradients_bytes):>14}",
            f"  optimizer state  {gib(self.optimizer_state_bytes):>14}",
            f"  activations      {gib(self.activations_bytes):>14}  (kept for backward at the end of a forward)",
        ]
        if self.simulated and self.peak_breakdown:
            parts = ", ".join(f"{k.replace('_', ' ')} {gib(v)}" for k, v in self.peak_breakdown.items() if v)
            lines.append(f"  at the peak: {parts}")
        if self.flops_per_step:
            lines.append(f"  work: {format_flops(self.flops_per_step)} per optimizer step (matrix products and attention)")
        if self.single_device_peak_bytes is not None and self.distributed:
            lines.append(f"  one device without {self.distributed}: {gib(self.single_device_peak_bytes)}")
        if self.blocks:
            lines.append("  " + _blocks_table(self.blocks).replace("\n", "\n  "))
        lines.extend(f"  note: {n}" for n in self.notes)
        lines.append("  not counted (add a margin on a GPU): " + "; ".join(self.not_seen))
        return "\n".join(lines)


def _blocks_table(blocks: list[BlockMemory]) -> str:
    mib = format_bytes
    rows: list[tuple[str, ...]] = []
    run: list[BlockMemory] = []

    def figures(b: BlockMemory) -> tuple:
        return (b.params, b.weights_bytes, b.gradients_bytes, b.optimizer_state_bytes, b.activations_bytes)

    def flush() -> None:
        if not run:
            return
        first, last = run[0].block, run[-1].block
        label = first if len(run) == 1 else f"{first}-{last.rsplit('.', 1)[-1]}"
        each = " each" if len(run) > 1 else ""
        b = run[0]
        rows.append((label + each, mib(b.weights_bytes), mib(b.gradients_bytes), mib(b.optimizer_state_bytes),
                     mib(b.activations_bytes)))
        run.clear()

    for block in blocks:
        layer = block.block.startswith("layers.")
        if run and (not layer or figures(run[-1]) != figures(block)):
            flush()
        run.append(block)
        if not layer:
            flush()
    flush()
    header = ("block", "weights", "gradients", "opt. state", "activations")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    render = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([render(header), *(render(r) for r in rows)])


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
    plugin_manager: Optional["pluggy.PluginManager"] = None,
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
        batch_size: examples per device and micro-batch; default
            ``per_device_train_batch_size``.
        seq_len: tokens per example; default ``max_length`` of TRL configs, else 128.
        world_size: ranks, for the per-rank figures of DDP, FSDP and DeepSpeed ZeRO; default
            ``training_args.world_size``.
        plugin_manager: the manager the plan is built with (default: built-in and installed).
        context: the run's context (its manager and hardware); arguments other than its own
            get a context of their own that shares them.

    Returns:
        A :class:`TrainingMemoryEstimate`. When the model's code cannot run on fake tensors
        (custom operators), the static estimate, with ``simulated=False`` and the reason.

    Raises:
        InvalidArgumentError: ``batch_size``, ``seq_len`` or ``world_size`` is not a positive
            integer.
        UnknownArchitectureError, PlanError: as :func:`build_plan`.
    """
    from transformers import TrainingArguments

    from .plugins import plugin_manager_for

    started = time.perf_counter()
    if training_args is None:
        training_args = TrainingArguments(output_dir="trainer_output", report_to="none")
    batch_size = check_positive_int(
        "batch_size", training_args.per_device_train_batch_size if batch_size is None else batch_size
    )
    seq_len = check_positive_int("seq_len", default_seq_len(training_args) if seq_len is None else seq_len)
    world_size = check_positive_int("world_size", training_args.world_size if world_size is None else world_size)
    accumulation = check_positive_int("gradient_accumulation_steps", training_args.gradient_accumulation_steps)
    strategy_args = strategy_args if strategy_args is not None else StrategyArguments()
    if context is not None:
        context = context.variant(strategy_args, training_args, model=model)
    else:
        pm = plugin_manager if plugin_manager is not None else plugin_manager_for()
        context = RunContext.create(strategy_args, training_args, model=model, plugin_manager=pm)
    pm = context.plugin_manager
    plan = build_plan(model, context=context)
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    checkpointing = bool(training_args.activation_checkpointing) or bool(
        getattr(model, "is_activation_checkpointing", False)
    )
    autocast_dtype = _autocast_dtype(plan, training_args)
    step = heaviest_step(plan, pm)
    common = dict(
        batch_size=batch_size, seq_len=seq_len, gradient_accumulation_steps=accumulation,
        activation_checkpointing=checkpointing, autocast=None if autocast_dtype is None else str(autocast_dtype)[6:],
        optimizer=optim, step=step,
    )
    try:
        estimate = _simulate(model, plan, context, training_args, autocast_dtype, **common)
    except Exception as exc:  # noqa: BLE001 - any failure of foreign model code on fake tensors
        reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
        logger.warning(f"estimate_training_memory: the step could not run on fake tensors ({reason}); static estimate")
        static = estimate_memory(plan, optim)
        grads = sum(static.gradients.values())
        estimate = TrainingMemoryEstimate(
            peak_bytes=static.total, weights_bytes=sum(static.weights.values()), gradients_bytes=grads,
            optimizer_state_bytes=static.optimizer_state, activations_bytes=None,
            peak_phase="static estimate: weights, gradients and optimizer state", simulated=False,
            fallback_reason=f"the step could not run on fake tensors ({reason})",
            peak_breakdown={WEIGHTS: sum(static.weights.values()), GRADIENTS: grads,
                            OPTIMIZER_STATE: static.optimizer_state},
            **common,
        )
    if plan.is_dynamic:
        estimate.notes.append(f"dynamic plan: simulated at step {step}, its largest active set")
    _apply_distributed(estimate, plan, training_args, world_size)
    estimate.seconds = time.perf_counter() - started
    return estimate


def _autocast_dtype(plan: StrategyPlan, training_args: "TrainingArguments") -> Optional[torch.dtype]:
    # The precision decision is written into the plan; without one, the Trainer's own flags.
    mode = plan.settings.get("precision", {}).get("mode")
    if mode is None:
        mode = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)


def heaviest_step(plan: StrategyPlan, plugin_manager: Optional["pluggy.PluginManager"] = None) -> int:
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
    **common: Any,
) -> TrainingMemoryEstimate:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .optim import plan_name
    from .runtime import ScheduleRunner

    pm = context.plugin_manager

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = fake_copy(model, fake_mode)
    batch_size, seq_len, accumulation = common["batch_size"], common["seq_len"], common["gradient_accumulation_steps"]
    config = getattr(fake, "config", None)
    if config is not None and hasattr(training_args, "use_cache"):
        # As Trainer.__init__ does (no KV cache while training, unless asked for).
        config.use_cache = training_args.use_cache
    with fake_mode:
        fake.train()
        plan.apply(fake)
        if training_args.activation_checkpointing:
            enable_checkpointing_as_trainer(fake, training_args)
        optimizer = _build_optimizer(fake, plan, training_args)
        pm.hook.hfls_on_train_begin(
            model=fake, plan=plan, training_args=training_args, train_dataloader=None, context=context
        )
        # Steady state: the optimizer holds the state an earlier step created.
        trainable = [p for p in fake.parameters() if p.requires_grad]
        for param in trainable:
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ScheduleRunner(plan, pm).apply(fake, common["step"], optimizer)

        counter = LiveTensorCounter(count_flops=True)
        seen: set[int] = set()
        params = list(fake.named_parameters(remove_duplicate=True))
        for _, param in params:
            counter.track(param, WEIGHTS)
        for buffer in fake.buffers():
            counter.track(buffer, BUFFERS)
        state_bytes = 0
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.untyped_storage()._cdata not in seen:
                    seen.add(value.untyped_storage()._cdata)
                    counter.track(value, OPTIMIZER_STATE)
                    state_bytes += value.untyped_storage().nbytes()
        handles = [
            p.register_post_accumulate_grad_hook(lambda p: counter.retag(p.grad, GRADIENTS))
            for _, p in params if p.requires_grad
        ]
        blocks = _block_modules(fake, plan)
        block_activations: dict[str, int] = {}
        entered: dict[str, int] = {}

        def enter(label: str) -> Any:
            def hook(module: nn.Module, args: Any) -> None:
                if counter.phase.startswith("forward"):
                    entered[label] = counter.totals[ACTIVATIONS]
            return hook

        def leave(label: str) -> Any:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if counter.phase.startswith("forward, micro-batch 1") and label in entered:
                    block_activations[label] = block_activations.get(label, 0) + max(
                        counter.totals[ACTIVATIONS] - entered.pop(label), 0
                    )
            return hook

        for label, module in blocks.items():
            handles.append(module.register_forward_pre_hook(enter(label)))
            handles.append(module.register_forward_hook(leave(label)))

        runs = min(accumulation, 2)  # micro-batches 3.. repeat the second exactly
        activations = gradients = 0
        flops: list[int] = []
        max_grad_norm = training_args.max_grad_norm
        with counter:
            # The Trainer fetches every micro-batch of the optimizer step before the first forward.
            counter.phase = "loading the batches"
            batches = [dummy_batch(fake, batch_size, seq_len) for _ in range(accumulation)]
            for batch in batches:
                for tensor in batch.values():
                    counter.retag(tensor, INPUTS)
            for index in range(runs):
                of = f"micro-batch {index + 1}" + (f" of {accumulation}" if accumulation > 1 else "")
                before = counter.flops
                counter.phase = f"forward, {of}" if accumulation > 1 else "forward, micro-batch 1"
                context = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
                with context, _unpacked_positions():
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
            if max_grad_norm is not None and max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            flops.append(counter.flops - before)
        for handle in handles:
            handle.remove()

    peak_phase = counter.peak_phase.replace("forward, micro-batch 1", "forward") if accumulation == 1 else counter.peak_phase
    weights = sum(p.untyped_storage().nbytes() for _, p in params)
    state_by_param = {id(p): sum(v.untyped_storage().nbytes() for v in s.values() if isinstance(v, torch.Tensor))
                      for p, s in optimizer.state.items()}
    rows = []
    by_block: dict[str, list] = {}
    for name, param in params:
        by_block.setdefault(plan[plan_name(plan, name)].block, []).append(param)
    for label, members in by_block.items():
        rows.append(BlockMemory(
            block=label,
            params=sum(p.numel() for p in members),
            weights_bytes=sum(p.untyped_storage().nbytes() for p in members),
            gradients_bytes=sum(p.numel() * p.element_size() for p in members if p.requires_grad),
            optimizer_state_bytes=sum(state_by_param.get(id(p), 0) for p in members),
            activations_bytes=block_activations.get(label, 0),
        ))
    order = {b: i for i, b in enumerate(["embeddings", *(f"layers.{i}" for i in range(plan.num_layers)), "norm",
                                         "head", "other"])}
    rows.sort(key=lambda r: order.get(r.block, len(order)))
    forward_backward = flops[:runs]
    per_step = forward_backward[0] + (forward_backward[-1] * (accumulation - 1)) + flops[-1]
    return TrainingMemoryEstimate(
        peak_bytes=counter.peak, weights_bytes=weights, gradients_bytes=gradients, optimizer_state_bytes=state_bytes,
        activations_bytes=activations, peak_phase=peak_phase, peak_breakdown=dict(counter.peak_breakdown),
        blocks=rows, flops_per_step=per_step, **common,
    )


def _build_optimizer(model: nn.Module, plan: StrategyPlan, training_args: "TrainingArguments") -> torch.optim.Optimizer:
    from .optim import build_optimizer

    return build_optimizer(model, plan, training_args)


# -- distributed: per rank --------------------------------------------------------------------------


def sharding(training_args: Optional["TrainingArguments"]) -> tuple[Optional[str], tuple[str, ...]]:
    """How a run shards across ranks: (its name, the categories each rank holds 1/world_size of).

    FSDP full shard and ZeRO-3 shard weights, gradients and optimizer state; FSDP
    ``reshard_after_forward: false`` (shard_grad_op) and ZeRO-2 gradients and state; ZeRO-1 the
    state; DDP nothing.
    """
    from .distributed import DistributedSettings

    settings = DistributedSettings.read(training_args)
    if settings.deepspeed_config is not None:
        stage = settings.zero_stage or 0
        shards = {0: (), 1: (OPTIMIZER_STATE,), 2: (GRADIENTS, OPTIMIZER_STATE)}.get(
            stage, (WEIGHTS, GRADIENTS, OPTIMIZER_STATE)
        )
        return f"DeepSpeed ZeRO-{stage}", shards
    fsdp = getattr(training_args, "fsdp", None)
    if fsdp:
        items = fsdp.split() if isinstance(fsdp, str) else list(fsdp) if isinstance(fsdp, (list, tuple)) else []
        config = getattr(training_args, "fsdp_config", None) or {}
        reshard = config.get("reshard_after_forward", "shard_grad_op" not in [str(i) for i in items])
        if str(reshard).lower() in ("false", "shard_grad_op", "hybrid_shard_zero2"):
            return "FSDP shard_grad_op", (GRADIENTS, OPTIMIZER_STATE)
        return "FSDP full shard", (WEIGHTS, GRADIENTS, OPTIMIZER_STATE)
    return "DDP", ()


def _apply_distributed(
    estimate: TrainingMemoryEstimate, plan: StrategyPlan, training_args: "TrainingArguments", world_size: int
) -> None:
    """Turn single-device figures into per-rank ones (a model of the wrapper, stated as such)."""
    if world_size <= 1:
        return
    name, shards = sharding(training_args)
    estimate.world_size = world_size
    estimate.distributed = name
    estimate.single_device_peak_bytes = estimate.peak_bytes
    fraction = 1 - 1 / world_size
    breakdown = estimate.peak_breakdown
    trainable_grad_bytes = sum(b.gradients_bytes for b in estimate.blocks) or estimate.gradients_bytes
    saved = sum(int(breakdown.get(c, 0) * fraction) for c in shards)
    extra = 0
    if name == "DDP":
        # The reducer's buckets: a second copy of every gradient (gradient_as_bucket_view=False).
        extra = trainable_grad_bytes
        estimate.notes.append(f"DDP: + {trainable_grad_bytes / 2**30:.2f} GiB of gradient buckets per rank")
    if WEIGHTS in shards:
        # The block being computed is gathered whole, and the next one prefetched.
        largest = max((b.weights_bytes for b in estimate.blocks), default=0)
        extra += 2 * largest
        estimate.notes.append(
            f"{name}: weights, gradients and optimizer state sharded over {world_size} ranks (modelled from the "
            f"simulated step), plus two gathered blocks ({2 * largest / 2**30:.2f} GiB)"
        )
    elif shards:
        estimate.notes.append(f"{name}: {', '.join(s.replace('_', ' ') for s in shards)} sharded over "
                              f"{world_size} ranks (modelled from the simulated step)")
    estimate.peak_bytes = estimate.peak_bytes - saved + extra
    for category, attribute in ((WEIGHTS, "weights_bytes"), (GRADIENTS, "gradients_bytes"),
                                (OPTIMIZER_STATE, "optimizer_state_bytes")):
        if category in shards:
            setattr(estimate, attribute, -(-getattr(estimate, attribute) // world_size))
