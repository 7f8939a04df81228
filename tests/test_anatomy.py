"""ModelAnatomy: embeddings, decoder layers by index, final norm and head, for every tiny
architecture, through PEFT, on custom modules; and the layer selection syntax."""

from __future__ import annotations

import pytest
from tiny_models import EXPECTED, EXPECTED_PEFT, tiny_model, tiny_peft_lora_model
from torch import nn

from hf_llama_strategies import (
    InvalidArgumentError,
    ModelAnatomy,
    StrategyArguments,
    UnknownArchitectureError,
    build_plan,
    get_plugin_manager,
    parse_layer_selection,
)
from hf_llama_strategies.core.anatomy import find_anatomy_by_structure

PEFT_HEADS = [("llama", "causal_lm"), ("llama", "seq_cls")]


def _anatomy(model: nn.Module) -> ModelAnatomy:
    return get_plugin_manager().hook.hfls_model_anatomy(model=model)


def _names_by_kind(plan) -> dict[str, set[str]]:
    kinds: dict[str, set[str]] = {}
    for d in plan:
        kinds.setdefault(d.kind, set()).add(d.name)
    return kinds


def _layer_index(layers_path: str, name: str) -> int:
    return int(name[len(layers_path) + 1 :].split(".", 1)[0])


def _check_structure(model: nn.Module, expected) -> None:
    anatomy = _anatomy(model)
    assert anatomy is not None
    assert anatomy.found_by == "structure"
    assert anatomy.layers_path == expected["layers_path"]
    assert anatomy.num_layers == expected["num_layers"]
    assert anatomy.tied_parameters == expected["tied_aliases"]

    plan = build_plan(model)
    assert plan.layers_path == expected["layers_path"]
    assert plan.num_layers == expected["num_layers"]
    assert len(plan.decisions) == expected["num_named_params"]
    assert list(plan.decisions) == [n for n, _ in model.named_parameters()]

    kinds = _names_by_kind(plan)
    assert set(kinds) <= {"embeddings", "layer", "norm", "head"}, kinds.get("other")
    assert kinds.get("embeddings", set()) == set(expected["embedding_params"])
    assert kinds.get("norm", set()) == set(expected["norm_params"])
    assert kinds.get("head", set()) == set(expected["head_params"])
    assert set(expected["pooler_params"]) <= kinds.get("head", set())
    layer_names = kinds["layer"]
    assert layer_names == {n for n in plan.decisions if n.startswith(expected["layers_path"] + ".")}

    # The plan's kinds are the anatomy's, and every layer parameter has its parsed index.
    for d in plan:
        assert anatomy.classify(d.name) == (d.kind, d.layer), d.name
        if d.kind == "layer":
            assert d.layer == _layer_index(expected["layers_path"], d.name), d.name
        else:
            assert d.layer is None, d.name
    assert {d.layer for d in plan if d.kind == "layer"} == set(range(expected["num_layers"]))

    # Tied aliases are recorded on the canonical parameter's decision.
    for alias, canonical in expected["tied_aliases"].items():
        assert alias not in plan.decisions
        assert alias in plan[canonical].tied_with


@pytest.mark.parametrize("arch_head", sorted(EXPECTED), ids=lambda k: f"{k[0]}-{k[1]}")
def test_anatomy_matches_ground_truth(arch_head):
    _check_structure(tiny_model(*arch_head), EXPECTED[arch_head])


def test_ground_truth_covers_every_architecture_and_head():
    from tiny_models import ARCHITECTURES, HEADS

    assert set(EXPECTED) == {(a, h) for a in ARCHITECTURES for h in HEADS}


# ---------------------------------------------------------------------------------------
# PEFT


