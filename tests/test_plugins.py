"""A third-party plugin can add a strategy, teach an architecture, adjust the plan and be
discovered from an installed distribution, all without editing the package."""

from __future__ import annotations

import inspect
import sys
import textwrap

import pytest
from tiny_models import tiny_model
from torch import nn

from hf_llama_strategies import (
    InvalidArgumentError,
    ModelAnatomy,
    RunContext,
    StrategyArguments,
    UnknownArchitectureError,
    build_plan,
    get_plugin_manager,
    hookimpl,
)
from hf_llama_strategies.core import hookspecs
from hf_llama_strategies.core.anatomy import find_anatomy_by_structure
from hf_llama_strategies.core.plugins import BUILTIN_PLUGINS, describe_plugins

NO_BIAS = {"no_bias": {"enabled": True}}
NO_BIAS_REASON = "strategy_options.no_bias: biases frozen"


def _no_bias_enabled(strategy_args) -> bool:
    options = strategy_args.strategy_options or {}
    return isinstance(options.get("no_bias"), dict) and options["no_bias"].get("enabled") is True


class NoBiasPlugin:
    """A third-party strategy: freeze every bias when strategy_options says so."""

    @hookimpl
    def hfls_validate_arguments(self, strategy_args):
        options = strategy_args.strategy_options or {}
        if "no_bias" not in options:
            return
        value = options["no_bias"]
        if not isinstance(value, dict) or set(value) != {"enabled"} or not isinstance(value["enabled"], bool):
            raise InvalidArgumentError("strategy_options", options, "{'no_bias': {'enabled': true|false}}")

    @hookimpl
    def hfls_plan_parameters(self, plan, anatomy, strategy_args, training_args):
        if _no_bias_enabled(strategy_args):
            plan.set(plan.select(lambda d: d.name.endswith(".bias")), NO_BIAS_REASON, trainable=False)


def _decisions(plan) -> dict[str, tuple[bool, str]]:
    return {d.name: (d.trainable, d.reason) for d in plan}


# ---------------------------------------------------------------------------------------
# Adding a strategy


def test_plugin_in_code_adds_a_strategy():
    model = tiny_model("gpt2")
    baseline = _decisions(build_plan(model, StrategyArguments()))
    biases = {n for n in baseline if n.endswith(".bias")}
    assert len(biases) == 3 * 6 + 1  # per block: ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj; ln_f
    assert all(trainable for trainable, _ in baseline.values())

    args = StrategyArguments(strategy_options=NO_BIAS)
    for plan in (
        build_plan(model, args, plugins=[NoBiasPlugin()]),
        build_plan(model, args, plugin_manager=get_plugin_manager(plugins=[NoBiasPlugin()])),
    ):
        decisions = _decisions(plan)
        assert decisions.keys() == baseline.keys()
        for name, decision in decisions.items():
            if name in biases:
                assert decision == (False, NO_BIAS_REASON), name
            else:
                assert decision == baseline[name], name
        assert set(plan.trainable_names()) == set(baseline) - biases


def test_plugin_strategy_runs_after_builtin_freezing():
    model = tiny_model("gpt2")
    args = StrategyArguments(trainable_layers="-1:", strategy_options=NO_BIAS)
    plan = build_plan(model, args, plugins=[NoBiasPlugin()])
    assert plan.trainable_names() == [
        n for n in plan.decisions
        if not n.endswith(".bias") and (n.startswith("transformer.h.2.") or n.startswith("transformer.ln_f."))
    ]
    assert plan["transformer.h.2.mlp.c_fc.bias"].reason == NO_BIAS_REASON
    assert plan["transformer.h.2.mlp.c_fc.weight"].reason == "trainable_layers='-1:'"
    assert plan["transformer.h.0.mlp.c_fc.bias"].reason == NO_BIAS_REASON


