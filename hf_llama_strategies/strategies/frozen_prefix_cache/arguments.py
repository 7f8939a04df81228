"""The frozen-prefix cache's options: ``frozen_prefix_cache``, ``..._dir``, ``..._max_gb``, ``..._boundary``,
``..._prepass``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from ...core.options import OptionGroup, check_bool, check_optional_positive_int
from ...errors import InvalidArgumentError

OFF, MEMORY, DISK = "off", "memory", "disk"
MODES = (OFF, MEMORY, DISK)


@dataclass
class FrozenPrefixCacheArguments(OptionGroup):
    """Run the frozen bottom of the model once per distinct sample (see the package's docstring)."""

    frozen_prefix_cache: str = field(
        default="off",
        metadata={
            "help": (
                "Run the frozen prefix (embeddings and the layers below the lowest one that ever trains) once per "
                "distinct sample and start every later forward from its cached output: 'off' (default), 'memory' "
                "(kept for the run) or 'disk' (kept in `frozen_prefix_cache_dir`, reused by later runs with the "
                "same frozen weights, boundary and precision)."
            )
        },
    )
    frozen_prefix_cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Directory of `frozen_prefix_cache: disk` (default: $HF_HOME/hf_llama_strategies/"
                "frozen_prefix_cache); one subdirectory per fingerprint, never deleted by a run."
            )
        },
    )
    frozen_prefix_cache_max_gb: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Largest frozen-prefix cache allowed, in GB (1e9 bytes): a run whose training data needs more is "
                "refused before training, with the figure. Unset: no limit."
            )
        },
    )
    frozen_prefix_cache_boundary: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Cache the input of this decoder layer instead of the lowest layer that ever trains (the default): "
                "runs that train different top layers then read one cache (`compare` uses it), each running the "
                "layers between it and its own lowest trained layer without gradients. The number of layers means "
                "the final norm's input. Must lie at or below the lowest layer that trains."
            )
        },
    )
    frozen_prefix_cache_prepass: bool = field(
        default=True,
        metadata={
            "help": (
                "true (default): compute every training sample's prefix in a pre-pass before the first step. false: "
                "compute a sample's prefix when training or evaluation first meets it (a run shorter than an epoch "
                "computes only what it uses; `compare` uses it)."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.frozen_prefix_cache
        if value is not None and (not isinstance(value, str) or value.strip().lower() not in MODES):
            raise InvalidArgumentError("frozen_prefix_cache", value, "'off', 'memory' or 'disk'")
        self._check_placement()
        mode = self.cache_mode  # null in a YAML file spells the default, off
        directory = self.frozen_prefix_cache_dir
        if directory is not None and (not isinstance(directory, str) or not directory.strip()):
            raise InvalidArgumentError("frozen_prefix_cache_dir", directory, "a directory path")
        if directory is not None and mode != DISK:
            raise InvalidArgumentError(
                "frozen_prefix_cache_dir", directory, "unset unless frozen_prefix_cache: disk",
                f"It has no effect with frozen_prefix_cache={mode!r}.",
            )
        limit = self.frozen_prefix_cache_max_gb
        if limit is None:
            return
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise InvalidArgumentError(
                "frozen_prefix_cache_max_gb", limit, "a positive number of gigabytes (1e9 bytes)"
            )
        if mode == OFF:
            raise InvalidArgumentError(
                "frozen_prefix_cache_max_gb", limit, "unset unless frozen_prefix_cache is 'memory' or 'disk'"
            )

    def _check_placement(self) -> None:
        """``frozen_prefix_cache_boundary`` and ``frozen_prefix_cache_prepass``: their types, and a cache to place."""
        check_optional_positive_int(
            "frozen_prefix_cache_boundary", self.frozen_prefix_cache_boundary, "a decoder layer index, at least 1"
        )
        check_bool("frozen_prefix_cache_prepass", self.frozen_prefix_cache_prepass)
        if self.cache_mode != OFF:
            return
        for option, given in (("frozen_prefix_cache_boundary", self.frozen_prefix_cache_boundary is not None),
                              ("frozen_prefix_cache_prepass", self.frozen_prefix_cache_prepass is False)):
            if given:
                raise InvalidArgumentError(
                    option, getattr(self, option), "unset unless frozen_prefix_cache is 'memory' or 'disk'"
                )

    @property
    def cache_mode(self) -> str:
        """``off``, ``memory`` or ``disk``: ``frozen_prefix_cache`` normalised."""
        value = self.frozen_prefix_cache
        return OFF if value is None else str(value).strip().lower()

    @property
    def cache_dir(self) -> str:
        """The directory of ``frozen_prefix_cache: disk``, absolute."""
        return os.path.abspath(os.path.expanduser(self.frozen_prefix_cache_dir or default_cache_dir()))


def default_cache_dir() -> str:
    """Where ``frozen_prefix_cache: disk`` keeps caches without ``frozen_prefix_cache_dir``."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "hf_llama_strategies", "frozen_prefix_cache")
