"""Per-rank figures under DDP, FSDP and DeepSpeed ZeRO: a model of the wrapper, from the simulated step."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.distributed import DistributedSettings
from .counter import GRADIENTS, OPTIMIZER_STATE, WEIGHTS

if TYPE_CHECKING:
    from .estimate import TrainingMemoryEstimate


def apply_distributed(estimate: "TrainingMemoryEstimate", settings: DistributedSettings, world_size: int) -> None:
    """Turn single-device figures into per-rank ones (a model of the wrapper, stated as such)."""
    if world_size <= 1:
        return
    name, shards = settings.sharding()
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
