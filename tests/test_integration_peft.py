"""PEFT: strategies on a LoRA-wrapped model.

LoRA+ (``lora_B`` at a multiple of ``lora_A``'s rate) as one line of configuration, freezing
options combined with ``modules_to_save``, and a Trainer subclass that wraps the model
itself. Training is compared bit for bit with a plain ``Trainer`` frozen and given an
optimizer by hand.
"""

from __future__ import annotations

import pytest

pytest.importorskip("peft", reason="PEFT is an optional extra: pip install 'hf-llama-strategies[peft]'")

import torch  # noqa: E402
import yaml  # noqa: E402
from helpers import TokenDataset, described, losses, make_training_args, snapshot, strategy  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from tiny_models import tiny_model, tiny_peft_lora_model  # noqa: E402
from transformers import Trainer  # noqa: E402

from hf_llama_strategies import StrategyTrainer, StrategyTrainerMixin, build_plan  # noqa: E402

BASE, WD, STEPS = 1e-3, 0.01, 4
FUSED_ADAMW = dict(lr=BASE, betas=(0.9, 0.999), eps=1e-8, fused=True)  # transformers 5's default optim


def plain_trainer(model, tmp_path, dataset, groups: list[tuple[float, float, list[str]]]) -> Trainer:
    """A plain Trainer: only the named parameters train, in the given (lr, weight decay, names) groups."""
    params = dict(model.named_parameters())
    wanted = {n for _, _, names in groups for n in names}
    for name, param in params.items():
        param.requires_grad_(name in wanted)
    optimizer = torch.optim.AdamW(
        [{"params": [params[n] for n in names], "lr": lr, "weight_decay": wd} for lr, wd, names in groups],
        **FUSED_ADAMW,
    )
    return Trainer(model=model, args=make_training_args(tmp_path, max_steps=STEPS), train_dataset=dataset,
                   optimizers=(optimizer, None))


def lora_names(model: torch.nn.Module, which: str, layers=(0, 1, 2)) -> list[str]:
    return [n for n, _ in model.named_parameters()
            if f".{which}.default." in n and any(f".layers.{i}." in n for i in layers)]


# -- LoRA+ ----------------------------------------------------------------------------------

LORA_PLUS_YAML = 'lr_rules: ["lora_B=x16"]   # LoRA+: lora_B at 16x the rate of lora_A\n'


def test_lora_plus_is_one_line_of_configuration_and_equals_a_hand_built_optimizer(tmp_path, lm_dataset):
    options = yaml.safe_load(LORA_PLUS_YAML)
    ours = tiny_peft_lora_model("llama").train()
    trainer = StrategyTrainer(model=ours, args=make_training_args(tmp_path / "a", max_steps=STEPS),
                              train_dataset=lm_dataset, strategy_args=strategy(**options))
    lora_a, lora_b = lora_names(ours, "lora_A"), lora_names(ours, "lora_B")
    assert len(lora_a) == len(lora_b) == 6
    groups = described(trainer.create_optimizer(), ours)
    assert groups == [("default", BASE, WD, lora_a), ("rule:lora_B", 16 * BASE, WD, lora_b)]
    assert trainer.strategy_plan[lora_b[0]].lr_reason == "lr_rules[0]='lora_B=x16'"
    trainer.train()

    theirs = tiny_peft_lora_model("llama").train()
    plain = plain_trainer(theirs, tmp_path / "b", lm_dataset, [(BASE, WD, lora_a), (16 * BASE, WD, lora_b)])
    plain.train()
    assert len(losses(trainer)) == STEPS
    assert losses(trainer) == losses(plain)
    assert snapshot(ours) == snapshot(theirs)
    # Learning rates logged per group, at 16x all along the schedule.
    logged = [h for h in trainer.state.log_history if "learning_rate/rule:lora_B" in h]
    assert logged and all(h["learning_rate/rule:lora_B"] == pytest.approx(16 * h["learning_rate/default"])
                          for h in logged)


def test_lora_plus_control_the_hand_built_comparison_can_fail(tmp_path, lm_dataset):
    # The same hand-built run at one rate for both matrices ends elsewhere.
    ours = tiny_peft_lora_model("llama").train()
    StrategyTrainer(model=ours, args=make_training_args(tmp_path / "a", max_steps=STEPS), train_dataset=lm_dataset,
                    strategy_args=strategy(lr_rules=["lora_B=x16"])).train()
    theirs = tiny_peft_lora_model("llama").train()
    names = lora_names(theirs, "lora_A") + lora_names(theirs, "lora_B")
    plain_trainer(theirs, tmp_path / "b", lm_dataset, [(BASE, WD, names)]).train()
    assert snapshot(ours) != snapshot(theirs)


# -- modules_to_save ----------------------------------------------------------------------