@pytest.mark.parametrize("arch_head", PEFT_HEADS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_peft_layers_found_through_wrapper(arch_head):
    expected = EXPECTED_PEFT[arch_head]
    model = tiny_peft_lora_model(*arch_head)
    _check_structure(model, expected)
    plan = build_plan(model)
    assert set(expected["lora_params"]) <= _names_by_kind(plan)["layer"]


@pytest.mark.parametrize("arch_head", PEFT_HEADS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_peft_default_keeps_what_peft_froze_frozen(arch_head):
    expected = EXPECTED_PEFT[arch_head]
    model = tiny_peft_lora_model(*arch_head)
    plan = build_plan(model, StrategyArguments())
    assert plan.trainable_names() == expected["trainable_params"]
    for d in plan:
        if d.name not in expected["trainable_params"]:
            assert d.requires_grad_before is False, d.name
            assert d.reason == "frozen before the plan was built (for example by PEFT)", d.name
    plan.apply(model)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected["trainable_params"]


@pytest.mark.parametrize("arch_head", PEFT_HEADS, ids=lambda k: f"{k[0]}-{k[1]}")
def test_peft_last_layer_only(arch_head):
    expected = EXPECTED_PEFT[arch_head]
    model = tiny_peft_lora_model(*arch_head)
    plan = build_plan(model, StrategyArguments(trainable_layers="-1:"))
    last = f"{expected['layers_path']}.{expected['num_layers'] - 1}."
    wanted = [n for n in expected["lora_params"] if n.startswith(last)]
    assert len(wanted) == 4
    head_copies = [n for n in expected["trainable_params"] if ".modules_to_save." in n]
    assert len(head_copies) == (1 if arch_head[1] == "seq_cls" else 0)
    assert plan.trainable_names() == wanted + head_copies
    assert plan[f"{expected['layers_path']}.0.self_attn.q_proj.lora_A.default.weight"].reason == (
        "trainable_layers='-1:'"
    )


# ---------------------------------------------------------------------------------------
# Layer indices are parsed from paths: ``experts.3.`` inside layer 0 is layer 0.


class MoEBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])


class ToyMoE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([MoEBlock() for _ in range(4)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 16)


def test_expert_index_is_not_a_layer_index():
    model = ToyMoE()
    anatomy = _anatomy(model)
    assert anatomy.layers_path == "layers"
    assert anatomy.num_layers == 4
    assert anatomy.embedding_paths == ("embed",)
    assert anatomy.norm_paths == ("norm",)
    # A plain nn.Module is its own backbone: what follows the layers, norm aside, is the head.
    assert anatomy.head_paths == ("head",)
    assert anatomy.classify("layers.0.experts.3.weight") == ("layer", 0)
    assert anatomy.classify("layers.2.experts.1.bias") == ("layer", 2)
    assert anatomy.classify("layers.3.router.weight") == ("layer", 3)

    plan = build_plan(model, StrategyArguments(trainable_layers="3"))
    for d in plan:
        assert anatomy.classify(d.name) == (d.kind, d.layer), d.name
    expert3_of_layer0 = plan["layers.0.experts.3.weight"]
    assert (expert3_of_layer0.kind, expert3_of_layer0.layer, expert3_of_layer0.trainable) == ("layer", 0, False)
    layer3 = {n for n in plan.decisions if n.startswith("layers.3.")}
    assert len(layer3) == 10
    assert {n for n in plan.trainable_names() if n.startswith("layers.")} == layer3
    assert plan["embed.weight"].trainable is False
    assert plan["norm.weight"].trainable is True
    assert plan["head.weight"].kind == "head" and plan["head.weight"].trainable is True


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)


class MixedList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 4)])


class ParameterlessList(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU()])
        self.fc = nn.Linear(4, 4)


@pytest.mark.parametrize("model_cls", [PlainMLP, MixedList, ParameterlessList])
def test_model_without_layer_stack_is_unknown(model_cls):
    model = model_cls()
    assert find_anatomy_by_structure(model) is None
    with pytest.raises(UnknownArchitectureError) as info:
        build_plan(model, StrategyArguments(trainable_layers="-1:"))
    message = str(info.value)
    assert "hfls_model_anatomy" in message
    assert model_cls.__name__ in message
    # With no option that names layers, every parameter is "other" and trains as it is.
    plan = build_plan(model)
    assert {d.kind for d in plan} == {"other"} and plan.num_trainable == plan.num_parameters


# ---------------------------------------------------------------------------------------
# Layer selection syntax


