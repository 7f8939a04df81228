"""Layer-wise learning rates: the plan's rates, the optimizer's groups, schedules and logs.

Equivalence tests compare against optimizers built by hand, group by group, and plain
``Trainer`` runs given those optimizers through ``optimizers=``: losses and weights must
be bit-identical.
"""

from __future__ import annotations

import glob
import json
import types

import pytest
import torch
from helpers import TokenDataset, described, losses, make_training_args, snapshot, strategy
from tiny_models import tiny_model
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.optimization import Adafactor

from hf_llama_strategies import (
    InvalidArgumentError,
    PlanError,
    StrategyArguments,
    StrategyCallback,
    StrategyPlan,
    StrategyTrainer,
    build_plan,
)
from hf_llama_strategies.training.optimizer import build_param_groups, decay_parameter_names

BASE = 1e-3
WD = 0.01


def split_decay(entries: list[tuple[str, float, list[str]]]) -> list[tuple]:
    """Hand-built layout: each (group, lr, names) as NAME (decaying) then NAME.no_decay (norms; Llama has no bias)."""
    out = []
    for group, lr, names in entries:
        decaying = [n for n in names if "norm" not in n]
        rest = [n for n in names if "norm" in n]
        if decaying:
            out.append((group, lr, WD, decaying))
        if rest:
            out.append((group + ".no_decay", lr, 0.0, rest))
    return out


def hand_optimizer(model: torch.nn.Module, expected: list[tuple], cls=torch.optim.AdamW, **kwargs):
    params = dict(model.named_parameters())
    groups = [{"params": [params[n] for n in names], "lr": lr, "weight_decay": wd} for _, lr, wd, names in expected]
    return cls(groups, **kwargs)


ADAMW = dict(lr=BASE, betas=(0.9, 0.999), eps=1e-8)
# transformers 5's default `optim` is adamw_torch_fused.
FUSED_ADAMW = {**ADAMW, "fused": True}


def names_of(model: torch.nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()]


def layer(i: int, names: list[str]) -> list[str]:
    return [n for n in names if n.startswith(f"model.layers.{i}.")]


# -- the hand-built layouts, one per kind of option, for tiny Llama (3 layers) -------------

EMB, HEAD_W, NORM_W = "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"


def expected_head_lr(names):
    return split_decay([("default", BASE, [n for n in names if n != HEAD_W]), ("head", 5e-3, [HEAD_W])])


def expected_embedding_lr(names):
    return split_decay([("embeddings", 2e-4, [EMB]), ("default", BASE, [n for n in names if n != EMB])])


def expected_layer_decay(names):
    return split_decay(
        [("embeddings", BASE * 0.9**3, [EMB])]
        + [(f"layers.{i}", BASE * 0.9 ** (2 - i), layer(i, names)) for i in range(3)]
        + [("norm", BASE, [NORM_W]), ("head", BASE, [HEAD_W])]
    )


def expected_absolute_rule(names):
    attn = [n for n in names if ".self_attn." in n]
    return split_decay([("default", BASE, [n for n in names if n not in attn]), ("rule:self_attn", 2e-3, attn)])


def expected_relative_rule(names):
    mlp = [n for n in names if ".mlp." in n]
    return split_decay([("default", BASE, [n for n in names if n not in mlp]), ("rule:mlp", BASE * 0.5, mlp)])


def expected_everything(names):
    attn = [n for n in names if ".self_attn." in n]
    top_mlp = [n for n in layer(2, names) if ".mlp." in n]
    return split_decay(
        [
            ("embeddings", 1e-4, [EMB]),
            ("rule:self_attn", 2e-3, attn),
            ("layers.0", BASE * 0.8**2, [n for n in layer(0, names) if n not in attn]),
            ("layers.1", BASE * 0.8**1, [n for n in layer(1, names) if n not in attn]),
            (r"rule:layers\.2\.mlp", BASE * 3, top_mlp),
            ("layers.2", BASE * 0.8**0, [n for n in layer(2, names) if n not in attn + top_mlp]),
            ("norm", BASE, [NORM_W]),
            ("head", 4e-3, [HEAD_W]),
        ]
    )


