"""frozen_prefix_cache_boundary (a cache below the plan's own boundary) and frozen_prefix_cache_prepass: false.

What ``compare`` shares between candidates: one cache, at the lowest boundary among them, filled as
training meets each sample. A 4-layer tiny Llama, 8 samples, batch 4.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TokenDataset, losses, make_training_args, snapshot, strategy
from tiny_models import tiny_model

from hf_llama_strategies import InvalidArgumentError, PlanError, StrategyTrainer, build_plan
from hf_llama_strategies.strategies.frozen_prefix_cache import get_frozen_prefix_cache

LAYERS = 4


def model_for(head: str = "causal_lm"):
    return tiny_model("llama", head=head, num_hidden_layers=LAYERS)


def train(tmp_path, name, options, epochs=2, **overrides):
    settings = {"max_steps": -1, "num_train_epochs": epochs, "per_device_eval_batch_size": 4, **overrides}
    args = make_training_args(tmp_path / name, **settings)
    trainer = StrategyTrainer(model=model_for(), args=args, train_dataset=TokenDataset(n=8),
                              strategy_args=strategy(**options))
    return trainer


def test_a_boundary_below_the_plans_own_is_exact_and_the_layers_between_build_no_graph(tmp_path):
    options = dict(trainable_layers="-1:")  # its own boundary: layers.3
    plain = train(tmp_path, "plain", options)
    plain.train()
    cached = train(tmp_path, "cached", dict(options, frozen_prefix_cache="memory", frozen_prefix_cache_boundary=1))
    grad_seen: dict[int, set[bool]] = {i: set() for i in range(LAYERS)}

    def watch(index):
        def hook(module, args, output):
            if module.training:
                hidden = output[0] if isinstance(output, tuple) else output
                grad_seen[index].add(hidden.requires_grad)
        return hook

    for i, layer in enumerate(cached.model.model.layers):
        layer.register_forward_hook(watch(i))
    cached.train()
    # Frozen layers 1 and 2, fed cached states that need no gradient, record no autograd graph; layer 3 trains.
    assert grad_seen[1] == grad_seen[2] == {False}
    assert grad_seen[3] == {True}
    assert losses(cached) == losses(plain)
    assert snapshot(cached.model) == snapshot(plain.model)
    boundary = cached.strategy_callback.plan.settings["frozen_prefix_cache"]["boundary"]
    assert (boundary["kind"], boundary["index"], boundary["skipped"]) == ("layer", 1, ["model.layers.0"])
    cache = get_frozen_prefix_cache(cached.model)
    assert (cache.misses, cache.hits) == (8, 16)


def test_a_boundary_above_the_lowest_trained_layer_is_refused():
    with pytest.raises(PlanError, match=r"frozen_prefix_cache_boundary=3 lies above layers\.2.*at most 2"):
        build_plan(model_for(), strategy(trainable_layers="-2:", frozen_prefix_cache="memory",
                                         frozen_prefix_cache_boundary=3))
    with pytest.raises(PlanError, match="has 4 decoder layers"):
        build_plan(model_for(), strategy(trainable_layers="none", train_norm=False, frozen_prefix_cache="memory",
                                         frozen_prefix_cache_boundary=5))


def test_the_layer_count_means_the_final_norms_input():
    plan = build_plan(model_for("seq_cls"), strategy(trainable_layers="none", train_norm=False,
                                                     frozen_prefix_cache="memory", frozen_prefix_cache_boundary=4))
    boundary = plan.settings["frozen_prefix_cache"]["boundary"]
    assert (boundary["kind"], boundary["module"]) == ("norm", "model.norm")  # the head-only plan's own: the head
    assert boundary["skipped"] == [f"model.layers.{i}" for i in range(LAYERS)]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        (dict(frozen_prefix_cache_boundary=1), "frozen_prefix_cache_boundary=1 is not valid: expected unset unless"),
        (dict(frozen_prefix_cache_prepass=False), "frozen_prefix_cache_prepass=False is not valid: expected unset"),
        (dict(frozen_prefix_cache="memory", frozen_prefix_cache_boundary=0), "a positive integer"),
        (dict(frozen_prefix_cache="memory", frozen_prefix_cache_prepass="no"), "true or false"),
    ],
)
def test_placement_options_are_checked(options, fragment):
    with pytest.raises(InvalidArgumentError, match=fragment):
        strategy(**options)


def test_without_a_prepass_samples_are_computed_when_first_met_and_the_cache_is_reported(tmp_path):
    options = dict(trainable_layers="-2:", frozen_prefix_cache="memory")
    lazy = train(tmp_path, "lazy", dict(options, frozen_prefix_cache_prepass=False), epochs=1, max_steps=1)
    lazy.train()
    cache = get_frozen_prefix_cache(lazy.model)
    assert (cache.misses, cache.hits, cache.prepass_samples) == (4, 0, 0)  # one batch met, nothing more
    assert cache.compute_seconds > 0
    assert lazy.strategy_callback.context.reports["frozen_prefix_cache"] is cache
    summary = lazy.strategy_callback.plan.settings["frozen_prefix_cache"]["summary"]
    assert "no pre-pass" in summary
    eager = train(tmp_path, "eager", options, epochs=1, max_steps=1)
    eager.train()
    assert get_frozen_prefix_cache(eager.model).misses == 8  # the pre-pass: every training sample
    assert losses(lazy) == losses(eager)
    assert snapshot(lazy.model) == snapshot(eager.model)


def test_without_a_prepass_a_random_collator_is_still_refused(tmp_path):
    def noisy(samples):
        batch = torch.utils.data.default_collate(samples)
        batch["input_ids"] = torch.randint(3, 100, batch["input_ids"].shape)
        return batch

    args = make_training_args(tmp_path / "run", max_steps=1, per_device_eval_batch_size=4)
    trainer = StrategyTrainer(model=model_for(), args=args, train_dataset=TokenDataset(n=8), data_collator=noisy,
                              strategy_args=strategy(trainable_layers="-2:", frozen_prefix_cache="memory",
                                                     frozen_prefix_cache_prepass=False))
    with pytest.raises(PlanError, match="reached the model differently"):
        trainer.train()