@pytest.mark.parametrize(
    "spec, num_layers, expected",
    [
        ("all", 12, tuple(range(12))),
        (" ALL ", 3, (0, 1, 2)),
        ("none", 12, ()),
        ("-2:", 12, (10, 11)),
        (":4", 12, (0, 1, 2, 3)),
        ("0,5,10:12", 12, (0, 5, 10, 11)),
        ("::2", 12, (0, 2, 4, 6, 8, 10)),
        ("-1", 12, (11,)),
        ("-12", 12, (0,)),
        ("1::4", 12, (1, 5, 9)),
        ("3:0:-1", 12, (1, 2, 3)),
        ("-8:", 8, tuple(range(8))),
        ("0:8", 8, tuple(range(8))),
        ("11,10:12, -2:,5,5", 12, (5, 10, 11)),  # overlapping tokens: deduplicated, sorted
        ("7, 0, 3", 8, (0, 3, 7)),
    ],
)
def test_parse_layer_selection(spec, num_layers, expected):
    assert parse_layer_selection(spec, num_layers) == expected


RANGE_ERRORS = [
    ("8", "Layer 8 is out of range"),
    ("-9", "Layer -9 is out of range"),
    ("10:12", "Slice bound 10 in '10:12' is out of range"),
    ("-10:", "Slice bound -10 in '-10:' is out of range"),
    ("5:3", "Slice '5:3' selects no layer"),
    ("8:", "Slice '8:' selects no layer"),
]
SYNTAX_ERRORS = [
    ("::0", "Slice step cannot be zero"),
    ("1:5:0", "Slice step cannot be zero"),
    ("a", "Cannot parse 'a'"),
    ("1-3", "Cannot parse '1-3'"),
    ("", "Cannot parse ''"),
    ("1,,2", "Cannot parse ''"),
    ("1.5", "Cannot parse '1.5'"),
]


@pytest.mark.parametrize("spec, detail", RANGE_ERRORS + SYNTAX_ERRORS)
def test_parse_layer_selection_errors(spec, detail):
    with pytest.raises(InvalidArgumentError) as info:
        parse_layer_selection(spec, 8)
    error = info.value
    assert error.option == "trainable_layers"
    assert error.value == spec
    message = str(error)
    assert message.startswith(f"trainable_layers={spec!r} is not valid")
    assert detail in message


@pytest.mark.parametrize("spec", [s for s, _ in RANGE_ERRORS])
def test_out_of_range_errors_name_layer_count(spec):
    with pytest.raises(InvalidArgumentError, match=r"it has 8 layers: indices 0\.\.7, or -8\.\.-1"):
        parse_layer_selection(spec, 8)


@pytest.mark.parametrize("spec", [s for s, _ in SYNTAX_ERRORS] + [2])
def test_unparsable_errors_name_layer_count(spec):
    with pytest.raises(InvalidArgumentError, match="8 layers"):
        parse_layer_selection(spec, 8)


@pytest.mark.parametrize("num_layers", [8, None])
def test_int_selection_suggests_slice(num_layers):
    with pytest.raises(InvalidArgumentError) as info:
        parse_layer_selection(2, num_layers)
    assert info.value.option == "trainable_layers"
    assert info.value.value == 2
    message = str(info.value)
    assert message.startswith("trainable_layers=2 is not valid")
    assert "'-2:' for the last 2 layers" in message


def test_int_selection_rejected_by_strategy_arguments():
    with pytest.raises(InvalidArgumentError, match="'-2:' for the last 2 layers"):
        StrategyArguments(trainable_layers=2)


@pytest.mark.parametrize("spec", ["all", "none", "-2:", ":4", "0,5,10:12", "::2", "-1", "99", "-99:"])
def test_syntax_only_check_returns_none(spec):
    assert parse_layer_selection(spec, None) is None


@pytest.mark.parametrize("spec", [s for s, _ in SYNTAX_ERRORS])
def test_syntax_only_check_rejects_garbage(spec):
    with pytest.raises(InvalidArgumentError) as info:
        parse_layer_selection(spec, None)
    assert info.value.option == "trainable_layers"
    assert info.value.value == spec


def test_option_name_is_reported():
    with pytest.raises(InvalidArgumentError, match=r"^lisa_layers='x' is not valid") as info:
        parse_layer_selection("x", 4, option="lisa_layers")
    assert info.value.option == "lisa_layers"
