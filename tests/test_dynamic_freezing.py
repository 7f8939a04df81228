"""Gradual unfreezing and LISA: plans, step-boundary runtime, resume exactness, bad input.

Training checks compare with a plain ``Trainer`` whose layers are toggled by hand in a
callback, bit for bit, on CPU with a fixed seed.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from helpers import TokenDataset, make_training_args, snapshot
from tiny_models import tiny_model
from transformers import HfArgumentParser, Trainer, TrainerCallback

from hf_llama_strategies import (
    PLAN_FILE_NAME,
    InvalidArgumentError,
    PlanError,
    StrategyArguments,
    StrategyCallback,
    StrategyPlan,
    StrategyTrainer,
    build_plan,
)
from hf_llama_strategies.core.plugins import default_plugin_manager
from hf_llama_strategies.strategies.lisa import draw_layers

#: The manager of the built-in plugins, which answers the built-in schedules.
PM = default_plugin_manager()
NUM_LAYERS = 4


def model4() -> torch.nn.Module:
    return tiny_model("llama", num_hidden_layers=NUM_LAYERS).train()


def layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if len(parts) > 2 and parts[1] == "layers" else None


def losses_by_step(trainer: Trainer) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def active_layers(plan: StrategyPlan, step: int) -> list[int]:
    return sorted({plan[n].layer for n in plan.active_names(step, PM) if plan[n].layer is not None})


class Recorder(TrainerCallback):
    """At every step begin (after the strategy moved its schedule): layers that require
    grad, parameters holding optimizer state, and the parameters' bytes."""

    def __init__(self) -> None:
        self.layers: list[list[int]] = []
        self.with_state: list[set[str]] = []
        self.snapshots: list[dict[str, bytes]] = []

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        assert state.global_step == len(self.layers)
        self.layers.append(sorted({layer_of(n) for n, p in model.named_parameters() if p.requires_grad} - {None}))
        self.with_state.append({n for n, p in model.named_parameters() if p in optimizer.state})
        self.snapshots.append(snapshot(model))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.snapshots.append(snapshot(model))


class ByHand(TrainerCallback):
    """What the strategies do, written out for a plain Trainer: toggle layers at every
    optimizer-step boundary, and optionally drop the state of inactive layers."""

    def __init__(self, layers_at, drop_state: bool = False) -> None:
        self.layers_at = layers_at
        self.drop_state = drop_state

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        wanted = set(self.layers_at(state.global_step))
        for name, param in model.named_parameters():
            layer = layer_of(name)
            if layer is None:
                continue
            param.requires_grad_(layer in wanted)
            if layer not in wanted and self.drop_state:
                optimizer.state.pop(param, None)


def lisa_by_hand(seed: int, interval: int, k: int, layers=range(NUM_LAYERS)):
    # The draw as docs/strategies/dynamic-freezing.md documents it: the k smallest sha256("<seed>:<interval>:<layer>").
    def at(step: int) -> list[int]:
        index = step // interval
        key = lambda layer: hashlib.sha256(f"{seed}:{index}:{layer}".encode()).digest()  # noqa: E731
        return sorted(sorted(layers, key=key)[:k])

    return at


def train_strategy(tmp_path, name, strategy, callbacks=(), **training) -> tuple[StrategyTrainer, torch.nn.Module]:
    model = model4()
    trainer = StrategyTrainer(
        model=model, args=make_training_args(tmp_path / name, **training), train_dataset=TokenDataset(),
        strategy_args=StrategyArguments(print_plan=False, **strategy), callbacks=list(callbacks),
    )
    trainer.train()
    return trainer, model


def train_by_hand(tmp_path, name, callback, **training) -> tuple[Trainer, torch.nn.Module]:
    model = model4()
    trainer = Trainer(
        model=model, args=make_training_args(tmp_path / name, **training), train_dataset=TokenDataset(),
        callbacks=[callback],
    )
    trainer.train()
    return trainer, model


# -- plans ------------------------------------------------------------------------------