CASES = {
    "head_lr": (dict(head_lr=5e-3), expected_head_lr),
    "embedding_lr": (dict(embedding_lr=2e-4), expected_embedding_lr),
    "layer_lr_decay": (dict(layer_lr_decay=0.9), expected_layer_decay),
    "absolute_rule": (dict(lr_rules=["self_attn=2e-3"]), expected_absolute_rule),
    "relative_rule": (dict(lr_rules=["mlp=x0.5"]), expected_relative_rule),
    "everything": (
        dict(layer_lr_decay=0.8, embedding_lr=1e-4, head_lr=4e-3, lr_rules=["self_attn=2e-3", r"layers\.2\.mlp=x3"]),
        expected_everything,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_groups_equal_hand_built_list(tmp_path, case):
    options, expected = CASES[case]
    model = tiny_model("llama")
    trainer = StrategyTrainer(model=model, args=make_training_args(tmp_path), strategy_args=strategy(**options))
    optimizer = trainer.create_optimizer()
    assert described(optimizer, model) == expected(names_of(model))
    # Every trainable parameter exactly once.
    assert sorted(n for g in described(optimizer, model) for n in g[3]) == sorted(names_of(model))


# "everything" trains in test_every_optim_value_gets_the_groups[adamw_torch_fused] (the default optim).
@pytest.mark.parametrize("case", [c for c in CASES if c != "everything"])
def test_training_is_bit_identical_to_plain_trainer_with_hand_built_optimizer(tmp_path, lm_dataset, case):
    options, expected = CASES[case]
    ours = tiny_model("llama").train()
    trainer = StrategyTrainer(
        model=ours, args=make_training_args(tmp_path / "a", max_steps=4), train_dataset=lm_dataset,
        strategy_args=strategy(**options),
    )
    trainer.train()
    theirs = tiny_model("llama").train()
    optimizer = hand_optimizer(theirs, expected(names_of(theirs)), **FUSED_ADAMW)
    plain = Trainer(
        model=theirs, args=make_training_args(tmp_path / "b", max_steps=4), train_dataset=lm_dataset,
        optimizers=(optimizer, None),
    )
    plain.train()
    assert len(losses(trainer)) == 4
    assert losses(trainer) == losses(plain)
    assert snapshot(ours) == snapshot(theirs)


@pytest.mark.parametrize("head", ["seq_cls", "causal_lm"])
def test_classic_recipe_body_1e5_head_5e5_as_configuration(tmp_path, head):
    dataset = TokenDataset(num_labels=3) if head == "seq_cls" else TokenDataset()
    parser = HfArgumentParser((TrainingArguments, StrategyArguments))
    config = dict(
        output_dir=str(tmp_path / "a"), learning_rate=1e-5, head_lr=5e-5, use_cpu=True, report_to="none",
        max_steps=4, per_device_train_batch_size=4, weight_decay=WD, logging_steps=1, save_strategy="no",
        seed=0, print_plan=False,
    )
    training_args, strategy_args = parser.parse_dict(config)
    ours = tiny_model("llama", head).train()
    trainer = StrategyTrainer(model=ours, args=training_args, train_dataset=dataset, strategy_args=strategy_args)
    head_name = "score.weight" if head == "seq_cls" else HEAD_W
    names = names_of(ours)
    expected = split_decay([("default", 1e-5, [n for n in names if n != head_name]), ("head", 5e-5, [head_name])])
    assert described(trainer.create_optimizer(), ours) == expected
    assert trainer.strategy_plan[head_name].lr == 5e-5 and trainer.strategy_plan[head_name].lr_reason == "head_lr=5e-05"
    trainer.train()

    theirs = tiny_model("llama", head).train()
    plain_args, _ = parser.parse_dict({**config, "output_dir": str(tmp_path / "b")})
    plain = Trainer(
        model=theirs, args=plain_args, train_dataset=dataset,
        optimizers=(hand_optimizer(theirs, expected, **{**FUSED_ADAMW, "lr": 1e-5}), None),
    )
    plain.train()
    assert losses(trainer) == losses(plain)
    assert snapshot(ours) == snapshot(theirs)


# -- optimizer classes -------------------------------------------------------------------

OPTIMS = {
    "adamw_torch": (torch.optim.AdamW, ADAMW),
    "adamw_torch_fused": (torch.optim.AdamW, FUSED_ADAMW),
    "adafactor": (Adafactor, dict(lr=BASE, scale_parameter=False, relative_step=False)),
    "sgd": (torch.optim.SGD, dict(lr=BASE)),
}


@pytest.mark.parametrize("optim", list(OPTIMS))
def test_every_optim_value_gets_the_groups(tmp_path, lm_dataset, optim):
    cls, kwargs = OPTIMS[optim]
    options, expected = CASES["everything"]
    ours = tiny_model("llama").train()
    trainer = StrategyTrainer(
        model=ours, args=make_training_args(tmp_path / "a", optim=optim, max_steps=3), train_dataset=lm_dataset,
        strategy_args=strategy(**options),
    )
    trainer.train()
    assert type(trainer.optimizer.optimizer) is cls  # Accelerate wraps it
    assert described(trainer.optimizer, ours)[0][0] == "embeddings"
    if optim == "adamw_torch_fused":
        assert all(g["fused"] for g in trainer.optimizer.param_groups)

    theirs = tiny_model("llama").train()
    plain = Trainer(
        model=theirs, args=make_training_args(tmp_path / "b", optim=optim, max_steps=3), train_dataset=lm_dataset,
        optimizers=(hand_optimizer(theirs, expected(names_of(theirs)), cls, **kwargs), None),
    )
    plain.train()
    assert losses(trainer) == losses(plain)
    assert snapshot(ours) == snapshot(theirs)


def test_users_optimizer_cls_and_kwargs_wins_for_the_class(tmp_path, lm_dataset):
    model = tiny_model("llama").train()
    trainer = StrategyTrainer(
        model=model, args=make_training_args(tmp_path, max_steps=2), train_dataset=lm_dataset,
        strategy_args=strategy(head_lr=5e-3), optimizer_cls_and_kwargs=(torch.optim.SGD, {"lr": BASE, "momentum": 0.9}),
    )
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert type(optimizer) is torch.optim.SGD
    assert [(g["name"], g["momentum"]) for g in optimizer.param_groups] == [
        ("default", 0.9), ("default.no_decay", 0.9), ("head", 0.9)
    ]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [BASE, BASE, 5e-3]


def test_optimizer_with_its_own_layout_is_refused_when_the_plan_has_groups(tmp_path):
    def factory():
        return lambda model, **kwargs: torch.optim.SGD(model.parameters(), lr=BASE)

    trainer = StrategyTrainer(
        model=tiny_model("llama"), args=make_training_args(tmp_path), strategy_args=strategy(head_lr=5e-3),
        optimizer_cls_and_kwargs=(factory, {}),
    )
    with pytest.raises(PlanError, match="lays out its own parameter groups"):
        trainer.create_optimizer()
    # With the default layout the factory is the Trainer's business.
    trainer = StrategyTrainer(
        model=tiny_model("llama"), args=make_training_args(tmp_path), strategy_args=strategy(),
        optimizer_cls_and_kwargs=(factory, {}),
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is torch.optim.SGD and "name" not in optimizer.param_groups[0]


def test_group_layout_is_deterministic_and_resumes_from_a_checkpoint(tmp_path, lm_dataset):
    options, _ = CASES["everything"]
    layouts = []
    for run in ("x", "y"):
        model = tiny_model("llama")
        trainer = StrategyTrainer(
            model=model, args=make_training_args(tmp_path / run), strategy_args=strategy(**options)
        )
        layouts.append(described(trainer.create_optimizer(), model))
    assert layouts[0] == layouts[1]

    def run(output_dir, resume=None):
        trainer = StrategyTrainer(
            model=tiny_model("llama").train(),
            args=make_training_args(output_dir, save_strategy="steps", save_steps=3),
            train_dataset=lm_dataset, strategy_args=strategy(**options),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert losses(resumed)[-3:] == losses(whole)[-3:]
    assert snapshot(resumed.model) == snapshot(whole.model)


# -- an unmodified Trainer ---------------------------------------------------------------


def test_unmodified_trainer_gets_the_same_groups_through_the_optimizer_factory(tmp_path, lm_dataset):
    options, expected = CASES["everything"]
    a = tiny_model("llama").train()
    trainer = StrategyTrainer(
        model=a, args=make_training_args(tmp_path / "a", max_steps=4), train_dataset=lm_dataset,
        strategy_args=strategy(trainable_layers="1:", train_embeddings=True, **options),
    )
    trainer.train()
    b = tiny_model("llama").train()
    callback = StrategyCallback(strategy(trainable_layers="1:", train_embeddings=True, **options))
    plain = Trainer(
        model=b, args=make_training_args(tmp_path / "b", max_steps=4), train_dataset=lm_dataset, callbacks=[callback],
        optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs(),
    )
    plain.train()
    assert described(plain.optimizer, b) == described(trainer.optimizer, a)
    assert "layers.0" not in {g["name"] for g in plain.optimizer.param_groups}  # frozen: not in the optimizer
    assert losses(trainer) == losses(plain)
    assert snapshot(a) == snapshot(b)


def test_unmodified_trainer_without_the_factory_refuses_to_train(tmp_path, lm_dataset):
    callback = StrategyCallback(strategy(head_lr=5e-3))
    plain = Trainer(
        model=tiny_model("llama").train(), args=make_training_args(tmp_path), train_dataset=lm_dataset,
        callbacks=[callback],
    )
    with pytest.raises(PlanError, match=r"optimizer_cls_and_kwargs=callback\.optimizer_cls_and_kwargs\(\)"):
        plain.train()
    assert plain.state.global_step == 0


def test_factory_without_the_callback_in_the_trainer_is_an_error(tmp_path, lm_dataset):
    callback = StrategyCallback(strategy(head_lr=5e-3))
    plain = Trainer(
        model=tiny_model("llama").train(), args=make_training_args(tmp_path), train_dataset=lm_dataset,
        optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs(),
    )
    with pytest.raises(PlanError, match="Pass the same StrategyCallback in `callbacks=`"):
        plain.train()


# -- schedules and logs -------------------------------------------------------------------

SCHEDULES = {
    "linear": {},
    "cosine": {},
    "cosine_with_restarts": {"num_cycles": 2},
    "polynomial": {"power": 2.0},
    "constant": {},
    "constant_with_warmup": {},
    "inverse_sqrt": {},
    "cosine_with_min_lr": {"min_lr": 1e-4},
    "cosine_warmup_with_min_lr": {"min_lr_rate": 0.1},
    "warmup_stable_decay": {"num_decay_steps": 6},
    "reduce_lr_on_plateau": {"patience": 1, "factor": 0.5},
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_keeps_each_groups_ratio_to_the_base_rate(tmp_path, schedule):
    options, _ = CASES["everything"]
    # reduce_lr_on_plateau steps on an eval metric: TrainingArguments wants an eval strategy.
    evaluation = dict(eval_strategy="steps", eval_steps=1) if schedule == "reduce_lr_on_plateau" else {}
    args = make_training_args(
        tmp_path, lr_scheduler_type=schedule, lr_scheduler_kwargs=SCHEDULES[schedule], warmup_steps=4, max_steps=20,
        **evaluation,
    )
    trainer = StrategyTrainer(
        model=tiny_model("llama"), args=args, strategy_args=strategy(**options), eval_dataset=TokenDataset(n=4)
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=20)
    groups = trainer.optimizer.param_groups
    initial = [g.get("initial_lr", g["lr"]) for g in groups]  # ReduceLROnPlateau sets no initial_lr
    head = [g["name"] for g in groups].index("head")
    seen = set()
    for _ in range(20):
        trainer.optimizer.step()
        if schedule == "reduce_lr_on_plateau":
            trainer.lr_scheduler.step(1.0)  # a metric that never improves
        else:
            trainer.lr_scheduler.step()
        rates = [g["lr"] for g in groups]
        seen.add(rates[head])
        for rate, start in zip(rates, initial):
            assert rate == pytest.approx(rates[head] * start / initial[head], rel=1e-12, abs=0.0)
    assert len(seen) > 1 or schedule == "constant"


def test_per_group_learning_rates_reach_tensorboard_and_log_history(tmp_path, lm_dataset):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    options, _ = CASES["everything"]
    steps = 5
    trainer = StrategyTrainer(
        model=tiny_model("llama").train(), args=make_training_args(tmp_path, report_to="tensorboard", max_steps=steps),
        train_dataset=lm_dataset, strategy_args=strategy(**options),
    )
    trainer.train()
    initial = {}
    for g in trainer.optimizer.param_groups:
        initial.setdefault(g["name"].removesuffix(".no_decay"), g["initial_lr"])
    assert list(initial) == [
        "embeddings", "rule:self_attn", "layers.0", "layers.1", r"rule:layers\.2\.mlp", "layers.2", "norm", "head"
    ]
    assert initial["head"] == 4e-3 and initial["layers.0"] == BASE * 0.8**2

    # Linear decay, no warmup: the rate used by step s (logged at step s) is initial * (T - s + 1) / T.
    factor = {s: (steps - s + 1) / steps for s in range(1, steps + 1)}
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logged] == list(range(1, steps + 1))
    for h in logged:
        for name, start in initial.items():
            assert h[f"learning_rate/{name}"] == pytest.approx(start * factor[h["step"]], rel=1e-12)
        # `learning_rate` is the scheduled TrainingArguments.learning_rate, not group 0 (the embeddings).
        assert h["learning_rate"] == pytest.approx(BASE * factor[h["step"]], rel=1e-12)

    event_files = glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)
    assert len(event_files) == 1
    events = EventAccumulator(event_files[0])
    events.Reload()
    curves = sorted(t for t in events.Tags()["scalars"] if t.startswith("train/learning_rate/"))
    assert curves == sorted(f"train/learning_rate/{name}" for name in initial)
    for name, start in initial.items():
        scalars = events.Scalars(f"train/learning_rate/{name}")
        assert [e.step for e in scalars] == list(range(1, steps + 1))
        assert [e.value for e in scalars] == pytest.approx([start * factor[s] for s in range(1, steps + 1)], rel=1e-6)


def test_default_layout_logs_nothing_more_than_the_stock_trainer(tmp_path, lm_dataset):
    trainer = StrategyTrainer(
        model=tiny_model("llama").train(), args=make_training_args(tmp_path, max_steps=2), train_dataset=lm_dataset,
        strategy_args=strategy(trainable_layers="-1:"),
    )
    trainer.train()
    assert not [k for h in trainer.state.log_history for k in h if k.startswith("learning_rate/")]


# -- the plan ---------------------------------------------------------------------------


def test_dry_run_plan_keeps_relative_rates_as_scales():
    model = tiny_model("llama")
    options, _ = CASES["everything"]
    dry = build_plan(model, strategy(**options))
    up = dry["model.layers.0.mlp.up_proj.weight"]
    assert (up.lr, up.lr_scale, up.group) == (None, 0.8**2, "layers.0")
    assert up.lr_reason == "layer_lr_decay=0.8: layer 0 of 3 (x0.8**2)"
    top_mlp = dry["model.layers.2.mlp.up_proj.weight"]
    assert (top_mlp.lr, top_mlp.lr_scale, top_mlp.lr_reason) == (None, 3.0, r"lr_rules[1]='layers\\.2\\.mlp=x3'")
    attn = dry["model.layers.1.self_attn.q_proj.weight"]
    assert (attn.lr, attn.lr_scale, attn.group) == (2e-3, None, "rule:self_attn")
    assert dry[HEAD_W].lr == 4e-3 and dry[EMB].lr == 1e-4
    rows = {line.split()[0]: line for line in dry.table().splitlines()[3:]}
    assert "x0.64" in rows["layers.0"] and "0.002" in rows["layers.0"]
    # Layer 2: norms at x1 (top of the decay), the mlp at x3, attention at 0.002.
    assert "x1..0.002" in rows["layers.2"] and "0.004" in rows["head"]

    resolved = build_plan(model, strategy(**options), make_training_args("unused"))
    assert resolved["model.layers.0.mlp.up_proj.weight"].lr == BASE * 0.8**2
    assert resolved["model.layers.2.mlp.up_proj.weight"].lr == BASE * 3
    rows = {line.split()[0]: line for line in resolved.table().splitlines()[3:]}
    assert rows["layers.0"].split()[3:5] == ["0.00064,", "0.002"]

    # The dry-run plan, resolved at optimizer time, gives the same groups.
    params = list(model.named_parameters())
    decay = decay_parameter_names(model)
    from_dry = build_param_groups(params, dry, decay, WD, base_lr=BASE)
    from_resolved = build_param_groups(params, resolved, decay, WD)
    key = lambda groups: [(g["name"], g.get("lr"), g["weight_decay"], [id(p) for p in g["params"]]) for g in groups]  # noqa: E731
    assert key(from_dry) == key(from_resolved)

    again = StrategyPlan.from_dict(json.loads(json.dumps(dry.to_dict())))
    assert again.to_dict() == dry.to_dict()


def test_table_shows_the_rate_per_layer():
    plan = build_plan(tiny_model("llama"), strategy(layer_lr_decay=0.5), make_training_args("unused"))
    lines = plan.table().splitlines()[3:]
    rows = [line.split() for line in lines if not line.startswith(("-", "precision:", "note:"))]
    assert [(r[0], r[3]) for r in rows] == [
        ("embeddings", "0.000125"), ("layers.0", "0.00025"), ("layers.1", "0.0005"), ("layers.2", "0.001"),
        ("norm", "0.001"), ("head", "0.001"), ("total", "0.000125..0.001"),
    ]


def test_later_rule_wins_and_a_shadowed_rule_is_noted():
    plan = build_plan(tiny_model("llama"), strategy(lr_rules=[r"mlp\.up=x2", "mlp=x3"]))
    up = plan["model.layers.1.mlp.up_proj.weight"]
    assert (up.lr_scale, up.group, up.lr_reason) == (3.0, "rule:mlp", "lr_rules[1]='mlp=x3'")
    assert plan.notes == [
        "lr_rules[0]='mlp\\\\.up=x2' has no effect: later lr_rules override it for every parameter it names."
    ]


def test_rates_for_frozen_parameters_ride_along_and_only_trainable_ones_reach_the_optimizer(tmp_path):
    model = tiny_model("llama")
    trainer = StrategyTrainer(
        model=model,
        args=make_training_args(tmp_path),
        strategy_args=strategy(trainable_layers="-1:", lr_rules=["mlp=x2"]),
    )
    assert trainer.strategy_plan["model.layers.0.mlp.up_proj.weight"].lr == 2 * BASE  # frozen, rate kept
    groups = described(trainer.create_optimizer(), model)
    mlp = [n for n in layer(2, names_of(model)) if ".mlp." in n]
    assert [g for g in groups if g[0] == "rule:mlp"] == [("rule:mlp", 2 * BASE, WD, mlp)]


def test_tied_embeddings_take_the_head_rate_or_the_embeddings_rate():
    plan = build_plan(tiny_model("gemma"), strategy(head_lr=5e-3))
    tied = plan["model.embed_tokens.weight"]
    assert (tied.lr, tied.group, tied.lr_reason) == (5e-3, "head", "head_lr=0.005")
    plan = build_plan(tiny_model("gemma"), strategy(layer_lr_decay=0.5))
    tied = plan["model.embed_tokens.weight"]
    assert (tied.lr_scale, tied.group) == (0.5**3, "embeddings")
    assert len(plan.notes) == 1 and "lm_head.weight" in plan.notes[0] and "head_lr" in plan.notes[0]


def test_hf_argument_parser_reads_the_options_from_the_command_line(tmp_path):
    parser = HfArgumentParser((TrainingArguments, StrategyArguments))
    _, parsed = parser.parse_args_into_dataclasses(
        [
            "--output_dir", str(tmp_path), "--head_lr", "5e-5", "--embedding_lr", "1e-6",
            "--layer_lr_decay", "0.9", "--lr_rules", "self_attn=2e-5", "mlp=x0.5",
        ]
    )
    assert (parsed.head_lr, parsed.embedding_lr, parsed.layer_lr_decay) == (5e-5, 1e-6, 0.9)
    assert parsed.lr_rules == ["self_attn=2e-5", "mlp=x0.5"]


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, fragment",
    [
        (dict(lr_rules=["mlp"]), "lr_rules='mlp' is not valid: expected a list of 'PATTERN=LR'"),
        (dict(lr_rules=["mlp=fast"]), "the learning rate 'fast' is not a positive finite number"),
        (dict(lr_rules=["mlp=x"]), "the scale after 'x' 'x' is not a positive finite number"),
        (dict(lr_rules=["=1e-5"]), "empty pattern"),
        (dict(lr_rules=["mlp(=1e-5"]), "'mlp(' is not a valid regular expression"),
        (dict(lr_rules=["mlp=-1e-5"]), "the learning rate '-1e-5' is not a positive"),
        (dict(lr_rules=["mlp=0"]), "the learning rate '0' is not a positive"),
        (dict(lr_rules=["mlp=x0"]), "the scale after 'x' 'x0' is not a positive"),
        (dict(lr_rules=["mlp=nan"]), "'nan' is not a positive finite number"),
        (dict(lr_rules=["mlp=x2", "mlp=1e-5"]), "Repeated pattern(s): mlp"),
        (dict(head_lr=0.0), "head_lr=0.0 is not valid: expected a positive learning rate"),
        (dict(head_lr="5e-5"), "Got the string '5e-5': write a number (in YAML with a dot, 5.0e-5"),
        (dict(head_lr=-5e-5), "head_lr=-5e-05 is not valid"),
        (dict(embedding_lr=float("inf")), "embedding_lr=inf is not valid"),
        (dict(layer_lr_decay=0.0), "layer_lr_decay=0.0 is not valid: expected a number in (0, 1]"),
        (dict(layer_lr_decay=1.5), "layer_lr_decay=1.5 is not valid"),
        (dict(layer_lr_decay=-0.9), "layer_lr_decay=-0.9 is not valid"),
    ],
)
def test_bad_option_values_raise_when_the_arguments_are_built(options, fragment):
    with pytest.raises(InvalidArgumentError) as info:
        StrategyArguments(**options)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "arch, options, fragment",
    [
        (
            "llama", dict(lr_rules=["mlp=x2", "experts=1e-5"]),
            "lr_rules[1]='experts=1e-5': the pattern 'experts' matches no parameter",
        ),
        (
            "llama", dict(head_lr=5e-5, train_head=False),
            "head_lr=5e-05 sets a learning rate for the head (lm_head.weight), "
            "but the plan freezes it (train_head=false)",
        ),
        (
            "llama", dict(trainable_layers="-1:", embedding_lr=1e-6),
            "embedding_lr=1e-06 sets a learning rate for the embeddings",
        ),
        (
            "llama", dict(trainable_layers="-1:", lr_rules=[r"layers\.0\.=x2"]),
            "but the plan freezes all of them (trainable_layers='-1:')",
        ),
        (
            "llama", dict(frozen_params=["lm_head"], lr_rules=["lm_head=1e-4"]),
            "lr_rules[0]='lm_head=1e-4' sets a learning rate",
        ),
        (
            "gemma", dict(head_lr=5e-5, embedding_lr=1e-6),
            "one tied tensor, but embedding_lr=1e-06 and head_lr=5e-05 disagree",
        ),
        ("gemma", dict(trainable_layers="-1:", head_lr=5e-5), "Train them (for example train_head: true"),
    ],
)
def test_contradictions_with_the_model_raise_at_construction_and_write_nothing(tmp_path, arch, options, fragment):
    output_dir = tmp_path / "out"
    with pytest.raises(PlanError) as info:
        StrategyTrainer(model=tiny_model(arch), args=make_training_args(output_dir), strategy_args=strategy(**options))
    assert fragment in str(info.value)
    assert not output_dir.exists()


def test_decay_of_one_is_allowed():
    plan = build_plan(tiny_model("llama"), strategy(layer_lr_decay=1.0), make_training_args("unused"))
    assert {d.lr for d in plan} == {BASE}
    assert plan.group_names() == ["embeddings", "layers.0", "layers.1", "layers.2", "norm", "head"]


# -- DeepSpeed ----------------------------------------------------------------------------

DS_OPTIMIZER = {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 2}}


