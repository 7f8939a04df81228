"""frozen_prefix_cache: a cached run equals the uncached one, stale caches are never read, refusals.

Runs are short (8 samples, batch 4, 2-3 epochs) on a 4-layer tiny Llama: enough for every later
epoch to hit the cache.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from helpers import (
    LOSS_RTOL,
    TokenDataset,
    assert_trained_alike,
    base_config,
    losses,
    make_training_args,
    snapshot,
    strategy,
    write_yaml,
)
from tiny_models import tiny_model
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer

from hf_llama_strategies import InvalidArgumentError, PlanError, StrategyCallback, StrategyTrainer, build_plan
from hf_llama_strategies.strategies.frozen_prefix_cache import get_frozen_prefix_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "hf_llama_strategies", "assets", "demo")
LAYERS = 4
HEAD_ONLY = dict(trainable_layers="none", train_norm=False)
LAST_TWO = dict(trainable_layers="-2:")


def model_for(head: str, **config):
    return tiny_model("llama", head=head, num_hidden_layers=LAYERS, **config)


def ragged(n: int = 8, num_labels: int | None = None, seed: int = 0) -> list[dict]:
    """Samples of 5 to 14 tokens (ids the demo tokenizer knows), so that batches pad to different lengths."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        ids = [rng.randrange(4, 100) for _ in range(rng.randrange(5, 15))]
        sample = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if num_labels is not None:
            sample["labels"] = rng.randrange(num_labels)
        samples.append(sample)
    return samples


def collator_for(head: str, side: str):
    tokenizer = AutoTokenizer.from_pretrained(DEMO)
    tokenizer.padding_side = side
    if head == "seq_cls":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForLanguageModeling(tokenizer, mlm=False)  # labels -100 at padding


def train(tmp_path, name, head, options, mode="off", data=None, collator=None, model=None, epochs=2, **overrides):
    model = model if model is not None else model_for(head)
    data = data if data is not None else TokenDataset(n=8, num_labels=3 if head == "seq_cls" else None)
    # The pre-pass runs at per_device_eval_batch_size: 4, the training batch, unless a test says otherwise.
    args = make_training_args(tmp_path / name, max_steps=-1, num_train_epochs=epochs,
                              **{"per_device_eval_batch_size": 4, **overrides})
    trainer = StrategyTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                              strategy_args=strategy(frozen_prefix_cache=mode, **options))
    trainer.train()
    return trainer


def frozen_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: b for n, b in snapshot(model).items() if n not in trainable}


# -- equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "options", "overrides"),
    [
        ("seq_cls", HEAD_ONLY, {}),
        ("causal_lm", LAST_TWO, {}),
        ("causal_lm", LAST_TWO, dict(activation_checkpointing=True,
                                     activation_checkpointing_kwargs={"use_reentrant": True})),
        ("causal_lm", dict(LAST_TWO, unfreeze_schedule="gradual", unfreeze_interval_steps=2), {}),
        ("causal_lm", dict(LAST_TWO, lisa_layers=1, lisa_interval_steps=2), {}),
    ],
    ids=["head", "last2", "last2-checkpointing", "gradual", "lisa"],
)
def test_same_batch_shapes_are_bit_exact(tmp_path, head, options, overrides):
    plain = train(tmp_path, "plain", head, options, **overrides)
    cached = train(tmp_path, "cached", head, options, mode="memory", **overrides)
    assert losses(cached) == losses(plain)
    assert snapshot(cached.model) == snapshot(plain.model)
    cache = get_frozen_prefix_cache(cached.model)
    assert (cache.misses, cache.hits) == (8, 16)  # the pre-pass, then every epoch from the cache


def compare_across_shapes(tmp_path, head, options, side, **overrides):
    """The cached and the uncached run of ragged data (the pre-pass pads and batches rows otherwise)."""
    data = ragged(num_labels=3 if head == "seq_cls" else None)
    collator = collator_for(head, side)
    plain = train(tmp_path, "plain", head, options, data=data, collator=collator)
    cached = train(tmp_path, "cached", head, options, "memory", data=data, collator=collator, **overrides)
    a, b = losses(cached), losses(plain)
    assert len(a) == len(b) == 4
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0)  # helpers.py says why not bit for bit
    assert_trained_alike(cached.model, plain.model, model_for(head))
    frozen = frozen_bytes(cached.model)
    assert frozen and frozen == frozen_bytes(plain.model)
    assert frozen == {n: b for n, b in snapshot(model_for(head)).items() if n in frozen}
    return get_frozen_prefix_cache(cached.model)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("head", "options"), [("seq_cls", HEAD_ONLY), ("causal_lm", LAST_TWO)], ids=["head", "last2"])
