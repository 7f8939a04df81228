"""LoRA through PEFT: the options (TRL's names), the ``LoraConfig``, adapters resumed or merged.

The keys are those of TRL's ``ModelConfig`` (``use_peft``, ``lora_r``, ``lora_alpha``,
``lora_dropout``, ``lora_target_modules``, ``lora_modules_to_save``, ``use_rslora``,
``use_dora``), with TRL's defaults, so a ``trl sft`` command line reads the same here; a
LLaMA-Factory ``finetuning_type: lora`` YAML translates into them. Two more:

* ``lora_full_layers``: decoder layers trained in full beside the adapters (``"-2:"``, the
  layer syntax of ``trainable_layers``): PEFT's ``modules_to_save`` copies of those layers,
  kept out of the LoRA targets, saved with the adapter and merged by ``merge_and_unload``;
* ``adapter_name_or_path`` (comma-separated) and ``create_new_adapter``, as LLaMA-Factory
  reads them: the adapters are merged into the model in order, except the last, which keeps
  training, unless ``create_new_adapter`` merges it too and starts a new one.

PEFT is an optional dependency (``pip install "hf-llama-strategies[peft]"``), imported only
when LoRA is asked for.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from ..core.anatomy import find_anatomy_by_structure
from ..core.layer_selection import parse_layer_selection
from ..core.options import check_positive_int, is_number
from ..errors import InvalidArgumentError, StrategyError

PEFT_MISSING = "LoRA (use_peft) trains through PEFT, which is not installed: pip install \"hf-llama-strategies[peft]\""
_ALL = "all-linear"


@dataclass
class PeftArguments:
    """LoRA keys (TRL's ``ModelConfig`` names and defaults), plus full layers and adapters to start from."""

    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (PEFT) instead of the weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (the adapters' scale is alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the adapters' input."})
    lora_target_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules that get adapters: names (q_proj,v_proj), all-linear (every linear layer but the "
                          "output head), or a regex. Unset: PEFT's default for the architecture."},
    )
    lora_modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter (embed_tokens, lm_head)."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilized LoRA: scale alpha / sqrt(r)."})
    use_dora: bool = field(default=False, metadata={"help": "DoRA: weight-decomposed LoRA (a magnitude vector)."})
    lora_full_layers: Optional[str] = field(
        default=None,
        metadata={"help": "Decoder layers trained in full beside the adapters, e.g. '-2:' (trainable_layers syntax): "
                          "PEFT modules_to_save copies, saved with the adapter."},
    )
    adapter_name_or_path: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Trained adapter(s) to start from (comma-separated): all but the last merged into the "
                          "model, the last trained further (with create_new_adapter: merged too)."},
    )
    create_new_adapter: bool = field(
        default=False, metadata={"help": "Merge every adapter of adapter_name_or_path and train a new one."}
    )


def require_peft() -> Any:
    """``peft``, or a clear error naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise StrategyError(PEFT_MISSING) from None
    return peft


def as_list(value: Any) -> Optional[list[str]]:
    """A list of names from a list or a comma-separated string (None stays None)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def check_peft_arguments(args: PeftArguments) -> None:
    """Refuse LoRA options no run can use, naming each (before anything is written)."""
    args.lora_target_modules = as_list(args.lora_target_modules)
    args.lora_modules_to_save = as_list(args.lora_modules_to_save)
    args.adapter_name_or_path = as_list(args.adapter_name_or_path)
    if not args.use_peft:
        for option in ("lora_full_layers", "adapter_name_or_path", "create_new_adapter"):
            if getattr(args, option):
                raise InvalidArgumentError(option, getattr(args, option), "unset without use_peft: true (it is a "
                                           "LoRA option)")
        return
    check_positive_int("lora_r", args.lora_r)
    if not is_number(args.lora_alpha) or args.lora_alpha <= 0:
        raise InvalidArgumentError("lora_alpha", args.lora_alpha, "a positive number")
    if not is_number(args.lora_dropout) or not 0 <= args.lora_dropout < 1:
        raise InvalidArgumentError("lora_dropout", args.lora_dropout, "a probability in [0, 1)")
    if args.lora_full_layers is not None:
        parse_layer_selection(args.lora_full_layers, None)
    for path in args.adapter_name_or_path or []:
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise InvalidArgumentError("adapter_name_or_path", path, "a folder holding a PEFT adapter "
                                       "(adapter_config.json)")


