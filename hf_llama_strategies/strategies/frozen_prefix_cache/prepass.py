"""What the cache needs of the training data: samples that reach the model alike every epoch, the
cache's size, and the pre-pass that computes the prefix once per distinct sample before training.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from typing import Any, Callable

import torch
from transformers.utils import logging

from ...core.units import format_bytes
from ...errors import PlanError
from .cache import _PADDING_FREE_KEYS, FrozenPrefixCache

logger = logging.get_logger(__name__)

_GB = 10**9


def prepare(cache: FrozenPrefixCache, dataset: Any, collate: Callable[[list], Any], batch_size: int,
            show_progress: bool,
            option: str, estimate_per_token: int, prepass: bool = True) -> tuple[int, int]:
    """Check the data, size the cache, and schedule the pre-pass for the first forward.

    With ``prepass=False`` nothing is scheduled: samples are computed when training first meets them.

    Returns ``(distinct samples not yet cached, their estimated bytes)``.

    Raises:
        PlanError: the collator or dataset gives a sample other inputs each time, or the cache would
            exceed ``frozen_prefix_cache_max_gb``.
    """
    chunks = _chunks(dataset, batch_size)
    if not chunks:
        return 0, 0
    pending: list[list[int]] = []
    seen: set[bytes] = set()
    missing_tokens = 0
    check_samples(cache, dataset, collate, batch_size, option)
    with _preserved_rng():
        for chunk in chunks:
            inputs, labels = _collate(dataset, collate, chunk, option)
            ends = cache.row_ends(inputs, labels)
            keys = cache.row_keys(inputs, ends)
            new = [(k, e) for k, e in zip(keys, ends) if k not in cache.entries and k not in seen]
            seen.update(k for k, _ in new)
            missing_tokens += sum(e for _, e in new)
            if new:
                pending.append(chunk)
    estimate = missing_tokens * estimate_per_token
    if cache.max_bytes is not None and cache.nbytes + estimate > cache.max_bytes:
        total = cache.nbytes + estimate
        raise PlanError(
            f"frozen_prefix_cache_max_gb={cache.max_bytes / _GB:g}: the cache of this run's training data would "
            f"hold {total / _GB:.3f} GB ({format_bytes(total)}: {len(seen)} samples to compute, "
            f"{missing_tokens} tokens x {estimate_per_token} bytes, plus {format_bytes(cache.nbytes)} already "
            f"cached). Raise frozen_prefix_cache_max_gb to at least {math.ceil(total / _GB * 1000) / 1000:g}, "
            "or set frozen_prefix_cache: off."
        )
    if pending and prepass:
        cache._pending = lambda: _prepass(cache, dataset, collate, pending, show_progress, option)
    return len(seen), estimate


def check_samples(cache: FrozenPrefixCache, dataset: Any, collate: Callable[[list], Any], batch_size: int,
                  option: str) -> None:
    """Refuse data whose samples reach the model differently each time (their first batches, collated twice).

    Raises:
        PlanError: the collator masks at random, or the same samples collate differently.
    """
    with _preserved_rng():
        for chunk in _chunks(dataset, batch_size)[:3]:  # a random collator could repeat itself once by chance
            _check_deterministic(dataset, collate, chunk, option, cache)


def _chunks(dataset: Any, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, len(dataset)))) for i in range(0, len(dataset), batch_size)]


def _prepass(cache: FrozenPrefixCache, dataset: Any, collate: Callable[[list], Any], chunks: list[list[int]],
             show_progress: bool,
             option: str) -> None:
    from tqdm.auto import tqdm

    param = next(cache.model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    started = time.perf_counter()
    before = cache.misses
    with _preserved_rng():
        for chunk in tqdm(chunks, desc="frozen prefix cache: pre-pass", disable=not show_progress,
                          unit="batch"):
            inputs, labels = _collate(dataset, collate, chunk, option)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            ends = cache.row_ends(inputs, labels)
            cache.fill(inputs, cache.row_keys(inputs, ends), ends)
    cache.prepass_seconds = time.perf_counter() - started
    cache.prepass_samples = cache.misses - before
    logger.warning(
        "frozen_prefix_cache: pre-pass computed %d samples in %.2f s; the cache holds %d samples, %s.",
        cache.prepass_samples, cache.prepass_seconds, len(cache.entries), format_bytes(cache.nbytes),
    )


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