def test_dynamic_padding_on_either_side(tmp_path, head, options, side):
    cache = compare_across_shapes(tmp_path, head, options, side)
    assert cache.hits + cache.misses == 8 + 8 * 2  # the pre-pass, then two epochs
    if side == "right":
        # Trailing padding is cut off: a sample hits in a batch of any length.
        assert (cache.misses, cache.hits) == (8, 16)
    else:
        # Leading padding moves the positions: a sample hits only with the padding it was cached with.
        assert cache.misses >= 8


@pytest.mark.slow
@pytest.mark.parametrize(("threads", "prepass_batch"), [(1, 2), (2, 8), (1, 3)])
def test_the_comparisons_hold_at_other_thread_counts_and_prepass_shapes(tmp_path, threads, prepass_batch):
    # A test of the tests: other CPUs round other shapes otherwise. Other thread counts and other
    # pre-pass batch shapes make this machine do so; the tolerances of helpers.py must hold, and
    # same-shape runs must stay bit for bit.
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare_across_shapes(tmp_path / "ragged", "causal_lm", LAST_TWO, "right",
                              per_device_eval_batch_size=prepass_batch)
        plain = train(tmp_path, "plain", "seq_cls", HEAD_ONLY)
        cached = train(tmp_path, "cached", "seq_cls", HEAD_ONLY, mode="memory")
        assert losses(cached) == losses(plain) and snapshot(cached.model) == snapshot(plain.model)
    finally:
        torch.set_num_threads(before)


# -- the fingerprint: what changes the prefix misses, what does not hits ----------------------


def disk_run(tmp_path, name, cache_dir, model=None, options=HEAD_ONLY, mode="disk", **overrides):
    head = "seq_cls"
    model = model if model is not None else model_for(head)
    data = TokenDataset(n=8, num_labels=3)
    args = make_training_args(tmp_path / name, max_steps=-1, num_train_epochs=2, per_device_eval_batch_size=4,
                              **overrides.pop("training", {}))
    extra = dict(frozen_prefix_cache_dir=str(cache_dir)) if mode == "disk" else {}
    trainer = StrategyTrainer(model=model, args=args, train_dataset=data,
                              strategy_args=strategy(frozen_prefix_cache=mode, **extra, **options, **overrides))
    trainer.train()
    return trainer


def test_disk_cache_is_reused_by_a_run_with_another_head_lr(tmp_path):
    cache_dir = tmp_path / "cache"
    first = disk_run(tmp_path, "first", cache_dir, head_lr=1e-3)
    assert get_frozen_prefix_cache(first.model).misses == 8
    second = disk_run(tmp_path, "second", cache_dir, head_lr=5e-3)
    cache = get_frozen_prefix_cache(second.model)
    assert (cache.loaded_entries, cache.misses, cache.hits) == (8, 0, 16)
    plain = disk_run(tmp_path, "plain", cache_dir, mode="off", head_lr=5e-3)
    assert losses(second) == losses(plain)
    assert snapshot(second.model) == snapshot(plain.model)
    assert len(os.listdir(cache_dir)) == 1  # one fingerprint


def _perturbed():
    model = model_for("seq_cls")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    return model


@pytest.mark.parametrize(
    ("changed", "options"),
    [
        ("frozen weight", HEAD_ONLY),
        ("dtype", dict(HEAD_ONLY, precision="bf16", frozen_dtype="bf16")),
        ("plan", dict(trainable_layers="-1:")),
    ],
)
def test_a_changed_prefix_misses_the_cache(tmp_path, changed, options):
    cache_dir = tmp_path / "cache"
    disk_run(tmp_path, "first", cache_dir)
    model = _perturbed() if changed == "frozen weight" else model_for("seq_cls")
    cached = disk_run(tmp_path, "second", cache_dir, model=model, options=options)
    cache = get_frozen_prefix_cache(cached.model)
    assert (cache.loaded_entries, cache.misses) == (0, 8)
    assert len(os.listdir(cache_dir)) == 2
    # A stale hit would train on the first run's features: the losses would be those of the first model.
    model = _perturbed() if changed == "frozen weight" else model_for("seq_cls")
    plain = disk_run(tmp_path, "plain", cache_dir, model=model, options=options, mode="off")
    assert losses(cached) == losses(plain)


