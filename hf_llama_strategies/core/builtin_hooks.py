"""The core services' own answers to the ``firstresult`` hooks, registered first like any plugin.

Registered before every other plugin and marked ``trylast``, so an installed plugin or one
passed in code answers first: a plugin can teach an architecture the structural finder cannot
read, or describe an accelerator torch does not know (a test stands in for hardware it lacks).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import nn

from .anatomy import ModelAnatomy, find_anatomy_by_structure
from .hardware import HardwareProbe
from .hookspecs import hookimpl

if TYPE_CHECKING:
    from transformers import TrainingArguments


@hookimpl(trylast=True)
def hfls_model_anatomy(model: nn.Module) -> Optional[ModelAnatomy]:
    """Read the model's structure (its homogeneous layer stack, embeddings, norm and head)."""
    return find_anatomy_by_structure(model)


@hookimpl(trylast=True)
def hfls_hardware_probe(training_args: Optional["TrainingArguments"]) -> HardwareProbe:
    """Ask torch about the device ``training_args`` train on."""
    return HardwareProbe.detect(training_args)