def test_gradual_plan_unfreezes_from_the_top_and_the_table_shows_when():
    plan = build_plan(model4(), StrategyArguments(unfreeze_schedule="gradual", unfreeze_interval_steps=5))
    for d in plan:
        assert d.trainable
        expected = {3: 5, 2: 10, 1: 15, 0: 20}[d.layer] if d.kind == "layer" else 0
        assert d.active_from == expected, d.name
        assert d.schedule is None
    assert plan["model.layers.2.mlp.up_proj.weight"].reason.endswith("unfreeze_schedule=gradual: from step 10")
    assert [active_layers(plan, s) for s in (0, 4, 5, 9, 10, 19, 20, 1000)] == [
        [], [], [3], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]
    ]
    assert "lm_head.weight" in plan.active_names(0, PM)
    table = plan.table()
    assert "parameters may train" in table
    rows = {line.split()[0]: line for line in table.splitlines()[3:]}
    for block, start in (("layers.0", "step 20"), ("layers.3", "step 5"), ("head", "step 0"), ("embeddings", "step 0")):
        assert start in rows[block], rows[block]


def test_gradual_respects_the_static_selection_and_layers_per_stage():
    args = StrategyArguments(
        unfreeze_schedule="gradual", unfreeze_interval_steps=3, unfreeze_layers_per_step=2,
        trainable_layers="1:", trainable_modules="mlp",
    )
    plan = build_plan(model4(), args)
    starts = {(d.layer, d.name.split(".")[3]): d.active_from for d in plan if d.kind == "layer" and d.trainable}
    assert starts == {(3, "mlp"): 3, (2, "mlp"): 3, (1, "mlp"): 6}
    assert all(d.active_from == 0 for d in plan if not d.trainable or d.kind != "layer")
    assert not plan["model.embed_tokens.weight"].trainable