def test_resumed_run_hits_the_disk_cache_and_equals_the_uninterrupted_one(tmp_path):
    cache_dir = tmp_path / "cache"
    full = disk_run(tmp_path, "full", cache_dir, training={"save_strategy": "steps", "save_steps": 2})
    resumed_model = model_for("seq_cls")
    args = make_training_args(tmp_path / "full", max_steps=-1, num_train_epochs=2, per_device_eval_batch_size=4)
    trainer = StrategyTrainer(
        model=resumed_model, args=args, train_dataset=TokenDataset(n=8, num_labels=3),
        strategy_args=strategy(frozen_prefix_cache="disk", frozen_prefix_cache_dir=str(cache_dir), **HEAD_ONLY),
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    cache = get_frozen_prefix_cache(resumed_model)
    assert (cache.loaded_entries, cache.misses, cache.hits) == (8, 0, 8)
    assert losses(trainer) == losses(full)  # the checkpoint's log history, then the resumed steps
    assert snapshot(resumed_model) == snapshot(full.model)


def test_evaluation_uses_the_cache(tmp_path):
    model = model_for("seq_cls")
    data = TokenDataset(n=8, num_labels=3)
    evaluation = TokenDataset(n=4, num_labels=3, seed=1)
    args = make_training_args(tmp_path / "run", max_steps=-1, num_train_epochs=1, per_device_eval_batch_size=4)
    trainer = StrategyTrainer(model=model, args=args, train_dataset=data, eval_dataset=evaluation,
                              strategy_args=strategy(frozen_prefix_cache="memory", **HEAD_ONLY))
    trainer.train()
    cache = get_frozen_prefix_cache(model)
    first = trainer.evaluate()["eval_loss"]
    misses, hits = cache.misses, cache.hits
    second = trainer.evaluate()["eval_loss"]
    assert (cache.misses, cache.hits) == (misses, hits + 4)
    plain = StrategyTrainer(model=model_for("seq_cls"), args=args, train_dataset=data, eval_dataset=evaluation,
                            strategy_args=strategy(**HEAD_ONLY))
    plain.train()
    assert first == second == plain.evaluate()["eval_loss"]


def test_plain_trainer_with_the_callback(tmp_path):
    data = TokenDataset(n=8, num_labels=3)
    args = make_training_args(tmp_path / "run", max_steps=-1, num_train_epochs=2, per_device_eval_batch_size=4)
    model = model_for("seq_cls")
    callback = StrategyCallback(strategy(frozen_prefix_cache="memory", **HEAD_ONLY))
    cached = Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    cached.train()
    assert get_frozen_prefix_cache(model).hits == 16
    plain = StrategyTrainer(model=model_for("seq_cls"), args=args, train_dataset=data,
                            strategy_args=strategy(**HEAD_ONLY))
    plain.train()
    assert losses(cached) == losses(plain)


def test_gradual_unfreezing_caches_below_the_lowest_layer_that_ever_trains():
    plan = build_plan(model_for("causal_lm"), strategy(
        frozen_prefix_cache="memory", trainable_layers="-2:", unfreeze_schedule="gradual", unfreeze_interval_steps=2))
    boundary = plan.settings["frozen_prefix_cache"]["boundary"]
    assert (boundary["kind"], boundary["index"], boundary["module"]) == ("layer", 2, "model.layers.2")
    assert boundary["skipped"] == ["model.layers.0", "model.layers.1"]
    head = build_plan(model_for("seq_cls"), strategy(frozen_prefix_cache="memory", **HEAD_ONLY))
    boundary = head.settings["frozen_prefix_cache"]["boundary"]
    assert (boundary["kind"], boundary["module"]) == ("head", "score")
    assert boundary["skipped"][-1] == "model.norm"


def test_plan_says_when_a_run_would_gain(tmp_path):
    args = make_training_args(tmp_path, max_steps=-1, num_train_epochs=3)
    plan = build_plan(model_for("seq_cls"), strategy(**HEAD_ONLY), args)
    summary = plan.settings["frozen_prefix_cache"]["summary"]
    assert "frozen_prefix_cache: memory would run them once" in summary and "over 3 epochs" in summary
    assert "frozen_prefix_cache" in plan.table()
    # No option, no difference: full fine-tuning has no frozen prefix to talk about.
    assert "frozen_prefix_cache" not in build_plan(model_for("seq_cls"), strategy(), args).settings
    cached = build_plan(model_for("seq_cls"), strategy(frozen_prefix_cache="memory", **HEAD_ONLY), args)
    assert "per token" in cached.settings["frozen_prefix_cache"]["summary"]


@pytest.mark.parametrize("tied", [True, False])
def test_the_estimate_counts_the_head_tied_or_not(tmp_path, tied):
    # SmolLM2-135M's head, tied to the embeddings, costs per token what 8 of its 30 layers do: an
    # estimate that left it out (a tied head is listed as the embeddings) promised too much.
    from hf_llama_strategies.strategies.frozen_prefix_cache.boundary import estimated_run_ratio, find_boundary

    model = tiny_model("llama", tie_word_embeddings=tied)
    args = make_training_args(tmp_path, max_steps=-1, num_train_epochs=2)
    plan = build_plan(model, strategy(trainable_layers="-1:", frozen_prefix_cache="memory"), args)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    head, norm = model.lm_head.weight.numel(), model.model.norm.weight.numel()
    layers = model.config.num_hidden_layers
    forward = layers * layer + head + norm
    prefix = (layers - 1) * layer
    # The weight gradients of what trains (the last layer, the norm, an untied head), the input gradients above.
    backward = layer + norm + (0 if tied else head) + (forward - prefix)
    share, ratio = estimated_run_ratio(plan, find_boundary(plan, None), 2)
    assert (share, ratio) == (prefix / forward, 1 - prefix / (2 * (forward + backward)))
    assert f"estimated {ratio:.2f} of the uncached run's compute over 2 epochs" in plan.settings[
        "frozen_prefix_cache"]["summary"]


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "config", "message"),
    [
        (dict(trainable_layers="all", train_embeddings=False), {}, "layer 0 trains"),
        (dict(trainable_layers="-2:", train_embeddings=True), {}, "input embeddings train"),
        (dict(lisa_layers=1, train_embeddings=False), {}, "layer 0 trains"),
        (dict(trainable_layers="-2:"), {"attention_dropout": 0.1}, "dropout is active"),
    ],
    ids=["nothing-frozen", "embeddings", "lisa-all-layers", "dropout"],
)
def test_refused_before_anything_is_written(tmp_path, options, config, message):
    out = tmp_path / "out"
    with pytest.raises(PlanError, match=message) as error:
        StrategyTrainer(model=model_for("causal_lm", **config), args=make_training_args(out),
                        train_dataset=TokenDataset(n=8),
                        strategy_args=strategy(frozen_prefix_cache="memory", **options))
    assert "frozen_prefix_cache='memory'" in str(error.value)
    assert not out.exists()


