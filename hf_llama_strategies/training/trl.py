"""TRL's ``SFTTrainer`` trained by a plan (``task: sft``): the trainer class, its config, and the missing-TRL error.

TRL is an optional dependency (``pip install "hf-llama-strategies[trl]"``): it is imported when
an SFT trainer is first built, never when this module is.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from ..data.sft import SFTArguments, SFTData
from ..errors import StrategyError
from .label_head import install_label_head
from .trainer import StrategyTrainerMixin

TRL_MISSING = (
    "task: sft trains through TRL's SFTTrainer, which is not installed: pip install \"hf-llama-strategies[trl]\""
)


def require_trl() -> Any:
    """``trl``, or a clear error naming the extra to install."""
    try:
        import trl
    except ImportError:
        raise StrategyError(TRL_MISSING) from None
    return trl


@functools.cache
def strategy_sft_trainer_class() -> type:
    """``class StrategySFTTrainer(StrategyTrainerMixin, SFTTrainer)``, built once TRL is imported."""
    trl = require_trl()
    from accelerate.utils import is_peft_model

    class StrategySFTTrainer(StrategyTrainerMixin, trl.SFTTrainer):
        """TRL's ``SFTTrainer`` that trains by a plan; on a CPU its fused LM head scores only labelled tokens."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # TRL patched the model's forward with its fused head (on the base model of a PEFT model).
            model = self.model.get_base_model() if is_peft_model(self.model) else self.model
            install_label_head(model)

    return StrategySFTTrainer


def sft_config(training_args: Any, data_args: Any, sft_args: SFTArguments, data: SFTData) -> Any:
    """An ``SFTConfig`` holding every ``TrainingArguments`` value as given (not SFTConfig's own defaults)."""
    from transformers import TrainingArguments

    trl = require_trl()
    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    # Tokenized data (template:) is already within cutoff_len, and TRL's truncation would drop the records whose
    # labels are all masked, which LLaMA-Factory keeps: TRL cuts only to pack.
    max_length = data_args.max_seq_length if sft_args.packing or not data.tokenized else None
    return trl.SFTConfig(
        **values,
        max_length=max_length,
        packing=sft_args.packing,
        loss_type=sft_args.sft_loss,
        assistant_only_loss=data.assistant_only_loss,
        # prompt/completion data: TRL masks the prompt; messages data: the markers do (or nothing, train_on_prompt);
        # tokenized data: its labels.
        completion_only_loss=None,
    )


def build_sft_trainer(model: Any, training_args: Any, data_args: Any, sft_args: SFTArguments, data: SFTData,
                      tokenizer: Any, strategy_args: Any, peft_config: Any = None) -> Any:
    """TRL's ``SFTTrainer`` with :class:`StrategyTrainerMixin` first among its bases (``peft_config``: TRL wraps
    the model in those adapters)."""
    trainer_class = strategy_sft_trainer_class()
    return trainer_class(
        model=model, args=sft_config(training_args, data_args, sft_args, data), train_dataset=data.train,
        eval_dataset=data.eval, processing_class=tokenizer, strategy_args=strategy_args, peft_config=peft_config,
    )
