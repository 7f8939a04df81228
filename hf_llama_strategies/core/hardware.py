"""What the training device can do for precision: :class:`HardwareProbe`.

The ``hfls_hardware_probe`` hook describes the device a run trains on; the built-in answer
(:mod:`.builtin_hooks`) asks torch through :meth:`HardwareProbe.detect`. Tests and ``plan``
runs for another machine build one by hand.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from transformers import TrainingArguments


@dataclass(frozen=True)
class HardwareProbe:
    """What the training device can do, as far as precision is concerned.

    Tests (and ``plan`` runs for another machine) build one by hand, e.g.
    ``HardwareProbe("cuda", "Tesla T4", bf16_supported=False, compute_capability=(7, 5))``,
    and pass it as ``probe=`` or return it from an ``hfls_hardware_probe`` hook.

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ``"mps"``, ``"xpu"``... (``torch.device.type``).
        device_name: human-readable name, for messages.
        bf16_supported: native bf16 compute (a CUDA GPU of compute capability 8.0 or newer;
            every CPU runs bf16 autocast, fast with AMX/AVX512-BF16).
        tf32_supported: TF32 matmuls (CUDA, Ampere or newer).
        compute_capability: CUDA compute capability, for messages.
    """

    device_type: str
    device_name: str = ""
    bf16_supported: bool = False
    tf32_supported: bool = False
    compute_capability: Optional[tuple[int, int]] = None

    @property
    def cuda_available(self) -> bool:
        """True when training runs on a CUDA (or ROCm) GPU."""
        return self.device_type == "cuda"

    def describe(self) -> str:
        """``"Tesla T4 (cuda, compute capability 7.5)"``."""
        details = [self.device_type]
        if self.compute_capability is not None:
            details.append("compute capability {}.{}".format(*self.compute_capability))
        name = self.device_name or self.device_type
        return f"{name} ({', '.join(details)})" if name != self.device_type else name

    @classmethod
    def detect(cls, training_args: Optional["TrainingArguments"] = None) -> "HardwareProbe":
        """Ask torch about the device ``training_args`` trains on (default: the first GPU, else CPU)."""
        if training_args is not None:
            device = training_args.device
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            with torch.cuda.device(index):
                # Without emulation: on a T4 or V100 bf16 "works" through slow emulation.
                bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            major, minor = torch.cuda.get_device_capability(index)
            tf32 = torch.version.hip is None and (major, minor) >= (8, 0)
            return cls("cuda", torch.cuda.get_device_name(index), bf16, tf32, (major, minor))
        if device.type == "cpu":
            return cls("cpu", platform.processor() or platform.machine() or "cpu", bf16_supported=True)
        from transformers.utils import is_torch_bf16_gpu_available

        return cls(device.type, device.type, bf16_supported=is_torch_bf16_gpu_available())
