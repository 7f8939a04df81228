"""TRL: ``StrategyTrainerMixin`` and ``StrategyCallback`` with ``SFTTrainer``.

Equivalence tests compare with a plain ``SFTTrainer`` whose parameters were frozen by hand
and whose optimizer was built by hand, group by group: losses and weights must be
bit-identical (CPU, fp32, fixed seeds).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("trl", reason="TRL is an optional extra: pip install 'hf-llama-strategies[trl]'")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from helpers import StrategySFTTrainer, callback_types, described, files, losses, snapshot, strategy  # noqa: E402
from tiny_models import tiny_model  # noqa: E402
from transformers import set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_llama_strategies import (  # noqa: E402
    InvalidArgumentError,
    PlanError,
    StrategyArguments,
    StrategyCallback,
    build_plan,
)
from hf_llama_strategies.cli.demo import DEMO_DIR  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE, HEAD_LR, WD = 1e-3, 5e-3, 0.01
STEPS = 4


@pytest.fixture(scope="module")
def texts() -> Dataset:
    with open(os.path.join(DEMO_DIR, "train.csv"), encoding="utf-8") as fh:
        rows = [row["text"] for row in csv.DictReader(fh)]
    return Dataset.from_dict({"text": rows[:64]})


def sft_config(output_dir, **overrides) -> SFTConfig:
    values = dict(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=4, max_length=32,
        learning_rate=BASE, weight_decay=WD, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    values.update(overrides)
    return SFTConfig(**values)


# -- full model: freezing + head_lr ---------------------------------------------------------


def hand_built(model: torch.nn.Module) -> torch.optim.Optimizer:
    """What trainable_layers='-2:' + head_lr=5e-3 means for the 3-layer tiny Llama, by hand."""
    trained = {n: p for n, p in model.named_parameters() if n.startswith(("model.layers.1.", "model.layers.2.",
                                                                          "model.norm.", "lm_head."))}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    body = [p for n, p in trained.items() if n != "lm_head.weight" and "norm" not in n]
    norms = [p for n, p in trained.items() if "norm" in n]
    groups = [
        {"params": body, "lr": BASE, "weight_decay": WD},
        {"params": norms, "lr": BASE, "weight_decay": 0.0},
        {"params": [trained["lm_head.weight"]], "lr": HEAD_LR, "weight_decay": WD},
    ]
    return torch.optim.AdamW(groups, lr=BASE, fused=True)  # transformers 5's default optim


def test_mixin_and_callback_equal_sft_trainer_frozen_by_hand(tmp_path, tokenizer, texts):
    options = dict(trainable_layers="-2:", head_lr=HEAD_LR)

    ours = tiny_model("llama").train()
    trainer = StrategySFTTrainer(model=ours, args=sft_config(tmp_path / "mixin"), train_dataset=texts,
                                 processing_class=tokenizer, strategy_args=strategy(**options))
    assert trainer.strategy_callback.is_prepared(trainer.model)
    assert [g[0] for g in described(trainer.create_optimizer(), ours)] == ["default", "default.no_decay", "head"]
    trainer.train()

    # StrategyCallback with SFTTrainer itself, unchanged.
    by_callback = tiny_model("llama").train()
    callback = StrategyCallback(strategy(**options))
    plain_cb = SFTTrainer(model=by_callback, args=sft_config(tmp_path / "callback"), train_dataset=texts,
                          processing_class=tokenizer, callbacks=[callback],
                          optimizer_cls_and_kwargs=callback.optimizer_cls_and_kwargs())
    plain_cb.train()

    by_hand = tiny_model("llama").train()
    plain = SFTTrainer(model=by_hand, args=sft_config(tmp_path / "hand"), train_dataset=texts,
                       processing_class=tokenizer, optimizers=(hand_built(by_hand), None))
    plain.train()

    assert len(losses(trainer)) == STEPS
    assert losses(trainer) == losses(plain) == losses(plain_cb)
    assert snapshot(ours) == snapshot(by_hand) == snapshot(by_callback)
    assert described(plain_cb.optimizer, by_callback) == described(trainer.optimizer, ours)
    # The frozen layer really did not move.
    fresh = snapshot(tiny_model("llama"))
    assert all(snapshot(ours)[n] == fresh[n] for n in fresh if n.startswith(("model.layers.0.", "model.embed")))
    assert snapshot(ours)["model.layers.2.mlp.up_proj.weight"] != fresh["model.layers.2.mlp.up_proj.weight"]
    assert os.path.isfile(tmp_path / "mixin" / "strategy_plan.json")


# -- SFTTrainer(peft_config=...): the plan is built for the wrapped model ---------------------

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
LORA_PLUS = dict(trainable_layers="-1:", lr_rules=["lora_B=x16"])


def lora_config():
    from peft import LoraConfig

    return LoraConfig(**LORA)


def test_peft_config_plan_is_rebuilt_for_the_wrapped_model_and_equals_hand_built(tmp_path, tokenizer, texts):
    pytest.importorskip("peft", reason="PEFT is an optional extra: pip install 'hf-llama-strategies[peft]'")
    from peft import PeftModel, get_peft_model

    bare = tiny_model("llama").train()
    # The rule names adapter weights: on the bare model it matches nothing.
    with pytest.raises(PlanError, match="matches no parameter"):
        build_plan(bare, strategy(**LORA_PLUS))

    trainer = StrategySFTTrainer(model=bare, args=sft_config(tmp_path / "mixin"), train_dataset=texts,
                                 processing_class=tokenizer, peft_config=lora_config(),
                                 strategy_args=strategy(**LORA_PLUS))
    wrapped = trainer.model
    assert isinstance(wrapped, PeftModel)
    assert trainer.strategy_callback.is_prepared(wrapped)
    plan = trainer.strategy_plan
    assert plan.model_class == type(wrapped).__name__
    last = "base_model.model.model.layers.2.self_attn"
    lora_a = [f"{last}.{m}.lora_A.default.weight" for m in ("q_proj", "v_proj")]
    lora_b = [f"{last}.{m}.lora_B.default.weight" for m in ("q_proj", "v_proj")]
    assert plan.trainable_names() == [lora_a[0], lora_b[0], lora_a[1], lora_b[1]]
    assert described(trainer.create_optimizer(), wrapped) == [
        ("default", BASE, WD, lora_a), ("rule:lora_B", 16 * BASE, WD, lora_b),
    ]
    trainer.train()

    # By hand: the same LoRA model (SFTTrainer seeds before wrapping), adapters of layers
    # 0-1 frozen, lora_B at 16x.
    base = tiny_model("llama").train()
    set_seed(0)
    theirs = get_peft_model(base, lora_config())
    start = snapshot(theirs)
    params = dict(theirs.named_parameters())
    for name, param in params.items():
        param.requires_grad_(name in lora_a + lora_b)
    optimizer = torch.optim.AdamW(
        [{"params": [params[n] for n in lora_a], "lr": BASE, "weight_decay": WD},
         {"params": [params[n] for n in lora_b], "lr": 16 * BASE, "weight_decay": WD}],
        lr=BASE, fused=True,
    )
    plain = SFTTrainer(model=theirs, args=sft_config(tmp_path / "hand"), train_dataset=texts,
                       processing_class=tokenizer, optimizers=(optimizer, None))
    plain.train()
    assert losses(trainer) == losses(plain)
    assert snapshot(wrapped) == snapshot(theirs)
    moved = {n for n, b in snapshot(wrapped).items() if b != start[n]}
    assert moved == set(lora_a) | set(lora_b)


def test_peft_config_bad_strategy_fails_before_anything_is_written(tmp_path, tokenizer, texts):
    pytest.importorskip("peft", reason="PEFT is an optional extra: pip install 'hf-llama-strategies[peft]'")
    out = tmp_path / "out"
    with pytest.raises(InvalidArgumentError, match="it has 3 layers"):
        StrategySFTTrainer(model=tiny_model("llama"), args=sft_config(out), train_dataset=texts,
                           processing_class=tokenizer, peft_config=lora_config(),
                           strategy_args=strategy(trainable_layers="5"))
    assert not out.exists()


@pytest.mark.slow
def test_trl_example_script(tmp_path):
    pytest.importorskip("peft", reason="PEFT is an optional extra: pip install 'hf-llama-strategies[peft]'")
    for flags in ([], ["--lora"]):
        out = tmp_path / ("lora" if flags else "full")
        result = subprocess.run(
            [sys.executable, os.path.join(ROOT, "examples", "trl_sft.py"), "--output_dir", str(out),
             "--max_steps", "3", *flags],
            capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert "train loss" in result.stdout
        assert (out / "strategy_plan.json").is_file()


def test_a_model_id_loaded_by_sft_trainer_is_planned(tmp_path, tokenizer, texts):
    path = tmp_path / "model"
    tiny_model("llama").save_pretrained(path)
    trainer = StrategySFTTrainer(model=str(path), args=sft_config(tmp_path / "out", max_steps=1), train_dataset=texts,
                                 processing_class=tokenizer, strategy_args=strategy(trainable_layers="-1:"))
    assert trainer.strategy_callback.is_prepared(trainer.model)
    trained = sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert trained == sorted(trainer.strategy_plan.trainable_names()) == sorted(
        n for n, _ in trainer.model.named_parameters() if n.startswith(("model.layers.2.", "model.norm.", "lm_head."))
    )


# -- no option set: the mixin is SFTTrainer itself -------------------------------------------


def test_no_option_mixin_is_sft_trainer_bit_for_bit(tmp_path, tokenizer, texts):
    """Losses, weights, every file of output_dir and checkpoints, callbacks, optimizer, args identity."""
    overrides = dict(save_strategy="steps", save_steps=2)
    ours_model, plain_model = tiny_model("llama").train(), tiny_model("llama").train()
    ours_args, plain_args = sft_config(tmp_path / "ours", **overrides), sft_config(tmp_path / "plain", **overrides)
    ours = StrategySFTTrainer(model=ours_model, args=ours_args, train_dataset=texts, processing_class=tokenizer,
                              strategy_args=StrategyArguments())
    plain = SFTTrainer(model=plain_model, args=plain_args, train_dataset=texts, processing_class=tokenizer)

    assert plain.args is plain_args and ours.args is ours_args
    assert ours.model is ours_model and plain.model is plain_model
    assert callback_types(ours) == callback_types(plain)
    assert not any(isinstance(c, StrategyCallback) for c in ours.callback_handler.callbacks)
    ours.train()
    plain.train()
    ours.save_model()
    plain.save_model()

    assert len(losses(ours)) == STEPS and losses(ours) == losses(plain)
    assert snapshot(ours_model) == snapshot(plain_model)
    assert described(ours.optimizer, ours_model) == described(plain.optimizer, plain_model)
    assert type(ours.optimizer.optimizer) is type(plain.optimizer.optimizer)
    assert files(tmp_path / "ours") == files(tmp_path / "plain")
    assert "checkpoint-2/trainer_state.json" in files(tmp_path / "ours")
    assert not any(f.endswith("strategy_plan.json") for f in files(tmp_path / "ours"))
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        ours_w, plain_w = (tmp_path / d / sub / "model.safetensors" for d in ("ours", "plain"))
        assert ours_w.read_bytes() == plain_w.read_bytes()
