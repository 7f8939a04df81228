"""``StrategyArguments``: every strategy option, as one dataclass.

``transformers.HfArgumentParser`` parses it beside ``TrainingArguments`` (no field name
collides with one of ``TrainingArguments``), so one flat YAML file or one command line can
hold model, data, training and strategy keys. ``__post_init__`` brings spellings to one form
and has every built-in and installed plugin check the options it owns (its
``hfls_validate_arguments`` hook: the freezing options in ``strategies/freezing.py``, the
precision ones in ``strategies/precision.py``...): a bad value fails when the arguments are
parsed, not hours into a run. This module gives the options' names, defaults and help; what
they mean is the owning strategy's.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Optional, Union

from .errors import InvalidArgumentError
from .layer_selection import selects_all
from .precision import normalise_dtype_name

# Options that refine another option or the report: alone they ask for nothing.
_REFINING_OPTIONS = frozenset({"print_plan", "allow_plan_change_on_resume", "lisa_drop_optimizer_state"})
# Options unset by default whose help documents a word for "unset".
_UNSET_SPELLINGS = {"unfreeze_schedule": "none"}



@dataclass
class StrategyArguments:
    """How to fine-tune: which parameters train, and (in later options) at which rate and precision.

    With every field at its default nothing is asked for: ``StrategyTrainer`` is then a plain
    ``Trainer`` (see :meth:`options_set`), which is full fine-tuning. Freezing options compose:
    the layer and module selection decides the decoder layers; ``train_embeddings``,
    ``train_norm`` and ``train_head`` decide the parts around them; ``trainable_params``
    then adds parameters by regex and ``frozen_params`` removes them (it wins over all).
    """

    trainable_layers: str = field(
        default="all",
        metadata={
            "help": (
                "Decoder layers to train: 'all' (default), 'none', or a comma list of layer indices and "
                "Python slices, e.g. '-2:' (last two), ':4' (first four), '0,5,10:12', '::2'. Negative "
                "indices count from the top. Note: LLaMA-Factory's `freeze_trainable_layers: 2` is '-2:' here."
            )
        },
    )
    trainable_modules: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Within the selected layers, train only these modules: a comma list of module names as they "
                "appear inside a layer, e.g. 'mlp,self_attn' or 'q_proj,v_proj' or 'self_attn.o_proj'. "
                "Unset or 'all' trains every module of the selected layers."
            )
        },
    )
    train_embeddings: Optional[bool] = field(
        default=None,
        metadata={
            "help": (
                "Train the input embeddings (token, and position embeddings where the model has them). "
                "Default: true for full fine-tuning, false as soon as `trainable_layers` or "
                "`trainable_modules` restricts the layers."
            )
        },
    )
    train_norm: Optional[bool] = field(
        default=None,
        metadata={"help": "Train the final norm after the last layer. Default: true."},
    )
    train_head: Optional[bool] = field(
        default=None,
        metadata={
            "help": (
                "Train the task head (lm_head, score, classifier, a BERT pooler). Default: true, except that "
                "a head tied to frozen input embeddings stays frozen (the plan says so); set true to train "
                "the shared tensor."
            )
        },
    )
    trainable_params: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Regexes (re.search on full parameter names) of parameters to train in addition to the "
                "selection above, like axolotl's `unfrozen_parameters`. Each must match a parameter."
            )
        },
    )
    frozen_params: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Regexes (re.search on full parameter names) of parameters to freeze; wins over every other "
                "option. Each must match a parameter."
            )
        },
    )

    # -- layer-wise learning rates: strategies/layerwise_lr.py ------------------------------

    head_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Learning rate of the task head (lm_head, score, classifier), absolute, e.g. 5e-5 while "
                "`learning_rate` (the body) is 1e-5. Unset: the head follows the other options."
            )
        },
    )
    embedding_lr: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Learning rate of the input embeddings, absolute (axolotl's `embedding_lr`). The embeddings "
                "must train: with restricted layers also set `train_embeddings: true`."
            )
        },
    )
    layer_lr_decay: Optional[float] = field(
        default=None,
        metadata={
            "help": (
                "Layer-wise LR decay d in (0, 1] (timm's `layer_decay`): decoder layer i of L trains at "
                "learning_rate * d**(L-1-i), the embeddings at learning_rate * d**L, the final norm and the "
                "head at learning_rate. `head_lr`, `embedding_lr` and `lr_rules` override it."
            )
        },
    )
    lr_rules: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Per-parameter learning rates, applied in order after the options above (a later rule wins): "
                "'PATTERN=LR' (absolute, e.g. 'self_attn=2e-5') or 'PATTERN=xSCALE' (times `learning_rate`, "
                "e.g. 'mlp=x0.5'). PATTERN is a regex (re.search on full parameter names) and must match a "
                "parameter that trains."
            )
        },
    )

    # -- dynamic freezing: strategies/gradual_unfreezing.py, strategies/lisa.py -------------

    unfreeze_schedule: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "'gradual' (ULMFiT-style gradual unfreezing): the decoder layers start frozen (head, and norm/"
                "embeddings as configured, train from step 0) and one more layer from the top (or "
                "`unfreeze_layers_per_step`) starts training every `unfreeze_interval_steps` optimizer steps, "
                "until every layer `trainable_layers` selects trains. Unset or 'none': no schedule."
            )
        },
    )
    unfreeze_interval_steps: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "Optimizer steps between two unfreezing stages of `unfreeze_schedule: gradual` (required with "
                "it). With gradient accumulation a step is an optimizer step, as `global_step` counts them."
            )
        },
    )
    unfreeze_layers_per_step: Optional[int] = field(
        default=None,
        metadata={"help": "Decoder layers unfrozen at each stage of `unfreeze_schedule: gradual`. Default: 1."},
    )
    lisa_layers: Optional[int] = field(
        default=None,
        metadata={
            "help": (
                "LISA (layer-wise importance sampling, as in LMFlow): train this many decoder layers at a time, "
                "drawn anew every `lisa_interval_steps` among the layers `trainable_layers` selects; embeddings "
                "and head train throughout unless the static plan freezes them. Unset: no LISA."
            )
        },
    )
    lisa_interval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Optimizer steps between two LISA draws. Default: 20 (LMFlow's)."},
    )
    lisa_drop_optimizer_state: bool = field(
        default=True,
        metadata={
            "help": (
                "Drop the optimizer state (Adam moments) of the layers LISA deactivates, so optimizer memory is "
                "bounded by the active layers; a layer drawn again starts with fresh state. false keeps it, as "
                "LMFlow does."
            )
        },
    )
    allow_plan_change_on_resume: bool = field(
        default=False,
        metadata={
            "help": (
                "Resume from a checkpoint whose strategy_plan.json differs from the current plan (by default an "
                "error that shows the difference): the resumed run then no longer equals an uninterrupted one."
            )
        },
    )

    # -- mixed precision: strategies/precision.py -------------------------------------------

    precision: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Training precision: 'auto', 'bf16', 'fp16' or 'fp32'; unset (default): TrainingArguments' "
                "fp16/bf16 and the model's dtypes are used as given. Mapped onto TrainingArguments' fp16/bf16 by "
                "resolve_training_arguments (StrategyTrainer does it at construction, on your object). 'auto': bf16 "
                "autocast where the accelerator has native bf16, fp16 autocast on CUDA GPUs without it, and on a "
                "CPU fp32 (bf16 autocast if the model was loaded in bf16). With autocast, trainable parameters "
                "are kept in fp32 and frozen ones stay as loaded. TF32 is TrainingArguments' own `tf32` key."
            )
        },
    )
    pure_bf16: bool = field(
        default=False,
        metadata={
            "help": (
                "Train bf16 weights directly, with no fp32 copy of the trainable parameters (every parameter "
                "is cast to bf16). Less memory, less precise updates. Needs bf16 hardware; refused with fp16 "
                "and with DeepSpeed ZeRO-3 (which keeps its own fp32 master weights)."
            )
        },
    )
    frozen_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Cast frozen parameters to this dtype: 'bf16', 'fp16' or 'fp32' (unset: keep them as loaded). "
                "Under autocast it must be the autocast dtype or fp32; with precision fp32 only fp32."
            )
        },
    )

    # -- speed: strategies/activation_checkpointing.py, strategies/frozen_prefix_cache.py ---

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

    # -- plugins and reporting --------------------------------------------------------------

    strategy_options: Optional[Union[dict, str]] = field(
        default=None,
        metadata={
            "help": (
                "Options for third-party strategy plugins: a mapping (YAML) or a JSON object (command "
                "line), keyed by plugin."
            )
        },
    )
    print_plan: bool = field(
        default=True,
        metadata={"help": "Print the plan table at the start of training (main process only)."},
    )

    def __post_init__(self) -> None:
        # Spellings become one form here (as TrainingArguments does); what a value means and
        # whether it can work is checked by the strategy that owns the option, through the
        # hfls_validate_arguments hook of every built-in and installed plugin.
        self.trainable_modules = _normalise_module_list(self.trainable_modules)
        self.trainable_params = _normalise_regex_list("trainable_params", self.trainable_params)
        self.frozen_params = _normalise_regex_list("frozen_params", self.frozen_params)
        self.strategy_options = _normalise_options(self.strategy_options)
        self.precision = normalise_dtype_name("precision", self.precision, allow_auto=True)
        self.frozen_dtype = normalise_dtype_name("frozen_dtype", self.frozen_dtype, allow_auto=False)
        for option in ("print_plan", "allow_plan_change_on_resume"):
            if not isinstance(getattr(self, option), bool):
                raise InvalidArgumentError(option, getattr(self, option), "true or false")
        # Deferred import: the plugins import this module for type hints.
        from .plugins import default_plugin_manager

        default_plugin_manager().hook.hfls_validate_arguments(strategy_args=self)

    def options_set(self) -> list[str]:
        """Names of the options that ask for something, in field order; empty: a plain ``Trainer`` run.

        An option counts when it differs from its default (``trainable_layers: all`` and
        ``unfreeze_schedule: none`` spell the default). Options that only refine another one
        or the report (``print_plan``, ``allow_plan_change_on_resume``,
        ``lisa_drop_optimizer_state``) do not count on their own.
        """
        names = []
        for f in fields(self):
            if f.name in _REFINING_OPTIONS:
                continue
            value = getattr(self, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default  # type: ignore[misc]
            if _spells_default(value, default, _UNSET_SPELLINGS.get(f.name)):
                continue
            if value != default:
                names.append(f.name)
        return names

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, as stored in ``strategy_plan.json``."""
        return asdict(self)


