"""The frozen-prefix cache with TRL: ``class X(StrategyTrainerMixin, SFTTrainer)``.

SFTTrainer calls the model with ``fused_lm_head=True`` (its head reads the backbone's
``last_hidden_state`` and the head's weight, never calling ``lm_head``) and its collator pads
each batch to its own longest row, with labels -100 on the padding. Each run is compared
with the same trainer with the cache off, on a tiny causal Llama (3 layers), CPU, fp32,
2 epochs. The pre-pass collates ``per_device_eval_batch_size`` rows, so a row can be computed
at another padded length than in training: matrix products of other shapes round differently,
so losses and trainable weights are compared within the tolerances of ``helpers.py`` (which
says why), frozen weights byte for byte; fixed-length rows (packing, 'wrapped') bit for bit.
"""

from __future__ import annotations

import csv
import os

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'hf-llama-strategies[trl]'")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import LOSS_RTOL, StrategySFTTrainer, assert_trained_alike, losses, snapshot, strategy  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from trl import SFTConfig  # noqa: E402

from hf_llama_strategies import PlanError  # noqa: E402
from hf_llama_strategies.cli.demo import DEMO_DIR  # noqa: E402
from hf_llama_strategies.strategies import frozen_prefix_cache as fpc
from hf_llama_strategies.strategies.frozen_prefix_cache import cache as fpc_cache  # noqa: E402

ROWS = 16
EPOCHS = 2


@pytest.fixture(scope="module")
def texts() -> list[str]:
    with open(os.path.join(DEMO_DIR, "train.csv"), encoding="utf-8") as fh:
        return [row["text"] for row in csv.DictReader(fh)][:ROWS]


def datasets(texts: list[str]) -> dict[str, Dataset]:
    return {
        "text": Dataset.from_dict({"text": texts}),
        # completion_only_loss: the prompt's labels are -100 (TRL's completion_mask, folded into labels).
        "prompt_completion": Dataset.from_dict({"prompt": [t[: len(t) // 2] for t in texts],
                                                "completion": [t[len(t) // 2:] for t in texts]}),
    }


def train(tmp_path, tokenizer, data, mode, options, **config):
    values = dict(
        output_dir=str(tmp_path / mode), num_train_epochs=EPOCHS, per_device_train_batch_size=4, max_length=32,
        learning_rate=1e-3, weight_decay=0.01, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    values.update(config)
    model = tiny_model("llama").train()
    trainer = StrategySFTTrainer(model=model, args=SFTConfig(**values), train_dataset=data, processing_class=tokenizer,
                                 strategy_args=strategy(frozen_prefix_cache=mode, **options))
    trainer.train()
    return trainer, model


@pytest.mark.parametrize("options", [dict(trainable_layers="-1:"), dict(trainable_layers="none", train_norm=False)],
                         ids=["last_layer", "head_only"])
@pytest.mark.parametrize("kind", ["text", "prompt_completion"])
def test_sft_trainer_with_the_cache_equals_it_without(tmp_path, tokenizer, texts, kind, options):
    compare(tmp_path, tokenizer, datasets(texts)[kind], options)


def compare(tmp_path, tokenizer, data, options, **config):
    off, off_model = train(tmp_path, tokenizer, data, "off", options)
    on, on_model = train(tmp_path, tokenizer, data, "memory", options, **config)
    cache = fpc.get_frozen_prefix_cache(on_model)
    assert fpc.get_frozen_prefix_cache(off_model) is None
    # Every row computed once by the pre-pass, then hit in both epochs.
    assert (cache.misses, cache.prepass_samples, cache.hits) == (ROWS, ROWS, EPOCHS * ROWS)
    assert len(losses(on)) == len(losses(off)) == EPOCHS * ROWS // 4
    assert losses(on) == pytest.approx(losses(off), rel=LOSS_RTOL, abs=0)
    assert_trained_alike(on_model, off_model, tiny_model("llama"))
    fresh, off_bytes = snapshot(tiny_model("llama")), snapshot(off_model)
    for name, a in on_model.named_parameters():
        if not a.requires_grad:
            assert snapshot_of(a) == off_bytes[name] == fresh[name], name


@pytest.mark.slow
def test_the_comparison_holds_at_one_thread_and_another_prepass_shape(tmp_path, tokenizer, texts):
    # A test of the test (see helpers.py): this machine rounding as another CPU would.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        compare(tmp_path, tokenizer, datasets(texts)["text"], dict(trainable_layers="-1:"),
                per_device_eval_batch_size=3)
    finally:
        torch.set_num_threads(before)


def snapshot_of(param: torch.Tensor) -> bytes:
    return param.detach().flatten().view(torch.uint8).numpy().tobytes()


def test_packed_fixed_length_rows_equal_the_uncached_run_bit_for_bit(tmp_path, tokenizer, texts):
    options = dict(trainable_layers="-1:")
    data = datasets(texts)["text"]
    config = dict(packing=True, packing_strategy="wrapped", padding_free=False, max_length=16)
    off, off_model = train(tmp_path, tokenizer, data, "off", options, **config)
    on, on_model = train(tmp_path, tokenizer, data, "memory", options, **config)
    cache = fpc.get_frozen_prefix_cache(on_model)
    rows = len(on.train_dataset)
    assert rows > ROWS // 2 and (cache.misses, cache.hits) == (rows, EPOCHS * rows)
    assert losses(on) == losses(off)
    assert snapshot(on_model) == snapshot(off_model)


def test_padding_free_batches_are_refused_before_training(tmp_path, tokenizer, texts):
    with pytest.raises(PlanError, match=r"frozen_prefix_cache='memory'.*padding-free.*padding_free=False"):
        train(tmp_path, tokenizer, datasets(texts)["text"], "memory", dict(trainable_layers="-1:"),
              packing=True, packing_strategy="bfd")
    assert not (tmp_path / "memory" / "checkpoint-1").exists()


def test_a_forward_that_skips_the_boundary_is_an_error_not_a_wrong_result(tmp_path, tokenizer, texts, monkeypatch):
    # Without skipping the backbone whole, a head-only cache replaces lm_head's input; TRL's fused
    # head never calls lm_head and would read the skipped norm's placeholder output.
    monkeypatch.setattr(fpc_cache, "_skippable_backbone", lambda model, boundary: None)
    with pytest.raises(RuntimeError, match="never called lm_head"):
        train(tmp_path, tokenizer, datasets(texts)["text"], "memory", dict(trainable_layers="none", train_norm=False))


def test_a_training_batch_the_cache_cannot_key_runs_uncached_with_a_warning(tmp_path, tokenizer, texts, caplog):
    class EmbedsTrainer(StrategySFTTrainer):
        # inputs_embeds instead of input_ids: nothing to key the batch by.
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            ids = inputs.pop("input_ids")
            inputs["inputs_embeds"] = model.get_input_embeddings()(ids)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    values = dict(output_dir=str(tmp_path / "embeds"), max_steps=2, per_device_train_batch_size=4, max_length=32,
                  report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    model = tiny_model("llama").train()
    trainer = EmbedsTrainer(model=model, args=SFTConfig(**values), train_dataset=datasets(texts)["text"],
                            processing_class=tokenizer,
                            strategy_args=strategy(frozen_prefix_cache="memory", trainable_layers="-1:"))
    with caplog.at_level("WARNING", logger="hf_llama_strategies"):
        trainer.train()
    cache = fpc.get_frozen_prefix_cache(model)
    assert (cache.hits, cache.misses) == (0, 0)  # not even the pre-pass: it waits for a batch it can key
    assert len([r for r in caplog.records if "is not one the cache can key" in r.getMessage()]) == 1
