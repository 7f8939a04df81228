"""Run under ``torchrun --nproc_per_node 2``: dynamic freezing under DDP (CPU, gloo).

Not a test module itself: ``test_dynamic_freezing_ddp.py`` launches it and checks what
every rank dumps into ``OUT_DIR/<scenario>_rank<r>.pt``: the initial and final parameters,
the sum of the input ids each rank trained on at each step (ranks must see different
data, or equal parameters would prove nothing), and the layers active at each step.

Scenarios:

* ``lisa``: LISA, one of four layers at a time, a new draw every two steps.
* ``gradual``: gradual unfreezing, one more layer every two steps.
* ``unregistered``: the negative control. Gradual unfreezing, but the layers that start
  later are frozen by hand when DDP wraps the model (after the optimizer is created, which
  sets every parameter the plan will train back to requires_grad), as a naive
  implementation would: the reducer never all-reduces them, and the ranks must diverge
  once they train.

    torchrun --nproc_per_node 2 tests/ddp_dynamic_freezing.py OUT_DIR
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from helpers import TokenDataset, make_training_args  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from hf_llama_strategies import StrategyArguments, StrategyTrainer  # noqa: E402

MAX_STEPS = 6
GRADUAL = dict(
    unfreeze_schedule="gradual", unfreeze_interval_steps=2, unfreeze_layers_per_step=2, train_embeddings=False
)
SCENARIOS = {
    "lisa": dict(lisa_layers=1, lisa_interval_steps=2),
    "gradual": GRADUAL,
    "unregistered": GRADUAL,
}


class RecordingTrainer(StrategyTrainer):
    """Records what each rank trains on, and which layers train at each step."""

    def __init__(self, *args, freeze_late_layers_before_ddp: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_sums: list[int] = []
        self.active_layers: list[list[int]] = []
        self.freeze_late_layers_before_ddp = freeze_late_layers_before_ddp

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.freeze_late_layers_before_ddp:
            # The Trainer wraps the model in DDP right after this.
            for name, param in self.model.named_parameters():
                if self.strategy_plan[name].active_from > 0:
                    param.requires_grad_(False)
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.input_sums.append(int(inputs["input_ids"].sum()))
        return super().training_step(model, inputs, num_items_in_batch)


class ActiveLayers(TrainerCallback):
    def __init__(self, trainer: RecordingTrainer) -> None:
        self.trainer = trainer

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        layers = {int(n.split(".")[2]) for n, p in model.named_parameters() if p.requires_grad and ".layers." in n}
        self.trainer.active_layers.append(sorted(layers))


def run(scenario: str, out_dir: str) -> None:
    model = tiny_model("llama", num_hidden_layers=4).train()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = make_training_args(os.path.join(out_dir, scenario), max_steps=MAX_STEPS, per_device_train_batch_size=2)
    trainer = RecordingTrainer(
        model=model,
        args=args,
        train_dataset=TokenDataset(n=64),
        strategy_args=StrategyArguments(print_plan=False, **SCENARIOS[scenario]),
        freeze_late_layers_before_ddp=scenario == "unregistered",
    )
    trainer.add_callback(ActiveLayers(trainer))
    trainer.train()
    rank = dist.get_rank()
    torch.save(
        {
            "initial": initial,
            "final": {n: p.detach().clone() for n, p in model.named_parameters()},
            "input_sums": trainer.input_sums,
            "active_layers": trainer.active_layers,
            "find_unused": trainer.accelerator.ddp_handler.find_unused_parameters,
            "world_size": trainer.args.world_size,
            "wrapped": type(trainer.model_wrapped).__name__,
        },
        os.path.join(out_dir, f"{scenario}_rank{rank}.pt"),
    )
    dist.barrier()


def main() -> None:
    out_dir = sys.argv[1]
    for scenario in SCENARIOS:
        run(scenario, out_dir)


if __name__ == "__main__":
    main()
