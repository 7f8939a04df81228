"""StrategyArguments: HfArgumentParser integration and validation of every field."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_llama_strategies import InvalidArgumentError, StrategyArguments


def test_no_field_collides_with_training_arguments():
    ours = {f.name for f in dataclasses.fields(StrategyArguments)}
    theirs = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert ours and not ours & theirs


def test_every_field_has_help():
    for f in dataclasses.fields(StrategyArguments):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_parsed_beside_training_arguments_from_cli(tmp_path):
    parser = HfArgumentParser((TrainingArguments, StrategyArguments))
    training, strategy = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path),
            "--trainable_layers=-2:",  # argparse needs "=" before a value that starts with "-"
            "--trainable_modules", "mlp,self_attn",
            "--train_embeddings", "false",
            "--trainable_params", r"lm_head\..*", "score",
            "--strategy_options", '{"my_plugin": {"k": 1}}',
        ]
    )
    assert training.output_dir == str(tmp_path)
    assert strategy.trainable_layers == "-2:"
    assert strategy.trainable_modules == "mlp,self_attn"
    assert strategy.train_embeddings is False
    assert strategy.train_head is None
    assert strategy.trainable_params == [r"lm_head\..*", "score"]
    assert strategy.strategy_options == {"my_plugin": {"k": 1}}


def test_parsed_from_flat_dict():
    parser = HfArgumentParser((TrainingArguments, StrategyArguments))
    training, strategy = parser.parse_dict(
        {"output_dir": "x", "learning_rate": 1e-5, "trainable_layers": ":4", "frozen_params": "bias$"}
    )
    assert training.learning_rate == 1e-5 and strategy.trainable_layers == ":4"
    assert strategy.frozen_params == ["bias$"]


def test_trainable_modules_all_means_unset():
    assert StrategyArguments(trainable_modules="all").trainable_modules is None
    assert StrategyArguments(trainable_modules=["mlp", "self_attn"]).trainable_modules == "mlp,self_attn"
    assert StrategyArguments(trainable_modules=" mlp , q_proj ").trainable_modules == "mlp,q_proj"


@pytest.mark.parametrize(
    "kwargs, option, fragment",
    [
        (dict(trainable_layers="2-4"), "trainable_layers", "comma list of layer indices"),
        (dict(trainable_layers=2), "trainable_layers", "'-2:' for the last 2 layers"),
        (dict(trainable_layers="::0"), "trainable_layers", "step cannot be zero"),
        (dict(trainable_modules="mlp,,attn"), "trainable_modules", "comma list of module names"),
        (dict(trainable_modules="mlp;attn"), "trainable_modules", "comma list of module names"),
        (dict(train_head="yes"), "train_head", "true, false"),
        (dict(trainable_params=["("]), "trainable_params", "valid Python regular expression"),
        (dict(frozen_params=["a", "a"]), "frozen_params", "without repeated"),
        (dict(frozen_params=[""]), "frozen_params", "non-empty"),
        (dict(strategy_options="{not json"), "strategy_options", "JSON object"),
        (dict(strategy_options="[1]"), "strategy_options", "JSON object"),
        (dict(trainable_layers="none", trainable_modules="mlp"), "trainable_modules", "no layer is selected"),
        (dict(print_plan="no"), "print_plan", "true or false"),
    ],
)
def test_bad_values_name_the_option_the_value_and_what_is_valid(kwargs, option, fragment):
    with pytest.raises(InvalidArgumentError) as info:
        StrategyArguments(**kwargs)
    assert info.value.option == option
    message = str(info.value)
    assert message.startswith(f"{option}=")
    assert fragment in message
