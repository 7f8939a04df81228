"""The freezing strategy's decisions, parameter by parameter, and the plan's forms."""

from __future__ import annotations

import pytest
from tiny_models import tiny_model

from hf_llama_strategies import PlanError, StrategyArguments, StrategyPlan, build_plan


def trainable(plan: StrategyPlan) -> set[str]:
    return set(plan.trainable_names())


def test_default_is_full_fine_tuning():
    model = tiny_model("llama")
    plan = build_plan(model)
    assert trainable(plan) == {n for n, _ in model.named_parameters()}
    assert all(d.reason == "default: full fine-tuning" for d in plan)


def test_last_two_layers_train_with_norm_and_head_embeddings_frozen():
    plan = build_plan(tiny_model("llama"), StrategyArguments(trainable_layers="-2:"))
    for d in plan:
        expected = d.kind in ("norm", "head") or (d.kind == "layer" and d.layer in (1, 2))
        assert d.trainable is expected, d.name
    assert plan["model.embed_tokens.weight"].reason.startswith("default: embeddings frozen")
    assert plan["model.layers.0.mlp.up_proj.weight"].reason == "trainable_layers='-2:'"


def test_llama_factory_freeze_configuration_layers_only():
    plan = build_plan(
        tiny_model("llama"), StrategyArguments(trainable_layers="-2:", train_norm=False, train_head=False)
    )
    assert {d.layer for d in plan if d.trainable} == {1, 2}
    assert all(d.kind == "layer" for d in plan if d.trainable)


def test_trainable_modules_match_whole_path_components():
    plan = build_plan(
        tiny_model("llama"), StrategyArguments(trainable_layers="0", trainable_modules="q_proj,mlp.down_proj")
    )
    layer_trained = {d.name for d in plan if d.trainable and d.kind == "layer"}
    assert layer_trained == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"}


def test_regexes_add_then_frozen_params_win():
    args = StrategyArguments(
        trainable_layers="none",
        train_head=False,
        train_norm=False,
        trainable_params=[r"layers\.0\.self_attn\.", r"embed_tokens"],
        frozen_params=[r"\.k_proj\."],
    )
    plan = build_plan(tiny_model("llama"), args)
    assert trainable(plan) == {
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
    }
    assert plan["model.layers.0.self_attn.k_proj.weight"].reason == r"frozen_params: '\\.k_proj\\.'"


def test_train_embeddings_explicit_in_partial_plan():
    plan = build_plan(tiny_model("llama"), StrategyArguments(trainable_layers="-1:", train_embeddings=True))
    assert plan["model.embed_tokens.weight"].trainable
    assert plan["model.embed_tokens.weight"].reason == "train_embeddings=true"


def test_full_fine_tuning_with_frozen_embeddings():
    plan = build_plan(tiny_model("llama"), StrategyArguments(train_embeddings=False))
    assert not plan["model.embed_tokens.weight"].trainable
    assert all(d.trainable for d in plan if d.kind != "embeddings")


# -- tied input/output embeddings (Gemma ties them by default) ---------------------------


def test_tied_head_follows_explicit_head_setting():
    plan = build_plan(tiny_model("gemma"), StrategyArguments(trainable_layers="-1:", train_head=True))
    tied = plan["model.embed_tokens.weight"]
    assert tied.tied_with == ("lm_head.weight",)
    assert tied.trainable and "train_head=true" in tied.reason and "tied" in tied.reason


def test_tied_head_frozen_by_default_with_a_note_when_embeddings_are_frozen():
    plan = build_plan(tiny_model("gemma"), StrategyArguments(trainable_layers="-1:"))
    assert not plan["model.embed_tokens.weight"].trainable
    assert len(plan.notes) == 1 and "lm_head.weight" in plan.notes[0] and "train_head: true" in plan.notes[0]
    assert "note: " in plan.table()


def test_tied_conflict_is_an_error():
    with pytest.raises(PlanError, match="one tied tensor.*disagree"):
        build_plan(tiny_model("gemma"), StrategyArguments(train_head=True, train_embeddings=False))


def test_tied_full_fine_tuning_trains_the_shared_tensor():
    plan = build_plan(tiny_model("gemma"))
    assert plan["model.embed_tokens.weight"].trainable and not plan.notes


def test_untying_removes_the_conflict():
    plan = build_plan(
        tiny_model("gemma", tie_word_embeddings=False), StrategyArguments(train_head=True, train_embeddings=False)
    )
    assert plan["lm_head.weight"].trainable and not plan["model.embed_tokens.weight"].trainable


# -- the plan's forms ---------------------------------------------------------------------


def test_plan_json_round_trip(tmp_path):
    plan = build_plan(
        tiny_model("qwen2", "seq_cls"), StrategyArguments(trainable_layers="-1:", trainable_modules="mlp")
    )
    plan.save(str(tmp_path))
    again = StrategyPlan.load(str(tmp_path))
    assert again.to_dict() == plan.to_dict()
    assert again.trainable_names() == plan.trainable_names()


def _row_labels(table: str) -> list[str]:
    # Rows run from under the header to the total; settings and notes follow.
    lines = table.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("total"))
    return [line.split()[0] for line in lines[3 : end + 1] if not line.startswith("-")]


def test_table_merges_identical_layers_and_shows_totals():
    plan = build_plan(tiny_model("llama"), StrategyArguments(trainable_layers="0,2"))
    assert _row_labels(plan.table()) == ["embeddings", "layers.0", "layers.1", "layers.2", "norm", "head", "total"]
    full = build_plan(tiny_model("llama")).table()
    assert _row_labels(full) == ["embeddings", "layers.0-2", "norm", "head", "total"]


def test_apply_refuses_another_models_plan():
    plan = build_plan(tiny_model("llama"))
    with pytest.raises(PlanError, match="another model"):
        plan.apply(tiny_model("gpt2"))


def test_building_twice_is_idempotent():
    model = tiny_model("llama")
    args = StrategyArguments(trainable_layers="-1:", trainable_params=["layers\\.0\\.mlp"])
    first = build_plan(model, args)
    first.apply(model)
    second = build_plan(model, args)
    assert second.trainable_names() == first.trainable_names()