def test_restricted_layers_with_the_modules_to_save_head_copy(tmp_path, cls_dataset):
    # LoRA on a classifier: PEFT puts `score` in modules_to_save (a trainable copy beside
    # the frozen original). Only the last layer's adapters train, and the head copy.
    ours = tiny_peft_lora_model("llama", "seq_cls").train()
    before = snapshot(ours)
    trainer = StrategyTrainer(model=ours, args=make_training_args(tmp_path / "a", max_steps=STEPS),
                              train_dataset=cls_dataset, strategy_args=strategy(trainable_layers="-1:"))
    copy = "base_model.model.score.modules_to_save.default.weight"
    original = "base_model.model.score.original_module.weight"
    last = lora_names(ours, "lora_A", [2]) + lora_names(ours, "lora_B", [2])
    plan = trainer.strategy_plan
    assert set(plan.trainable_names()) == set(last) | {copy}
    assert plan[copy].kind == "head" and plan[original].kind == "head" and not plan[original].trainable
    trainer.train()

    theirs = tiny_peft_lora_model("llama", "seq_cls").train()
    plain = plain_trainer(theirs, tmp_path / "b", cls_dataset, [(BASE, WD, [n for n in plan.trainable_names()])])
    plain.train()
    assert losses(trainer) == losses(plain)
    assert snapshot(ours) == snapshot(theirs)
    moved = {n for n, b in snapshot(ours).items() if b != before[n]}
    assert moved == set(last) | {copy}  # the original head, base weights and layers 0-1's adapters did not move


EMBED_COPY = "base_model.model.model.embed_tokens.modules_to_save.default.weight"
HEAD_COPY = "base_model.model.lm_head.modules_to_save.default.weight"


def lora_with_saved_modules() -> PeftModel:
    model = tiny_model("llama")
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                        modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM")
    return get_peft_model(model, config)


@pytest.mark.parametrize(
    "options, embed_copy, head_copy",
    [
        # A block default (embeddings frozen when the layers are restricted) does not undo
        # what PEFT was asked to train; an explicit option does.
        (dict(trainable_layers="-1:"), True, True),
        (dict(trainable_layers="-1:", train_embeddings=False), False, True),
        (dict(trainable_layers="-1:", train_head=False), True, False),
        (dict(frozen_params=["modules_to_save"]), False, False),
    ],
    ids=["default", "train_embeddings_false", "train_head_false", "frozen_params"],
)
def test_modules_to_save_copies_train_unless_an_option_freezes_them(options, embed_copy, head_copy):
    model = lora_with_saved_modules()
    plan = build_plan(model, strategy(**options))
    assert plan[EMBED_COPY].kind == "embeddings" and plan[HEAD_COPY].kind == "head"
    assert (plan[EMBED_COPY].trainable, plan[HEAD_COPY].trainable) == (embed_copy, head_copy)
    for original in ("base_model.model.model.embed_tokens.original_module.weight",
                     "base_model.model.lm_head.original_module.weight"):
        assert not plan[original].trainable
    if options.get("trainable_layers"):
        assert {d.layer for d in plan if d.trainable and d.kind == "layer"} == {2}
    if embed_copy and "train_embeddings" not in options:
        assert plan[EMBED_COPY].reason.startswith("PEFT modules_to_save")


def test_trainable_params_unfreezes_what_peft_froze():
    model = tiny_peft_lora_model("llama")
    plan = build_plan(model, strategy(trainable_layers="-1:", trainable_params=[r"layers\.2\.mlp\.down_proj"]))
    name = "base_model.model.model.layers.2.mlp.down_proj.weight"
    assert plan[name].trainable and plan[name].requires_grad_before is False
    assert plan[name].reason == r"trainable_params: 'layers\\.2\\.mlp\\.down_proj'"


# -- a Trainer subclass that wraps the model after Trainer.__init__ ------------------------


class WrapsAfterInit(Trainer):
    """Stands for any Trainer subclass that replaces ``self.model`` once Trainer.__init__ is done."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        torch.manual_seed(0)
        self.model = self.model_wrapped = get_peft_model(
            self.model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        )


class StrategyWrapsAfterInit(StrategyTrainerMixin, WrapsAfterInit):
    pass


def test_a_model_replaced_after_trainer_init_is_planned_again(tmp_path):
    bare = tiny_model("llama").train()
    trainer = StrategyWrapsAfterInit(model=bare, args=make_training_args(tmp_path, max_steps=2),
                                     train_dataset=TokenDataset(n=16), strategy_args=strategy(trainable_layers="-1:"))
    assert isinstance(trainer.model, PeftModel) and trainer.strategy_callback.is_prepared(trainer.model)
    expected = lora_names(trainer.model, "lora_A", [2]) + lora_names(trainer.model, "lora_B", [2])
    assert sorted(trainer.strategy_plan.trainable_names()) == sorted(expected)
    assert sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad) == sorted(expected)
    before = snapshot(trainer.model)
    trainer.train()
    moved = {n for n, b in snapshot(trainer.model).items() if b != before[n]}
    assert moved == set(expected)
