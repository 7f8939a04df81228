"""frozen_prefix_cache: a cached run equals the uncached one, stale caches are never read, refusals.

Runs are short (8 samples, batch 4, 2-3 epochs) on a 4-layer tiny Llama: enough for every later
epoch to hit the cache.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
from conftest import TokenDataset, losses, make_training_args, snapshot, strategy
from tiny_models import tiny_model
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer

from hf_llama_strategies import InvalidArgumentError, PlanError, StrategyCallback, StrategyTrainer, build_plan
from hf_llama_strategies.strategies.frozen_prefix_cache import get_frozen_prefix_cache

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "hf_llama_strategies", "assets", "demo")
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


def train(tmp_path, name, head, options, mode="off", data=None, collator=None, model=None, epochs=3, **overrides):
    model = model if model is not None else model_for(head)
    data = data if data is not None else TokenDataset(n=8, num_labels=3 if head == "seq_cls" else None)
    args = make_training_args(tmp_path / name, max_steps=-1, num_train_epochs=epochs, per_device_eval_batch_size=4,
                              **overrides)
    trainer = StrategyTrainer(model=model, args=args, train_dataset=data, data_collator=collator,
                              strategy_args=strategy(frozen_prefix_cache=mode, **options))
    trainer.train()
    return trainer


def trainable_close(cached: torch.nn.Module, uncached: torch.nn.Module, rel: float) -> None:
    for (name, a), b in zip(cached.named_parameters(), uncached.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a, b, rtol=rel, atol=1e-7, msg=name)


def frozen_bytes(model: torch.nn.Module) -> dict[str, bytes]:
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {n: b for n, b in snapshot(model).items() if n not in trainable}


# -- equivalence ------------------------------------------------------------------------------


@pytest.mark.parametrize(("head", "options"), [("seq_cls", HEAD_ONLY), ("causal_lm", LAST_TWO)], ids=["head", "last2"])
def test_same_batch_shapes_are_bit_exact(tmp_path, head, options):
    plain = train(tmp_path, "plain", head, options)
    cached = train(tmp_path, "cached", head, options, mode="memory")
    assert losses(cached) == losses(plain)
    assert snapshot(cached.model) == snapshot(plain.model)
    cache = get_frozen_prefix_cache(cached.model)
    assert (cache.misses, cache.hits) == (8, 24)  # the pre-pass, then every epoch from the cache


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize(("head", "options"), [("seq_cls", HEAD_ONLY), ("causal_lm", LAST_TWO)], ids=["head", "last2"])
def test_dynamic_padding_on_either_side(tmp_path, head, options, side):
    data = ragged(num_labels=3 if head == "seq_cls" else None)
    collator = collator_for(head, side)
    plain = train(tmp_path, "plain", head, options, data=data, collator=collator)
    cached = train(tmp_path, "cached", head, options, "memory", data=data, collator=collator)
    a, b = losses(cached), losses(plain)
    assert len(a) == len(b) == 6
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=1e-5, atol=0)
    trainable_close(cached.model, plain.model, 1e-5)
    frozen = frozen_bytes(cached.model)
    assert frozen and frozen == frozen_bytes(plain.model)
    assert frozen == {n: b for n, b in snapshot(model_for(head)).items() if n in frozen}
    cache = get_frozen_prefix_cache(cached.model)
    assert cache.hits + cache.misses == 8 + 8 * 3  # the pre-pass, then three epochs
    if side == "right":
        # Trailing padding is cut off: a sample hits in a batch of any length.
        assert (cache.misses, cache.hits) == (8, 24)
    else:
        # Leading padding moves the positions: a sample hits only with the padding it was cached with.
        assert cache.misses >= 8
