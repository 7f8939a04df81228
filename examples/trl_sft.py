"""Supervised fine-tuning with TRL's ``SFTTrainer`` and a strategy (freezing + layer-wise LR).

``StrategyTrainerMixin`` goes first among the bases; everything else is an ordinary
``SFTTrainer`` script. Runs offline on a CPU in well under a minute: a tiny Llama is built
from the config shipped with the package, with the shipped tokenizer and texts.

    pip install "hf-llama-strategies[trl,peft]"       # peft only for --lora
    python examples/trl_sft.py [--output_dir outputs/trl_sft] [--max_steps 30] [--lora]

Without ``--lora``: the last two decoder layers, the final norm and the head train, the
head at five times the body's rate. With ``--lora``: ``SFTTrainer(peft_config=...)`` wraps
the model in LoRA adapters, and the strategy restricts them to the last two layers with
``lora_B`` at 16 times ``lora_A``'s rate (LoRA+).
"""

from __future__ import annotations

import argparse
import csv
import os

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from hf_llama_strategies import StrategyArguments, StrategyTrainerMixin
from hf_llama_strategies.cli.demo import DEMO_DIR


class StrategySFTTrainer(StrategyTrainerMixin, SFTTrainer):
    """``SFTTrainer`` that trains by a plan: takes ``strategy_args=`` besides every SFTTrainer argument."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/trl_sft")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--lora", action="store_true", help="LoRA through SFTTrainer(peft_config=...), LoRA+ rates")
    cli = parser.parse_args()

    with open(os.path.join(DEMO_DIR, "train.csv"), encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)]
    dataset = Dataset.from_dict({"text": texts[:256]})
    tokenizer = AutoTokenizer.from_pretrained(DEMO_DIR)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_DIR))

    args = SFTConfig(
        output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=8, max_length=48,
        learning_rate=1e-3, logging_steps=max(1, cli.max_steps // 3), save_strategy="no", report_to="none",
        use_cpu=True,
        bf16=False,  # SFTConfig defaults to bf16; on a CPU fp32 is faster (or write precision: bf16)
        seed=0,
    )
    peft_config = None
    if cli.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        # LoRA+: lora_B at 16x lora_A's rate; only the adapters of the last two layers train.
        strategy = StrategyArguments(trainable_layers="-2:", lr_rules=["lora_B=x16"])
    else:
        strategy = StrategyArguments(trainable_layers="-2:", head_lr=5e-3)

    trainer = StrategySFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=peft_config, strategy_args=strategy,
    )
    result = trainer.train()
    trainer.save_model()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"train loss {losses[0]:.3f} -> {losses[-1]:.3f} over {result.global_step} steps")
    print(f"model and strategy_plan.json saved in {cli.output_dir}")


if __name__ == "__main__":
    main()
