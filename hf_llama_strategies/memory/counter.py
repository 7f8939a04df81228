"""A live-storage counter: the bytes of the tensor storages alive after every ATen operator, and their peak.

It works alike on real and on fake tensors (``FakeTensorMode``), which is what lets a dry run on
fake tensors and a real step be compared byte for byte.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