def _targets(args: PeftArguments) -> Any:
    targets = args.lora_target_modules
    if targets is None:
        return None
    if targets == [_ALL] or len(targets) == 1:
        return targets[0]  # "all-linear", or one name or regex, as PEFT reads a string
    return targets


def lora_config(args: PeftArguments, model: Any, task_type: str = "CAUSAL_LM",
                modules_to_save: tuple[str, ...] = ()) -> Any:
    """PEFT's ``LoraConfig`` for ``args`` on ``model``; ``modules_to_save`` are added to the user's."""
    peft = require_peft()
    saved = list(dict.fromkeys([*(args.lora_modules_to_save or []), *modules_to_save]))
    exclude = None
    if args.lora_full_layers is not None:
        anatomy = find_anatomy_by_structure(model)
        if anatomy is None:
            raise InvalidArgumentError("lora_full_layers", args.lora_full_layers,
                                       f"unset for {type(model).__name__}, which has no decoder layer stack")
        layers = parse_layer_selection(args.lora_full_layers, anatomy.num_layers)
        paths = [f"{anatomy.layers_path}.{i}" for i in layers]
        saved += paths
        # Those layers train whole: no adapter inside them.
        exclude = rf"(.*\.)?{re.escape(anatomy.layers_path)}\.({'|'.join(map(str, layers))})\..*"
    return peft.LoraConfig(
        task_type=task_type, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=_targets(args), modules_to_save=saved or None, use_rslora=args.use_rslora,
        use_dora=args.use_dora, exclude_modules=exclude, bias="none",
    )


def load_adapters(model: Any, args: PeftArguments) -> tuple[Any, list[str]]:
    """``model`` with ``adapter_name_or_path`` applied: merged in order, the last one trainable unless
    ``create_new_adapter``; and a line for each thing done."""
    adapters = args.adapter_name_or_path or []
    if not adapters:
        return model, []
    peft = require_peft()
    to_merge, resume = (adapters, None) if args.create_new_adapter else (adapters[:-1], adapters[-1])
    model = merge_adapters(model, to_merge)
    notes = [f"adapter {path} merged into the model" for path in to_merge]
    if resume is not None:
        model = peft.PeftModel.from_pretrained(model, resume, is_trainable=True)
        notes.append(f"adapter {resume} trains further (its own rank, alpha and targets; the lora_* keys are unused)")
    return model, notes


def merge_adapters(model: Any, paths: list[str]) -> Any:
    """``model`` with each PEFT adapter of ``paths`` merged into its weights, in order (``merge_and_unload``)."""
    if not paths:
        return model
    peft = require_peft()
    for path in paths:
        model = peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    return model


def embedding_module_names(model: Any) -> tuple[str, ...]:
    """The names PEFT's ``modules_to_save`` needs for the input embeddings and the output head."""
    wanted = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return tuple(dict.fromkeys(name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                               if any(module is w for w in wanted)))


def meta_peft_model(model: Any, args: PeftArguments, task_type: str = "CAUSAL_LM") -> Any:
    """``model`` (on the meta device) wrapped in the adapters a run would train: its LoRA config, or the
    last adapter's own config when one keeps training (for ``plan``: shapes, no weights)."""
    peft = require_peft()
    adapters = args.adapter_name_or_path or []
    if adapters and not args.create_new_adapter:
        config = peft.PeftConfig.from_pretrained(adapters[-1])
    else:
        config = lora_config(args, model, task_type)
    return peft.get_peft_model(model, config)