@pytest.mark.parametrize("options", [None, {"no_bias": {"enabled": False}}, {"other_plugin": {"x": 1}}])
def test_plugin_strategy_does_nothing_unless_enabled(options):
    model = tiny_model("gpt2")
    baseline = build_plan(model, StrategyArguments(strategy_options=options)).to_dict()
    plan = build_plan(model, StrategyArguments(strategy_options=options), plugins=[NoBiasPlugin()]).to_dict()
    assert plan["parameters"] == baseline["parameters"]
    assert plan["num_trainable"] == plan["num_parameters"]


@pytest.mark.parametrize("bad", [{"no_bias": {"enabled": "yes"}}, {"no_bias": True}, {"no_bias": {"on": True}}])
def test_plugin_validate_arguments_called_through_hook(bad):
    # StrategyArguments consults no plugin when it is built...
    args = StrategyArguments(strategy_options=bad)
    pm = get_plugin_manager(plugins=[NoBiasPlugin()])
    # ...but its hook rejects the value when called.
    with pytest.raises(InvalidArgumentError) as info:
        pm.hook.hfls_validate_arguments(strategy_args=args)
    assert info.value.option == "strategy_options"
    assert info.value.value == bad
    pm.hook.hfls_validate_arguments(strategy_args=StrategyArguments(strategy_options=NO_BIAS))


def test_build_plan_validates_arguments_of_plugins_in_code():
    args = StrategyArguments(strategy_options={"no_bias": {"enabled": "yes"}})
    with pytest.raises(InvalidArgumentError):
        build_plan(tiny_model("gpt2"), args, plugins=[NoBiasPlugin()])


# ---------------------------------------------------------------------------------------
# Teaching an architecture


class SeqBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)


