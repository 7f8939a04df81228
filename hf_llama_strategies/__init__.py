"""hf-llama-strategies: fine-tuning strategies for Llama-family models in the HF Trainer."""

from .anatomy import ModelAnatomy
from .arguments import StrategyArguments
from .callback import StrategyCallback
from .context import RunContext
from .errors import InvalidArgumentError, PlanError, StrategyError, UnknownArchitectureError
from .hookspecs import hookimpl, hookspec
from .memory import TrainingMemoryEstimate, estimate_training_memory
from .layer_selection import parse_layer_selection
from .plan import PLAN_FILE_NAME, ParamDecision, StrategyPlan
from .planner import build_plan
from .plugins import get_plugin_manager
from .precision import HardwareProbe, resolve_training_arguments
from .trainer import StrategyTrainer, StrategyTrainerMixin

__version__ = "0.1.0"

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
    "build_plan",
    "estimate_training_memory",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "parse_layer_selection",
    "resolve_training_arguments",
]