def test_lisa_plan_draws_are_pure_functions_of_plan_and_step():
    args = StrategyArguments(lisa_layers=2, lisa_interval_steps=3)
    plan = build_plan(model4(), args, make_training_args("unused", seed=7))
    spec = plan.schedules["lisa"]
    assert spec["layers"] == [0, 1, 2, 3] and spec["num_active"] == 2 and spec["seed"] == 7
    assert spec["interval_steps"] == 3 and spec["drop_optimizer_state"] is True
    assert all(d.schedule == "lisa" for d in plan if d.kind == "layer")
    assert all(d.schedule is None for d in plan if d.kind != "layer")

    draws = [active_layers(plan, step) for step in range(30)]
    hand = lisa_by_hand(seed=7, interval=3, k=2)
    assert draws == [hand(step) for step in range(30)]
    assert all(len(d) == 2 for d in draws)
    assert all(draws[s] == draws[s - s % 3] for s in range(30))  # constant within an interval
    assert len({tuple(d) for d in draws}) > 2
    # Embeddings, norm and head at every step.
    assert all({"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= plan.active_names(s, PM)
               for s in range(30))

    # Another process, another global RNG state, the plan read back from JSON: same draws.
    torch.manual_seed(123)
    rebuilt = build_plan(model4(), args, make_training_args("unused", seed=7))
    again = StrategyPlan.from_dict(json.loads(json.dumps(rebuilt.to_dict())))
    assert [active_layers(again, step) for step in range(30)] == draws
    other_seed = build_plan(model4(), args, make_training_args("unused", seed=8))
    assert [active_layers(other_seed, step) for step in range(30)] != draws


def test_lisa_draws_only_among_the_static_trainable_layers():
    plan = build_plan(model4(), StrategyArguments(lisa_layers=1, lisa_interval_steps=1, trainable_layers="-2:"))
    assert plan.schedules["lisa"]["layers"] == [2, 3]
    draws = {tuple(active_layers(plan, s)) for s in range(40)}
    assert draws == {(2,), (3,)}
    assert draw_layers([2, 3], 1, 42, 0) == active_layers(plan, 0)
    table = plan.table()
    assert "lisa" in table and "schedule lisa: 1 of decoder layers 2-3 train at a time, drawn every 1" in table


def test_static_plan_table_is_unchanged_by_dynamic_columns():
    plan = build_plan(model4(), StrategyArguments(trainable_layers="-2:"))
    assert not plan.is_dynamic
    assert plan.table().splitlines()[1].split() == ["block", "params", "trainable", "lr", "dtype", "memory"]


def test_plan_json_keeps_schedules_and_differences_name_what_changed():
    lisa = build_plan(model4(), StrategyArguments(lisa_layers=2, lisa_interval_steps=3))
    again = StrategyPlan.from_dict(json.loads(json.dumps(lisa.to_dict())))
    assert again.to_dict() == lisa.to_dict()
    assert lisa.differences(again) == []
    other = build_plan(model4(), StrategyArguments(lisa_layers=2, lisa_interval_steps=4))
    assert lisa.differences(other) == ["schedule 'lisa': interval_steps 3 -> 4"]
    static = build_plan(model4(), StrategyArguments(trainable_layers="-3:"))
    static_other = build_plan(model4(), StrategyArguments(trainable_layers="-2:"))
    assert static.differences(static_other) == ["layers.1: trainable True -> False (9 parameters)"]


# -- the runtime against the same thing by hand ------------------------------------------


def test_gradual_unfreezing_equals_plain_trainer_toggled_by_hand(tmp_path):
    strategy = dict(unfreeze_schedule="gradual", unfreeze_interval_steps=2)
    recorder = Recorder()
    ours, a = train_strategy(tmp_path, "ours", strategy, [recorder], max_steps=8)
    starts = {3: 2, 2: 4, 1: 6, 0: 8}
    by_hand = ByHand(lambda step: [layer for layer, start in starts.items() if step >= start])
    theirs, b = train_by_hand(tmp_path, "hand", by_hand, max_steps=8)
    assert losses_by_step(ours) == losses_by_step(theirs)
    assert len(losses_by_step(ours)) == 8
    assert snapshot(a) == snapshot(b)
    assert recorder.layers == [[], [], [3], [3], [2, 3], [2, 3], [1, 2, 3], [1, 2, 3]]
    # Layer 0 starts at step 8 = max_steps: it never trained.
    before = recorder.snapshots[0]
    after = snapshot(a)
    assert all(after[n] == before[n] for n in after if layer_of(n) == 0)
    assert all(after[n] != before[n] for n in after if layer_of(n) in (1, 2, 3))
    # After training every parameter that may train requires grad again.
    assert all(p.requires_grad for p in a.parameters())


def test_lisa_equals_plain_trainer_toggled_by_hand_with_state_dropped(tmp_path):
    strategy = dict(lisa_layers=1, lisa_interval_steps=2)
    recorder = Recorder()
    ours, a = train_strategy(tmp_path, "ours", strategy, [recorder], max_steps=8)
    hand = lisa_by_hand(seed=0, interval=2, k=1)
    theirs, b = train_by_hand(tmp_path, "hand", ByHand(hand, drop_state=True), max_steps=8)
    assert losses_by_step(ours) == losses_by_step(theirs)
    assert snapshot(a) == snapshot(b)
    assert recorder.layers == [hand(s) for s in range(8)]
    assert len({tuple(x) for x in recorder.layers}) > 1
    for step, names in enumerate(recorder.with_state):
        # Only the layers active now (and the always-trained blocks) hold optimizer state.
        layers_with_state = {layer_of(n) for n in names} - {None}
        assert layers_with_state <= set(recorder.layers[step]), step
    assert {n for n in recorder.with_state[3] if layer_of(n) is None} == {
        "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    }


def test_callback_on_plain_trainer_equals_strategy_trainer_for_lisa(tmp_path):
    strategy = StrategyArguments(lisa_layers=2, lisa_interval_steps=2, print_plan=False)
    ours, a = train_strategy(tmp_path, "ours", dict(lisa_layers=2, lisa_interval_steps=2), max_steps=6)
    b = model4()
    plain = Trainer(model=b, args=make_training_args(tmp_path / "cb", max_steps=6), train_dataset=TokenDataset(),
                    callbacks=[StrategyCallback(strategy)])
    plain.train()
    assert losses_by_step(ours) == losses_by_step(plain)
    assert snapshot(a) == snapshot(b)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "sgd", "adafactor"])