class SequentialNet(nn.Module):
    """Its blocks live in an nn.Sequential, which the structural finder does not read."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(16, 8)
        self.stack = nn.Sequential(SeqBlock(), SeqBlock(), SeqBlock())
        self.final_ln = nn.LayerNorm(8)
        self.out = nn.Linear(8, 16)


class TeachSequentialNet:
    @hookimpl
    def hfls_model_anatomy(self, model):
        if not isinstance(model, SequentialNet):
            return None
        return ModelAnatomy.from_paths(
            model,
            layers_path="stack",
            embedding_paths=["tok"],
            norm_paths=["final_ln"],
            head_paths=["out"],
            found_by="teach-sequential-net",
        )


def test_unreadable_architecture_without_plugin():
    model = SequentialNet()
    assert find_anatomy_by_structure(model) is None
    with pytest.raises(UnknownArchitectureError, match="hfls_model_anatomy"):
        build_plan(model, StrategyArguments(trainable_layers="-1:"))


def test_plugin_teaches_an_architecture():
    model = SequentialNet()
    anatomy = get_plugin_manager(plugins=[TeachSequentialNet()]).hook.hfls_model_anatomy(model=model)
    assert anatomy == ModelAnatomy(
        model_class="SequentialNet",
        layers_path="stack",
        num_layers=3,
        embedding_paths=("tok",),
        norm_paths=("final_ln",),
        head_paths=("out",),
        tied_parameters={},
        found_by="teach-sequential-net",
    )

    plan = build_plan(model, StrategyArguments(trainable_layers="-1:"), plugins=[TeachSequentialNet()])
    assert (plan.layers_path, plan.num_layers) == ("stack", 3)
    kinds = {d.name: (d.kind, d.layer) for d in plan}
    assert kinds == {
        "tok.weight": ("embeddings", None),
        **{f"stack.{i}.{m}.{p}": ("layer", i) for i in range(3) for m in ("fc", "ln") for p in ("weight", "bias")},
        "final_ln.weight": ("norm", None),
        "final_ln.bias": ("norm", None),
        "out.weight": ("head", None),
        "out.bias": ("head", None),
    }
    assert plan.trainable_names() == [
        "stack.2.fc.weight", "stack.2.fc.bias", "stack.2.ln.weight", "stack.2.ln.bias",
        "final_ln.weight", "final_ln.bias", "out.weight", "out.bias",
    ]


def test_anatomy_plugin_leaves_other_models_to_the_finder():
    model = tiny_model("llama")
    anatomy = get_plugin_manager(plugins=[TeachSequentialNet()]).hook.hfls_model_anatomy(model=model)
    assert anatomy.found_by == "structure"
    assert anatomy.layers_path == "model.layers"


class HeadOnPlainModule(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)


class TeachHead:
    @hookimpl
    def hfls_model_anatomy(self, model):
        if isinstance(model, HeadOnPlainModule):
            return ModelAnatomy.from_paths(model, "layers", ["embed"], ["norm"], ["head"], found_by="teach-head")
        return None


def test_anatomy_plugin_wins_over_structural_finder():
    model = HeadOnPlainModule()
    structural = find_anatomy_by_structure(model)
    assert structural is not None and structural.layers_path == "layers"
    plan = build_plan(model, StrategyArguments(trainable_layers="-1:"), plugins=[TeachHead()])
    assert plan["head.weight"].kind == "head"
    assert plan.trainable_names() == ["layers.1.weight", "layers.1.bias", "norm.weight", "norm.bias",
                                      "head.weight", "head.bias"]


def test_from_paths_checks_paths():
    model = SequentialNet()
    with pytest.raises(UnknownArchitectureError, match="'nope' does not exist in SequentialNet"):
        ModelAnatomy.from_paths(model, "stack", embedding_paths=["nope"])
    with pytest.raises(UnknownArchitectureError, match="'out' is a Linear"):
        ModelAnatomy.from_paths(model, "out")


# ---------------------------------------------------------------------------------------
# Adjusting the plan


class FreezeFinalNorm:
    @hookimpl
    def hfls_adjust_plan(self, plan, anatomy, strategy_args, training_args):
        plan.set(plan.select(lambda d: d.kind == "norm"), "policy: final norm frozen", trainable=False)


class ForceNormTrainable:
    @hookimpl
    def hfls_plan_parameters(self, plan, anatomy, strategy_args, training_args):
        plan.set(plan.select(lambda d: d.kind == "norm"), "force norm", trainable=True)


def test_adjust_plan_overrides_builtin_freezing():
    model = tiny_model("llama")
    args = StrategyArguments(train_norm=True)
    before = build_plan(model, args)
    assert (before["model.norm.weight"].trainable, before["model.norm.weight"].reason) == (True, "train_norm=true")

    after = build_plan(model, args, plugins=[FreezeFinalNorm(), ForceNormTrainable()])
    assert (after["model.norm.weight"].trainable, after["model.norm.weight"].reason) == (
        False, "policy: final norm frozen",
    )
    assert set(after.trainable_names()) == set(before.trainable_names()) - {"model.norm.weight"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    @hookimpl
    def hfls_model_anatomy(self, model):
        self.calls.append(("hfls_model_anatomy", None))
        return None

    @hookimpl
    def hfls_plan_parameters(self, plan, anatomy, strategy_args, training_args):
        # The built-in freezing (tryfirst) has already decided.
        self.calls.append(("hfls_plan_parameters", plan["model.layers.0.mlp.up_proj.weight"].trainable))

    @hookimpl
    def hfls_adjust_plan(self, plan, anatomy, strategy_args, training_args):
        self.calls.append(("hfls_adjust_plan", None))

    @hookimpl
    def hfls_validate_plan(self, plan, anatomy, strategy_args, training_args):
        self.calls.append(("hfls_validate_plan", None))


def test_hook_order_when_building_a_plan():
    recorder = Recorder()
    build_plan(tiny_model("llama"), StrategyArguments(trainable_layers="-1:"), plugins=[recorder])
    assert recorder.calls == [
        ("hfls_model_anatomy", None),
        ("hfls_plan_parameters", False),
        ("hfls_adjust_plan", None),
        ("hfls_validate_plan", None),
    ]


# ---------------------------------------------------------------------------------------
# Discovery


PLUGIN_MODULE = "fake_hfls_plugin_mod"
PLUGIN_SOURCE = textwrap.dedent(
    '''
    """A no-bias strategy, installed as a distribution."""
    from hf_llama_strategies import InvalidArgumentError, hookimpl


    @hookimpl
    def hfls_validate_arguments(strategy_args):
        options = strategy_args.strategy_options or {}
        if "no_bias" in options and options["no_bias"] not in ({"enabled": True}, {"enabled": False}):
            raise InvalidArgumentError("strategy_options", options, "{'no_bias': {'enabled': true|false}}")


    @hookimpl
    def hfls_plan_parameters(plan, anatomy, strategy_args, training_args):
        if (strategy_args.strategy_options or {}).get("no_bias") == {"enabled": True}:
            plan.set(plan.select(lambda d: d.name.endswith(".bias")), "fake-hfls-plugin: no bias", trainable=False)
    '''
)


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    dist_info = tmp_path / "fake_hfls_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-hfls-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[hf_llama_strategies]\nno_bias = {PLUGIN_MODULE}\n")
    (tmp_path / f"{PLUGIN_MODULE}.py").write_text(PLUGIN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "no_bias"
    sys.modules.pop(PLUGIN_MODULE, None)


def test_entry_point_plugin_is_discovered(installed_plugin):
    pm = get_plugin_manager()
    assert pm.has_plugin(installed_plugin)
    assert pm.get_plugin(installed_plugin) is sys.modules[PLUGIN_MODULE]
    rows = {row["name"]: row for row in describe_plugins(pm)}
    assert rows[installed_plugin] == {
        "name": "no_bias",
        "source": "fake-hfls-plugin 0.1",
        "hooks": ["hfls_plan_parameters", "hfls_validate_arguments"],
    }

    pm_without = get_plugin_manager(load_entry_points=False)
    assert not pm_without.has_plugin(installed_plugin)
    assert installed_plugin not in {row["name"] for row in describe_plugins(pm_without)}


def test_entry_point_plugin_strategy_applies_without_passing_it(installed_plugin):
    plan = build_plan(tiny_model("gpt2"), StrategyArguments(strategy_options=NO_BIAS))
    biases = [n for n in plan.decisions if n.endswith(".bias")]
    assert len(biases) == 19
    assert all(plan[n].reason == "fake-hfls-plugin: no bias" and not plan[n].trainable for n in biases)
    assert set(plan.trainable_names()) == set(plan.decisions) - set(biases)


@pytest.mark.parametrize("bad", [{"no_bias": {"enabled": "yes"}}, '{"no_bias": {"enabled": null}}'])
def test_entry_point_plugin_validates_arguments_once_per_run(installed_plugin, bad):
    # Building the arguments loads no plugin (issue 20: a broken plugin must not break them);
    # the run's context has every plugin check the options it owns.
    args = StrategyArguments(strategy_options=bad)
    for start_a_run in (lambda: RunContext.create(args), lambda: build_plan(tiny_model("gpt2"), args)):
        with pytest.raises(InvalidArgumentError) as info:
            start_a_run()
        assert info.value.option == "strategy_options"
        assert str(info.value).startswith("strategy_options={'no_bias': {'enabled': ")
    RunContext.create(StrategyArguments(strategy_options=NO_BIAS))  # a good value passes


def test_without_entry_point_plugin_bad_option_is_not_checked():
    # The contrast to the test above: the rejection comes from the installed plugin.
    assert StrategyArguments(strategy_options={"no_bias": {"enabled": "yes"}}).strategy_options == {
        "no_bias": {"enabled": "yes"}
    }


def test_builtins_registered_and_described():
    pm = get_plugin_manager(plugins=[NoBiasPlugin()], load_entry_points=False)
    for name in BUILTIN_PLUGINS:
        assert pm.has_plugin(name)
    rows = describe_plugins(pm)
    builtin_rows = {row["name"]: row for row in rows if row["name"] in BUILTIN_PLUGINS}
    assert set(builtin_rows) == set(BUILTIN_PLUGINS)
    assert all(row["source"] == "built-in" for row in builtin_rows.values())
    known = {k: builtin_rows[k] for k in ("hf_llama_strategies.core.builtin_hooks",
                                          "hf_llama_strategies.strategies.freezing")}
    assert known == {
        "hf_llama_strategies.core.builtin_hooks": {
            "name": "hf_llama_strategies.core.builtin_hooks",
            "source": "built-in",
            "hooks": ["hfls_hardware_probe", "hfls_model_anatomy"],
        },
        "hf_llama_strategies.strategies.freezing": {
            "name": "hf_llama_strategies.strategies.freezing",
            "source": "built-in",
            "hooks": ["hfls_plan_parameters"],
        },
    }
    others = [row for row in rows if row["name"] not in BUILTIN_PLUGINS]
    assert len(others) == 1
    assert others[0]["source"] == "in code"
    assert others[0]["hooks"] == ["hfls_plan_parameters", "hfls_validate_arguments"]


# ---------------------------------------------------------------------------------------
# Hook specifications are documented


HOOK_NAMES = {
    "hfls_validate_arguments",
    "hfls_model_anatomy",
    "hfls_plan_parameters",
    "hfls_adjust_plan",
    "hfls_validate_plan",
}


def _hookspec_functions():
    return {name: f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("hfls_")}


def test_hookspecs_are_the_documented_ones():
    specs = _hookspec_functions()
    # The plan-building hooks; strategies with runtime needs add documented hooks of their own.
    assert HOOK_NAMES <= set(specs)
    pm = get_plugin_manager(load_entry_points=False)
    for name, function in specs.items():
        assert hasattr(function, "hf_llama_strategies_spec"), name
        assert getattr(pm.hook, name).spec is not None, name
    assert specs["hfls_model_anatomy"].hf_llama_strategies_spec["firstresult"] is True


@pytest.mark.parametrize("name", sorted(_hookspec_functions()))
def test_hookspec_has_docstring_and_annotations(name):
    function = _hookspec_functions()[name]
    doc = inspect.getdoc(function)
    assert doc and len(doc.split()) >= 5, name
    signature = inspect.signature(function)
    assert signature.parameters, name
    for param in signature.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, f"{name}({param.name})"
    assert signature.return_annotation is not inspect.Signature.empty, name


class Around:
    """A wrapper implementation: pluggy hands it the result of the others."""

    def __init__(self):
        self.seen = []

    @hookimpl(wrapper=True)
    def hfls_plan_parameters(self, plan):
        self.seen.append("before")
        result = yield
        self.seen.append(plan["lm_head.weight"].trainable)
        return result  # noqa: B901 -- pluggy's new-style wrapper hands its result back by returning it


def test_a_wrapper_plugin_runs_around_the_others_and_pluggy_lookups_take_the_plugin_as_given():
    around = Around()
    pm = get_plugin_manager(plugins=[around], load_entry_points=False)
    build_plan(tiny_model("llama"), StrategyArguments(train_head=False), plugin_manager=pm)
    assert around.seen == ["before", False]  # after freezing decided
    assert pm.is_registered(around) and pm.get_plugin(pm.get_name(around)) is around
    assert [c.name for c in pm.get_hookcallers(around)] == ["hfls_plan_parameters"]
    assert around in pm.get_plugins() and (pm.get_name(around), around) in pm.list_name_plugin()
    assert pm.unregister(around) is around and not pm.is_registered(around)
    pm.add_plugin(around)  # registered again once unregistered
    assert pm.is_registered(around)