def _spells_default(value: Any, default: Any, unset_word: Optional[str]) -> bool:
    """A text option's default written otherwise: its own word in any case ("ALL", " off "), the
    documented word for unset (``unfreeze_schedule: none``), or null (YAML) for one whose default is a word."""
    if isinstance(value, str) and isinstance(default, str):
        return value.strip().lower() == default
    if isinstance(value, str) and default is None:
        return unset_word is not None and value.strip().lower() == unset_word
    return value is None and isinstance(default, str)


def _normalise_module_list(value: Any) -> Any:
    # One spelling: a comma string without spaces, None for "all"; strategies/freezing.py checks the names.
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if not isinstance(value, str):
        return value
    if selects_all(value):
        return None
    return ",".join(n.strip() for n in value.split(","))


def _normalise_regex_list(option: str, value: Any) -> Optional[list[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        # One regex; never split on commas, which regexes use ("a{1,3}").
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise InvalidArgumentError(option, value, "a list of non-empty regular expressions")
    return list(value)


def _normalise_options(value: Any) -> Optional[dict]:
    if value is None or isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidArgumentError("strategy_options", value, "a JSON object", f"({exc}).") from None
        if isinstance(parsed, dict):
            return parsed
    raise InvalidArgumentError("strategy_options", value, "a mapping (YAML) or a JSON object string")