def test_inactive_layers_do_not_move_under_any_optimizer(tmp_path, optim):
    # State kept (no drop) and weight decay on: an optimizer that decayed or stepped a
    # parameter without a gradient would move an inactive layer.
    recorder = Recorder()
    train_strategy(tmp_path, optim, dict(lisa_layers=1, lisa_interval_steps=1, lisa_drop_optimizer_state=False),
                   [recorder], max_steps=5, optim=optim, weight_decay=0.1)
    assert len({tuple(x) for x in recorder.layers}) > 1
    for step in range(5):
        before, after = recorder.snapshots[step], recorder.snapshots[step + 1]
        for name in before:
            layer = layer_of(name)
            moved = before[name] != after[name]
            if layer is None or layer in recorder.layers[step]:
                assert moved, (optim, step, name)
            else:
                assert not moved, (optim, step, name)
    # Kept state: layers trained earlier still hold it (plain SGD keeps none).
    if optim != "sgd":
        assert {layer_of(n) for n in recorder.with_state[-1]} - {None} == set().union(*map(set, recorder.layers[:-1]))


def test_a_left_over_gradient_does_not_move_a_deactivated_layer(tmp_path):
    # As if zero_grad(set_to_none=False) ran: every parameter keeps a zero gradient, which
    # AdamW would decay and step with its momentum unless the runtime clears it.
    class ZeroGradients(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            for param in model.parameters():
                param.grad = torch.zeros_like(param)

    recorder = Recorder()
    train_strategy(tmp_path, "zeros", dict(lisa_layers=1, lisa_interval_steps=2, lisa_drop_optimizer_state=False),
                   [ZeroGradients(), recorder], max_steps=6, weight_decay=0.1)
    assert len({tuple(x) for x in recorder.layers}) > 1
    for step in range(6):
        before, after = recorder.snapshots[step], recorder.snapshots[step + 1]
        for name in before:
            layer = layer_of(name)
            if layer is not None and layer not in recorder.layers[step]:
                assert before[name] == after[name], (step, name)


def test_schedule_moves_at_optimizer_step_boundaries_under_gradient_accumulation(tmp_path):
    seen: list[tuple[int, str, list[int]]] = []

    class MicroBatches(TrainerCallback):
        def record(self, event, state, model):
            seen.append((state.global_step, event, sorted({layer_of(n) for n, p in model.named_parameters()
                                                           if p.requires_grad} - {None})))

        def on_step_begin(self, args, state, control, model=None, **kwargs):
            self.record("begin", state, model)

        def on_substep_end(self, args, state, control, model=None, **kwargs):
            self.record("substep", state, model)

    trainer, _ = train_strategy(tmp_path, "ga", dict(lisa_layers=1, lisa_interval_steps=1), [MicroBatches()],
                                max_steps=6, gradient_accumulation_steps=3, per_device_train_batch_size=1)
    plan = trainer.strategy_plan
    assert [(s, e) for s, e, _ in seen] == [(s, e) for s in range(6) for e in ("begin", "substep", "substep")]
    for step, _, layers in seen:
        assert layers == active_layers(plan, step)
    assert len({tuple(layers) for _, _, layers in seen}) > 1


# -- resume ---------------------------------------------------------------------------


RESUME_CASES = {
    "static": dict(trainable_layers="-2:"),
    "gradual": dict(unfreeze_schedule="gradual", unfreeze_interval_steps=2),
    "lisa": dict(lisa_layers=1, lisa_interval_steps=2),
    "lisa_keep_state_accumulating": dict(lisa_layers=2, lisa_interval_steps=2, lisa_drop_optimizer_state=False),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resumed_run_equals_uninterrupted_run_bit_for_bit(tmp_path, case):
    strategy = RESUME_CASES[case]
    training = dict(max_steps=8, save_strategy="steps", save_steps=3)
    if case.endswith("accumulating"):
        training.update(gradient_accumulation_steps=2, per_device_train_batch_size=2)
    full, full_model = train_strategy(tmp_path, "full", strategy, **training)

    # Checkpoint 3 lies inside an interval ([2, 4)) of every schedule.
    model = model4()
    resumed = StrategyTrainer(
        model=model, args=make_training_args(tmp_path / "resumed", **training), train_dataset=TokenDataset(),
        strategy_args=StrategyArguments(print_plan=False, **strategy),
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))

    expected = {s: loss for s, loss in losses_by_step(full).items() if s > 3}
    assert list(expected) == [4, 5, 6, 7, 8]
    # The resumed log also holds steps 1-3, restored from the checkpoint's trainer state.
    assert {s: loss for s, loss in losses_by_step(resumed).items() if s > 3} == expected
    assert snapshot(model) == snapshot(full_model)
    plan = resumed.strategy_plan
    if plan.is_dynamic:
        # The schedule moves after the checkpoint, so the resumed run crosses a boundary.
        assert len({plan.active_names(s, PM) for s in range(3, 8)}) > 1


def test_resume_with_a_different_plan_is_an_error_that_shows_the_difference(tmp_path):
    first, _ = train_strategy(tmp_path, "run", dict(lisa_layers=1, lisa_interval_steps=2), max_steps=4,
                              save_strategy="steps", save_steps=3)
    checkpoint = tmp_path / "run" / "checkpoint-3"
    saved = (checkpoint / PLAN_FILE_NAME).read_text()

    def resumed_trainer(**strategy) -> StrategyTrainer:
        return StrategyTrainer(
            model=model4(), args=make_training_args(tmp_path / "run", max_steps=6, save_strategy="no"),
            train_dataset=TokenDataset(), strategy_args=StrategyArguments(print_plan=False, **strategy),
        )

    trainer = resumed_trainer(lisa_layers=1, lisa_interval_steps=3)
    with pytest.raises(PlanError) as info:
        trainer.train(resume_from_checkpoint=str(checkpoint))
    message = str(info.value)
    assert "checkpoint-3" in message and "schedule 'lisa': interval_steps 2 -> 3" in message
    assert "allow_plan_change_on_resume" in message
    assert trainer.state.global_step == 0  # nothing was loaded or trained

    with pytest.raises(PlanError, match=r"layers.0: trainable True -> False \(9 parameters\)"):
        resumed_trainer(lisa_layers=1, lisa_interval_steps=2, trainable_layers="1:").train(resume_from_checkpoint=True)

    allowed = resumed_trainer(lisa_layers=1, lisa_interval_steps=3, allow_plan_change_on_resume=True)
    allowed.train(resume_from_checkpoint=True)
    assert allowed.state.global_step == 6
    assert (checkpoint / PLAN_FILE_NAME).read_text() == saved


def test_plain_trainer_with_callback_checks_the_plan_of_the_resumed_checkpoint(tmp_path):
    train_strategy(tmp_path, "run", dict(lisa_layers=1, lisa_interval_steps=2), max_steps=4,
                   save_strategy="steps", save_steps=3)
    plain = Trainer(
        model=model4(), args=make_training_args(tmp_path / "run", max_steps=6), train_dataset=TokenDataset(),
        callbacks=[StrategyCallback(StrategyArguments(lisa_layers=2, lisa_interval_steps=2, print_plan=False))],
    )
    with pytest.raises(PlanError, match="schedule 'lisa': num_active 1 -> 2"):
        plain.train(resume_from_checkpoint=True)


# -- arguments and bad input ---------------------------------------------------------------


def test_options_parse_from_the_command_line():
    (args,) = HfArgumentParser(StrategyArguments).parse_args_into_dataclasses(
        ["--lisa_layers", "2", "--lisa_interval_steps", "5", "--lisa_drop_optimizer_state", "false",
         "--allow_plan_change_on_resume", "true"]
    )
    assert (args.lisa_layers, args.lisa_interval_steps, args.lisa_drop_optimizer_state) == (2, 5, False)
    assert args.allow_plan_change_on_resume is True
    (args,) = HfArgumentParser(StrategyArguments).parse_args_into_dataclasses(
        ["--unfreeze_schedule", "gradual", "--unfreeze_interval_steps", "10", "--unfreeze_layers_per_step", "2"]
    )
    assert (args.unfreeze_schedule, args.unfreeze_interval_steps, args.unfreeze_layers_per_step) == ("gradual", 10, 2)


@pytest.mark.parametrize(
    "strategy, fragment",
    [
        (dict(lisa_layers=0), "lisa_layers=0 is not valid: expected a positive integer"),
        (dict(lisa_layers=2, lisa_interval_steps=0), "lisa_interval_steps=0 is not valid: expected a positive integer"),
        (dict(unfreeze_schedule="gradual", unfreeze_interval_steps=0), "unfreeze_interval_steps=0 is not valid"),
        (dict(unfreeze_schedule="gradual"), "unfreeze_interval_steps=None is not valid: expected a positive integer"),
        (dict(unfreeze_schedule="sometimes"), "unfreeze_schedule='sometimes' is not valid: expected 'gradual', 'none'"),
        (dict(lisa_layers=2, unfreeze_schedule="gradual", unfreeze_interval_steps=5),
         "lisa_layers=2 is not valid: expected unset when unfreeze_schedule='gradual'"),
        (dict(unfreeze_schedule="gradual", unfreeze_interval_steps=5, trainable_layers="none"),
         "expected unset when trainable_layers='none'"),
        (dict(lisa_interval_steps=5), "lisa_interval_steps=5 is not valid: expected unset unless lisa_layers is set"),
        (dict(unfreeze_interval_steps=5), "unfreeze_interval_steps=5 is not valid: expected unset unless"),
        (dict(lisa_layers=True), "lisa_layers=True is not valid"),
    ],
)
def test_bad_options_fail_when_parsed(strategy, fragment):
    with pytest.raises(InvalidArgumentError) as info:
        StrategyArguments(**strategy)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "strategy, error, fragment",
    [
        (dict(lisa_layers=5), InvalidArgumentError,
         "lisa_layers=5 is not valid: expected at most 4, the decoder layers the plan trains "
         "(0-3 of LlamaForCausalLM's 4)"),
        (dict(lisa_layers=3, trainable_layers="-2:"), InvalidArgumentError,
         "expected at most 2, the decoder layers the plan trains (2-3"),
        (dict(lisa_layers=1, frozen_params=[r"\.layers\."]), PlanError, "LISA has nothing to draw from"),
        (dict(unfreeze_schedule="gradual", unfreeze_interval_steps=5, frozen_params=[r"\.layers\."]), PlanError,
         "unfreeze_schedule='gradual' has no decoder layer left to unfreeze"),
        (dict(unfreeze_schedule="gradual", unfreeze_interval_steps=5, unfreeze_layers_per_step=5), InvalidArgumentError,
         "unfreeze_layers_per_step=5 is not valid: expected at most 4"),
        (dict(unfreeze_schedule="gradual", unfreeze_interval_steps=5, trainable_layers="-2:", train_norm=False,
              train_head=False), PlanError, "Nothing would train at step 0"),
    ],
)
def test_bad_schedule_raises_at_construction_and_writes_nothing(tmp_path, strategy, error, fragment):
    output_dir = tmp_path / "out"
    with pytest.raises(error) as info:
        StrategyTrainer(model=model4(), args=make_training_args(output_dir), train_dataset=TokenDataset(),
                        strategy_args=StrategyArguments(**strategy))
    assert fragment in str(info.value)
    assert not output_dir.exists()