def test_refused_with_neftune(tmp_path):
    with pytest.raises(PlanError, match="neftune_noise_alpha"):
        StrategyTrainer(model=model_for("causal_lm"), args=make_training_args(tmp_path, neftune_noise_alpha=5.0),
                        train_dataset=TokenDataset(n=8),
                        strategy_args=strategy(frozen_prefix_cache="memory", **LAST_TWO))


class RandomCrop:
    """A collator that cuts a random number of tokens off the end (inputs change between epochs)."""

    def __call__(self, features):
        cut = random.randrange(1, 8)
        ids = torch.stack([torch.as_tensor(f["input_ids"])[:-cut] for f in features])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("collator", ["mlm", "crop"])
def test_collator_that_changes_inputs_is_refused(tmp_path, collator):
    if collator == "mlm":
        tokenizer = AutoTokenizer.from_pretrained(DEMO)
        tokenizer.add_special_tokens({"mask_token": "[MASK]"})
        data_collator = DataCollatorForLanguageModeling(tokenizer, mlm=True)
        data = ragged()
    else:
        data_collator, data = RandomCrop(), TokenDataset(n=8)
    trainer = StrategyTrainer(model=model_for("causal_lm"), args=make_training_args(tmp_path), train_dataset=data,
                              data_collator=data_collator,
                              strategy_args=strategy(frozen_prefix_cache="memory", **LAST_TWO))
    state = torch.get_rng_state()
    with pytest.raises(PlanError, match="frozen_prefix_cache='memory'.*(mlm=True|collated twice)"):
        trainer.train()
    assert torch.equal(torch.get_rng_state(), state)  # the check drew nothing the data order depends on


