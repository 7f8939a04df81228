"""Text classification in the style of the `transformers` example scripts (run_glue.py).

The six lines that adopt hf-llama-strategies are marked `# <-`: the import, one more
dataclass for HfArgumentParser, one more result in each of the two parsing branches (a JSON
config file, or the command line), StrategyTrainer instead of Trainer, and the parsed strategy
handed over. Everything else is what the example scripts (run_glue.py) already do. With no
strategy option given, the script trains exactly as with Trainer.

    python examples/run_classification.py \
        --model_config hf_llama_strategies/assets/demo --tokenizer_name hf_llama_strategies/assets/demo \
        --train_file hf_llama_strategies/assets/demo/train.csv \
        --validation_file hf_llama_strategies/assets/demo/validation.csv \
        --output_dir outputs/run_classification --num_train_epochs 1 \
        --trainable_layers=-2: --eval_strategy epoch --use_cpu
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import datasets
import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    TrainingArguments,
)

from hf_llama_strategies import StrategyArguments, StrategyTrainer  # <-
from hf_llama_strategies.data.metrics import load_metric


@dataclass
class ModelArguments:
    model_name_or_path: Optional[str] = field(default=None, metadata={"help": "Pretrained model dir or Hub id."})
    model_config: Optional[str] = field(default=None, metadata={"help": "Config to build a fresh model from."})
    tokenizer_name: Optional[str] = field(default=None, metadata={"help": "Tokenizer dir or Hub id."})


@dataclass
class DataArguments:
    train_file: str = field(metadata={"help": "CSV/JSON with `text` and `label` columns."})
    validation_file: Optional[str] = field(default=None, metadata={"help": "Same format."})
    max_seq_length: int = field(default=64, metadata={"help": "Truncate texts to this many tokens."})


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, StrategyArguments))  # <-
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        # One argument, the path to a JSON file: the arguments come from it.
        model_args, data_args, training_args, strategy_args = parser.parse_json_file(  # <-
            json_file=os.path.abspath(sys.argv[1])
        )
    else:
        model_args, data_args, training_args, strategy_args = parser.parse_args_into_dataclasses()  # <-

    files = {"train": data_args.train_file}
    if data_args.validation_file:
        files["validation"] = data_args.validation_file
    extension = data_args.train_file.rsplit(".", 1)[-1].replace("jsonl", "json")
    raw = datasets.load_dataset(extension, data_files=files)
    labels = sorted(raw["train"].unique("label"))

    source = model_args.model_name_or_path or model_args.model_config
    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(
        source, num_labels=len(labels), id2label=dict(enumerate(labels)), pad_token_id=tokenizer.pad_token_id
    )
    if model_args.model_name_or_path:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    else:
        torch.manual_seed(training_args.seed)
        model = AutoModelForSequenceClassification.from_config(config)

    def encode(batch):
        out = tokenizer(batch["text"], truncation=True, max_length=data_args.max_seq_length)
        out["labels"] = [labels.index(v) for v in batch["label"]]
        return out

    tokenised = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    accuracy = load_metric("accuracy")

    def compute_metrics(prediction):
        return accuracy.compute(predictions=np.argmax(prediction.predictions, -1), references=prediction.label_ids)

    trainer = StrategyTrainer(  # <- was: Trainer(
        model=model,
        args=training_args,
        train_dataset=tokenised["train"],
        eval_dataset=tokenised.get("validation"),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        strategy_args=strategy_args,  # <- the parsed strategy
    )
    trainer.train()
    trainer.save_model()
    if "validation" in tokenised:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
