"""The frozen-prefix cache as a plugin: the boundary into the plan, the checks, the cache installed for training."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

from torch import nn
from transformers.utils import logging

from ...core.anatomy import EMBEDDINGS, ModelAnatomy
from ...core.hookspecs import HookContext, hookimpl
from ...core.plan import StrategyPlan
from ...core.units import format_bytes
from ...errors import InvalidArgumentError, PlanError
from .arguments import DISK, OFF, FrozenPrefixCacheArguments
from .boundary import (
    Boundary,
    CacheSettings,
    active_dropout,
    boundary_at,
    dtype_size,
    estimated_run_ratio,
    find_boundary,
    fingerprint,
    prefix_text,
)
from .cache import FrozenPrefixCache, get_frozen_prefix_cache, install_frozen_prefix_cache, remove_frozen_prefix_cache
from .prepass import check_samples, prepare
from .storage import ShardStore

if TYPE_CHECKING:
    from transformers import TrainingArguments

logger = logging.get_logger(__name__)

_GB = 10**9
# TrainingArguments the cache cannot live with, and why.
_REFUSED_WITH = {
    "neftune_noise_alpha": "adds random noise to the embeddings at every step",
    "torch_compile": "compiles the forward, which the cache changes between calls",
    "deepspeed": "partitions the prefix's weights, which the cache's fingerprint reads",
    "fsdp": "shards the prefix's weights, which the cache's fingerprint reads",
}


def _epochs(training_args: Optional["TrainingArguments"]) -> Optional[float]:
    if training_args is None or getattr(training_args, "max_steps", -1) > 0:
        return None
    epochs = getattr(training_args, "num_train_epochs", None)
    return float(epochs) if isinstance(epochs, (int, float)) else None


def _advice_when_off(plan: StrategyPlan, anatomy: ModelAnatomy, epochs: Optional[float]) -> Optional[CacheSettings]:
    """With the cache off: what it would save, when a run of several epochs trains only the top."""
    if epochs is None or epochs <= 1:
        return None
    try:
        boundary = find_boundary(plan, anatomy)
    except PlanError:
        return None
    share, ratio = estimated_run_ratio(plan, boundary, epochs)
    return CacheSettings(OFF, (
        f"off; {prefix_text(plan, boundary)} are frozen ({100 * share:.0f}% of the forward's weights) and "
        f"run again every epoch: frozen_prefix_cache: memory would run them once, an estimated "
        f"{ratio:.2f} of this run's compute over {epochs:g} epochs"
    ))


def _settings(plan: StrategyPlan, anatomy: ModelAnatomy, args: FrozenPrefixCacheArguments,
              epochs: Optional[float]) -> CacheSettings:
    mode = args.cache_mode
    boundary = find_boundary(plan, anatomy, mode)
    if args.frozen_prefix_cache_boundary is not None:
        boundary = boundary_at(plan, boundary, args.frozen_prefix_cache_boundary)
    embedding = next((d for d in plan if d.kind == EMBEDDINGS and len(d.shape) == 2), None)
    per_token = embedding.shape[1] * dtype_size(embedding.dtype) if embedding is not None else 0
    summary = (
        f"{mode}; {prefix_text(plan, boundary)} run once per distinct sample, each forward starts at "
        f"{boundary.describe()} from cached states ({format_bytes(per_token)} per token)"
    )
    if epochs is not None and epochs > 1:
        _, ratio = estimated_run_ratio(plan, boundary, epochs)
        summary += f"; estimated {ratio:.2f} of the uncached run's compute over {epochs:g} epochs"
    if args.frozen_prefix_cache_max_gb is not None:
        summary += f"; limit {args.frozen_prefix_cache_max_gb:g} GB"
    return CacheSettings(
        mode, summary, boundary, dir=args.cache_dir if mode == DISK else None,
        max_gb=args.frozen_prefix_cache_max_gb, bytes_per_token=per_token, prepass=args.frozen_prefix_cache_prepass,
    )


@hookimpl(trylast=True)
def hfls_adjust_plan(
    plan: StrategyPlan, anatomy: ModelAnatomy, strategy_args: FrozenPrefixCacheArguments,
    training_args: Optional["TrainingArguments"],
) -> None:
    """Write the boundary and the cache's size per token into the plan; say when a run would gain."""
    epochs = _epochs(training_args)
    if strategy_args.cache_mode == OFF:
        settings = _advice_when_off(plan, anatomy, epochs)
    else:
        settings = _settings(plan, anatomy, strategy_args, epochs)
    if settings is not None:
        settings.write_to(plan)


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
    plan: StrategyPlan, training_args: Optional["TrainingArguments"], model: Optional[nn.Module]
) -> None:
    """Refuse a cache that would change the result, or that cannot be written."""
    settings = CacheSettings.read_from(plan)
    if settings is None or settings.mode == OFF or settings.boundary is None:
        return
    option = f"frozen_prefix_cache={settings.mode!r}"
    boundary = settings.boundary
    dropout = active_dropout(model, boundary) if model is not None else []
    if dropout:
        raise PlanError(
            f"{option}: dropout is active below {boundary.describe()} ({', '.join(dropout[:4])}): the frozen "
            "prefix's output is random, and a cached one would not be. Set those rates to 0 (for example "
            "attention_dropout: 0) or frozen_prefix_cache: off."
        )
    for key, why in _REFUSED_WITH.items():
        value = getattr(training_args, key, None) if training_args is not None else None
        if value:
            raise PlanError(
                f"{option} cannot be combined with TrainingArguments.{key}={value!r}: it {why}. Set "
                f"frozen_prefix_cache: off or drop {key}."
            )
    if settings.mode == DISK and settings.dir is not None:
        _check_writable(settings.dir)


