"""With no option set, StrategyTrainer is transformers.Trainer; each difference is asked for by an option.

Every test here compares against a plain ``Trainer`` run (or what it does) on CPU, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
from helpers import (
    TokenDataset,
    callback_types,
    described,
    files,
    losses,
    make_training_args,
    snapshot,
    strategy,
)
from tiny_models import tiny_model
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Trainer, TrainingArguments

from hf_llama_strategies import (
    PLAN_FILE_NAME,
    PlanError,
    StrategyArguments,
    StrategyCallback,
    StrategyTrainer,
    UnknownArchitectureError,
    build_plan,
)

# -- models without a layer stack, as transformers' own Trainer tests use -------------------


class RegressionData(torch.utils.data.Dataset):
    def __init__(self, n: int = 24, width: int = 1, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, width, generator=g)
        self.y = 2 * self.x.sum(-1) + 3 + 0.1 * torch.randn(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_x": self.x[i], "labels": self.y[i]}


class Regression(nn.Module):
    """y = a * x + b: two scalar parameters, both taking weight decay."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.0))
        self.b = nn.Parameter(torch.tensor(0.0))

    def forward(self, input_x, labels=None):
        y = input_x.squeeze(-1) * self.a + self.b
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


class SequentialNet(nn.Sequential):
    """An nn.Sequential (Linear, ReLU, Linear): no ModuleList of blocks."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, input_x, labels=None):  # type: ignore[override]
        y = super().forward(input_x).squeeze(-1)
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


class TinyRegressionConfig(PretrainedConfig):
    model_type = "hfls-tiny-regression"

    def __init__(self, width: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.width = width


class TinyRegressionModel(PreTrainedModel):
    """A custom PreTrainedModel: an input projection, a norm and an output, no layer list."""

    config_class = TinyRegressionConfig

    def __init__(self, config: TinyRegressionConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(config.width, 8)
        self.norm = nn.LayerNorm(8)
        self.out = nn.Linear(8, 1)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # keep torch's seeded initialisation

    def forward(self, input_x, labels=None):
        y = self.out(self.norm(self.proj(input_x))).squeeze(-1)
        return (nn.functional.mse_loss(y, labels), y) if labels is not None else (y,)


def regression() -> nn.Module:
    return Regression()


def sequential() -> nn.Module:
    return SequentialNet()


def custom_pretrained() -> nn.Module:
    torch.manual_seed(0)
    return TinyRegressionModel(TinyRegressionConfig())


NO_LAYER_STACK = {"regression": regression, "sequential": sequential, "custom_pretrained": custom_pretrained}
LM = {"llama": lambda: tiny_model("llama").train(), "gpt2": lambda: tiny_model("gpt2").train()}


def dataset_for(name: str) -> torch.utils.data.Dataset:
    if name in LM:
        return TokenDataset(n=16)
    return RegressionData(width=1 if name == "regression" else 4)


# -- the rule: no option, no difference -----------------------------------------------------


@pytest.mark.parametrize("name", [*NO_LAYER_STACK, *LM])
def test_no_option_is_trainer_bit_for_bit(tmp_path, name):
    """Losses, weights, files of output_dir and every checkpoint, callbacks, optimizer groups, args."""
    make = {**NO_LAYER_STACK, **LM}[name]
    data = dataset_for(name)
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-2)

    ours_model = make()
    ours_args = make_training_args(tmp_path / "ours", **overrides)
    ours = StrategyTrainer(model=ours_model, args=ours_args, train_dataset=data, strategy_args=StrategyArguments())
    plain_model = make()
    plain = Trainer(model=plain_model, args=make_training_args(tmp_path / "plain", **overrides), train_dataset=data)

    assert ours.args is ours_args
    assert callback_types(ours) == callback_types(plain)
    assert not any(isinstance(c, StrategyCallback) for c in ours.callback_handler.callbacks)
    ours.train()
    plain.train()
    ours.save_model()
    plain.save_model()

    assert losses(ours) == losses(plain) and len(losses(ours)) == 4
    assert snapshot(ours_model) == snapshot(plain_model)
    assert described(ours.optimizer, ours_model) == described(plain.optimizer, plain_model)
    assert files(tmp_path / "ours") == files(tmp_path / "plain")
    assert "checkpoint-2/trainer_state.json" in files(tmp_path / "ours")
    assert not any(f.endswith(PLAN_FILE_NAME) for f in files(tmp_path / "ours"))
    weights = "model.safetensors"
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        assert (tmp_path / "ours" / sub / weights).read_bytes() == (tmp_path / "plain" / sub / weights).read_bytes()


def test_default_args_give_trainers_two_weight_decay_groups(tmp_path):
    """Every parameter takes weight decay: the Trainer still makes two groups (the second empty)."""
    ours = StrategyTrainer(model=Regression(), args=make_training_args(tmp_path / "a"), train_dataset=RegressionData())
    plain = Trainer(model=Regression(), args=make_training_args(tmp_path / "b"), train_dataset=RegressionData())
    ours.create_optimizer()
    plain.create_optimizer()
    assert [len(g["params"]) for g in ours.optimizer.param_groups] == [2, 0]
    assert [len(g["params"]) for g in plain.optimizer.param_groups] == [2, 0]
    assert ours.optimizer.param_groups[0].keys() == plain.optimizer.param_groups[0].keys()


@pytest.mark.parametrize("options", [{}, {"precision": "fp32"}, {"lr_rules": ["^lm_head=x2"]}])
def test_optimizer_follows_requires_grad_at_creation(tmp_path, lm_dataset, options):
    """Frozen by hand after construction: not optimised; unfrozen by hand before train(): optimised.

    Also with options that decide nothing about these parameters (precision, a rate rule).
    """
    model = tiny_model("llama").train()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # frozen before construction...
    trainer = StrategyTrainer(
        model=model, args=make_training_args(tmp_path, max_steps=2), train_dataset=lm_dataset,
        strategy_args=strategy(**options),
    )
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # ...unfrozen by hand before train()
    model.model.layers[1].mlp.down_proj.weight.requires_grad_(False)  # frozen by hand after construction
    before = snapshot(model)
    trainer.train()
    after = snapshot(model)
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert id(model.model.layers[0].mlp.up_proj.weight) in optimised
    assert id(model.model.layers[1].mlp.down_proj.weight) not in optimised
    assert after["model.layers.0.mlp.up_proj.weight"] != before["model.layers.0.mlp.up_proj.weight"]
    assert after["model.layers.1.mlp.down_proj.weight"] == before["model.layers.1.mlp.down_proj.weight"]
    assert len(optimised) == len([p for p in model.parameters() if p.requires_grad])


def test_parameters_an_option_decided_stay_as_the_plan_says(tmp_path, lm_dataset):
    """A parameter the plan froze by an option and unfrozen by hand is frozen again (the plan decides)."""
    model = tiny_model("llama").train()
    trainer = StrategyTrainer(
        model=model, args=make_training_args(tmp_path, max_steps=2), train_dataset=lm_dataset,
        strategy_args=strategy(trainable_layers="-1:"),
    )
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    before = snapshot(model)
    trainer.train()
    assert snapshot(model)["model.layers.0.mlp.up_proj.weight"] == before["model.layers.0.mlp.up_proj.weight"]
    assert not model.model.layers[0].mlp.up_proj.weight.requires_grad


class SGDTrainer(StrategyTrainer):
    @staticmethod
    def get_optimizer_cls_and_kwargs(args: TrainingArguments, model=None):
        return torch.optim.SGD, {"lr": args.learning_rate, "momentum": 0.5}


@pytest.mark.parametrize("options", [{}, {"head_lr": 5e-2}])
def test_subclass_get_optimizer_cls_and_kwargs_is_honoured(tmp_path, lm_dataset, options):
    trainer = SGDTrainer(
        model=tiny_model("llama"), args=make_training_args(tmp_path), train_dataset=lm_dataset,
        strategy_args=strategy(**options),
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD
    assert {g["momentum"] for g in optimizer.param_groups} == {0.5}
    if options:
        assert {g["lr"] for g in optimizer.param_groups if g["name"] == "head"} == {5e-2}


# -- precision: left alone unless asked; when asked, the user's objects say so ---------------


def test_bf16_model_is_not_recast_and_args_untouched(tmp_path, lm_dataset):
    ours_model = tiny_model("llama").to(torch.bfloat16).train()
    args = make_training_args(tmp_path / "ours", max_steps=3)
    flags = (args.bf16, args.fp16, args.use_cpu, args.mixed_precision)
    ours = StrategyTrainer(model=ours_model, args=args, train_dataset=lm_dataset)
    assert ours.args is args and (args.bf16, args.fp16, args.use_cpu, args.mixed_precision) == flags
    assert {p.dtype for p in ours_model.parameters()} == {torch.bfloat16}
    ours.train()
    plain_model = tiny_model("llama").to(torch.bfloat16).train()
    plain = Trainer(model=plain_model, args=make_training_args(tmp_path / "plain", max_steps=3),
                    train_dataset=lm_dataset)
    plain.train()
    assert losses(ours) == losses(plain)
    assert snapshot(ours_model) == snapshot(plain_model)
    assert {p.dtype for p in ours_model.parameters()} == {torch.bfloat16}


def test_precision_option_updates_the_users_arguments(tmp_path, lm_dataset):
    """precision: bf16 on a CPU: the very object passed in says bf16 (and use_cpu), as the run trains."""
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", max_steps=1, disable_tqdm=True)
    assert not args.bf16
    trainer = StrategyTrainer(model=tiny_model("llama"), args=args, train_dataset=lm_dataset,
                              strategy_args=strategy(precision="bf16"))
    assert trainer.args is args
    assert args.bf16 and args.use_cpu and args.mixed_precision == "bf16"
    assert trainer.accelerator.mixed_precision == "bf16"


def test_partially_frozen_bf16_model_saves_one_dtype(tmp_path, lm_dataset):
    """Trainable fp32 masters beside bf16 frozen weights: the final model is bf16, config.json agrees."""
    model = tiny_model("llama").to(torch.bfloat16).train()
    trainer = StrategyTrainer(
        model=model, args=make_training_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=lm_dataset, strategy_args=strategy(trainable_layers="-1:", precision="bf16"),
    )
    assert model.model.layers[2].mlp.up_proj.weight.dtype == torch.float32  # fp32 master weights
    trainer.train()
    final = tmp_path / "final"
    trainer.save_model(str(final))

    saved = safetensors.torch.load_file(str(final / "model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    trained = model.model.layers[2].mlp.up_proj.weight
    assert torch.equal(saved["model.layers.2.mlp.up_proj.weight"], trained.detach().to(torch.bfloat16))
    assert trained.dtype == torch.float32  # the in-memory model is untouched
    # The checkpoint keeps the fp32 master weights, for an exact resume.
    checkpoint = safetensors.torch.load_file(str(tmp_path / "checkpoint-2" / "model.safetensors"))
    assert checkpoint["model.layers.2.mlp.up_proj.weight"].dtype == torch.float32
    assert torch.equal(checkpoint["model.layers.2.mlp.up_proj.weight"], trained.detach())


# -- frozen models: evaluation and prediction are fine, training is refused ------------------


@pytest.mark.parametrize("options", [{}, {"precision": "fp32"}])
def test_all_frozen_model_evaluates_and_predicts(tmp_path, options):
    data = RegressionData(width=4)
    ours_model = custom_pretrained().requires_grad_(False)
    ours = StrategyTrainer(model=ours_model, args=make_training_args(tmp_path / "ours"), eval_dataset=data,
                           strategy_args=strategy(**options))
    plain = Trainer(model=custom_pretrained().requires_grad_(False), args=make_training_args(tmp_path / "plain"),
                    eval_dataset=data)
    ours_metrics, plain_metrics = ours.evaluate(), plain.evaluate()
    assert ours_metrics["eval_loss"] == plain_metrics["eval_loss"]
    ours_predictions, plain_predictions = ours.predict(data).predictions, plain.predict(data).predictions
    assert torch.equal(torch.as_tensor(ours_predictions), torch.as_tensor(plain_predictions))


def test_training_a_frozen_model_is_refused_before_anything_is_written(tmp_path):
    data = RegressionData(width=4)
    output_dir = tmp_path / "out"
    trainer = StrategyTrainer(model=custom_pretrained().requires_grad_(False), args=make_training_args(output_dir),
                              train_dataset=data, strategy_args=strategy(precision="fp32"))
    with pytest.raises(PlanError, match="Nothing would train.*requires_grad"):
        trainer.train()
    assert files(output_dir) == []


# -- anatomy only where an option needs it ---------------------------------------------------


@pytest.mark.parametrize("name", list(NO_LAYER_STACK))
def test_regex_options_work_on_any_model(tmp_path, name):
    """frozen_params on a model without layer stack equals freezing by hand in a plain Trainer."""
    make = NO_LAYER_STACK[name]
    data = dataset_for(name)
    ours_model = make()
    first = next(n for n, _ in ours_model.named_parameters())
    ours = StrategyTrainer(model=ours_model, args=make_training_args(tmp_path / "a", learning_rate=1e-2),
                           train_dataset=data, strategy_args=strategy(frozen_params=[f"^{first}$"]))
    ours.train()
    plain_model = make()
    plain_model.get_parameter(first).requires_grad_(False)
    plain = Trainer(model=plain_model, args=make_training_args(tmp_path / "b", learning_rate=1e-2),
                    train_dataset=data)
    plain.train()
    assert losses(ours) == losses(plain)
    assert snapshot(ours_model) == snapshot(plain_model)
    assert (tmp_path / "a" / PLAN_FILE_NAME).is_file()


@pytest.mark.parametrize(
    "options, option",
    [
        (dict(trainable_layers="-1:"), "trainable_layers"),
        (dict(train_head=False), "train_head"),
        (dict(head_lr=1e-3), "head_lr"),
        (dict(layer_lr_decay=0.9), "layer_lr_decay"),
        (dict(lisa_layers=1), "lisa_layers"),
    ],
)
def test_options_that_need_layers_are_refused_without_an_anatomy(tmp_path, options, option):
    output_dir = tmp_path / "out"
    with pytest.raises(UnknownArchitectureError) as info:
        StrategyTrainer(model=sequential(), args=make_training_args(output_dir), train_dataset=RegressionData(width=4),
                        strategy_args=strategy(**options))
    message = str(info.value)
    assert message.startswith(f"{option}=") and "SequentialNet" in message and "hfls_model_anatomy" in message
    assert "trainable_params, frozen_params, lr_rules" in message
    assert not output_dir.exists()


def test_plan_of_a_model_without_layers(tmp_path):
    plan = build_plan(custom_pretrained(), strategy(lr_rules=["^out\\.=x2"]))
    assert plan.num_layers == 0 and {d.kind for d in plan} == {"other"}
    assert plan["out.weight"].lr_scale == 2.0 and plan["proj.weight"].lr_scale is None


def test_cli_keeps_choosing_precision_auto(tmp_path):
    from hf_llama_strategies.cli.config import parse_config
    from hf_llama_strategies.cli.demo import DEMO_DIR

    config = {"model_config": DEMO_DIR, "output_dir": str(tmp_path)}
    assert parse_config(config)[3].precision == "auto"
    assert parse_config({**config, "precision": "bf16"})[3].precision == "bf16"
    assert StrategyArguments().precision is None


def test_options_set_names_what_asks_for_something():
    assert StrategyArguments().options_set() == []
    # Spellings of the defaults, and options that only refine others, ask for nothing.
    quiet = StrategyArguments(trainable_layers="ALL", unfreeze_schedule="none", print_plan=False,
                              allow_plan_change_on_resume=True, lisa_drop_optimizer_state=False)
    assert quiet.options_set() == []
    assert StrategyArguments(precision="auto", lr_rules=["mlp=x2"]).options_set() == ["lr_rules", "precision"]
    assert StrategyArguments(strategy_options={"freeze_bias": True}).options_set() == ["strategy_options"]
