"""Activation checkpointing that stops at the lowest trainable parameter.

Gradients are compared bit for bit with training without checkpointing; a frozen prefix is
shown to run once per step and to take no part in backward, where transformers' default
path recomputes it and back-propagates through it.
"""

from __future__ import annotations

import warnings
from typing import Optional

import pytest
import torch
from helpers import TokenDataset, losses, make_training_args, snapshot
from tiny_models import tiny_model, tiny_peft_lora_model
from transformers import Trainer, TrainerCallback

from hf_llama_strategies import StrategyArguments, StrategyCallback, StrategyTrainer, build_plan
from hf_llama_strategies.strategies.activation_checkpointing import FrozenPrefixCheckpoint, skip_frozen_prefix

# Name -> (StrategyArguments kwargs, index of the lowest layer holding a trainable parameter)
PLANS = {
    "last_two_norm_head": (dict(trainable_layers="-2:"), 1),
    "last_two_only": (dict(trainable_layers="-2:", train_norm=False, train_head=False), 1),
    "mlp_of_last_layer": (dict(trainable_layers="-1:", trainable_modules="mlp"), 2),
    "middle_layer_attention_out": (
        dict(trainable_layers="1", trainable_modules="self_attn.o_proj", train_head=False), 1
    ),
    "gap_between_trainable_layers": (dict(trainable_layers="0,2", train_norm=False, train_head=False), 0),
    "head_only": (dict(trainable_layers="none"), 3),
    "full": (dict(), 0),
}
CHECKPOINTING = ["off", "reentrant", "non_reentrant"]


def batch(arch: str = "llama") -> dict[str, torch.Tensor]:
    ids = TokenDataset(n=2, seq_len=16, seed=1).input_ids
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def prepared_model(
    strategy: dict, checkpointing: str, ours: bool = True, arch: str = "llama", dropout: float = 0.0
) -> torch.nn.Module:
    overrides = {"attention_dropout": dropout} if dropout else {}
    model = tiny_model(arch, **overrides).train()
    plan = build_plan(model, StrategyArguments(**strategy))
    plan.apply(model)
    if checkpointing != "off":
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        if ours:
            assert skip_frozen_prefix(model, model.get_submodule(plan.layers_path)) == plan.num_layers
    return model