def _installed(model: nn.Module, plan: StrategyPlan, settings: CacheSettings, boundary: Boundary,
               training_args: Optional["TrainingArguments"]) -> FrozenPrefixCache:
    """The cache installed on ``model``: the one there when it still fits, else a new one (disk entries read)."""
    digest, meta = fingerprint(model, plan, boundary, training_args)
    cache = get_frozen_prefix_cache(model)
    if cache is not None and cache.digest == digest and cache.boundary == boundary:
        return cache
    store = None
    if settings.mode == DISK and settings.dir is not None:
        try:
            os.makedirs(settings.dir, exist_ok=True)
        except OSError as exc:  # os.access passes on /proc, a read-only mount, for root
            raise InvalidArgumentError(
                "frozen_prefix_cache_dir", settings.dir, "a directory this process can create and write",
                f"Creating it failed: {exc.strerror}.",
            ) from exc
        store = ShardStore(settings.dir, digest, meta)
    max_bytes = None if settings.max_gb is None else int(settings.max_gb * _GB)
    cache = FrozenPrefixCache(model, boundary, digest, store, max_bytes)
    install_frozen_prefix_cache(model, cache)
    cache.load()
    return cache


@hookimpl
def hfls_on_train_begin(
    model: nn.Module, plan: StrategyPlan, training_args: Optional["TrainingArguments"], train_dataloader: Any,
    context: HookContext,
) -> None:
    """Install the cache (reusing a compatible one), size it from the training data, schedule the pre-pass.

    The installed cache is published as ``context.reports["frozen_prefix_cache"]`` (its counters:
    ``hits``, ``misses``, ``compute_seconds``, ``store_seconds``...) for the caller that runs the training.
    """
    settings = CacheSettings.read_from(plan)
    if settings is None or settings.mode == OFF or settings.boundary is None:
        remove_frozen_prefix_cache(model)
        return
    option = f"frozen_prefix_cache={settings.mode!r}"
    cache = _installed(model, plan, settings, settings.boundary, training_args)
    dataset = getattr(train_dataloader, "dataset", None)
    collate = getattr(train_dataloader, "collate_fn", None)
    if train_dataloader is not None:
        context.reports[CacheSettings.KEY] = cache
    if dataset is None or collate is None or not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        logger.warning("%s: the training data cannot be indexed; samples are cached as they first arrive.", option)
        return
    batch_size = getattr(training_args, "per_device_eval_batch_size", None) or 8
    if not settings.prepass:
        check_samples(cache, dataset, collate, batch_size, option)
        figure = "no pre-pass (frozen_prefix_cache_prepass: false), samples computed when first met"
    else:
        figure = _prepared(cache, settings, dataset, collate, batch_size, training_args, option)
    if cache.store is not None:
        figure += f", {cache.loaded_entries} read from {cache.store.directory}"
    settings.summary = settings.summary.split("; cache: ")[0] + f"; cache: {figure}"
    settings.write_to(plan)
    logger.info("%s: %s", option, figure)


def _prepared(cache: FrozenPrefixCache, settings: CacheSettings, dataset: Any, collate: Any, batch_size: int,
              training_args: Optional["TrainingArguments"], option: str) -> str:
    """Size the cache from the training data and schedule the pre-pass; the figure for the plan's summary."""
    show = training_args is None or (not training_args.disable_tqdm and training_args.process_index == 0)
    # Under DDP a rank trains on 1/world_size of the data per epoch: a pre-pass over all of it would cost
    # each rank world_size epochs of the prefix. Each rank caches what its shard brings as it first arrives.
    world_size = getattr(training_args, "world_size", 1) or 1
    count, estimate = prepare(cache, dataset, collate, batch_size, show, option, settings.bytes_per_token,
                              prepass=world_size <= 1)
    if world_size > 1:
        logger.info("%s: %d processes: no pre-pass; each rank caches its samples when it first trains on them.",
                    option, world_size)
    return f"{len(dataset)} training samples, {count} to compute (~{format_bytes(estimate)})"