def ds_args(deepspeed, hf_deepspeed_config=None):
    """Real TrainingArguments carrying a DeepSpeed config, set after construction so that the
    check runs whether or not deepspeed is installed."""
    args = make_training_args("unused", learning_rate=BASE)
    args.deepspeed = deepspeed
    if hf_deepspeed_config is not None:
        args.hf_deepspeed_config = hf_deepspeed_config
    return args


@pytest.mark.parametrize(
    "source",
    ["dict", "file", "json_string", "parsed"],
)
def test_deepspeed_optimizer_block_is_refused_naming_what_to_remove(tmp_path, source):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(DS_OPTIMIZER))
    if source == "parsed":  # what TrainingArguments holds when deepspeed is installed
        args = ds_args(str(path), types.SimpleNamespace(config=DS_OPTIMIZER))
    else:
        value = {"dict": DS_OPTIMIZER, "file": str(path), "json_string": json.dumps(DS_OPTIMIZER)}[source]
        args = ds_args(value)
    with pytest.raises(PlanError) as info:
        build_plan(tiny_model("llama"), strategy(head_lr=5e-3), args)
    message = str(info.value)
    assert 'Remove the "optimizer" block from the DeepSpeed config' in message
    assert "['default', 'head']" in message
    if source in ("file", "parsed"):
        assert str(path) in message


def test_deepspeed_scheduler_block_is_refused_too_and_plain_configs_pass():
    ds = {"scheduler": {"type": "WarmupLR", "params": {}}}
    with pytest.raises(PlanError, match='Remove the "scheduler" block'):
        build_plan(tiny_model("llama"), strategy(layer_lr_decay=0.9), ds_args(ds))
    # No groups of ours: DeepSpeed may build the optimizer. No optimizer block: ours is kept.
    build_plan(tiny_model("llama"), strategy(), ds_args(DS_OPTIMIZER))
    ok = {"zero_optimization": {"stage": 2}}
    build_plan(tiny_model("llama"), strategy(head_lr=5e-3), ds_args(ok))


def test_deepspeed_refusal_happens_at_trainer_construction(tmp_path):
    args = make_training_args(tmp_path / "out")
    args.deepspeed = DS_OPTIMIZER  # set after __post_init__: deepspeed itself is not installed here
    with pytest.raises(PlanError, match='"optimizer" block'):
        StrategyTrainer(model=tiny_model("llama"), args=args, strategy_args=strategy(head_lr=5e-3))
    assert not (tmp_path / "out").exists()
