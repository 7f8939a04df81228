"""What the training device can do for precision: :class:`HardwareProbe`.

The ``hfls_hardware_probe`` hook describes the device a run trains on; the built-in answer
(:mod:`.builtin_hooks`) asks torch through :meth:`HardwareProbe.detect`. ``plan --device``
plans for another machine through :meth:`HardwareProbe.for_device` (named GPUs in
:data:`KNOWN_GPUS`); tests build one by hand.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from ..errors import InvalidArgumentError
from .units import format_bytes

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
        memory_bytes: the device's memory, when known (a GPU's total memory; ``plan`` compares
            the step's peak with it and ``plan --fit`` takes it as the budget).
    """

    device_type: str
    device_name: str = ""
    bf16_supported: bool = False
    tf32_supported: bool = False
    compute_capability: Optional[tuple[int, int]] = None
    memory_bytes: Optional[int] = None

    @property
    def cuda_available(self) -> bool:
        """True when training runs on a CUDA (or ROCm) GPU."""
        return self.device_type == "cuda"

    def describe(self) -> str:
        """``"Tesla T4 (cuda, compute capability 7.5)"`` (and its memory, when known: ``", 15.00 GiB"``)."""
        details = [self.device_type]
        if self.compute_capability is not None:
            details.append("compute capability {}.{}".format(*self.compute_capability))
        if self.memory_bytes is not None:
            details.append(format_bytes(self.memory_bytes))
        name = self.device_name or self.device_type
        details = details if name != self.device_type else details[1:]
        return f"{name} ({', '.join(details)})" if details else name

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
            memory = torch.cuda.get_device_properties(index).total_memory
            return cls("cuda", torch.cuda.get_device_name(index), bf16, tf32, (major, minor), memory)
        if device.type == "cpu":
            return cls("cpu", platform.processor() or platform.machine() or "cpu", bf16_supported=True)
        from transformers.utils import is_torch_bf16_gpu_available

        return cls(device.type, device.type, bf16_supported=is_torch_bf16_gpu_available())

    @classmethod
    def for_device(
        cls, device: str, memory_bytes: Optional[int] = None, compute_capability: Optional[str] = None
    ) -> "HardwareProbe":
        """The hardware ``plan --device`` plans for: ``cpu``, ``cuda`` (with ``compute_capability``) or a named GPU.

        Args:
            device: ``"cpu"``, ``"cuda"`` or a name of :data:`KNOWN_GPUS` (``"h100"``, ``"a100"``...).
            memory_bytes: the device's memory (``--device_memory``); a named GPU's default is its
                largest model's (the A100 80GB: give 40GiB for the 40GB one).
            compute_capability: ``"8.0"``; needed for ``cuda``, fixed for a named GPU.

        Raises:
            InvalidArgumentError: an unknown device, ``cuda`` without a compute capability, a
                compute capability that is not ``MAJOR.MINOR`` or contradicts the named GPU's.
        """
        name = device.strip().lower()
        if name == "cpu":
            return cls("cpu", "cpu", bf16_supported=True, memory_bytes=memory_bytes)
        if name == "cuda":
            if compute_capability is None:
                raise InvalidArgumentError(
                    "--device", device, f"cuda with --compute_capability (e.g. 8.0), or a GPU name: {_gpu_names()}",
                    "The compute capability decides bf16 and TF32.",
                )
            major, minor = _parse_capability(compute_capability)
            return cls("cuda", "cuda", (major, minor) >= (8, 0), (major, minor) >= (8, 0), (major, minor), memory_bytes)
        if name not in KNOWN_GPUS:
            raise InvalidArgumentError("--device", device, f"cpu, cuda or a GPU name: {_gpu_names()}")
        full_name, capability, memory = KNOWN_GPUS[name]
        if compute_capability is not None and _parse_capability(compute_capability) != capability:
            raise InvalidArgumentError(
                "--compute_capability", compute_capability, "{}.{} for {} (or --device cuda)".format(*capability, name)
            )
        ampere = capability >= (8, 0)
        return cls("cuda", full_name, ampere, ampere, capability, memory_bytes or memory)


def _parse_capability(text: str) -> tuple[int, int]:
    major, dot, minor = str(text).strip().partition(".")
    if not (major.isdigit() and dot and minor.isdigit()):
        raise InvalidArgumentError("--compute_capability", text, "MAJOR.MINOR, e.g. 8.0 (A100), 9.0 (H100), 7.5 (T4)")
    return int(major), int(minor)


def _gpu_names() -> str:
    return ", ".join(KNOWN_GPUS)


_MiB = 2**20
#: GPUs ``plan --device`` knows by name: (the name torch reports, compute capability, total memory of the
#: largest model as ``nvidia-smi`` reports it: what the driver hands out, a little under the box's "80GB").
KNOWN_GPUS: dict[str, tuple[str, tuple[int, int], int]] = {
    "h200": ("NVIDIA H200", (9, 0), 143771 * _MiB),
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 81559 * _MiB),
    "a100": ("NVIDIA A100-SXM4-80GB", (8, 0), 81920 * _MiB),
    "l40s": ("NVIDIA L40S", (8, 9), 46068 * _MiB),
    "a10g": ("NVIDIA A10G", (8, 6), 23028 * _MiB),
    "l4": ("NVIDIA L4", (8, 9), 23034 * _MiB),
    "rtx4090": ("NVIDIA GeForce RTX 4090", (8, 9), 24564 * _MiB),
    "v100": ("Tesla V100-SXM2-32GB", (7, 0), 32768 * _MiB),
    "t4": ("Tesla T4", (7, 5), 15360 * _MiB),
}
