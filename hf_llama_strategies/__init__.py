"""hf-llama-strategies: fine-tuning strategies for Llama-family models in the HF Trainer."""

from .anatomy import ModelAnatomy, parse_layer_selection
from .arguments import StrategyArguments
from .callback import StrategyCallback
from .errors import InvalidArgumentError, PlanError, StrategyError, UnknownArchitectureError
from .hookspecs import hookimpl, hookspec
from .memory import TrainingMemoryEstimate, estimate_training_memory
from .plan import PLAN_FILE_NAME, ParamDecision, StrategyPlan, build_plan
from .plugins import get_plugin_manager
from .strategies.precision import HardwareProbe, resolve_training_arguments
from .trainer import StrategyTrainer, StrategyTrainerMixin

__version__ = "0.1.0"

__all__ = [
    "HardwareProbe",
    "InvalidArgumentError",
    "ModelAnatomy",
    "PLAN_FILE_NAME",
    "ParamDecision",
    "PlanError",
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
