"""The frozen-prefix cache's options: ``frozen_prefix_cache``, ``..._dir``, ``..._max_gb``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

from ...core.options import OptionGroup
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

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.frozen_prefix_cache
        if value is not None and (not isinstance(value, str) or value.strip().lower() not in MODES):
            raise InvalidArgumentError("frozen_prefix_cache", value, "'off', 'memory' or 'disk'")
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