def gradients(
    model: torch.nn.Module, inputs: Optional[dict] = None, seed: int = 0
) -> dict[str, Optional[torch.Tensor]]:
    torch.manual_seed(seed)
    model(**(inputs or batch())).loss.backward()
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_gradients(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        if grad is None:
            assert actual[name] is None, f"{name} is frozen and must get no gradient tensor"
        else:
            assert actual[name] is not None and torch.equal(actual[name], grad), f"{name}: gradient differs"


# -- gradients ------------------------------------------------------------------------------


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_gradients_equal_training_without_checkpointing(plan_name, checkpointing):
    strategy, _ = PLANS[plan_name]
    expected = gradients(prepared_model(strategy, "off"))
    assert any(g is not None for g in expected.values())
    assert_same_gradients(gradients(prepared_model(strategy, checkpointing)), expected)
    # transformers' own path gets the same gradients too (only slower): the comparison is meaningful
    assert_same_gradients(gradients(prepared_model(strategy, checkpointing, ours=False)), expected)


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gpt2", "gpt_neox"])
def test_gradients_equal_on_other_architectures(arch):
    strategy = dict(trainable_layers="-1:", train_head=False)
    expected = gradients(prepared_model(strategy, "off", arch=arch))
    for checkpointing in ("reentrant", "non_reentrant"):
        assert_same_gradients(gradients(prepared_model(strategy, checkpointing, arch=arch)), expected)


def test_dropout_inside_checkpointed_layers_is_replayed_exactly():
    strategy = dict(trainable_layers="-2:")
    expected = gradients(prepared_model(strategy, "off", dropout=0.3), seed=3)
    for checkpointing in ("reentrant", "non_reentrant"):
        assert_same_gradients(gradients(prepared_model(strategy, checkpointing, dropout=0.3), seed=3), expected)


def test_follows_requires_grad_changed_after_installation():
    # Dynamic freezing toggles requires_grad between steps; the frozen prefix follows.
    strategy = dict(trainable_layers="-1:")
    for checkpointing in ("reentrant", "non_reentrant"):
        ours, plain = prepared_model(strategy, checkpointing), prepared_model(strategy, "off")
        assert_same_gradients(gradients(ours), gradients(plain))
        for model in (ours, plain):
            model.zero_grad(set_to_none=True)
            for p in model.model.layers[0].parameters():
                p.requires_grad_(True)
        assert_same_gradients(gradients(ours), gradients(plain))
        calls = [layer._gradient_checkpointing_func for layer in ours.model.layers]
        assert [(c.plain_calls, c.anchored_calls, c.checkpointed_calls) for c in calls] == [
            (1, 1, 0),  # frozen in step 1, lowest trainable layer in step 2
            (1, 0, 1),
            (0, 1, 1),
        ]


# -- frozen layers: forward once, never in backward ---------------------------------------------


class LayerProbe:
    """Counts, per decoder layer, forward calls of its submodules and backward-hook calls."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = model.model.layers
        self.forwards = [0] * len(self.layers)
        self.backwards = [0] * len(self.layers)
        self.outputs_requiring_grad = [0] * len(self.layers)
        for index, layer in enumerate(self.layers):
            for module in layer.modules():
                if module is layer:
                    continue
                module.register_forward_pre_hook(self._count(self.forwards, index))
                module.register_full_backward_hook(self._count(self.backwards, index))
            layer.register_forward_hook(self._output_hook(index))

    @staticmethod
    def _count(counter: list[int], index: int):
        def hook(*_):
            counter[index] += 1

        return hook

    def _output_hook(self, index: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            self.outputs_requiring_grad[index] += int(hidden.requires_grad)

        return hook


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("plan_name", ["last_two_norm_head", "mlp_of_last_layer", "head_only"])
def test_frozen_prefix_runs_once_and_takes_no_part_in_backward(plan_name, checkpointing):
    strategy, lowest = PLANS[plan_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # full backward hooks with checkpointing warn about inputs
        ours = prepared_model(strategy, checkpointing)
        probe = LayerProbe(ours)
        per_layer = len(list(ours.model.layers[0].modules())) - 1
        gradients(ours)
    layers = range(len(probe.layers))
    # Frozen prefix: each submodule ran exactly once, nothing of it entered backward.
    assert [probe.forwards[i] for i in layers if i < lowest] == [per_layer] * lowest
    assert [probe.backwards[i] for i in layers if i < lowest] == [0] * lowest
    assert [probe.outputs_requiring_grad[i] for i in layers if i < lowest] == [0] * lowest
    # Layers from the lowest trainable one up: recomputed once for backward, so two forwards.
    assert [probe.forwards[i] for i in layers if i >= lowest] == [2 * per_layer] * (len(probe.layers) - lowest)
    assert [probe.outputs_requiring_grad[i] for i in layers if i >= lowest] == [1] * (len(probe.layers) - lowest)
    frozen = [n for n, p in ours.named_parameters() if not p.requires_grad]
    assert frozen and all(dict(ours.named_parameters())[n].grad is None for n in frozen)


@pytest.mark.parametrize("checkpointing", ["reentrant", "non_reentrant"])
def test_transformers_default_recomputes_and_backpropagates_the_frozen_prefix(checkpointing):
    # The control for the test above: without the plugin the same probe sees the waste.
    strategy, lowest = PLANS["last_two_norm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = prepared_model(strategy, checkpointing, ours=False)
        probe = LayerProbe(theirs)
        per_layer = len(list(theirs.model.layers[0].modules())) - 1
        gradients(theirs)
    assert lowest == 1
    assert probe.forwards[0] == 2 * per_layer
    assert probe.backwards[0] > 0
    assert probe.outputs_requiring_grad[0] == 1


def backward_calls(strategy, checkpointing, layer_index) -> dict[str, int]:
    """How many times backward entered the attention and the MLP of one layer, in one backward pass."""
    model = prepared_model(strategy, checkpointing)
    calls = {"self_attn": 0, "mlp": 0}
    layer = model.model.layers[layer_index]
    layer.self_attn.register_full_backward_hook(lambda *_: calls.__setitem__("self_attn", calls["self_attn"] + 1))
    layer.mlp.register_full_backward_hook(lambda *_: calls.__setitem__("mlp", calls["mlp"] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gradients(model)
    return calls


def test_backward_stops_at_the_lowest_trainable_module_inside_a_layer():
    # Only the MLP of the last layer trains: its attention must not enter backward.
    strategy, lowest = PLANS["mlp_of_last_layer"]
    for checkpointing in ("reentrant", "non_reentrant"):
        calls = backward_calls(strategy, checkpointing, lowest)
        assert calls == {"self_attn": 0, "mlp": 1}, checkpointing


# -- through the Trainer ------------------------------------------------------------------------


class GradientRecorder(TrainerCallback):
    """Before every optimizer step: which parameters hold a gradient tensor."""

    def __init__(self) -> None:
        self.with_grad: list[set[str]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.with_grad.append({n for n, p in model.named_parameters() if p.grad is not None})


def train(tmp_path, name: str, strategy: Optional[dict], plain: bool = False, callback: bool = False, **args):
    model = tiny_model("llama").train()
    recorder = GradientRecorder()
    training_args = make_training_args(tmp_path / name, **args)
    if plain:
        trainable = ("model.layers.1.", "model.layers.2.", "model.norm.", "lm_head.")
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith(trainable))
        trainer = Trainer(model=model, args=training_args, train_dataset=TokenDataset(), callbacks=[recorder])
    elif callback:
        trainer = Trainer(
            model=model, args=training_args, train_dataset=TokenDataset(),
            callbacks=[StrategyCallback(StrategyArguments(**strategy)), recorder],
        )
    else:
        trainer = StrategyTrainer(
            model=model, args=training_args, train_dataset=TokenDataset(),
            strategy_args=StrategyArguments(**strategy), callbacks=[recorder],
        )
    trainer.train()
    return trainer, recorder


@pytest.mark.parametrize(
    "switch",
    [
        dict(activation_checkpointing=True),
        dict(activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True}),
        dict(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": True}),
        dict(gradient_checkpointing=True),
    ],
    ids=[
        "activation_checkpointing",
        "reentrant",
        "deprecated_gradient_checkpointing_reentrant",
        "deprecated_gradient_checkpointing",
    ],
)
def test_trainer_switches_train_bit_identically_and_skip_the_frozen_prefix(tmp_path, switch):
    strategy = dict(trainable_layers="-2:")
    reference, reference_grads = train(tmp_path, "off", strategy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ours, ours_grads = train(tmp_path, "on", strategy, **switch)
    model = ours.model
    assert losses(ours) == losses(reference) and len(losses(ours)) == 6
    assert snapshot(model) == snapshot(reference.model)
    trainable = set(ours.strategy_plan.trainable_names())
    assert ours_grads.with_grad == [trainable] * 6 == reference_grads.with_grad
    funcs = [layer._gradient_checkpointing_func for layer in model.model.layers]
    assert all(isinstance(f, FrozenPrefixCheckpoint) for f in funcs)
    # 6 steps: layer 0 always ran plainly, layer 1 was anchored, layer 2 checkpointed as usual
    assert [(f.plain_calls, f.anchored_calls, f.checkpointed_calls) for f in funcs] == [(6, 0, 0), (0, 6, 0), (0, 0, 6)]
    assert not getattr(model, "_require_grads_hooks", None)


def test_plain_trainer_with_the_callback_skips_the_frozen_prefix(tmp_path):
    strategy = dict(trainable_layers="-2:")
    reference, _ = train(tmp_path, "plain", None, plain=True, activation_checkpointing=True)
    ours, _ = train(tmp_path, "callback", strategy, callback=True, activation_checkpointing=True)
    # transformers' default path: identical training, frozen layer 0 recomputed (its hook is on)
    assert losses(ours) == losses(reference)
    assert snapshot(ours.model) == snapshot(reference.model)
    assert getattr(reference.model, "_require_grads_hooks", None)
    assert not isinstance(reference.model.model.layers[0]._gradient_checkpointing_func, FrozenPrefixCheckpoint)
    assert ours.model.model.layers[0]._gradient_checkpointing_func.plain_calls == 6


def test_adamw_state_is_8_bytes_per_trainable_parameter_and_frozen_ones_get_nothing(tmp_path):
    strategy = dict(trainable_layers="-2:", train_norm=False, train_head=False)
    trainer, recorder = train(tmp_path, "lf", strategy, activation_checkpointing=True)
    plan = trainer.strategy_plan
    params = dict(trainer.model.named_parameters())
    state = trainer.optimizer.state
    moments = sum(
        v.numel() * v.element_size() for p, s in state.items() for v in s.values() if v.shape == p.shape
    )
    assert moments == 8 * plan.num_trainable
    assert {id(p) for p in state} == {id(params[n]) for n in plan.trainable_names()}
    assert recorder.with_grad == [set(plan.trainable_names())] * 6
    assert all(params[n].grad is None for n in plan.decisions if not plan[n].trainable)


# -- what is left alone ---------------------------------------------------------------------------


def test_nothing_changes_without_checkpointing():
    model = tiny_model("llama").train()
    model.enable_input_require_grads()  # a user's own reason
    assert skip_frozen_prefix(model, model.model.layers) == 0
    assert model._require_grads_hooks
    assert not hasattr(model.model.layers[0], "_gradient_checkpointing_func") or not isinstance(
        model.model.layers[0]._gradient_checkpointing_func, FrozenPrefixCheckpoint
    )


def test_layers_that_are_not_checkpointing_layers_keep_transformers_path():
    model = tiny_model("llama").train()
    model.activation_checkpointing_enable()
    foreign = torch.nn.ModuleList([torch.nn.Linear(2, 2)])
    assert skip_frozen_prefix(model, foreign) == 0
    assert model._require_grads_hooks
    assert not isinstance(model.model.layers[0]._gradient_checkpointing_func, FrozenPrefixCheckpoint)


def test_idempotent_and_reinstalled_after_checkpointing_is_enabled_again():
    model = prepared_model(PLANS["last_two_norm_head"][0], "non_reentrant")
    first = model.model.layers[0]._gradient_checkpointing_func
    assert skip_frozen_prefix(model, model.model.layers) == 3
    assert model.model.layers[0]._gradient_checkpointing_func is first
    model.activation_checkpointing_enable()  # a second train() does this again
    assert model._require_grads_hooks
    skip_frozen_prefix(model, model.model.layers)
    assert isinstance(model.model.layers[0]._gradient_checkpointing_func, FrozenPrefixCheckpoint)
    assert not model._require_grads_hooks


def test_peft_lora_gradients_equal_without_checkpointing():
    def lora_grads(checkpointing: bool) -> dict:
        model = tiny_peft_lora_model("llama").train()
        if checkpointing:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
            assert skip_frozen_prefix(model, model.base_model.model.model.layers) == 3
        return gradients(model)

    expected = lora_grads(False)
    assert sum(g is not None for g in expected.values()) == 12  # q/v LoRA A and B in 3 layers
    assert_same_gradients(lora_grads(True), expected)


def test_hfls_on_train_begin_runs_after_checkpointing_and_optimizer_in_every_train_call(tmp_path):
    from hf_llama_strategies import hookimpl

    seen = []

    class Recorder:
        @hookimpl
        def hfls_on_train_begin(self, model, plan, training_args):
            seen.append((model, plan, training_args, model.is_activation_checkpointing, trainer.optimizer is not None))

    model = tiny_model("llama").train()
    args = make_training_args(tmp_path, activation_checkpointing=True, max_steps=1)
    trainer = StrategyTrainer(
        model=model, args=args, train_dataset=TokenDataset(), strategy_args=StrategyArguments(trainable_layers="-1:"),
        strategy_plugins=[Recorder()],
    )
    trainer.train()
    trainer.train()
    assert seen == [(model, trainer.strategy_plan, args, True, True)] * 2
