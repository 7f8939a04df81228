"""Dtype names: the one alias table (``half`` is ``fp16``), ``torch.dtype`` lookup, the frozen dtypes a mode allows.

Every option and check that names a precision (``precision``, ``frozen_dtype``, the CLI's
``bf16``/``fp16`` cross-check) spells it through :func:`normalise_dtype_name`.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..errors import InvalidArgumentError, PlanError

_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
#: ``"bf16"`` -> ``"torch.bfloat16"``.
TORCH_DTYPE = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
#: ``"torch.bfloat16"`` -> ``"bf16"``.
SHORT_NAME = {v: k for k, v in TORCH_DTYPE.items()}


def normalise_dtype_name(option: str, value: Any, allow_auto: bool) -> Optional[str]:
    """``"BF16"``, ``"bfloat16"`` -> ``"bf16"`` (``"auto"`` where allowed); refuses anything else, naming ``option``."""
    valid = "'auto', 'bf16', 'fp16' or 'fp32' (or unset)" if allow_auto else "'bf16', 'fp16', 'fp32' or unset"
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidArgumentError(option, value, valid)
    key = value.strip().lower()
    if allow_auto and key == "auto":
        return "auto"
    if key not in _ALIASES:
        raise InvalidArgumentError(option, value, valid)
    return _ALIASES[key]


def torch_dtype(name: str) -> torch.dtype:
    """The ``torch.dtype`` written as ``name`` (``"torch.bfloat16"`` or ``"bfloat16"``)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise PlanError(f"{name!r} is not a torch dtype (expected e.g. 'torch.float32', 'torch.bfloat16').")
    return dtype


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype written as ``str(torch.dtype)``."""
    return torch_dtype(name).itemsize


def check_frozen_dtype(mode: str, pure_bf16: bool, frozen_dtype: Optional[str], why: str) -> None:
    """Refuse a ``frozen_dtype`` that cannot work in ``mode`` (``why`` says where the mode comes from)."""
    if frozen_dtype is None:
        return
    if pure_bf16:
        if frozen_dtype != "bf16":
            raise InvalidArgumentError(
                "frozen_dtype", frozen_dtype, "'bf16' or unset with pure_bf16",
                "pure_bf16 keeps every parameter in bf16.",
            )
    elif mode == "fp32":
        if frozen_dtype != "fp32":
            raise InvalidArgumentError(
                "frozen_dtype", frozen_dtype, f"'fp32' or unset when training in fp32 ({why})",
                "Without autocast, half-precision frozen weights meet fp32 activations and the forward pass "
                "fails on mixed dtypes. Use precision: bf16 (or fp16 on a GPU without bf16) to keep frozen "
                "weights in half precision.",
            )
    elif frozen_dtype not in (mode, "fp32"):
        raise InvalidArgumentError(
            "frozen_dtype", frozen_dtype, f"'{mode}', 'fp32' or unset under {mode} autocast ({why})",
            f"Frozen weights in {frozen_dtype} would be converted to {mode} by autocast at every step.",
        )
