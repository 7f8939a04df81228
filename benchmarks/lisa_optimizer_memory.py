"""Optimizer-state memory of LISA with and without dropping the state of inactive layers.

Trains one small Llama (CPU, offline, seconds) three times side by side with AdamW:
full fine-tuning, LISA keeping the state of every layer ever drawn (LMFlow's behaviour,
``lisa_drop_optimizer_state: false``), and LISA dropping it (the default). After every
optimizer step it records ``optimizer_state_bytes``; it prints the curve and the peaks
against the bound "state of the always-trained blocks plus the K largest layers", measured
per parameter from the full fine-tuning run's optimizer.

    python benchmarks/lisa_optimizer_memory.py [--layers 8] [--lisa_layers 2] [--interval 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also when loaded by path

from _common import RandomTokens  # noqa: E402

from hf_llama_strategies import StrategyArguments, StrategyTrainer  # noqa: E402
from hf_llama_strategies.training.optimizer import optimizer_state_bytes  # noqa: E402


class StateBytes(TrainerCallback):
    def __init__(self) -> None:
        self.bytes: list[int] = []
        self.per_param: dict[str, int] = {}

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.bytes.append(optimizer_state_bytes(optimizer))
        for name, param in model.named_parameters():
            if param in optimizer.state:
                self.per_param[name] = sum(
                    v.numel() * v.element_size() for v in optimizer.state[param].values() if torch.is_tensor(v)
                )


def run(cli: argparse.Namespace, strategy: StrategyArguments) -> tuple[StateBytes, StrategyTrainer]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=cli.vocab, hidden_size=cli.hidden, intermediate_size=cli.hidden * 2, num_hidden_layers=cli.layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    recorder = StateBytes()
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, max_steps=cli.steps, per_device_train_batch_size=4, learning_rate=1e-3, use_cpu=True,
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
            optim="adamw_torch",
        )
        trainer = StrategyTrainer(
            model=model, args=args, train_dataset=RandomTokens(cli.steps * 4, 32, cli.vocab), strategy_args=strategy,
            callbacks=[recorder],
        )
        trainer.train()
    return recorder, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--lisa_layers", type=int, default=2)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    cli = parser.parse_args()

    full, _ = run(cli, StrategyArguments(print_plan=False))
    lisa = dict(lisa_layers=cli.lisa_layers, lisa_interval_steps=cli.interval, print_plan=False)
    keep, _ = run(cli, StrategyArguments(lisa_drop_optimizer_state=False, **lisa))
    drop, trainer = run(cli, StrategyArguments(**lisa))
    plan = trainer.strategy_plan

    # Bound: state of everything LISA never deactivates, plus the K largest layers' state.
    per_layer: dict[int, int] = {}
    always = 0
    for name, nbytes in full.per_param.items():
        decision = plan[name]
        if decision.schedule is not None:
            per_layer[decision.layer] = per_layer.get(decision.layer, 0) + nbytes
        elif decision.trainable:
            always += nbytes
    bound = always + sum(sorted(per_layer.values(), reverse=True)[: cli.lisa_layers])

    mib = lambda n: f"{n / 2**20:8.2f}"  # noqa: E731
    print(f"Llama {cli.layers} layers, hidden {cli.hidden}, vocab {cli.vocab}; LISA {cli.lisa_layers} layers, "
          f"new draw every {cli.interval} steps; AdamW; optimizer state in MiB after each step")
    print(f"{'step':>4}  {'layers':<10}  {'full FT':>8}  {'LISA keep':>9}  {'LISA drop':>9}")
    for step in range(cli.steps):
        layers = sorted({plan[n].layer for n in plan.active_names(step) if plan[n].layer is not None})
        print(f"{step + 1:>4}  {str(layers):<10}  {mib(full.bytes[step])}  {mib(keep.bytes[step]):>9}  "
              f"{mib(drop.bytes[step]):>9}")
    print()
    print(f"bound (always-trained blocks + {cli.lisa_layers} largest layers): {mib(bound)} MiB")
    print(f"peak full fine-tuning: {mib(max(full.bytes))} MiB")
    print(f"peak LISA keeping state: {mib(max(keep.bytes))} MiB  ({max(keep.bytes) / bound:.2f}x the bound)")
    print(f"peak LISA dropping state: {mib(max(drop.bytes))} MiB  ({max(drop.bytes) / bound:.2f}x the bound)")
    print(f"dropping saves {1 - max(drop.bytes) / max(keep.bytes):.0%} of the peak kept by LMFlow-style LISA")
    assert max(drop.bytes) <= bound, "LISA with dropping exceeded the bound"


if __name__ == "__main__":
    main()
