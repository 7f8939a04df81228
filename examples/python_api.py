"""Fine-tune a tiny Llama with only its last two decoder layers (plus norm and head) trained.

Runs offline on a CPU in well under a minute: the model is built from a config and the
text is tokenised byte by byte, so nothing is downloaded. The three lines that differ from
a plain ``Trainer`` script are marked ``# <-``.

    python examples/python_api.py [--output_dir outputs/python_api]
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from hf_llama_strategies import StrategyArguments, StrategyTrainer  # <-

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be on "
    "his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding "
    "families, that he is considered the rightful property of some one or other of their daughters. "
) * 8
SEQ_LEN = 64


class ByteChunks(torch.utils.data.Dataset):
    """Fixed-length windows of UTF-8 bytes as causal-LM examples."""

    def __init__(self, text: str, seq_len: int) -> None:
        data = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        n = (len(data) - 1) // seq_len
        self.chunks = data[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.chunks[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/python_api")
    parser.add_argument("--max_steps", type=int, default=60)
    cli = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
    )
    model = LlamaForCausalLM(config)
    dataset = ByteChunks(TEXT, SEQ_LEN)

    args = TrainingArguments(
        output_dir=cli.output_dir, max_steps=cli.max_steps, per_device_train_batch_size=8,
        learning_rate=3e-3, warmup_steps=5, logging_steps=10, save_strategy="no",
        report_to="none", use_cpu=True, seed=0,
    )
    strategy = StrategyArguments(trainable_layers="-2:")  # <- last two layers, norm and head
    trainer = StrategyTrainer(  # <- instead of Trainer
        model=model, args=args, train_dataset=dataset, eval_dataset=dataset, strategy_args=strategy
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    trainer.save_model()
    print(f"eval loss {before:.3f} -> {after:.3f} (perplexity {math.exp(before):.1f} -> {math.exp(after):.1f})")
    print(f"model and strategy_plan.json saved in {cli.output_dir}")


if __name__ == "__main__":
    main()