def test_unwritable_cache_dir_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = tmp_path / "out"
    with pytest.raises(InvalidArgumentError, match="frozen_prefix_cache_dir"):
        StrategyTrainer(model=model_for("seq_cls"), args=make_training_args(out),
                        train_dataset=TokenDataset(n=8, num_labels=3),
                        strategy_args=strategy(frozen_prefix_cache="disk", frozen_prefix_cache_dir=str(blocker / "c"),
                                               **HEAD_ONLY))
    assert not out.exists()


def test_cache_over_its_limit_is_refused_with_the_figure(tmp_path):
    trainer = StrategyTrainer(model=model_for("seq_cls"), args=make_training_args(tmp_path),
                              train_dataset=TokenDataset(n=8, num_labels=3),
                              strategy_args=strategy(frozen_prefix_cache="memory", frozen_prefix_cache_max_gb=1e-5,
                                                     **HEAD_ONLY))
    # 8 samples x 16 tokens x 64 hidden x 4 bytes = 32768 bytes > 10000.
    with pytest.raises(PlanError, match=r"frozen_prefix_cache_max_gb=1e-05: .* 0\.000 GB \(32\.00 KiB"):
        trainer.train()
    assert get_frozen_prefix_cache(trainer.model).misses == 0


@pytest.mark.parametrize(
    ("options", "option"),
    [
        (dict(frozen_prefix_cache="ram"), "frozen_prefix_cache"),
        (dict(frozen_prefix_cache="memory", frozen_prefix_cache_dir="/tmp/x"), "frozen_prefix_cache_dir"),
        (dict(frozen_prefix_cache="memory", frozen_prefix_cache_max_gb=0), "frozen_prefix_cache_max_gb"),
        (dict(frozen_prefix_cache_max_gb=1.0), "frozen_prefix_cache_max_gb"),
    ],
)
def test_bad_options(options, option):
    with pytest.raises(InvalidArgumentError, match=f"^{option}="):
        strategy(**options)


def test_cli_train_with_the_cache_matches_without(tmp_path, tiny_config_dir, cls_files):
    from hf_llama_strategies import cli

    results = {}
    for mode in ("off", "memory"):
        config = base_config(tiny_config_dir, tmp_path / mode, train_file=cls_files[0], validation_file=cls_files[1],
                             trainable_layers="none", train_norm=False, frozen_prefix_cache=mode, max_steps=8)
        assert cli.main(["train", write_yaml(tmp_path / f"{mode}.yaml", config)]) == 0
        results[mode] = json.loads((tmp_path / mode / "all_results.json").read_text())
        plan = json.loads((tmp_path / mode / "strategy_plan.json").read_text())
        assert plan["settings"].get("frozen_prefix_cache", {"mode": "off"})["mode"] == mode
    for key in ("train_loss", "eval_loss", "eval_accuracy"):
        assert results["memory"][key] == pytest.approx(results["off"][key], rel=1e-5), key


def test_off_is_no_option():
    for value in ("off", "OFF", None):
        assert strategy(frozen_prefix_cache=value).options_set() == []
    assert strategy(frozen_prefix_cache="memory").options_set() == ["frozen_prefix_cache"]


def test_a_model_trained_with_the_cache_is_freed_once_dropped(tmp_path, lm_dataset):
    import gc
    import weakref

    model = tiny_model("llama")
    trainer = StrategyTrainer(model=model, args=make_training_args(tmp_path, max_steps=2), train_dataset=lm_dataset,
                              strategy_args=strategy(trainable_layers="-1:", frozen_prefix_cache="memory"))
    trainer.train()
    assert get_frozen_prefix_cache(model) is not None
    alive = weakref.ref(model)
    del model, trainer
    gc.collect()
    assert alive() is None, "the registry of installed caches kept the model (and its cached states) alive"
