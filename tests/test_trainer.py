"""StrategyTrainer, StrategyTrainerMixin and StrategyCallback against plain Trainer, bit for bit."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import TokenDataset, losses, make_training_args, snapshot
from tiny_models import tiny_model
from transformers import Trainer, TrainerCallback

from hf_llama_strategies import (
    PLAN_FILE_NAME,
    InvalidArgumentError,
    PlanError,
    StrategyArguments,
    StrategyCallback,
    StrategyPlan,
    StrategyTrainer,
    UnknownArchitectureError,
)


def freeze_by_hand(model: torch.nn.Module, trainable_prefixes: tuple[str, ...]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(trainable_prefixes))


LAST_TWO = ("model.layers.1.", "model.layers.2.", "model.norm.", "lm_head.")


def test_last_two_layers_equals_plain_trainer_frozen_by_hand(tmp_path, lm_dataset):
    ours = tiny_model("llama").train()
    before = snapshot(ours)
    trainer = StrategyTrainer(
        model=ours,
        args=make_training_args(tmp_path / "ours"),
        train_dataset=lm_dataset,
        strategy_args=StrategyArguments(trainable_layers="-2:"),
    )
    trainer.train()

    theirs = tiny_model("llama").train()
    freeze_by_hand(theirs, LAST_TWO)
    plain = Trainer(model=theirs, args=make_training_args(tmp_path / "plain"), train_dataset=lm_dataset)
    plain.train()

    assert losses(trainer) == losses(plain)
    assert len(losses(trainer)) == 6
    after = snapshot(ours)
    assert after == snapshot(theirs)
    for name in before:
        if name.startswith(LAST_TWO):
            assert after[name] != before[name], f"{name} should have trained"
        else:
            assert after[name] == before[name], f"{name} is frozen and must be byte-equal"


def test_full_fine_tuning_is_bit_identical_to_plain_trainer(tmp_path, lm_dataset):
    ours = tiny_model("llama").train()
    trainer = StrategyTrainer(model=ours, args=make_training_args(tmp_path / "a"), train_dataset=lm_dataset)
    trainer.train()
    theirs = tiny_model("llama").train()
    plain = Trainer(model=theirs, args=make_training_args(tmp_path / "b"), train_dataset=lm_dataset)
    plain.train()
    assert losses(trainer) == losses(plain)
    assert snapshot(ours) == snapshot(theirs)
    assert [len(g["params"]) for g in trainer.optimizer.param_groups] == [
        len(g["params"]) for g in plain.optimizer.param_groups
    ]


def test_callback_on_plain_trainer_equals_strategy_trainer(tmp_path, lm_dataset):
    strategy = StrategyArguments(trainable_layers="-2:", trainable_modules="mlp", train_norm=False)
    a = tiny_model("llama").train()
    trainer = StrategyTrainer(
        model=a, args=make_training_args(tmp_path / "a"), train_dataset=lm_dataset, strategy_args=strategy
    )
    trainer.train()
    b = tiny_model("llama").train()
    callback = StrategyCallback(strategy)
    plain = Trainer(model=b, args=make_training_args(tmp_path / "b"), train_dataset=lm_dataset, callbacks=[callback])
    plain.train()
    assert losses(trainer) == losses(plain)
    assert snapshot(a) == snapshot(b)
    assert callback.plan.trainable_names() == trainer.strategy_plan.trainable_names()
    trained = {n for n, p in b.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if ".mlp." in n or n.startswith("lm_head.")}
    assert any(n.startswith("model.layers.1.mlp.") for n in trained)


def test_classic_recipe_sequence_classification_head_only(tmp_path, cls_dataset, capsys):
    model = tiny_model("llama", "seq_cls").train()
    before = snapshot(model)
    args = make_training_args(tmp_path, learning_rate=5e-3)
    trainer = StrategyTrainer(
        model=model, args=args, train_dataset=cls_dataset,
        strategy_args=StrategyArguments(trainable_layers="none", train_norm=False),
    )
    assert trainer.strategy_plan.trainable_names() == ["score.weight"]
    trainer.train()
    after = snapshot(model)
    assert [n for n in before if before[n] != after[n]] == ["score.weight"]
    # Only the head is in the optimizer: no state for frozen parameters.
    optimised = [p for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(optimised) == 1 and optimised[0] is model.score.weight
    assert "layers.0-2" in capsys.readouterr().out


def test_plan_saved_in_output_dir_and_every_checkpoint(tmp_path, lm_dataset):
    args = make_training_args(tmp_path, save_strategy="steps", save_steps=3)
    trainer = StrategyTrainer(
        model=tiny_model("llama").train(), args=args, train_dataset=lm_dataset,
        strategy_args=StrategyArguments(trainable_layers="-2:", print_plan=False),
    )
    trainer.train()
    for directory in (tmp_path, tmp_path / "checkpoint-3", tmp_path / "checkpoint-6"):
        saved = StrategyPlan.load(str(directory))
        assert saved.to_dict() == trainer.strategy_plan.to_dict()
    data = json.loads((tmp_path / PLAN_FILE_NAME).read_text())
    assert data["strategy_args"]["trainable_layers"] == "-2:"
    assert {p["name"] for p in data["parameters"] if p["trainable"]} == set(trainer.strategy_plan.trainable_names())


def test_model_init_gets_the_plan(tmp_path, lm_dataset):
    trainer = StrategyTrainer(
        model_init=lambda: tiny_model("llama").train(), args=make_training_args(tmp_path), train_dataset=lm_dataset,
        strategy_args=StrategyArguments(trainable_layers="-1:", print_plan=False),
    )
    trainer.train()
    trained = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trained == {n for n in trained if n.startswith(("model.layers.2.", "model.norm.", "lm_head."))}
    assert len(trained) == 11


@pytest.mark.parametrize(
    "strategy, error, fragment",
    [
        (dict(trainable_layers="5:"), InvalidArgumentError, "it has 3 layers"),
        (dict(trainable_layers="7"), InvalidArgumentError, "out of range"),
        (dict(trainable_layers="all", trainable_modules="attention"), PlanError, "Valid module names: "),
        (dict(trainable_params=["^nothing\\.here"]), PlanError, "matches no parameter"),
    ],
)
def test_bad_strategy_raises_at_construction_and_writes_nothing(tmp_path, lm_dataset, strategy, error, fragment):
    output_dir = tmp_path / "out"
    with pytest.raises(error, match=fragment):
        StrategyTrainer(
            model=tiny_model("llama"), args=make_training_args(output_dir), train_dataset=lm_dataset,
            strategy_args=StrategyArguments(**strategy),
        )
    assert not output_dir.exists()


@pytest.mark.parametrize(
    "strategy", [dict(frozen_params=[".*"]), dict(trainable_layers="none", train_norm=False, train_head=False)]
)
def test_nothing_to_train_is_refused_when_training_starts_and_writes_nothing(tmp_path, lm_dataset, strategy):
    output_dir = tmp_path / "out"
    trainer = StrategyTrainer(
        model=tiny_model("llama"), args=make_training_args(output_dir), train_dataset=lm_dataset,
        eval_dataset=TokenDataset(n=4), strategy_args=StrategyArguments(print_plan=False, **strategy),
    )
    assert "eval_loss" in trainer.evaluate()  # a frozen model evaluates
    with pytest.raises(PlanError, match="Nothing would train"):
        trainer.train()
    assert sorted(os.listdir(output_dir)) == []


def test_module_error_lists_valid_names(lm_dataset, tmp_path):
    with pytest.raises(PlanError) as info:
        StrategyTrainer(
            model=tiny_model("llama"), args=make_training_args(tmp_path / "o"), train_dataset=lm_dataset,
            strategy_args=StrategyArguments(trainable_modules="mlp,attention"),
        )
    message = str(info.value)
    assert "'attention'" in message
    for valid in ("self_attn", "mlp", "q_proj", "input_layernorm"):
        assert valid in message


def test_unknown_architecture_raises_at_construction_for_a_layer_option(tmp_path):
    class Opaque(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(4, 4)
            self.b = torch.nn.Linear(4, 2)

        def forward(self, x, labels=None):
            return {"loss": self.b(self.a(x)).sum()}

    with pytest.raises(
        UnknownArchitectureError, match="trainable_layers='-1:' needs the decoder layers.*hfls_model_anatomy"
    ):
        StrategyTrainer(model=Opaque(), args=make_training_args(tmp_path / "o"),
                        strategy_args=StrategyArguments(trainable_layers="-1:"))
    assert not (tmp_path / "o").exists()


def test_every_trainer_argument_still_works(tmp_path, lm_dataset):
    eval_set = TokenDataset(n=8, seed=1)
    seen = []

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    trainer = StrategyTrainer(
        tiny_model("llama").train(),
        make_training_args(tmp_path, eval_strategy="steps", eval_steps=3),
        train_dataset=lm_dataset,
        eval_dataset=eval_set,
        callbacks=[Recorder()],
        compute_metrics=None,
        strategy_args=StrategyArguments(trainable_layers="-1:", print_plan=False),
    )
    trainer.train()
    assert seen == [1, 2, 3, 4, 5, 6]
    assert sum("eval_loss" in h for h in trainer.state.log_history) == 2
    assert os.path.exists(tmp_path / PLAN_FILE_NAME)


def test_a_callback_reused_with_other_arguments_plans_again(tmp_path, lm_dataset):
    callback = StrategyCallback(StrategyArguments(layer_lr_decay=0.5, print_plan=False))
    model = tiny_model("llama").train()
    first = Trainer(model=model, args=make_training_args(tmp_path / "a", learning_rate=1e-3),
                    train_dataset=lm_dataset, callbacks=[callback])
    assert callback.plan["lm_head.weight"].lr == 1e-3
    second = Trainer(model=model, args=make_training_args(tmp_path / "b", learning_rate=0.1),
                     train_dataset=lm_dataset, callbacks=[callback])
    assert callback.plan["lm_head.weight"].lr == 0.1
    assert callback.plan["model.layers.0.mlp.up_proj.weight"].lr == pytest.approx(0.1 * 0.5**2)
    del first, second
