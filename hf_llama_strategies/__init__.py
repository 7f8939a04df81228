"""hf-llama-strategies: fine-tuning strategies for Llama-family models in the HF Trainer."""

from ._version import __version__
from .arguments import StrategyArguments
from .context import RunContext, resolve_training_arguments
from .core.anatomy import ModelAnatomy
from .core.decisions import ParamDecision
from .core.hardware import HardwareProbe
from .core.hookspecs import hookimpl, hookspec
from .core.layer_selection import parse_layer_selection
from .core.plan import PLAN_FILE_NAME, StrategyPlan
from .core.plugins import get_plugin_manager
from .errors import InvalidArgumentError, PlanError, StrategyError, UnknownArchitectureError
from .memory.dry_run import estimate_training_memory
from .memory.estimate import TrainingMemoryEstimate
from .planner import build_plan
from .training.callback import StrategyCallback
from .training.trainer import StrategyTrainer, StrategyTrainerMixin

__all__ = [
    "HardwareProbe",
    "InvalidArgumentError",
    "ModelAnatomy",
    "PLAN_FILE_NAME",
    "ParamDecision",
    "PlanError",
    "RunContext",
    "StrategyArguments",
    "StrategyCallback",
    "StrategyError",
    "StrategyPlan",
    "StrategyTrainer",
    "StrategyTrainerMixin",
    "TrainingMemoryEstimate",
    "UnknownArchitectureError",
    "__version__",
    "build_plan",
    "estimate_training_memory",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "parse_layer_selection",
    "resolve_training_arguments",
]