def test_ddp_find_unused_parameters_is_set_or_a_forced_false_refused(tmp_path):
    lisa = dict(lisa_layers=1)
    args = make_training_args(tmp_path / "a")
    assert args.ddp_find_unused_parameters is None
    trainer = StrategyTrainer(model=model4(), args=args, strategy_args=StrategyArguments(**lisa))
    # Set on the Trainer's own accelerator (what DDP will be built with); the arguments passed in stay as given.
    assert trainer.args is args and args.ddp_find_unused_parameters is None
    assert trainer.accelerator.ddp_handler.find_unused_parameters is True

    static = make_training_args(tmp_path / "b")
    trainer = StrategyTrainer(model=model4(), args=static, strategy_args=StrategyArguments(trainable_layers="-1:"))
    assert trainer.args.ddp_find_unused_parameters is None

    output_dir = tmp_path / "c"
    refused = "ddp_find_unused_parameters=False is not valid: expected true or unset"
    with pytest.raises(InvalidArgumentError, match=refused):
        StrategyTrainer(model=model4(), args=make_training_args(output_dir, ddp_find_unused_parameters=False),
                        strategy_args=StrategyArguments(**lisa))
    assert not output_dir.exists()
    with pytest.raises(InvalidArgumentError, match="ddp_find_unused_parameters=False"):
        Trainer(model=model4(), args=make_training_args(tmp_path / "d", ddp_find_unused_parameters=False),
                callbacks=[StrategyCallback(StrategyArguments(**lisa))])
